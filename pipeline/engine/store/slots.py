"""Each slot's sequence bookkeeping, by name, and the stream that owns the slot.

A slot's numbers sit side by side: four int64 (:data:`NEXT_SEQ`, :data:`LAST_SEQ`,
:data:`MARK`, :data:`STAMP`) and two float64 (:data:`LAST_TS`, :data:`LAST_SEEN`), in
``array.array`` storage, whose items read and write at Python speed (twice a
memoryview's) for a step admitted alone; numpy views of the same memory serve a whole
batch with array operations (:class:`SlotNumbers`). A stream stepping alone on lent
twin rows keeps its numbers in a list instead (:attr:`Stream.nums`), in the same order:
the ints, then the floats at ``INTS + LAST_TS`` and ``INTS + LAST_SEEN``.
"""

from __future__ import annotations

import array
import math
from collections.abc import Callable
from typing import Any

import numpy as np

# A slot's int64 numbers, in this order:
NEXT_SEQ = 0  # the sequence number expected next, or NO_SEQ
LAST_SEQ = 1  # first sequence number of the last step run, or NO_SEQ
MARK = 2  # the wave that last admitted a step (-1: none)
STAMP = 3  # least-recently-used clock of the last admission; FREE_USE: a free slot
INTS = 4
# its float64 numbers:
LAST_TS = 0  # timestamp of the last step run, or NaN
LAST_SEEN = 1  # the store's clock at the last step; inf: a free slot (never idle)
FLOATS = 2
# The same numbers of a lent stream, in one list (Stream.nums):
LENT_TS = INTS + LAST_TS
LENT_SEEN = INTS + LAST_SEEN

NO_SEQ = -1  # the int columns' None
FREE_USE = int(np.iinfo(np.int64).max)  # a free slot's stamp: never the oldest
# Sequence numbers stay below this, so that seq + rows fits the int64 columns.
MAX_SEQ = 1 << 62

_INT_ITEM = np.dtype((np.void, INTS * 8))  # a slot's int64 numbers as one item
_FLT_ITEM = np.dtype((np.void, FLOATS * 8))  # its float64 numbers as one item

IntColumn = np.ndarray[Any, np.dtype[np.int64]]
FloatColumn = np.ndarray[Any, np.dtype[np.float64]]


