"""Admission: whether a step may continue its stream, decided from the slot's numbers.

A step continues its stream, or the stream is reset first (idle for longer than the
timeout; more sequence numbers missing than tolerated; timestamps too far apart), or
the step is refused (a duplicate, out of order, a sequence number too far ahead to be a
gap, no capacity left) and changes nothing. One step per stream per wave: a stream's
later step in the same call waits for the next wave (:data:`REPEAT`).

:class:`Admission` is the half of :class:`~pipeline.engine.store.state.StateStore` that
holds these rules and the wave bookkeeping; the store holds the slots, the state and
the twins, and provides what admission asks of it (its streams by key, their numbers,
a new stream's slot). Admission is the hottest code of the engine after onnxruntime,
so it reads a slot's numbers by name but at Python-list speed (see
:mod:`pipeline.engine.store.slots`), and a plain call of known streams in one pass of
array operations (:meth:`Admission.admit_plain`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

import numpy as np

from pipeline.engine.store.reasons import RESET_IDLE, RESET_SEQ_GAP, RESET_TS_GAP
from pipeline.engine.store.slots import (
    FLOATS,
    INTS,
    LAST_SEEN,
    LAST_SEQ,
    LAST_TS,
    LENT_SEEN,
    LENT_TS,
    MARK,
    MAX_SEQ,
    NEXT_SEQ,
    NO_SEQ,
    STAMP,
    SlotNumbers,
    Stream,
)

# Why admission refuses a step (the engine adds reasons for malformed input).
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

_ARANGE = np.arange(4096, dtype=np.intp)


class Admission:
    """The admission rules and the current call's waves, as a base of the state store.

    ``mark`` numbers the current wave; each admitted step stamps its slot with it (one
    step per stream per wave) and with the next value of the least-recently-used clock.
    After a wave's admissions, ``call_rejects``, ``call_repeats`` and :attr:`wave_resets`
    tell the engine whether any was refused, deferred or needs a reset, so the plain
    case can skip looking.
    """

    # Below this many steps a call is admitted one by one: cheaper than admit_plain's
    # fixed cost (measured: ~15-25 us of numpy calls against ~1.2 us per step).
    plain_min = 16

    # What the store provides (StateStore.__init__ sets them; see its methods below).
    numbers: SlotNumbers
    _get: Callable[[str], Stream | None]
    _slot_of: dict[str, int]
    _pairs_lent: OrderedDict[int, Stream]

    def _admission(
        self,
        idle_timeout_s: float | None,
        seq_gap_tolerance: int,
        max_seq_jump: int | None,
        ts_gap_tolerance_s: float | None,
    ) -> None:
        """Set up the rules (the policy as plain numbers: "never" is infinity) and waves."""
        self._idle = math.inf if idle_timeout_s is None else idle_timeout_s
        self._seq_tol = seq_gap_tolerance
        self._seq_jump = MAX_SEQ if max_seq_jump is None else max_seq_jump
        self._ts_tol = math.inf if ts_gap_tolerance_s is None else ts_gap_tolerance_s
        self.last: Stream | None = None  # the stream admit() admitted last
        self._stamp = 0  # LRU clock: every admission takes the next value
        self.mark = 0  # the current wave; every begin() and next_wave() moves it on
        self._call_mark = 0  # the first wave of the current call
        self.call_rejects = 0
        self.call_repeats = 0
        self.wave_resets: dict[str, str] = {}  # stream key -> reset its step needs first

    def _create(self, key: str, now: float) -> Stream | None:
        """A new stream's slot (evicting if need be), or None: the store provides it."""
        raise NotImplementedError

    def return_twins(self) -> None:
        """Bring lent numbers home before reading the columns: the store provides it."""
        raise NotImplementedError

    def begin(self) -> None:
        """Start an engine call: streams admitted from now on are pinned against eviction."""
        self.next_wave()
        self._call_mark = self.mark

    def next_wave(self) -> None:
        """Start a wave: each stream admits at most one step until the next wave."""
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
            iv = self.numbers.iv
            fv = self.numbers.fv
            i = INTS * slot
            f = FLOATS * slot
            nxt, last_seq, mark = iv[i + NEXT_SEQ], iv[i + LAST_SEQ], iv[i + MARK]
            last_ts, seen = fv[f + LAST_TS], fv[f + LAST_SEEN]
        else:
            nxt, last_seq, mark = lent[NEXT_SEQ], lent[LAST_SEQ], lent[MARK]
            last_ts, seen = lent[LENT_TS], lent[LENT_SEEN]
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
                lent[NEXT_SEQ] = lent[LAST_SEQ] = NO_SEQ
            else:
                lent[NEXT_SEQ] = seq + n_rows
                lent[LAST_SEQ] = seq
            lent[MARK] = self.mark
            lent[STAMP] = stamp
            lent[LENT_TS] = math.nan if ts is None else ts
            lent[LENT_SEEN] = now
        else:
            if seq is None:
                iv[i + NEXT_SEQ] = iv[i + LAST_SEQ] = NO_SEQ
            else:
                iv[i + NEXT_SEQ] = seq + n_rows
                iv[i + LAST_SEQ] = seq
            iv[i + MARK] = self.mark
            iv[i + STAMP] = stamp
            fv[f + LAST_TS] = math.nan if ts is None else ts
            fv[f + LAST_SEEN] = now
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
        iv = self.numbers.iv
        i = INTS * slot
        if seq is not None:  # _create left no sequence
            iv[i + NEXT_SEQ] = seq + n_rows
            iv[i + LAST_SEQ] = seq
        iv[i + MARK] = self.mark
        iv[i + STAMP] = self._stamp
        self._stamp += 1
        if ts is not None:
            self.numbers.fv[FLOATS * slot + LAST_TS] = ts
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
        cols = self.numbers
        slots = np.fromiter(found, dtype=np.intp, count=n)
        order = _ARANGE[:n] if n <= _ARANGE.size else np.arange(n, dtype=np.intp)
        pos = cols.positions
        pos[slots] = order  # (scratch: the last position of each slot)
        ints = cols.int_items.take(slots).view(np.int64).reshape(n, INTS)
        flts = cols.float_items.take(slots).view(np.float64).reshape(n, FLOATS)
        # Every refusal in one mask and one reduction (a reduction costs more than the
        # comparisons at these sizes).
        bad = pos.take(slots) != order  # a stream twice
        bad |= ints[:, MARK] == self.mark  # already admitted in this wave
        if self._idle < math.inf:
            bad |= now - flts[:, LAST_SEEN] > self._idle
        if seqs is not None:
            nxt = ints[:, NEXT_SEQ]
            ahead = (seqs - nxt).view(np.uint64)  # (behind wraps around to huge)
            bad |= (ahead > self._seq_tol) & (nxt >= 0)
        if tss is not None:
            late = tss - flts[:, LAST_TS]
            jump = late > self._ts_tol
            if seqs is None:
                jump |= late <= 0
            bad |= jump  # (a NaN last ts, none yet, compares False: no refusal)
        if bad.any():
            return None
        if seqs is None:
            ints[:, NEXT_SEQ] = ints[:, LAST_SEQ] = NO_SEQ
        else:
            np.add(seqs, rows, out=ints[:, NEXT_SEQ])
            ints[:, LAST_SEQ] = seqs
        flts[:, LAST_TS] = np.nan if tss is None else tss
        ints[:, MARK] = self.mark
        np.add(order, self._stamp, out=ints[:, STAMP])
        self._stamp += n
        flts[:, LAST_SEEN] = now
        cols.int_items.put(slots, ints.view(cols.int_items.dtype).reshape(n))  # one put each
        cols.float_items.put(slots, flts.view(cols.float_items.dtype).reshape(n))
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
