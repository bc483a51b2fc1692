"""The MQTT daemon against a real mosquitto: predictions equal the offline stepwise run.

The oracle is :func:`pipeline.offline.evaluation.run_stepwise` (what ``seqstream eval`` feeds:
one step per call, state carried), on the same model and data. Streams run batched
with other streams in the daemon, so values agree within 1e-5, not bit for bit.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from pipeline import cli
from pipeline.daemon import app, config
from pipeline.errors import BrokerError, ModelError
from pipeline.model import StepModel
from pipeline.offline import datasets
from pipeline.offline.evaluation import run_stepwise
from pipeline.sources import codecs
from tests.integration.broker import HOST, Broker, free_port, wait_until
from tests.integration.conftest import (
    TLS_PASSWORD,
    TLS_USER,
    Collector,
    Publisher,
    daemon_config,
    exposition,
    predictions_by_stream,
    publisher,
    running_daemon,
    sample_value,
    write_toml,
)

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-5


def oracle(model_path: Path, cases: list[np.ndarray]) -> list[np.ndarray]:
    """Offline stepwise probabilities per case, ``[T, C]``."""
    model = StepModel.load(model_path)
    return [out["probs"] for out in run_stepwise(model, cases)]


def check_stream(preds: list[dict[str, Any]], expected: np.ndarray, seqs: list[int]) -> None:
    """Predictions of one stream, in order, against the oracle rows ``seqs``."""
    assert [p["seq"] for p in preds] == seqs
    got = np.array([list(p["probs"].values()) for p in preds], dtype=np.float32)
    np.testing.assert_allclose(got, expected[seqs], atol=ATOL, rtol=0)
    labels = list(preds[0]["probs"])
    assert [p["label"] for p in preds] == [labels[i] for i in got.argmax(axis=1)]


def metric(daemon: Any, name: str, labels: dict[str, str] | None = None) -> float:
    return sample_value(daemon.metrics.registry, name, labels)


def test_replayed_data_json_and_binary_gives_the_offline_predictions(
    broker: Broker, model_path: Path, basicmotions: tuple[Path, Path], tmp_path: Path
) -> None:
    test_file = basicmotions[1]
    data = datasets.load(test_file)
    n = 6
    expected = oracle(model_path, list(data.cases[:n]))
    doc = daemon_config(tmp_path, model_path, broker.port, "replay-test")
    status = Collector(broker.port, "seqstream/replay-test/status")
    preds = Collector(broker.port, "predictions/#")
    with running_daemon(doc, tmp_path):
        assert status.take(1)[0][1] == b"online"
        for fmt in ("json", "binary", "named"):
            argv = ["replay", str(test_file), "--broker", f"mqtt://{HOST}:{broker.port}"]
            argv += ["--prefix", f"{fmt}-", "--cases", str(n)]
            names = list(StepModel.load(model_path).spec.features)  # not the .ts file's dim_i
            argv += ["--named", "--feature-names", *names] if fmt == "named" else ["--format", fmt]
            assert cli.main(argv) == 0
        by_stream = predictions_by_stream(preds.take(3 * n * 100))
    assert status.take(1)[0][1] == b"offline"
    for fmt in ("json", "binary", "named"):
        for i in range(n):
            check_stream(by_stream[f"{fmt}-{i}"], expected[i], list(range(100)))
    for c in (status, preds):
        c.close()


def test_replay_per_channel_topics_gives_the_offline_predictions(
    broker: Broker, model_path: Path, basicmotions: tuple[Path, Path], tmp_path: Path
) -> None:
    """``replay --channel-topic``: one message per feature, joined by the daemon's
    ``input.channel_topic`` into the same steps, so the same predictions."""
    test_file = basicmotions[1]
    data = datasets.load(test_file)
    n = 3
    expected = oracle(model_path, list(data.cases[:n]))
    template = "sensors/{stream}/ch/{channel}"
    doc = daemon_config(
        tmp_path, model_path, broker.port, "channel-replay", input={"channel_topic": template}
    )
    preds = Collector(broker.port, "predictions/#")
    with running_daemon(doc, tmp_path):
        argv = ["replay", str(test_file), "--broker", f"mqtt://{HOST}:{broker.port}"]
        argv += ["--channel-topic", template, "--cases", str(n), "--prefix", "ch-"]
        argv += ["--feature-names", *StepModel.load(model_path).spec.features]
        assert cli.main(argv) == 0
        by_stream = predictions_by_stream(preds.take(n * 100))
    for i in range(n):
        check_stream(by_stream[f"ch-{i}"], expected[i], list(range(100)))
    preds.close()


def test_many_interleaved_streams_with_chunks(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    n_streams = 120
    cases = [
        rng.normal(size=(int(rng.integers(5, 25)), 6)).astype(np.float32) for _ in range(n_streams)
    ]
    expected = oracle(model_path, cases)
    # each stream's rows cut into messages of 1-4 rows; messages of all streams shuffled,
    # each stream's own messages kept in order
    pending: list[list[tuple[int, np.ndarray]]] = []
    for case in cases:
        cuts, row = [], 0
        while row < len(case):
            t = int(rng.integers(1, 5))
            cuts.append((row, case[row : row + t]))
            row += t
        pending.append(cuts)
    order = [i for i, cuts in enumerate(pending) for _ in cuts]
    rng.shuffle(order)
    doc = daemon_config(tmp_path, model_path, broker.port, "interleave-test")
    preds = Collector(broker.port, "predictions/#")
    with running_daemon(doc, tmp_path) as daemon, publisher(broker.port) as pub:
        nxt = [0] * n_streams
        for i in order:
            seq, rows = pending[i][nxt[i]]
            nxt[i] += 1
            encode = codecs.encode_binary if i % 2 else codecs.encode_json
            pub.publish(f"sensors/s{i}/data", encode(rows, seq, None), qos=1)
        by_stream = predictions_by_stream(preds.take(len(order)))
        assert metric(daemon, "seqstream_active_streams") == n_streams
    for i, cuts in enumerate(pending):
        last_rows = [seq + len(rows) - 1 for seq, rows in cuts]
        check_stream(by_stream[f"s{i}"], expected[i], last_rows)
    preds.close()


def test_hostile_payloads_are_rejected_counted_and_harmless(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    good = rng.normal(size=(20, 6)).astype(np.float32)
    expected = oracle(model_path, [good])[0]
    hostile: list[tuple[str, bytes, str]] = [
        ("sensors/good/data", b"{not json", "malformed_json"),
        ("sensors/good/data", b'{"seq": 3, "values": [1, 2, 3]}', "bad_features"),
        ("sensors/good/data", b'{"seq": 3, "values": [NaN, 1, 1, 1, 1, 1]}', "non_finite"),
        ("sensors/evil/data", b'{"values": "lots"}', "bad_shape"),
        ("sensors/evil/data", b'{"seq": -5, "values": [1, 1, 1, 1, 1, 1]}', "bad_seq"),
        ("sensors/evil/data", b"SQ\x07" + bytes(30), "bad_binary_header"),
        ("sensors/evil/data", codecs.encode_binary(good[:2])[:-3], "bad_binary_length"),
        ("sensors/evil/data", b"[" * 1500, "malformed_json"),
        ("sensors/evil/data", b" " * 3000, "oversized"),
        ("sensors//data", codecs.encode_json(good[0]), "unknown_topic"),
    ]
    doc = daemon_config(
        tmp_path, model_path, broker.port, "hostile-test", input={"max_payload_bytes": 2048}
    )
    preds = Collector(broker.port, "predictions/#")
    errors = Collector(broker.port, "seqstream/hostile-test/errors")
    with running_daemon(doc, tmp_path) as daemon, publisher(broker.port) as pub:
        for t in range(20):
            pub.publish("sensors/good/data", codecs.encode_json(good[t], t, float(t)), qos=1)
            if t < len(hostile):
                topic, payload, _ = hostile[t]
                pub.publish(topic, payload, qos=1)
        by_stream = predictions_by_stream(preds.take(20))
        reports = [json.loads(p) for _, p, _ in errors.take(len(hostile))]
        assert preds.quiet() == []
        assert metric(daemon, "seqstream_messages_received_total") == 20 + len(hostile)
        counts: dict[str, int] = {}
        for _, _, reason in hostile:
            counts[reason] = counts.get(reason, 0) + 1
        for reason, count in counts.items():
            assert metric(daemon, "seqstream_messages_rejected_total", {"reason": reason}) == count
        assert metric(daemon, "seqstream_active_streams") == 1  # "evil" never got state
    assert sorted(r["reason"] for r in reports) == sorted(r for _, _, r in hostile)
    assert set(by_stream) == {"good"}
    check_stream(by_stream["good"], expected, list(range(20)))
    assert [p["ts"] for p in by_stream["good"]] == [float(t) for t in range(20)]
    preds.close()
    errors.close()


def test_the_reset_topic_restarts_a_stream(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(16, 6)).astype(np.float32)
    first, second = oracle(model_path, [rows[:8], rows[8:]])
    doc = daemon_config(tmp_path, model_path, broker.port, "reset-test")
    preds = Collector(broker.port, "predictions/#")
    with running_daemon(doc, tmp_path), publisher(broker.port) as pub:
        for t in range(8):
            pub.publish("sensors/r/data", codecs.encode_json(rows[t], t), qos=1)
        pub.publish("sensors/r/reset", b"", qos=1)
        for t in range(8, 16):
            pub.publish("sensors/r/data", codecs.encode_json(rows[t], t), qos=1)
        got = predictions_by_stream(preds.take(16))["r"]
    check_stream(got[:8], first, list(range(8)))
    check_stream(got[8:], np.concatenate([np.zeros_like(first), second]), list(range(8, 16)))
    assert got[8]["resets"] == ["explicit"]
    assert all("resets" not in p for p in got[:8] + got[9:])
    preds.close()


def test_tls_with_username_and_password(
    tls_broker: tuple[Broker, dict[str, Path]], model_path: Path, tmp_path: Path
) -> None:
    broker, files = tls_broker
    (tmp_path / "pw").write_text(TLS_PASSWORD + "\n")
    doc = daemon_config(
        tmp_path,
        model_path,
        broker.port,
        "tls-test",
        mqtt={"username": TLS_USER, "password_file": "pw", "tls": {"ca_file": str(files["ca"])}},
    )
    rows = np.random.default_rng(9).normal(size=(5, 6)).astype(np.float32)
    expected = oracle(model_path, [rows])[0]
    got: list[bytes] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2)
    c.tls_set(ca_certs=str(files["ca"]))
    c.username_pw_set(TLS_USER, TLS_PASSWORD)
    c.on_message = lambda cl, u, m: got.append(m.payload)
    c.connect(HOST, broker.port)
    c.subscribe("predictions/#", 1)
    c.loop_start()
    try:
        with running_daemon(doc, tmp_path) as daemon:
            assert daemon.link.connected
            for t in range(5):
                c.publish("sensors/secure/data", codecs.encode_binary(rows[t], t), qos=1)
            wait_until(lambda: len(got) == 5, 20, "5 predictions over TLS")
    finally:
        c.disconnect()
        c.loop_stop()
    check_stream([json.loads(p) for p in got], expected, list(range(5)))


def test_wrong_password_or_no_broker_is_a_clear_error_at_start(
    tls_broker: tuple[Broker, dict[str, Path]],
    model_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker, files = tls_broker
    (tmp_path / "pw").write_text("not the password\n")
    doc = daemon_config(
        tmp_path,
        model_path,
        broker.port,
        "wrong-pw",
        mqtt={"username": TLS_USER, "password_file": "pw", "tls": {"ca_file": str(files["ca"])}},
    )
    with (
        pytest.raises(BrokerError, match="refused the connection: Not authorized"),
        running_daemon(doc, tmp_path),
    ):
        pass
    path = write_toml(tmp_path / "wrong.toml", doc)
    assert cli.main(["run", "--config", str(path), "--allow-root"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Not authorized" in err[0], err
    assert "not the password" not in err[0]
    # a TLS broker refuses a client that does not trust its certificate
    doc["mqtt"]["tls"] = {}
    with pytest.raises(BrokerError, match="TLS handshake failed"), running_daemon(doc, tmp_path):
        pass
    # nothing listening
    dead = daemon_config(tmp_path, model_path, free_port(), "no-broker")
    with pytest.raises(BrokerError, match="cannot connect"), running_daemon(dead, tmp_path):
        pass


def test_broker_restart_mid_stream_reconnects_and_continues(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(11)
    cases = [rng.normal(size=(40, 6)).astype(np.float32) for _ in range(4)]
    expected = oracle(model_path, cases)
    doc = daemon_config(tmp_path, model_path, broker.port, "restart-test")
    preds = Collector(broker.port, "predictions/#", client_id="restart-test-collector")
    with running_daemon(doc, tmp_path) as daemon:
        with publisher(broker.port) as pub:
            for t in range(20):
                for i, case in enumerate(cases):
                    pub.publish(f"sensors/r{i}/data", codecs.encode_json(case[t], t), qos=1)
            first = preds.take(80)
        threads = threading.active_count()
        broker.restart()  # SIGTERM: mosquitto saves the sessions of the daemon and collector
        # published at once: while the daemon may still be reconnecting, its session queues
        with publisher(broker.port) as pub:
            for t in range(20, 40):
                for i, case in enumerate(cases):
                    pub.publish(f"sensors/r{i}/data", codecs.encode_binary(case[t], t), qos=1)
            second = preds.take(80, timeout=30)
            second += preds.quiet()
        wait_until(lambda: daemon.link.connected, 10, "daemon reconnected")
        assert threading.active_count() == threads  # paho reconnects on its one thread
        assert metric(daemon, "seqstream_broker_reconnects_total") == 1
        assert metric(daemon, "seqstream_broker_connected") == 1
    # QoS 1 is at-least-once: a prediction the collector had not acknowledged when the
    # broker stopped comes to it again, byte for byte
    unique = list(dict.fromkeys((topic, payload, False) for topic, payload, _ in first + second))
    by_stream = predictions_by_stream(unique)
    for i in range(4):
        check_stream(by_stream[f"r{i}"], expected[i], list(range(40)))
    preds.close()


def test_metrics_endpoint_passes_promtool(broker: Broker, model_path: Path, tmp_path: Path) -> None:
    doc = daemon_config(tmp_path, model_path, broker.port, "metrics-test")
    preds = Collector(broker.port, "predictions/#")
    rows = np.random.default_rng(1).normal(size=(10, 6)).astype(np.float32)
    with running_daemon(doc, tmp_path) as daemon, publisher(broker.port) as pub:
        for t in range(10):
            pub.publish(f"sensors/m{t % 3}/data", codecs.encode_json(rows[t], t // 3), qos=1)
        pub.publish("sensors/m0/data", b"nope", qos=1)
        preds.take(10)
        assert daemon.exporter is not None
        url = f"http://127.0.0.1:{daemon.exporter.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read()
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == b"" and check.stderr.strip() == b""
    samples = exposition(text.decode())
    assert samples["seqstream_messages_received_total"] == 11
    assert samples['seqstream_messages_rejected_total{reason="malformed_json"}'] == 1
    assert samples["seqstream_predictions_published_total"] == 10
    assert samples["seqstream_end_to_end_seconds_count"] == 10
    assert samples["seqstream_inference_seconds_count"] >= 1
    assert samples["seqstream_batch_size_sum"] == 10
    assert samples["seqstream_active_streams"] == 3
    assert samples["seqstream_queue_depth"] == 0
    assert samples["seqstream_broker_connected"] == 1
    info = [k for k in samples if k.startswith("seqstream_model_info")]
    assert info == [
        'seqstream_model_info{name="random-lstm-classify",opset="17",'
        'provider="CPUExecutionProvider",version="seed0"}'
    ]
    assert not any("stream=" in k for k in samples)  # stream ids are never labels
    preds.close()


def test_sigterm_drains_checkpoints_and_a_restart_continues(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    """The real process: SIGTERM -> exit 0, offline, checkpoint; restart continues exactly."""
    rng = np.random.default_rng(13)
    cases = [rng.normal(size=(30, 6)).astype(np.float32) for _ in range(3)]
    expected = oracle(model_path, cases)
    doc = daemon_config(tmp_path, model_path, broker.port, "sigterm-test")
    path = write_toml(tmp_path / "daemon.toml", doc)
    status = Collector(broker.port, "seqstream/sigterm-test/status")
    preds = Collector(broker.port, "predictions/#")

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "--config", str(path), "--allow-root"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stderr=open(tmp_path / "daemon.log", "ab"),  # noqa: SIM115
        )
        assert status.take(1, timeout=30)[0][1] == b"online"
        return proc

    def send(rows: range, pub: Publisher) -> None:
        for t in rows:
            for i, case in enumerate(cases):
                pub.publish(f"sensors/p{i}/data", codecs.encode_json(case[t], t), qos=1)

    proc = start()
    try:
        with publisher(broker.port) as pub:
            send(range(0, 10), pub)
            first = preds.take(30)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert status.take(1)[0][1] == b"offline"
            assert (tmp_path / "sigterm-test.ckpt").is_file()
            send(range(10, 20), pub)  # while the daemon is down: its session queues them
        proc = start()
        second = preds.take(30, timeout=30)
        with publisher(broker.port) as pub:
            send(range(20, 30), pub)
            third = preds.take(30)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    by_stream = predictions_by_stream(first + second + third)
    for i in range(3):
        check_stream(by_stream[f"p{i}"], expected[i], list(range(30)))
    log = (tmp_path / "daemon.log").read_text()
    assert "restored 3 streams" in log
    for c in (status, preds):
        c.close()


def test_drop_policy_counts_drops_and_resets_the_stream(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    """A full queue with overflow = "drop": counted, and the stream restarts from zeros."""
    rng = np.random.default_rng(17)
    rows = rng.normal(size=(31, 6)).astype(np.float32)
    # one queue slot, and a worker that waits 300 ms to fill a batch: a burst overflows
    doc = daemon_config(
        tmp_path,
        model_path,
        broker.port,
        "drop-test",
        queue={"max_size": 1, "overflow": "drop", "max_wait_ms": 300},
    )
    preds = Collector(broker.port, "predictions/#")
    with running_daemon(doc, tmp_path) as daemon, publisher(broker.port) as pub:
        for t in range(30):
            pub.publish("sensors/d/data", codecs.encode_json(rows[t], t), qos=1)
        wait_until(
            lambda: metric(daemon, "seqstream_messages_received_total") == 30, 20, "the burst"
        )
        dropped = metric(daemon, "seqstream_messages_rejected_total", {"reason": "queue_full"})
        burst = preds.take(30 - int(dropped))
        pub.publish("sensors/d/data", codecs.encode_json(rows[30], 30), qos=1)
        got = predictions_by_stream(burst + preds.take(1))["d"]
        assert dropped >= 1
        resets = metric(daemon, "seqstream_state_resets_total", {"reason": "dropped"})
    seqs = [p["seq"] for p in got]
    assert seqs == sorted(seqs) and seqs[-1] == 30
    # after each gap the stream was reset ("dropped") and runs from zeros again
    starts = [k for k in range(1, len(seqs)) if seqs[k] != seqs[k - 1] + 1]
    assert resets == len(starts) >= 1
    for k, p in enumerate(got):
        assert ("resets" in p) == (k in starts)
        if k in starts:
            assert p["resets"] == ["dropped"]
    bounds = [0, *starts, len(seqs)]
    for a, b in itertools.pairwise(bounds):
        segment = rows[seqs[a] : seqs[b - 1] + 1]
        expected = oracle(model_path, [segment])[0]
        check_stream(got[a:b], np.concatenate([np.zeros((seqs[a], 4)), expected]), seqs[a:b])
    preds.close()


def test_a_configured_model_sha256_is_checked_before_loading(
    model_path: Path, tmp_path: Path
) -> None:
    doc = daemon_config(tmp_path, model_path, 1883, "sha-test")
    doc["model"]["sha256"] = "0" * 64
    settings = config.parse(doc, base=tmp_path, source=tmp_path / "t.toml")
    with pytest.raises(ModelError, match="config model.sha256 expects 0000"):
        app.load_model(settings)
    doc["model"]["sha256"] = datasets.file_sha256(model_path).upper()  # any case
    settings = config.parse(doc, base=tmp_path, source=tmp_path / "t.toml")
    assert app.load_model(settings).spec.name == "random-lstm-classify"
