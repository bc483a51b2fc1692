"""``seqstream status --url URL``: a running daemon's ``/status`` as a table.

The daemon serves ``/status`` beside ``/metrics`` (:mod:`pipeline.daemon.status`); this reads it
over HTTP and prints readiness, each model (route) with its queue and listed streams, and
the rejections that
happened. ``URL`` is the daemon's HTTP address (``http://host:9108``); a URL that
already ends in ``/status`` is used as given. ``--json`` prints the document unchanged.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from pipeline.commands.parsing import subcommand
from pipeline.errors import SeqstreamError

TIMEOUT_S = 10.0


def register(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "status",
        run,
        help="print a running daemon's status (streams, predictions, rejections)",
        description="Read /status from a running 'seqstream run' (its [metrics] address) "
        "and print it as tables.",
    )
    p.add_argument(
        "--url",
        required=True,
        help="the daemon's HTTP address, e.g. http://127.0.0.1:9108",
    )
    p.add_argument("--json", action="store_true", help="print the JSON document instead")


def status_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SeqstreamError(f"--url: {url!r} is not an http(s) URL (e.g. http://127.0.0.1:9108)")
    if parts.path.rstrip("/").endswith("/status"):
        return url
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/status"))


def fetch(url: str) -> dict[str, Any]:
    target = status_url(url)
    try:
        with urllib.request.urlopen(target, timeout=TIMEOUT_S) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise SeqstreamError(f"{target}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SeqstreamError(f"{target}: cannot connect ({reason})") from None
    except ValueError as exc:
        raise SeqstreamError(f"{target}: not a seqstream status document ({exc})") from None
    if not isinstance(doc, dict) or "model" not in doc or "streams" not in doc:
        raise SeqstreamError(f"{target}: not a seqstream status document")
    return doc


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns, as wide as their widest cell."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def summary(prediction: dict[str, Any] | None) -> str:
    """A prediction in a few words (the label, the score, the forecast)."""
    if prediction is None:
        return ""
    if "label" in prediction:
        return str(prediction["label"])
    if "anomaly" in prediction:
        return f"score {prediction['score']}" + (" ANOMALY" if prediction["anomaly"] else "")
    if "forecast" in prediction:
        return "; ".join(f"{k}: {v}" for k, v in prediction["forecast"].items())
    return json.dumps(prediction)


def render(doc: dict[str, Any]) -> str:
    """Readiness, then each model (route) with its queue and streams, then rejections."""
    failed = [k for k, ok in doc.get("checks", {}).items() if not ok]
    lines = ["ready:  yes" if doc.get("ready") else f"ready:  NO ({', '.join(failed)})"]
    models = doc.get("models") or [doc]  # a document from before routes: its one model
    for entry in models:
        m = entry["model"]
        route = f"[{entry['route']}] " if len(models) > 1 else ""
        lines += [
            f"model:  {route}{m['name']} {m['version']} ({m['task']}) from {m['path']}",
            f"queue:  {entry['queue']['depth']} of {entry['queue']['capacity']}",
        ]
        streams = entry["streams"]
        if "error" in streams:
            lines.append(f"streams: unavailable: {streams['error']}")
            continue
        lines.append(f"streams: {streams['listed']} listed of {streams['active']} active")
        rows = [
            (
                s["stream"],
                s["last_seq"],
                s["last_ts"],
                summary(s["last_prediction"]),
                s["prediction_age_s"],
            )
            for s in streams["items"]
        ]
        lines += ["  " + ln for ln in table(("STREAM", "SEQ", "TS", "PREDICTION", "AGE_S"), rows)]
    rejected = [(k, int(v)) for k, v in sorted(doc.get("rejections", {}).items()) if v > 0]
    lines.append(f"rejections: {sum(n for _, n in rejected)}")
    if rejected:
        lines += ["  " + ln for ln in table(("REASON", "COUNT"), rejected)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    doc = fetch(args.url)
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0
