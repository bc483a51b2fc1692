"""``seqstream bench MODEL.onnx``: the engine against raw onnxruntime, as one JSON document.

Measured in one run, on the same session and the same inputs:

* raw: the tightest Python loop of ``session.run`` carrying state, at batch 1 and at
  every batch size the engine used;
* the engine: one stream, then N streams arriving interleaved (a fresh random order
  every round), fed to :meth:`Engine.process` in chunks of ``--max-batch``;
* naive: one ``session.run`` per stream per step with a dict of states, what one
  writes first; PyTorch eager per step when torch (and the ``models`` package) is
  importable, imported only then;
* RSS of a fresh process holding the largest stream count;
* the ratios between them, with the targets of issue 3.

Noise from other processes is damped by alternating raw and engine passes and
reporting medians over ``--repeats``. Heavy imports happen inside :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from pipeline.engine import Step
    from pipeline.model import StepModel

    Array = np.ndarray[Any, np.dtype[np.float32]]

TARGETS = {
    "single_stream_engine_over_raw_max": 1.0,
    "batched_engine_over_raw_min": 0.6,
    "batched_engine_over_naive_min": 8.0,
    "rss_mb_max": 100.0,
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the streaming engine against raw onnxruntime (JSON)",
        description="Measure raw session.run, the engine (1 and N interleaved streams), a "
        "naive per-stream loop and PyTorch eager when installed; print one JSON document.",
    )
    p.add_argument("model", type=Path, help="MODEL.onnx written by 'seqstream export'")
    p.add_argument(
        "--streams",
        type=int,
        nargs="+",
        default=[1000, 10_000],
        metavar="N",
        help="stream counts to run interleaved (default: 1000 10000)",
    )
    p.add_argument("--steps", type=int, default=20, help="rounds (steps per stream) for N streams")
    p.add_argument("--single-steps", type=int, default=2000, help="steps of the single-stream runs")
    p.add_argument("--max-batch", type=int, default=1024, help="engine max_batch")
    p.add_argument("--repeats", type=int, default=5, help="alternating passes; medians kept")
    p.add_argument(
        "--providers",
        default="cpu",
        help="comma-separated onnxruntime providers, first available wins (cuda,cpu)",
    )
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager baseline")
    p.add_argument("--no-rss", action="store_true", help="skip the RSS probe subprocess")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError

    for name in ("steps", "single_steps", "max_batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if any(n < 1 for n in args.streams):
        raise ConfigError("--streams values must be >= 1")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    report = benchmark(
        args.model,
        providers=providers,
        threads=args.threads,
        streams=args.streams,
        rounds=args.steps,
        single_steps=args.single_steps,
        max_batch=args.max_batch,
        repeats=args.repeats,
        seed=args.seed,
        torch_baseline=not args.no_torch,
        rss=not args.no_rss,
    )
    print(json.dumps(report, indent=2))
    return 0


def benchmark(
    path: Path,
    *,
    providers: Sequence[str] = ("cpu",),
    threads: int = 1,
    streams: Sequence[int] = (1000, 10_000),
    rounds: int = 20,
    single_steps: int = 2000,
    max_batch: int = 1024,
    repeats: int = 5,
    seed: int = 0,
    torch_baseline: bool = True,
    rss: bool = True,
) -> dict[str, Any]:
    """Every figure of the report (see the module docstring)."""
    import numpy as np
    import onnxruntime as ort

    from pipeline.model import StepModel

    model = StepModel.load(path, providers=providers, threads=threads)
    spec = model.spec
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {
        "model": {
            "path": str(path),
            "name": spec.name,
            "cell": spec.cell,
            "layers": spec.layers,
            "hidden": spec.hidden,
            "features": spec.n_features,
            "task": spec.task,
        },
        "machine": {
            "provider": model.provider,
            "intra_op_threads": threads,
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "settings": {"rounds": rounds, "max_batch": max_batch, "repeats": repeats},
    }
    xs = rng.standard_normal((single_steps, 1, 1, spec.n_features)).astype(np.float32)
    single = _single_stream(model, xs, repeats)
    if torch_baseline:
        single["torch_eager_us"] = _torch_eager(model, xs[: min(single_steps, 500)], threads)
    report["single_stream"] = single
    report["streams"] = [_many_streams(model, n, rounds, max_batch, repeats, rng) for n in streams]
    if rss:
        report["rss"] = _rss(path, providers, threads, max(streams), max_batch)
    report["ratios"], report["targets"] = _ratios(report)
    return report


# -- one stream ---------------------------------------------------------------------------


def _single_stream(model: StepModel, xs: Array, repeats: int) -> dict[str, Any]:
    import numpy as np

    from pipeline.engine import Engine, EngineSettings, Step

    session = model.session
    names = list(model.output_names)
    n_out = len(model.spec.outputs)
    state_names = [s.name for s in model.spec.state]
    x_name = model.spec.input

    def raw() -> None:
        state = model.initial_state(1)
        for x in xs:
            feeds = {x_name: x, **state}
            values = session.run(names, feeds)
            state = dict(zip(state_names, values[n_out:], strict=True))

    engine = Engine(model, EngineSettings(idle_timeout_s=None))
    seq = [0]
    batches = [[Step("bench", x[0])] for x in xs]

    def renumber() -> None:
        base = seq[0]
        for i, call in enumerate(batches):
            call[0].seq = base + i
        seq[0] = base + len(batches)

    def eng() -> None:
        process = engine.process
        for call in batches:
            process(call)

    raw_us, eng_us = _alternate([raw, eng], repeats, len(xs), prepare={1: renumber})
    renumber()
    latencies = []
    for call in batches:
        t = time.perf_counter()
        engine.process(call)
        latencies.append(time.perf_counter() - t)
    lat = np.asarray(latencies) * 1e6
    return {
        "steps": len(xs),
        "raw_session_run_us": raw_us,
        "raw_iobinding_us": _raw_iobinding(model, xs, repeats),
        "engine_us": eng_us,
        "engine_latency_us": {
            "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)),
        },
    }


def _raw_iobinding(model: StepModel, xs: Array, repeats: int) -> float:
    """The floor: run_with_iobinding on bound buffers, no state carried, nothing else."""
    import numpy as np

    session = model.session
    io = session.io_binding()
    io.bind_cpu_input(model.spec.input, np.ascontiguousarray(xs[0]))
    for name, arr in model.initial_state(1).items():
        io.bind_cpu_input(name, arr)
    for name in model.output_names:
        io.bind_output(name, "cpu")
    session.run_with_iobinding(io)  # outputs allocated once, reused after

    def loop() -> None:
        for _ in range(len(xs)):
            session.run_with_iobinding(io)

    (us,) = _alternate([loop], repeats, len(xs))
    return us


# -- many streams -------------------------------------------------------------------------


class _Counter:
    """Observer that records batch sizes (what the raw baseline must match)."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}

    def on_batch(self, size: int, seconds: float) -> None:
        self.sizes[size] = self.sizes.get(size, 0) + 1

    def on_reset(self, reason: str, count: int = 1) -> None:
        pass

    def on_reject(self, reason: str) -> None:
        pass


