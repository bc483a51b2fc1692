"""The HTTP surface beside /metrics, against a running daemon and a real mosquitto.

``/healthz``, ``/readyz`` and ``/status`` are read over HTTP while sensors publish;
``seqstream status --url`` prints the same; the page at ``/`` is loaded in headless
Chromium (Debian ``chromium``), whose rendered DOM must list the live streams, with a
hostile stream id shown as text, not markup.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.daemon.lifecycle import Daemon
from pipeline.daemon.service import ServiceEnv
from pipeline.sources import codecs
from tests.integration.broker import HOST, Broker, wait_until
from tests.integration.conftest import Collector, daemon_config, publisher, running_daemon

STREAMS = ("alpha", "beta", "gamma")
EVIL = "<img src=x onerror=alert(1)>"


def get(daemon: Daemon, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    assert daemon.exporter is not None
    req = urllib.request.Request(f"http://{HOST}:{daemon.exporter.port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def get_json(daemon: Daemon, path: str) -> tuple[int, Any]:
    code, ctype, body = get(daemon, path)
    assert ctype == "application/json"
    return code, json.loads(body)


def feed(port: int, streams: tuple[str, ...], steps: int) -> dict[str, bytes]:
    """``steps`` messages per stream (seq 0..steps-1); the last prediction of each."""
    rows = np.random.default_rng(3).normal(size=(steps, 6)).astype(np.float32)
    preds = Collector(port, "predictions/#")
    try:
        with publisher(port) as pub:
            for t in range(steps):
                for s in streams:
                    pub.publish(f"sensors/{s}/data", codecs.encode_json(rows[t], t), qos=1)
            pub.publish(f"sensors/{streams[0]}/data", b'{"seq": 99, "values": [1, 2', qos=1)
        got = preds.take(steps * len(streams))
    finally:
        preds.close()
    return {topic.split("/")[1]: payload for topic, payload, _ in got}


def test_health_ready_status_and_the_cli_table(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    doc = daemon_config(tmp_path, model_path, broker.port, "status-test")
    with running_daemon(doc, tmp_path) as daemon:
        wait_until(lambda: daemon.link.connected, 10, "connected")
        last = feed(broker.port, STREAMS, 4)
        wait_until(
            lambda: get_json(daemon, "/status")[1]["rejections"].get("malformed_json") == 1,
            10,
            "the truncated message counted",
        )

        code, health = get_json(daemon, "/healthz")
        assert code == 200 and health["alive"] is True

        code, ready = get_json(daemon, "/readyz")
        assert code == 200 and ready["ready"] is True
        assert ready["checks"] == {
            "broker_connected": True,
            "model_loaded": True,
            "engine_progressing": True,
        }

        code, status = get_json(daemon, "/status")
        assert code == 200
        assert status["model"]["task"] == "classify" and status["model"]["path"] == str(model_path)
        streams = status["streams"]
        assert streams["active"] == 3 and streams["listed"] == 3
        rows = {r["stream"]: r for r in streams["items"]}
        assert set(rows) == set(STREAMS)
        for s in STREAMS:
            assert rows[s]["last_seq"] == 3
            # the prediction it lists is the one the broker delivered last, value for value
            assert rows[s]["last_prediction"] == json.loads(last[s])
            assert 0 <= rows[s]["prediction_age_s"] < 60

        assert get(daemon, "/nope")[0] == 404
        assert get(daemon, "/status", method="POST")[0] == 405
        code, _, metrics = get(daemon, "/metrics")
        assert code == 200 and b"seqstream_messages_received_total" in metrics

        url = f"http://{HOST}:{daemon.exporter.port}" if daemon.exporter else ""
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "status", "--url", url],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "ready:  yes" in out and "3 listed of 3 active" in out
        for s in STREAMS:
            line = next(ln for ln in out.splitlines() if ln.strip().startswith(s))
            assert json.loads(last[s])["label"] in line and " 3 " in line
        assert "malformed_json  1" in out

        # the broker goes away: not ready (503), still alive
        broker.stop()
        wait_until(lambda: get_json(daemon, "/readyz")[0] == 503, 10, "not ready")
        assert get_json(daemon, "/readyz")[1]["checks"]["broker_connected"] is False
        assert get_json(daemon, "/healthz")[0] == 200
        broker.start()


def test_status_lists_at_most_the_configured_streams(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    doc = daemon_config(
        tmp_path, model_path, broker.port, "cap-test", metrics={"status_streams": 2}
    )
    with running_daemon(doc, tmp_path) as daemon:
        wait_until(lambda: daemon.link.connected, 10, "connected")
        feed(broker.port, ("s1", "s2", "s3", "s4", "s5"), 2)
        streams = get_json(daemon, "/status")[1]["streams"]
        assert streams["active"] == 5 and streams["listed"] == 2 and len(streams["items"]) == 2


def test_status_cli_errors_are_one_line(tmp_path: Path) -> None:
    for url in ("ftp://x", f"http://{HOST}:1/"):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "status", "--url", url],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_status_page_shows_live_streams_in_headless_chromium(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    doc = daemon_config(tmp_path, model_path, broker.port, "page-test")
    with running_daemon(doc, tmp_path) as daemon:
        wait_until(lambda: daemon.link.connected, 10, "connected")
        last = feed(broker.port, (*STREAMS, EVIL), 3)
        assert daemon.exporter is not None
        code, ctype, html = get(daemon, "/")
        assert code == 200 and ctype.startswith("text/html")
        assert b"http://" not in html and b"https://" not in html  # no external assets
        proc = subprocess.run(
            [
                "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
                "--virtual-time-budget=5000", "--dump-dom",
                f"http://{HOST}:{daemon.exporter.port}/",
            ],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ready" in dom and "4 of 4 active" in dom, dom[-3000:]
    for s in STREAMS:
        label = json.loads(last[s])["label"]
        assert f"<td>{s}</td><td>2</td>" in dom
        assert f"<td>{label}</td>" in dom
    # a stream id is text: escaped in the DOM, never an element
    assert "<td>&lt;img src=x onerror=alert(1)&gt;</td>" in dom
    assert "<img" not in dom


def test_a_stalled_engine_is_not_ready_and_status_does_not_wait_for_it(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    doc = daemon_config(tmp_path, model_path, broker.port, "stall-test")
    release = threading.Event()
    # a 2 s watchdog: the engine counts as stalled once a probe waits over 1 s
    with running_daemon(doc, tmp_path, ServiceEnv(watchdog_s=2.0)) as daemon:
        wait_until(lambda: get_json(daemon, "/readyz")[0] == 200, 10, "ready")
        daemon.worker.call(lambda engine: release.wait(30))  # a stuck session.run
        try:
            wait_until(lambda: get_json(daemon, "/readyz")[0] == 503, 10, "not ready")
            ready = get_json(daemon, "/readyz")[1]
            assert ready["checks"]["engine_progressing"] is False
            assert ready["checks"]["broker_connected"] is True
            assert ready["engine_stall_s"] >= 1.0  # rounded to 0.1 s
            code, status = get_json(daemon, "/status")  # answers, without the streams
            assert code == 200 and "did not answer" in status["streams"]["error"]
            assert status["ready"] is False
            assert get_json(daemon, "/healthz")[0] == 200
        finally:
            release.set()
        wait_until(lambda: get_json(daemon, "/readyz")[0] == 200, 10, "ready again")
        assert "items" in get_json(daemon, "/status")[1]["streams"]
