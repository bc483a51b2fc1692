"""Offline evaluation: stepwise onnxruntime equals one full-sequence call, metrics match
their definitions on real data, and ``seqstream eval`` fails with one line, no traceback."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.export import export_random
from pipeline.errors import DataError, ModelError
from pipeline.model import StepModel
from pipeline.offline import scoring
from pipeline.offline.datasets import load, split_tail
from pipeline.offline.evaluation import evaluate, iterated_forecasts, resolve_tail, run_stepwise

CELLS = ["lstm", "gru", "rnn"]
REPO = Path(__file__).resolve().parents[3]
WATER = "Water flow [l/s]"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    for cell in CELLS:
        export_random(d / f"{cell}-classify.onnx", cell=cell, n_features=6, n_classes=4, seed=1)
    export_random(d / "forecast.onnx", task="forecast", n_features=1, horizon=3, seed=2)
    export_random(d / "forecast-b.onnx", task="forecast", n_features=1, horizon=1, seed=7)
    export_random(d / "seq2seq.onnx", task="seq2seq", n_features=1, horizon=4, window=8, seed=3)
    export_random(d / "anomaly.onnx", task="anomaly", n_features=1, window=16, seed=4)
    return d


@pytest.fixture(scope="module")
def relabelled(basicmotions: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BasicMotions TEST with its classes renamed to the random models' ``class0..3``."""
    lines = basicmotions[1].read_text().splitlines()
    declared = next(ln for ln in lines if ln.startswith("@classLabel")).split()[2:]
    out = []
    in_data = False
    for ln in lines:
        if ln.startswith("@classLabel"):
            ln = "@classLabel true " + " ".join(f"class{i}" for i in range(len(declared)))
        elif in_data and ln.strip():
            body, _, label = ln.rpartition(":")
            ln = f"{body}:class{declared.index(label)}"
        in_data = in_data or ln.strip().lower() == "@data"
        out.append(ln)
    path = tmp_path_factory.mktemp("data") / "BasicMotions_relabelled.ts"
    path.write_text("\n".join(out) + "\n")
    return path


def _full(model: StepModel, case: np.ndarray) -> dict[str, np.ndarray]:
    out, _ = model.run(case[None].astype(np.float32), model.initial_state(1))
    return {k: v[0] for k, v in out.items()}


# ---------------------------------------------------------------- stepping


@pytest.mark.parametrize("cell", CELLS)
def test_stepwise_equals_full_sequence(models_dir: Path, relabelled: Path, cell: str) -> None:
    model = StepModel.load(models_dir / f"{cell}-classify.onnx")
    data = load(relabelled)
    x = np.stack(data.cases)
    full, _ = model.run(x, model.initial_state(len(x)))
    for chunk in (1, 7):
        stepped = run_stepwise(model, data.cases, chunk=chunk)
        got = np.stack([o["probs"] for o in stepped])
        assert got.shape == full["probs"].shape == (40, 100, 4)
        assert float(np.max(np.abs(got - full["probs"]))) < 1e-5


def test_stepwise_groups_unequal_lengths(models_dir: Path, basicmotions: tuple[Path, Path]) -> None:
    model = StepModel.load(models_dir / "gru-classify.onnx")
    cases = load(basicmotions[0]).cases
    cut = [c[:n] for c, n in zip(cases, [100, 37, 100, 1, 37, 64], strict=False)]
    stepped = run_stepwise(model, cut)
    for case, out in zip(cut, stepped, strict=True):
        ref = _full(model, case)["probs"]
        assert out["probs"].shape == ref.shape == (len(case), 4)
        assert float(np.max(np.abs(out["probs"] - ref))) < 1e-5


# ---------------------------------------------------------------- classification