def _many_streams(
    model: StepModel, n: int, rounds: int, max_batch: int, repeats: int, rng: Any
) -> dict[str, Any]:
    import numpy as np

    from pipeline.engine import Engine, EngineSettings, Step

    f = model.spec.n_features
    data = rng.standard_normal((rounds, n, 1, f)).astype(np.float32)
    keys = [f"stream-{k}" for k in range(n)]
    # Arrival order: every stream once per round, shuffled; calls of max_batch steps.
    calls: list[list[Step]] = []
    for r in range(rounds):
        order = rng.permutation(n)
        steps = [Step(keys[k], data[r, k], seq=r) for k in order]
        calls.extend(steps[lo : lo + max_batch] for lo in range(0, n, max_batch))
    counter = _Counter()
    settings = EngineSettings(
        max_streams=max(n, 1), max_batch=max_batch, idle_timeout_s=None, initial_capacity=n
    )
    engine = Engine(model, settings, observer=counter)
    offset = [0]

    def renumber() -> None:
        """Sequence numbers continue pass after pass (not timed)."""
        base = offset[0]
        if base:
            for call in calls:
                for s in call:
                    s.seq = (s.seq or 0) % rounds + base
        offset[0] = base + rounds

    def eng() -> None:
        process = engine.process
        for call in calls:
            process(call)

    renumber()
    eng()  # warm-up: creates every stream and the binding plans
    sizes = dict(counter.sizes)
    counter.sizes.clear()
    raw_loops = {b: _raw_batched_loop(model, b, rounds, rng) for b in sizes}

    def raw() -> None:
        for b, count in sizes.items():
            raw_loops[b](count)

    total_steps = rounds * n
    raw_us, eng_us, naive_us_step = _alternate(
        [raw, eng, _naive_loop(model, data, keys)],
        repeats,
        total_steps,
        last_divisor=n,
        prepare={1: renumber},
    )
    # Per-call latency: every step in a call waits for the whole call.
    renumber()
    latencies = []
    for call in calls:
        t = time.perf_counter()
        engine.process(call)
        latencies.append(time.perf_counter() - t)
    lat = np.asarray(latencies) * 1e6
    return {
        "streams": n,
        "steps": total_steps,
        "engine_batch_sizes": {str(b): c for b, c in sorted(sizes.items())},
        "engine_steps_per_s": 1e6 / eng_us,
        "engine_us_per_step": eng_us,
        "engine_call_latency_us": {
            "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)),
        },
        "raw_batched_steps_per_s": 1e6 / raw_us,
        "raw_batched_us_per_step": raw_us,
        "naive_steps_per_s": 1e6 / naive_us_step,
        "naive_us_per_step": naive_us_step,
        "streams_held": engine.streams,
    }


