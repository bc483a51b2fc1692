"""Operations against real components: systemd's notify protocol (a socket of the test's
own), the watchdog, SIGHUP model reloads of a real daemon process, a real Prometheus
scraping a daemon fed replayed data, and the shipped mosquitto ACL.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from pipeline import cli
from pipeline.daemon import app, config
from pipeline.daemon.lifecycle import Daemon
from pipeline.daemon.service import ServiceEnv
from pipeline.model import StepModel
from pipeline.sources import codecs
from tests.integration.broker import HOST, Broker, free_port, make_tls, wait_until
from tests.integration.conftest import (
    Collector,
    daemon_config,
    exposition,
    predictions_by_stream,
    publisher,
    running_daemon,
    sample_value,
    write_toml,
)
from tests.integration.ops_tools import NotifySocket, Prometheus

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ATOL = 1e-5


@contextmanager
def daemon_thread(doc: dict[str, Any], tmp: Path, env: ServiceEnv) -> Iterator[Daemon]:
    """The daemon of ``doc`` with a systemd environment, run in a thread."""
    settings = config.parse(doc, base=tmp, source=tmp / "test.toml")
    daemon = app.build(settings, registry=CollectorRegistry(), env=env)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(daemon.run(install_signals=False)))
    thread.start()
    try:
        wait_until(lambda: daemon.started.is_set() or not thread.is_alive(), 20, "daemon start")
        yield daemon
    finally:
        daemon.should_exit.set()
        thread.join(60)
    assert codes == [0]


def sample(daemon: Daemon, name: str, **labels: str) -> float:
    return sample_value(daemon.metrics.registry, name, labels)


# -- watchdog ---------------------------------------------------------------------------


@pytest.mark.slow
def test_watchdog_pings_while_idle_and_stops_when_the_engine_stalls(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "last-exit").write_text("watchdog\n")  # as ExecStopPost leaves it
    env = ServiceEnv(
        notify_socket=str(notify.path), watchdog_s=2.0, state_directory=tmp_path / "state"
    )
    doc = daemon_config(tmp_path, model_path, broker.port, "watchdog-test")
    preds = Collector(broker.port, "predictions/#")
    release = threading.Event()
    try:
        with daemon_thread(doc, tmp_path, env) as daemon:
            ready = notify.wait_for("READY", "1")
            assert ready["MAINPID"] == str(os.getpid())
            assert daemon.link.connected  # READY comes after the broker answered
            t_ready = notify.times("READY", "1")[0]
            assert not [t for t in notify.times("WATCHDOG") if t < t_ready]
            # The previous run's end, left by ExecStopPost, is counted once.
            assert sample(daemon, "seqstream_service_exits_total", result="watchdog") == 1
            assert json.loads((tmp_path / "state" / "exits.json").read_text())["watchdog"] == 1

            # Idle (no message at all) is not a stall: the pings go on.
            time.sleep(2.5)
            idle = [t for t in notify.times("WATCHDOG", "1") if t > t_ready]
            assert len(idle) >= 2, notify.snapshot()
            assert sample(daemon, "seqstream_engine_stall_seconds") == 0.0
            statuses = [f["STATUS"] for _, f in notify.snapshot() if "STATUS" in f]
            assert (
                "serving random-lstm-classify seed0: 0 streams, queue 0, broker connected"
                in statuses
            )

            # The engine's thread hangs (as in a stuck session.run): the pings stop.
            stalled_at = time.monotonic()
            daemon.worker.call(lambda engine: release.wait(30))
            row = np.zeros(6, dtype=np.float32)
            with publisher(broker.port) as pub:  # traffic is not progress
                pub.publish("sensors/w0/data", codecs.encode_json(row, 0))
            wait_until(
                lambda: any(
                    t > stalled_at and "stalled" in f.get("STATUS", "")
                    for t, f in notify.snapshot()
                ),
                5,
                "STATUS=engine stalled",
            )
            time.sleep(2.0)
            pings = notify.times("WATCHDOG", "1")
            # stall_after = WatchdogSec/2 = 1 s, ticks every 1 s: silent from ~2 s on
            late = [t for t in pings if t > stalled_at + 2.2]
            assert late == [], f"pinged {len(late)} times while stalled"
            assert sample(daemon, "seqstream_engine_stall_seconds") > 2.0
            assert preds.quiet(0.1) == []

            # The engine comes back: pings resume, the queued message is answered.
            resumed_at = time.monotonic()
            release.set()
            notify.wait_for("WATCHDOG", "1", after=resumed_at, timeout=5)
            assert len(preds.take(1)) == 1
            wait_until(lambda: sample(daemon, "seqstream_engine_stall_seconds") == 0.0, 5, "0")
        stopping = notify.wait_for("STOPPING", "1")
        assert stopping["STATUS"].startswith("stopping")
    finally:
        release.set()
        notify.close()
        preds.close()


# -- SIGHUP reloads -----------------------------------------------------------------------


def export(path: Path, **kw: Any) -> Path:
    from models.export import export_random

    export_random(path, **kw)
    return path


def put(model: Path | bytes, target: Path) -> None:
    """Replace the served file atomically, as an operator (or install-service) does."""
    tmp = target.with_suffix(".new")
    if isinstance(model, bytes):
        tmp.write_bytes(model)
    else:
        shutil.copyfile(model, tmp)
    tmp.replace(target)


def probs(model: StepModel, x: np.ndarray, state: dict[str, np.ndarray] | None) -> Any:
    """Stepwise outputs of ``x`` [B, T, F] from ``state`` (None: fresh); (probs, state)."""
    state = model.initial_state(x.shape[0]) if state is None else state
    rows = []
    for t in range(x.shape[1]):
        out, state = model.run(np.ascontiguousarray(x[:, t : t + 1]), state)
        rows.append(out["probs"][:, 0])
    return np.stack(rows, axis=1), state


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return exposition(text)


@pytest.mark.slow
def test_sighup_hot_swaps_the_model_without_dropping_the_connection(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    same = export(tmp_path / "b.onnx", cell="lstm", seed=1)  # same state signature
    other = export(tmp_path / "c.onnx", cell="gru", seed=2)  # h only: a different one
    narrow = export(tmp_path / "d.onnx", cell="lstm", n_features=3, seed=3)
    served = tmp_path / "serving.onnx"
    put(model_path, served)
    metrics_port = free_port()
    doc = daemon_config(
        tmp_path, served, broker.port, "reload-test", metrics={"port": metrics_port}
    )
    path = write_toml(tmp_path / "daemon.toml", doc)
    notify = NotifySocket(tmp_path / "notify.sock")
    status = Collector(broker.port, "seqstream/reload-test/status")
    preds = Collector(broker.port, "predictions/#")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 30, 6)).astype(np.float32)  # 3 streams, 30 rows

    def send(rows: range) -> dict[str, list[dict[str, Any]]]:
        with publisher(broker.port) as pub:
            for t in rows:
                for i in range(3):
                    pub.publish(f"sensors/h{i}/data", codecs.encode_json(x[i, t], t))
        return predictions_by_stream(preds.take(3 * len(rows)))

    def check(got: dict[str, list[dict[str, Any]]], expected: np.ndarray, rows: range) -> None:
        for i in range(3):
            seq = [p["seq"] for p in got[f"h{i}"]]
            assert seq == list(rows)
            values = np.array([list(p["probs"].values()) for p in got[f"h{i}"]])
            np.testing.assert_allclose(values, expected[i], atol=ATOL, rtol=0)

    def reload(model: Path | bytes) -> dict[str, str]:
        put(model, served)
        t = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", "1", after=t)
        return notify.wait_for("READY", "1", after=t)

    log = tmp_path / "daemon.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--config", str(path), "--allow-root"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(notify.path)},
        stderr=log.open("wb"),
    )
    try:
        notify.wait_for("READY", "1", timeout=30)
        assert status.take(1)[0][1] == b"online"
        a, b, c = (StepModel.load(p) for p in (model_path, same, other))

        p1, state = probs(a, x[:, :10], None)
        check(send(range(10)), p1, range(10))

        # Same state signature: every stream continues from the state model A left.
        assert reload(same)["STATUS"].startswith("serving random-lstm-classify seed1")
        p2, _ = probs(b, x[:, 10:20], state)
        got = send(range(10, 20))
        check(got, p2, range(10, 20))
        assert all("resets" not in p and p["version"] == "seed1" for s in got.values() for p in s)

        # Another signature: streams restart from scratch, and say why.
        reload(other)
        p3, state_c = probs(c, x[:, 20:25], None)
        got = send(range(20, 25))
        check(got, p3, range(20, 25))
        for i in range(3):
            first, *rest = got[f"h{i}"]
            assert first["resets"] == ["model_change"] and first["model"] == "random-gru-classify"
            assert all("resets" not in p for p in rest)

        # A broken file, then a model with another input width: the GRU keeps serving.
        assert reload(b"this is not an onnx model")["STATUS"].startswith("reload failed")
        assert "reload failed" in reload(narrow)["STATUS"]
        # A config that no longer parses: refused as a config error, not a failed model.
        good_config = path.read_bytes()
        path.write_text(path.read_text().replace("[mqtt]", '[mqtt]\nhost = "mqtt://x:1"', 1))
        t = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        assert notify.wait_for("READY", "1", after=t)["STATUS"].startswith(
            "reload refused: the config is invalid, serving random-gru-classify"
        )
        path.write_bytes(good_config)
        p4, _ = probs(c, x[:, 25:30], state_c)
        got = send(range(25, 30))
        check(got, p4, range(25, 30))
        assert all(p["model"] == "random-gru-classify" for s in got.values() for p in s)

        m = scrape(metrics_port)
        assert m['seqstream_model_reloads_total{result="ok"}'] == 2
        assert m['seqstream_model_reloads_total{result="failed"}'] == 2
        assert m['seqstream_model_reloads_total{result="bad_config"}'] == 1
        assert m['seqstream_state_resets_total{reason="model_change"}'] == 3
        assert m["seqstream_broker_reconnects_total"] == 0  # the connection never dropped
        assert m["seqstream_broker_connected"] == 1
        assert 'seqstream_model_info{name="random-gru-classify",opset="17",' in "".join(m)
        assert status.quiet(0.2) == []  # no second "online": no reconnect
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        status.close()
        preds.close()
    text = log.read_text()
    assert "streams kept their state" in text and "streams were reset (model_change)" in text
    failures = re.findall(r"reload failed; still serving random-gru-classify .*", text)
    assert len(failures) == 2, text
    assert "d.onnx" not in failures[1] and "takes 3 features, the running model 6" in failures[1]
    refused = re.findall(r"reload refused: the config is invalid; still serving .*", text)
    assert len(refused) == 1 and "mqtt.host: 'mqtt://x:1' is a URL" in refused[0], text


# -- Prometheus and the dashboard ---------------------------------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in the shipped dashboard."""
    doc = json.loads((DEPLOY / "grafana" / "dashboards" / "seqstream.json").read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def concrete(expr: str, job: str) -> str:
    """Grafana's variables as Grafana would fill them for this one daemon."""
    return (
        expr.replace("$__rate_interval", "20s")
        .replace("$job", job)
        .replace("$instance", ".*")
        .replace("$model", ".*")
    )


# Metric families this test's daemon (one classifier, no [cluster]) does not export.
NOT_EXPORTED_HERE = ("seqstream_anomal", "seqstream_cluster_")

# Panels whose numbers must be positive while data flows (not just present).
MOVING = ("Model", "Active streams", "Uptime", "Throughput", "End-to-end latency",
          "Inference latency", "Batch size", "Rejects by reason",
          "Predictions per class")  # fmt: skip


@pytest.mark.slow
def test_prometheus_scrapes_the_daemon_and_every_dashboard_query_has_data(
    broker: Broker, model_path: Path, basicmotions: tuple[Path, Path], tmp_path: Path
) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    doc = daemon_config(tmp_path, model_path, broker.port, "prometheus-test")
    rules = DEPLOY / "prometheus" / "rules" / "seqstream.rules.yml"
    with running_daemon(doc, tmp_path) as daemon:
        assert daemon.exporter is not None
        target = f"{HOST}:{daemon.exporter.port}"
        prom = Prometheus(tmp_path / "prometheus", [target], [rules])
        prom.start()
        try:
            argv = ["replay", str(basicmotions[1]), "--broker", f"mqtt://{HOST}:{broker.port}"]
            argv += ["--cases", "8", "--rate", "7", "--prefix", "prom-"]
            replay = threading.Thread(target=cli.main, args=(argv,))
            replay.start()

            def flowing() -> bool:  # two scrapes that saw messages arrive
                got = prom.query(
                    'increase(seqstream_messages_received_total{job="seqstream"}[20s])'
                )
                return bool(got) and float(got[0]["value"][1]) > 0

            wait_until(flowing, 30, "Prometheus to see messages flowing")
            with publisher(broker.port) as pub:  # one reject while scraped: the rejects panel
                pub.publish("sensors/prom-bad/data", b"{not json")
            rejected = 'increase(seqstream_messages_rejected_total{reason="malformed_json"}[20s])'
            wait_until(lambda: float(prom.query(rejected)[0]["value"][1]) > 0, 10, "a reject")
            empty = []
            moved: dict[str, bool] = {}
            for title, expr in queries:
                result = prom.query(concrete(expr, "seqstream"))
                # A classifier exports no anomaly metrics, a single daemon no cluster
                # metrics: those panels stay empty here.
                if not result and not any(m in expr for m in NOT_EXPORTED_HERE):
                    empty.append((title, expr))
                values = [float(r["value"][1]) for r in result]
                positive = any(math.isfinite(v) and v > 0 for v in values)
                moved[title] = moved.get(title, False) or positive
            assert empty == [], f"dashboard queries without data: {empty}"
            flat = [t for t, m in moved.items() if t.startswith(MOVING) and not m]
            assert flat == [], f"dashboard queries without movement: {flat}"

            # The $job and $instance variables' own queries, and the model panel's labels.
            jobs = prom.api("label/job/values", **{"match[]": "seqstream_model_info"})
            assert jobs == ["seqstream"]
            instances = prom.api(
                "label/instance/values", **{"match[]": 'seqstream_model_info{job="seqstream"}'}
            )
            assert instances == [target]
            models = prom.api(
                "label/model/values",
                **{"match[]": f'seqstream_model_info{{job="seqstream", instance=~"{target}"}}'},
            )
            assert models == ["default"]  # the $model variable's query: the one route
            (info,) = prom.query('seqstream_model_info{job="seqstream"}')
            assert info["metric"]["name"] == "random-lstm-classify"
            labels = {
                r["metric"]["label"] for r in prom.query("seqstream_predictions_by_label_total")
            }
            assert labels == set(daemon.engine.model.spec.labels)

            # The shipped rules load and evaluate cleanly against the live series.
            def evaluated() -> bool:
                groups = prom.api("rules")["groups"]
                rules_ = [r for g in groups for r in g["rules"]]
                return bool(rules_) and all(r["lastEvaluation"][:4] != "0001" for r in rules_)

            wait_until(evaluated, 15, "rule evaluation")
            ran = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
            # every alert and recording rule the file holds (seqstream:up included)
            assert len(ran) == len(re.findall(r"^\s+- (alert|record): ", rules.read_text(), re.M))
            assert [(r["name"], r.get("lastError")) for r in ran if r["health"] != "ok"] == []
            firing = [a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]]
            assert firing == []  # a healthy daemon raises nothing
            replay.join(60)
        finally:
            prom.stop()


