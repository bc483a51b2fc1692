"""Log-mel features: the one implementation training and the daemon share.

:class:`LogMelConfig` is what travels in a model's metadata (``ModelSpec.frontend``):
sample rate, window and hop in milliseconds, number of mel bands, band edges and the
offset added before the logarithm. :class:`LogMel` turns frames into features;
:class:`StreamingLogMel` accepts blocks of any size and carries the leftover samples
between them, so block-by-block output equals :func:`logmel` on the whole signal.

Per frame: periodic Hann window, power spectrum of an ``n_fft``-point real FFT
(``n_fft`` the next power of two >= the window), HTK-scale triangular mel filters
(unnormalised), then ``log(mel + log_offset)``. Samples are floats in [-1, 1]
(16-bit PCM divided by 32768).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pipeline.features.framing import Framer, Samples, frame_signal

KIND = "logmel"

Features = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True)
class LogMelConfig:
    """Front-end settings; validated on creation (``ValueError`` names the field)."""

    sample_rate_hz: int = 16_000
    window_ms: float = 25.0
    hop_ms: float = 10.0
    n_mels: int = 40
    fmin_hz: float = 20.0
    fmax_hz: float = 7_600.0
    log_offset: float = 1e-6

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, problem: str) -> None:
            if not ok:
                raise ValueError(f"'{name}' {problem}")

        need(8_000 <= self.sample_rate_hz <= 192_000, "sample_rate_hz", "must be 8000..192000")
        need(0 < self.window_ms <= 100, "window_ms", "must be in (0, 100]")
        need(0 < self.hop_ms <= self.window_ms, "hop_ms", "must be in (0, window_ms]")
        for name in ("window_ms", "hop_ms"):
            exact = getattr(self, name) * self.sample_rate_hz / 1000.0
            need(
                abs(exact - round(exact)) < 1e-6,
                name,
                f"must be a whole number of samples at {self.sample_rate_hz} Hz",
            )
        need(2 <= self.n_mels <= 256, "n_mels", "must be 2..256")
        nyquist = self.sample_rate_hz / 2
        need(0 <= self.fmin_hz < self.fmax_hz, "fmin_hz", "must be >= 0 and below fmax_hz")
        need(self.fmax_hz <= nyquist, "fmax_hz", f"must be <= {nyquist:g} (Nyquist)")
        need(math.isfinite(self.log_offset) and self.log_offset > 0, "log_offset", "must be > 0")

    @property
    def window(self) -> int:
        return round(self.window_ms * self.sample_rate_hz / 1000.0)

    @property
    def hop(self) -> int:
        return round(self.hop_ms * self.sample_rate_hz / 1000.0)

    @property
    def n_fft(self) -> int:
        return 1 << (self.window - 1).bit_length()

    @property
    def frame_rate_hz(self) -> float:
        return self.sample_rate_hz / self.hop

    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"mel_{i:02d}" for i in range(self.n_mels))

    def frame_end_s(self, frame: int) -> float:
        """Stream time (seconds) at which frame ``frame`` is complete."""
        return (frame * self.hop + self.window) / self.sample_rate_hz

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"type": KIND}
        doc.update({f.name: getattr(self, f.name) for f in fields(self)})
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> LogMelConfig:
        """The inverse of :meth:`to_dict`; ``ValueError`` names an unknown or bad field."""
        if not isinstance(doc, Mapping):
            raise ValueError("must be an object")
        kind = doc.get("type")
        if kind != KIND:
            raise ValueError(f"'type' is {kind!r}; this runtime knows {KIND!r}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(doc) - set(known) - {"type"})
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in doc.items():
            if name == "type":
                continue
            integral = name in ("sample_rate_hz", "n_mels")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"'{name}' must be a number, got {value!r}")
            if integral and value != int(value):
                raise ValueError(f"'{name}' must be a whole number, got {value!r}")
            kwargs[name] = int(value) if integral else float(value)
        return cls(**kwargs)


def mel_filterbank(cfg: LogMelConfig) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Triangular filters on the HTK mel scale, ``[n_fft // 2 + 1, n_mels]``."""

    def to_mel(f: np.ndarray[Any, np.dtype[np.float64]]) -> np.ndarray[Any, np.dtype[np.float64]]:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def to_hz(m: np.ndarray[Any, np.dtype[np.float64]]) -> np.ndarray[Any, np.dtype[np.float64]]:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges_mel = np.linspace(
        to_mel(np.array(cfg.fmin_hz)), to_mel(np.array(cfg.fmax_hz)), cfg.n_mels + 2
    )
    edges = to_hz(edges_mel)
    freqs = np.arange(cfg.n_fft // 2 + 1, dtype=np.float64) * cfg.sample_rate_hz / cfg.n_fft
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lo[None, :]) / (mid - lo)[None, :]
    falling = (hi[None, :] - freqs[:, None]) / (hi - mid)[None, :]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    empty = np.flatnonzero(bank.sum(axis=0) == 0)
    if empty.size:
        raise ValueError(
            f"'n_mels' {cfg.n_mels} is too many for n_fft {cfg.n_fft}: band {int(empty[0])} "
            "covers no FFT bin (lower n_mels or raise fmin_hz)"
        )
    return bank


class LogMel:
    """Frames ``[k, window]`` -> features ``[k, n_mels]`` (float32)."""

    def __init__(self, cfg: LogMelConfig) -> None:
        self.cfg = cfg
        n = cfg.window
        # Periodic Hann: the window that tiles exactly at 50 % overlap.
        self._window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)
        self._bank = mel_filterbank(cfg).astype(np.float32)
        self._offset = np.float32(cfg.log_offset)

    def __call__(self, frames: Samples) -> Features:
        """Row by row, in float32: a frame's features do not depend on its neighbours."""
        if frames.shape[0] == 0:
            return np.empty((0, self.cfg.n_mels), dtype=np.float32)
        spectrum = np.fft.rfft(frames * self._window, n=self.cfg.n_fft, axis=1)
        power = np.square(spectrum.real) + np.square(spectrum.imag)
        mel: Features = power @ self._bank
        mel += self._offset
        return np.log(mel, out=mel)


def logmel(signal: Samples, cfg: LogMelConfig) -> Features:
    """Features of a whole signal at once (training, offline evaluation)."""
    return LogMel(cfg)(frame_signal(signal, cfg.window, cfg.hop))


class StreamingLogMel:
    """Features of a stream arriving in blocks; carries leftover samples between blocks.

    ``frames_out`` is the index of the next frame, i.e. the stream position in frames
    since the last :meth:`reset` (call it after samples were lost: a frame spanning a
    gap would describe a sound that never happened).
    """

    def __init__(self, cfg: LogMelConfig) -> None:
        self.cfg = cfg
        self._framer = Framer(cfg.window, cfg.hop)
        self._logmel = LogMel(cfg)

    @property
    def frames_out(self) -> int:
        return self._framer.frames_out

    def reset(self) -> None:
        self._framer.reset()

    def push(self, samples: Samples) -> Features:
        return self._logmel(self._framer.push(samples))
