"""Offline evaluation of an exported step model: the oracle for ``seqstream eval`` and tests.

Every case is fed the way the daemon feeds a stream: one step per call with the state
carried from the previous call (cases of equal length share a batch, as streams do in
the engine). Nothing here needs torch, so the numbers come from the ONNX file alone.

* classify: the label of a case is the prediction at its last step; accuracy is also
  given after 25/50/75 % of each case, which is what a streaming consumer sees early.
* forecast (``forecast`` and ``seq2seq`` models): the whole series is fed; only
  forecasts whose targets fall in the held-out tail (:func:`pipeline.offline.datasets.split_tail`)
  are scored, against the seasonal-naive forecast with the model's ``season`` (see
  :mod:`pipeline.offline.scoring`), and optionally against a one-step forecaster iterated over
  the horizon (:func:`iterated_forecasts`) on the same points.
* anomaly: the whole series is fed; the scores of the tail's rows (on a file the model
  was not trained on: of every row) are judged against the data's per-row labels (ROC
  AUC, best F1, point-adjusted F1, where the highest score falls and whether it is a
  hit under the UCR anomaly archive's protocol: within :data:`scoring.UCR_MARGIN` rows
  of a labelled region), beside a simple baseline computed in the same run: the
  z-score of first differences (:func:`pipeline.offline.scoring.diff_zscore`).

The report's shape follows the model's outputs (``probs``, ``forecast``, ``score``),
so a new task with an existing output needs nothing here. ``reference`` scores a second
model (e.g. the float model of an int8 one) on the same data and reports the change.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.contract import ModelSpec
from pipeline.errors import DataError, ModelError
from pipeline.model import StepModel
from pipeline.offline import scoring
from pipeline.offline.dataset import Dataset
from pipeline.offline.datasets import split_tail

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


def evaluate(
    model: StepModel,
    data: Dataset,
    *,
    tail: float | None = None,
    baseline: StepModel | None = None,
    reference: StepModel | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``data`` step by step; returns a JSON-ready report.

    ``tail`` (forecasting and anomaly models) is the held-out fraction of each series;
    by default the ``test_fraction`` the model was trained with when ``data`` is the
    file it was trained on, else 1 (score the whole series; :func:`resolve_tail`).
    ``baseline`` (forecasting) is a one-step forecaster scored iterated
    over the model's horizon on the same points; ``reference`` is a model scored the
    same way whose headline metrics are subtracted (``change``).
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
    if "probs" in spec.outputs:
        if tail is not None:
            raise DataError("--tail applies to forecasting and anomaly models only")
        body = classification_report(spec, data, [o["probs"] for o in outputs])
    elif "score" in spec.outputs:
        body = anomaly_evaluation(
            spec, data, [o["score"] for o in outputs], tail=resolve_tail(spec, tail, data)
        )
    else:
        body = forecast_evaluation(
            spec, data, [o["forecast"] for o in outputs], tail=resolve_tail(spec, tail, data)
        )
        if baseline is not None:
            body["iterated_one_step"] = iterated_baseline_report(
                spec, data, baseline, tail=body["tail_fraction"]
            )
    if baseline is not None and "iterated_one_step" not in body:
        raise DataError("--baseline-model applies to forecasting models only")
    report = head | body
    if reference is not None:
        ref = evaluate(reference, data, tail=tail)
        report["reference"] = {
            "model": reference.spec.name,
            "path": str(reference.path),
            "seconds": ref["seconds"],
            **headline(ref),
        }
        mine = headline(report)
        change: dict[str, float | None] = {}
        for key, theirs in headline(ref).items():
            ours = mine.get(key)
            change[key] = ours - theirs if ours is not None and theirs is not None else None
        report["change"] = change
    return report


HEADLINE: tuple[tuple[str, ...], ...] = (
    ("accuracy",),
    ("mae",),
    ("rmse",),
    ("mase",),
    ("mase_mean_over_horizon",),
    ("roc_auc",),
    ("best_f1", "f1"),
    ("point_adjusted_f1", "f1"),
)


def headline(report: dict[str, Any]) -> dict[str, float | None]:
    """The report's main figures, flat (``best_f1.f1`` ...), for comparing two models."""
    out: dict[str, float | None] = {}
    for path in HEADLINE:
        value: Any = report
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if path[0] in report:
            out[".".join(path)] = value if isinstance(value, int | float) else None
    return out


def resolve_tail(spec: ModelSpec, tail: float | None, data: Dataset | None = None) -> float:
    """The explicit fraction; else, on the very file the model was trained on (same
    SHA-256 as the metadata's ``data_sha256``), the held-out tail it was trained
    without (``extra["test_fraction"]``); else 1, the whole series: a file the model
    never saw is all test data. ``data=None`` asks about the training file."""
    if tail is not None:
        return tail
    stored = spec.extra.get("test_fraction")
    trained_on_it = data is None or (bool(spec.data_sha256) and spec.data_sha256 == data.sha256)
    if stored is None or not trained_on_it:
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


