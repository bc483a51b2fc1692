"""Per-stream carried state: slots, admission, resets, checkpoints.

Every stream owns a slot. Its state lives in blocks laid out like the model's state
inputs with the batch axis stretched to the store's capacity (``[layers, capacity,
hidden]`` for an LSTM's ``h`` and ``c``), so a batch is gathered straight into the
model's input buffer with one ``take`` and scattered back with one assignment. Its
sequence bookkeeping lives in per-slot columns, so a whole call of known streams is
admitted with array operations. A stream stepping alone call after call borrows a
pair of contiguous twin rows and runs in place on them (see the engine).

The store decides whether a step may continue a stream (:meth:`StateStore.admit`):
sequence numbers and timestamps, duplicates, gaps and idleness. Every reset has a
reason from :data:`RESET_REASONS`, reported through ``on_reset`` when it happens and
kept on the stream (``pending``) until the stream's next result carries it.
"""

from __future__ import annotations

import array
import json
import math
import os
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contract import StateSpec
from pipeline.errors import CheckpointError, ConfigError

Array = np.ndarray[Any, np.dtype[np.float32]]
Signature = tuple[tuple[str, tuple[int, ...], str], ...]

# Reset reasons: stable words for counters and logs.
RESET_EXPLICIT = "explicit"  # a caller asked (Engine.reset, Worker.submit_reset)
RESET_IDLE = "idle"  # no step for longer than idle_timeout_s
RESET_SEQ_GAP = "seq_gap"  # more sequence numbers missing than seq_gap_tolerance
RESET_TS_GAP = "ts_gap"  # timestamps further apart than ts_gap_tolerance_s
RESET_MODEL_CHANGE = "model_change"  # a new model cannot continue the old state
RESET_EVICTED = "evicted"  # least recently used stream dropped beyond max_streams
RESET_NON_FINITE = "non_finite_state"  # the model produced NaN/Inf state
RESET_DROPPED = "dropped"  # a step of the stream was dropped before the engine saw it
RESET_ENGINE_ERROR = "engine_error"  # onnxruntime failed on the stream's batch
RESET_REASONS: tuple[str, ...] = (
    RESET_EXPLICIT,
    RESET_IDLE,
    RESET_SEQ_GAP,
    RESET_TS_GAP,
    RESET_MODEL_CHANGE,
    RESET_EVICTED,
    RESET_NON_FINITE,
    RESET_DROPPED,
    RESET_ENGINE_ERROR,
)

# Why admit() refuses a step (the engine adds reasons for malformed input).
REJECT_DUPLICATE = "duplicate"  # same first sequence number (or timestamp) as the last step
REJECT_OUT_OF_ORDER = "out_of_order"  # older than what the stream has already run
REJECT_CAPACITY = "capacity"  # max_streams streams are all in use by this very call
# Further ahead than max_seq_jump: a forger's number, not a gap. Refused without touching
# the stream, so its real sender goes on (see StorePolicy.max_seq_jump).
REJECT_SEQ_JUMP = "seq_jump"
ADMIT_REJECT_REASONS: tuple[str, ...] = (
    REJECT_DUPLICATE,
    REJECT_OUT_OF_ORDER,
    REJECT_CAPACITY,
    REJECT_SEQ_JUMP,
)
# Not a rejection: the stream already has a step in the current wave; admit it in the next.
REPEAT = "_repeat"

TWINS = 8  # pairs of spare rows lent to streams stepping alone
# Sequence numbers stay below this, so that seq + rows fits the store's int64 columns.
MAX_SEQ = 1 << 62
CHECKPOINT_FORMAT = "seqstream-state"
CHECKPOINT_VERSION = 1

ResetCallback = Callable[[str, int], None]


@dataclass(frozen=True, slots=True)
class StorePolicy:
    """Limits and tolerances of the store (from :class:`~pipeline.engine.engine.EngineSettings`)."""

    max_streams: int = 10_000
    idle_timeout_s: float | None = 600.0
    seq_gap_tolerance: int = 0
    ts_gap_tolerance_s: float | None = None
    initial_capacity: int = 1024
    # A step whose seq is more than this ahead of the next one expected is refused
    # (seq_jump) rather than taken as a gap: one forged number near 2**62 would otherwise
    # reset the stream and lock its real sender out as out_of_order. A sender that really
    # renumbers publishes its reset topic first (or the stream expires after
    # idle_timeout_s). None: any jump is a gap (the old behaviour).
    max_seq_jump: int | None = 10_000

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ConfigError("max_streams: must be >= 1")
        if self.idle_timeout_s is not None and not self.idle_timeout_s > 0:
            raise ConfigError("idle_timeout_s: must be > 0 (or unset to never expire)")
        if self.seq_gap_tolerance < 0:
            raise ConfigError("seq_gap_tolerance: must be >= 0")
        if self.ts_gap_tolerance_s is not None and not self.ts_gap_tolerance_s >= 0:
            raise ConfigError("ts_gap_tolerance_s: must be >= 0 (or unset)")
        if self.initial_capacity < 1:
            raise ConfigError("initial_capacity: must be >= 1")
        if self.max_seq_jump is not None and self.max_seq_jump < self.seq_gap_tolerance:
            raise ConfigError("max_seq_jump: must be >= seq_gap_tolerance (or unset)")


