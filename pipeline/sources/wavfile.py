"""A WAV file as an audio source: the microphone's interface, for replay and tests.

``realtime=True`` hands out each block when it would have been captured live (paced
by the monotonic clock from :meth:`WavFileSource.start`), so the whole daemon can be
exercised as if a microphone were attached; ``realtime=False`` reads as fast as the
consumer takes blocks (offline detection, real-time-factor benchmarks). Blocks never
have lost samples; the wall-clock times are those a live capture would have had.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.features.framing import Samples
from pipeline.features.wav import read_wav
from pipeline.sources.audio import AudioBlock


class WavFileSource:
    """Blocks of ``block_size`` samples of a mono signal; :meth:`open` reads a WAV file."""

    def __init__(
        self,
        name: str,
        samples: Samples,
        sample_rate: int,
        *,
        block_size: int = 320,
        realtime: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if block_size < 1:
            raise ConfigError(f"audio source {name!r}: block_size must be >= 1")
        self.name = name
        self.sample_rate = sample_rate
        self.live = False  # even when paced: a file can wait, so nothing is ever dropped
        self.block_size = block_size
        self.realtime = realtime
        self._samples = samples
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep
        self._pos = 0
        self._t0 = 0.0
        self._wall0 = 0.0
        self._closed = False

    @classmethod
    def open(
        cls,
        name: str,
        path: str | Path,
        *,
        sample_rate: int | None = None,
        block_size: int = 320,
        realtime: bool = True,
    ) -> WavFileSource:
        """A source reading ``path``; ``sample_rate`` is what the model needs (checked)."""
        samples, rate = read_wav(path)
        if sample_rate is not None and sample_rate != rate:
            raise ConfigError(
                f"audio source {name!r}: {path} is {rate} Hz, the model needs {sample_rate} Hz"
            )
        return cls(name, samples, rate, block_size=block_size, realtime=realtime)

    @property
    def duration_s(self) -> float:
        return float(self._samples.shape[0] / self.sample_rate)

    @property
    def exhausted(self) -> bool:
        return self._closed or self._pos >= self._samples.shape[0]

    def start(self) -> None:
        self._t0 = self._clock()
        self._wall0 = self._wall()

    def close(self) -> None:
        self._closed = True

    def read(self, timeout: float) -> AudioBlock | None:
        if self.exhausted:
            return None
        start = self._pos
        end = min(start + self.block_size, self._samples.shape[0])
        if self.realtime:
            due = self._t0 + end / self.sample_rate
            wait = due - self._clock()
            if wait > timeout:
                self._sleep(max(0.0, timeout))
                return None
            if wait > 0:
                self._sleep(wait)
            wall_end = self._wall0 + end / self.sample_rate
        else:
            wall_end = self._wall()
        self._pos = end
        return AudioBlock(
            samples=self._samples[start:end],
            start=start,
            lost=0,
            wall_end=wall_end,
            mono_end=self._clock(),
        )
