"""Named-field payloads: ``values`` keyed by the model's feature names, fuzzed."""

from __future__ import annotations

import json
import math
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from pipeline.contract import METADATA_KEY
from pipeline.daemon import app, config, service
from pipeline.engine.engine import Step
from pipeline.errors import PayloadError
from pipeline.model import StepModel
from pipeline.sources import codecs
from pipeline.sources.codecs import Decoder
from pipeline.telemetry.metrics import Metrics

NAMES = ("temp", "hum", "seq")  # a feature may be called "seq": it lives inside "values"
DEC = Decoder(3, max_payload_bytes=4096, max_steps=8, features=NAMES)


def reject(doc: dict[str, Any], decoder: Decoder = DEC) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        decoder.decode("s", json.dumps(doc).encode())
    assert info.value.reason in codecs.REASONS
    return info.value


def test_named_step_is_the_positional_step_in_the_models_order() -> None:
    named = DEC.decode("s", b'{"seq": 4, "ts": 2, "values": {"hum": 40, "seq": -1, "temp": 21.5}}')
    positional = DEC.decode("s", b'{"seq": 4, "ts": 2, "values": [21.5, 40, -1]}')
    assert (named.seq, named.ts) == (4, 2.0)
    assert named.values.dtype == np.float32 and named.values.flags.c_contiguous
    np.testing.assert_array_equal(named.values, positional.values)
    np.testing.assert_array_equal(named.values, [[21.5, 40.0, -1.0]])


def test_named_columns_are_several_steps() -> None:
    doc = {"values": {"temp": [1, 2, 3], "seq": [7, 8, 9], "hum": [4, 5, 6]}}
    step = DEC.decode("s", json.dumps(doc).encode())
    assert step.values.flags.c_contiguous
    np.testing.assert_array_equal(step.values, [[1, 4, 7], [2, 5, 8], [3, 6, 9]])


def test_a_missing_feature_is_refused_and_named() -> None:
    exc = reject({"values": {"temp": 1, "seq": 2}})
    assert exc.reason == "missing_feature"
    assert '"hum"' in exc.detail and '"temp", "hum", "seq"' in exc.detail
    assert reject({"values": {}}).reason == "missing_feature"


def test_an_unknown_feature_is_refused_even_when_all_are_there() -> None:
    exc = reject({"values": {"temp": 1, "hum": 2, "seq": 3, "Temp": 1}})
    assert exc.reason == "unknown_feature" and '"Temp"' in exc.detail


def test_a_flood_of_unknown_names_gives_a_short_detail() -> None:
    doc = {"values": {"temp": 1, "hum": 2, "seq": 3, **{f"k{i}" * 50: 0 for i in range(500)}}}
    exc = reject(doc, Decoder(3, max_payload_bytes=1 << 20, max_steps=8, features=NAMES))
    assert exc.reason == "unknown_feature"
    assert len(exc.detail) < 1000 and "and 492 more" in exc.detail


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"temp": 1, "hum": [2], "seq": 3}, "bad_shape"),
        ({"temp": [1, 2], "hum": [2], "seq": [3, 4]}, "bad_shape"),
        ({"temp": [], "hum": [], "seq": []}, "bad_shape"),
        ({"temp": "1", "hum": 2, "seq": 3}, "bad_shape"),
        ({"temp": None, "hum": 2, "seq": 3}, "bad_shape"),
        ({"temp": True, "hum": False, "seq": True}, "bad_shape"),
        ({"temp": {"a": 1}, "hum": 2, "seq": 3}, "bad_shape"),
        ({"temp": [[1]], "hum": [[2]], "seq": [[3]]}, "bad_shape"),
        ({"temp": [1] * 9, "hum": [2] * 9, "seq": [3] * 9}, "too_long"),
    ],
)
def test_bad_named_values_have_the_positional_reasons(values: dict[str, Any], reason: str) -> None:
    assert reject({"values": values}).reason == reason


