"""Cutting a signal into overlapping frames, whole or block by block.

Frame ``i`` covers samples ``[i * hop, i * hop + window)``; a frame is emitted only when
all of its samples have arrived, so there is no padding and no look-ahead. The
streaming :class:`Framer` keeps the samples that later frames still need between
blocks, which makes its output independent of how the signal was split into blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Samples = np.ndarray[Any, np.dtype[np.float32]]


def n_frames(n_samples: int, window: int, hop: int) -> int:
    """How many complete frames ``n_samples`` samples hold."""
    if n_samples < window:
        return 0
    return (n_samples - window) // hop + 1


def frames_view(x: Samples, window: int, hop: int) -> Samples:
    """All complete frames of the contiguous float32 ``x``, as a read-only view."""
    k = n_frames(x.shape[0], window, hop)
    step = x.strides[0]
    return np.lib.stride_tricks.as_strided(
        x, shape=(k, window), strides=(hop * step, step), writeable=False
    )


def frame_signal(signal: Samples, window: int, hop: int) -> Samples:
    """All complete frames of ``signal`` at once, ``[k, window]`` (a copy)."""
    x = np.ascontiguousarray(signal, dtype=np.float32)
    return np.array(frames_view(x, window, hop))


class Framer:
    """Frames of a stream that arrives in blocks of any size; :meth:`reset` after a gap.

    ``frames_out`` counts frames emitted since the last reset, so frame ``frames_out``
    is the next one and starts at sample ``frames_out * hop`` of the stream.
    """

    def __init__(self, window: int, hop: int) -> None:
        if not 1 <= hop <= window:
            raise ValueError(f"need 1 <= hop <= window, got hop {hop} and window {window}")
        self.window = window
        self.hop = hop
        self.frames_out = 0
        self._pending = np.empty(0, dtype=np.float32)

    def reset(self) -> None:
        """Forget buffered samples: the next block starts a new, unrelated stream."""
        self.frames_out = 0
        self._pending = np.empty(0, dtype=np.float32)

    @property
    def buffered(self) -> int:
        """Samples held back for frames that are not complete yet."""
        return int(self._pending.shape[0])

    def push(self, samples: Samples) -> Samples:
        """The frames completed by ``samples``, ``[k, window]``, k >= 0.

        The result is a read-only view, valid until the next call.
        """
        block = np.asarray(samples, dtype=np.float32).reshape(-1)
        buf = np.concatenate((self._pending, block))
        frames = frames_view(buf, self.window, self.hop)
        k = frames.shape[0]
        # Keep what the next frame (which starts at k * hop) still needs: a slice of
        # buf, which the next concatenate copies anyway.
        self._pending = buf[k * self.hop :]
        self.frames_out += k
        return frames
