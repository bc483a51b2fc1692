"""``seqstream bench MODEL.onnx``: the engine against raw onnxruntime, as one JSON document.

Measured in one run, on the same session and the same inputs:

* raw: the tightest Python loop of ``session.run`` carrying state, at batch 1 and at
  every batch size the engine used (plus the IO-binding floor at batch 1);
* the engine: one stream, then N streams arriving interleaved (a fresh random order
  every round), fed to :meth:`Engine.process` in calls of ``--max-batch`` steps, and
  the same calls as arrays to :meth:`Engine.process_batch` (a second engine; no
  :class:`Step` per stream);
* naive: one ``session.run`` per stream per step with a dict of states, what one
  writes first; PyTorch eager per step when torch (and the ``models`` package) is
  importable, imported only then;
* RSS of a fresh process (no torch, no benchmark data) holding the largest stream count;
* the ratios between them, with the targets of issue 3.

Engine and raw calls alternate call by call, so both see the same machine; every
figure is the median (also mean and p99) of per-call times, because on a shared
machine the calls another process preempts land in the tail, not in the middle. The
harness's own objects are frozen out of the garbage collector (``gc.freeze``), as a
daemon should do after start-up; the engine's allocations are collected as usual.
Heavy imports happen inside :func:`run`; torch only in the optional baseline.

It lives in ``models/``, beside the PyTorch nets its eager baseline builds, not in the
runtime package ``pipeline/``: an edge box running the daemon needs none of it, and it
ships in the same distribution, so ``seqstream bench`` works wherever it did.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.commands.parsing import add_model_argument, subcommand

if TYPE_CHECKING:
    import numpy as np

    from pipeline.model import StepModel

    Array = np.ndarray[Any, np.dtype[np.float32]]

# Wall time by default; "cpu" is this thread's CPU time, which time stolen by other
# processes on a shared machine does not inflate.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}

TARGETS = {
    "single_stream_engine_over_raw_max": 1.0,
    "batched_engine_over_raw_min": 0.6,
    "batched_engine_over_naive_min": 8.0,
    "rss_mb_max": 100.0,
}


def register(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "bench",
        run,
        help="benchmark the streaming engine against raw onnxruntime (JSON)",
        description="Measure raw session.run, the engine (1 and N interleaved streams), a "
        "naive per-stream loop and PyTorch eager when installed; print one JSON document.",
    )
    add_model_argument(p)
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
    p.add_argument("--max-batch", type=int, default=256, help="engine max_batch")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the steps")
    p.add_argument(
        "--providers",
        default="cpu",
        help="comma-separated onnxruntime providers, first available wins (cuda,cpu)",
    )
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or this thread's CPU time (steadier on a busy machine)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager baseline")
    p.add_argument("--no-rss", action="store_true", help="skip the RSS probe subprocess")


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
        clock=args.clock,
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
    max_batch: int = 256,
    repeats: int = 5,
    seed: int = 0,
    clock: str = "wall",
    torch_baseline: bool = True,
    rss: bool = True,
) -> dict[str, Any]:
    """Every figure of the report (see the module docstring)."""
    timer = CLOCKS[clock]
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
        "settings": {
            "rounds": rounds,
            "max_batch": max_batch,
            "repeats": repeats,
            "clock": clock,
            "load_average": list(os.getloadavg()),
        },
    }
    xs = rng.standard_normal((single_steps, 1, 1, spec.n_features)).astype(np.float32)
    single = _single_stream(model, xs, repeats, timer)
    if torch_baseline:
        single["torch_eager_us"] = _torch_eager(model, xs[:500], threads, timer)
    report["single_stream"] = single
    report["streams"] = [
        _many_streams(model, n, rounds, max_batch, repeats, rng, timer) for n in streams
    ]
    if rss:
        report["rss"] = _rss(path, providers, threads, max(streams), max_batch)
    report["ratios"], report["targets"] = _ratios(report)
    return report


# -- one stream ---------------------------------------------------------------------------


def _single_stream(
    model: StepModel, xs: Array, repeats: int, clock: Callable[[], float]
) -> dict[str, Any]:
    """Raw session.run (state carried) and Engine.process, alternating step by step."""
    from pipeline.engine.engine import Engine, EngineSettings, Step

    session = model.session
    names = list(model.output_names)
    n_out = len(model.spec.outputs)
    state_names = [s.name for s in model.spec.state]
    x_name = model.spec.input
    engine = Engine(model, EngineSettings(idle_timeout_s=None))
    calls = [[Step("bench", x[0])] for x in xs]
    raw_t: list[float] = []
    eng_t: list[float] = []
    state = model.initial_state(1)
    process = engine.process
    seq = 0
    for rep in range(repeats + 1):  # the first pass warms up
        for call in calls:
            call[0].seq = seq
            seq += 1
        raw_pass: list[float] = []
        eng_pass: list[float] = []
        for x, call in zip(xs, calls, strict=True):
            t0 = clock()
            values = session.run(names, {x_name: x, **state})
            state = dict(zip(state_names, values[n_out:], strict=True))
            t1 = clock()
            process(call)
            t2 = clock()
            raw_pass.append(t1 - t0)
            eng_pass.append(t2 - t1)
        if rep:
            raw_t += raw_pass
            eng_t += eng_pass
    return {
        "steps": len(raw_t),
        "raw_session_run_us": _stats(raw_t),
        "raw_iobinding_floor_us": _stats(_raw_iobinding(model, xs, repeats, clock)),
        "engine_us": _stats(eng_t),
    }


def _raw_iobinding(
    model: StepModel, xs: Array, repeats: int, clock: Callable[[], float]
) -> list[float]:
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
    times = []
    for _ in range(repeats * len(xs)):
        t0 = clock()
        session.run_with_iobinding(io)
        times.append(clock() - t0)
    return times


# -- many streams -------------------------------------------------------------------------


class _Counter:
    """Observer that records the batch sizes of the current call, and counts what a
    clean benchmark must never see (a reset or a rejection would mean steps not run)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.trouble = 0

    def on_batch(self, size: int, seconds: float) -> None:
        self.sizes.append(size)

    def on_reset(self, reason: str, count: int = 1) -> None:
        self.trouble += count

    def on_reject(self, reason: str) -> None:
        self.trouble += 1


