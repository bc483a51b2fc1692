"""Proof of the training/serving contract for one exported model.

(a) Stepping the ONNX model one step at a time with carried state equals one call over
the whole sequence; (b) onnxruntime equals the PyTorch module it was exported from.
Both on the same inputs: real cases when data is given, else random inputs drawn
around the model's own normalisation (so every feature sees realistic magnitudes).
Outputs are compared absolutely; carried state absolutely below magnitude 1 and
relatively above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import checkpoint
from pipeline.model import StepModel

TOLERANCE = 1e-4


@dataclass(frozen=True)
class VerifyReport:
    stepwise_vs_full: float
    onnx_vs_torch: float | None
    cases: int
    steps: int
    tolerance: float = TOLERANCE

    @property
    def ok(self) -> bool:
        worst = max(self.stepwise_vs_full, self.onnx_vs_torch or 0.0)
        return bool(np.isfinite(worst) and worst <= self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stepwise_vs_full": self.stepwise_vs_full,
            "onnx_vs_torch": self.onnx_vs_torch,
            "cases": self.cases,
            "steps": self.steps,
            "tolerance": self.tolerance,
            "ok": self.ok,
        }


def random_inputs(model: StepModel, batch: int, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    norm = model.spec.normalisation
    z = rng.standard_normal((batch, steps, model.spec.n_features))
    return np.asarray(np.asarray(norm.mean) + z * np.asarray(norm.std), dtype=np.float32)


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _max_state_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Absolute below magnitude 1, relative above: an LSTM cell state can grow to ~100,
    where float32 rounding alone exceeds 1e-4 absolute after a few hundred steps."""
    return max(float(np.max(np.abs(a[k] - b[k]) / np.maximum(1.0, np.abs(b[k])))) for k in a)


def verify(
    model_path: Path,
    checkpoint_dir: Path | None = None,
    x: np.ndarray | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Compare stepwise ONNX, full-sequence ONNX and (with a checkpoint) PyTorch on ``x``."""
    model = StepModel.load(model_path)
    if x is None:
        x = random_inputs(model, batch=4, steps=50, seed=seed)
    batch, steps, _ = x.shape
    full_out, full_state = model.run(x, model.initial_state(batch))
    state = model.initial_state(batch)
    pieces: dict[str, list[np.ndarray]] = {k: [] for k in full_out}
    for t in range(steps):
        out, state = model.run(x[:, t : t + 1], state)
        for k, v in out.items():
            pieces[k].append(v)
    stepped = {k: np.concatenate(v, axis=1) for k, v in pieces.items()}
    stepwise = max(_max_diff(stepped, full_out), _max_state_diff(state, full_state))
    vs_torch: float | None = None
    if checkpoint_dir is not None:
        net, _ = checkpoint.load(checkpoint_dir)
        with torch.no_grad():
            out_t, state_t = net(torch.from_numpy(x), net.initial_state(batch))
        name = model.spec.outputs[0]
        torch_out = {name: out_t.numpy()}
        torch_state = {s.name: v.numpy() for s, v in zip(model.spec.state, state_t, strict=True)}
        vs_torch = max(
            _max_diff(torch_out, {name: full_out[name]}),
            _max_state_diff(torch_state, full_state),
        )
    return VerifyReport(stepwise, vs_torch, cases=batch, steps=steps)
