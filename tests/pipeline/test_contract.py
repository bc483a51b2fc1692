"""The metadata contract: round trip, and every invalid field named in the error."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from pipeline.contract import ModelSpec, Normalisation, recurrent_state
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
