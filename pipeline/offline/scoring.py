"""Metrics in numpy, shared by training reports, ``seqstream eval`` and tests.

Forecast skill is reported against the **seasonal-naive** forecast (the value one
season ago: ``y[i - m * ceil(k / m)]`` for a target ``i`` forecast ``k`` steps ahead,
which only uses data known at the forecast origin ``i - k``). Here

    MASE = MAE(model) / MAE(seasonal naive), both on the SAME held-out points,

so MASE < 1 means the model beats the seasonal-naive forecast. (Hyndman's original
MASE scales by the in-sample naive MAE instead; a ratio on identical points is the
direct "does it beat the baseline here" question, and needs no training data.)

Anomaly scores are judged against per-row labels (1 = anomalous) with threshold-free
figures: ROC AUC, the best F1 over all thresholds, and the best *point-adjusted* F1
(Xu et al., 2018: a labelled segment counts as found, every row of it, once any of its
rows is flagged; what an operator alerted once per incident sees).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of equal entries; NaN for no entries."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"accuracy: shapes differ {t.shape} vs {p.shape}")
    return float(np.mean(t == p)) if t.size else math.nan


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 ``[n_classes, n_classes]``: rows are true classes, columns predictions."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"confusion_matrix: shapes differ {t.shape} vs {p.shape}")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n_classes):
        raise ValueError(f"confusion_matrix: class index outside [0, {n_classes})")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def mae(errors: np.ndarray) -> float:
    """Mean absolute error of signed errors, ignoring NaN (unscored) entries."""
    e = np.asarray(errors, dtype=np.float64)
    e = e[~np.isnan(e)]
    return float(np.mean(np.abs(e))) if e.size else math.nan


def rmse(errors: np.ndarray) -> float:
    """Root mean squared error of signed errors, ignoring NaN (unscored) entries."""
    e = np.asarray(errors, dtype=np.float64)
    e = e[~np.isnan(e)]
    return float(np.sqrt(np.mean(e * e))) if e.size else math.nan


def mase(model_mae: float, naive_mae: float) -> float | None:
    """MAE ratio to the seasonal-naive forecast; ``None`` when the naive one is perfect."""
    if not math.isfinite(model_mae) or not math.isfinite(naive_mae) or naive_mae <= 0.0:
        return None
    return model_mae / naive_mae


def horizon_targets(series: np.ndarray, horizon: int, *, start: int = 0) -> np.ndarray:
    """Actual values ``[T, horizon, J]``: entry ``[t, k-1]`` is ``series[t + k]``.

    NaN where the target is past the end or before ``start`` (the first held-out
    row, see :func:`pipeline.offline.datasets.split_tail`), so only the tail is scored.
    """
    y = _as_2d(series)
    t_len = y.shape[0]
    out = np.full((t_len, horizon, y.shape[1]), np.nan, dtype=np.float64)
    for k in range(1, horizon + 1):
        first = max(0, start - k)  # first origin whose target t + k is in the tail
        if t_len - k > first:
            out[first : t_len - k, k - 1] = y[first + k :]
    return out


def seasonal_naive(series: np.ndarray, season: int, horizon: int) -> np.ndarray:
    """Seasonal-naive forecasts ``[T, horizon, J]`` aligned with :func:`horizon_targets`.

    Entry ``[t, k-1]`` forecasts ``series[t + k]`` as ``series[t + k - m * ceil(k / m)]``,
    NaN where that index is before the start or the target is past the end.
    """
    if season < 1 or horizon < 1:
        raise ValueError("seasonal_naive: season and horizon must be >= 1")
    y = _as_2d(series)
    t_len = y.shape[0]
    out = np.full((t_len, horizon, y.shape[1]), np.nan, dtype=np.float64)
    for k in range(1, horizon + 1):
        lag = season * math.ceil(k / season)
        if t_len > lag:
            out[lag - k : t_len - k, k - 1] = y[: t_len - lag]
    return out


def forecast_report(
    pred: np.ndarray,
    truth: np.ndarray,
    naive: np.ndarray,
    targets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """MAE, RMSE and MASE of ``pred`` and of ``naive`` against ``truth``, all ``[N, H, J]``.

    A point is scored only where all three are finite (NaN marks "not scored"), so the
    model and the seasonal-naive forecast are compared on the same points. Figures are
    pooled over every scored value, then given per horizon step (and per target when
    there are several). Several series are scored together by concatenating along N.
    """
    p, y, n = (np.asarray(a, dtype=np.float64) for a in (pred, truth, naive))
    if not (p.shape == y.shape == n.shape) or p.ndim != 3:
        raise ValueError(
            f"forecast_report: shapes {p.shape}, {y.shape}, {n.shape} must agree as [N, H, J]"
        )
    keep = np.isfinite(p) & np.isfinite(y) & np.isfinite(n)
    model_err = np.where(keep, p - y, np.nan)
    naive_err = np.where(keep, n - y, np.nan)
    report = _summary(model_err, naive_err)
    report["per_horizon"] = [
        {"step": k + 1, **_summary(model_err[:, k], naive_err[:, k])}
        for k in range(model_err.shape[1])
    ]
    per_step = [h["mase"] for h in report["per_horizon"] if h["mase"] is not None]
    report["mase_mean_over_horizon"] = float(np.mean(per_step)) if per_step else None
    if targets is not None and len(targets) > 1:
        report["per_target"] = {
            name: _summary(model_err[:, :, j], naive_err[:, :, j]) for j, name in enumerate(targets)
        }
    return report


def _summary(model_err: np.ndarray, naive_err: np.ndarray) -> dict[str, Any]:
    m, n = mae(model_err), mae(naive_err)
    return {
        "mae": _num(m),
        "rmse": _num(rmse(model_err)),
        "mase": mase(m, n),
        "naive_mae": _num(n),
        "naive_rmse": _num(rmse(naive_err)),
        "n_points": int(np.count_nonzero(~np.isnan(model_err))),
    }


def _num(v: float) -> float | None:
    """JSON has no NaN: an empty score is ``null``."""
    return v if math.isfinite(v) else None


def _as_2d(series: np.ndarray) -> np.ndarray:
    y = np.asarray(series, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise ValueError(f"series must be [T] or [T, J], got shape {y.shape}")
    return y


# ---------------------------------------------------------------- anomaly scores


def binary_labels(values: Sequence[str] | np.ndarray) -> np.ndarray:
    """Row labels as bool (True = anomalous): numbers, 0 normal and anything else not.

    Raises ValueError naming the first value that is not a number.
    """
    raw = np.asarray(values)
    if raw.dtype.kind in "biuf":
        return np.asarray(raw != 0)
    out = np.empty(raw.shape, dtype=bool)
    for i, v in enumerate(raw.tolist()):
        try:
            out[i] = float(v) != 0.0
        except ValueError:
            raise ValueError(
                f"anomaly label {v!r} is not a number (0 normal, 1 anomalous)"
            ) from None
    return out


def segments(labels: np.ndarray) -> np.ndarray:
    """``[S, 2]`` half-open ``(start, end)`` row ranges of consecutive True labels."""
    y = np.asarray(labels, dtype=bool).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], y, [0]])))
    return edges.reshape(-1, 2)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); ``None`` without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.arange(1, len(s) + 1)
    values, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    if len(values) < len(s):  # ties share the mean of their ranks
        sums = np.bincount(inverse, weights=ranks)
        ranks = (sums / counts)[inverse]
    return ranks


def f1_report(predicted: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Precision, recall and F1 of boolean ``predicted`` rows."""
    p = np.asarray(predicted, dtype=bool)
    y = np.asarray(labels, dtype=bool)
    tp = int(np.sum(p & y))
    return {**_prf(tp, int(np.sum(p & ~y)), int(np.sum(~p & y))), "flagged": int(p.sum())}


