"""The streaming engine: steps of many streams in, predictions out, one session for all.

:class:`Engine` is the synchronous core, owned by one thread. One :meth:`Engine.process`
call validates every step (before anything touches state), admits it against its
stream (:meth:`StateStore.admit_many`: a call of known streams continuing without a
reset is admitted with array operations), then runs the admitted steps in *waves*: wave k
holds the k-th step of each stream in the call, so a stream's steps run in order and
never in the same batch. Inside a wave, steps with the same number of rows T share
one ``session.run`` (a batch of mixed T would need padding, and padded rows would run
through the recurrence and corrupt the state). The store keeps state in the model's
own layout, so a batch's state is gathered straight into the preallocated, IO-bound
input buffers (:class:`~pipeline.engine.runner.Runner`) with one ``take`` and put back with
one ``put``; a stream that steps alone call after call runs in place on a pair of twin
rows instead (no copies), so one stream costs no more than a plain ``session.run``.
Nothing on this path logs.

:meth:`Engine.process_batch` takes the same steps as arrays (:class:`StepBatch`), for a
source that already holds them: its plain case (distinct known streams continuing, clean
float32 values) is validated by a few array checks and makes no object per step; any
other batch goes through :meth:`Engine.process`, so both paths decide alike.

:class:`~pipeline.engine.worker.Worker` is the engine's thread: a bounded queue in front of
``process``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np

from pipeline.engine.runner import SMALL, Plan, Runner
from pipeline.engine.store.state import (
    ADMIT_REJECT_REASONS,
    MAX_SEQ,
    REPEAT,
    RESET_ENGINE_ERROR,
    RESET_EXPLICIT,
    RESET_MODEL_CHANGE,
    RESET_NON_FINITE,
    StateStore,
    StorePolicy,
    Stream,
)
from pipeline.errors import ConfigError
from pipeline.model import StepModel

log = logging.getLogger(__name__)

Array = np.ndarray[Any, np.dtype[np.float32]]
T = TypeVar("T")

_F32 = np.dtype(np.float32)
_INF = math.inf


# Why a step is rejected before it reaches a stream (state.py adds duplicate,
# out_of_order and capacity).
REJECT_BAD_STEP = "bad_step"  # not a Step at all
REJECT_BAD_STREAM = "bad_stream"  # stream key is not a non-empty string
REJECT_BAD_TYPE = "bad_type"  # values is not a numpy array
REJECT_BAD_DTYPE = "bad_dtype"  # values is not float32
REJECT_BAD_RANK = "bad_rank"  # values is not [T, F]
REJECT_BAD_FEATURES = "bad_features"  # F differs from the model's feature count
REJECT_EMPTY = "empty"  # T == 0
REJECT_TOO_LONG = "too_long"  # T > max_chunk
REJECT_BAD_SEQ = "bad_seq"  # seq is not an int in 0 .. MAX_SEQ - 1
REJECT_BAD_TS = "bad_ts"  # ts is not a finite number
REJECT_NON_FINITE = "non_finite"  # values hold NaN or Inf
REJECT_ENGINE_ERROR = "engine_error"  # onnxruntime failed on the batch (stream reset)
# Every reason a Rejected can carry, for counters that start at zero.
REJECT_REASONS: tuple[str, ...] = (
    REJECT_BAD_STEP,
    REJECT_BAD_STREAM,
    REJECT_BAD_TYPE,
    REJECT_BAD_DTYPE,
    REJECT_BAD_RANK,
    REJECT_BAD_FEATURES,
    REJECT_EMPTY,
    REJECT_TOO_LONG,
    REJECT_BAD_SEQ,
    REJECT_BAD_TS,
    REJECT_NON_FINITE,
    REJECT_ENGINE_ERROR,
    *ADMIT_REJECT_REASONS,
)


@dataclass(slots=True)
class Step:
    """Rows ``seq, seq+1, ...`` of one stream: float32 ``[T, F]`` in raw units, T >= 1."""

    stream: str
    values: Array
    seq: int | None = None  # sequence number of the first row
    ts: float | None = None  # timestamp of the first row (seconds)
    received: float = 0.0  # time.monotonic() at arrival, for end-to-end latency


_NONE = type(None)
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")


class _Fields(NamedTuple):
    step: Step
    block: dict[str, Array]  # row < 0: this step's outputs; else each the batch's [B, T, ...]
    resets: tuple[str, ...] = ()
    row: int = -1


class Result(_Fields):
    """The model's outputs for one step (each ``[T, ...]``) and the resets applied just before.

    The results of one batch share the batch's output block (``row`` is the step's row
    in it): a per-step dict of views would cost more than the model's own arithmetic at
    a thousand streams. :attr:`outputs` builds the dict when read; :meth:`output` reads
    one output without it. A named tuple, so that a batch's results are made by one
    C-level ``map`` (:func:`_results`) instead of a Python ``__init__`` per step, and its
    fields read as fast as slots; it compares by identity, like any object.
    """

    __slots__ = ()
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__

    @property
    def outputs(self) -> dict[str, Array]:
        row = self.row
        if row < 0:
            return self.block
        return {name: b[row] for name, b in self.block.items()}

    def output(self, name: str) -> Array:
        """One output, ``[T, ...]`` (a view; copy it to keep it past the next result)."""
        row = self.row
        return self.block[name] if row < 0 else self.block[name][row]

    def __repr__(self) -> str:
        return f"Result(step={self.step!r}, outputs={self.outputs!r}, resets={self.resets!r})"


_new_tuple = tuple.__new__


def _results(steps: Sequence[Step], block: dict[str, Array], rows: range) -> list[Result]:
    """Results of ``steps`` without resets, at ``rows`` of a batch's output block."""
    n = len(steps)
    made = zip(steps, repeat(block, n), repeat((), n), rows, strict=True)
    return list(map(_new_tuple, repeat(Result, n), made))


