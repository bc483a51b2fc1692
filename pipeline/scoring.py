"""Metrics in numpy, shared by training reports, ``seqstream eval`` and tests.

Forecast skill is reported against the **seasonal-naive** forecast (the value one
season ago: ``y[i - m * ceil(k / m)]`` for a target ``i`` forecast ``k`` steps ahead,
which only uses data known at the forecast origin ``i - k``). Here

    MASE = MAE(model) / MAE(seasonal naive), both on the SAME held-out points,

so MASE < 1 means the model beats the seasonal-naive forecast. (Hyndman's original
MASE scales by the in-sample naive MAE instead; a ratio on identical points is the
direct "does it beat the baseline here" question, and needs no training data.)
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
    row, see :func:`pipeline.datasets.split_tail`), so only the tail is scored.
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
