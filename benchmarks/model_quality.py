"""Default classifiers on the shared UCR/UEA sets, as a new user gets them: one JSON document.

For every data set and seed, exactly the commands a user runs, with no options but the
seed (and ``--budget`` if given here):

    seqstream train --task classify --data X_TRAIN.ts --out DIR --seed S
    seqstream export DIR --out DIR/model.onnx
    seqstream eval DIR/model.onnx --data X_TEST.ts

and reports the streamed test accuracy (``eval`` feeds one step per call with carried
state) at the end and after 25/50/75 % of each case, the training wall time, the
search's choice and validation scores (from ``metrics.json``), and, once per data set
(seed 0), the engine's per-step cost at 1 and 1,000 streams (``seqstream bench``)
beside the previous default, a 2-layer LSTM h64 with the same inputs and classes,
measured right after it in the same run (CPU clock).

    python benchmarks/model_quality.py [--sets arrowhead osuleaf] [--seeds 0 1 2]

Timings depend on the machine and on what else runs on it (``train_cpu_seconds``, the
CPU time of the training process, is steadier on a shared machine than the wall time);
accuracies do not (fixed step counts), unless the budget ran out, which
``stopped_by_budget`` says.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SETS: dict[str, str] = {
    "arrowhead": "ArrowHead",
    "osuleaf": "OSULeaf",
    "pickupgesture": "PickupGestureWiimoteZ",
    "basicmotions": "BasicMotions",
}
# Published bake-off accuracies on the default split (InceptionTime, HIVE-COTE 2).
ANCHORS: dict[str, dict[str, float]] = {
    "arrowhead": {"inceptiontime": 0.863, "hivecote2": 0.869},
    "osuleaf": {"inceptiontime": 0.921, "hivecote2": 0.967},
    "basicmotions": {"inceptiontime": 1.0, "hivecote2": 1.0},
}
TARGETS: dict[str, float] = {
    "arrowhead": 0.86,
    "osuleaf": 0.92,
    "pickupgesture": 0.80,
    "basicmotions": 1.0,
}
COST_RATIO_MAX = 3.0


def _seqstream(*args: str) -> str:
    exe = Path(sys.executable).with_name("seqstream")
    done = subprocess.run(
        [str(exe), *args], check=True, capture_output=True, text=True, env=os.environ.copy()
    )
    return done.stdout


def _bench(model: Path) -> dict[str, float]:
    doc = json.loads(
        _seqstream(
            "bench", str(model), "--streams", "1000", "--steps", "10", "--repeats", "3",
            "--no-torch", "--no-rss", "--clock", "cpu",
        )
    )  # fmt: skip
    return {
        "us_per_step_1_stream": doc["single_stream"]["engine_us"]["median"],
        "us_per_step_1000_streams": doc["streams"][0]["engine_us_per_step"]["median"],
    }


def _reference_lstm(model: Path, out: Path) -> Path:
    """An untrained 2-layer LSTM h64 with ``model``'s features and classes (cost only)."""
    from models.export import export_random
    from pipeline.model import StepModel

    spec = StepModel.load(model).spec
    export_random(
        out, cell="lstm", hidden=64, layers=2, n_features=spec.n_features,
        n_classes=len(spec.labels),
    )  # fmt: skip
    return out


def run_one(key: str, seed: int, budget: float | None, work: Path) -> dict[str, Any]:
    stem = SETS[key]
    out = work / f"{key}-s{seed}"
    args = ["train", "--task", "classify", "--data", str(DATA / key / f"{stem}_TRAIN.ts")]
    args += ["--out", str(out), "--seed", str(seed)]
    if budget is not None:
        args += ["--budget", str(budget)]
    t0, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    _seqstream(*args)
    train_s = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    train_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    model = out / "model.onnx"
    _seqstream("export", str(out), "--out", str(model))
    test = DATA / key / f"{stem}_TEST.ts"
    report = json.loads(_seqstream("eval", str(model), "--data", str(test)))
    metrics = json.loads((out / "metrics.json").read_text())
    search = metrics.get("search", {})
    return {
        "data": key,
        "seed": seed,
        "accuracy": report["accuracy"],
        "accuracy_after_fraction": report["accuracy_after_fraction"],
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu, 1),
        "chosen": search.get("chosen"),
        "candidates": [
            {k: c.get(k) for k in ("name", "val_accuracy", "val_loss", "seconds")}
            for c in search.get("candidates", [])
        ],
        "refit": search.get("refit_on_all_training_cases"),
        "stopped_by_budget": search.get("stopped_by_budget"),
        "model": str(model),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", type=float, help="passed to train (default: train's)")
    p.add_argument("--work", type=Path, help="keep the trained models here")
    p.add_argument("--no-cost", action="store_true", help="skip seqstream bench")
    args = p.parse_args(argv)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": [],
        "summary": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for key in args.sets:
            runs = [run_one(key, s, args.budget, work) for s in args.seeds]
            report["runs"].extend(runs)
            accs = [r["accuracy"] for r in runs]
            summary: dict[str, Any] = {
                "accuracy_by_seed": dict(zip(map(str, args.seeds), accs, strict=True)),
                "target": TARGETS[key],
                "anchors": ANCHORS.get(key, {}),
                "max_train_seconds": max(r["train_seconds"] for r in runs),
                "meets_target": all(a >= TARGETS[key] for a in accs)
                and max(accs) - min(accs) <= 0.02 + 1e-9,
            }
            if not args.no_cost:
                model = Path(runs[0]["model"])
                ref = _reference_lstm(model, work / f"{key}-lstm64.onnx")
                cost, base = _bench(model), _bench(ref)
                summary["cost"] = cost
                summary["reference_lstm64_cost"] = base
                ratio = cost["us_per_step_1000_streams"] / base["us_per_step_1000_streams"]
                summary["cost_ratio_1000_streams"] = round(ratio, 2)
                summary["cost_within_3x"] = ratio <= COST_RATIO_MAX
            report["summary"][key] = summary
            print(json.dumps({key: summary}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
