"""Metrics against brute-force definitions, on random and real series."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.offline import scoring
from pipeline.offline.datasets import load, split_tail


def test_accuracy_and_confusion_matrix() -> None:
    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.7, t, rng.integers(0, 4, 200))
    cm = scoring.confusion_matrix(t, p, 4)
    assert cm.sum() == 200
    assert scoring.accuracy(t, p) == np.trace(cm) / 200 == np.mean(t == p)
    for i in range(4):
        for j in range(4):
            assert cm[i, j] == np.sum((t == i) & (p == j))
    assert math.isnan(scoring.accuracy(np.array([]), np.array([])))
    with pytest.raises(ValueError):
        scoring.confusion_matrix(t, p, 3)
    with pytest.raises(ValueError):
        scoring.accuracy(t, p[:-1])


def test_accuracy_on_label_strings() -> None:
    assert scoring.accuracy(np.array(["a", "b", "a"]), np.array(["a", "a", "a"])) == 2 / 3


def test_mae_rmse_ignore_unscored_points() -> None:
    e = np.array([1.0, -3.0, np.nan, 2.0])
    assert scoring.mae(e) == 2.0
    assert scoring.rmse(e) == math.sqrt((1 + 9 + 4) / 3)
    assert math.isnan(scoring.mae(np.array([np.nan])))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    season=st.integers(1, 12),
    horizon=st.integers(1, 6),
    start=st.integers(0, 40),
)
def test_seasonal_naive_and_targets_match_definitions(
    n: int, season: int, horizon: int, start: int
) -> None:
    y = np.random.default_rng(n).normal(size=(n, 2))
    naive = scoring.seasonal_naive(y, season, horizon)
    actual = scoring.horizon_targets(y, horizon, start=start)
    assert naive.shape == actual.shape == (n, horizon, 2)
    for t in range(n):
        for k in range(1, horizon + 1):
            src = t + k - season * math.ceil(k / season)
            if t + k < n and src >= 0:
                np.testing.assert_array_equal(naive[t, k - 1], y[src])
            else:
                assert np.isnan(naive[t, k - 1]).all()
            if start <= t + k < n:
                np.testing.assert_array_equal(actual[t, k - 1], y[t + k])
            else:
                assert np.isnan(actual[t, k - 1]).all()


def test_forecast_report_compares_on_the_same_points() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(size=(50, 2, 1))
    naive = y + rng.normal(size=y.shape)
    pred = y + 0.5 * rng.normal(size=y.shape)
    pred[3, 0, 0] = np.nan  # an unscored model point drops the naive point too
    naive[7, 1, 0] = np.nan
    rep = scoring.forecast_report(pred, y, naive)
    keep = ~np.isnan(pred) & ~np.isnan(naive)
    m = np.abs(pred - y)[keep].mean()
    n = np.abs(naive - y)[keep].mean()
    assert rep["n_points"] == 98
    assert rep["mae"] == pytest.approx(m)
    assert rep["naive_mae"] == pytest.approx(n)
    assert rep["mase"] == pytest.approx(m / n)
    assert rep["rmse"] == pytest.approx(np.sqrt(((pred - y)[keep] ** 2).mean()))
    assert [h["step"] for h in rep["per_horizon"]] == [1, 2]
    assert [h["n_points"] for h in rep["per_horizon"]] == [49, 49]
    h1 = rep["per_horizon"][0]
    k1 = keep[:, 0]
    assert h1["mase"] == pytest.approx(
        np.abs(pred - y)[:, 0][k1].mean() / np.abs(naive - y)[:, 0][k1].mean()
    )
    assert "per_target" not in rep


def test_forecast_report_edge_cases() -> None:
    y = np.arange(12.0).reshape(6, 1, 2)
    assert scoring.forecast_report(y + 1, y, y + 2)["mase"] == pytest.approx(0.5)
    assert scoring.forecast_report(y, y, y + 1)["mase"] == 0.0
    perfect_naive = scoring.forecast_report(y + 1, y, y)
    assert perfect_naive["mase"] is None
    rep = scoring.forecast_report(y, y, y + 1, targets=["a", "b"])
    assert set(rep["per_target"]) == {"a", "b"}
    empty = scoring.forecast_report(np.full_like(y, np.nan), y, y)
    assert empty["n_points"] == 0 and empty["mae"] is None
    with pytest.raises(ValueError):
        scoring.forecast_report(y, y[:3], y)


@pytest.mark.parametrize("season", [1, 12])
def test_naive_against_itself_on_airline(airline: Path, season: int) -> None:
    """On the real series: the seasonal-naive forecast scored as 'the model' has MASE 1,
    and the lag-1 naive forecast scored against the seasonal one gives their MAE ratio."""
    series = load(airline, time_column="Date").cases[0].astype(np.float64)
    start = split_tail(len(series), 0.25)
    truth = scoring.horizon_targets(series, 1, start=start)
    naive = scoring.seasonal_naive(series, season, 1)
    assert scoring.forecast_report(naive, truth, naive)["mase"] == pytest.approx(1.0)
    lag1 = scoring.seasonal_naive(series, 1, 1)
    rep = scoring.forecast_report(lag1, truth, naive)
    tail = series[start:, 0]
    assert rep["n_points"] == len(tail)
    lag1_mae = np.abs(tail - series[start - 1 : -1, 0]).mean()
    naive_mae = np.abs(tail - series[start - season : len(series) - season, 0]).mean()
    assert rep["mae"] == pytest.approx(lag1_mae)
    assert rep["mase"] == pytest.approx(lag1_mae / naive_mae)


# ---------------------------------------------------------------- anomaly scores


def _brute_roc_auc(s: np.ndarray, y: np.ndarray) -> float:
    pos, neg = s[y], s[~y]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def _brute_f1(s: np.ndarray, y: np.ndarray, adjust: bool) -> float:
    best = 0.0
    for thr in np.unique(s):
        p = s >= thr
        if adjust:
            for a, b in scoring.segments(y):
                if p[a:b].any():
                    p[a:b] = True
        tp, fp, fn = np.sum(p & y), np.sum(p & ~y), np.sum(~p & y)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return float(best)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(2, 60),
    seed=st.integers(0, 10_000),
    levels=st.integers(2, 8),
)
def test_anomaly_metrics_match_brute_force(n: int, seed: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    if y.all() or not y.any():
        y[0] = not y[0]
    s = rng.integers(0, levels, n).astype(np.float64) + y * rng.random()  # many ties
    assert scoring.roc_auc(s, y) == pytest.approx(_brute_roc_auc(s, y))
    best = scoring.best_f1(s, y)
    assert best["f1"] == pytest.approx(_brute_f1(s, y, adjust=False))
    assert scoring.f1_report(s >= best["threshold"], y)["f1"] == pytest.approx(best["f1"])
    adjusted = scoring.point_adjusted_f1(s, y)
    assert adjusted["f1"] == pytest.approx(_brute_f1(s, y, adjust=True))
    assert adjusted["f1"] >= best["f1"] - 1e-12
    assert adjusted["segments"] == len(scoring.segments(y))


def test_segments_and_highest_score() -> None:
    y = np.array([0, 1, 1, 0, 0, 0, 1, 0, 1], dtype=bool)
    assert scoring.segments(y).tolist() == [[1, 3], [6, 7], [8, 9]]
    s = np.zeros(9)
    s[4] = 5.0
    assert scoring.highest_score(s, y) == {
        "row": 4,
        "score": 5.0,
        "in_anomaly": False,
        "rows_from_anomaly": 2,
    }
    s[7] = 9.0
    assert scoring.highest_score(s, y)["rows_from_anomaly"] == 1
    s[2] = 10.0
    assert scoring.highest_score(s, y)["in_anomaly"] is True
    assert scoring.highest_score(s, np.zeros(9, dtype=bool))["rows_from_anomaly"] is None
    assert scoring.roc_auc(s, np.zeros(9, dtype=bool)) is None


def test_binary_labels() -> None:
    assert scoring.binary_labels(np.array(["0", "1", "0.0", "2"])).tolist() == [
        False,
        True,
        False,
        True,
    ]
    assert scoring.binary_labels(np.array([0, 3])).tolist() == [False, True]
    with pytest.raises(ValueError, match="'normal' is not a number"):
        scoring.binary_labels(np.array(["0", "normal"]))


def test_diff_zscore_baseline(mitdb: Path) -> None:
    series = load(mitdb, label_column="label").cases[0].astype(np.float64)
    z = scoring.diff_zscore(series, slice(0, 6000))
    d = np.diff(series[:, 0], prepend=series[0, 0])
    expected = np.abs(d - d[:6000].mean()) / d[:6000].std()
    np.testing.assert_allclose(z, expected)
    assert z.shape == (len(series),) and z[0] == pytest.approx(
        abs(d[:6000].mean()) / d[:6000].std()
    )


def test_mase_mean_over_horizon() -> None:
    rng = np.random.default_rng(5)
    y = rng.normal(size=(40, 3, 1))
    rep = scoring.forecast_report(y + rng.normal(size=y.shape), y, y + 2 * rng.normal(size=y.shape))
    per = [h["mase"] for h in rep["per_horizon"]]
    assert rep["mase_mean_over_horizon"] == pytest.approx(np.mean(per))
