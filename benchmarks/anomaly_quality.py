"""Anomaly models with the shipped defaults on the real ECG sets, against the baseline.

Prints one JSON document. For each data set and seed: ``seqstream train --task
anomaly`` with defaults, export, ``verify`` (stepwise ONNX == full-sequence PyTorch),
and ``seqstream eval`` of the ONNX step model, as a user runs them:

* ``ecg-diff-count-3``: trained on ``_TRAIN_NA`` (normal only), scored on every row of
  ``_TEST`` (eval's default on a file the model was not trained on);
* ``mitdb``: trained on the file's head (labelled rows left out), scored on the whole
  file (``--tail 1``) and on its held-out tail (eval's default on the training file).

Each score reports ROC AUC, the highest score's row (inside a labelled region? within
100 rows of one: a hit under the UCR anomaly archive's protocol), best and
point-adjusted F1, beside eval's own baseline (the z-score of first differences) on
the same rows; ``summary`` gives the worst seed. Training times are wall-clock on
whatever else the machine runs.

    python benchmarks/anomaly_quality.py [--seeds 0 1 2] [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.export import export_checkpoint  # noqa: E402
from models.train import TrainConfig, train  # noqa: E402
from models.verify import verify  # noqa: E402
from pipeline.model import StepModel  # noqa: E402
from pipeline.offline import datasets  # noqa: E402
from pipeline.offline.evaluation import evaluate  # noqa: E402

# name -> (training file, scored file, dataset options)
SETS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ecg-diff-count-3": (
        "ecg-diff-count-3/ecg-diff-count-3_TRAIN_NA.csv",
        "ecg-diff-count-3/ecg-diff-count-3_TEST.csv",
        {"label_column": "is_anomaly", "time_column": "timestamp"},
    ),
    "mitdb": ("mitdb/mitdb.csv", "mitdb/mitdb.csv", {"label_column": "label"}),
}


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    def one(r: dict[str, Any]) -> dict[str, Any]:
        top = r["highest_score"]
        return {
            "roc_auc": r["roc_auc"],
            "top_row": top["row"],
            "top_in_anomaly": top["in_anomaly"],
            "top_rows_from_anomaly": top["rows_from_anomaly"],
            "ucr_hit": top["ucr_hit"],
            "best_f1": r["best_f1"]["f1"],
            "point_adjusted_f1": r["point_adjusted_f1"]["f1"],
        }

    return {
        "tail_fraction": report["tail_fraction"],
        "n_points": report["n_points"],
        "anomalous_rows": report["anomalous_rows"],
        "model": one(report),
        "baseline": one(report["baseline"]),
    }


def run_one(name: str, seed: int, shared: Path, work: Path) -> dict[str, Any]:
    train_file, test_file, options = SETS[name]
    out = work / f"{name}-{seed}"
    cfg = TrainConfig.for_task(
        task="anomaly",
        data=str(shared / train_file),
        out=str(out),
        seed=seed,
        data_options=options,
    )
    started = time.monotonic()
    metrics = train(cfg)
    seconds = time.monotonic() - started
    onnx_path = out / "m.onnx"
    export_checkpoint(out, onnx_path)
    checked = verify(onnx_path, out)
    model = StepModel.load(onnx_path)
    data = datasets.load(shared / test_file, feature_columns=list(model.spec.features), **options)
    result: dict[str, Any] = {
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "epochs_run": metrics["epochs_run"],
        "window": model.spec.window,
        "verify": {
            "ok": checked.ok,
            "stepwise_vs_full": checked.stepwise_vs_full,
            "onnx_vs_torch": checked.onnx_vs_torch,
        },
        "default": _figures(evaluate(model, data)),
    }
    if train_file == test_file:
        result["whole_file"] = _figures(evaluate(model, data, tail=1.0))
    else:
        result["whole_file"] = result["default"]
    return result


def summary(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    model = [r[key]["model"] for r in runs]
    base = runs[0][key]["baseline"]  # the baseline has no seed
    return {
        "roc_auc_min": min(m["roc_auc"] for m in model),
        "roc_auc_mean": sum(m["roc_auc"] for m in model) / len(model),
        "baseline_roc_auc": base["roc_auc"],
        "beats_baseline_every_seed": all(m["roc_auc"] > base["roc_auc"] for m in model),
        "ucr_hits": sum(bool(m["ucr_hit"]) for m in model),
        "top_inside": sum(bool(m["top_in_anomaly"]) for m in model),
        "baseline_ucr_hit": base["ucr_hit"],
        "seeds": len(model),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    p.add_argument(
        "--shared",
        type=Path,
        default=Path(os.environ.get("SEQSTREAM_SHARED", REPO.parent / "shared")) / "data",
    )
    args = p.parse_args()
    doc: dict[str, Any] = {"benchmark": "anomaly_quality", "sets": {}}
    with tempfile.TemporaryDirectory() as d:
        for name in args.sets:
            runs = [run_one(name, seed, args.shared, Path(d)) for seed in args.seeds]
            doc["sets"][name] = {
                "runs": runs,
                "summary": {key: summary(runs, key) for key in ("whole_file", "default")},
            }
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
