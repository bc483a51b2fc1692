"""What every audio source hands the keyword pipeline: blocks, positions, lost samples.

A source (:mod:`~pipeline.sources.microphone`, :mod:`~pipeline.sources.wavfile`) is
read by one consumer thread with :meth:`AudioSource.read`. Each :class:`AudioBlock`
says where it lies in the stream (``start``, in samples since the source started,
lost samples included) and how many samples were lost right before it (``lost``):
a consumer must not join audio across a gap, so it resets its feature extractor and
the stream's model state there (the defined action for every overflow).

:class:`BlockRing` is the bounded hand-off between a capture thread and that consumer.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from pipeline.features.framing import Samples


@dataclass(slots=True)
class AudioBlock:
    """Mono float32 samples in [-1, 1] and where they lie in the stream."""

    samples: Samples
    start: int  # stream position of samples[0] (samples since the source started)
    lost: int  # samples lost right before this block (0: continuous with the last block)
    wall_end: float  # time.time() when the last sample was captured
    mono_end: float  # time.monotonic() at the same moment

    @property
    def end(self) -> int:
        return self.start + int(self.samples.shape[0])


class AudioSource(Protocol):
    """A stream of audio blocks; ``name`` is the stream id (an MQTT topic level)."""

    name: str
    sample_rate: int
    # Live sources cannot wait: when the engine's queue is full their step is dropped
    # (counted, stream reset). Others (files) wait for room, so no audio is lost.
    live: bool

    def start(self) -> None:
        """Begin capturing or reading (a capture thread starts here)."""

    def read(self, timeout: float) -> AudioBlock | None:
        """The next block, or None when none came within ``timeout`` seconds."""

    @property
    def exhausted(self) -> bool:
        """True once no block will ever come again (file read, source closed)."""

    def close(self) -> None:
        """Stop capturing; blocks already buffered may still be read."""


class BlockRing:
    """A bounded FIFO of blocks between one producer and one consumer thread.

    At most ``capacity`` samples wait. A block that does not fit makes room by dropping
    the *oldest* blocks (fresh audio matters more than stale audio for detection); the
    samples dropped are added to the ``lost`` of the block that then comes first, so
    the consumer sees the gap. ``dropped`` counts blocks dropped so far.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 sample, got {capacity}")
        self.capacity = capacity
        self.dropped = 0
        self._blocks: deque[AudioBlock] = deque()
        self._held = 0
        self._carry_lost = 0  # lost samples not yet attached to a queued block
        self._cv = threading.Condition()

    @property
    def held(self) -> int:
        """Samples waiting."""
        return self._held

    def push(self, block: AudioBlock) -> int:
        """Queue ``block``; returns how many older blocks were dropped to make room."""
        n = int(block.samples.shape[0])
        dropped = 0
        with self._cv:
            while self._blocks and self._held + n > self.capacity:
                old = self._blocks.popleft()
                self._held -= int(old.samples.shape[0])
                self._carry_lost += old.lost + int(old.samples.shape[0])
                dropped += 1
            if n > self.capacity:  # cannot ever fit: the block itself is lost
                self._carry_lost += block.lost + n
                dropped += 1
            else:
                if self._carry_lost:
                    target = self._blocks[0] if self._blocks else block
                    target.lost += self._carry_lost  # the gap lies just before it
                    self._carry_lost = 0
                self._blocks.append(block)
                self._held += n
            self.dropped += dropped
            self._cv.notify()
        return dropped

    def pop(self, timeout: float) -> AudioBlock | None:
        with self._cv:
            if not self._blocks and not self._cv.wait_for(lambda: bool(self._blocks), timeout):
                return None
            block = self._blocks.popleft()
            self._held -= int(block.samples.shape[0])
            return block
