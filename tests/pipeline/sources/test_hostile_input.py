"""Property-based fuzzing of everything that parses outside data.

Sensor payloads (beyond the byte-level fuzzing in ``test_codecs.py``: well-formed
binary headers around any data, and mutations of valid messages), topics through the
daemon's real MQTT source, configuration documents and model metadata. Each parser
either returns a value or raises its documented error type with a reason; nothing
else escapes. Through the source, hostile messages never change the predictions of
the streams that send good data.
"""

from __future__ import annotations

import datetime
import json
import math
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from pipeline.contract import ModelSpec, Normalisation, recurrent_state
from pipeline.daemon import app, config
from pipeline.engine.engine import Engine, EngineSettings, Rejected, Result
from pipeline.engine.store.state import RESET_REASONS
from pipeline.engine.worker import Worker
from pipeline.errors import ConfigError, ContractError, PayloadError
from pipeline.model import StepModel
from pipeline.sinks.mqtt import ErrorReporter
from pipeline.sources import codecs
from pipeline.sources import mqtt as source_mqtt
from pipeline.sources.codecs import Decoder
from pipeline.sources.mqtt import InputConfig, MqttSource, stream_id, topic_filter
from pipeline.telemetry.metrics import Metrics
from pipeline.transport.mqtt import Link, MqttConfig

F = 6
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEC = Decoder(F, max_payload_bytes=4096, max_steps=8)


def decode_or_reason(payload: bytes) -> Any:
    """The decoded step, or the rejection's reason (which must be a known word)."""
    try:
        return DEC.decode("s", payload)
    except PayloadError as exc:
        assert exc.reason in codecs.REASONS
        assert exc.detail and "\n" not in exc.detail
        return exc.reason


# -- payloads ------------------------------------------------------------------------------