class Stream:
    """What the store knows about one stream besides its numbers and its state.

    A stream's sequence bookkeeping lives in the store's per-slot columns (so a whole
    batch is admitted with a few array operations), except while the stream is lent
    twin rows: then it lives in :attr:`nums`, where a stream stepping alone reads and
    writes it at the speed of a Python list. The properties read it from either.
    """

    __slots__ = ("_store", "at", "key", "nums", "pending", "slot", "twin")

    def __init__(self, key: str, slot: int, store: StateStore) -> None:
        self.key = key
        self.slot = slot  # its home in the store's state blocks and columns
        self.at = -1  # -1: its state is at home; else the twin row holding it
        self.twin = -1  # a lent pair of twin rows, or -1
        # While lent: [next seq, last seq, mark, stamp, last ts, last seen], else None.
        self.nums: list[Any] | None = None
        self.pending: tuple[str, ...] = ()  # resets not yet reported in a result
        self._store = store

    def _numbers(self) -> tuple[Any, ...]:
        if self.nums is not None:
            return tuple(self.nums)
        iv, fv, i, f = self._store._iv, self._store._fv, 4 * self.slot, 2 * self.slot
        return (iv[i], iv[i + 1], iv[i + 2], iv[i + 3], fv[f], fv[f + 1])

    @property
    def next_seq(self) -> int | None:
        """The sequence number expected next."""
        v: int = self._numbers()[0]
        return None if v < 0 else v

    @property
    def last_seq(self) -> int | None:
        """First sequence number of the last step run."""
        v: int = self._numbers()[1]
        return None if v < 0 else v

    @property
    def mark(self) -> int:
        """The wave that last admitted a step (one step per stream per wave)."""
        mark: int = self._numbers()[2]
        return mark

    @property
    def last_ts(self) -> float | None:
        """Timestamp of the last step run."""
        v: float = self._numbers()[4]
        return None if v != v else v

    @property
    def last_seen(self) -> float:
        seen: float = self._numbers()[5]
        return seen

    def __repr__(self) -> str:
        return f"Stream({self.key!r}, slot={self.slot}, next_seq={self.next_seq})"


class Layout:
    """Where each state tensor lives inside a stream's row, and a row's initial value.

    A row is the model's state tensors at batch 1, flattened and laid end to end (``h``
    then ``c`` for an LSTM): the layout of checkpoints and of twin rows.
    """

    def __init__(self, specs: Sequence[StateSpec]) -> None:
        self.specs = tuple(specs)
        offsets: list[int] = []
        sizes: list[int] = []
        off = 0
        for s in self.specs:
            n = math.prod(s.row_shape)
            offsets.append(off)
            sizes.append(n)
            off += n
        self.offsets = tuple(offsets)
        self.sizes = tuple(sizes)
        self.row_size = off
        init = np.empty(off, dtype=np.float32)
        for s, o, n in zip(self.specs, offsets, sizes, strict=True):
            init[o : o + n] = s.init
        self.init_row: Array = init

    @property
    def signature(self) -> Signature:
        return tuple((s.name, s.row_shape, s.dtype) for s in self.specs)

    def spans(self) -> list[tuple[int, int, int, int]]:
        """``(start, size, outer, inner)`` of each run of state tensors stored as one block.

        A tensor of shape ``[a..., batch, b...]`` is ``outer = prod(a)`` rows of ``inner =
        prod(b)`` values per stream. Consecutive tensors with the same ``inner`` (an
        LSTM's ``h`` and ``c``) share a block, so a batch moves in one ``take``.
        """
        spans: list[tuple[int, int, int, int]] = []
        for s, off, n in zip(self.specs, self.offsets, self.sizes, strict=True):
            axis = s.batch_axis
            dims = [int(d) for d in s.shape[:axis]]
            inner = math.prod(int(d) for d in s.shape[axis + 1 :])
            outer = math.prod(dims)
            if spans and spans[-1][3] == inner:
                start, size, o, _ = spans[-1]
                spans[-1] = (start, size + n, o + outer, inner)
            else:
                spans.append((off, n, outer, inner))
        return spans


