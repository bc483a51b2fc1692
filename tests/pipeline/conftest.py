"""Small random step models for runtime tests: every cell type and every task.

Exported once per session with :func:`models.export.export_random` (real ONNX files
under the contract, real onnxruntime sessions); the runtime under test never sees torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.contract import CELLS, TASKS
from pipeline.engine.engine import Rejected, Result
from pipeline.model import StepModel

KINDS = [(cell, task) for cell in CELLS for task in TASKS]
N_FEATURES = 6

ModelFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def random_model_path(tmp_path_factory: pytest.TempPathFactory) -> ModelFactory:
    """``make(cell, task, hidden=16, seed=0)`` -> path of an exported random model (cached)."""
    from models.export import export_random

    root = tmp_path_factory.mktemp("random-models")
    cache: dict[tuple[str, str, int, int], Path] = {}

    def make(cell: str = "lstm", task: str = "classify", hidden: int = 16, seed: int = 0) -> Path:
        key = (cell, task, hidden, seed)
        if key not in cache:
            out = root / f"{cell}-{task}-h{hidden}-s{seed}.onnx"
            export_random(
                out,
                cell=cell,
                task=task,
                n_features=N_FEATURES,
                hidden=hidden,
                layers=2,
                n_classes=4,
                horizon=3,
                seed=seed,
            )
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session", params=KINDS, ids=[f"{c}-{t}" for c, t in KINDS])
def any_model(request: pytest.FixtureRequest, random_model_path: ModelFactory) -> StepModel:
    """One loaded model per (cell, task)."""
    cell, task = request.param
    return StepModel.load(random_model_path(cell, task))


@pytest.fixture(scope="session")
def lstm_model(random_model_path: ModelFactory) -> StepModel:
    return StepModel.load(random_model_path("lstm", "classify"))


Offline = Callable[[StepModel, np.ndarray], dict[str, np.ndarray]]


@pytest.fixture(scope="session")
def offline() -> Offline:
    """``offline(model, values)``: a whole ``[T, F]`` sequence in one call from the initial
    state, the reference every streamed run must match."""

    def run(model: StepModel, values: np.ndarray) -> dict[str, np.ndarray]:
        outputs, _ = model.run(values[None].astype(np.float32), model.initial_state(1))
        return {k: v[0] for k, v in outputs.items()}

    return run


# -- helpers shared by the engine and worker tests ----------------------------------------

F = N_FEATURES
ATOL = 1e-5


class Recorder:
    """An engine observer that keeps everything it is told."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.resets: Counter[str] = Counter()
        self.rejects: Counter[str] = Counter()

    def on_batch(self, size: int, seconds: float) -> None:
        assert seconds >= 0
        self.batches.append(size)

    def on_reset(self, reason: str, count: int = 1) -> None:
        self.resets[reason] += count

    def on_reject(self, reason: str) -> None:
        self.rejects[reason] += 1


def data(rng: np.random.Generator, t: int) -> np.ndarray:
    return rng.standard_normal((t, F)).astype(np.float32)


def only_output(result: Result | Rejected) -> np.ndarray:
    assert isinstance(result, Result), result
    (value,) = result.outputs.values()
    return value


TRIP = 50.0  # a first feature above this makes the model below fail inside onnxruntime


@pytest.fixture(scope="session")
def failing_model(
    random_model_path: ModelFactory, tmp_path_factory: pytest.TempPathFactory
) -> StepModel:
    """The LSTM classifier with one more path from ``x`` to ``probs``: a Gather whose index
    is 1 where feature 0 exceeds TRIP, out of bounds of its one-element table, so
    onnxruntime itself raises on such a batch (its own bounds check; nothing mocked).
    Elsewhere it adds 0.0: outputs are the plain model's."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(random_model_path("lstm", "classify")))
    g = m.graph
    (softmax,) = [n for n in g.node if "probs" in n.output]
    softmax.output[0] = "probs_raw"
    consts = {
        "trip_feature": helper.make_tensor("trip_feature", TensorProto.INT64, [], [0]),
        "trip_at": helper.make_tensor("trip_at", TensorProto.FLOAT, [], [TRIP]),
        "trip_table": helper.make_tensor("trip_table", TensorProto.FLOAT, [1], [0.0]),
        "trip_axis": helper.make_tensor("trip_axis", TensorProto.INT64, [1], [2]),
    }
    g.initializer.extend(consts.values())
    g.node.extend([
        helper.make_node("Gather", ["x", "trip_feature"], ["trip_x0"], axis=2),
        helper.make_node("Greater", ["trip_x0", "trip_at"], ["trip_over"]),
        helper.make_node("Cast", ["trip_over"], ["trip_index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["trip_table", "trip_index"], ["trip_zero"]),
        helper.make_node("Unsqueeze", ["trip_zero", "trip_axis"], ["trip_zero3"]),
        helper.make_node("Add", ["probs_raw", "trip_zero3"], ["probs"]),
    ])  # fmt: skip
    path = tmp_path_factory.mktemp("failing") / "trip.onnx"
    onnx.save(m, str(path))
    return StepModel.load(path)
