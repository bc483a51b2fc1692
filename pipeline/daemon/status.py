"""The daemon's HTTP surface beside ``/metrics``: liveness, readiness, status, a page.

One listener (``[metrics] bind``/``port``) serves:

* ``/metrics``: the Prometheus exposition (only that path; other paths used to get it).
* ``/healthz``: 200 while the process can answer at all (liveness: restart if not).
* ``/readyz``: 200 when the broker is connected, a model is loaded and the engine is not
  stalled, else 503; the JSON body names each check (readiness: send no traffic if not).
* ``/status``: JSON for people and tools: each model (route) with its queue, rejections
  by reason and the most recently seen streams (at most ``max_streams``, newest first)
  with their last sequence number and timestamp, last published prediction and its age.
* ``/``: a read-only page rendering ``/status`` every two seconds (every model, and the
  streams of all of them); one HTML document
  with inline script and style (no build step, no external assets). Stream ids come
  from whoever can publish: the page writes them as text, never as markup.

Stream rows are read on the engine's thread (``Worker.call``), where the state store
lives, so a status request never races a batch; if the engine does not answer within
``timeout_s`` the streams are reported as unavailable, not waited for. The last
prediction per stream comes from :class:`~pipeline.sinks.recent.LastPredictions`, which
the prediction sink fills.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.sinks.recent import LastPredictions

if TYPE_CHECKING:
    from pipeline.daemon.service import EngineWatchdog
    from pipeline.engine.engine import Engine
    from pipeline.telemetry.metrics import Metrics
    from pipeline.transport.mqtt import Link

# Streams listed by /status and the page by default ([metrics] status_streams).
MAX_STREAMS_LISTED = 100
STATUS_TIMEOUT_S = 2.0

Route = Callable[[], tuple[int, str, bytes]]


@dataclass(frozen=True, slots=True)
class RouteStatus:
    """What /status reads of one route (one model): its engine, reached on the engine's
    thread through ``call``, its last predictions, its metrics and its queue."""

    name: str
    engine: Engine
    call: Callable[[Callable[[Engine], Any]], Future[Any]]
    last: LastPredictions
    metrics: Metrics
    depth: Callable[[], int]
    capacity: int


class StatusView:
    """What the HTTP endpoints report, read from the daemon's parts when asked."""

    def __init__(
        self,
        *,
        routes: Sequence[RouteStatus],
        link: Link,
        watchdog: EngineWatchdog,
        max_streams: int = MAX_STREAMS_LISTED,
        timeout_s: float = STATUS_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._routes = tuple(routes)
        self._link = link
        self._watchdog = watchdog
        self.max_streams = max_streams
        self._timeout_s = timeout_s
        self._clock = clock
        self._started = clock()

    # -- the checks ---------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "alive": True,
            "pid": os.getpid(),
            "uptime_s": round(self._clock() - self._started, 1),
        }

    def readiness(self) -> dict[str, Any]:
        stall = self._watchdog.stall_s()
        checks = {
            "broker_connected": self._link.connected,
            "model_loaded": all(r.engine.model is not None for r in self._routes),
            "engine_progressing": stall <= self._watchdog.stall_after_s,
        }
        return {"ready": all(checks.values()), "checks": checks, "engine_stall_s": round(stall, 1)}

    def status(self) -> dict[str, Any]:
        """Readiness, then one entry per model (``models``); ``model``, ``queue`` and
        ``streams`` at the top are the first model's (all of a single-model daemon), and
        ``rejections`` counts every model's and the topics no route matched."""
        ready = self.readiness()
        rejected = self._routes[0].metrics.rejected.collect()
        models = [self._model(r, rejected) for r in self._routes]
        first = models[0]
        return {
            "model": first["model"],
            "ready": ready["ready"],
            "checks": ready["checks"],
            "uptime_s": round(self._clock() - self._started, 1),
            "queue": first["queue"],
            "rejections": _counts(rejected, "reason"),
            "streams": first["streams"],
            "models": models,
        }

    def _model(self, route: RouteStatus, rejected: Iterable[Any]) -> dict[str, Any]:
        model = route.engine.model
        spec = model.spec
        doc: dict[str, Any] = {
            "route": route.name,
            "model": {
                "name": spec.name,
                "version": spec.version,
                "task": spec.task,
                "path": str(model.path),
                "provider": model.provider,
                "features": list(spec.features),
            },
            "queue": {"depth": route.depth(), "capacity": route.capacity},
            "rejections": _counts(rejected, "reason", model=route.name),
        }
        try:
            streams = route.call(lambda e: self._streams(e, route.last))
            doc["streams"] = streams.result(timeout=self._timeout_s)
        except TimeoutError:
            doc["streams"] = {"error": f"the engine did not answer within {self._timeout_s:g} s"}
        return doc

    def _streams(self, engine: Engine, last: LastPredictions) -> dict[str, Any]:
        """On the engine's thread: the newest ``max_streams`` streams, as JSON rows."""
        last.prune()
        return stream_rows([engine], self.max_streams, self._clock(), last)

    # -- HTTP ---------------------------------------------------------------------------

    def routes(self) -> dict[str, Route]:
        """Path -> handler, for :class:`pipeline.telemetry.metrics.Exporter`."""

        def healthz() -> tuple[int, str, bytes]:
            return 200, JSON, _json(self.health())

        def readyz() -> tuple[int, str, bytes]:
            doc = self.readiness()
            return (200 if doc["ready"] else 503), JSON, _json(doc)

        def status() -> tuple[int, str, bytes]:
            return 200, JSON, _json(self.status())

        def page() -> tuple[int, str, bytes]:
            return 200, HTML, PAGE

        return {"/healthz": healthz, "/readyz": readyz, "/status": status, "/": page}