class _Block:
    """The state of every slot for one span, in the model's own order: ``[outer, cap, inner]``.

    Batch rows of a slot sit where the model wants them (``h[l, b, :]``), so gathering
    a batch is one ``take`` straight into the model's input buffer and scattering it
    back one indexed assignment: no intermediate row buffer, no transposing copies.
    """

    __slots__ = ("base", "data", "init", "inner", "outer", "rows", "size", "start", "vtype")

    def __init__(self, span: tuple[int, int, int, int], cap: int, init_row: Array) -> None:
        self.start, self.size, self.outer, self.inner = span
        # One [inner] run of float32 as one opaque item: numpy's 1-D take and put copy
        # such items with one memcpy each, twice as fast as indexing 2-D rows.
        self.vtype = np.dtype((np.void, 4 * self.inner))
        self.init = init_row[self.start : self.start + self.size].reshape(self.outer, self.inner)
        self.data: Array = np.empty((self.outer, cap, self.inner), dtype=np.float32)
        self.data[:] = self.init[:, None, :]
        self._index(cap)

    def _index(self, cap: int) -> None:
        self.rows = self.data.reshape(-1).view(self.vtype)
        self.base = np.arange(self.outer, dtype=np.intp)[:, None] * cap

    def grow(self, cap: int) -> None:
        old = self.data
        self.data = np.empty((self.outer, cap, self.inner), dtype=np.float32)
        self.data[:, : old.shape[1]] = old
        self._index(cap)

    def stream_major(self, slots: np.ndarray[Any, np.dtype[np.intp]]) -> Any:
        """Item indices of ``slots``, stream by stream (a checkpoint's row order)."""
        return (slots[:, None] + self.base.T).ravel()

    def part(self, buf: Array, batch: int) -> Array:
        """This span of a batch's flat state buffer, as ``[outer, inner]`` (batch 1)."""
        lo = batch * self.start
        return buf[lo : lo + batch * self.size].reshape(self.outer * batch, self.inner)

    def items(self, buf: Array, batch: int) -> np.ndarray[Any, np.dtype[np.void]]:
        """This span of a batch's flat state buffer, as ``outer * batch`` items."""
        lo = batch * self.start
        return buf[lo : lo + batch * self.size].view(self.vtype)


_NO_SEQ = -1  # the int64 columns' None
_ARANGE = np.arange(4096, dtype=np.intp)
_INT_ITEM = np.dtype((np.void, 4 * 8))  # a slot's int64 numbers
_FLT_ITEM = np.dtype((np.void, 2 * 8))  # a slot's float64 numbers
_FREE_USE = np.iinfo(np.int64).max  # a free slot's LRU stamp: never the oldest