@FUZZ
@given(
    version=st.integers(0, 255),
    flags=st.integers(0, 255),
    seq=st.integers(0, 2**64 - 1),
    ts=st.floats(allow_nan=True, allow_infinity=True),
    t=st.integers(0, 12),
    f=st.integers(0, 9),
    extra=st.integers(-8, 8),
    data=st.binary(min_size=0, max_size=4 * 12 * 9 + 8),
)
def test_binary_with_any_header_fields_decodes_exactly_or_names_why(
    version: int, flags: int, seq: int, ts: float, t: int, f: int, extra: int, data: bytes
) -> None:
    head = struct.pack("<2sBBQdHH", b"SQ", version, flags, seq, ts, t, f)
    body = (data * (1 + 4 * t * f // max(1, len(data))))[: max(0, 4 * t * f + extra)]
    got = decode_or_reason(head + body)
    if isinstance(got, str):
        return
    # accepted: exactly what the header announced, values bit for bit
    assert (version, flags & ~3, extra, f) == (1, 0, 0, F) and 1 <= t <= 8
    np.testing.assert_array_equal(
        got.values.view(np.uint32), np.frombuffer(body, "<u4").reshape(t, F)
    )
    assert got.seq == (seq if flags & 1 else None)
    assert got.ts == (ts if flags & 2 else None)


def _valid_messages() -> list[bytes]:
    rows = np.arange(2 * F, dtype=np.float32).reshape(2, F) / 7
    return [
        codecs.encode_json(rows[0], 3, 1.5),
        codecs.encode_json(rows, 4, None),
        codecs.encode_binary(rows[0], 3, 1.5),
        codecs.encode_binary(rows, 9, None),
    ]


@FUZZ
@given(
    base=st.sampled_from(_valid_messages()),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert", "drop"]),
            st.integers(0, 400),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_valid_messages_decode_or_are_rejected_with_a_reason(
    base: bytes, edits: list[tuple[str, int, int]]
) -> None:
    msg = bytearray(base)
    for op, at, byte in edits:
        i = at % (len(msg) + 1)
        if op == "flip" and msg:
            msg[i % len(msg)] ^= 1 << (byte % 8)
        elif op == "cut":
            del msg[i:]
        elif op == "insert":
            msg[i:i] = bytes([byte])
        elif op == "drop" and msg:
            del msg[i % len(msg)]
    got = decode_or_reason(bytes(msg))
    if not isinstance(got, str):
        assert got.values.dtype == np.float32 and got.values.shape[1] == F


@FUZZ
@given(
    rows=st.lists(
        st.lists(
            st.floats(width=32, allow_nan=False, allow_infinity=False)
            | st.integers(-(2**40), 2**40),
            min_size=F,
            max_size=F,
        ),
        min_size=1,
        max_size=8,
    ),
    flat=st.booleans(),
    seq=st.none() | st.integers(0, 2**62 - 1),
)
def test_json_numbers_arrive_as_the_float32_the_sensor_meant(
    rows: list[list[float]], flat: bool, seq: int | None
) -> None:
    values: Any = rows[0] if flat else rows
    step = DEC.decode("s", json.dumps({"seq": seq, "values": values}).encode())
    want = np.asarray(rows[:1] if flat else rows, dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(step.values, want)
    assert step.seq == seq


BIG = 1 << 20  # a decoder whose payload limit lets 64 KiB strings reach the parser
BIG_DEC = Decoder(F, max_payload_bytes=BIG, max_steps=8)
HUGE_INTS = st.integers(-(2**200), 2**200) | st.sampled_from(
    [2**62 - 1, 2**62, 2**63, 2**64 - 1, 2**64, 2**64 + 1, -(2**63) - 1, 10**400, -(10**400)]
)
LONG_TEXT = st.integers(0, 70_000).map(lambda n: "x" * n) | st.text(max_size=8)
ANY_VALUE = HUGE_INTS | st.floats() | LONG_TEXT | st.none() | st.booleans()


def _huge_json(seq: Any, ts: Any, values: Any) -> bytes:
    return json.dumps({"seq": seq, "ts": ts, "values": values}).encode()


HUGE_PAYLOADS = (
    st.builds(
        _huge_json,
        ANY_VALUE,
        ANY_VALUE,
        st.lists(ANY_VALUE, min_size=1, max_size=F) | st.lists(st.lists(ANY_VALUE, max_size=F)),
    )
    # beyond Python's 4300-digit int parsing limit, and beyond 64 KiB of digits
    | st.integers(4000, 70_000).map(lambda n: b'{"seq":1,"ts":' + b"9" * n + b',"values":[1]}')
    | st.integers(4000, 70_000).map(lambda n: b'{"values":[' + b"9" * n + b"]}")
    | st.integers(1, 70_000).map(lambda n: b'{"values":' + b"[" * n + b"]" * n + b"}")
)


@FUZZ
@given(payload=HUGE_PAYLOADS)
def test_numbers_and_strings_of_any_size_are_a_rejection_with_a_reason(payload: bytes) -> None:
    """Integers far beyond 2**64, strings beyond 64 KiB, any nesting: a Step or a reason."""
    try:
        step = BIG_DEC.decode("s", payload)
    except PayloadError as exc:
        assert exc.reason in codecs.REASONS
        assert exc.detail and "\n" not in exc.detail and len(exc.detail) < 200
        return
    assert step.values.dtype == np.float32 and step.values.shape[1] == F
    assert step.seq is None or 0 <= step.seq < 2**62
    assert step.ts is None or math.isfinite(step.ts)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"seq": 3, "ts": 1' + b"0" * 400 + b', "values": [1,2,3,4,5,6]}', "bad_ts"),
        (b'{"seq": 3, "ts": -1' + b"0" * 400 + b', "values": [1,2,3,4,5,6]}', "bad_ts"),
        (b'{"seq": 1' + b"0" * 400 + b', "values": [1,2,3,4,5,6]}', "bad_seq"),
        (b'{"seq": 18446744073709551616, "values": [1,2,3,4,5,6]}', "bad_seq"),
        (b'{"values": [1' + b"0" * 400 + b",2,3,4,5,6]}", "bad_shape"),
        (b'{"values": [1' + b"0" * 5000 + b",2,3,4,5,6]}", "malformed_json"),
    ],
)
def test_the_reported_overflows_are_rejections(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as err:
        BIG_DEC.decode("s", payload)
    assert err.value.reason == reason


# -- model metadata ------------------------------------------------------------------------


def _valid_spec_doc() -> dict[str, Any]:
    spec = ModelSpec(
        name="m",
        version="1",
        task="classify",
        cell="lstm",
        layers=2,
        hidden=8,
        features=("a", "b"),
        normalisation=Normalisation((0.0, 1.0), (1.0, 2.0)),
        state=recurrent_state("lstm", 2, 8),
        outputs=("probs",),
        labels=("x", "y"),
    )
    doc: dict[str, Any] = json.loads(spec.to_json())
    return doc


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.sampled_from(["batch", "lstm", "classify", "forecast", "probs", "nan", "1e999", "x"]),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
SPEC_KEYS = [*sorted(_valid_spec_doc()), "mean", "std", "in_graph", "output", "shape", "init"]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, 10_000),
            st.sampled_from(["set", "delete", "add"]),
            JSON,
            st.sampled_from(SPEC_KEYS),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_model_metadata_loads_or_names_the_field(
    edits: list[tuple[int, str, Any, str]],
) -> None:
    doc = _valid_spec_doc()
    for pick, op, value, key in edits:
        paths = _paths(doc)[1:]
        path = paths[pick % len(paths)]
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if op == "set":
            parent[path[-1]] = value
        elif op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == "add" and isinstance(parent, dict):
            parent[key] = value
    text = json.dumps(doc)
    try:
        spec = ModelSpec.from_json(text)
    except ContractError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert ModelSpec.from_json(spec.to_json()) == spec  # what loads is self-consistent


@FUZZ
@given(st.text(max_size=200) | st.sampled_from(["[" * 5000, '{"a":' * 3000, "\ud800", "1e999"]))
def test_model_metadata_that_is_not_json_is_a_contract_error(text: str) -> None:
    with pytest.raises(ContractError):
        ModelSpec.from_json(text)


# -- configuration -------------------------------------------------------------------------

SECTIONS: dict[str, list[str]] = {
    "model": ["path", "providers", "threads", "sha256"],
    "engine": [
        "max_streams",
        "idle_timeout_s",
        "seq_gap_tolerance",
        "ts_gap_tolerance_s",
        "max_batch",
        "max_chunk",
        "check_state",
    ],
    "checkpoint": ["path", "interval_s", "ack_after_checkpoint", "max_unacked"],
    "queue": ["max_size", "overflow", "max_wait_ms"],
    "mqtt": [
        "host",
        "port",
        "protocol",
        "client_id",
        "clean_session",
        "session_expiry_s",
        "keepalive_s",
        "connect_timeout_s",
        "reconnect_min_s",
        "reconnect_max_s",
        "max_inflight",
        "max_queued_out",
        "username",
        "password_file",
        "password_env",
        "status_topic",
        "tls",
    ],
    "input": ["topic", "reset_topic", "qos", "max_payload_bytes"],
    "output": [
        "topic",
        "qos",
        "retain",
        "every_k",
        "on_change",
        "error_topic",
        "error_rate_per_s",
        "error_burst",
    ],
    "metrics": ["enabled", "bind", "port"],
}
STRINGS = [
    "",
    "\x00",
    "a\x00b",
    "~no-such-user-here/x",
    "/no/such/dir/file",
    "model.onnx",
    "sensors/{stream}/data",
    "{stream}",
    "a/+/{stream}",
    "#",
    "{client_id}/x",
    "{other}",
    "s/{stream}/{stream}",
    "cpu",
    "cuda",
    "tpu",
    "3.1.1",
    "5",
    "block",
    "drop",
    "a" * 70_000,
    "0" * 64,
    "é/{stream}",
    "SEQSTREAM_NO_SUCH_VAR",
    "\ud7ff",
]
TOML_SCALARS = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.sampled_from([0, 1, -1, 65_535, 65_536, 2**31, 50_001, 10**400])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(STRINGS)
    | st.text(max_size=8)
    | st.datetimes()
    | st.dates()
    | st.times()
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(st.sampled_from(["x", "ca_file", "path"]), c, max_size=2)
    ),
    max_leaves=6,
)


