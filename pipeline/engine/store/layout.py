"""The model's state tensors laid out for a store: one row per stream, blocks per span.

A row is the model's state tensors at batch 1, flattened and laid end to end (the
layout of checkpoints and of twin rows); a block holds one span of every slot's state in
the model's own order, so a batch is gathered straight into the model's input buffer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.contract import StateSpec

Array = np.ndarray[Any, np.dtype[np.float32]]
Signature = tuple[tuple[str, tuple[int, ...], str], ...]


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


class Block:
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
