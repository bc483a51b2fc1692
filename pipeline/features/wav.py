"""16-bit PCM WAV files in and out, with the standard library's :mod:`wave`.

Samples are float32 in [-1, 1] (PCM / 32768) everywhere in seqstream; several
channels are averaged to mono, as the microphone source does.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.features.framing import Samples

PCM_SCALE = 32768.0


def to_mono(block: np.ndarray) -> Samples:
    """``[n]`` or ``[n, channels]`` samples (float or int16) -> float32 mono in [-1, 1]."""
    x = np.asarray(block)
    scale = PCM_SCALE if x.dtype == np.int16 else 1.0
    if x.ndim == 2:
        x = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float64)
    out: Samples = np.asarray(x, dtype=np.float32)
    if scale != 1.0:
        out = out / np.float32(scale)
    return out


def read_wav(path: str | Path) -> tuple[Samples, int]:
    """Mono float32 samples and the sample rate of a 16-bit PCM WAV file."""
    p = Path(path)
    try:
        with wave.open(str(p), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except FileNotFoundError:
        raise DataError(f"{p}: WAV file not found") from None
    except (wave.Error, EOFError, OSError) as exc:
        raise DataError(f"{p}: not a readable PCM WAV file ({exc})") from None
    if width != 2:
        raise DataError(f"{p}: {8 * width}-bit samples; seqstream reads 16-bit PCM WAV")
    pcm = np.frombuffer(raw, dtype="<i2")
    pcm = pcm[: pcm.shape[0] // channels * channels].reshape(-1, channels)
    return to_mono(pcm), rate


def pcm16(samples: Samples) -> bytes:
    """Float samples -> little-endian 16-bit PCM bytes (clipped)."""
    x = np.clip(np.round(np.asarray(samples, dtype=np.float64) * PCM_SCALE), -32768, 32767)
    return x.astype("<i2").tobytes()


def write_wav(path: str | Path, samples: Samples, rate: int) -> Path:
    """Write mono 16-bit PCM (written to a temporary name, then renamed)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(pcm16(samples))
    tmp.replace(p)
    return p
