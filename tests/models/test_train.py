"""Train -> export -> verify -> eval on small real data, for every cell type and task.

The quality targets use the shipped defaults on the real data sets (BasicMotions:
accuracy >= 0.95 stepwise through onnxruntime, the default classifier search of
models/search.py; water flow: MASE < 1 against the
seasonal-naive forecast on the held-out tail, one step ahead and, with seq2seq, 24
steps ahead, where it must also beat the one-step forecaster iterated 24 times;
mitdb ECG: the anomaly model's ROC AUC above the z-score of first differences).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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
def test_default_classifier_reaches_095_on_basicmotions_stepwise(
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


@pytest.fixture(scope="module")
def waterflow_one_step(waterflow: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default one-step forecaster of water flow, exported (trained once per module)."""
    out = tmp_path_factory.mktemp("one-step")
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
        str(out / "run"),
    )
    seqstream("export", str(out / "run"), "--out", str(out / "m.onnx"))
    return out / "m.onnx"


@pytest.mark.slow
def test_one_step_forecaster_beats_seasonal_naive_on_waterflow(
    waterflow: Path, waterflow_one_step: Path
) -> None:
    evaluated = json.loads(
        seqstream(
            "eval", str(waterflow_one_step), "--data", str(waterflow), "--time-column", "Time"
        ).stdout
    )
    assert evaluated["n_points"] > 200
    assert evaluated["mase"] < 1.0, evaluated


# ---------------------------------------------------------------- anomaly and seq2seq

FAMILY_ARGS = {
    # tiny and quick: the round trip is the point, not the quality
    "anomaly": [
        "--label-column", "label", "--context", "32", "--window", "64", "--hidden", "8",
        "--epochs", "1",
    ],
    "seq2seq": [
        "--time-column", "Time", "--season", "24", "--horizon", "6", "--context", "24",
        "--window", "48", "--hidden", "8", "--layers", "2", "--epochs", "2",
    ],
}  # fmt: skip
EVAL_ARGS = {"anomaly": ["--label-column", "label"], "seq2seq": ["--time-column", "Time"]}
FAMILIES = [(cell, task) for task in FAMILY_ARGS for cell in CELLS]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f"{c}-{t}" for c, t in FAMILIES])
def family_run(
    request: pytest.FixtureRequest,
    mitdb: Path,
    waterflow: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, str, Path, Path]:
    cell, task = request.param
    data = mitdb if task == "anomaly" else waterflow
    out = tmp_path_factory.mktemp(f"{cell}-{task}")
    seqstream(
        "train", "--task", task, "--data", str(data), "--cell", cell, "--seed", "0",
        "--out", str(out / "run"), *FAMILY_ARGS[task],
    )  # fmt: skip
    seqstream("export", str(out / "run"), "--out", str(out / "m.onnx"))
    return cell, task, data, out


def test_family_export_verify_eval_round_trip(family_run: tuple[str, str, Path, Path]) -> None:
    cell, task, data, out = family_run
    config = json.loads((out / "run" / "config.json").read_text())
    assert config["task"] == task and config["cell"] == cell
    report = json.loads(
        seqstream(
            "verify", str(out / "m.onnx"), "--checkpoint", str(out / "run"), "--data", str(data),
            *EVAL_ARGS[task],
        ).stdout
    )  # fmt: skip
    assert report["ok"] and report["onnx_vs_torch"] < 1e-4 and report["stepwise_vs_full"] < 1e-4
    evaluated = json.loads(
        seqstream("eval", str(out / "m.onnx"), "--data", str(data), *EVAL_ARGS[task]).stdout
    )
    # eval runs ONNX step by step without torch; training scored with PyTorch in one call.
    test = json.loads((out / "run" / "metrics.json").read_text())["test"]
    assert evaluated["task"] == task and evaluated["tail_fraction"] == 0.2
    if task == "anomaly":
        assert evaluated["roc_auc"] == pytest.approx(test["roc_auc"], abs=1e-4)
        assert evaluated["threshold"] > 0 and evaluated["n_points"] == 1500
    else:
        assert evaluated["mae"] == pytest.approx(test["mae"], rel=1e-4)
        assert len(evaluated["per_horizon"]) == 6