def test_a_decoder_without_names_takes_positional_values_only() -> None:
    plain = Decoder(3, max_payload_bytes=4096, max_steps=8)
    assert reject({"values": {"temp": 1, "hum": 2, "seq": 3}}, plain).reason == "bad_shape"


def test_names_must_match_the_feature_count() -> None:
    with pytest.raises(ValueError, match="2 feature names for 3"):
        Decoder(3, max_payload_bytes=64, max_steps=1, features=("a", "b"))


# -- fuzzing -------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=4)
)
column = leaf | st.lists(leaf, max_size=10) | st.lists(st.lists(leaf, max_size=3), max_size=3)
keys = st.sampled_from([*NAMES, "Temp", "", "values"]) | st.text(max_size=6)


@FUZZ
@given(st.dictionaries(keys, column, max_size=6))
def test_any_named_values_decode_to_what_the_engine_takes_or_a_reason(
    values: dict[str, Any],
) -> None:
    try:
        step = DEC.decode("s", json.dumps({"seq": 1, "values": values}).encode())
    except PayloadError as exc:
        assert exc.reason in codecs.REASONS
        if set(values) >= set(NAMES) and len(values) > len(NAMES):
            assert exc.reason == "unknown_feature"
        return
    assert set(values) == set(NAMES)
    assert step.values.dtype == np.float32 and step.values.ndim == 2
    assert step.values.shape[1] == 3 and 1 <= step.values.shape[0] <= 8


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@FUZZ
@given(
    st.lists(st.lists(finite, min_size=3, max_size=3), min_size=1, max_size=8),
    st.permutations(list(range(3))),
)
def test_named_columns_in_any_key_order_equal_the_positional_rows(
    rows: list[list[float]], order: list[int]
) -> None:
    columns = {NAMES[j]: [row[j] for row in rows] for j in order}
    named = DEC.decode("s", json.dumps({"values": columns}).encode())
    positional = DEC.decode("s", json.dumps({"values": rows}).encode())
    np.testing.assert_array_equal(named.values, positional.values)
    assert all(math.isfinite(v) for v in named.values.ravel())
    assert isinstance(named, Step)


# -- reload --------------------------------------------------------------------------------


def test_a_reload_to_other_feature_names_is_refused(tmp_path: Path) -> None:
    """Named payloads map by the names the decoder was built with: a model that names
    (or orders) its inputs differently would be fed the wrong columns."""
    from models.export import export_random

    served = tmp_path / "model.onnx"
    export_random(served, n_features=3)
    proto = onnx.load(served)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            doc = json.loads(prop.value)
            doc["features"] = ["f1", "f0", "f2"]  # same width, other order
            prop.value = json.dumps(doc)
    renamed = tmp_path / "renamed.onnx"
    onnx.save(proto, renamed)
    path = tmp_path / "daemon.toml"
    path.write_text(f'[model]\npath = "{served}"\n')
    settings = config.load(path)
    old = app.load_model(settings)
    path.write_text(f'[model]\npath = "{renamed}"\n')
    metrics = Metrics(CollectorRegistry(), reload_results=service.RELOAD_RESULTS)

    swapped: list[StepModel] = []

    def swap(route: str, model: StepModel) -> Future[bool]:  # the engine's side: at once
        swapped.append(model)
        done: Future[bool] = Future()
        done.set_result(True)
        return done

    reloader = service.Reloader(
        settings,
        {"default": old},
        load_settings=config.load,
        load_model=app.load_route_model,
        check=app.check_route_model,
        swap=swap,
        metrics={"default": metrics},
        notifier=service.Notifier(None),
    )
    assert reloader() is False
    assert swapped == [] and reloader.model is old
    failed = metrics.registry.get_sample_value(
        "seqstream_model_reloads_total", {"model": "default", "result": "failed"}
    )
    assert failed == 1