def anomaly_evaluation(
    spec: ModelSpec, data: Dataset, scores: Sequence[np.ndarray], *, tail: float
) -> dict[str, Any]:
    """Anomaly scores of each series' tail against its row labels, beside a baseline.

    Without labels (no ``--label-column``) only the score distribution and how many
    rows the model's threshold flags are reported.
    """
    starts = [split_tail(len(c), tail) for c in data.cases]
    s = np.concatenate(
        [np.asarray(v, dtype=np.float64)[a:] for v, a in zip(scores, starts, strict=True)]
    )
    flags = np.asarray(spec.flags(s), dtype=bool)
    body: dict[str, Any] = {
        "tail_fraction": tail,
        "window": spec.window,
        "threshold": spec.threshold,
        "n_points": int(s.size),
        "flagged": int(flags.sum()),
        "flagged_fraction": float(flags.mean()) if s.size else None,
        "score_quantiles": {f"{q:g}": float(np.quantile(s, q)) for q in (0.5, 0.9, 0.99, 1.0)},
    }
    if data.row_labels is None:
        body["labelled"] = False
        return body
    try:
        labels = np.concatenate(
            [scoring.binary_labels(r)[a:] for r, a in zip(data.row_labels, starts, strict=True)]
        )
    except ValueError as exc:
        raise DataError(f"{data.path}: {exc}") from None
    cut = [a if a < len(c) else len(c) for c, a in zip(data.cases, starts, strict=True)]
    fit = [slice(0, a) if a > 0 else slice(None) for a in cut]
    base = np.concatenate(
        [
            scoring.diff_zscore(np.asarray(c, dtype=np.float64), f)[a:]
            for c, f, a in zip(data.cases, fit, starts, strict=True)
        ]
    )
    body |= {"labelled": True, "anomalous_rows": int(labels.sum())}
    where = _row_locator(data, starts)
    body |= _anomaly_figures(s, labels, where)
    body["at_threshold"] = scoring.f1_report(flags, labels)
    body["baseline"] = {"name": "z-score of first differences"} | _anomaly_figures(
        base, labels, where
    )
    return body


def _row_locator(data: Dataset, starts: Sequence[int]) -> Any:
    """Maps an index into the concatenated tails to ``(case name, row in that case)``."""
    offsets = np.cumsum([0] + [len(c) - a for c, a in zip(data.cases, starts, strict=True)])

    def locate(i: int) -> tuple[str, int]:
        case = int(np.searchsorted(offsets, i, side="right")) - 1
        return data.case_name(case), starts[case] + i - int(offsets[case])

    return locate


def _anomaly_figures(scores: np.ndarray, labels: np.ndarray, where: Any) -> dict[str, Any]:
    top = scoring.highest_score(scores, labels)
    case, row = where(top["row"])
    top = {"case": case, "row": row} | {k: v for k, v in top.items() if k != "row"}
    near = top["rows_from_anomaly"]
    top["ucr_hit"] = near is not None and near <= scoring.UCR_MARGIN
    if not labels.any() or labels.all():
        return {"roc_auc": None, "highest_score": top}
    return {
        "roc_auc": scoring.roc_auc(scores, labels),
        "best_f1": scoring.best_f1(scores, labels),
        "point_adjusted_f1": scoring.point_adjusted_f1(scores, labels),
        "highest_score": top,
    }


def iterated_forecasts(model: StepModel, case: np.ndarray, horizon: int) -> np.ndarray:
    """A one-step forecaster fed its own forecasts: ``[T, horizon, J]`` for one series.

    Every step of ``case`` is streamed with carried state (as :func:`run_stepwise`);
    then, from the state after each step t, the model's next-step forecast is fed back
    as the input at t+1, and so on ``horizon - 1`` times, all origins in one batch.
    Needs every feature to be a target (the forecast must be a whole next input).
    """
    spec = model.spec
    if "forecast" not in spec.outputs or set(spec.targets) != set(spec.features):
        raise ModelError(
            f"{model.path}: an iterated baseline must be a forecaster whose targets are all "
            f"its features (features {list(spec.features)}, targets {list(spec.targets)})"
        )
    order = [spec.targets.index(f) for f in spec.features]
    x = np.asarray(case, dtype=np.float32)
    state = model.initial_state(1)
    kept: dict[str, list[np.ndarray]] = {s.name: [] for s in spec.state}
    first: list[np.ndarray] = []
    for t in range(len(x)):
        out, state = model.run(x[None, t : t + 1], state)
        first.append(out["forecast"][0, 0, 0])
        for name, value in state.items():
            kept[name].append(value)
    batch = {s.name: np.concatenate(kept[s.name], axis=s.batch_axis) for s in spec.state}
    steps = [np.stack(first)]  # [T, J]
    for _ in range(1, horizon):
        feed = np.ascontiguousarray(steps[-1][:, None, order])
        out, batch = model.run(feed, batch)
        steps.append(out["forecast"][:, 0, 0])
    return np.stack(steps, axis=1)


def iterated_baseline_report(
    spec: ModelSpec, data: Dataset, baseline: StepModel, *, tail: float
) -> dict[str, Any]:
    """MAE/RMSE/MASE of ``baseline`` iterated to ``spec.horizon``, on the model's points."""
    base = baseline.spec
    missing = [t for t in spec.targets if t not in base.targets]
    if missing or base.n_features != spec.n_features:
        raise ModelError(
            f"{baseline.path}: cannot stand in for {spec.name}: it forecasts {list(base.targets)}"
            f" from {base.n_features} feature(s)"
        )
    cols = [base.targets.index(t) for t in spec.targets]
    tidx = [spec.features.index(t) for t in spec.targets]
    preds, truths, naives = [], [], []
    for case in data.cases:
        series = np.asarray(case, dtype=np.float64)[:, tidx]
        start = split_tail(len(series), tail)
        preds.append(iterated_forecasts(baseline, case, spec.horizon)[:, :, cols])
        truths.append(scoring.horizon_targets(series, spec.horizon, start=start))
        naives.append(scoring.seasonal_naive(series, spec.season, spec.horizon))
    report = scoring.forecast_report(
        np.concatenate(preds), np.concatenate(truths), np.concatenate(naives), spec.targets
    )
    return {"model": base.name, "path": str(baseline.path), "iterations": spec.horizon} | report


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
