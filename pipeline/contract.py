"""The ONNX step-model contract: the one document shared by export and runtime.

``seqstream export`` writes a :class:`ModelSpec` as JSON into the ONNX file's
``metadata_props["seqstream"]``; the runtime parses it with :meth:`ModelSpec.from_json`
and refuses anything it does not understand, naming the field. Nothing else about a
model is known to the runtime, so it needs no training code.

The graph a spec describes:

* input ``x``: float32 ``[batch, time, features]`` in **raw units**. Normalisation
  (``normalisation``) is applied inside the graph; the metadata records it so that
  people and tools can see it, the runtime never applies it again.
* one input per :class:`StateSpec` (``h``, ``c`` ...) and one output per state
  (``h_out``, ``c_out`` ...), same shapes; the batch axis is marked ``"batch"``.
* the task outputs (``outputs``), each ``[batch, time, ...]``: one value per step.

Task outputs (schema version 1):

* ``classify``: ``probs`` ``[batch, time, len(labels)]``, class probabilities after
  each step. A sequence's label is the prediction at its last step.
* ``forecast``: ``forecast`` ``[batch, time, horizon, len(targets)]`` in raw units:
  at step t, the values of the target channels at t+1 .. t+horizon.
* ``seq2seq``: the same ``forecast`` output, from an encoder-decoder whose attention
  reads the last ``window`` steps (carried as a state tensor, e.g. ``mem``).
* ``anomaly``: ``score`` ``[batch, time]``, how surprising the last ``window`` steps
  were (what it carries is the model's business: the reference model's ``h``/``c``,
  last prediction and raw scores, ``win``). A step is anomalous when
  ``score > threshold``; ``threshold`` (calibrated on training data) lives only in the
  metadata, and :meth:`ModelSpec.flags` is the one place that applies it, so it can be
  re-tuned without re-exporting the graph.

Every output's per-step shape (after ``[batch, time]``) is :attr:`ModelSpec.output_shapes`:
runtimes size their buffers from it and need no per-task code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from pipeline.errors import ContractError

SCHEMA_VERSION = 1
METADATA_KEY = "seqstream"
BATCH = "batch"
TASKS: tuple[str, ...] = ("classify", "forecast", "anomaly", "seq2seq")
CELLS: tuple[str, ...] = ("lstm", "gru", "rnn")
TASK_OUTPUTS: dict[str, tuple[str, ...]] = {
    "classify": ("probs",),
    "forecast": ("forecast",),
    "anomaly": ("score",),
    "seq2seq": ("forecast",),
}


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor carried between steps.

    ``shape`` holds ints and exactly one ``"batch"``; the runtime keeps one row per
    stream (the shape without the batch axis) and gathers rows along ``batch_axis``.
    """

    name: str
    output: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    init: float = 0.0

    @property
    def batch_axis(self) -> int:
        return self.shape.index(BATCH)

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one stream's state (the batch axis removed)."""
        return tuple(int(d) for d in self.shape if d != BATCH)


