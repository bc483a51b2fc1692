"""Metrics against brute-force definitions, on random and real series."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import scoring
from pipeline.datasets import load, split_tail


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