def _many_streams(
    model: StepModel,
    n: int,
    rounds: int,
    max_batch: int,
    repeats: int,
    rng: Any,
    clock: Callable[[], float],
) -> dict[str, Any]:
    """N streams, interleaved: the engine call by call, each followed by raw session.run
    on the very batch sizes that call used; then the naive loop over one round."""
    import numpy as np

    from pipeline.engine.engine import Engine, EngineSettings, Step, StepBatch

    f = model.spec.n_features
    data = rng.standard_normal((rounds, n, 1, f)).astype(np.float32)
    keys = [f"stream-{k}" for k in range(n)]
    # Arrivals: every stream once per round, in a fresh random order; calls of max_batch.
    calls: list[list[Step]] = []
    for r in range(rounds):
        order = rng.permutation(n)
        steps = [Step(keys[k], data[r, k]) for k in order]
        calls.extend(steps[lo : lo + max_batch] for lo in range(0, n, max_batch))
    # The same arrivals as arrays (what a source holding arrays submits), through an
    # engine of their own: the keys, values and sequence numbers of each call.
    batches = [
        StepBatch(
            [s.stream for s in call],
            np.stack([s.values for s in call]),
            np.zeros(len(call), dtype=np.int64),
        )
        for call in calls
    ]
    counter = _Counter()
    settings = EngineSettings(
        max_streams=n, max_batch=max_batch, idle_timeout_s=None, initial_capacity=n
    )
    # The harness's own data (every step of every round) stays out of the collector's
    # way, as a daemon's start-up objects should (gc.freeze); the engine's do not.
    gc.collect()
    gc.freeze()
    engine = Engine(model, settings, observer=counter)
    arrays_counter = _Counter()
    arrays = Engine(model, settings, observer=arrays_counter)
    raw = _RawBatched(model, rng)
    eng_t: list[float] = []
    raw_t: list[float] = []
    arr_t: list[float] = []
    sizes: dict[int, int] = {}
    process = engine.process
    per_round = len(calls) // rounds
    for rep in range(repeats + 1):  # the first pass warms up (and creates the streams)
        for c, call in enumerate(calls):
            seq = rep * rounds + c // per_round
            for step in call:
                step.seq = seq
            batches[c].seqs[:] = seq
        for call, batch in zip(calls, batches, strict=True):
            counter.sizes.clear()
            t0 = clock()
            process(call)
            t1 = clock()
            for b in counter.sizes:
                raw.run(b)
            t2 = clock()
            arrays.process_batch(batch)
            t3 = clock()
            if rep:
                eng_t.append((t1 - t0) / len(call))
                raw_t.append((t2 - t1) / len(call))
                arr_t.append((t3 - t2) / len(call))
                for b in counter.sizes:
                    sizes[b] = sizes.get(b, 0) + 1
    latency = []
    for call in calls:  # one more pass, for the latency of a whole call
        for step in call:
            step.seq = (step.seq or 0) + rounds
        t0 = clock()
        process(call)
        latency.append(clock() - t0)
    naive = _naive(model, data, keys, clock)
    gc.unfreeze()
    return {
        "streams": n,
        "steps": len(eng_t) * (n // per_round if per_round else 0),
        "calls": len(eng_t),
        "engine_batch_sizes": {str(b): c for b, c in sorted(sizes.items())},
        "engine_us_per_step": _stats(eng_t),
        "engine_arrays_us_per_step": _stats(arr_t),
        "engine_call_latency_us": _stats(latency),
        "raw_batched_us_per_step": _stats(raw_t),
        "naive_us_per_step": _stats(naive),
        "streams_held": engine.streams,
        "arrays_streams_held": arrays.streams,
        "resets_and_rejections": counter.trouble + arrays_counter.trouble,
    }


class _RawBatched:
    """session.run at any batch size, state carried, inputs prebuilt per size."""

    def __init__(self, model: StepModel, rng: Any) -> None:
        self.model = model
        self.rng = rng
        self.names = list(model.output_names)
        self.n_out = len(model.spec.outputs)
        self.state_names = [s.name for s in model.spec.state]
        self.feeds: dict[int, dict[str, Any]] = {}

    def run(self, batch: int) -> None:
        feeds = self.feeds.get(batch)
        if feeds is None:
            import numpy as np

            f = self.model.spec.n_features
            x = self.rng.standard_normal((batch, 1, f)).astype(np.float32)
            feeds = self.feeds[batch] = {self.model.spec.input: x}
            feeds.update(self.model.initial_state(batch))
        values = self.model.session.run(self.names, feeds)
        feeds.update(zip(self.state_names, values[self.n_out :], strict=True))


def _naive(
    model: StepModel, data: Array, keys: list[str], clock: Callable[[], float]
) -> list[float]:
    """One session.run per stream per step with a dict of states (what one writes first),
    over one round of every stream; per-step times (the cost does not grow with rounds)."""
    session = model.session
    names = list(model.output_names)
    n_out = len(model.spec.outputs)
    state_names = [s.name for s in model.spec.state]
    x_name = model.spec.input
    states: dict[str, dict[str, Any]] = {}
    times = []
    for r in range(min(2, data.shape[0])):  # the first round warms up
        for k, key in enumerate(keys):
            t0 = clock()
            st = states.get(key)
            if st is None:
                st = model.initial_state(1)
            values = session.run(names, {x_name: data[r, k][None], **st})
            states[key] = dict(zip(state_names, values[n_out:], strict=True))
            if r:
                times.append(clock() - t0)
    return times


# -- PyTorch eager, RSS ---------------------------------------------------------------------


def _torch_eager(
    model: StepModel, xs: Array, threads: int, clock: Callable[[], float]
) -> dict[str, float] | None:
    """Per-step times of the same architecture in PyTorch eager (random weights), or None."""
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
        window=spec.window,
    )
    net = build(config, seed=0).eval()
    inputs = [torch.from_numpy(x) for x in xs]
    times = []
    with torch.inference_mode():
        state = net.initial_state(1)
        for i, x in enumerate([*inputs[:20], *inputs]):  # 20 to warm up
            t0 = clock()
            _, state = net(x, state)
            if i >= 20:
                times.append(clock() - t0)
    return _stats(times)