PATH_KEYS = {"path", "password_file", "ca_file", "cert_file", "key_file"}
PATHS = st.sampled_from(STRINGS) | TOML_VALUES


@st.composite
def config_docs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for section, keys in SECTIONS.items():
        if section != "model" and not draw(st.booleans()):
            continue
        picked = draw(st.lists(st.sampled_from(keys), unique=True, max_size=4))
        table = {k: draw(PATHS if k in PATH_KEYS else TOML_VALUES) for k in picked}
        if section == "model" and draw(st.integers(0, 9)):
            table.setdefault("path", "model.onnx")  # mostly present: the other keys get reached
        doc[section] = table if draw(st.integers(0, 19)) else draw(TOML_VALUES)
    if not draw(st.integers(0, 9)):
        doc[draw(st.text(max_size=6))] = draw(TOML_VALUES)
    return doc


@FUZZ
@given(doc=config_docs())
@example(doc={"model": {"path": "~no-such-user-here/x"}})
@example(doc={"model": {"path": "m"}, "mqtt": {"username": "u", "password_file": "a\x00b"}})
@example(doc={"model": {"path": "m"}, "engine": {"idle_timeout_s": 10**400}})
def test_any_config_document_gives_settings_or_one_line_naming_the_key(
    doc: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.getbasetemp()
    try:
        config.parse(doc, base=base, source=base / "fuzz.toml")
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message
        head = message.split(":", 1)[0]
        assert head.split(".")[0].split("[")[0] in {*SECTIONS, "audio", *doc}, message


@FUZZ
@given(text=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_config_file_bytes_give_settings_or_a_config_error(
    text: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-bytes.toml"
    path.write_bytes(text)
    try:
        config.load(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)


# -- topics, through the daemon's source ---------------------------------------------------


@FUZZ
@given(template=st.sampled_from(STRINGS) | st.text(alphabet="ab/+#{}stream_", max_size=30))
def test_an_accepted_input_template_subscribes_to_exactly_its_topics(
    template: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    doc = {"model": {"path": "m.onnx"}, "input": {"topic": template, "reset_topic": ""}}
    base = tmp_path_factory.getbasetemp()
    try:
        cfg = config.parse(doc, base=base, source=base / "t.toml").input
    except ConfigError:
        return
    pattern, levels = topic_filter(cfg.topic)
    # the template's own + levels match anything and are not part of the id
    topic = "/".join("any" if x == "+" else x for x in cfg.topic.split("/"))
    topic = topic.replace("{stream}", "sensor-7")
    assert paho.topic_matches_sub(pattern, topic)
    assert stream_id(topic, levels) == "/".join(["sensor-7"] * len(levels))
    assert pattern.count("+") == cfg.topic.split("/").count("+") + len(levels)
    assert "#" not in pattern and "{" not in pattern and len(levels) >= 1


VICTIMS = {
    f"v{k}": np.random.default_rng(k).normal(size=(6, F)).astype(np.float32) for k in range(3)
}
LEVEL = st.text(max_size=4) | st.sampled_from(["", "+", "#", "v0", "sensors", "data", "reset", "é"])
TOPICS = st.lists(LEVEL, min_size=1, max_size=5).map("/".join) | st.builds(
    "sensors/{}/data".format, LEVEL
)
TOPICS = (
    TOPICS
    | st.builds("sensors/{}/reset".format, LEVEL)
    | st.integers(100, 70_000).map(lambda n: f"sensors/{'y' * n}/data")
    | st.integers(100, 70_000).map(lambda n: f"sensors/{'y' * n}/reset")
)
PAYLOADS = (
    st.binary(max_size=64)
    | st.sampled_from(_valid_messages())
    | st.builds(lambda seq: codecs.encode_json(np.ones(F, np.float32), seq), st.integers(0, 9))
    | HUGE_PAYLOADS
)
SOURCE_REASONS = {*codecs.REASONS, *source_mqtt.REASONS}


class Collect:
    """The worker's sink: every result, by stream; signals when ``expect`` arrived."""

    def __init__(self) -> None:
        self.results: list[Result | Rejected] = []
        self.cv = threading.Condition()

    def __call__(self, results: Sequence[Result | Rejected]) -> None:
        with self.cv:
            self.results.extend(results)
            self.cv.notify_all()


@pytest.fixture(scope="module")
def lstm(random_model_path: Any) -> StepModel:
    return StepModel.load(random_model_path("lstm", "classify"))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    hostile=st.lists(st.tuples(TOPICS, PAYLOADS, st.integers(0, 2), st.booleans()), max_size=25),
    order=st.randoms(use_true_random=False),
)
def test_hostile_messages_never_raise_out_of_the_source_nor_change_other_streams(
    lstm: StepModel, hostile: list[tuple[str, bytes, int, bool]], order: Any
) -> None:
    """...and every message is counted once: received == rejected at the source + queued,
    and every queued data step comes out of the engine as a result or a rejection."""
    victims = {f"sensors/{k}/data" for k in VICTIMS}
    for topic, payload, _, retain in hostile:  # garbage may go to a victim's topic, data not
        if topic in victims and not retain:
            assume(isinstance(_decoded(payload), str))
        assume(topic not in {f"sensors/{k}/reset" for k in VICTIMS})
        # A broker never delivers a topic name with a wildcard (MQTT forbids them in a
        # PUBLISH); paho's router would hand a literal "+" level to a handler twice.
        assume("+" not in topic and "#" not in topic)
    link = Link(MqttConfig(client_id="fuzz"))  # never connected: acks and reports go nowhere
    metrics = Metrics(
        CollectorRegistry(), reject_reasons=app.REJECT_REASONS, reset_reasons=RESET_REASONS
    )
    errors = ErrorReporter(link, "errors", rate_per_s=1000.0, burst=1000, metrics=metrics)
    sink = Collect()
    worker = Worker(Engine(lstm, EngineSettings(max_chunk=8)), sink, max_queue=1000)
    MqttSource(  # subscribes its handlers on the link
        link,
        BIG_DEC,
        worker,
        InputConfig(reset_min_interval_s=3600.0),
        metrics=metrics,
        errors=errors,
    )
    good = [
        (f"sensors/{k}/data", codecs.encode_json(v[t], t), 1, False)
        for k, v in VICTIMS.items()
        for t in range(len(v))
    ]
    arrivals: list[tuple[str, bytes, int, bool]] = []
    pending = {k: [m for m in good if m[0] == f"sensors/{k}/data"] for k in VICTIMS}
    pool = list(hostile)
    while pool or any(pending.values()):
        live = [k for k, msgs in pending.items() if msgs]
        if pool and (not live or order.random() < 0.5):
            arrivals.append(pool.pop(order.randrange(len(pool))))
        else:
            arrivals.append(pending[order.choice(live)].pop(0))
    worker.start()
    try:
        for mid, (topic, payload, qos, retain) in enumerate(arrivals, 1):
            msg = paho.MQTTMessage(mid=mid, topic=topic.encode())
            msg.payload, msg.qos, msg.retain = payload, qos, retain
            link.client._handle_on_message(msg)  # paho's own routing to the source's handlers
        # what the source must have let through: data it decodes, first resets per stream
        queued_data = sum(_reaches_engine(t, p, r) for t, p, _, r in arrivals)
        reset_ids = [_stream_id(t) for t, _, _, r in arrivals if _is_reset(t) and not r]
        queued_resets = len({k for k in reset_ids if k})
        with sink.cv:
            assert sink.cv.wait_for(lambda: len(sink.results) >= queued_data, timeout=20)
    finally:
        worker.stop(drain=True, timeout=10)
    received = _value(metrics.received)
    queued = _value(metrics.queued)
    at_source = sum(
        s.value
        for s in metrics.rejected.collect()[0].samples
        if s.name.endswith("_total") and s.labels["reason"] in SOURCE_REASONS
    )
    assert received == len(arrivals)
    assert received == at_source + queued
    assert queued == queued_data + queued_resets
    assert len(sink.results) == queued_data
    for key, values in VICTIMS.items():
        got = [r for r in sink.results if isinstance(r, Result) and r.step.stream == key]
        assert [r.step.seq for r in got] == list(range(len(values)))
        assert all(r.resets == () for r in got)
        want_out, _ = lstm.run(values[None], lstm.initial_state(1))
        np.testing.assert_allclose(
            np.stack([r.outputs["probs"][-1] for r in got]), want_out["probs"][0], atol=1e-5, rtol=0
        )
    # every message was counted as received or handed to the engine; rejections have reasons
    rejected = metrics.rejected.collect()[0].samples
    assert all(s.labels["reason"] in app.REJECT_REASONS for s in rejected)
    assert {*source_mqtt.REASONS} <= {*app.REJECT_REASONS}


def _value(counter: Any) -> float:
    return float(next(s.value for s in counter.collect()[0].samples if s.name.endswith("_total")))


def _stream_id(topic: str) -> str | None:
    """The id the source takes from a sensors/{stream}/... topic, None when it refuses it."""
    levels = topic.split("/")
    sid = levels[1] if len(levels) > 1 else ""
    return sid if sid and len(sid.encode()) <= InputConfig().max_stream_id_bytes else None


def _reaches_engine(topic: str, payload: bytes, retain: bool) -> bool:
    filt, _ = topic_filter(InputConfig().topic)
    return (
        not retain
        and paho.topic_matches_sub(filt, topic)
        and _stream_id(topic) is not None
        and not isinstance(_decoded(payload), str)
    )


def _is_reset(topic: str) -> bool:
    filt, _ = topic_filter(InputConfig().reset_topic or "")
    return paho.topic_matches_sub(filt, topic)


def _decoded(payload: bytes) -> Any:
    """The step ``BIG_DEC`` makes of ``payload``, or the reason it refuses it."""
    try:
        return BIG_DEC.decode("s", payload)
    except PayloadError as exc:
        return exc.reason


def test_nan_and_datetime_values_in_config_are_named(tmp_path: Path) -> None:
    """Two kinds of value TOML has that JSON lacks."""
    for value in (math.nan, datetime.datetime(2024, 1, 1)):
        with pytest.raises(ConfigError, match="queue.max_wait_ms"):
            config.parse(
                {"model": {"path": "m"}, "queue": {"max_wait_ms": value}},
                base=tmp_path,
                source=tmp_path / "c",
            )


class _BrokenIntake:
    """An intake with a bug: what the source does when its own side raises."""

    def submit(self, step: Any, timeout: float | None = None, alone: Any = None) -> bool:
        raise RuntimeError("bug " + "x" * 5000)

    def submit_reset(self, stream: str) -> None:
        raise RuntimeError("bug")


def test_a_bug_behind_the_source_is_counted_and_logged_once_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = Link(MqttConfig(client_id="bug"))  # never connected
    metrics = Metrics(
        CollectorRegistry(), reject_reasons=app.REJECT_REASONS, reset_reasons=RESET_REASONS
    )
    errors = ErrorReporter(link, "errors", rate_per_s=1.0, burst=1, metrics=metrics)
    MqttSource(link, DEC, _BrokenIntake(), InputConfig(), metrics=metrics, errors=errors)
    good = codecs.encode_json(np.ones(F, np.float32), 1)
    with caplog.at_level("DEBUG", logger="pipeline.sources.mqtt"):
        for mid in range(1, 51):
            msg = paho.MQTTMessage(mid=mid, topic=f"sensors/s{mid}/data".encode())
            msg.payload, msg.qos = good, 1
            link.client._handle_on_message(msg)
    internal = metrics.rejected.labels(metrics.name, source_mqtt.INTERNAL_ERROR)._value.get()
    assert internal == 50 and _value(metrics.received) == 50
    assert len(caplog.records) == 1  # one line a minute at most
    record = caplog.records[0]
    assert record.exc_info is None and "RuntimeError" in record.getMessage()
    assert len(record.getMessage()) < 400  # the exception text is clipped
