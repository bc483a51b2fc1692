"""The metadata contract: round trip, and every invalid field named in the error."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from pipeline.contract import ModelSpec, Normalisation, StateSpec, recurrent_state
from pipeline.errors import ContractError


def _spec(**changes: Any) -> ModelSpec:
    base = ModelSpec(
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
    return replace(base, **changes)


def test_round_trip_through_json() -> None:
    spec = _spec(metrics={"test": {"accuracy": 1.0}}, sample_rate_hz=10.0)
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert [s.name for s in spec.state] == ["h", "c"]
    assert spec.state[0].batch_axis == 1 and spec.state[0].row_shape == (2, 8)
    assert spec.state_signature == (("h", (2, 8), "float32"), ("c", (2, 8), "float32"))


def test_gru_has_only_h() -> None:
    assert [s.name for s in recurrent_state("gru", 1, 4)] == ["h"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"task": "dance"}, "'task'"),
        ({"cell": "transformer"}, "'cell'"),
        ({"labels": ("x",)}, "'labels'"),
        ({"outputs": ("forecast",)}, "'outputs'"),
        ({"normalisation": Normalisation((0.0,), (1.0, 1.0))}, "'normalisation.mean'"),
        ({"normalisation": Normalisation((0.0, 0.0), (1.0, 0.0))}, "'normalisation.std'"),
        ({"opset": 11}, "'opset'"),
        (
            {"task": "forecast", "outputs": ("forecast",), "targets": ("zz",), "horizon": 1},
            "'targets'",
        ),
        (
            {"task": "forecast", "outputs": ("forecast",), "targets": ("a",), "horizon": 0},
            "'horizon'",
        ),
    ],
)
def test_invalid_fields_are_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ContractError, match=field):
        _spec(**change)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d.update(surprise=1), "unknown field"),
        (lambda d: d.pop("features"), "missing field 'features'"),
        (lambda d: d["state"][0].update(shape=[2, 8]), "state\\[0\\].shape"),
        (lambda d: d["state"][1].update(shape=[2, "batch", -1]), "state\\[1\\].shape"),
        (lambda d: d.update(state="h"), "'state' must be a list"),
        (lambda d: d["normalisation"].update(mean="0"), "normalisation.mean"),
        (lambda d: d.update(features=[1, 2]), "'features'"),
    ],
)
def test_malformed_documents_are_refused_with_the_field(mutate: Any, message: str) -> None:
    doc = json.loads(_spec().to_json())
    mutate(doc)
    with pytest.raises(ContractError, match=message):
        ModelSpec.from_json(json.dumps(doc))


def test_not_json_at_all() -> None:
    with pytest.raises(ContractError, match="not valid JSON"):
        ModelSpec.from_json("{nope")
    with pytest.raises(ContractError, match="JSON object"):
        ModelSpec.from_json("[1, 2]")


def _anomaly(**changes: Any) -> ModelSpec:
    base = _spec(
        task="anomaly",
        outputs=("score",),
        labels=(),
        state=(StateSpec("win", "win_out", ("batch", 16, 2)),),
        window=16,
        threshold=0.5,
    )
    return replace(base, **changes)


def _seq2seq(**changes: Any) -> ModelSpec:
    base = _spec(
        task="seq2seq",
        outputs=("forecast",),
        labels=(),
        targets=("b",),
        horizon=24,
        window=48,
        state=(*recurrent_state("lstm", 2, 8), StateSpec("mem", "mem_out", ("batch", 48, 10))),
    )
    return replace(base, **changes)


def test_new_tasks_round_trip_and_describe_their_outputs() -> None:
    for spec in (_anomaly(), _seq2seq()):
        assert ModelSpec.from_json(spec.to_json()) == spec
    assert _anomaly().output_shapes == {"score": ()}
    assert _seq2seq().output_shapes == {"forecast": (24, 1)}
    assert _spec().output_shapes == {"probs": (2,)}
    assert _seq2seq().state[-1].batch_axis == 0 and _seq2seq().state[-1].row_shape == (48, 10)


def test_anomaly_flags_apply_the_metadata_threshold() -> None:
    spec = _anomaly(threshold=0.5)
    assert spec.flags(np.array([0.1, 0.5, 0.7])).tolist() == [False, False, True]
    assert bool(spec.flags(2.0))
    with pytest.raises(ContractError, match="no anomaly threshold"):
        _spec().flags(1.0)


@pytest.mark.parametrize(
    ("make", "change", "field"),
    [
        (_anomaly, {"window": 0}, "'window'"),
        (_anomaly, {"threshold": None}, "'threshold'"),
        (_anomaly, {"threshold": math.inf}, "'threshold'"),
        (_anomaly, {"outputs": ("score", "flag")}, "'outputs'"),
        (_seq2seq, {"window": 0}, "'window'"),
        (_seq2seq, {"targets": ()}, "'targets'"),
        (_seq2seq, {"targets": ("zz",)}, "'targets'"),
        (_seq2seq, {"horizon": 0}, "'horizon'"),
        (_spec, {"window": -1}, "'window'"),
    ],
)
def test_new_task_fields_are_validated(make: Any, change: dict[str, Any], field: str) -> None:
    with pytest.raises(ContractError, match=field):
        make(**change)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(window="16"), "'window' must be an integer"),
        (lambda d: d.update(window=True), "'window' must be an integer"),
        (lambda d: d.update(threshold="high"), "'threshold' must be a number or null"),
    ],
)
def test_new_fields_have_json_kinds(mutate: Any, message: str) -> None:
    doc = json.loads(_anomaly().to_json())
    mutate(doc)
    with pytest.raises(ContractError, match=message):
        ModelSpec.from_json(json.dumps(doc))


def test_schema_1_documents_without_the_new_fields_still_load() -> None:
    doc = json.loads(_spec().to_json())
    del doc["window"], doc["threshold"]
    spec = ModelSpec.from_json(json.dumps(doc))
    assert spec.window == 0 and spec.threshold is None and spec.schema_version == 1