def test_classification_report(models_dir: Path, relabelled: Path) -> None:
    model = StepModel.load(models_dir / "lstm-classify.onnx")
    data = load(relabelled)
    rep = evaluate(model, data)
    probs = [_full(model, c)["probs"] for c in data.cases]
    truth = data.label_indices(model.spec.labels)
    last = np.array([p[-1].argmax() for p in probs])
    assert rep["task"] == "classify" and rep["n_cases"] == 40 and rep["n_steps"] == 4000
    assert rep["accuracy"] == pytest.approx(float(np.mean(last == truth)))
    assert rep["accuracy_after_fraction"]["1"] == rep["accuracy"]
    quarter = np.array([p[24].argmax() for p in probs])
    assert rep["accuracy_after_fraction"]["0.25"] == pytest.approx(float(np.mean(quarter == truth)))
    cm = np.array(rep["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == 40
    assert cm.sum(axis=1).tolist() == np.bincount(truth, minlength=4).tolist()
    assert [c["predicted"] for c in rep["cases"]] == [model.spec.labels[i] for i in last]
    assert [c["label"] for c in rep["cases"]] == list(data.labels or ())
    assert rep["trained_on_this_file"] is False
    json.dumps(rep, allow_nan=False)


def test_labels_unknown_to_the_model(models_dir: Path, basicmotions: tuple[Path, Path]) -> None:
    model = StepModel.load(models_dir / "lstm-classify.onnx")
    with pytest.raises(DataError, match=r"'Running'.* are not among the classes"):
        evaluate(model, load(basicmotions[1]))


def test_feature_count_mismatch(models_dir: Path, waterflow: Path) -> None:
    model = StepModel.load(models_dir / "lstm-classify.onnx")
    data = load(waterflow, feature_columns=[WATER])
    with pytest.raises(DataError, match="1 feature"):
        evaluate(model, data)


# ---------------------------------------------------------------- forecasting


def _brute_force(
    series: np.ndarray, fc: np.ndarray, season: int, start: int
) -> tuple[float, float, int]:
    model_err, naive_err = [], []
    n, horizon = len(series), fc.shape[1]
    for t in range(n):
        for k in range(1, horizon + 1):
            i = t + k
            src = i - season * math.ceil(k / season)
            if start <= i < n and src >= 0:
                model_err.append(abs(fc[t, k - 1, 0] - series[i]))
                naive_err.append(abs(series[src] - series[i]))
    return float(np.mean(model_err)), float(np.mean(naive_err)), len(model_err)


@pytest.mark.parametrize("season", [1, 24])
def test_forecast_report_matches_definitions(
    models_dir: Path, waterflow: Path, season: int
) -> None:
    model = StepModel.load(models_dir / "forecast.onnx")
    model.spec = dataclasses.replace(model.spec, season=season)
    data = load(waterflow, feature_columns=[WATER])
    rep = evaluate(model, data, tail=0.2)
    series = data.cases[0][:, 0].astype(np.float64)
    fc = _full(model, data.cases[0])["forecast"]
    assert fc.shape == (len(series), 3, 1)
    mae, naive_mae, n = _brute_force(series, fc, season, split_tail(len(series), 0.2))
    assert rep["n_points"] == n
    assert rep["mae"] == pytest.approx(mae, rel=1e-5)
    assert rep["naive_mae"] == pytest.approx(naive_mae)
    assert rep["mase"] == pytest.approx(mae / naive_mae, rel=1e-5)
    assert [h["step"] for h in rep["per_horizon"]] == [1, 2, 3]
    assert rep["season"] == season and rep["horizon"] == 3 and rep["tail_fraction"] == 0.2


def test_tail_defaults_to_the_training_fraction_on_the_training_file_only(
    models_dir: Path, waterflow: Path
) -> None:
    """The held-out tail by default on the very file the model was trained on (same
    SHA-256); the whole file on any other; ``tail`` overrides both."""
    model = StepModel.load(models_dir / "forecast.onnx")
    assert resolve_tail(model.spec, None) == 1.0
    assert resolve_tail(model.spec, 0.1) == 0.1
    data = load(waterflow, feature_columns=[WATER])
    series = data.cases[0]
    model.spec = dataclasses.replace(
        model.spec, extra={"test_fraction": 0.3}, data_sha256=data.sha256
    )
    rep = evaluate(model, data)
    assert rep["tail_fraction"] == 0.3 and rep["trained_on_this_file"] is True
    assert rep["per_horizon"][0]["n_points"] == len(series) - split_tail(len(series), 0.3)
    whole = evaluate(model, data, tail=1.0)["per_horizon"][0]["n_points"]
    assert whole > len(series) - split_tail(len(series), 0.3)
    model.spec = dataclasses.replace(model.spec, data_sha256="0" * 64)  # another file
    rep = evaluate(model, data)
    assert rep["tail_fraction"] == 1.0 and rep["trained_on_this_file"] is False
    assert rep["per_horizon"][0]["n_points"] == whole
    assert evaluate(model, data, tail=0.3)["tail_fraction"] == 0.3


def test_forecast_over_several_cases(models_dir: Path, tmp_path: Path) -> None:
    model = StepModel.load(models_dir / "forecast.onnx")
    rng = np.random.default_rng(3)
    rows = ["case,f0"] + [f"{c},{v:.4f}" for c in "ab" for v in rng.normal(size=30).cumsum()]
    p = tmp_path / "two.csv"
    p.write_text("\n".join(rows) + "\n")
    data = load(p, case_column="case", feature_columns=["f0"])
    rep = evaluate(model, data, tail=0.5)
    assert rep["n_cases"] == 2
    assert rep["per_horizon"][0]["n_points"] == 2 * 15


# ---------------------------------------------------------------- the command


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_eval_command_prints_the_report_without_torch(models_dir: Path, waterflow: Path) -> None:
    model = models_dir / "forecast.onnx"
    probe = (
        "import sys\nfrom pipeline.cli import main\n"
        "rc = main(sys.argv[1:])\nassert 'torch' not in sys.modules, 'eval imported torch'\n"
        "sys.exit(rc)\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            "eval",
            str(model),
            "--data",
            str(waterflow),
            "--tail",
            "0.2",
            "--feature-columns",
            WATER,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    expected = evaluate(StepModel.load(model), load(waterflow, feature_columns=[WATER]), tail=0.2)
    printed.pop("seconds")
    expected.pop("seconds")
    assert printed == json.loads(json.dumps(expected))


def test_eval_csv_uses_the_models_feature_names(models_dir: Path, tmp_path: Path) -> None:
    p = tmp_path / "named.csv"
    p.write_text("when,f0\n" + "".join(f"2024-01-01T{h:02d}:00:00,{h * 0.5}\n" for h in range(24)))
    run = _cli("eval", str(models_dir / "forecast.onnx"), "--data", str(p))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["tail_fraction"] == 1.0


def _broken_inputs(
    models_dir: Path, basicmotions: tuple[Path, Path], tmp_path: Path
) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (eval arguments, fragments the one error line must contain)."""
    raw = basicmotions[1].read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(raw[:-3000])
    lines = basicmotions[1].read_text().splitlines()
    liar = tmp_path / "liar.ts"
    liar.write_text(
        "\n".join("@dimensions 5" if ln.startswith("@dimensions") else ln for ln in lines) + "\n"
    )
    text_csv = tmp_path / "text.csv"
    text_csv.write_text("f0\n1.5\n2.5\nbroken\n")
    onnx_bytes = (models_dir / "forecast.onnx").read_bytes()
    bad_model = tmp_path / "cut.onnx"
    bad_model.write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    cls = str(models_dir / "lstm-classify.onnx")
    fc = str(models_dir / "forecast.onnx")
    return {
        "truncated_ts": ([cls, "--data", str(cut)], ["cut.ts, line ", "is the file truncated?"]),
        "lying_ts": ([cls, "--data", str(liar)], ["liar.ts, line 14", "@dimensions says 5"]),
        "text_csv": (
            [fc, "--data", str(text_csv)],
            ["text.csv, line 4, column 'f0'", "'broken' is not a number"],
        ),
        "truncated_onnx": (
            [str(bad_model), "--data", str(text_csv)],
            ["cut.onnx", "not a loadable"],
        ),
        "missing_data": ([cls, "--data", str(tmp_path / "nope.ts")], ["nope.ts", "not found"]),
    }


@pytest.mark.parametrize(
    "case",
    ["truncated_ts", "lying_ts", "text_csv", "truncated_onnx", "missing_data"],
)
def test_eval_errors_are_one_line(
    models_dir: Path, basicmotions: tuple[Path, Path], tmp_path: Path, case: str
) -> None:
    args, fragments = _broken_inputs(models_dir, basicmotions, tmp_path)[case]
    run = _cli("--log-level", "WARNING", "eval", *args)
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("seqstream: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_eval_error_at_default_log_level_has_no_traceback(
    models_dir: Path, relabelled: Path
) -> None:
    run = _cli(
        "eval", str(models_dir / "lstm-classify.onnx"), "--data", str(relabelled), "--tail", "0.2"
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "seqstream: error: --tail applies to forecasting and anomaly models only"
    )


# ---------------------------------------------------------------- every family


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("task", ["classify", "forecast", "anomaly", "seq2seq"])
def test_run_stepwise_is_an_oracle_for_every_family(tmp_path: Path, cell: str, task: str) -> None:
    """Any chunking of the stream (1 step per call, 7, all) gives the same outputs."""
    path = tmp_path / "m.onnx"
    export_random(path, cell=cell, task=task, n_features=3, hidden=8, horizon=3, window=6)
    model = StepModel.load(path)
    rng = np.random.default_rng(1)
    cases = [rng.normal(size=(n, 3)).astype(np.float32) * 2 for n in (25, 25, 9)]
    one, seven = run_stepwise(model, cases), run_stepwise(model, cases, chunk=7)
    for case, a, b in zip(cases, one, seven, strict=True):
        full = _full(model, case)
        for name, row in model.spec.output_shapes.items():
            assert a[name].shape == (len(case), *row)
            assert float(np.max(np.abs(a[name] - full[name]))) < 1e-5
            assert float(np.max(np.abs(b[name] - full[name]))) < 1e-5


# ---------------------------------------------------------------- anomaly


def test_anomaly_report_matches_definitions(models_dir: Path, mitdb: Path) -> None:
    model = StepModel.load(models_dir / "anomaly.onnx")
    model.spec = dataclasses.replace(model.spec, threshold=1.2)
    data = load(mitdb, label_column="label", feature_columns=["data"])
    rep = evaluate(model, data, tail=0.2)
    start = split_tail(len(data.cases[0]), 0.2)
    score = _full(model, data.cases[0])["score"][start:].astype(np.float64)
    labels = data.row_labels[0][start:] == "1"  # type: ignore[index]
    assert rep["task"] == "anomaly" and rep["labelled"] is True
    assert rep["n_points"] == len(score) == 1500 and rep["anomalous_rows"] == 352
    assert rep["roc_auc"] == pytest.approx(scoring.roc_auc(score, labels), rel=1e-4)
    assert rep["flagged"] == int(np.sum(score > 1.2)) == rep["at_threshold"]["flagged"]
    assert rep["best_f1"]["f1"] == pytest.approx(scoring.best_f1(score, labels)["f1"], rel=1e-4)
    assert rep["point_adjusted_f1"]["segments"] == 1
    top = int(np.argmax(score))
    assert rep["highest_score"]["row"] == start + top and rep["highest_score"]["case"] == "0"
    assert rep["highest_score"]["in_anomaly"] == bool(labels[top])
    first, last = np.flatnonzero(labels)[[0, -1]]  # mitdb's tail has one labelled region
    near = max(first - top, top - last, 0)
    assert rep["highest_score"]["rows_from_anomaly"] == near
    assert rep["highest_score"]["ucr_hit"] is bool(near <= 100)
    series = data.cases[0][:, 0].astype(np.float64)
    base = scoring.diff_zscore(series, slice(0, start))[start:]
    assert rep["baseline"]["roc_auc"] == pytest.approx(scoring.roc_auc(base, labels))
    json.dumps(rep, allow_nan=False)


def test_anomaly_model_scores_every_row_of_a_file_it_was_not_trained_on(
    models_dir: Path, shared_data: Path
) -> None:
    """ecg-diff-count-3: a model trained on ``_TRAIN_NA`` (its SHA-256 in the metadata,
    a held-out fraction of 0.2) scores all of ``_TEST`` by default, so its three labelled
    regions count (its last 20 % has none: ``roc_auc`` was null)."""
    folder = shared_data / "ecg-diff-count-3"
    options = {"label_column": "is_anomaly", "time_column": "timestamp"}
    trained_on = load(folder / "ecg-diff-count-3_TRAIN_NA.csv", **options)
    test = load(folder / "ecg-diff-count-3_TEST.csv", **options)
    model = StepModel.load(models_dir / "anomaly.onnx")
    model.spec = dataclasses.replace(
        model.spec, data_sha256=trained_on.sha256, extra={"test_fraction": 0.2}
    )
    rep = evaluate(model, test)
    labels = test.row_labels[0] == "1"  # type: ignore[index]
    assert rep["trained_on_this_file"] is False and rep["tail_fraction"] == 1.0
    assert rep["n_points"] == len(labels) == 10_000 and rep["anomalous_rows"] == 300
    score = _full(model, test.cases[0])["score"].astype(np.float64)
    assert rep["roc_auc"] == pytest.approx(scoring.roc_auc(score, labels), rel=1e-4)
    base = scoring.diff_zscore(test.cases[0][:, 0].astype(np.float64))
    assert rep["baseline"]["roc_auc"] == pytest.approx(scoring.roc_auc(base, labels))
    assert rep["point_adjusted_f1"]["segments"] == 3
    assert evaluate(model, test, tail=0.2)["roc_auc"] is None  # the old default's rows


def test_anomaly_without_labels_reports_the_score_distribution(
    models_dir: Path, mitdb: Path
) -> None:
    model = StepModel.load(models_dir / "anomaly.onnx")
    rep = evaluate(model, load(mitdb, feature_columns=["data"]))
    assert rep["labelled"] is False and "roc_auc" not in rep
    assert rep["tail_fraction"] == 1.0 and rep["n_points"] == 7500
    assert rep["score_quantiles"]["1"] >= rep["score_quantiles"]["0.5"]


def test_anomaly_labels_must_be_numbers(models_dir: Path, tmp_path: Path) -> None:
    p = tmp_path / "words.csv"
    p.write_text("v,state\n" + "".join(f"{i % 5},{'bad' if i == 9 else 0}\n" for i in range(30)))
    model = StepModel.load(models_dir / "anomaly.onnx")
    with pytest.raises(DataError, match=r"words.csv: anomaly label 'bad' is not a number"):
        evaluate(model, load(p, label_column="state"))


# ---------------------------------------------------------------- seq2seq and baselines


def test_seq2seq_is_scored_like_any_forecaster(models_dir: Path, waterflow: Path) -> None:
    model = StepModel.load(models_dir / "seq2seq.onnx")
    model.spec = dataclasses.replace(model.spec, season=24)
    data = load(waterflow, feature_columns=[WATER])
    rep = evaluate(model, data, tail=0.2)
    fc = _full(model, data.cases[0])["forecast"]
    series = data.cases[0][:, 0].astype(np.float64)
    mae, naive_mae, n = _brute_force(series, fc, 24, split_tail(len(series), 0.2))
    assert rep["task"] == "seq2seq" and rep["horizon"] == 4 and rep["n_points"] == n
    assert rep["mae"] == pytest.approx(mae, rel=1e-5)
    assert rep["naive_mae"] == pytest.approx(naive_mae)
    per = [h["mase"] for h in rep["per_horizon"]]
    assert rep["mase_mean_over_horizon"] == pytest.approx(np.mean(per))


def _iterate_by_hand(model: StepModel, series: np.ndarray, horizon: int) -> np.ndarray:
    """For each origin: replay the series to it, then feed each forecast back, one call each."""
    out = np.full((len(series), horizon, 1), np.nan)
    for t in range(len(series)):
        state = model.initial_state(1)
        for i in range(t + 1):
            fc, state = model.run(series[None, i : i + 1], state)
        for k in range(horizon):
            nxt = fc["forecast"][0, 0, 0]
            out[t, k] = nxt
            fc, state = model.run(nxt[None, None, :].astype(np.float32), state)
    return out


def test_iterated_forecasts_feed_the_model_its_own_forecasts(
    models_dir: Path, waterflow: Path
) -> None:
    model = StepModel.load(models_dir / "forecast.onnx")
    series = load(waterflow, feature_columns=[WATER]).cases[0][:30]
    got = iterated_forecasts(model, series, 5)
    assert got.shape == (30, 5, 1)
    np.testing.assert_allclose(got, _iterate_by_hand(model, series, 5), rtol=1e-5, atol=1e-4)


def test_iterated_baseline_is_scored_on_the_models_points(
    models_dir: Path, waterflow: Path
) -> None:
    model = StepModel.load(models_dir / "seq2seq.onnx")
    baseline = StepModel.load(models_dir / "forecast.onnx")
    data = load(waterflow, feature_columns=[WATER])
    rep = evaluate(model, data, tail=0.2, baseline=baseline)
    it = rep["iterated_one_step"]
    assert it["iterations"] == 4 and it["n_points"] == rep["n_points"]
    series = data.cases[0].astype(np.float64)
    truth = scoring.horizon_targets(series, 4, start=split_tail(len(series), 0.2))
    err = iterated_forecasts(baseline, data.cases[0], 4) - truth
    assert it["mae"] == pytest.approx(float(np.nanmean(np.abs(err))), rel=1e-5)
    assert it["naive_mae"] == pytest.approx(rep["naive_mae"])
    with pytest.raises(DataError, match="forecasting models only"):
        evaluate(StepModel.load(models_dir / "anomaly.onnx"), data, baseline=baseline)
    with pytest.raises(ModelError, match="targets are all its features"):
        iterated_forecasts(StepModel.load(models_dir / "lstm-classify.onnx"), data.cases[0], 2)


def test_reference_model_change_is_the_difference(models_dir: Path, waterflow: Path) -> None:
    model = StepModel.load(models_dir / "forecast.onnx")
    other = StepModel.load(models_dir / "forecast-b.onnx")
    data = load(waterflow, feature_columns=[WATER])
    rep = evaluate(model, data, tail=0.2, reference=other)
    theirs = evaluate(other, data, tail=0.2)
    assert rep["reference"]["mae"] == theirs["mae"]
    assert rep["change"]["mae"] == pytest.approx(rep["mae"] - theirs["mae"])
    assert rep["change"]["mase"] == pytest.approx(rep["mase"] - theirs["mase"])
    assert "accuracy" not in rep["change"]  # only the figures both reports have


def test_eval_command_scores_an_anomaly_model_with_labels(models_dir: Path, mitdb: Path) -> None:
    run = _cli(
        "eval",
        str(models_dir / "anomaly.onnx"),
        "--data",
        str(mitdb),
        "--label-column",
        "label",
        "--feature-columns",
        "data",
        "--tail",
        "0.2",
    )
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert printed["labelled"] and 0.0 <= printed["roc_auc"] <= 1.0
    assert printed["baseline"]["name"] == "z-score of first differences"