class StateStore:
    """Carried state and sequence bookkeeping for up to ``policy.max_streams`` streams.

    Every stream owns a slot: its state in the blocks (:class:`_Block`) and its numbers
    in per-slot columns (next sequence number, last timestamp, last use ...), so the
    usual call (every stream known, continuing, no reset) is admitted with a handful of
    array operations instead of a Python loop (:meth:`admit_many`). Capacity starts at
    ``initial_capacity`` slots and doubles on demand up to ``max_streams``, so a handful
    of streams do not pay for ten thousand. Least recently used streams are evicted
    first (a per-slot stamp, not a linked list: eviction is rare, admission is not).

    A stream that steps alone call after call is lent a pair of twin rows (:attr:`twins`,
    contiguous, the model's batch-1 layout): the engine binds them to onnxruntime and
    runs the stream in place, reading one row and writing the other, with no copy.
    """

    # Below this many steps a call is admitted one by one: cheaper than admit_plain's
    # fixed cost (measured: ~15-25 us of numpy calls against ~1.2 us per step).
    plain_min = 16

    # Per-slot numbers (see _columns): numpy column views, and the flat arrays behind them.
    _ints: np.ndarray[Any, np.dtype[np.int64]]
    _flts: np.ndarray[Any, np.dtype[np.float64]]
    _next: np.ndarray[Any, np.dtype[np.int64]]  # next sequence number expected, or -1
    _lseq: np.ndarray[Any, np.dtype[np.int64]]  # first sequence number of the last step, or -1
    _mark: np.ndarray[Any, np.dtype[np.int64]]  # the wave that last admitted a step
    _used: np.ndarray[Any, np.dtype[np.int64]]  # LRU stamp (max: free slot)
    _lts: np.ndarray[Any, np.dtype[np.float64]]  # timestamp of the last step, or NaN
    _seen: np.ndarray[Any, np.dtype[np.float64]]  # clock at the last step (inf: free slot)
    _iv: array.array[int]
    _fv: array.array[float]

    def __init__(
        self,
        specs: Sequence[StateSpec],
        policy: StorePolicy,
        on_reset: ResetCallback | None = None,
    ) -> None:
        self.policy = policy
        self._on_reset: ResetCallback = on_reset if on_reset is not None else _ignore
        self._streams: dict[str, Stream] = {}
        self._slot_of: dict[str, int] = {}
        self._get = self._streams.get
        # The policy as plain numbers for admit(): "never" is infinity.
        self._idle = math.inf if policy.idle_timeout_s is None else policy.idle_timeout_s
        self._seq_tol = policy.seq_gap_tolerance
        jump = policy.max_seq_jump
        self._seq_jump = MAX_SEQ if jump is None else jump
        tol = policy.ts_gap_tolerance_s
        self._ts_tol = math.inf if tol is None else tol
        self.last: Stream | None = None  # the stream admit() admitted last
        self._cap = 0
        self._by_slot: list[Stream | None] = []
        self._free: list[int] = []  # pop() gives the lowest slot first
        self._stamp = 0  # LRU clock: every admission takes the next value
        self.mark = 0  # the current wave; every begin() and next_wave() moves it on
        self._call_mark = 0  # the first wave of the current call
        self.pending_streams = 0  # streams whose pending resets are not reported yet
        # What the current wave's admissions held beyond the plain case (see next_wave()).
        self.call_rejects = 0
        self.call_repeats = 0
        self.wave_resets: dict[str, str] = {}  # stream key -> reset its step needs first
        self._columns(min(policy.initial_capacity, policy.max_streams))
        self._lay_out(Layout(specs))

    def _columns(self, cap: int) -> None:
        """(Re)allocate the per-slot columns for ``cap`` slots, keeping what they hold."""
        old = self._cap
        # A slot's numbers sit side by side (two cache lines at most), in array.array:
        # its items read and write at Python speed (twice a memoryview's); numpy views of
        # the same memory serve the array path.
        iv = array.array("q", bytes(8 * 4 * cap))  # slot s at 4s: next seq, last seq, mark, stamp
        fv = array.array("d", bytes(8 * 2 * cap))  # slot s at 2s: last ts, last seen
        ints = np.frombuffer(iv, dtype=np.int64).reshape(cap, 4)
        flts = np.frombuffer(fv, dtype=np.float64).reshape(cap, 2)
        ints[:] = (_NO_SEQ, _NO_SEQ, -1, _FREE_USE)
        flts[:] = (np.nan, np.inf)  # a free slot is never idle
        if old:
            ints[:old] = self._ints
            flts[:old] = self._flts
        self._iv, self._fv = iv, fv
        self._ints, self._flts = ints, flts
        self._next, self._lseq, self._mark, self._used = ints.T
        self._lts, self._seen = flts.T
        # A slot's numbers as one opaque item each: a batch's rows move with one take and
        # one put (a fifth of row-wise fancy indexing's cost).
        self._int_items = ints.view(_INT_ITEM).reshape(cap)
        self._flt_items = flts.view(_FLT_ITEM).reshape(cap)
        self._pos = np.empty(cap, dtype=np.intp)
        self._by_slot.extend([None] * (cap - old))
        self._free.extend(range(cap - 1, old - 1, -1))
        self._cap = cap

    def _lay_out(self, layout: Layout) -> None:
        self.layout = layout
        self._blocks = [_Block(span, self._cap, layout.init_row) for span in layout.spans()]
        # Twin pair k is rows 2k and 2k+1.
        self.twins: Array = np.empty((2 * TWINS, layout.row_size), dtype=np.float32)
        self._pairs_free = list(range(TWINS - 1, -1, -1))
        self._pairs_lent: OrderedDict[int, Stream] = OrderedDict()  # oldest loan first

    # -- lookup -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, key: object) -> bool:
        return key in self._streams

    def get(self, key: str) -> Stream | None:
        return self._streams.get(key)

    def __iter__(self) -> Iterator[Stream]:
        """Streams from the least to the most recently used."""
        return iter(self._by_use())

    def _by_use(self) -> list[Stream]:
        self.return_twins()
        used = self._used
        live = np.flatnonzero(used != _FREE_USE)
        by_slot = self._by_slot
        return [by_slot[s] for s in live[np.argsort(used[live])].tolist()]

    @property
    def capacity(self) -> int:
        """How many streams fit before the state grows."""
        return self._cap

    # -- state ---------------------------------------------------------------------------

    def read_state(self, st: Stream, out: Array | None = None) -> Array:
        """One stream's state as a flat row (the model's layout at batch 1)."""
        row = np.empty(self.layout.row_size, dtype=np.float32) if out is None else out
        if st.at >= 0:
            np.copyto(row, self.twins[st.at])
        else:
            slot = st.slot
            for b in self._blocks:
                np.copyto(b.part(row, 1), b.data[:, slot])
        return row

    def write_state(self, st: Stream, row: Array) -> None:
        """Set one stream's state from a flat row."""
        if st.at >= 0:
            self.twins[st.at] = row
        else:
            slot = st.slot
            for b in self._blocks:
                b.data[:, slot] = b.part(row, 1)

    def clear_state(self, st: Stream) -> None:
        """Put a stream's state back to the model's initial state, wherever it lives."""
        if st.at >= 0:
            self.twins[st.at] = self.layout.init_row
        else:
            self.clear_slot(st.slot)

    def clear_slot(self, slot: int) -> None:
        for b in self._blocks:
            b.data[:, slot] = b.init

    def state_of(self, key: str) -> dict[str, Array]:
        """A copy of one stream's state tensors (row shapes), for inspection and tests."""
        row = self.read_state(self._streams[key])
        return {
            s.name: row[o : o + n].reshape(s.row_shape)
            for s, o, n in zip(
                self.layout.specs, self.layout.offsets, self.layout.sizes, strict=True
            )
        }

    def gather(self, slots: np.ndarray[Any, np.dtype[np.intp]], buf: Array) -> list[Any]:
        """Copy the states of ``slots`` (homes) into a batch's flat state buffer, laid out
        as the model's state inputs; returns the index that :meth:`scatter` takes."""
        batch = len(slots)
        index = []
        for b in self._blocks:
            idx = (b.base + slots).ravel()
            np.take(b.rows, idx, out=b.items(buf, batch), mode="clip")
            index.append(idx)
        return index

    def scatter(self, index: list[Any], buf: Array, batch: int) -> None:
        """Write a batch's state outputs back to the slots :meth:`gather` read."""
        for b, idx in zip(self._blocks, index, strict=True):
            b.rows.put(idx, b.items(buf, batch), mode="clip")

    # -- admission ------------------------------------------------------------------------

    def begin(self) -> None:
        """Start an engine call: streams admitted from now on are pinned against eviction."""
        self.next_wave()
        self._call_mark = self.mark

    def next_wave(self) -> None:
        """Start a wave: each stream admits at most one step until the next wave.

        ``call_rejects``, ``call_repeats`` and :attr:`wave_resets` then tell the engine
        whether any admission of the wave was refused, deferred (:data:`REPEAT`) or needs
        a reset, so the plain case can skip looking.
        """
        self.mark += 1
        self.call_rejects = self.call_repeats = 0
        if self.wave_resets:
            self.wave_resets = {}

    def admit(
        self, key: str, seq: int | None, ts: float | None, n_rows: int, now: float
    ) -> int | str:
        """Decide whether a step continues ``key``: the stream's slot, or why it must not run.

        A refused step changes nothing; :data:`REPEAT` means the stream already has a step
        in this wave (see :meth:`next_wave`). The admitted stream is :attr:`last`; a reset
        to apply just before the step runs is in :attr:`wave_resets`. The caller applies
        it when it runs the step, because earlier steps of the same stream in the same
        call have not run yet.
        """
        st = self._get(key)
        if st is None:
            return self._admit_new(key, seq, ts, n_rows, now)
        slot = st.slot
        lent = st.nums
        if lent is None:
            iv = self._iv
            fv = self._fv
            i = 4 * slot  # next seq, last seq, mark, stamp
            f = 2 * slot  # last ts, last seen
            nxt, last_seq, mark, _, last_ts, seen = (
                iv[i], iv[i + 1], iv[i + 2], iv[i + 3], fv[f], fv[f + 1])  # fmt: skip
        else:
            nxt, last_seq, mark, _, last_ts, seen = lent
        if mark == self.mark:
            self.call_repeats += 1
            return REPEAT
        reset = ""
        if now - seen > self._idle:
            reset = RESET_IDLE
        else:
            if seq is not None and nxt >= 0:
                if seq < nxt:
                    self.call_rejects += 1
                    return REJECT_DUPLICATE if seq == last_seq else REJECT_OUT_OF_ORDER
                if seq - nxt > self._seq_tol:
                    if seq - nxt > self._seq_jump:
                        self.call_rejects += 1
                        return REJECT_SEQ_JUMP
                    reset = RESET_SEQ_GAP
            if ts is not None and last_ts == last_ts:  # NaN: no timestamp yet
                if seq is None and ts <= last_ts:
                    self.call_rejects += 1
                    return REJECT_DUPLICATE if ts == last_ts else REJECT_OUT_OF_ORDER
                if not reset and ts - last_ts > self._ts_tol:
                    reset = RESET_TS_GAP
        if reset:
            self.wave_resets[key] = reset
        stamp = self._stamp
        self._stamp = stamp + 1
        if lent is not None:
            if seq is None:
                lent[0] = lent[1] = _NO_SEQ
            else:
                lent[0] = seq + n_rows
                lent[1] = seq
            lent[2] = self.mark
            lent[3] = stamp
            lent[4] = math.nan if ts is None else ts
            lent[5] = now
        else:
            if seq is None:
                iv[i] = iv[i + 1] = _NO_SEQ
            else:
                iv[i] = seq + n_rows
                iv[i + 1] = seq
            iv[i + 2] = self.mark
            iv[i + 3] = stamp
            fv[f] = math.nan if ts is None else ts
            fv[f + 1] = now
        self.last = st
        return slot

    def _admit_new(
        self, key: str, seq: int | None, ts: float | None, n_rows: int, now: float
    ) -> int | str:
        st = self._create(key, now)
        if st is None:
            self.call_rejects += 1
            return REJECT_CAPACITY
        slot = st.slot
        iv = self._iv
        i = 4 * slot
        if seq is not None:  # _create left no sequence
            iv[i] = seq + n_rows
            iv[i + 1] = seq
        iv[i + 2] = self.mark
        iv[i + 3] = self._stamp
        self._stamp += 1
        if ts is not None:
            self._fv[2 * slot] = ts
        self.last = st
        return slot

    def admit_many(
        self,
        keys: Sequence[str],
        seqs: Sequence[int | None],
        tss: Sequence[float | None],
        lens: Sequence[int] | None,
        now: float,
    ) -> Any:
        """:meth:`admit` for each step in order (``lens`` None: one row each); a list, or an
        array of slots when every step was admitted.

        A plain call of at least :attr:`plain_min` steps is decided by :meth:`admit_plain`
        with array operations; any other call goes through :meth:`admit` step by step,
        so both decide alike. Does not set :attr:`last`.
        """
        n = len(keys)
        if self._pairs_lent:
            self.return_twins()
        if n >= self.plain_min:
            seq_none = seqs.count(None) if isinstance(seqs, list) else sum(q is None for q in seqs)
            ts_none = tss.count(None) if isinstance(tss, list) else sum(t is None for t in tss)
            if seq_none in (0, n) and ts_none in (0, n):
                try:
                    sq = None if seq_none else np.fromiter(seqs, dtype=np.int64, count=n)
                    t = None if ts_none else np.array(tss, dtype=np.float64)
                except (OverflowError, TypeError, ValueError):
                    pass
                else:
                    rows = 1 if lens is None else np.array(lens, dtype=np.int64)
                    slots = self.admit_plain(keys, sq, t, rows, now)
                    if slots is not None:
                        return slots
        return self._admit_each(keys, seqs, tss, lens, now)

    def admit_plain(
        self,
        keys: Sequence[str],
        seqs: np.ndarray[Any, np.dtype[np.int64]] | None,
        tss: np.ndarray[Any, np.dtype[np.float64]] | None,
        rows: int | np.ndarray[Any, np.dtype[np.int64]],
        now: float,
    ) -> np.ndarray[Any, np.dtype[np.intp]] | None:
        """Admit a plain call at once: the slots, or None (and nothing changed) unless every
        stream is known, appears once, and continues without a reset or refusal.

        ``seqs``/``tss`` hold each step's first sequence number / timestamp (None: the
        steps carry none); ``rows`` is each step's row count. Array operations over the
        slot columns: a fraction of a Python loop's cost at a thousand streams. Decides
        as :meth:`admit` would for each step in order (a property test holds it to that).
        """
        n = len(keys)
        if self._pairs_lent:
            self.return_twins()
        try:  # (itemgetter: one C loop of lookups, half of map(dict.get)'s cost)
            found = itemgetter(*keys)(self._slot_of) if n > 1 else (self._slot_of[keys[0]],)
        except (KeyError, TypeError):  # an unknown stream, or an unhashable key
            return None
        slots = np.fromiter(found, dtype=np.intp, count=n)
        order = _ARANGE[:n] if n <= _ARANGE.size else np.arange(n, dtype=np.intp)
        pos = self._pos
        pos[slots] = order  # (scratch: the last position of each slot)
        ints = self._int_items.take(slots).view(np.int64).reshape(n, 4)
        flts = self._flt_items.take(slots).view(np.float64).reshape(n, 2)
        # Every refusal in one mask and one reduction (a reduction costs more than the
        # comparisons at these sizes). Columns: next seq, last seq, mark, stamp; last
        # ts, last seen.
        bad = pos.take(slots) != order  # a stream twice
        bad |= ints[:, 2] == self.mark  # already admitted in this wave
        if self._idle < math.inf:
            bad |= now - flts[:, 1] > self._idle
        if seqs is not None:
            nxt = ints[:, 0]
            ahead = (seqs - nxt).view(np.uint64)  # (behind wraps around to huge)
            bad |= (ahead > self._seq_tol) & (nxt >= 0)
        if tss is not None:
            lt = flts[:, 0]
            late = tss - lt
            jump = late > self._ts_tol
            if seqs is None:
                jump |= late <= 0
            bad |= jump  # (a NaN last ts, none yet, compares False: no refusal)
        if bad.any():
            return None
        if seqs is None:
            ints[:, :2] = _NO_SEQ
        else:
            np.add(seqs, rows, out=ints[:, 0])
            ints[:, 1] = seqs
        flts[:, 0] = np.nan if tss is None else tss
        ints[:, 2] = self.mark
        np.add(order, self._stamp, out=ints[:, 3])
        self._stamp += n
        flts[:, 1] = now
        self._int_items.put(slots, ints.view(_INT_ITEM).reshape(n))  # one put each
        self._flt_items.put(slots, flts.view(_FLT_ITEM).reshape(n))
        return slots

    def _admit_each(
        self,
        keys: Sequence[str],
        seqs: Sequence[int | None],
        tss: Sequence[float | None],
        lens: Sequence[int] | None,
        now: float,
    ) -> list[int | str]:
        admit = self.admit
        if lens is None:
            return [admit(k, q, t, 1, now) for k, q, t in zip(keys, seqs, tss, strict=True)]
        return [admit(*a, now) for a in zip(keys, seqs, tss, lens, strict=True)]

    def _create(self, key: str, now: float) -> Stream | None:
        if not self._free:
            if self._cap < self.policy.max_streams:
                self._grow()
            elif not self._evict_one():
                return None
        slot = self._free.pop()
        st = Stream(key, slot, self)
        self.clear_slot(slot)
        self._iv[4 * slot] = self._iv[4 * slot + 1] = _NO_SEQ
        self._fv[2 * slot] = math.nan
        self._fv[2 * slot + 1] = now
        self._streams[key] = st
        self._slot_of[key] = slot
        self._by_slot[slot] = st
        return st

    def _evict_one(self) -> bool:
        self.return_twins()
        slot = int(self._used.argmin())
        if self._iv[4 * slot + 2] >= self._call_mark:
            return False  # every stream has a step in the current call
        st = self._by_slot[slot]
        assert st is not None
        self._remove(st)
        self._on_reset(RESET_EVICTED, 1)
        return True

    def _grow(self) -> None:
        cap = min(max(self._cap * 2, 1), self.policy.max_streams)
        for b in self._blocks:
            b.grow(cap)
        self._columns(cap)

    def _remove(self, st: Stream) -> None:
        if st.twin >= 0:
            self._free_pair(st)
        if st.pending:
            self.pending_streams -= 1
        del self._streams[st.key]
        del self._slot_of[st.key]
        slot = st.slot
        self._by_slot[slot] = None
        self._fv[2 * slot + 1] = math.inf
        self._iv[4 * slot + 3] = _FREE_USE
        self._iv[4 * slot + 2] = -1
        self._free.append(slot)

    # -- twins ---------------------------------------------------------------------------

    def lend_twins(self, st: Stream) -> None:
        """Move ``st``'s state into a pair of twin rows (the longest-held loan is recalled
        when none is free); :attr:`Stream.at` then says which row of the pair holds it."""
        if st.twin >= 0:
            return
        if not self._pairs_free:
            self._return_twin(next(iter(self._pairs_lent.values())))
        k = self._pairs_free.pop()
        st.twin = k
        self._pairs_lent[k] = st
        self.read_state(st, self.twins[2 * k])
        st.at = 2 * k
        st.nums = list(st._numbers())

    def _return_twin(self, st: Stream) -> None:
        """Take the twin rows back; the state and the numbers move home first."""
        at = st.at
        st.at = -1
        self.write_state(st, self.twins[at])
        nums = st.nums
        assert nums is not None
        st.nums = None
        i, f = 4 * st.slot, 2 * st.slot
        self._iv[i : i + 4] = array.array("q", nums[:4])
        self._fv[f : f + 2] = array.array("d", nums[4:])
        self._free_pair(st)

    def _free_pair(self, st: Stream) -> None:
        k = st.twin
        st.twin = -1
        st.at = -1
        st.nums = None
        del self._pairs_lent[k]
        self._pairs_free.append(k)

    def return_twins(self) -> None:
        """Bring every lent state and its numbers home: a batch, eviction, expiry and
        checkpoints read the columns and the blocks only."""
        while self._pairs_lent:
            self._return_twin(next(iter(self._pairs_lent.values())))

    # -- resets -------------------------------------------------------------------------

    def reset(self, key: str, reason: str, *, forget_sequence: bool) -> bool:
        """Reset one stream now; its next result reports ``reason``. False if unknown."""
        st = self._streams.get(key)
        if st is None:
            return False
        self.mark_reset(st, reason, forget_sequence=forget_sequence)
        return True

    def mark_reset(self, st: Stream, reason: str, *, forget_sequence: bool) -> None:
        """Reset a stream now; its next result reports ``reason``."""
        self.clear_state(st)
        self._add_pending(st, reason)
        if forget_sequence:
            if st.nums is not None:
                st.nums[0] = st.nums[1] = _NO_SEQ
                st.nums[4] = math.nan
            else:
                slot = st.slot
                self._iv[4 * slot] = self._iv[4 * slot + 1] = _NO_SEQ
                self._fv[2 * slot] = math.nan
        self._on_reset(reason, 1)

    def expire(self, now: float) -> int:
        """Forget streams idle for longer than the timeout; returns how many."""
        idle = self.policy.idle_timeout_s
        if idle is None or not self._streams:
            return 0
        self.return_twins()
        stale = np.flatnonzero(now - self._seen > idle).tolist()
        for slot in stale:
            st = self._by_slot[slot]
            assert st is not None
            self._remove(st)
        if stale:
            self._on_reset(RESET_IDLE, len(stale))
        return len(stale)

    def reset_all(self, specs: Sequence[StateSpec], reason: str) -> int:
        """Re-lay out the state for new specs; every stream starts again with ``reason``."""
        self.return_twins()  # the numbers go home; the state is dropped below
        self._lay_out(Layout(specs))
        for st in self._streams.values():
            self._add_pending(st, reason)
        n = len(self._streams)
        if n:
            self._on_reset(reason, n)
        return n

    def _add_pending(self, st: Stream, reason: str) -> None:
        if not st.pending:
            self.pending_streams += 1
        st.pending = (*st.pending, reason)

    def take_pending(self, st: Stream) -> tuple[str, ...]:
        """The resets not yet reported for ``st``; they count as reported from now on."""
        pending = st.pending
        if pending:
            st.pending = ()
            self.pending_streams -= 1
        return pending

    def clear(self) -> None:
        """Forget every stream (no reset is reported: there is nothing left to report to)."""
        for st in list(self._streams.values()):
            self._remove(st)
        self.pending_streams = 0

    # -- checkpoint -----------------------------------------------------------------------

    def save(self, path: Path, meta: dict[str, Any]) -> int:
        """Write every stream's state atomically (temp file, fsync, rename); returns the count.

        One ``.npz``: ``rows`` ``[n, row_size]`` float32 in least-recently-used order, and
        ``header``, a JSON document with the state signature and each stream's sequence
        bookkeeping. ``meta`` (model name, version) is stored for people, not checked.
        """
        streams = self._by_use()
        slots = np.fromiter((s.slot for s in streams), dtype=np.intp, count=len(streams))
        rows = np.empty((len(streams), self.layout.row_size), dtype=np.float32)
        for b in self._blocks:  # items in stream-major order: each stream's row at once
            part = b.rows.take(b.stream_major(slots)).view(np.float32)
            rows[:, b.start : b.start + b.size] = part.reshape(len(streams), b.size)
        header = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "state_signature": _signature_json(self.layout.signature),
            "row_size": self.layout.row_size,
            "meta": meta,
            "streams": [
                [
                    s.key,
                    None if nxt < 0 else nxt,
                    None if last < 0 else last,
                    None if ts != ts else ts,
                    list(s.pending),
                ]
                for s, (nxt, last), ts in zip(
                    streams,
                    self._ints[slots, :2].tolist(),
                    self._lts[slots].tolist(),
                    strict=True,
                )
            ],
        }
        text = json.dumps(header, separators=(",", ":"), allow_nan=False)
        path = Path(path)
        directory = path.parent if str(path.parent) else Path(".")
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot create a temporary file: {exc}") from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, rows=rows, header=np.array(text))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_dir(directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{path}: cannot write checkpoint: {exc}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return len(streams)

    def load(self, path: Path, now: float) -> int:
        """Replace every stream with the checkpoint's; returns how many were restored.

        Refuses a checkpoint whose state signature differs from this store's layout.
        Idle clocks restart at ``now`` (monotonic time does not survive a restart). When
        the checkpoint holds more than ``max_streams``, the least recently used are
        evicted (and counted).
        """
        path = Path(path)
        header, rows = _read_checkpoint(path)
        want = _signature_json(self.layout.signature)
        if header.get("state_signature") != want:
            raise CheckpointError(
                f"{path}: state signature {header.get('state_signature')} does not match "
                f"the model's {want}"
            )
        entries = header.get("streams")
        if (
            not isinstance(entries, list)
            or rows.ndim != 2
            or rows.shape != (len(entries), self.layout.row_size)
        ):
            raise CheckpointError(f"{path}: rows and streams do not agree")
        parsed = [_parse_entry(e, path) for e in entries]
        if len({p[0] for p in parsed}) != len(parsed):
            raise CheckpointError(f"{path}: a stream appears twice")
        skip = max(0, len(parsed) - self.policy.max_streams)
        self.clear()
        while self.capacity < len(parsed) - skip:
            self._grow()
        slots = []
        for i in range(skip, len(parsed)):  # least recently used first: stamps ascend
            key, next_seq, last_seq, last_ts, pending = parsed[i]
            st = self._create(key, now)
            assert st is not None  # the store is empty and large enough
            slot = st.slot
            slots.append(slot)
            self._iv[4 * slot] = _NO_SEQ if next_seq is None else next_seq
            self._iv[4 * slot + 1] = _NO_SEQ if last_seq is None else last_seq
            self._fv[2 * slot] = math.nan if last_ts is None else last_ts
            self._fv[2 * slot + 1] = now
            self._iv[4 * slot + 3] = self._stamp
            self._stamp += 1
            for reason in pending:
                self._add_pending(st, reason)
        kept = rows[skip:]
        index = np.array(slots, dtype=np.intp)
        for b in self._blocks:
            part = np.ascontiguousarray(kept[:, b.start : b.start + b.size])
            b.rows.put(b.stream_major(index), part.reshape(-1).view(b.vtype))
        if skip:
            self._on_reset(RESET_EVICTED, skip)
        return len(parsed) - skip


