"""Per-channel input: readings joined into steps by seq, and the missing-channel policy."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from pipeline.daemon import app
from pipeline.engine.engine import Engine, EngineSettings, Rejected, Result
from pipeline.engine.store.state import RESET_REASONS
from pipeline.engine.worker import Worker
from pipeline.errors import PayloadError
from pipeline.model import StepModel
from pipeline.sinks.mqtt import ErrorReporter
from pipeline.sources import codecs
from pipeline.sources import mqtt as source_mqtt
from pipeline.sources.channels import DUPLICATE, INCOMPLETE_STEP, REASONS, Assembler
from pipeline.sources.codecs import Decoder
from pipeline.sources.mqtt import InputConfig, MqttSource
from pipeline.telemetry.metrics import Metrics
from pipeline.transport.mqtt import Link, MqttConfig

NAMES = ("temp", "hum")


def assembler(max_pending: int = 4, max_streams: int = 8) -> Assembler:
    return Assembler(NAMES, max_pending=max_pending, max_streams=max_streams)


def test_a_step_is_emitted_when_its_last_channel_arrives() -> None:
    a = assembler()
    assert a.channel_index("hum") == 1 and a.channel_index("pressure") is None
    first = a.add("s", 1, 3, None, 40.0, received=1.0)
    assert first.steps == () and first.dropped == 0
    done = a.add("s", 0, 3, 9.5, 21.5, received=2.0)
    (step,) = done.steps
    assert (step.stream, step.seq, step.ts, step.received) == ("s", 3, 9.5, 1.0)
    np.testing.assert_array_equal(step.values, [[21.5, 40.0]])
    assert step.values.dtype == np.float32


def test_streams_and_seqs_do_not_mix() -> None:
    a = assembler()
    assert a.add("s", 0, 1, None, 1.0, 0).steps == ()
    assert a.add("t", 1, 1, None, 2.0, 0).steps == ()  # another stream's seq 1
    assert a.add("s", 1, 2, None, 3.0, 0).steps == ()  # s's seq 2
    (step,) = a.add("s", 1, 1, None, 4.0, 0).steps
    np.testing.assert_array_equal(step.values, [[1.0, 4.0]])


def test_a_complete_step_waits_behind_an_older_one_until_that_completes() -> None:
    a = assembler()
    a.add("s", 0, 1, None, 1.0, 0)
    assert a.add("s", 0, 2, None, 2.0, 0).steps == ()
    assert a.add("s", 1, 2, None, 20.0, 0).steps == ()  # complete, but seq 1 is not yet
    out = a.add("s", 1, 1, None, 10.0, 0)
    assert [s.seq for s in out.steps] == [1, 2] and out.dropped == 0
    np.testing.assert_array_equal(out.steps[1].values, [[2.0, 20.0]])


def test_an_incomplete_step_is_dropped_when_too_many_wait_behind_it() -> None:
    a = assembler(max_pending=2)
    a.add("s", 0, 1, None, 1.0, 0)  # seq 1: hum never comes
    a.add("s", 0, 2, None, 2.0, 0)
    assert a.add("s", 1, 2, None, 2.0, 0).steps == ()
    out = a.add("s", 0, 3, None, 3.0, 0)  # a third waiting step: seq 1 goes, 2 leaves
    assert [s.seq for s in out.steps] == [2]
    assert (out.dropped, out.dropped_as) == (1, INCOMPLETE_STEP)
    assert [s.seq for s in a.add("s", 1, 3, None, 3.0, 0).steps] == [3]
    # a late reading for a dropped or emitted step is a duplicate, never a new step
    late = a.add("s", 1, 1, None, 10.0, 0)
    assert late.steps == () and (late.dropped, late.dropped_as) == (1, DUPLICATE)
    assert a.add("s", 0, 3, None, 3.0, 0).dropped_as == DUPLICATE


def test_a_reading_older_than_a_full_window_is_dropped_at_once() -> None:
    a = assembler(max_pending=2)
    a.add("s", 0, 5, None, 1.0, 0)
    a.add("s", 0, 6, None, 1.0, 0)
    out = a.add("s", 0, 4, None, 1.0, 0)
    assert out.steps == () and (out.dropped, out.dropped_as) == (1, INCOMPLETE_STEP)
    assert a.add("s", 1, 4, None, 1.0, 0).dropped_as == DUPLICATE


def test_the_same_channel_twice_for_one_step_is_a_duplicate() -> None:
    a = assembler()
    a.add("s", 0, 5, None, 1.0, 0)
    out = a.add("s", 0, 5, None, 2.0, 0)
    assert (out.dropped, out.dropped_as) == (1, DUPLICATE)
    (step,) = a.add("s", 1, 5, None, 3.0, 0).steps
    np.testing.assert_array_equal(step.values, [[1.0, 3.0]])  # the first reading kept


def test_a_dead_channel_keeps_at_most_max_pending_steps() -> None:
    a = assembler(max_pending=3)
    dropped = [a.add("s", 0, seq, None, 1.0, 0).dropped for seq in range(10)]
    assert dropped == [0, 0, 0] + [1] * 7  # each new step beyond 3 drops the oldest
    assert a.add("s", 1, 2, None, 1.0, 0).dropped_as == DUPLICATE  # seq 2 was dropped
    assert a.add("s", 1, 9, None, 1.0, 0).steps == ()  # 7 and 8 still wait before it
    assert a.add("s", 1, 8, None, 1.0, 0).steps == ()
    assert [s.seq for s in a.add("s", 1, 7, None, 1.0, 0).steps] == [7, 8, 9]


def test_a_forged_far_ahead_reading_is_refused_without_touching_the_stream() -> None:
    a = Assembler(NAMES, max_pending=4, max_streams=8, max_seq_jump=100)
    a.add("s", 0, 0, None, 1.0, 0)
    a.add("s", 1, 0, None, 1.0, 0)
    for j in range(2):  # a whole forged step far ahead
        out = a.add("s", j, 10**9, None, 1.0, 0)
        assert out.steps == () and (out.dropped, out.dropped_as) == (1, "seq_jump")
    a.add("s", 0, 1, None, 1.0, 0)
    assert [s.seq for s in a.add("s", 1, 1, None, 1.0, 0).steps] == [1]  # the real sender


def test_streams_beyond_max_streams_evict_the_least_recent_with_a_count() -> None:
    a = assembler(max_streams=2)
    a.add("a", 0, 0, None, 1.0, 0)
    a.add("b", 0, 0, None, 1.0, 0)
    a.add("a", 0, 1, None, 1.0, 0)  # a is now the most recent
    out = a.add("c", 0, 0, None, 1.0, 0)
    assert (out.dropped, out.dropped_as) == (1, INCOMPLETE_STEP)  # b's one reading
    assert a.reset("a") == 2 and a.reset("a") == 0


def test_a_reset_stream_may_start_its_seq_again() -> None:
    a = assembler()
    a.add("s", 0, 7, None, 1.0, 0)
    a.add("s", 1, 7, None, 1.0, 0)
    assert a.reset("s") == 0
    assert a.add("s", 0, 0, None, 1.0, 0).dropped == 0
    assert [s.seq for s in a.add("s", 1, 0, None, 1.0, 0).steps] == [0]


# -- the channel payload ------------------------------------------------------------------

DEC = Decoder(2, max_payload_bytes=1024, max_steps=4, features=NAMES)


def test_a_channel_payload_is_seq_ts_and_one_number() -> None:
    assert DEC.channel(b'{"seq": 4, "ts": 1.5, "value": 21}') == (4, 1.5, 21.0)
    assert DEC.channel(b'{"seq": 0, "value": -2.5, "unit": "C"}') == (0, None, -2.5)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"value": 1}', "bad_seq"),
        (b'{"seq": -1, "value": 1}', "bad_seq"),
        (b'{"seq": 1, "ts": "x", "value": 1}', "bad_ts"),
        (b'{"seq": 1}', "bad_shape"),
        (b'{"seq": 1, "value": [1]}', "bad_shape"),
        (b'{"seq": 1, "value": true}', "bad_shape"),
        (b'{"seq": 1, "value": 1' + b"0" * 400 + b"}", "bad_shape"),
        (b'{"seq": 1, "value": ', "malformed_json"),
        (b"7", "malformed_json"),
        (b'{"seq": 1, "value": 1, "pad": "' + b"x" * 1100 + b'"}', "oversized"),
    ],
)
def test_bad_channel_payloads_have_reasons(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        DEC.channel(payload)
    assert info.value.reason == reason and reason in codecs.REASONS


json_values = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["seq", "ts", "value", "x"]), json_values, max_size=4))
def test_any_channel_json_decodes_or_is_refused_with_a_reason(doc: dict[str, object]) -> None:
    try:
        seq, ts, value = DEC.channel(json.dumps(doc).encode())
    except PayloadError as exc:
        assert exc.reason in codecs.REASONS
        return
    assert type(seq) is int and seq >= 0 and type(value) is float
    assert ts is None or type(ts) is float


# -- hostile readings through the source ----------------------------------------------------

F = 6
FEATURES = tuple(f"f{i}" for i in range(F))  # what export_random names them
VICTIMS = {
    f"v{k}": np.random.default_rng(k).normal(size=(5, F)).astype(np.float32) for k in range(2)
}
CHANNEL_TOPIC = "sensors/{stream}/ch/{channel}"
LEVEL = st.sampled_from(["", "v0", "v1", "x", "f0", "f5", "f6", "ch", "sensors", "é"])
HOSTILE_TOPICS = st.builds("sensors/{}/ch/{}".format, LEVEL, LEVEL) | st.lists(
    LEVEL, min_size=1, max_size=5
).map("/".join)
HOSTILE_PAYLOADS = st.binary(max_size=40) | st.builds(
    lambda seq, v: json.dumps({"seq": seq, "value": v}).encode(),
    st.integers(-1, 12) | st.just(10**9),
    st.floats() | st.integers() | st.booleans() | st.none(),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    hostile=st.lists(st.tuples(HOSTILE_TOPICS, HOSTILE_PAYLOADS, st.booleans()), max_size=30),
    order=st.randoms(use_true_random=False),
)
def test_hostile_channel_readings_are_counted_and_leave_other_streams_alone(
    random_model_path: Any, hostile: list[tuple[str, bytes, bool]], order: Any
) -> None:
    """Readings in any order, garbage among them: nothing escapes the source, every
    reading is counted once (rejected, queued with its step, or still waiting), and
    the victims' steps come out of the engine exactly as their offline run."""
    for topic, payload, retain in hostile:  # garbage may go to a victim's topic, data not
        levels = topic.split("/")
        if len(levels) == 4 and levels[1] in VICTIMS and levels[0] == "sensors" and not retain:
            assume(_channel_reason(payload) is not None)
    model = StepModel.load(random_model_path("lstm", "classify"))
    assert model.spec.features == FEATURES
    link = Link(MqttConfig(client_id="fuzz"))  # never connected: acks and reports go nowhere
    metrics = Metrics(
        CollectorRegistry(), reject_reasons=app.REJECT_REASONS, reset_reasons=RESET_REASONS
    )
    errors = ErrorReporter(link, "errors", rate_per_s=1000.0, burst=1000, metrics=metrics)
    results: list[Result | Rejected] = []
    cv = threading.Condition()

    def sink(batch: Sequence[Result | Rejected]) -> None:
        with cv:
            results.extend(batch)
            cv.notify_all()

    worker = Worker(Engine(model, EngineSettings(max_chunk=8)), sink, max_queue=1000)
    # room for all five victim steps to wait: shuffled as they are, none is dropped
    assembler = Assembler(FEATURES, max_pending=5, max_streams=100, max_seq_jump=100)
    cfg = InputConfig(channel_topic=CHANNEL_TOPIC, reset_topic=None)
    MqttSource(link, DEC6, worker, cfg, metrics=metrics, errors=errors, channels=assembler)
    good = [
        (f"sensors/{k}/ch/{FEATURES[j]}", json.dumps({"seq": t, "value": float(v[t, j])}), False)
        for k, v in VICTIMS.items()
        for t in range(len(v))
        for j in range(F)
    ]
    # Channels and steps interleave at will, but each channel's readings keep their own
    # order, as MQTT keeps each publisher's: without that, a whole later step could be
    # complete before any reading of an earlier one exists, which no policy can tell
    # from a lost step (the module doc's case of a missing step).
    lanes = [[r for r in good if r[0] == topic] for topic in dict.fromkeys(r[0] for r in good)]
    lanes += [[h] for h in hostile]
    arrivals = []
    while lanes:
        lane = order.choice(lanes)
        topic, payload, retain = lane.pop(0)
        arrivals.append(
            (topic, payload if isinstance(payload, bytes) else payload.encode(), retain)
        )
        if not lane:
            lanes.remove(lane)
    worker.start()
    try:
        for mid, (topic, payload, retain) in enumerate(arrivals, 1):
            msg = paho.MQTTMessage(mid=mid, topic=topic.encode())
            msg.payload, msg.qos, msg.retain = payload, 1, retain
            link.client._handle_on_message(msg)  # paho's own routing to the source
        queued_steps = int(_value(metrics.queued)) // F
        with cv:
            assert cv.wait_for(lambda: len(results) >= queued_steps, timeout=20)
    finally:
        worker.stop(drain=True, timeout=10)
    at_source = sum(
        s.value
        for s in metrics.rejected.collect()[0].samples
        if s.name.endswith("_total")
        and s.labels["reason"] in {*codecs.REASONS, *source_mqtt.REASONS, *REASONS, "duplicate"}
        and s.labels["reason"] != "non_finite"
    )
    assert _value(metrics.received) == len(arrivals)
    assert _value(metrics.received) == at_source + _value(metrics.queued) + assembler.waiting
    assert all(
        s.labels["reason"] in app.REJECT_REASONS for s in metrics.rejected.collect()[0].samples
    )
    for key, values in VICTIMS.items():
        got = [r for r in results if isinstance(r, Result) and r.step.stream == key]
        assert [r.step.seq for r in got] == list(range(len(values)))
        want, _ = model.run(values[None], model.initial_state(1))
        np.testing.assert_allclose(
            np.stack([r.outputs["probs"][-1] for r in got]), want["probs"][0], atol=1e-5
        )


DEC6 = Decoder(F, max_payload_bytes=4096, max_steps=8, features=FEATURES)


def _channel_reason(payload: bytes) -> str | None:
    try:
        DEC6.channel(payload)
    except PayloadError as exc:
        return exc.reason
    return None


def _value(counter: Any) -> float:
    return float(next(s.value for s in counter.collect()[0].samples if s.name.endswith("_total")))