JSON = "application/json"
HTML = "text/html; charset=utf-8"


def stream_rows(
    engines: Iterable[Engine], limit: int, now: float, last: LastPredictions | None = None
) -> dict[str, Any]:
    """The newest ``limit`` streams of ``engines`` as /status rows (on their thread);
    cluster mode passes the engines of the partitions it owns."""
    stores = [engine.store for engine in engines]
    every = [st for store in stores for st in store]
    newest = sorted(every, key=lambda st: st.last_seen, reverse=True)[:limit]
    rows = []
    for st in newest:
        key = st.key
        nxt = st.next_seq
        payload = last.payloads.get(key) if last is not None else None
        received = last.received.get(key) if last is not None else None
        rows.append(
            {
                "stream": key,
                "last_seq": nxt - 1 if nxt is not None and nxt > 0 else st.last_seq,
                "last_ts": st.last_ts,
                "last_prediction": json.loads(payload) if payload is not None else None,
                "prediction_age_s": round(now - received, 3) if received is not None else None,
            }
        )
    return {"active": len(every), "listed": len(rows), "limit": limit, "items": rows}


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _counts(families: Iterable[Any], label: str, model: str | None = None) -> dict[str, float]:
    """A labelled counter's ``_total`` samples as ``{label value: count}``, summed over
    models, or of ``model`` only."""
    out: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name.endswith("_total") and model in (None, sample.labels.get("model")):
                key = sample.labels[label]
                out[key] = out.get(key, 0.0) + sample.value
    return out


# The page: one document, inline style and script, text nodes only for remote data.
PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>seqstream status</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em} h2{font-size:1.05em;margin:1.2em 0 .3em}
table{border-collapse:collapse}
td,th{padding:.2em .7em;border-bottom:1px solid #ddd;text-align:left}
th{background:#f4f4f4} .ok{color:#176b00} .bad{color:#b00020;font-weight:bold}
code{font-size:.92em} #err{color:#b00020}
</style></head>
<body>
<h1>seqstream <span id="model"></span></h1>
<div id="ready"></div><div id="err"></div>
<h2>Models</h2>
<table id="models"><thead><tr><th>route</th><th>model</th><th>task</th><th>active streams</th>
<th>queue</th></tr></thead><tbody></tbody></table>
<h2>Streams <span id="count"></span></h2>
<table id="streams"><thead><tr><th>stream</th><th>last seq</th><th>last ts</th>
<th>last prediction</th><th>age (s)</th></tr></thead><tbody></tbody></table>
<h2>Rejections</h2>
<table id="rejections"><thead><tr><th>reason</th><th>count</th></tr></thead><tbody></tbody></table>
<p><small>Read-only; refreshed every 2 s from <a href="status">/status</a>.
Metrics: <a href="metrics">/metrics</a>.</small></p>
<script>
"use strict";
function row(cells) {
  const tr = document.createElement("tr");
  for (const text of cells) {
    const td = document.createElement("td");
    td.textContent = text;  // remote data is text, never markup
    tr.appendChild(td);
  }
  return tr;
}
function fill(id, rows) {
  document.querySelector("#" + id + " tbody").replaceChildren(...rows.map(row));
}
function summary(p) {
  if (p === null) return "";
  if ("label" in p) return p.label;
  if ("anomaly" in p) return "score " + p.score + (p.anomaly ? " ANOMALY" : "");
  if ("forecast" in p) {
    return Object.entries(p.forecast).map(([k, v]) => k + ": " + v.join(", ")).join("; ");
  }
  return JSON.stringify(p);
}
function show(s) {
  const m = s.model;
  document.getElementById("model").textContent = m.name + " " + m.version + " (" + m.task + ")";
  const ready = document.getElementById("ready");
  const failed = Object.entries(s.checks).filter(([, ok]) => !ok).map(([k]) => k);
  ready.textContent = s.ready ? "ready" : "NOT READY: " + failed.join(", ");
  ready.className = s.ready ? "ok" : "bad";
  fill("models", (s.models || []).map(r => [r.route, r.model.name + " " + r.model.version,
    r.model.task, r.streams.error ? r.streams.error : r.streams.active,
    r.queue.depth + " of " + r.queue.capacity]));
  // every model's streams; with several models each id is prefixed by its route
  const models = s.models || [{route: "", streams: s.streams}];
  const many = models.length > 1;
  const errors = models.filter(r => r.streams.error).map(r => r.streams.error);
  const ok = models.filter(r => !r.streams.error);
  const listed = ok.reduce((n, r) => n + r.streams.listed, 0);
  const active = ok.reduce((n, r) => n + r.streams.active, 0);
  document.getElementById("count").textContent = "(" + listed + " of " + active + " active"
    + (errors.length ? "; " + errors.join("; ") : "") + ")";
  fill("streams", ok.flatMap(r => r.streams.items.map(x => [
    (many ? r.route + ": " : "") + x.stream, x.last_seq ?? "", x.last_ts ?? "",
    summary(x.last_prediction), x.prediction_age_s ?? ""])));
  fill("rejections", Object.entries(s.rejections).filter(([, n]) => n > 0).map(([k, n]) => [k, n]));
}
async function refresh() {
  try {
    const r = await fetch("status", {cache: "no-store"});
    show(await r.json());
    document.getElementById("err").textContent = "";
  } catch (e) { document.getElementById("err").textContent = "cannot read /status: " + e; }
}
refresh(); setInterval(refresh, 2000);
</script>
</body></html>
"""