def _raw_batched_loop(model: StepModel, batch: int, rounds: int, rng: Any) -> Callable[[int], None]:
    """``loop(k)``: k calls of session.run at ``batch``, state carried, inputs prebuilt."""
    import numpy as np

    session = model.session
    names = list(model.output_names)
    n_out = len(model.spec.outputs)
    state_names = [s.name for s in model.spec.state]
    x_name = model.spec.input
    xs = rng.standard_normal((rounds, batch, 1, model.spec.n_features)).astype(np.float32)
    state = [model.initial_state(batch)]

    def loop(k: int) -> None:
        st = state[0]
        for i in range(k):
            values = session.run(names, {x_name: xs[i % rounds], **st})
            st = dict(zip(state_names, values[n_out:], strict=True))
        state[0] = st

    return loop


def _naive_loop(model: StepModel, data: Array, keys: list[str]) -> Callable[[], None]:
    """One session.run per stream per step with a dict of states: one round of all streams.

    Per-step cost does not depend on the round count, so one round keeps it quick.
    """
    session = model.session
    names = list(model.output_names)
    n_out = len(model.spec.outputs)
    state_names = [s.name for s in model.spec.state]
    x_name = model.spec.input
    states: dict[str, dict[str, Any]] = {}

    def loop() -> None:
        for k, key in enumerate(keys):
            st = states.get(key)
            if st is None:
                st = model.initial_state(1)
            values = session.run(names, {x_name: data[0, k][None], **st})
            states[key] = dict(zip(state_names, values[n_out:], strict=True))

    return loop


# -- PyTorch eager, RSS ---------------------------------------------------------------------


def _torch_eager(model: StepModel, xs: Array, threads: int) -> float | None:
    """Per-step time of the same architecture in PyTorch eager (random weights), or None."""
    try:
        import torch

        from models.nets import NetConfig, build
    except ImportError:
        return None
    spec = model.spec
    torch.set_num_threads(threads)
    targets = tuple(spec.features.index(t) for t in spec.targets)
    config = NetConfig(
        task=spec.task,
        cell=spec.cell,
        n_features=spec.n_features,
        hidden=spec.hidden,
        layers=spec.layers,
        n_classes=len(spec.labels),
        targets=targets,
        horizon=max(spec.horizon, 1),
        mean=spec.normalisation.mean,
        std=spec.normalisation.std,
    )
    net = build(config, seed=0).eval()
    inputs = [torch.from_numpy(x) for x in xs]

    def loop() -> None:
        with torch.inference_mode():
            state = net.initial_state(1)
            for x in inputs:
                _, state = net(x, state)

    (us,) = _alternate([loop], 3, len(inputs))
    return us