@dataclass(slots=True)
class Rejected:
    """A step the engine did not run; ``reason`` is a stable snake_case word for counting."""

    step: Step
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class StepBatch:
    """One step from each of N streams, as arrays: what a source that already holds
    arrays (a gateway's frame of many sensors, a replay) submits without a
    :class:`Step` per stream.

    ``values[i]`` (``[T, F]`` float32) continues ``streams[i]``; ``seqs``/``ts`` (None:
    the steps carry none) give each step's first sequence number / timestamp.
    :meth:`Engine.process_batch` judges each step exactly as :meth:`Engine.process`
    would judge ``Step(streams[i], values[i], seqs[i], ts[i])``; only the container is
    checked here (lengths that disagree are a programming error, not bad input).
    """

    streams: Sequence[str]
    values: Array  # [N, T, F]
    seqs: Any = None  # int [N] (an array or a sequence of ints), or None
    ts: Any = None  # float [N], or None

    def __post_init__(self) -> None:
        n = len(self.streams)
        if not isinstance(self.values, np.ndarray) or self.values.ndim < 1:
            raise TypeError("StepBatch.values must be a numpy array [N, T, F]")
        for name in ("values", "seqs", "ts"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"StepBatch.{name} has {len(v)} entries for {n} streams")

    def __len__(self) -> int:
        return len(self.streams)

    def step(self, i: int) -> Step:
        """Step ``i`` as a :class:`Step` (Python numbers, a view of the values)."""
        seq = None if self.seqs is None else self.seqs[i]
        ts = None if self.ts is None else self.ts[i]
        return Step(
            self.streams[i],
            self.values[i],
            seq.item() if isinstance(seq, np.generic) else seq,
            ts.item() if isinstance(ts, np.generic) else ts,
        )


@dataclass(slots=True)
class BatchResults:
    """What :meth:`Engine.process_batch` did with each of N steps, as arrays.

    ``outputs[name][i]`` is step i's output (``[T, ...]``; NaN where the step did not
    run). A step that did not run is in ``rejected`` by position; resets applied just
    before a step are in ``resets`` (both usually empty).
    """

    outputs: dict[str, Array]
    rejected: dict[int, Rejected]
    resets: dict[int, tuple[str, ...]]

    def results(self, batch: StepBatch) -> list[Result | Rejected]:
        """The per-step view, as :meth:`Engine.process` returns it."""
        out: list[Result | Rejected] = []
        for i in range(len(batch)):
            why = self.rejected.get(i)
            if why is not None:
                out.append(why)
            else:
                out.append(Result(batch.step(i), self.outputs, self.resets.get(i, ()), i))
        return out


class EngineObserver(Protocol):
    """Where the engine reports what it did (metrics); called on the engine's thread."""

    def on_batch(self, size: int, seconds: float) -> None: ...
    def on_reset(self, reason: str, count: int = 1) -> None: ...
    def on_reject(self, reason: str) -> None: ...


