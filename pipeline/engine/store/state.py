"""Per-stream carried state: slots, resets, eviction, twins, checkpoints.

Every stream owns a slot. Its state lives in blocks laid out like the model's state
inputs with the batch axis stretched to the store's capacity (``[layers, capacity,
hidden]`` for an LSTM's ``h`` and ``c``; :mod:`pipeline.engine.store.layout`), so a batch
is gathered straight into the model's input buffer with one ``take`` and scattered back
with one assignment. Its sequence bookkeeping lives in named per-slot columns
(:mod:`pipeline.engine.store.slots`), so a whole call of known streams is admitted with
array operations (:mod:`pipeline.engine.store.admission`, the rules the store inherits).
A stream stepping alone call after call borrows a pair of contiguous twin rows and runs
in place on them (see the engine). Checkpoints are written and read in the format of
:mod:`pipeline.engine.store.checkpoint`.

Every reset has a reason from :data:`RESET_REASONS`, reported through ``on_reset`` when
it happens and kept on the stream (``pending``) until the stream's next result carries it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contract import StateSpec
from pipeline.engine.store import checkpoint
from pipeline.engine.store.admission import (
    ADMIT_REJECT_REASONS,
    REJECT_CAPACITY,
    REJECT_DUPLICATE,
    REJECT_OUT_OF_ORDER,
    REJECT_SEQ_JUMP,
    REPEAT,
    Admission,
)
from pipeline.engine.store.layout import Array, Block, Layout
from pipeline.engine.store.reasons import (
    RESET_DROPPED,
    RESET_ENGINE_ERROR,
    RESET_EVICTED,
    RESET_EXPLICIT,
    RESET_IDLE,
    RESET_MODEL_CHANGE,
    RESET_NON_FINITE,
    RESET_REASONS,
    RESET_SEQ_GAP,
    RESET_TS_GAP,
)
from pipeline.engine.store.slots import (
    FREE_USE,
    INTS,
    LAST_SEQ,
    LENT_TS,
    MARK,
    MAX_SEQ,
    NEXT_SEQ,
    NO_SEQ,
    STAMP,
    SlotNumbers,
    Stream,
)
from pipeline.errors import ConfigError

# The store's names, as its users import them (each defined in the module named above).
__all__ = [
    "ADMIT_REJECT_REASONS",
    "MAX_SEQ",
    "REJECT_CAPACITY",
    "REJECT_DUPLICATE",
    "REJECT_OUT_OF_ORDER",
    "REJECT_SEQ_JUMP",
    "REPEAT",
    "RESET_DROPPED",
    "RESET_ENGINE_ERROR",
    "RESET_EVICTED",
    "RESET_EXPLICIT",
    "RESET_IDLE",
    "RESET_MODEL_CHANGE",
    "RESET_NON_FINITE",
    "RESET_REASONS",
    "RESET_SEQ_GAP",
    "RESET_TS_GAP",
    "TWINS",
    "Layout",
    "ResetCallback",
    "StateStore",
    "StorePolicy",
    "Stream",
]

TWINS = 8  # pairs of spare rows lent to streams stepping alone

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


class StateStore(Admission):
    """Carried state and sequence bookkeeping for up to ``policy.max_streams`` streams.

    Every stream owns a slot: its state in the blocks (:class:`~.layout.Block`) and its
    numbers in per-slot columns (:class:`~.slots.SlotNumbers`: next sequence number, last
    timestamp, last use ...), so the usual call (every stream known, continuing, no
    reset) is admitted with a handful of array operations instead of a Python loop
    (:meth:`admit_many`, from :class:`~.admission.Admission`). Capacity starts at
    ``initial_capacity`` slots and doubles on demand up to ``max_streams``, so a handful
    of streams do not pay for ten thousand. Least recently used streams are evicted
    first (a per-slot stamp, not a linked list: eviction is rare, admission is not).

    A stream that steps alone call after call is lent a pair of twin rows (:attr:`twins`,
    contiguous, the model's batch-1 layout): the engine binds them to onnxruntime and
    runs the stream in place, reading one row and writing the other, with no copy.
    """

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
        self._admission(
            policy.idle_timeout_s,
            policy.seq_gap_tolerance,
            policy.max_seq_jump,
            policy.ts_gap_tolerance_s,
        )
        self.numbers = SlotNumbers()
        self._by_slot: list[Stream | None] = []
        self._free: list[int] = []  # pop() gives the lowest slot first
        self.pending_streams = 0  # streams whose pending resets are not reported yet
        self._resize(min(policy.initial_capacity, policy.max_streams))
        self._lay_out(Layout(specs))

    def _resize(self, cap: int) -> None:
        """Room for ``cap`` slots in the numbers, keeping what they hold (blocks: _grow)."""
        old = self.numbers.capacity
        self.numbers.resize(cap)
        self._by_slot.extend([None] * (cap - old))
        self._free.extend(range(cap - 1, old - 1, -1))

    def _lay_out(self, layout: Layout) -> None:
        self.layout = layout
        self._blocks = [Block(span, self.capacity, layout.init_row) for span in layout.spans()]
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
        used = self.numbers.stamp
        live = np.flatnonzero(used != FREE_USE)
        by_slot = self._by_slot
        return [by_slot[s] for s in live[np.argsort(used[live])].tolist()]

    @property
    def capacity(self) -> int:
        """How many streams fit before the state grows."""
        return self.numbers.capacity

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

    # -- slots --------------------------------------------------------------------------

    def _create(self, key: str, now: float) -> Stream | None:
        if not self._free:
            if self.capacity < self.policy.max_streams:
                self._grow()
            elif not self._evict_one():
                return None
        slot = self._free.pop()
        st = Stream(key, slot, self.numbers.read)
        self.clear_slot(slot)
        self.numbers.occupy(slot, now)
        self._streams[key] = st
        self._slot_of[key] = slot
        self._by_slot[slot] = st
        return st

    def _evict_one(self) -> bool:
        self.return_twins()
        slot = int(self.numbers.stamp.argmin())
        if self.numbers.iv[INTS * slot + MARK] >= self._call_mark:
            return False  # every stream has a step in the current call
        st = self._by_slot[slot]
        assert st is not None
        self._remove(st)
        self._on_reset(RESET_EVICTED, 1)
        return True

    def _grow(self) -> None:
        cap = min(max(self.capacity * 2, 1), self.policy.max_streams)
        for b in self._blocks:
            b.grow(cap)
        self._resize(cap)

    def _remove(self, st: Stream) -> None:
        if st.twin >= 0:
            self._free_pair(st)
        if st.pending:
            self.pending_streams -= 1
        del self._streams[st.key]
        del self._slot_of[st.key]
        slot = st.slot
        self._by_slot[slot] = None
        self.numbers.release(slot)
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
        st.nums = self.numbers.read(st.slot)

    def _return_twin(self, st: Stream) -> None:
        """Take the twin rows back; the state and the numbers move home first."""
        at = st.at
        st.at = -1
        self.write_state(st, self.twins[at])
        nums = st.nums
        assert nums is not None
        st.nums = None
        self.numbers.write(st.slot, nums)
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
                st.nums[NEXT_SEQ] = st.nums[LAST_SEQ] = NO_SEQ
                st.nums[LENT_TS] = math.nan
            else:
                self.numbers.set_sequence(st.slot, None, None, None)
        self._on_reset(reason, 1)

    def expire(self, now: float) -> int:
        """Forget streams idle for longer than the timeout; returns how many."""
        idle = self.policy.idle_timeout_s
        if idle is None or not self._streams:
            return 0
        self.return_twins()
        stale = np.flatnonzero(now - self.numbers.last_seen > idle).tolist()
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
        """Write every stream's state atomically (:func:`.checkpoint.write`); returns the count.

        Rows in least-recently-used order, with each stream's sequence bookkeeping and
        resets not yet reported. ``meta`` (model name, version) is stored for people.
        """
        streams = self._by_use()
        slots = np.fromiter((s.slot for s in streams), dtype=np.intp, count=len(streams))
        rows = np.empty((len(streams), self.layout.row_size), dtype=np.float32)
        for b in self._blocks:  # items in stream-major order: each stream's row at once
            part = b.rows.take(b.stream_major(slots)).view(np.float32)
            rows[:, b.start : b.start + b.size] = part.reshape(len(streams), b.size)
        numbers = self.numbers
        entries = [
            (
                s.key,
                None if nxt < 0 else nxt,
                None if last < 0 else last,
                None if ts != ts else ts,
                s.pending,
            )
            for s, nxt, last, ts in zip(
                streams,
                numbers.next_seq[slots].tolist(),
                numbers.last_seq[slots].tolist(),
                numbers.last_ts[slots].tolist(),
                strict=True,
            )
        ]
        checkpoint.write(Path(path), rows, self.layout.signature, meta, entries)
        return len(streams)

    def load(self, path: Path, now: float) -> int:
        """Replace every stream with the checkpoint's; returns how many were restored.

        Refuses a checkpoint whose state signature differs from this store's layout.
        Idle clocks restart at ``now`` (monotonic time does not survive a restart). When
        the checkpoint holds more than ``max_streams``, the least recently used are
        evicted (and counted).
        """
        parsed, rows = checkpoint.read(Path(path), self.layout.signature, self.layout.row_size)
        skip = max(0, len(parsed) - self.policy.max_streams)
        self.clear()
        while self.capacity < len(parsed) - skip:
            self._grow()
        slots = []
        numbers = self.numbers
        for i in range(skip, len(parsed)):  # least recently used first: stamps ascend
            key, next_seq, last_seq, last_ts, pending = parsed[i]
            st = self._create(key, now)
            assert st is not None  # the store is empty and large enough
            slot = st.slot
            slots.append(slot)
            numbers.set_sequence(slot, next_seq, last_seq, last_ts)
            numbers.iv[INTS * slot + STAMP] = self._stamp
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
