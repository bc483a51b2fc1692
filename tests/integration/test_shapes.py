"""Payload and topic shapes through a real mosquitto and the real daemon.

Named-field payloads and nested topic templates must give each stream exactly its
offline stepwise run (:func:`pipeline.offline.evaluation.run_stepwise`), as positional
payloads on ``sensors/{stream}/data`` do (tests/integration/test_daemon.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.model import StepModel
from pipeline.sources import codecs
from tests.integration.broker import Broker, wait_until
from tests.integration.conftest import Collector, daemon_config, publisher, running_daemon
from tests.integration.test_daemon import check_stream, metric, oracle

NAMES = tuple(f"f{i}" for i in range(6))  # conftest's model_path names its features so


def test_named_payloads_give_the_offline_predictions(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    assert StepModel.load(model_path).spec.features == NAMES
    rng = np.random.default_rng(18)
    cases = [rng.normal(size=(12, 6)).astype(np.float32) for _ in range(4)]
    expected = oracle(model_path, cases)
    doc = daemon_config(tmp_path, model_path, broker.port, "named-test")
    preds = Collector(broker.port, "predictions/#")
    errors = Collector(broker.port, "seqstream/named-test/errors")
    sent: dict[str, list[int]] = {}
    with running_daemon(doc, tmp_path) as daemon, publisher(broker.port) as pub:
        for i, case in enumerate(cases):
            stream, seqs = f"n{i}", sent.setdefault(f"n{i}", [])
            row = 0
            while row < len(case):
                t = 1 + (row + i) % 3  # 1-3 rows a message
                rows = case[row : row + t]
                order = rng.permutation(6)  # keys in any order
                if t == 1 and i % 2:  # one number per feature
                    values: Any = {NAMES[j]: float(rows[0, j]) for j in order}
                else:  # one column per feature
                    values = {NAMES[j]: rows[:, j].tolist() for j in order}
                if i == 3 and row % 2:  # positional and named mixed on one stream
                    values = rows.tolist()
                payload = json.dumps({"seq": row, "values": values}).encode()
                pub.publish(f"sensors/{stream}/data", payload)
                seqs.append(row + len(rows) - 1)
                row += t
        bad = {
            "missing_feature": {"f0": 1, "f1": 2},
            "unknown_feature": {**dict.fromkeys(NAMES, 0.5), "f6": 1},
        }
        for values in bad.values():
            pub.publish("sensors/n0/data", json.dumps({"seq": 99, "values": values}).encode())
        n_msgs = sum(len(s) for s in sent.values())
        messages = preds.take(n_msgs)
        reports = [json.loads(p) for _, p, _ in errors.take(2)]
        for reason in bad:
            wait_until(
                lambda r=reason: (
                    metric(daemon, "seqstream_messages_rejected_total", {"reason": r}) == 1
                ),
                10,
                f"{reason} counted",
            )
        assert preds.quiet(0.3) == []
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for topic, payload, _ in messages:
        by_stream.setdefault(topic.split("/")[1], []).append(json.loads(payload))
    for i in range(len(cases)):
        check_stream(by_stream[f"n{i}"], expected[i], sent[f"n{i}"])
    assert sorted(r["reason"] for r in reports) == sorted(bad)
    assert all(r["topic"] == "sensors/n0/data" for r in reports)
    for c in (preds, errors):
        c.close()


def test_nested_templates_join_stream_levels_and_ignore_plus_levels(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    """``fleet/+/site/{stream}/dev/{stream}/telemetry``: device 7 at two sites is two
    streams (``a/7``, ``b/7``); the gateway level (``+``) is not part of the id, so a
    device that moves to another gateway keeps its state."""
    rng = np.random.default_rng(5)
    cases = {sid: rng.normal(size=(10, 6)).astype(np.float32) for sid in ("a/7", "b/7", "a/8")}
    expected = oracle(model_path, list(cases.values()))
    doc = daemon_config(
        tmp_path,
        model_path,
        broker.port,
        "nested-test",
        input={
            "topic": "fleet/+/site/{stream}/dev/{stream}/telemetry",
            "reset_topic": "fleet/+/site/{stream}/dev/{stream}/reset",
            "max_stream_id_bytes": 16,
        },
    )
    preds = Collector(broker.port, "predictions/#")
    errors = Collector(broker.port, "seqstream/nested-test/errors")
    with running_daemon(doc, tmp_path) as daemon, publisher(broker.port) as pub:
        for row in range(10):
            for sid, case in cases.items():
                site, dev = sid.split("/")
                gateway = "gw1" if row < 5 else "gw2"  # half way the devices move
                topic = f"fleet/{gateway}/site/{site}/dev/{dev}/telemetry"
                pub.publish(topic, codecs.encode_json(case[row], row, None))
        by_stream: dict[str, list[dict[str, Any]]] = {}
        for topic, payload, _ in preds.take(30):
            by_stream.setdefault(topic.removeprefix("predictions/"), []).append(json.loads(payload))
        for i, sid in enumerate(cases):
            check_stream(by_stream[sid], expected[i], list(range(10)))

        # a reset names the same joined id: only a/7 starts afresh
        pub.publish("fleet/gw9/site/a/dev/7/reset", b"")
        wait_until(
            lambda: metric(daemon, "seqstream_state_resets_total", {"reason": "explicit"}) == 1,
            10,
            "the reset of a/7",
        )
        pub.publish("fleet/gw1/site/a/dev/7/telemetry", codecs.encode_json(cases["a/7"][0], 0))
        pub.publish("fleet/gw1/site/b/dev/7/telemetry", codecs.encode_json(cases["b/7"][0], 10))
        fresh = {t.removeprefix("predictions/"): json.loads(p) for t, p, _ in preds.take(2)}
        np.testing.assert_allclose(
            list(fresh["a/7"]["probs"].values()), expected[0][0], atol=1e-5, rtol=0
        )
        assert fresh["a/7"]["resets"] == ["explicit"] and fresh["a/7"]["seq"] == 0
        assert fresh["b/7"]["seq"] == 10 and "resets" not in fresh["b/7"]  # b/7 untouched

        # an empty id level, and a joined id past input.max_stream_id_bytes
        pub.publish("fleet/gw1/site//dev/7/telemetry", codecs.encode_json(cases["a/8"][0], 0))
        long_topic = f"fleet/gw1/site/{'s' * 9}/dev/{'d' * 9}/telemetry"  # 19 bytes joined
        pub.publish(long_topic, codecs.encode_json(cases["a/8"][0], 0))
        reports = [json.loads(p) for _, p, _ in errors.take(2)]
        assert sorted(r["reason"] for r in reports) == ["stream_id_too_long", "unknown_topic"]
        for reason in ("unknown_topic", "stream_id_too_long"):
            assert metric(daemon, "seqstream_messages_rejected_total", {"reason": reason}) == 1
        assert preds.quiet(0.3) == []
        assert metric(daemon, "seqstream_active_streams") == 3
    for c in (preds, errors):
        c.close()


def test_one_topic_per_channel_is_assembled_into_the_offline_steps(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    """``sensors/{stream}/ch/{channel}``: six readings with one ``seq`` make a step,
    whatever order they arrive in; a step missing a channel is dropped and counted once
    ``channel_max_pending`` steps wait behind it, and its stream restarts at the gap as
    after any lost message."""
    rng = np.random.default_rng(9)
    cases = {sid: rng.normal(size=(8, 6)).astype(np.float32) for sid in ("c0", "c1")}
    expected = oracle(model_path, list(cases.values()))
    gap = rng.normal(size=(4, 6)).astype(np.float32)
    (after_gap,) = oracle(model_path, [gap[2:]])  # a fresh state from the step after the gap
    doc = daemon_config(
        tmp_path,
        model_path,
        broker.port,
        "channel-test",
        input={"channel_topic": "sensors/{stream}/ch/{channel}", "channel_max_pending": 2},
    )
    preds = Collector(broker.port, "predictions/#")
    errors = Collector(broker.port, "seqstream/channel-test/errors")

    def reading(sid: str, j: int, seq: int, value: float) -> tuple[str, bytes]:
        payload = json.dumps({"seq": seq, "ts": 100.0 + seq, "value": value}).encode()
        return f"sensors/{sid}/ch/{NAMES[j]}", payload

    with running_daemon(doc, tmp_path) as daemon, publisher(broker.port) as pub:
        messages = [
            reading(sid, j, seq, float(case[seq, j]))
            for seq in range(8)
            for sid, case in cases.items()
            for j in range(6)
        ]
        # shuffled within windows of two steps: channels of seq t and t+1 interleave
        # (channel_max_pending = 2 lets seq t+1 wait for seq t's last channel)
        for start in range(0, len(messages), 24):
            window = messages[start : start + 24]
            for k in rng.permutation(len(window)):
                pub.publish(*window[k])
        by_stream: dict[str, list[dict[str, Any]]] = {}
        for topic, payload, _ in preds.take(16):
            by_stream.setdefault(topic.split("/")[1], []).append(json.loads(payload))
        for i, sid in enumerate(cases):
            got = sorted(by_stream[sid], key=lambda p: p["seq"])
            check_stream(got, expected[i], list(range(8)))
            assert [p["ts"] for p in got] == [100.0 + s for s in range(8)]

        # stream g: seq 1 never gets its f3; seq 2 waits behind it, and when seq 3 starts
        # (a third waiting step) seq 1 is dropped and 2 and 3 go on
        for seq in range(4):
            for j in range(6):
                if (seq, j) != (1, 3):
                    pub.publish(*reading("g", j, seq, float(gap[seq, j])))
        pub.publish("sensors/g/ch/f9", b'{"seq": 3, "value": 1}')
        got_g = [json.loads(p) for _, p, _ in preds.take(3)]
        assert [p["seq"] for p in got_g] == [0, 2, 3]
        assert got_g[1]["resets"] == ["seq_gap"] and "resets" not in got_g[2]
        got = np.array([list(p["probs"].values()) for p in got_g[1:]])
        np.testing.assert_allclose(got, after_gap, atol=1e-5, rtol=0)
        reasons = sorted(json.loads(p)["reason"] for _, p, _ in errors.take(2))
        assert reasons == ["incomplete_step", "unknown_channel"]
        assert (
            metric(daemon, "seqstream_messages_rejected_total", {"reason": "incomplete_step"}) == 5
        )
        assert (
            metric(daemon, "seqstream_messages_rejected_total", {"reason": "unknown_channel"}) == 1
        )
        # every reading counted once: queued with its step, or rejected
        queued = metric(daemon, "seqstream_messages_queued_total")
        assert metric(daemon, "seqstream_messages_received_total") == queued + 6 == 2 * 48 + 24
    for c in (preds, errors):
        c.close()
