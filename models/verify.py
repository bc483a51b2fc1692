"""Proof of the training/serving contract for one exported model.

(a) Stepping the ONNX model one step at a time with carried state equals one call over
the whole sequence; (b) onnxruntime equals the PyTorch module it was exported from;
(c) for an int8 model, how far it is from the float model it was quantised from.
All on the same inputs: real cases when data is given, else random inputs drawn
around the model's own normalisation (so every feature sees realistic magnitudes).
Outputs are compared absolutely; carried state absolutely below magnitude 1 and
relatively above it.

A quantised model cannot meet 1e-4: onnxruntime's dynamic quantisation rounds the
weights to int8 and each call's activations to 8 bits over that call's own range, so
its outputs depend on what else is in the call (one call over a whole series with an
outage spans a far wider range than one step). (a) is therefore reported but not held,
and (b) and (c) compare the int8 model fed step by step, as it is served, with PyTorch
and with the float model. The figure held is the 99th percentile over every output
value of ``|a - b| / max(1, max |reference|)`` (one borderline step of a classifier can
move by 0.2 while its label does not change), to :data:`QUANTIZED_TOLERANCE`; the
largest such difference, and the float model fed in one call, are reported beside it.
The float model keeps :data:`TOLERANCE` on the largest difference everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import checkpoint
from pipeline.errors import ModelError
from pipeline.model import StepModel

TOLERANCE = 1e-4
# int8 weights and 8-bit activations: about 1/256 of a tensor's range per rounding; a
# few roundings through a recurrence stay within a few percent of the output's size.
# Measured on the trained models (99th percentile / largest, stepping): water-flow
# forecaster 0.0004 / 0.0008, seq2seq 0.0007 / 0.017, BasicMotions classifier 0.010 /
# 0.055 (0.66 fed in one call; accuracy unchanged), mitdb anomaly score 0.13 / 0.17 (a
# squared error doubles relative errors; ROC AUC unchanged), which fails here: judge an
# int8 model by `eval --reference` too.
QUANTIZED_TOLERANCE = 0.05
QUANTIZED_PERCENTILE = 99.0


@dataclass(frozen=True)
class VerifyReport:
    stepwise_vs_full: float
    onnx_vs_torch: float | None
    cases: int
    steps: int
    tolerance: float = TOLERANCE
    quantized: bool = False
    vs_float: float | None = None  # int8 vs the float model (--reference), as held
    detail: dict[str, float | None] | None = None  # int8: the figures reported beside

    @property
    def ok(self) -> bool:
        held = [self.onnx_vs_torch or 0.0, self.vs_float or 0.0]
        if not self.quantized:
            held.append(self.stepwise_vs_full)
        worst = max(held)
        return bool(np.isfinite(worst) and worst <= self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "stepwise_vs_full": self.stepwise_vs_full,
            "onnx_vs_torch": self.onnx_vs_torch,
            "cases": self.cases,
            "steps": self.steps,
            "tolerance": self.tolerance,
            "ok": self.ok,
        }
        if self.quantized:
            doc["quantized"] = True
            doc["vs_float"] = self.vs_float
            doc["measure"] = (
                f"p{QUANTIZED_PERCENTILE:g} of |a - b| / max(1, max |reference|), "
                "stepping as served; stepwise_vs_full is not held"
            )
            doc |= self.detail or {}
        return doc


def random_inputs(model: StepModel, batch: int, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    norm = model.spec.normalisation
    z = rng.standard_normal((batch, steps, model.spec.n_features))
    return np.asarray(np.asarray(norm.mean) + z * np.asarray(norm.std), dtype=np.float32)


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _relative(a: dict[str, np.ndarray], b: dict[str, np.ndarray], q: float = 100.0) -> float:
    """Percentile ``q`` of ``|a - b|`` relative to the size of ``b``, worst output."""
    worst = 0.0
    for k in a:
        d = np.abs(a[k] - b[k]) / max(1.0, float(np.max(np.abs(b[k]))))
        worst = max(worst, float(np.percentile(d, q)))
    return worst


def _max_state_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Absolute below magnitude 1, relative above: an LSTM cell state can grow to ~100,
    where float32 rounding alone exceeds 1e-4 absolute after a few hundred steps."""
    return max(float(np.max(np.abs(a[k] - b[k]) / np.maximum(1.0, np.abs(b[k])))) for k in a)


def _stepped(model: StepModel, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    state = model.initial_state(x.shape[0])
    pieces: dict[str, list[np.ndarray]] = {k: [] for k in model.spec.outputs}
    for t in range(x.shape[1]):
        out, state = model.run(np.ascontiguousarray(x[:, t : t + 1]), state)
        for k, v in out.items():
            pieces[k].append(v)
    return {k: np.concatenate(v, axis=1) for k, v in pieces.items()}, state


def verify(
    model_path: Path,
    checkpoint_dir: Path | None = None,
    x: np.ndarray | None = None,
    seed: int = 0,
    reference: Path | None = None,
    tolerance: float | None = None,
) -> VerifyReport:
    """Compare stepwise ONNX, full-sequence ONNX, (with a checkpoint) PyTorch and (with
    ``reference``, the float model of a quantised one) the float ONNX model on ``x``.

    ``tolerance`` overrides the default (:data:`TOLERANCE`, or :data:`QUANTIZED_TOLERANCE`
    for an int8 model)."""
    model = StepModel.load(model_path)
    quantized = "quantization" in model.spec.extra
    if x is None:
        x = random_inputs(model, batch=4, steps=50, seed=seed)
    batch, steps, _ = x.shape
    full_out, full_state = model.run(x, model.initial_state(batch))
    stepped, state = _stepped(model, x)
    if quantized:
        stepwise = _relative(stepped, full_out)
    else:
        stepwise = max(_max_diff(stepped, full_out), _max_state_diff(state, full_state))
    detail: dict[str, float | None] = {}
    vs_torch: float | None = None
    if checkpoint_dir is not None:
        net, _ = checkpoint.load(checkpoint_dir)
        with torch.no_grad():
            outs, state_t = net.outputs(torch.from_numpy(x), net.initial_state(batch))
        torch_out = {k: v.numpy() for k, v in zip(model.spec.outputs, outs, strict=True)}
        torch_state = {s.name: v.numpy() for s, v in zip(model.spec.state, state_t, strict=True)}
        if quantized:  # by outputs only: an int8 model's state is not the float one's
            vs_torch = _relative(stepped, torch_out, QUANTIZED_PERCENTILE)
        else:
            vs_torch = max(_max_diff(full_out, torch_out), _max_state_diff(full_state, torch_state))
    vs_float: float | None = None
    if reference is not None:
        ref = StepModel.load(reference)
        if ref.spec.state_signature != model.spec.state_signature:
            raise ModelError(f"{reference}: not the float model of {model_path} (state differs)")
        ref_stepped, _ = _stepped(ref, x)
        ref_out, _ = ref.run(x, ref.initial_state(batch))
        vs_float = _relative(stepped, ref_stepped, QUANTIZED_PERCENTILE)
        detail["vs_float_max"] = _relative(stepped, ref_stepped)
        detail["vs_float_one_call_max"] = _relative(full_out, ref_out)
    return VerifyReport(
        stepwise,
        vs_torch,
        cases=batch,
        steps=steps,
        tolerance=tolerance or (QUANTIZED_TOLERANCE if quantized else TOLERANCE),
        quantized=quantized,
        vs_float=vs_float,
        detail=detail if quantized else None,
    )