# -- the shipped mosquitto TLS config and ACL ------------------------------------------------


def test_shipped_mosquitto_tls_config_and_acl(model_path: Path, tmp_path: Path) -> None:
    """The daemon reads sensors and writes predictions through the shipped ACL; nothing else."""
    pki = make_tls(tmp_path / "pki")
    passwd = tmp_path / "passwd"
    users = {"seqstream": "daemon pw", "ok": "sensor pw", "consumer": "consumer pw"}
    for i, (user, password) in enumerate(users.items()):
        flags = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", *flags, "-b", str(passwd), user, password], check=True)
    broker = Broker(tmp_path / "broker")
    conf = (DEPLOY / "mosquitto-tls.conf").read_text()
    conf = conf.replace("listener 8883", f"listener {broker.port} {HOST}")
    for old, new in {
        "/etc/mosquitto/certs/ca.crt": pki["ca"],
        "/etc/mosquitto/certs/server.crt": pki["cert"],
        "/etc/mosquitto/certs/server.key": pki["key"],
        "/etc/mosquitto/passwd": passwd,
        "/etc/mosquitto/seqstream.acl": DEPLOY / "mosquitto.acl",
        "/var/lib/mosquitto/": f"{broker.dir}/",
    }.items():
        assert old in conf
        conf = conf.replace(old, str(new))
    broker.conf.write_text(conf + ("user root\n" if os.geteuid() == 0 else ""))
    broker.start()

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    def tls_client(user: str) -> tuple[mqtt.Client, list[mqtt.MQTTMessage]]:
        got: list[mqtt.MQTTMessage] = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-probe")
        c.username_pw_set(user, users[user])
        c.tls_set(ca_certs=str(pki["ca"]))
        c.on_message = lambda cl, u, m: got.append(m)
        c.connect(HOST, broker.port)
        c.loop_start()
        wait_until(c.is_connected, 10, f"{user} connection")
        return c, got

    (tmp_path / "pw").write_text(users["seqstream"])
    (tmp_path / "pw").chmod(0o600)
    doc = daemon_config(tmp_path, model_path, broker.port, "seqstream")
    doc["mqtt"].update(username="seqstream", password_file=str(tmp_path / "pw"))
    doc["mqtt"]["tls"] = {"ca_file": str(pki["ca"])}
    clients = []
    try:
        with running_daemon(doc, tmp_path) as daemon:
            consumer, seen = tls_client("consumer")
            gateway, gateway_seen = tls_client("ok")  # a sensor: its account is its stream
            intruder, intruder_seen = tls_client("seqstream")
            clients = [consumer, gateway, intruder]
            consumer.subscribe([("predictions/#", 1), ("seqstream/+/status", 1)])
            gateway.subscribe("predictions/#", 1)  # not granted: receives nothing
            intruder.subscribe("predictions/#", 1)  # the daemon's account may not read them
            time.sleep(0.3)
            row = np.zeros(6, dtype=np.float32)
            gateway.publish("sensors/ok/data", codecs.encode_json(row, 0), qos=1).wait_for_publish(
                5
            )
            # The daemon's own account may not play a sensor: the broker drops it.
            intruder.publish("sensors/evil/data", codecs.encode_json(row, 0), qos=1)
            wait_until(lambda: any(m.topic == "predictions/ok" for m in seen), 10, "prediction")
            time.sleep(0.5)
            topics = sorted({m.topic for m in seen})
            assert topics == ["predictions/ok", "seqstream/seqstream/status"]
            assert gateway_seen == [] and intruder_seen == []
            assert sample(daemon, "seqstream_messages_received_total") == 1
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
        broker.stop()