@dataclass(frozen=True)
class Normalisation:
    """Per-feature affine normalisation ``(x - mean) / std``, computed on training data only."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_graph: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """Everything the runtime needs to know about an exported step model."""

    name: str
    version: str
    task: str
    cell: str
    layers: int
    hidden: int
    features: tuple[str, ...]
    normalisation: Normalisation
    state: tuple[StateSpec, ...]
    outputs: tuple[str, ...]
    labels: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    horizon: int = 0
    season: int = 1
    sample_rate_hz: float | None = None
    input: str = "x"
    opset: int = 17
    data_sha256: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Audio models: the front end that turns samples into ``features`` (log-mel settings,
    # pipeline.features.logmel.LogMelConfig); ``sample_rate_hz`` is then the audio rate.
    frontend: Mapping[str, Any] | None = None
    # anomaly: steps reconstructed at every step; seq2seq: steps the attention reads.
    window: int = 0
    # anomaly: scores above this are anomalous (see ``flags``).
    threshold: float | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def state_signature(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """Two models with equal signatures can continue each other's carried state."""
        return tuple((s.name, s.row_shape, s.dtype) for s in self.state)

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-step shape of each task output (what follows ``[batch, time]``)."""
        shapes: dict[str, tuple[int, ...]] = {
            "probs": (len(self.labels),),
            "forecast": (self.horizon, len(self.targets)),
            "score": (),
        }
        return {name: shapes[name] for name in self.outputs}

    def flags(self, score: Any) -> Any:
        """Anomaly flags for ``score`` (array or number): ``score > threshold``."""
        if self.threshold is None:
            raise ContractError(f"model {self.name!r} has no anomaly threshold")
        return score > self.threshold

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting
            raise ContractError(f"metadata '{METADATA_KEY}' is not valid JSON: {exc}") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> ModelSpec:
        if not isinstance(doc, dict):
            raise ContractError(f"metadata '{METADATA_KEY}' must be a JSON object")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ContractError(
                f"metadata field 'schema_version' is {version!r}; this runtime reads "
                f"version {SCHEMA_VERSION}"
            )
        unknown = sorted(set(doc) - {f.name for f in fields(cls)})
        if unknown:
            raise ContractError(f"metadata has unknown field(s): {', '.join(unknown)}")
        for f in fields(cls):
            required = f.default is MISSING and f.default_factory is MISSING
            if required and f.name not in doc:
                raise ContractError(f"metadata is missing field {f.name!r}")
        for key, kind in _JSON_KINDS.items():  # bool is not an int here; JSON has both
            if key in doc and type(doc[key]) not in kind:
                raise ContractError(f"metadata field {key!r} must be {_KIND_NAMES[kind]}")
        try:
            norm = doc["normalisation"]
            states = doc["state"]
            if not isinstance(norm, dict):
                raise ContractError("metadata field 'normalisation' must be an object")
            if not isinstance(states, list):
                raise ContractError("metadata field 'state' must be a list")
            kwargs = dict(doc)
            kwargs["normalisation"] = Normalisation(
                mean=_floats(norm.get("mean"), "normalisation.mean"),
                std=_floats(norm.get("std"), "normalisation.std"),
                in_graph=bool(norm.get("in_graph", True)),
            )
            kwargs["state"] = tuple(_state(s, i) for i, s in enumerate(states))
            for key in ("features", "outputs", "labels", "targets"):
                if key in kwargs:
                    kwargs[key] = _strings(kwargs[key], key)
            return cls(**kwargs)
        except KeyError as exc:
            raise ContractError(f"metadata is missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. float("x"), float(10**400)
            raise ContractError(f"metadata is malformed: {exc}") from None


# The JSON types of the scalar and object fields (lists are checked where they are read).
_STR: tuple[type, ...] = (str,)
_INT: tuple[type, ...] = (int,)
_OPT_NUMBER: tuple[type, ...] = (int, float, type(None))
_OBJECT: tuple[type, ...] = (dict,)
_OPT_OBJECT: tuple[type, ...] = (dict, type(None))
_KIND_NAMES = {
    _STR: "a string",
    _INT: "an integer",
    _OPT_NUMBER: "a number or null",
    _OBJECT: "an object",
    _OPT_OBJECT: "an object or null",
}
_JSON_KINDS: dict[str, tuple[type, ...]] = {
    "name": _STR,
    "version": _STR,
    "task": _STR,
    "cell": _STR,
    "layers": _INT,
    "hidden": _INT,
    "horizon": _INT,
    "season": _INT,
    "sample_rate_hz": _OPT_NUMBER,
    "input": _STR,
    "opset": _INT,
    "data_sha256": _STR,
    "metrics": _OBJECT,
    "extra": _OBJECT,
    "frontend": _OPT_OBJECT,
    "window": _INT,
    "threshold": _OPT_NUMBER,
}


def _floats(value: Any, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise ContractError(f"metadata field '{where}' must be a list of numbers")
    return tuple(float(v) for v in value)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ContractError(f"metadata field '{where}' must be a list of strings")
    return tuple(value)


def _state(doc: Any, i: int) -> StateSpec:
    where = f"state[{i}]"
    if not isinstance(doc, dict):
        raise ContractError(f"metadata field '{where}' must be an object")
    try:
        shape = doc["shape"]
        if not isinstance(shape, list) or not all(
            (isinstance(d, int) and not isinstance(d, bool) and d > 0) or d == BATCH for d in shape
        ):
            raise ContractError(
                f"metadata field '{where}.shape' must list positive ints and one 'batch'"
            )
        return StateSpec(
            name=str(doc["name"]),
            output=str(doc["output"]),
            shape=tuple(shape),
            dtype=str(doc.get("dtype", "float32")),
            init=float(doc.get("init", 0.0)),
        )
    except KeyError as exc:
        raise ContractError(f"metadata field '{where}' is missing {exc.args[0]!r}") from None


def _check(cond: bool, field_name: str, problem: str) -> None:
    if not cond:
        raise ContractError(f"metadata field '{field_name}' {problem}")


def _validate(spec: ModelSpec) -> None:
    _check(spec.task in TASKS, "task", f"is {spec.task!r}; expected one of {', '.join(TASKS)}")
    _check(spec.cell in CELLS, "cell", f"is {spec.cell!r}; expected one of {', '.join(CELLS)}")
    _check(spec.layers >= 1, "layers", "must be >= 1")
    _check(spec.hidden >= 1, "hidden", "must be >= 1")
    _check(len(spec.features) >= 1, "features", "must name at least one feature")
    _check(spec.input == "x", "input", "must be 'x'")
    n = len(spec.features)
    _check(len(spec.normalisation.mean) == n, "normalisation.mean", f"must have {n} values")
    _check(len(spec.normalisation.std) == n, "normalisation.std", f"must have {n} values")
    _check(
        all(math.isfinite(s) and s > 0 for s in spec.normalisation.std),
        "normalisation.std",
        "must be finite and > 0",
    )
    _check(len(spec.state) >= 1, "state", "must list at least one state tensor")
    names: set[str] = set()
    for i, s in enumerate(spec.state):
        _check(s.shape.count(BATCH) == 1, f"state[{i}].shape", "must mark exactly one 'batch' axis")
        _check(s.dtype == "float32", f"state[{i}].dtype", "must be 'float32'")
        _check(math.isfinite(s.init), f"state[{i}].init", "must be finite")
        for nm in (s.name, s.output):
            _check(nm not in names and nm != spec.input, f"state[{i}]", f"reuses the name {nm!r}")
            names.add(nm)
    expected = TASK_OUTPUTS[spec.task]
    _check(
        tuple(spec.outputs) == expected,
        "outputs",
        f"is {list(spec.outputs)}; task {spec.task!r} needs {list(expected)}",
    )
    if spec.task == "classify":
        _check(len(spec.labels) >= 2, "labels", "must name at least two classes")
        _check(len(set(spec.labels)) == len(spec.labels), "labels", "must be unique")
    if spec.task in ("forecast", "seq2seq"):
        _check(len(spec.targets) >= 1, "targets", "must name at least one target channel")
        _check(spec.horizon >= 1, "horizon", "must be >= 1")
        _check(all(t in spec.features for t in spec.targets), "targets", "must be among 'features'")
    if spec.task in ("anomaly", "seq2seq"):
        _check(spec.window >= 1, "window", f"must be >= 1 for task {spec.task!r}")
    if spec.task == "anomaly":
        _check(
            spec.threshold is not None and math.isfinite(spec.threshold),
            "threshold",
            "must be a finite number for task 'anomaly'",
        )
    _check(spec.window >= 0, "window", "must be >= 0")
    _check(spec.season >= 1, "season", "must be >= 1")
    _check(spec.sample_rate_hz is None or spec.sample_rate_hz > 0, "sample_rate_hz", "must be > 0")
    if spec.frontend is not None:
        _check_frontend(spec)
    _check(spec.opset >= 17, "opset", "must be >= 17")


def recurrent_state(cell: str, layers: int, hidden: int) -> tuple[StateSpec, ...]:
    """The state specs of a stacked recurrent core (``[layers, batch, hidden]``)."""
    shape: tuple[int | str, ...] = (layers, BATCH, hidden)
    specs = [StateSpec("h", "h_out", shape)]
    if cell == "lstm":
        specs.append(StateSpec("c", "c_out", shape))
    return tuple(specs)


def _check_frontend(spec: ModelSpec) -> None:
    from pipeline.features.logmel import LogMelConfig  # numpy only, like this module

    try:
        cfg = LogMelConfig.from_dict(spec.frontend or {})
    except ValueError as exc:
        raise ContractError(f"metadata field 'frontend': {exc}") from None
    _check(
        spec.sample_rate_hz == cfg.sample_rate_hz,
        "sample_rate_hz",
        f"is {spec.sample_rate_hz}; the frontend reads {cfg.sample_rate_hz} Hz audio",
    )
    _check(
        len(spec.features) == cfg.n_mels,
        "features",
        f"has {len(spec.features)} names; the frontend makes {cfg.n_mels} mel bands",
    )
