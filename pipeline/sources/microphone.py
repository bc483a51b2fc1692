"""A live microphone through PortAudio (``sounddevice``), as an audio source.

A capture thread reads fixed-size blocks with the *blocking* ``stream.read()`` (no cffi
callback: those need write+execute memory, which systemd's ``MemoryDenyWriteExecute``
forbids) and pushes them into a bounded :class:`~pipeline.sources.audio.BlockRing`;
the keyword pipeline's thread takes them with :meth:`MicrophoneSource.read`.

Every loss is counted and visible downstream as ``AudioBlock.lost`` (the consumer then
resets the stream's features and model state; nothing is silently joined):

* ``device`` overflow -- PortAudio reports that the device dropped input;
* ``buffer`` overflow -- the consumer fell ``buffer_ms`` behind; the oldest blocks go.

Device trouble is reported (observer metric + one log line) and capture is retried
with exponential backoff: the device cannot be opened (``open_failed``), a read fails
(``lost``), no block arrives for ``stall_s`` (``stalled``; the stream is aborted so the
read returns), or the device delivers nothing but digital zeros for
``silence_timeout_s`` (``silent``: a real microphone always hears some noise, so exact
zeros mean a muted, unplugged or broken input). PortAudio enumerates devices once per
process; a device named through a sound server (``default``/``pulse``) is found
again after that server restarts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.errors import ConfigError, DependencyError
from pipeline.features.wav import to_mono
from pipeline.sources.audio import AudioBlock, BlockRing

log = logging.getLogger(__name__)

OVERFLOW_DEVICE = "device"
OVERFLOW_BUFFER = "buffer"
OVERFLOWS: tuple[str, ...] = (OVERFLOW_DEVICE, OVERFLOW_BUFFER)
PROBLEM_OPEN = "open_failed"
PROBLEM_LOST = "lost"
PROBLEM_STALLED = "stalled"
PROBLEM_SILENT = "silent"
PROBLEMS: tuple[str, ...] = (PROBLEM_OPEN, PROBLEM_LOST, PROBLEM_STALLED, PROBLEM_SILENT)


@dataclass(frozen=True)
class MicrophoneSettings:
    """One capture device; parsed once from ``[[audio.microphone]]``."""

    name: str = "mic"  # stream id: the ``{stream}`` level of the keyword topic
    device: str | int | None = None  # PortAudio device name or index; None: the default
    sample_rate_hz: int | None = None  # None: the model's front-end rate
    channels: int = 1  # captured channels, averaged to mono
    block_size: int = 320  # samples per read (20 ms at 16 kHz)
    buffer_ms: float = 2_000.0  # most audio waiting for the keyword pipeline
    silence_timeout_s: float | None = 10.0  # only exact zeros this long -> reopen
    stall_s: float = 2.0  # no block for this long (beyond one block) -> reopen
    retry_min_s: float = 0.5
    retry_max_s: float = 10.0
    latency: str = "low"  # PortAudio's suggested input latency: "low" or "high"

    def __post_init__(self) -> None:
        """The one check of these values (the TOML reader only checks their types); an
        error names the field, and the reader prefixes its table (``audio.microphone[0]``)."""
        silence = self.silence_timeout_s
        rate = self.sample_rate_hz
        checks = [
            (bool(self.name) and not any(c in self.name for c in "/+#{}\0"), "name",
             f"must be a non-empty topic level without / + # {{ }}, got {self.name!r}"),
            (1 <= self.channels <= 64, "channels", f"must be 1..64, got {self.channels}"),
            (16 <= self.block_size <= 1 << 20, "block_size",
             f"must be 16..{1 << 20}, got {self.block_size}"),
            (10.0 <= self.buffer_ms <= 600_000.0, "buffer_ms",
             f"must be 10.0..600000.0, got {self.buffer_ms}"),
            (silence is None or (math.isfinite(silence) and silence > 0), "silence_timeout_s",
             f"must be a finite number > 0 (or false for off), got {silence}"),
            (0.1 <= self.stall_s <= 3600.0, "stall_s", f"must be 0.1..3600.0, got {self.stall_s}"),
            (0.01 <= self.retry_min_s <= 3600.0, "retry_min_s",
             f"must be 0.01..3600.0, got {self.retry_min_s}"),
            (0.01 <= self.retry_max_s <= 3600.0, "retry_max_s",
             f"must be 0.01..3600.0, got {self.retry_max_s}"),
            (self.retry_max_s >= self.retry_min_s, "retry_max_s",
             f"must be >= retry_min_s ({self.retry_min_s}), got {self.retry_max_s}"),
            (self.latency in ("low", "high"), "latency",
             f"must be one of 'low', 'high', got {self.latency!r}"),
            (rate is None or rate >= 1_000, "sample_rate_hz", f"must be >= 1000, got {rate}"),
        ]  # fmt: skip
        for ok, key, problem in checks:
            if not ok:
                raise ConfigError(f"{key}: {problem}")


class CaptureStream(Protocol):
    """What the capture thread needs of an open input stream (``sd.InputStream``)."""

    def read(self, frames: int) -> tuple[Any, bool]: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


Opener = Callable[[MicrophoneSettings, int], CaptureStream]


class MicrophoneObserver(Protocol):
    """Where the source reports (metrics); called on the capture thread."""

    def on_overflow(self, source: str, where: str) -> None: ...
    def on_device_problem(self, source: str, problem: str) -> None: ...
    def on_device_up(self, source: str, up: bool) -> None: ...


def require_sounddevice() -> Any:
    """The ``sounddevice`` module, or a DependencyError saying what to install."""
    try:
        import sounddevice as sd
    except (ImportError, OSError) as exc:  # OSError: libportaudio2 missing
        raise DependencyError(
            f"the microphone source needs sounddevice and PortAudio ({exc}): "
            "pip install 'seqstream[audio]'; apt-get install libportaudio2"
        ) from None
    return sd


def open_sounddevice(cfg: MicrophoneSettings, rate: int) -> CaptureStream:
    """A started ``sounddevice.InputStream`` in blocking mode (no callback)."""
    sd = require_sounddevice()
    stream = sd.InputStream(
        samplerate=rate,
        blocksize=cfg.block_size,
        device=cfg.device,
        channels=cfg.channels,
        dtype="float32",
        latency=cfg.latency,
    )
    try:
        stream.start()
    except BaseException:
        stream.close()
        raise
    return stream  # type: ignore[no-any-return]


class MicrophoneSource:
    """Captures ``cfg.device`` on its own thread into a bounded ring; see the module doc."""

    def __init__(
        self,
        cfg: MicrophoneSettings,
        sample_rate: int,
        observer: MicrophoneObserver,
        *,
        opener: Opener = open_sounddevice,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.sample_rate = sample_rate
        self.live = True
        self._observer = observer
        self._open = opener
        self._clock = clock
        self._wall = wall_clock
        self._ring = BlockRing(max(cfg.block_size, round(cfg.buffer_ms * sample_rate / 1000)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: CaptureStream | None = None
        self._stream_lock = threading.Lock()
        self._pos = 0  # stream position of the next captured sample
        self._lost = 0  # samples lost since the last block pushed
        self._last_block = 0.0  # monotonic time of the last read returned (or of the open)
        self._captured_until: float | None = None  # monotonic end of the last block captured
        self._stalled = False
        self.opened = 0  # successful opens (1 + retries that worked)

    # -- consumer side ------------------------------------------------------------------

    @property
    def exhausted(self) -> bool:
        return self._stop.is_set() and self._ring.held == 0

    @property
    def buffered(self) -> int:
        """Samples waiting in the ring."""
        return self._ring.held

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"microphone {self.name!r} already started")
        self._thread = threading.Thread(
            target=self._run, name=f"seqstream-mic-{self.name}", daemon=True
        )
        self._thread.start()

    def read(self, timeout: float) -> AudioBlock | None:
        block = self._ring.pop(timeout)
        if block is None:
            self._check_stall()
        return block

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the read in progress (one block); abort the stream if it hangs."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(min(timeout, self.cfg.stall_s))
        if self._thread.is_alive():
            self._abort_stream()
            self._thread.join(timeout)

    # -- capture thread -----------------------------------------------------------------

    def _run(self) -> None:
        cfg = self.cfg
        backoff = cfg.retry_min_s
        while not self._stop.is_set():
            problem = self._capture_once()
            if problem is None:
                return
            self._observer.on_device_up(self.name, False)
            self._observer.on_device_problem(self.name, problem)
            if self._stop.wait(backoff):
                return
            backoff = min(cfg.retry_max_s, backoff * 2)
            if problem != PROBLEM_OPEN:
                backoff = cfg.retry_min_s  # it worked a moment ago: try again soon

    def _capture_once(self) -> str | None:
        """Open, read until trouble or stop; the problem, or None when asked to stop."""
        cfg = self.cfg
        try:
            stream = self._open(cfg, self.sample_rate)
        except Exception as exc:  # PortAudioError, ValueError (no such device), OSError
            log.warning("microphone %r: cannot open device %r: %s", self.name, cfg.device, exc)
            return PROBLEM_OPEN
        with self._stream_lock:
            self._stream = stream
        self.opened += 1
        # Audio that played while the device was closed is lost: the first block says how
        # much, measured from the end of the last block captured.
        resume_from = self._captured_until
        if resume_from is not None:
            log.info("microphone %r: capturing again", self.name)
        self._observer.on_device_up(self.name, True)
        self._stalled = False
        self._last_block = self._clock()
        try:
            return self._read_loop(stream, resume_from)
        finally:
            with self._stream_lock:
                self._stream = None
            with contextlib.suppress(Exception):
                stream.close()

    def _read_loop(self, stream: CaptureStream, resume_from: float | None) -> str | None:
        cfg = self.cfg
        name = self.name
        observer = self._observer
        limit = (
            None
            if cfg.silence_timeout_s is None
            else round(cfg.silence_timeout_s * self.sample_rate)
        )
        zeros = 0
        while not self._stop.is_set():
            try:
                data, overflowed = stream.read(cfg.block_size)
            except Exception as exc:  # PortAudioError and friends: the device went away
                if self._stop.is_set():
                    return None
                reason = PROBLEM_STALLED if self._stalled else PROBLEM_LOST
                log.warning("microphone %r: capture failed (%s): %s", name, reason, exc)
                return reason
            mono_end = self._clock()
            wall_end = self._wall()
            self._last_block = self._captured_until = mono_end
            samples = to_mono(np.asarray(data))
            n = int(samples.shape[0])
            if n == 0:
                continue
            if resume_from is not None:
                gap_s = mono_end - n / self.sample_rate - resume_from
                self._lost += max(1, round(gap_s * self.sample_rate))
                resume_from = None
            if overflowed:
                observer.on_overflow(name, OVERFLOW_DEVICE)
                self._lost += 1  # PortAudio does not say how much; at least one sample
            self._pos += self._lost
            block = AudioBlock(samples, self._pos, self._lost, wall_end, mono_end)
            self._pos += n
            self._lost = 0
            dropped = self._ring.push(block)
            for _ in range(dropped):
                observer.on_overflow(name, OVERFLOW_BUFFER)
            if limit is not None:
                zeros = 0 if samples.any() else zeros + n
                if zeros >= limit:
                    log.warning(
                        "microphone %r: only digital zeros for %g s; reopening the device",
                        name,
                        cfg.silence_timeout_s,
                    )
                    return PROBLEM_SILENT
        return None

    # -- watchdog (consumer thread) -----------------------------------------------------

    def _check_stall(self) -> None:
        """Abort a stream whose blocking read has not returned for too long."""
        if self._stream is None or self._stalled:
            return
        block_s = self.cfg.block_size / self.sample_rate
        if self._clock() - self._last_block > self.cfg.stall_s + block_s:
            self._stalled = True
            log.warning(
                "microphone %r: no audio for %g s; aborting the stream", self.name, self.cfg.stall_s
            )
            self._abort_stream()

    def _abort_stream(self) -> None:
        with self._stream_lock:
            stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.abort()
