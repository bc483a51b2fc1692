"""Payload codecs: both input formats, every rejection reason, fuzzing, prediction JSON."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.contract import ModelSpec, Normalisation, recurrent_state
from pipeline.engine.engine import Result, Step
from pipeline.errors import PayloadError
from pipeline.sinks.encoder import PredictionEncoder
from pipeline.sources import codecs
from pipeline.sources.codecs import Decoder

F = 3
DEC = Decoder(F, max_payload_bytes=4096, max_steps=8)


def reason_of(payload: bytes) -> str:
    with pytest.raises(PayloadError) as info:
        DEC.decode("s", payload)
    assert info.value.reason in codecs.REASONS
    return info.value.reason


def test_json_one_step() -> None:
    step = DEC.decode("s1", b'{"seq": 7, "ts": 12, "values": [1, 2.5, -3e2]}', received=4.0)
    assert isinstance(step, Step)
    assert (step.stream, step.seq, step.ts, step.received) == ("s1", 7, 12.0, 4.0)
    assert isinstance(step.ts, float)
    assert step.values.dtype == np.float32 and step.values.shape == (1, F)
    np.testing.assert_array_equal(step.values, [[1.0, 2.5, -300.0]])


def test_json_several_steps_and_optional_fields() -> None:
    step = DEC.decode("s", b'{"values": [[1, 2, 3], [4, 5, 6]], "unit": "g"}')
    assert step.seq is None and step.ts is None
    np.testing.assert_array_equal(step.values, [[1, 2, 3], [4, 5, 6]])


def test_binary_layout_is_the_documented_one() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, F)
    payload = codecs.encode_binary(values, seq=2**40, ts=1.5)
    assert len(payload) == 24 + 4 * 6
    assert payload[:2] == b"SQ" and payload[2] == 1 and payload[3] == 3
    assert struct.unpack_from("<Q", payload, 4)[0] == 2**40
    assert struct.unpack_from("<d", payload, 12)[0] == 1.5
    assert struct.unpack_from("<HH", payload, 20) == (2, F)
    assert np.frombuffer(payload, "<f4", offset=24).tolist() == values.ravel().tolist()
    step = DEC.decode("b", payload)
    assert (step.seq, step.ts) == (2**40, 1.5)
    np.testing.assert_array_equal(step.values, values)


def test_binary_without_seq_and_ts() -> None:
    step = DEC.decode("b", codecs.encode_binary(np.ones(F, dtype=np.float32)))
    assert step.seq is None and step.ts is None and step.values.shape == (1, F)


def test_non_finite_values_pass_to_the_engine_which_rejects_them() -> None:
    # JSON NaN/Infinity, a float32 overflow, and binary NaN all decode; the engine's batch
    # check then rejects them with reason "non_finite" (see tests of the engine)
    for payload in (
        b'{"values": [NaN, 2, 3]}',
        b'{"values": [1, Infinity, 3]}',
        b'{"values": [1e39, 2, 3]}',
        b'{"values": [1e400, 2, 3]}',
        codecs.encode_binary(np.array([1, np.nan, 3], dtype=np.float32)),
    ):
        assert not np.isfinite(DEC.decode("s", payload).values).all()


def test_json_encoder_round_trips() -> None:
    values = np.array([[0.1, 0.2, 0.3]], dtype=np.float32)
    step = DEC.decode("j", codecs.encode_json(values, seq=3, ts=9.25))
    assert (step.seq, step.ts) == (3, 9.25)
    np.testing.assert_array_equal(step.values, values)  # float32 survives the JSON trip


def _binary(
    t: int, f: int, *, version: int = 1, flags: int = 0, seq: int = 0, extra: int = 0
) -> bytes:
    head = struct.pack("<2sBBQdHH", b"SQ", version, flags, seq, 0.0, t, f)
    return head + b"\0" * (4 * t * f + extra)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"x" * 5000, "oversized"),
        (b"", "malformed_json"),
        (b"{", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b"[1, 2, 3]", "malformed_json"),
        (b"[" * 3000 + b"]" * 1000, "malformed_json"),
        (b'{"values": [1, 2, 3], "seq": -1}', "bad_seq"),
        (b'{"values": [1, 2, 3], "seq": 1.5}', "bad_seq"),
        (b'{"values": [1, 2, 3], "seq": true}', "bad_seq"),
        (b'{"values": [1, 2, 3], "seq": 9223372036854775808}', "bad_seq"),
        (b'{"values": [1, 2, 3], "ts": "now"}', "bad_ts"),
        (b'{"values": [1, 2, 3], "ts": false}', "bad_ts"),
        (b'{"values": [1, 2, 3], "ts": NaN}', "bad_ts"),
        (b'{"seq": 1}', "bad_shape"),
        (b'{"values": []}', "bad_shape"),
        (b'{"values": [[]]}', "bad_shape"),
        (b'{"values": 3}', "bad_shape"),
        (b'{"values": ["1", "2", "3"]}', "bad_shape"),
        (b'{"values": [1, null, 3]}', "bad_shape"),
        (b'{"values": [[1, 2, 3], [4, 5]]}', "bad_shape"),
        (b'{"values": [[[1, 2, 3]]]}', "bad_shape"),
        (b'{"values": [{"a": 1}, 2, 3]}', "bad_shape"),
        (b'{"values": [1, 2, 1' + b"0" * 400 + b"]}", "bad_shape"),
        (b'{"values": [1, 2]}', "bad_features"),
        (b'{"values": [[1, 2, 3, 4]]}', "bad_features"),
        (json.dumps({"values": [[1, 2, 3]] * 9}).encode(), "too_long"),
        (b"SQ\x01", "bad_binary_header"),
        (_binary(1, F, version=2), "bad_binary_header"),
        (_binary(1, F, flags=4), "bad_binary_header"),
        (_binary(0, F), "bad_shape"),
        (_binary(1, F, extra=4), "bad_binary_length"),
        (_binary(2, F)[:-1], "bad_binary_length"),
        (_binary(1, F + 1), "bad_features"),
        (_binary(9, F), "too_long"),
        (_binary(1, F, flags=1, seq=2**62), "bad_seq"),
        (struct.pack("<2sBBQdHH", b"SQ", 1, 2, 0, math.inf, 1, F) + b"\0" * 12, "bad_ts"),
    ],
)
def test_rejections_have_stable_reasons(payload: bytes, reason: str) -> None:
    assert reason_of(payload) == reason


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_no_exception_but_payload_error_escapes_for_any_bytes(payload: bytes) -> None:
    _decode_or_reject(payload)


@FUZZ
@given(st.binary(max_size=120))
def test_binary_looking_garbage_is_rejected_cleanly(tail: bytes) -> None:
    _decode_or_reject(b"SQ" + tail)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=25,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(["seq", "ts", "values", "x"]), json_values, max_size=4))
def test_no_exception_but_payload_error_escapes_for_any_json(doc: dict[str, Any]) -> None:
    step = _decode_or_reject(json.dumps(doc).encode())
    if step is not None:  # what passes is exactly what the engine accepts
        assert step.values.dtype == np.float32 and step.values.ndim == 2
        assert step.values.shape[1] == F and 1 <= step.values.shape[0] <= 8
        assert step.seq is None or (type(step.seq) is int and step.seq >= 0)
        assert step.ts is None or (type(step.ts) is float and math.isfinite(step.ts))


def _decode_or_reject(payload: bytes) -> Step | None:
    try:
        return DEC.decode("s", payload)
    except PayloadError as exc:
        assert exc.reason in codecs.REASONS
        return None


# -- prediction JSON -----------------------------------------------------------------------


def spec(task: str, **kw: Any) -> ModelSpec:
    base: dict[str, Any] = {
        "name": 'har "v"%s',
        "version": "7",
        "task": task,
        "cell": "gru",
        "layers": 1,
        "hidden": 4,
        "features": ("a", "b", "c"),
        "normalisation": Normalisation(mean=(0.0,) * 3, std=(1.0,) * 3),
        "state": recurrent_state("gru", 1, 4),
        "outputs": ("probs",) if task == "classify" else ("forecast",),
    }
    base.update(kw)
    return ModelSpec(**base)


def test_classify_prediction_is_json_with_exact_float32_probabilities() -> None:
    enc = PredictionEncoder(spec("classify", labels=("Walk%d", 'Run"', "Sit")))
    probs = np.array([[0.2, 0.3, 0.5], [0.1, 0.7, 0.2]], dtype=np.float32)
    step = Step("s", np.zeros((2, 3), np.float32), seq=10, ts=99.5)
    payload = enc.encode(Result(step, {"probs": probs}))
    assert payload is not None
    doc = json.loads(payload)
    assert doc["seq"] == 11  # the message's last row
    assert doc["ts"] == 99.5
    assert doc["label"] == 'Run"'
    assert list(doc["probs"]) == ["Walk%d", 'Run"', "Sit"]
    assert np.array(list(doc["probs"].values()), dtype=np.float32).tolist() == probs[1].tolist()
    assert (doc["model"], doc["version"]) == ('har "v"%s', "7")
    assert "resets" not in doc
    assert enc.label(Result(step, {"probs": probs})) == 1


def test_forecast_prediction_lists_each_target_over_the_horizon() -> None:
    enc = PredictionEncoder(
        spec("forecast", features=("a", "b", "c"), targets=("a", "c"), horizon=3)
    )
    fc = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2) / 7  # [T, horizon, targets]
    step = Step("s", np.zeros((2, 3), np.float32))
    payload = enc.encode(Result(step, {"forecast": fc}, resets=("idle", "seq_gap")))
    assert payload is not None
    doc = json.loads(payload)
    assert doc["seq"] is None and doc["ts"] is None
    assert np.array(doc["forecast"]["a"], dtype=np.float32).tolist() == fc[1, :, 0].tolist()
    assert np.array(doc["forecast"]["c"], dtype=np.float32).tolist() == fc[1, :, 1].tolist()
    assert doc["resets"] == ["idle", "seq_gap"]


def test_non_finite_outputs_are_not_written() -> None:
    enc = PredictionEncoder(spec("classify", labels=("x", "y", "z")))
    probs = np.array([[np.nan, 0.5, 0.5]], dtype=np.float32)
    step = Step("s", np.zeros((1, 3), np.float32))
    assert enc.encode(Result(step, {"probs": probs})) is None


def test_seq2seq_prediction_uses_the_forecast_format() -> None:
    enc = PredictionEncoder(
        spec("seq2seq", targets=("b",), horizon=4, window=8, outputs=("forecast",))
    )
    fc = np.linspace(0, 1, 4, dtype=np.float32).reshape(1, 4, 1)
    result = Result(Step("s", np.zeros((1, 3), np.float32)), {"forecast": fc})
    doc = json.loads(enc.encode(result) or b"")
    assert np.array(doc["forecast"]["b"], dtype=np.float32).tolist() == fc[0, :, 0].tolist()


@pytest.mark.parametrize(
    ("scores", "flag"),
    [([0.1, 0.9, 0.2], True), ([0.1, 0.2, 0.3], False), ([0.5], False), ([0.5000001], True)],
)
def test_anomaly_prediction_flags_the_worst_row_of_the_message(
    scores: list[float], flag: bool
) -> None:
    model = spec("anomaly", window=16, threshold=0.5, outputs=("score",))
    enc = PredictionEncoder(model)
    score = np.array(scores, dtype=np.float32)
    result = Result(Step("s", np.zeros((len(scores), 3), np.float32), seq=3), {"score": score})
    doc = json.loads(enc.encode(result) or b"")
    assert doc["seq"] == 3 + len(scores) - 1
    assert np.float32(doc["score"]) == score.max()
    assert doc["threshold"] == 0.5
    assert doc["anomaly"] is flag is bool(model.flags(score.max()))
    assert enc.label(result) == int(flag)
    nan = Result(result.step, {"score": np.array([np.nan, *scores[1:]], np.float32)})
    assert enc.encode(nan) is None