def _ignore(reason: str, count: int) -> None:
    """The default ``on_reset``: nobody is counting."""


def _signature_json(sig: Signature) -> list[list[Any]]:
    return [[name, list(shape), dtype] for name, shape, dtype in sig]


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], Array]:
    try:
        with np.load(path, allow_pickle=False) as data:
            text = str(data["header"][()])
            rows = np.asarray(data["rows"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # truncated
        raise CheckpointError(f"{path}: not a readable state checkpoint ({exc})") from None
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: checkpoint header is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a seqstream state checkpoint")
    if header.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {header.get('version')!r}; this runtime reads "
            f"{CHECKPOINT_VERSION}"
        )
    if rows.dtype != np.float32:
        raise CheckpointError(f"{path}: rows are {rows.dtype}, expected float32")
    return header, rows


def _parse_entry(
    entry: Any, path: Path
) -> tuple[str, int | None, int | None, float | None, tuple[str, ...]]:
    ok = isinstance(entry, list) and len(entry) == 5
    if ok:
        key, next_seq, last_seq, last_ts, pending = entry
        ok = (
            isinstance(key, str)
            and _opt_int(next_seq)
            and _opt_int(last_seq)
            and (
                last_ts is None
                or (isinstance(last_ts, int | float) and not isinstance(last_ts, bool))
            )
            and isinstance(pending, list)
            and all(isinstance(p, str) for p in pending)
        )
    if not ok:
        raise CheckpointError(f"{path}: malformed stream entry {str(entry)[:80]}")
    return key, next_seq, last_seq, None if last_ts is None else float(last_ts), tuple(pending)


def _opt_int(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63)