class _NullObserver:
    def on_batch(self, size: int, seconds: float) -> None:
        pass

    def on_reset(self, reason: str, count: int = 1) -> None:
        pass

    def on_reject(self, reason: str) -> None:
        pass


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """How the engine treats streams; parsed once from configuration."""

    max_streams: int = 10_000  # least recently used streams are evicted beyond this
    idle_timeout_s: float | None = 600.0  # None: never expire
    seq_gap_tolerance: int = 0  # missing sequence numbers tolerated without a reset
    ts_gap_tolerance_s: float | None = None  # None: timestamps never reset a stream
    max_batch: int = 256  # most streams in one session.run (raw onnxruntime peaks from ~256)
    max_chunk: int = 4096  # most rows (T) in one step
    check_state: bool = True  # reset streams whose carried state turns NaN/Inf
    initial_capacity: int = 1024  # state rows allocated up front (grows up to max_streams)
    max_seq_jump: int | None = 10_000  # seq further ahead is refused (seq_jump); None: off

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError("max_batch: must be >= 1")
        if self.max_chunk < 1:
            raise ConfigError("max_chunk: must be >= 1")
        self.policy()  # validates the rest

    def policy(self) -> StorePolicy:
        return StorePolicy(
            max_streams=self.max_streams,
            idle_timeout_s=self.idle_timeout_s,
            seq_gap_tolerance=self.seq_gap_tolerance,
            ts_gap_tolerance_s=self.ts_gap_tolerance_s,
            initial_capacity=self.initial_capacity,
            max_seq_jump=self.max_seq_jump,
        )


class _Group:
    """Admitted steps of distinct streams with the same T: one session.run (or several)."""

    __slots__ = ("idx", "pos", "resets", "slots", "t")

    def __init__(self, t: int, idx: Sequence[int], pos: Sequence[int], slots: Any) -> None:
        self.t = t
        self.idx = idx  # positions in the call's steps (and results)
        self.pos = pos  # positions among the call's valid steps (rows staged in that order)
        self.slots = slots  # the streams' slots in the state store (a list or an intp array)
        self.resets: dict[int, str] = {}  # position in this group -> reset to apply first

    def part(self, lo: int, hi: int) -> _Group:
        g = _Group(self.t, self.idx[lo:hi], self.pos[lo:hi], self.slots[lo:hi])
        g.resets = {k - lo: r for k, r in self.resets.items() if lo <= k < hi}
        return g