# GRU/RNN have no int8 kernel (only their dense layers quantise): covered in test_export.
@pytest.mark.parametrize(
    "family_run", [("lstm", t) for t in FAMILY_ARGS], indirect=True, ids=list(FAMILY_ARGS)
)
def test_lstm_families_quantise_to_int8_and_report_the_change(
    family_run: tuple[str, str, Path, Path], tmp_path: Path
) -> None:
    """int8 (LSTM: onnxruntime's int8 LSTM kernel): verify against the float model within
    the quantised tolerance, eval reports the metric change against it."""
    _, task, data, out = family_run
    q = tmp_path / "q.onnx"
    shown = json.loads(
        seqstream("export", str(out / "run"), "--out", str(q), "--quantize", "int8").stdout
    )
    assert shown["quantization"] == "int8"
    report = json.loads(
        seqstream(
            "verify", str(q), "--checkpoint", str(out / "run"), "--reference",
            str(out / "m.onnx"), "--data", str(data), *EVAL_ARGS[task],
        ).stdout
    )  # fmt: skip
    assert report["quantized"] and report["ok"], report
    assert 0 < report["vs_float"] <= report["tolerance"]
    evaluated = json.loads(
        seqstream(
            "eval", str(q), "--data", str(data), "--reference", str(out / "m.onnx"),
            *EVAL_ARGS[task],
        ).stdout
    )  # fmt: skip
    key = "roc_auc" if task == "anomaly" else "mase"
    assert evaluated["change"][key] == pytest.approx(evaluated[key] - evaluated["reference"][key])
    assert abs(evaluated["change"][key]) < 0.1, evaluated["change"]


# name -> (training file, file scored, data arguments); ecg-diff-count-3 trains on a
# normal-only file and is scored on another, mitdb trains on its own head.
ANOMALY_SETS = {
    "ecg-diff-count-3": (
        "ecg-diff-count-3/ecg-diff-count-3_TRAIN_NA.csv",
        "ecg-diff-count-3/ecg-diff-count-3_TEST.csv",
        ["--label-column", "is_anomaly", "--time-column", "timestamp"],
    ),
    "mitdb": ("mitdb/mitdb.csv", "mitdb/mitdb.csv", ["--label-column", "label"]),
}
ROWS = {"ecg-diff-count-3": 10_000, "mitdb": 7_500}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ANOMALY_SETS))
def test_anomaly_defaults_beat_the_difference_baseline(
    name: str, shared_data: Path, tmp_path: Path
) -> None:
    """Defaults, seed 0, every row of the scored file: ROC AUC well above the z-score of
    first differences and the single highest score a hit under the UCR protocol (within
    100 rows of a labelled region). mitdb is also scored by default, on its held-out
    tail (the file it was trained on)."""
    train_path, test_path = (shared_data / f for f in ANOMALY_SETS[name][:2])
    args = ANOMALY_SETS[name][2]
    run, model = tmp_path / "run", tmp_path / "m.onnx"
    seqstream("train", "--task", "anomaly", "--data", str(train_path), *args, "--out", str(run))
    seqstream("export", str(run), "--out", str(model))

    def scored(*extra: str) -> dict[str, Any]:
        out = seqstream("eval", str(model), "--data", str(test_path), *args, *extra).stdout
        return dict(json.loads(out))

    by_default = scored()
    reports = [by_default]
    if train_path == test_path:
        assert by_default["tail_fraction"] == 0.2 and by_default["trained_on_this_file"]
        whole = scored("--tail", "1")
        reports.append(whole)
    else:
        whole = by_default
        assert not by_default["trained_on_this_file"]
    assert whole["tail_fraction"] == 1.0 and whole["n_points"] == ROWS[name]
    for report in reports:
        assert report["roc_auc"] > 0.75, report
        assert report["roc_auc"] > report["baseline"]["roc_auc"] + 0.2, report
        assert report["highest_score"]["ucr_hit"], report["highest_score"]


@pytest.mark.slow
def test_seq2seq_beats_seasonal_naive_and_the_iterated_one_step_forecaster(
    waterflow: Path, waterflow_one_step: Path, tmp_path: Path
) -> None:
    seqstream(
        "train", "--task", "seq2seq", "--data", str(waterflow), "--time-column", "Time",
        "--season", "24", "--horizon", "24", "--seed", "0", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    seqstream("export", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx"))
    evaluated = json.loads(
        seqstream(
            "eval", str(tmp_path / "m.onnx"), "--data", str(waterflow), "--time-column", "Time",
            "--baseline-model", str(waterflow_one_step),
        ).stdout
    )  # fmt: skip
    iterated = evaluated["iterated_one_step"]
    assert evaluated["horizon"] == 24 and iterated["iterations"] == 24
    assert evaluated["mase_mean_over_horizon"] < 1.0, evaluated
    assert evaluated["mase"] < 1.0
    assert iterated["n_points"] == evaluated["n_points"] > 200 * 24
    assert evaluated["mae"] < iterated["mae"], iterated