def _rss(path: Path, providers: Sequence[str], threads: int, n: int, max_batch: int) -> Any:
    """RSS of a fresh process (no torch, no benchmark data) holding ``n`` streams."""
    code = (
        "import sys, json; from models.bench import rss_probe; "
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

    from pipeline.engine.engine import Engine, EngineSettings, Step
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
        # RSS = private memory + pages of mapped files (onnxruntime's library code,
        # shared with every process using it and dropped first under memory pressure)
        "rss_mb_anonymous": _rss_mb("RssAnon:"),
        "rss_mb_file_backed": _rss_mb("RssFile:"),
    }


def _rss_mb(field: str = "VmRSS:") -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- timing and ratios ----------------------------------------------------------------------


def _stats(seconds: Sequence[float]) -> dict[str, float]:
    """Median, mean and p99 in microseconds. The median leads: on a shared machine a call
    that another process preempts lands in the tail, not in the middle."""
    import numpy as np

    us = np.asarray(seconds, dtype=np.float64) * 1e6
    if us.size == 0:
        return {"median": float("nan"), "mean": float("nan"), "p99": float("nan")}
    return {
        "median": float(np.median(us)),
        "mean": float(us.mean()),
        "p99": float(np.percentile(us, 99)),
    }


def _ratios(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ratios of median per-step times, and whether each target of issue 3 is met."""
    single = report["single_stream"]
    eng1 = single["engine_us"]["median"]
    ratios: dict[str, Any] = {
        "single_stream_engine_over_raw": eng1 / single["raw_session_run_us"]["median"],
    }
    torch_us = single.get("torch_eager_us")
    if torch_us:
        ratios["single_stream_torch_eager_over_engine"] = torch_us["median"] / eng1
    met: dict[str, Any] = {
        "single_stream_engine_over_raw <= 1.0": ratios["single_stream_engine_over_raw"]
        <= TARGETS["single_stream_engine_over_raw_max"],
    }
    for s in report["streams"]:
        n = s["streams"]
        eng = s["engine_us_per_step"]["median"]
        # Throughput ratios: time per step of the other divided by the engine's.
        over_raw = s["raw_batched_us_per_step"]["median"] / eng
        over_naive = s["naive_us_per_step"]["median"] / eng
        ratios[f"engine_over_raw_batched_{n}_streams"] = over_raw
        ratios[f"engine_over_naive_{n}_streams"] = over_naive
        arr = s["engine_arrays_us_per_step"]["median"]
        arr_over_raw = s["raw_batched_us_per_step"]["median"] / arr
        arr_over_naive = s["naive_us_per_step"]["median"] / arr
        ratios[f"engine_arrays_over_raw_batched_{n}_streams"] = arr_over_raw
        ratios[f"engine_arrays_over_naive_{n}_streams"] = arr_over_naive
        s["engine_steps_per_s"] = 1e6 / eng
        s["engine_arrays_steps_per_s"] = 1e6 / arr
        s["raw_batched_steps_per_s"] = 1e6 / s["raw_batched_us_per_step"]["median"]
        s["naive_steps_per_s"] = 1e6 / s["naive_us_per_step"]["median"]
        if n == 1000:
            met["engine_over_raw_batched_1000_streams >= 0.6"] = (
                over_raw >= TARGETS["batched_engine_over_raw_min"]
            )
            met["engine_over_naive_1000_streams >= 8"] = (
                over_naive >= TARGETS["batched_engine_over_naive_min"]
            )
            met["engine_arrays_over_raw_batched_1000_streams >= 0.6"] = (
                arr_over_raw >= TARGETS["batched_engine_over_raw_min"]
            )
            met["engine_arrays_over_naive_1000_streams >= 8"] = (
                arr_over_naive >= TARGETS["batched_engine_over_naive_min"]
            )
    rss = report.get("rss")
    if isinstance(rss, dict) and "rss_mb" in rss and rss.get("streams") == 10_000:
        met["rss_mb_10000_streams < 100"] = rss["rss_mb"] < TARGETS["rss_mb_max"]
    return ratios, met