class Engine:
    """Runs steps of many streams through one :class:`StepModel`, carrying their state."""

    def __init__(
        self,
        model: StepModel,
        settings: EngineSettings,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._observer: EngineObserver = observer if observer is not None else _NullObserver()
        self._clock = clock
        self._store = StateStore(model.spec.state, settings.policy(), self._observer.on_reset)
        self._bind(model)
        self._stage = np.empty((256, model.spec.n_features), dtype=np.float32)
        self._alone: Stream | None = None  # the stream of the last single-step call

    def _bind(self, model: StepModel) -> None:
        self._model = model
        self._runner = Runner(model, self._store.layout.row_size)
        self._n_features = model.spec.n_features
        self._one_row = (1, model.spec.n_features)  # the shape of a one-row step
        self._output_names = model.spec.outputs
        self._check_state = self.settings.check_state
        self._max_chunk = self.settings.max_chunk

    # -- properties ---------------------------------------------------------------------

    @property
    def model(self) -> StepModel:
        return self._model

    @property
    def streams(self) -> int:
        """How many streams currently hold state."""
        return len(self._store)

    @property
    def store(self) -> StateStore:
        return self._store

    # -- the hot path -------------------------------------------------------------------

    def process(self, steps: Sequence[Step]) -> list[Result | Rejected]:
        """Run ``steps`` (any streams, any order); results come back in the same order.

        Never raises for bad input: a malformed step becomes a :class:`Rejected` and no
        other stream sees a difference.
        """
        n = len(steps)
        if n == 1:
            return [self._process_one(steps[0])]
        if n == 0:
            return []
        results: list[Result | Rejected | None] = [None] * n
        # 1. the structure of every step, before any state is touched
        clean = self._clean(steps)
        keys: list[str] | None = None
        if clean is not None:
            stage, lens, keys, seqs, tss = clean
            valid: Sequence[int] = range(n)
        else:
            checked = self._check_each(steps, results)
            if checked is None:
                return results  # type: ignore[return-value]  # every slot is filled
            stage, lens, valid = checked
        if lens is None:
            starts: Sequence[int] = range(stage.shape[0])
        else:
            starts = np.cumsum([0, *lens[:-1]]).tolist()
        if clean is None and not np.isfinite(stage).all():
            valid, lens, starts = self._reject_non_finite(
                steps, valid, lens, starts, stage, results
            )
            if not valid:
                return results  # type: ignore[return-value]
        # 2. admission in waves: each stream's first remaining step per wave, in order
        store = self._store
        store.return_twins()  # a batch reads states at home
        store.begin()
        now = self._clock()
        admit = store.admit
        waves: list[dict[int, _Group]] = []
        todo: Sequence[int] = range(len(valid))  # positions among the valid steps
        while todo:
            if keys is not None:  # the first wave of a clean call
                sts = store.admit_many(keys, seqs, tss, lens, now)
                keys = None
            else:
                sts = []
                for j in todo:
                    s = steps[valid[j]]
                    sts.append(admit(s.stream, s.seq, s.ts, 1 if lens is None else lens[j], now))
            t0 = 1 if lens is None else lens[todo[0]]
            if (
                store.call_rejects
                or store.call_repeats
                or (lens is not None and any(lens[j] != t0 for j in todo))
            ):
                wave, todo = self._sort_wave(steps, valid, todo, lens, sts, results)
            else:
                idx = valid if type(todo) is range else [valid[j] for j in todo]
                group = _Group(t0, idx, todo, sts)
                if store.wave_resets:
                    group.resets = self._planned_resets(steps, idx)
                wave, todo = {t0: group}, ()
            waves.append(wave)
            store.next_wave()
        # 3. execution, wave after wave
        max_batch = self.settings.max_batch
        for wave in waves:
            for group in wave.values():
                size = len(group.idx)
                if size <= max_batch:
                    self._run_group(steps, group, stage, starts, results)
                else:
                    for lo in range(0, size, max_batch):
                        part = group.part(lo, lo + max_batch)
                        self._run_group(steps, part, stage, starts, results)
        return results  # type: ignore[return-value]

    def _clean(
        self, steps: Sequence[Step]
    ) -> tuple[Array, list[int] | None, list[str], list[Any], list[Any]] | None:
        """The whole call checked at once when every step is well formed (the usual case):
        the staged rows, row counts (None: all 1), streams, seqs and timestamps; else None.

        C-level passes (``map``, ``list.count``, one ``join`` or ``concatenate``) instead
        of a Python loop per step; anything unusual goes to :meth:`_check_each`, which
        names the culprit.
        """
        n = len(steps)
        if list(map(type, steps)).count(Step) != n:  # (count: by identity, no hashing)
            return None
        vals = [s.values for s in steps]
        if list(map(type, vals)).count(np.ndarray) != n:
            return None
        stage = None
        lens: list[int] | None = None
        if (
            list(map(_SHAPE, vals)).count(self._one_row) == n
            and list(map(_DTYPE, vals)).count(_F32) == n
        ):  # every step one [1, F] float32 row: their bytes end to end, at a third of
            # concatenate's cost (list.count compares by identity first)
            with contextlib.suppress(TypeError):  # a non-contiguous array
                rows = b"".join(vals)  # type: ignore[arg-type]  # ndarrays are buffers
                stage = np.frombuffer(rows, dtype=np.float32).reshape(n, self._n_features)
        if stage is None:
            try:
                lens = list(map(len, vals))  # bounded before any copy
            except TypeError:  # a 0-d array
                return None
            if min(lens) < 1 or max(lens) > self._max_chunk:
                return None
            try:  # the dtype, rank and feature count of every step, checked by numpy
                stage = np.concatenate(vals, axis=0, dtype=np.float32, casting="no")
            except (TypeError, ValueError):
                return None
        if stage.ndim != 2 or stage.shape[1] != self._n_features:
            return None
        if not np.isfinite(stage).all():
            return None
        keys = [s.stream for s in steps]
        if list(map(type, keys)).count(str) != n or "" in keys:
            return None
        seqs: list[Any] = [s.seq for s in steps]
        kinds = list(map(type, seqs))
        if kinds.count(int) == n:
            if min(seqs) < 0 or max(seqs) >= MAX_SEQ:
                return None
        elif kinds.count(_NONE) != n:
            return None
        tss: list[Any] = [s.ts for s in steps]
        kinds = list(map(type, tss))
        if kinds.count(float) == n:
            if not math.isfinite(sum(tss)):  # also on overflow: then the slow path decides
                return None
        elif kinds.count(_NONE) != n:
            return None
        if stage.shape[0] == n:
            lens = None  # every step is one row
        return stage, lens, keys, seqs, tss

    def _check_each(
        self, steps: Sequence[Step], results: list[Result | Rejected | None]
    ) -> tuple[Array, list[int] | None, Sequence[int]] | None:
        """Step by step: reject the malformed ones (by reason) and stage the rest.

        Returns the staged rows, row counts (None: all 1) and positions of the steps
        that passed, or None when none did. NaN/Inf are left to the caller.
        """
        n = len(steps)
        vals: list[Array] = []
        invalid: list[int] = []
        f = self._n_features
        rows = 0
        for i in range(n):
            step = steps[i]
            reason, detail = self._why_invalid(step)
            if reason:
                results[i] = Rejected(step, reason, detail)
                self._observer.on_reject(reason)
                invalid.append(i)
                continue
            vals.append(step.values)
            rows += step.values.shape[0]
        if not vals:
            return None
        if self._stage.shape[0] < rows:
            self._stage = np.empty((max(rows, 2 * self._stage.shape[0]), f), dtype=np.float32)
        stage = self._stage[:rows]
        np.concatenate(vals, axis=0, out=stage)
        lens = None if rows == len(vals) else [v.shape[0] for v in vals]
        return stage, lens, range(n) if not invalid else _without(n, invalid)

    def _sort_wave(
        self,
        steps: Sequence[Step],
        valid: Sequence[int],
        todo: Sequence[int],
        lens: list[int] | None,
        sts: list[int | str],
        results: list[Result | Rejected | None],
    ) -> tuple[dict[int, _Group], list[int]]:
        """Split one wave's admissions: groups by T, rejections filled in, repeats deferred."""
        wave: dict[int, _Group] = {}
        later: list[int] = []
        store = self._store
        for j, row in zip(todo, sts, strict=True):
            i = valid[j]
            if isinstance(row, str):
                if row == REPEAT:
                    later.append(j)
                    continue
                step = steps[i]
                why = _reject_detail(row, step, store.get(step.stream))
                results[i] = Rejected(step, row, why)
                self._observer.on_reject(row)
                continue
            t = 1 if lens is None else lens[j]
            group = wave.get(t)
            if group is None:
                wave[t] = group = _Group(t, [], [], [])
            if store.wave_resets:
                reset = store.wave_resets.get(steps[i].stream)
                if reset:
                    group.resets[len(group.idx)] = reset
            group.idx.append(i)  # type: ignore[attr-defined]
            group.pos.append(j)  # type: ignore[attr-defined]
            group.slots.append(row)
        return wave, later

    def _stream(self, step: Step) -> Stream:
        st = self._store.get(step.stream)
        assert st is not None
        return st

    def _planned_resets(self, steps: Sequence[Step], idx: Sequence[int]) -> dict[int, str]:
        resets = self._store.wave_resets
        out: dict[int, str] = {}
        for k, i in enumerate(idx):
            reset = resets.get(steps[i].stream)
            if reset:
                out[k] = reset
        return out

    def _process_one(self, step: Step) -> Result | Rejected:
        """One step alone: the batch path's work written straight, for the lowest latency.

        Kept beside the batch path because it pays (``seqstream bench``, issue 16): one
        stream costs 0.98x a raw ``session.run`` here, 2.1-2.3x through the batch path.
        """
        if type(step) is Step:
            v = step.values
            seq = step.seq
            ts = step.ts
            if not (
                type(v) is np.ndarray
                and v.dtype is _F32
                and len(shape := v.shape) == 2
                and shape[1] == self._n_features
                and 0 < shape[0] <= self._max_chunk
                and type(step.stream) is str
                and step.stream
                and (seq is None or (type(seq) is int and 0 <= seq < MAX_SEQ))
                and (ts is None or (type(ts) is float and -_INF < ts < _INF))
            ):
                reason, detail = self._why_invalid(step)
                if reason:
                    self._observer.on_reject(reason)
                    return Rejected(step, reason, detail)
        else:
            reason, detail = self._why_invalid(step)
            self._observer.on_reject(reason)
            return Rejected(step, reason, detail)
        started = time.perf_counter()
        t = v.shape[0]  # (the check above may not have read the shape)
        runner = self._runner
        plan = runner.plan(1, t)
        plan.x2d[...] = v  # (half the cost of np.copyto for one row)
        x = plan.x_flat
        if not (math.isfinite(sum(x.tolist())) if plan.x_small else _all_finite(x)):
            bad = int(np.flatnonzero(~np.isfinite(v).all(axis=1))[0])
            self._observer.on_reject(REJECT_NON_FINITE)
            return Rejected(step, REJECT_NON_FINITE, f"values hold NaN or Inf (row {bad})")
        store = self._store
        store.begin()
        admitted = store.admit(step.stream, seq, ts, t, self._clock())
        if type(admitted) is str:
            self._observer.on_reject(admitted)
            return Rejected(step, admitted, _reject_detail(admitted, step, store.get(step.stream)))
        assert isinstance(admitted, int) and store.last is not None
        st = store.last
        reset = store.wave_resets.get(st.key, "") if store.wave_resets else ""
        if reset:
            store.clear_state(st)
            self._observer.on_reset(reset, 1)
        # The same stream alone twice in a row: run it in place on a pair of twin rows,
        # from one into the other.
        banked = None
        if st is self._alone:
            if st.twin < 0:
                store.lend_twins(st)
            at = st.at
            banked = runner.banked(plan, store.twins, t, at, at ^ 1)
        self._alone = st
        try:
            if banked is not None:
                runner.run_io(banked.io)
                out = banked.out
                st.at ^= 1
            else:
                store.read_state(st, plan.state_in_flat)
                runner.run(plan)
                out = plan.state_out_flat
                store.write_state(st, out)
        except Exception as exc:  # onnxruntime failures: the step is lost, not the engine
            return self._fail([step], exc)[0]
        names = self._output_names
        if len(names) == 1:
            values = {names[0]: plan.first[0].copy()}
        else:  # pragma: no cover - every task of schema 1 has one output
            values = {nm: o.copy() for nm, o in zip(names, plan.first, strict=True)}
        if st.pending or reset:
            done = store.take_pending(st)
            result = Result(step, values, (*done, reset) if reset else done)
        else:
            result = _new_tuple(Result, (step, values, (), -1))
        if self._check_state and not math.isfinite(out.dot(out)) and not _all_finite(out):
            store.mark_reset(st, RESET_NON_FINITE, forget_sequence=False)
        self._observer.on_batch(1, time.perf_counter() - started)
        return result

    def _run_group(
        self,
        steps: Sequence[Step],
        group: _Group,
        stage: Array,
        starts: Sequence[int],
        results: list[Result | Rejected | None],
    ) -> None:
        """One session.run for distinct streams with the same T; fills their results."""
        started = time.perf_counter()
        store = self._store
        b = len(group.slots)
        t = group.t
        slots = group.slots
        if type(slots) is not np.ndarray:
            slots = np.fromiter(slots, dtype=np.intp, count=b)
        if group.resets:
            for k, reason in group.resets.items():
                store.clear_slot(int(slots[k]))
                self._observer.on_reset(reason, 1)
        pos = group.pos
        rows: Any = None
        if t == 1 and type(pos) is range and type(starts) is range:
            stage = stage[pos.start : pos.stop]  # consecutive rows
        else:
            rows = np.array([starts[j] for j in pos], dtype=np.intp)
            if t > 1:
                rows = (rows[:, None] + np.arange(t, dtype=np.intp)).ravel()
        try:
            block, bad = self._execute(slots, t, stage, rows)
        except Exception as exc:  # onnxruntime failures: the batch is lost, not the engine
            for i, why in zip(
                group.idx, self._fail([steps[i] for i in group.idx], exc), strict=True
            ):
                results[i] = why
            return
        idx = group.idx
        if not group.resets and not store.pending_streams:
            if type(idx) is range and idx.step == 1:
                if len(idx) == len(steps):
                    results[:] = _results(steps, block, range(len(steps)))
                else:
                    lo, hi = idx.start, idx.stop
                    results[lo:hi] = _results(steps[lo:hi], block, range(hi - lo))
            else:
                for k, i in enumerate(idx):
                    results[i] = Result(steps[i], block, (), k)
        else:
            resets = group.resets
            take_pending = store.take_pending
            for k, i in enumerate(idx):
                done = take_pending(self._stream(steps[i]))
                if k in resets:
                    done = (*done, resets[k])
                results[i] = Result(steps[i], block, done, k)
        for k in bad:
            st = self._stream(steps[idx[k]])
            store.mark_reset(st, RESET_NON_FINITE, forget_sequence=False)
        self._observer.on_batch(b, time.perf_counter() - started)

    def _execute(
        self, slots: Any, t: int, stage: Array, rows: Any
    ) -> tuple[dict[str, Array], list[int]]:
        """Gather the slots' state, stage the input, ``session.run``, scatter the state back.

        ``stage`` holds the batch's rows in order, or (``rows`` given) the rows to take
        from it. Returns the batch's outputs (a copy) and the positions whose carried
        state turned NaN/Inf. When onnxruntime raises, no state has been written.
        """
        store = self._store
        runner = self._runner
        b = len(slots)
        plan = runner.plan(b, t)
        index = store.gather(slots, plan.state_in_flat)
        if rows is None:
            np.copyto(plan.x2d, stage)
        else:
            np.take(stage, rows, axis=0, out=plan.x2d, mode="clip")
        runner.run(plan)
        out = plan.state_out_flat
        bad: list[int] = []
        if self._check_state and not _all_finite(out):
            bad = self._non_finite_rows(plan, b)
        store.scatter(index, out, b)
        return {nm: o.copy() for nm, o in zip(self._output_names, plan.outputs, strict=True)}, bad

    # -- arrays in, arrays out ----------------------------------------------------------

    def process_batch(self, batch: StepBatch) -> BatchResults:
        """Run one step of each of N streams given as arrays (:class:`StepBatch`).

        The same decisions as :meth:`process` over the equivalent steps, at a fraction of
        the cost per step when the batch is plain (distinct known streams continuing
        without a reset, well-formed finite values): then validation is a few array
        checks, the values are staged by one copy, and no object is made per step.
        Anything else takes :meth:`process`'s path. Never raises for bad step input.
        """
        fast = self._plain_batch(batch)
        if fast is not None:
            return fast
        results = self.process([batch.step(i) for i in range(len(batch))])
        return self._pack(results)

    def _plain_batch(self, batch: StepBatch) -> BatchResults | None:
        """:meth:`process_batch` when the batch is plain, else None with nothing changed.

        Kept beside :meth:`process` because it pays (``seqstream bench``, issue 16): 1,000
        streams run at 0.63-0.70x raw batched ``session.run`` here, 0.15-0.16x through a
        :class:`Step` per stream.
        """
        n = len(batch)
        v = batch.values
        keys = batch.streams
        if (
            n < 2
            or v.dtype is not _F32
            or v.ndim != 3
            or v.shape[2] != self._n_features
            or not 0 < v.shape[1] <= self._max_chunk
            or list(map(type, keys)).count(str) != n
            or "" in keys
        ):
            return None
        seqs = batch.seqs
        if seqs is not None:
            if not isinstance(seqs, np.ndarray):
                return None  # (a list of Python ints: process checks each)
            if seqs.dtype.kind not in "iu" or seqs.min() < 0 or seqs.max() >= MAX_SEQ:
                return None
            seqs = seqs.astype(np.int64, copy=False)
        tss = batch.ts
        if tss is not None:
            if not isinstance(tss, np.ndarray) or tss.dtype.kind not in "fiu":
                return None
            tss = tss.astype(np.float64, copy=False)
            if not np.isfinite(tss).all():
                return None
        if not _all_finite(v.reshape(-1)):
            return None
        store = self._store
        store.begin()
        t = v.shape[1]
        slots = store.admit_plain(keys, seqs, tss, t, self._clock())
        if slots is None:
            return None
        stage = v.reshape(n * t, self._n_features)
        done = BatchResults({}, {}, {})
        blocks = []
        step = self.settings.max_batch
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            started = time.perf_counter()
            try:
                block, bad = self._execute(slots[lo:hi], t, stage[lo * t : hi * t], None)
            except Exception as exc:  # onnxruntime failures: the batch is lost, not the engine
                blocks.append(self._nan_block(hi - lo, t))
                part = range(lo, hi)
                failed = self._fail([batch.step(i) for i in part], exc)
                done.rejected.update(zip(part, failed, strict=True))
                continue
            blocks.append(block)
            if store.pending_streams:  # resets reported with each stream's next result
                for i in range(lo, hi):
                    st = store.get(keys[i])
                    assert st is not None
                    if st.pending:
                        done.resets[i] = store.take_pending(st)
            for k in bad:
                st = store.get(keys[lo + k])
                assert st is not None
                store.mark_reset(st, RESET_NON_FINITE, forget_sequence=False)
            self._observer.on_batch(hi - lo, time.perf_counter() - started)
        if len(blocks) == 1:
            done.outputs = blocks[0]
        else:
            done.outputs = {nm: np.concatenate([b[nm] for b in blocks]) for nm in blocks[0]}
        return done

    def _pack(self, results: Sequence[Result | Rejected]) -> BatchResults:
        """Per-step results as :class:`BatchResults` (NaN rows where a step did not run)."""
        t = max((r.step.values.shape[0] for r in results if isinstance(r, Result)), default=1)
        done = BatchResults(self._nan_block(len(results), t), {}, {})
        for i, r in enumerate(results):
            if isinstance(r, Rejected):
                done.rejected[i] = r
                continue
            for nm, out in done.outputs.items():
                out[i] = r.output(nm)
            if r.resets:
                done.resets[i] = r.resets
        return done

    def _nan_block(self, b: int, t: int) -> dict[str, Array]:
        return {
            nm: np.full((b, t, *row), np.nan, dtype=np.float32)
            for nm, row in zip(self._output_names, self._runner.output_rows, strict=True)
        }

    def _non_finite_rows(self, plan: Plan, b: int) -> list[int]:
        mask = np.zeros(b, dtype=bool)
        for s, arr in zip(self._model.spec.state, plan.state_out, strict=True):
            rows = np.moveaxis(arr, s.batch_axis, 0).reshape(b, -1)
            mask |= ~np.isfinite(rows).all(axis=1)
        return [int(k) for k in np.flatnonzero(mask)]

    def _fail(self, steps: Sequence[Step], exc: Exception) -> list[Rejected]:
        """The steps of a batch onnxruntime failed on: each stream reset, each refused."""
        log.error("session.run failed for a batch of %d: %s", len(steps), exc)
        why = f"session.run failed: {exc}"
        out = []
        for step in steps:
            self._store.mark_reset(self._stream(step), RESET_ENGINE_ERROR, forget_sequence=True)
            out.append(Rejected(step, REJECT_ENGINE_ERROR, why))
            self._observer.on_reject(REJECT_ENGINE_ERROR)
        return out

    def _reject_non_finite(
        self,
        steps: Sequence[Step],
        valid: Sequence[int],
        lens: list[int] | None,
        starts: Sequence[int],
        stage: Array,
        results: list[Result | Rejected | None],
    ) -> tuple[list[int], list[int] | None, list[int]]:
        """Drop steps holding NaN/Inf; returns the survivors, their lengths and row starts."""
        good_rows = np.asarray(np.isfinite(stage).all(axis=1))
        keep_v: list[int] = []
        keep_l: list[int] = []
        keep_s: list[int] = []
        for j, i in enumerate(valid):
            a = starts[j]
            t = 1 if lens is None else lens[j]
            if good_rows[a : a + t].all():
                keep_v.append(i)
                keep_l.append(t)
                keep_s.append(a)
            else:
                bad = int(np.flatnonzero(~good_rows[a : a + t])[0])
                results[i] = Rejected(
                    steps[i], REJECT_NON_FINITE, f"values hold NaN or Inf (row {bad})"
                )
                self._observer.on_reject(REJECT_NON_FINITE)
        return keep_v, None if lens is None else keep_l, keep_s

    def _why_invalid(self, step: Any) -> tuple[str, str]:
        """The reason a step failed the fast structural check ("" when it is fine after all)."""
        if not isinstance(step, Step):
            return REJECT_BAD_STEP, f"expected a Step, got {type(step).__name__}"
        if not isinstance(step.stream, str) or not step.stream:
            return REJECT_BAD_STREAM, "stream must be a non-empty string"
        v = step.values
        if not isinstance(v, np.ndarray) or type(v) is not np.ndarray:
            return REJECT_BAD_TYPE, f"values must be a numpy array, got {type(v).__name__}"
        if v.dtype != _F32:
            return REJECT_BAD_DTYPE, f"values are {v.dtype}, expected float32"
        if v.ndim != 2:
            return REJECT_BAD_RANK, f"values have shape {v.shape}, expected [T, F]"
        if v.shape[1] != self._n_features:
            return (
                REJECT_BAD_FEATURES,
                f"values have {v.shape[1]} features, the model takes {self._n_features}",
            )
        if v.shape[0] == 0:
            return REJECT_EMPTY, "values have no rows"
        if v.shape[0] > self.settings.max_chunk:
            return REJECT_TOO_LONG, f"{v.shape[0]} rows exceed max_chunk {self.settings.max_chunk}"
        seq = step.seq
        if seq is not None and (
            isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < MAX_SEQ
        ):
            return REJECT_BAD_SEQ, f"seq must be an int in 0..2**62-1, got {seq!r}"
        ts = step.ts
        if ts is not None and (
            isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts)
        ):
            return REJECT_BAD_TS, f"ts must be a finite number, got {ts!r}"
        return "", ""

    # -- stream management --------------------------------------------------------------

    def reset(self, stream: str, reason: str = RESET_EXPLICIT) -> bool:
        """Reset ``stream`` now (its sequence tracking restarts too); False if unknown."""
        return self._store.reset(stream, reason, forget_sequence=True)

    def tick(self, now: float | None = None) -> int:
        """Forget streams idle past the timeout; returns how many. Call it periodically."""
        return self._store.expire(self._clock() if now is None else now)

    def save(self, path: str | Path) -> int:
        """Checkpoint every stream's state atomically; returns how many streams."""
        spec = self._model.spec
        return self._store.save(Path(path), {"model": spec.name, "version": spec.version})

    def restore(self, path: str | Path) -> int:
        """Replace all streams with a checkpoint's (bit-exact); returns how many."""
        return self._store.load(Path(path), self._clock())

    def swap_model(self, model: StepModel) -> bool:
        """Use ``model`` from now on; True when streams kept their state.

        Streams keep their state when the state signatures match; otherwise every
        stream is reset with reason ``model_change``.
        """
        kept = model.spec.state_signature == self._model.spec.state_signature
        if not kept:
            self._store.reset_all(model.spec.state, RESET_MODEL_CHANGE)
        self._bind(model)
        if self._stage.shape[1] != model.spec.n_features:
            self._stage = np.empty((256, model.spec.n_features), dtype=np.float32)
        return kept


def _all_finite(x: Array) -> bool:
    """NaN/Inf probe for small arrays, cheaper than ``np.isfinite(x).all()`` per call.

    float32 values summed as Python floats cannot overflow, so a non-finite sum means a
    non-finite value; a dot product may overflow, so its alarm is double-checked.
    """
    if x.size <= SMALL:
        return math.isfinite(sum(x.tolist()))
    return math.isfinite(x.dot(x)) or bool(np.isfinite(x).all())


def _without(n: int, skip: list[int]) -> list[int]:
    gone = set(skip)
    return [i for i in range(n) if i not in gone]


def _reject_detail(reason: str, step: Step, st: Stream | None) -> str:
    if st is None:
        return "every stream slot is held by a step of this same call"
    if step.seq is not None and st.next_seq is not None:
        return f"seq {step.seq}; stream expects {st.next_seq}"
    return f"ts {step.ts}; stream's last ts {st.last_ts}"
