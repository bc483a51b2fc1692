"""Train -> export -> verify -> eval on small real data, for every cell type.

The quality targets use the shipped defaults on the real data sets (BasicMotions:
accuracy >= 0.95 stepwise through onnxruntime; water flow: MASE < 1 against the
seasonal-naive forecast on the held-out tail).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import checkpoint
from models.train import TrainConfig, train

CELLS = ["lstm", "gru", "rnn"]


def seqstream(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"seqstream {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module", params=CELLS)
def small_run(
    request: pytest.FixtureRequest,
    basicmotions: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, Path]:
    """A small, quick classifier per cell type (quality is not the point here)."""
    cell = request.param
    out = tmp_path_factory.mktemp(f"run-{cell}")
    train_ts, test_ts = basicmotions
    proc = seqstream(
        "train",
        "--task",
        "classify",
        "--data",
        str(train_ts),
        "--test",
        str(test_ts),
        "--cell",
        cell,
        "--hidden",
        "16",
        "--layers",
        "2",
        "--epochs",
        "6",
        "--seed",
        "0",
        "--out",
        str(out),
    )
    assert json.loads(proc.stdout)["epochs_run"] <= 6
    return cell, out


def test_train_writes_checkpoint_config_metrics_and_curve(small_run: tuple[str, Path]) -> None:
    cell, out = small_run
    for name in ("checkpoint.pt", "config.json", "metrics.json", "curve.png"):
        assert (out / name).stat().st_size > 0, name
    config = json.loads((out / "config.json").read_text())
    assert config["cell"] == cell and config["hidden"] == 16 and config["seed"] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_verify_eval_round_trip(
    small_run: tuple[str, Path], basicmotions: tuple[Path, Path], tmp_path: Path
) -> None:
    _cell, out = small_run
    model = tmp_path / "m.onnx"
    seqstream("export", str(out), "--out", str(model))
    _, test_ts = basicmotions
    report = json.loads(
        seqstream("verify", str(model), "--checkpoint", str(out), "--data", str(test_ts)).stdout
    )
    assert report["ok"] and report["onnx_vs_torch"] < 1e-4 and report["stepwise_vs_full"] < 1e-4
    assert report["cases"] == 8 and report["steps"] == 100
    evaluated = json.loads(seqstream("eval", str(model), "--data", str(test_ts)).stdout)
    # eval runs ONNX step by step without torch; training scored with PyTorch in one call.
    metrics = json.loads((out / "metrics.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(metrics["test"]["accuracy"])


def test_training_is_deterministic_with_a_seed(
    basicmotions: tuple[Path, Path], tmp_path: Path
) -> None:
    train_ts, _ = basicmotions
    states = []
    for i in range(2):
        cfg = TrainConfig(
            task="classify",
            data=str(train_ts),
            out=str(tmp_path / str(i)),
            hidden=8,
            layers=1,
            epochs=3,
            seed=7,
        )
        train(cfg)
        net, _ = checkpoint.load(tmp_path / str(i))
        states.append(net.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


@pytest.mark.slow
def test_lstm_reaches_095_on_basicmotions_stepwise(
    basicmotions: tuple[Path, Path], tmp_path: Path
) -> None:
    train_ts, test_ts = basicmotions
    seqstream(
        "train",
        "--task",
        "classify",
        "--data",
        str(train_ts),
        "--seed",
        "0",
        "--out",
        str(tmp_path / "run"),
    )
    seqstream("export", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx"))
    evaluated = json.loads(
        seqstream("eval", str(tmp_path / "m.onnx"), "--data", str(test_ts)).stdout
    )
    assert evaluated["n_cases"] == 40
    assert evaluated["accuracy"] >= 0.95, evaluated


@pytest.mark.slow
def test_one_step_forecaster_beats_seasonal_naive_on_waterflow(
    waterflow: Path, tmp_path: Path
) -> None:
    seqstream(
        "train",
        "--task",
        "forecast",
        "--data",
        str(waterflow),
        "--time-column",
        "Time",
        "--season",
        "24",
        "--seed",
        "0",
        "--out",
        str(tmp_path / "run"),
    )
    seqstream("export", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx"))
    evaluated = json.loads(
        seqstream(
            "eval", str(tmp_path / "m.onnx"), "--data", str(waterflow), "--time-column", "Time"
        ).stdout
    )
    assert evaluated["n_points"] > 200
    assert evaluated["mase"] < 1.0, evaluated