def _rss(path: Path, providers: Sequence[str], threads: int, n: int, max_batch: int) -> Any:
    """RSS of a fresh process (no torch, no benchmark data) holding ``n`` streams."""
    code = (
        "import sys, json; from pipeline.commands.bench import rss_probe; "
        f"print(json.dumps(rss_probe({str(path)!r}, {list(providers)!r}, {threads}, {n}, "
        f"{max_batch})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc


def rss_probe(path: str, providers: list[str], threads: int, n: int, max_batch: int) -> Any:
    """Run in the probe subprocess: load, run ``n`` streams for 3 rounds, report RSS."""
    import numpy as np

    from pipeline.engine import Engine, EngineSettings, Step
    from pipeline.model import StepModel

    before = _rss_mb()
    model = StepModel.load(path, providers=providers, threads=threads)
    loaded = _rss_mb()
    settings = EngineSettings(max_streams=n, max_batch=max_batch, idle_timeout_s=None)
    engine = Engine(model, settings)
    rng = np.random.default_rng(0)
    f = model.spec.n_features
    for r in range(3):
        x = rng.standard_normal((n, 1, f)).astype(np.float32)
        for lo in range(0, n, max_batch):
            engine.process([Step(f"s{k}", x[k], seq=r) for k in range(lo, min(n, lo + max_batch))])
    return {
        "streams": engine.streams,
        "rss_mb_interpreter": before,
        "rss_mb_model_loaded": loaded,
        "rss_mb": _rss_mb(),
    }


def _rss_mb() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- timing and ratios ----------------------------------------------------------------------


def _alternate(
    loops: Sequence[Callable[[], None]],
    repeats: int,
    divisor: int,
    last_divisor: int = 0,
    prepare: dict[int, Callable[[], None]] | None = None,
) -> list[float]:
    """Median microseconds per step of each loop, the loops run alternately ``repeats`` times.

    Alternating spreads background noise over all of them alike. ``last_divisor``
    overrides ``divisor`` for the last loop (one that runs a different step count);
    ``prepare[k]`` runs untimed before each run of loop k.
    """
    prepare = prepare or {}
    for k, loop in enumerate(loops):
        if k in prepare:
            prepare[k]()
        loop()  # warm-up
    times: list[list[float]] = [[] for _ in loops]
    for _ in range(repeats):
        for k, loop in enumerate(loops):
            if k in prepare:
                prepare[k]()
            t = time.perf_counter()
            loop()
            times[k].append(time.perf_counter() - t)
    out = []
    for k, ts in enumerate(times):
        d = last_divisor if (last_divisor and k == len(loops) - 1) else divisor
        out.append(statistics.median(ts) / d * 1e6)
    return out


def _ratios(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    single = report["single_stream"]
    ratios: dict[str, Any] = {
        "single_stream_engine_over_raw": single["engine_us"] / single["raw_session_run_us"],
    }
    if single.get("torch_eager_us"):
        ratios["single_stream_torch_eager_over_engine"] = (
            single["torch_eager_us"] / single["engine_us"]
        )
    met: dict[str, Any] = {
        "single_stream_engine_over_raw <= 1.0": ratios["single_stream_engine_over_raw"]
        <= TARGETS["single_stream_engine_over_raw_max"],
    }
    for s in report["streams"]:
        n = s["streams"]
        over_raw = s["engine_steps_per_s"] / s["raw_batched_steps_per_s"]
        over_naive = s["engine_steps_per_s"] / s["naive_steps_per_s"]
        ratios[f"engine_over_raw_batched_{n}_streams"] = over_raw
        ratios[f"engine_over_naive_{n}_streams"] = over_naive
        if n == 1000:
            met["engine_over_raw_batched_1000_streams >= 0.6"] = (
                over_raw >= TARGETS["batched_engine_over_raw_min"]
            )
            met["engine_over_naive_1000_streams >= 8"] = (
                over_naive >= TARGETS["batched_engine_over_naive_min"]
            )
    rss = report.get("rss")
    if isinstance(rss, dict) and "rss_mb" in rss and rss.get("streams") == 10_000:
        met["rss_mb_10000_streams < 100"] = rss["rss_mb"] < TARGETS["rss_mb_max"]
    return ratios, met