class SlotNumbers:
    """The numbers of every slot: ``ints[slot, NEXT_SEQ]`` ... ``floats[slot, LAST_SEEN]``.

    ``iv``/``fv`` are the flat ``array.array`` storage (slot ``s``'s ints at ``INTS * s``,
    its floats at ``FLOATS * s``) for code that reads one slot at Python speed;
    ``ints``/``floats`` are ``[capacity, INTS]``/``[capacity, FLOATS]`` numpy views of
    the same memory, the named columns (``next_seq`` ... ``last_seen``) views of those,
    and ``int_items``/``float_items`` one opaque item per slot, so a batch's numbers move
    with one ``take`` and one ``put`` (a fifth of row-wise fancy indexing's cost).
    """

    iv: array.array[int]
    fv: array.array[float]
    ints: np.ndarray[Any, np.dtype[np.int64]]
    floats: np.ndarray[Any, np.dtype[np.float64]]
    next_seq: IntColumn
    last_seq: IntColumn
    mark: IntColumn
    stamp: IntColumn
    last_ts: FloatColumn
    last_seen: FloatColumn
    int_items: np.ndarray[Any, np.dtype[np.void]]
    float_items: np.ndarray[Any, np.dtype[np.void]]
    positions: np.ndarray[Any, np.dtype[np.intp]]  # scratch, one per slot (admission)

    def __init__(self) -> None:
        self.capacity = 0

    def resize(self, cap: int) -> None:
        """(Re)allocate for ``cap`` slots, keeping what the first ones hold; new slots free."""
        old = self.capacity
        iv = array.array("q", bytes(8 * INTS * cap))
        fv = array.array("d", bytes(8 * FLOATS * cap))
        ints = np.frombuffer(iv, dtype=np.int64).reshape(cap, INTS)
        floats = np.frombuffer(fv, dtype=np.float64).reshape(cap, FLOATS)
        ints[:, NEXT_SEQ] = ints[:, LAST_SEQ] = NO_SEQ
        ints[:, MARK] = -1
        ints[:, STAMP] = FREE_USE
        floats[:, LAST_TS] = np.nan
        floats[:, LAST_SEEN] = np.inf
        if old:
            ints[:old] = self.ints
            floats[:old] = self.floats
        self.iv, self.fv, self.ints, self.floats = iv, fv, ints, floats
        self.next_seq, self.last_seq, self.mark, self.stamp = ints.T
        self.last_ts, self.last_seen = floats.T
        self.int_items = ints.view(_INT_ITEM).reshape(cap)
        self.float_items = floats.view(_FLT_ITEM).reshape(cap)
        self.positions = np.empty(cap, dtype=np.intp)
        self.capacity = cap

    def read(self, slot: int) -> list[Any]:
        """One slot's numbers as a list, in :attr:`Stream.nums` order."""
        i, f = INTS * slot, FLOATS * slot
        return [*self.iv[i : i + INTS], *self.fv[f : f + FLOATS]]

    def write(self, slot: int, nums: list[Any]) -> None:
        """Set one slot's numbers from a list in :attr:`Stream.nums` order."""
        i, f = INTS * slot, FLOATS * slot
        self.iv[i : i + INTS] = array.array("q", nums[:INTS])
        self.fv[f : f + FLOATS] = array.array("d", nums[INTS:])

    def set_sequence(
        self, slot: int, next_seq: int | None, last_seq: int | None, last_ts: float | None
    ) -> None:
        """Where the slot's stream stands (None: nothing known); ``forget`` is all None."""
        i = INTS * slot
        self.iv[i + NEXT_SEQ] = NO_SEQ if next_seq is None else next_seq
        self.iv[i + LAST_SEQ] = NO_SEQ if last_seq is None else last_seq
        self.fv[FLOATS * slot + LAST_TS] = math.nan if last_ts is None else last_ts

    def occupy(self, slot: int, now: float) -> None:
        """A new stream in ``slot``: no sequence yet, seen ``now``."""
        self.set_sequence(slot, None, None, None)
        self.fv[FLOATS * slot + LAST_SEEN] = now

    def release(self, slot: int) -> None:
        """``slot`` is free: never idle, never the least recently used, in no wave."""
        i = INTS * slot
        self.fv[FLOATS * slot + LAST_SEEN] = math.inf
        self.iv[i + STAMP] = FREE_USE
        self.iv[i + MARK] = -1


class Stream:
    """What the store knows about one stream besides its numbers and its state.

    A stream's numbers live in its slot's columns (so a whole batch is admitted with a
    few array operations), except while the stream is lent twin rows: then they live in
    :attr:`nums`, where a stream stepping alone reads and writes them at the speed of a
    Python list. The properties read them from either; ``numbers_of`` is the store's
    :meth:`SlotNumbers.read`, so a stream never reaches into the columns itself.
    """

    __slots__ = ("_numbers_of", "at", "key", "nums", "pending", "slot", "twin")

    def __init__(self, key: str, slot: int, numbers_of: Callable[[int], list[Any]]) -> None:
        self.key = key
        self.slot = slot  # its home in the store's state blocks and columns
        self.at = -1  # -1: its state is at home; else the twin row holding it
        self.twin = -1  # a lent pair of twin rows, or -1
        # While lent: the slot's numbers (SlotNumbers.read order), else None.
        self.nums: list[Any] | None = None
        self.pending: tuple[str, ...] = ()  # resets not yet reported in a result
        self._numbers_of = numbers_of

    def numbers(self) -> list[Any]:
        """Its numbers, wherever they live (a copy when at home)."""
        return self.nums if self.nums is not None else self._numbers_of(self.slot)

    @property
    def next_seq(self) -> int | None:
        """The sequence number expected next."""
        v: int = self.numbers()[NEXT_SEQ]
        return None if v < 0 else v

    @property
    def last_seq(self) -> int | None:
        """First sequence number of the last step run."""
        v: int = self.numbers()[LAST_SEQ]
        return None if v < 0 else v

    @property
    def mark(self) -> int:
        """The wave that last admitted a step (one step per stream per wave)."""
        mark: int = self.numbers()[MARK]
        return mark

    @property
    def last_ts(self) -> float | None:
        """Timestamp of the last step run."""
        v: float = self.numbers()[LENT_TS]
        return None if v != v else v

    @property
    def last_seen(self) -> float:
        seen: float = self.numbers()[LENT_SEEN]
        return seen

    def __repr__(self) -> str:
        return f"Stream({self.key!r}, slot={self.slot}, next_seq={self.next_seq})"
