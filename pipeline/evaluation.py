"""Offline evaluation of an exported step model: the oracle for ``seqstream eval`` and tests.

Every case is fed the way the daemon feeds a stream: one step per call with the state
carried from the previous call (cases of equal length share a batch, as streams do in
the engine). Nothing here needs torch, so the numbers come from the ONNX file alone.

* classify: the label of a case is the prediction at its last step; accuracy is also
  given after 25/50/75 % of each case, which is what a streaming consumer sees early.
* forecast: the whole series is fed; only forecasts whose targets fall in the held-out
  tail (:func:`pipeline.datasets.split_tail`) are scored, against the seasonal-naive
  forecast with the model's ``season`` (see :mod:`pipeline.scoring`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline import scoring
from pipeline.contract import ModelSpec
from pipeline.datasets import Dataset, split_tail
from pipeline.errors import DataError, ModelError
from pipeline.model import StepModel

log = logging.getLogger(__name__)

EARLY_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)


def run_stepwise(
    model: StepModel, cases: Sequence[np.ndarray], *, chunk: int = 1
) -> list[dict[str, np.ndarray]]:
    """Outputs of every case, ``{name: [T_i, ...]}``, fed ``chunk`` steps per call.

    The state returned by one call is the input of the next, so ``chunk=1`` is the
    streaming path and ``chunk >= T`` a single full-sequence call.
    """
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(cases):
        by_length.setdefault(int(c.shape[0]), []).append(i)
    results: list[dict[str, np.ndarray]] = [{} for _ in cases]
    for length, members in by_length.items():
        x = np.stack([np.asarray(cases[i], dtype=np.float32) for i in members])
        state = model.initial_state(len(members))
        parts: dict[str, list[np.ndarray]] = {}
        for t in range(0, length, chunk):
            out, state = model.run(np.ascontiguousarray(x[:, t : t + chunk]), state)
            for name, value in out.items():
                parts.setdefault(name, []).append(value)
        for name, pieces in parts.items():
            joined = np.concatenate(pieces, axis=1)
            for row, i in enumerate(members):
                results[i][name] = joined[row]
    return results


def evaluate(model: StepModel, data: Dataset, *, tail: float | None = None) -> dict[str, Any]:
    """Score ``model`` on ``data`` step by step; returns a JSON-ready report.

    ``tail`` (forecasting only) is the held-out fraction of each series; by default
    the ``test_fraction`` the model was trained with, else 1 (score the whole series).
    """
    spec = model.spec
    _check_features(spec, data)
    started = time.perf_counter()
    outputs = run_stepwise(model, data.cases)
    seconds = time.perf_counter() - started
    head: dict[str, Any] = {
        "task": spec.task,
        "model": spec.name,
        "model_version": spec.version,
        "provider": model.provider,
        "data": str(data.path),
        "data_sha256": data.sha256,
        "trained_on_this_file": bool(spec.data_sha256) and spec.data_sha256 == data.sha256,
        "n_cases": data.n_cases,
        "n_steps": int(sum(data.lengths)),
        "seconds": round(seconds, 4),
    }
    if spec.task == "classify":
        if tail is not None:
            raise DataError("--tail applies to forecasting models only")
        body = classification_report(spec, data, [o["probs"] for o in outputs])
    else:
        body = forecast_evaluation(
            spec, data, [o["forecast"] for o in outputs], tail=resolve_tail(spec, tail)
        )
    return head | body


def resolve_tail(spec: ModelSpec, tail: float | None) -> float:
    """The explicit fraction, else the model's ``extra["test_fraction"]``, else 1."""
    if tail is not None:
        return tail
    stored = spec.extra.get("test_fraction")
    if stored is None:
        return 1.0
    if isinstance(stored, bool) or not isinstance(stored, int | float):
        raise ModelError(f"model metadata extra.test_fraction is {stored!r}, not a number")
    return float(stored)


def classification_report(
    spec: ModelSpec, data: Dataset, probs: Sequence[np.ndarray]
) -> dict[str, Any]:
    """Accuracy, confusion matrix and per-case predictions from per-step ``probs``."""
    labels = spec.labels
    y_true = data.label_indices(labels)
    last = np.array([int(np.argmax(p[-1])) for p in probs], dtype=np.int64)
    early = {}
    for f in EARLY_FRACTIONS:
        pred = np.array(
            [int(np.argmax(p[max(1, math.ceil(f * len(p))) - 1])) for p in probs],
            dtype=np.int64,
        )
        early[f"{f:g}"] = scoring.accuracy(y_true, pred)
    cm = scoring.confusion_matrix(y_true, last, len(labels))
    return {
        "accuracy": scoring.accuracy(y_true, last),
        "accuracy_after_fraction": early,
        "labels": list(labels),
        "confusion_matrix": cm.tolist(),
        "cases": [
            {
                "case": data.case_name(i),
                "label": labels[int(y_true[i])],
                "predicted": labels[int(last[i])],
                "confidence": round(float(probs[i][-1][last[i]]), 6),
            }
            for i in range(len(probs))
        ],
    }


def forecast_evaluation(
    spec: ModelSpec, data: Dataset, forecasts: Sequence[np.ndarray], *, tail: float
) -> dict[str, Any]:
    """MAE, RMSE and MASE of the per-step ``forecasts`` ``[T, H, J]`` on each series' tail."""
    tidx = [spec.features.index(t) for t in spec.targets]
    preds, truths, naives = [], [], []
    for case, f in zip(data.cases, forecasts, strict=True):
        series = np.asarray(case, dtype=np.float64)[:, tidx]
        start = split_tail(len(series), tail)
        preds.append(np.asarray(f, dtype=np.float64))
        truths.append(scoring.horizon_targets(series, spec.horizon, start=start))
        naives.append(scoring.seasonal_naive(series, spec.season, spec.horizon))
    report = scoring.forecast_report(
        np.concatenate(preds), np.concatenate(truths), np.concatenate(naives), spec.targets
    )
    if report["n_points"] == 0:
        raise DataError(
            f"{data.path}: no forecast could be scored (series of {max(data.lengths)} rows, "
            f"tail {tail}, season {spec.season}, horizon {spec.horizon})"
        )
    return {
        "targets": list(spec.targets),
        "horizon": spec.horizon,
        "season": spec.season,
        "tail_fraction": tail,
    } | report


def _check_features(spec: ModelSpec, data: Dataset) -> None:
    if data.n_features != spec.n_features:
        raise DataError(
            f"{data.path}: {data.n_features} feature(s) {list(data.features)}, the model "
            f"expects {spec.n_features} {list(spec.features)}"
        )
    if tuple(data.features) != tuple(spec.features):
        log.info(
            "features matched by position: data %s -> model %s",
            list(data.features),
            list(spec.features),
        )
