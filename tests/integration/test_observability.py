"""What the daemon exports and logs, through a real mosquitto.

* ``/metrics`` carries ``process_*``, no ``*_created`` series, and only the task metrics
  the loaded model can move (a classifier's labels, an anomaly model's scores).
* ``--log-format json``: every line the real process writes is one JSON object, and
  the start-up lines name the subscribed topics and the HTTP address.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.daemon.lifecycle import Daemon
from pipeline.sources import codecs
from tests.integration.broker import HOST, Broker, wait_until
from tests.integration.conftest import (
    Collector,
    daemon_config,
    exposition,
    publisher,
    running_daemon,
    write_toml,
)

REPO = Path(__file__).resolve().parents[2]


def scrape(daemon: Daemon) -> dict[str, float]:
    assert daemon.exporter is not None
    url = f"http://{HOST}:{daemon.exporter.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return exposition(text)


@pytest.fixture(scope="module")
def anomaly_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.export import export_random

    path = tmp_path_factory.mktemp("anomaly") / "anomaly.onnx"
    export_random(path, cell="gru", task="anomaly", n_features=6, hidden=8, layers=1)
    return path


def publish_some(port: int, n: int = 6) -> None:
    rows = np.random.default_rng(5).normal(size=(n, 6)).astype(np.float32)
    preds = Collector(port, "predictions/#")
    try:
        with publisher(port) as pub:
            for t in range(n):
                pub.publish("sensors/x/data", codecs.encode_json(rows[t], t), qos=1)
        preds.take(n)
    finally:
        preds.close()


@pytest.mark.parametrize("task", ["classify", "anomaly"])
def test_metrics_follow_the_task_with_process_and_no_created(
    task: str,
    broker: Broker,
    model_path: Path,
    anomaly_model_path: Path,
    tmp_path: Path,
) -> None:
    model = model_path if task == "classify" else anomaly_model_path
    doc = daemon_config(tmp_path, model, broker.port, f"obs-{task}")
    with running_daemon(doc, tmp_path) as daemon:
        wait_until(lambda: daemon.link.connected, 10, "connected")
        publish_some(broker.port)
        wait_until(
            lambda: scrape(daemon)["seqstream_predictions_published_total"] == 6, 10, "counted"
        )
        samples = scrape(daemon)
    names = {key.split("{")[0] for key in samples}
    assert samples["process_resident_memory_bytes"] > 1e6
    assert samples["process_cpu_seconds_total"] > 0
    assert "process_open_fds" in names
    assert not [n for n in names if n.endswith("_created")]
    by_label = {n for n in names if n.startswith("seqstream_predictions_by_label")}
    anomaly = {n for n in names if n.startswith("seqstream_anomal")}
    if task == "classify":
        assert by_label and not anomaly
        assert (
            sum(v for k, v in samples.items() if k.startswith("seqstream_predictions_by_label"))
            == 6
        )
    else:
        assert anomaly and not by_label
        assert samples["seqstream_anomaly_score_ratio_count"] == 6


def test_json_log_format_writes_one_object_per_line(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    doc = daemon_config(tmp_path, model_path, broker.port, "json-log")
    path = write_toml(tmp_path / "daemon.toml", doc)
    status = Collector(broker.port, "seqstream/json-log/status")
    log = tmp_path / "daemon.log"
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "pipeline.cli", "--log-format", "json",
                "run", "--config", str(path), "--allow-root",
            ],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=err,
        )  # fmt: skip
    try:
        assert status.take(1, timeout=30)[0][1] == b"online"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        status.close()
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # each line parses on its own
    assert len(records) >= 3
    assert all(set(r) >= {"ts", "level", "logger", "msg"} for r in records)
    assert any(
        r["msg"] == "stopped" and r["logger"] == "pipeline.daemon.lifecycle" for r in records
    )
    assert all(r["ts"].endswith("+00:00") for r in records)
    # the start-up log says where to look: the subscriptions and the HTTP address
    msgs = [r["msg"] for r in records]
    assert any("subscribed to 'sensors/+/data'" in m for m in msgs), msgs
    assert any(re.match(r"http: http://127\.0\.0\.1:\d+/ \(status page\)", m) for m in msgs), msgs