def _prf(tp: int, fp: int, fn: int) -> dict[str, Any]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


def best_f1(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The best F1 of ``score >= threshold`` over every threshold, and that threshold."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    thresholds = np.unique(s)[::-1]  # high to low
    pos_sorted = np.sort(s[y])
    neg_sorted = np.sort(s[~y])
    tp = len(pos_sorted) - np.searchsorted(pos_sorted, thresholds, side="left")
    fp = len(neg_sorted) - np.searchsorted(neg_sorted, thresholds, side="left")
    return _best(thresholds, tp, fp, int(y.sum()))


def point_adjusted_f1(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The best point-adjusted F1: a segment is wholly found once its highest row is
    flagged (``score >= threshold``); normal rows count as usual."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    segs = segments(y)
    seg_max = np.array([s[a:b].max() for a, b in segs], dtype=np.float64)
    seg_len = (segs[:, 1] - segs[:, 0]) if len(segs) else np.zeros(0, dtype=np.int64)
    thresholds = np.unique(np.concatenate([s[~y], seg_max]))[::-1]
    by_max = np.argsort(seg_max, kind="mergesort")
    cum_len = np.concatenate([[0], np.cumsum(seg_len[by_max][::-1])])  # longest-first sums
    n_found = len(seg_max) - np.searchsorted(seg_max[by_max], thresholds, side="left")
    tp = cum_len[n_found]
    neg_sorted = np.sort(s[~y])
    fp = len(neg_sorted) - np.searchsorted(neg_sorted, thresholds, side="left")
    report = _best(thresholds, tp, fp, int(y.sum()))
    report["segments"] = len(segs)
    return report


def _best(thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, pos: int) -> dict[str, Any]:
    if not len(thresholds) or pos == 0:
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "threshold": None}
    tp = np.asarray(tp, dtype=np.float64)
    fp = np.asarray(fp, dtype=np.float64)
    f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + (pos - tp)), 0.0)
    i = int(np.argmax(f1))
    return {
        **_prf(int(tp[i]), int(fp[i]), pos - int(tp[i])),
        "threshold": float(thresholds[i]),
    }


# The UCR anomaly archive's protocol (Wu & Keogh, 2021): a detector's answer is the
# row of its single highest score, correct when within this many rows of the anomaly.
UCR_MARGIN = 100


def highest_score(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Where the highest score falls relative to the labelled segments."""
    s = np.asarray(scores, dtype=np.float64)
    segs = segments(labels)
    i = int(np.argmax(s))
    inside = any(a <= i < b for a, b in segs)
    distance: int | None = None
    if len(segs):
        gaps = np.maximum(segs[:, 0] - i, 0) + np.maximum(i - (segs[:, 1] - 1), 0)
        distance = int(gaps.min())
    return {"row": i, "score": float(s[i]), "in_anomaly": inside, "rows_from_anomaly": distance}


def diff_zscore(series: np.ndarray, fit: slice = slice(None)) -> np.ndarray:
    """A baseline anomaly score: ``|z|`` of the first differences, largest over channels.

    Mean and std of the differences come from the rows in ``fit`` (the training part);
    the first row has difference 0.
    """
    y = _as_2d(series)
    d = np.diff(y, axis=0, prepend=y[:1])
    ref = d[fit]
    std = ref.std(axis=0)
    std[~(std > 0)] = 1.0
    return np.asarray(np.max(np.abs((d - ref.mean(axis=0)) / std), axis=1))
