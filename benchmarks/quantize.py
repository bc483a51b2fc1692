"""int8 against float for one trained model: speed, output difference, metric change.

Prints one JSON document, everything measured in the same run on the same inputs:

* ``speed``: microseconds per ``session.run`` of one step with carried state, for 1 and
  for 64 streams per call (``--batch``), float and int8 calls alternating so a busy
  machine slows both alike (median and p90 of per-call times; one intra-op thread, as
  the daemon runs); ``speedup`` = float median / int8 median.
* ``verify``: :func:`models.verify.verify` of the int8 model against the float one
  (``vs_float``: largest output difference relative to the output's size).
* ``metrics`` (with ``--data``): ``seqstream eval`` of both models on the data, and the
  change of the headline figures (int8 minus float).
* ``size_bytes`` of both files.

    python benchmarks/quantize.py RUN_DIR [--data PATH --label-column label ...]

``RUN_DIR`` is a ``seqstream train`` directory: both models are exported from it into
a temporary directory (or pass ``--float`` and ``--int8`` to use existing files).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.commands.data_args import add_data_arguments, data_options  # noqa: E402
from pipeline.model import StepModel  # noqa: E402
from pipeline.offline import datasets  # noqa: E402
from pipeline.offline.evaluation import evaluate, headline  # noqa: E402


def _times(models: list[StepModel], batch: int, calls: int, seed: int) -> list[dict[str, float]]:
    """Per-call microseconds of one step for each model, calls interleaved model by model."""
    rng = np.random.default_rng(seed)
    spec = models[0].spec
    norm = spec.normalisation
    xs = (
        np.asarray(norm.mean)
        + rng.standard_normal((calls + 20, batch, 1, spec.n_features)) * np.asarray(norm.std)
    ).astype(np.float32)
    states = [m.initial_state(batch) for m in models]
    feeds = [dict(s) for s in states]
    times: list[list[float]] = [[] for _ in models]
    names = [(m.spec.outputs + tuple(s.output for s in m.spec.state)) for m in models]
    for i in range(calls + 20):
        for k, m in enumerate(models):
            feeds[k][m.spec.input] = xs[i]
            t0 = time.perf_counter()
            values = m.session.run(names[k], feeds[k])
            dt = time.perf_counter() - t0
            n = len(m.spec.outputs)
            for j, s in enumerate(m.spec.state):
                feeds[k][s.name] = values[n + j]
            if i >= 20:  # warm-up calls are not counted
                times[k].append(dt * 1e6)
    return [
        {
            "median_us": float(np.median(t)),
            "p90_us": float(np.percentile(t, 90)),
            "mean_us": float(np.mean(t)),
        }
        for t in times
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from models.export import export_checkpoint, quantize_int8
    from models.verify import verify

    with tempfile.TemporaryDirectory() as d:
        f_path = args.float or Path(d) / "float.onnx"
        q_path = args.int8 or Path(d) / "int8.onnx"
        if args.float is None:
            export_checkpoint(args.run, f_path)
        if args.int8 is None:
            quantize_int8(f_path, q_path)
        f_model = StepModel.load(f_path, threads=1)
        q_model = StepModel.load(q_path, threads=1)
        report: dict[str, Any] = {
            "model": f_model.spec.name,
            "task": f_model.spec.task,
            "cell": f_model.spec.cell,
            "quantization": q_model.spec.extra.get("quantization"),
            "size_bytes": {"float": f_path.stat().st_size, "int8": q_path.stat().st_size},
            "machine": {"python": platform.python_version(), "processor": platform.machine()},
        }
        speed: dict[str, Any] = {}
        for batch in args.batch:
            f_t, q_t = _times([f_model, q_model], batch, args.calls, seed=batch)
            speed[f"batch_{batch}"] = {
                "float": f_t,
                "int8": q_t,
                "speedup": f_t["median_us"] / q_t["median_us"],
            }
        report["speed"] = speed
        x = None
        data = None
        if args.data is not None:
            options = data_options(args)
            if args.data.suffix.lower() == ".csv" and not options["feature_columns"]:
                options["feature_columns"] = list(f_model.spec.features)
            data = datasets.load(args.data, **options)
            steps = min(min(data.lengths), 500)
            x = np.stack([c[:steps] for c in data.cases[:8]]).astype(np.float32)
        checked = verify(q_path, args.run if args.float is None else None, x=x, reference=f_path)
        report["verify"] = checked.to_dict()
        if data is not None:
            f_rep = headline(evaluate(f_model, data))
            q_rep = headline(evaluate(q_model, data))
            change: dict[str, float | None] = {}
            for key, before in f_rep.items():
                after = q_rep.get(key)
                change[key] = after - before if after is not None and before is not None else None
            report["metrics"] = {
                "data": str(args.data),
                "float": f_rep,
                "int8": q_rep,
                "change": change,
            }
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="training directory (seqstream train --out)")
    p.add_argument("--float", type=Path, help="use this float model instead of exporting")
    p.add_argument("--int8", type=Path, help="use this int8 model instead of quantising")
    p.add_argument("--data", type=Path, help="data to score both models on (eval)")
    p.add_argument("--calls", type=int, default=2000, help="timed calls per batch size")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="streams per call")
    add_data_arguments(p)
    args = p.parse_args()
    json.dump(run(args), sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
