"""Keyword detection, the audio ring buffer and the WAV source, on real objects."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.daemon import config
from pipeline.errors import ConfigError, DataError
from pipeline.features.wav import read_wav, write_wav
from pipeline.keywords.detector import Detector, DetectorSettings
from pipeline.sources.audio import AudioBlock, BlockRing
from pipeline.sources.wavfile import WavFileSource

LABELS = ("yes", "no", "silence", "unknown")
RATE = 100.0  # frames per second


def _posteriors(n: int, bumps: list[tuple[int, int, int, float]]) -> np.ndarray:
    """Mostly silence; ``(label, start, length, p)`` bumps of one class."""
    p = np.zeros((n, len(LABELS)), np.float32)
    p[:, 2] = 1.0
    for label, start, length, value in bumps:
        p[start : start + length] = (1 - value) / (len(LABELS) - 1)
        p[start : start + length, label] = value
    return p


def _run(det: Detector, probs: np.ndarray, sizes: list[int]) -> list[tuple[int, str]]:
    out, at, i = [], 0, 0
    while at < probs.shape[0]:
        size = sizes[i % len(sizes)]
        for d in det.update(probs[at : at + size], at):
            out.append((d.frame, LABELS[d.label]))
        at += size
        i += 1
    return out


def test_one_word_one_event_at_the_smoothed_crossing() -> None:
    cfg = DetectorSettings(threshold=0.6, smooth_ms=50, refractory_ms=500)
    det = Detector(LABELS, cfg, RATE)
    probs = _posteriors(300, [(0, 100, 30, 0.95)])
    events = _run(det, probs, [300])
    # 5-frame moving average: reaches 0.6 once 4 of the last 5 frames say "yes".
    assert events == [(103, "yes")]


def test_refractory_period_and_rearm() -> None:
    cfg = DetectorSettings(threshold=0.6, smooth_ms=10, refractory_ms=500)
    # "no" right after "yes" (inside the refractory period) is suppressed; later it fires.
    probs = _posteriors(400, [(0, 50, 10, 0.9), (1, 80, 10, 0.9), (1, 200, 10, 0.9)])
    assert _run(Detector(LABELS, cfg, RATE), probs, [400]) == [(50, "yes"), (200, "no")]
    # A keyword that stays above the threshold fires once, not once per refractory period.
    long = _posteriors(400, [(0, 10, 300, 0.9)])
    assert _run(Detector(LABELS, cfg, RATE), long, [400]) == [(10, "yes")]


def test_background_labels_never_fire() -> None:
    cfg = DetectorSettings(threshold=0.5, smooth_ms=0)
    probs = _posteriors(200, [(3, 20, 50, 0.99)])
    assert _run(Detector(LABELS, cfg, RATE), probs, [7]) == []


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    smooth=st.sampled_from([0.0, 30.0, 100.0, 250.0]),
)
def test_events_do_not_depend_on_how_frames_are_grouped(
    sizes: list[int], seed: int, smooth: float
) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((600, len(LABELS))) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    cfg = DetectorSettings(threshold=0.55, smooth_ms=smooth, refractory_ms=200)
    whole = _run(Detector(LABELS, cfg, RATE), probs.astype(np.float32), [600])
    split = _run(Detector(LABELS, cfg, RATE), probs.astype(np.float32), sizes)
    assert split == whole


def test_reset_forgets_the_window() -> None:
    cfg = DetectorSettings(threshold=0.6, smooth_ms=100, refractory_ms=0)
    det = Detector(LABELS, cfg, RATE)
    det.update(_posteriors(9, [(0, 0, 9, 1.0)]), 0)  # 9 of 10 frames: not yet
    det.reset()
    assert det.update(_posteriors(5, [(0, 0, 5, 1.0)]), 9)[0].frame == 9  # a fresh window


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        DetectorSettings(threshold=0.0)
    with pytest.raises(ConfigError, match="smooth_ms"):
        DetectorSettings(smooth_ms=-1)
    with pytest.raises(ConfigError, match="background"):
        Detector(LABELS, DetectorSettings(background=("noise",)), RATE)


# -- the ring between a capture thread and the keyword pipeline -----------------------


def _block(start: int, n: int, lost: int = 0) -> AudioBlock:
    return AudioBlock(np.full(n, start, np.float32), start, lost, 0.0, 0.0)


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.one_of(st.integers(1, 300), st.just(0)), max_size=60))
def test_ring_drops_oldest_and_every_gap_is_accounted(ops: list[int]) -> None:
    """Whatever is dropped, each block's ``start`` == previous end + its ``lost``."""
    ring = BlockRing(capacity=500)
    pos = 0
    popped: list[AudioBlock] = []
    for n in ops:
        if n:
            ring.push(_block(pos, n))
            pos += n
            assert ring.held <= 500
        else:
            b = ring.pop(0.0)
            if b is not None:
                popped.append(b)
    while (b := ring.pop(0.0)) is not None:
        popped.append(b)
    end = 0
    for b in popped:
        assert b.start == end + b.lost
        end = b.end
    delivered = sum(b.samples.shape[0] for b in popped)
    assert delivered + sum(b.lost for b in popped) == end
    assert ring.dropped == 0 or any(b.lost for b in popped) or end < pos


# -- the WAV file source -----------------------------------------------------------------


def test_wav_round_trip_is_exact(tmp_path: Path) -> None:
    pcm = np.arange(-32768, 32768, 7, dtype=np.int16)
    x = pcm.astype(np.float32) / 32768
    path = write_wav(tmp_path / "a.wav", x, 16_000)
    y, rate = read_wav(path)
    assert rate == 16_000
    np.testing.assert_array_equal(y, x)
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(DataError, match="bad.wav"):
        read_wav(tmp_path / "bad.wav")


def test_wav_source_blocks_cover_the_file_and_pace_in_real_time(tmp_path: Path) -> None:
    x = np.sin(np.arange(4_800) / 5.0).astype(np.float32) * 0.5
    path = write_wav(tmp_path / "s.wav", x, 16_000)
    with pytest.raises(ConfigError, match="needs 8000 Hz"):
        WavFileSource.open("s", path, sample_rate=8_000)
    for realtime in (False, True):
        src = WavFileSource.open("s", path, block_size=1_000, realtime=realtime)
        started = time.monotonic()
        src.start()
        blocks = []
        while not src.exhausted:
            b = src.read(1.0)
            if b is not None:
                blocks.append(b)
        took = time.monotonic() - started
        assert [b.start for b in blocks] == [0, 1_000, 2_000, 3_000, 4_000]
        assert all(b.lost == 0 for b in blocks)
        np.testing.assert_allclose(np.concatenate([b.samples for b in blocks]), x, atol=1 / 32768)
        if realtime:
            assert took >= 0.29  # 4800 samples at 16 kHz
            ends = np.array([b.wall_end for b in blocks])
            np.testing.assert_allclose(np.diff(ends), [1 / 16] * 3 + [0.05], atol=1e-6)


# -- the [audio] section of the daemon's configuration -----------------------------------


def _parse(audio: dict[str, object], tmp_path: Path) -> config.Settings:
    doc = {"model": {"path": "m.onnx"}, "audio": audio}
    return config.parse(doc, base=tmp_path, source=tmp_path / "t.toml")


def test_audio_config_is_parsed_with_defaults(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "a.wav", np.zeros(160, np.float32), 16_000)
    s = _parse(
        {
            "model": "kws.onnx",
            "threshold": 0.8,
            "microphone": [{"name": "kitchen", "device": "default", "silence_timeout_s": False}],
            "wavfile": [{"name": "replay", "path": "a.wav", "realtime": False}],
        },
        tmp_path,
    )
    audio = s.audio
    assert audio is not None
    assert audio.model == tmp_path / "kws.onnx"
    assert audio.detector == DetectorSettings(threshold=0.8)
    assert audio.topic == "audio/{stream}/keyword"
    (mic,) = audio.microphones
    assert (mic.name, mic.device, mic.block_size, mic.silence_timeout_s) == (
        "kitchen", "default", 320, None,
    )  # fmt: skip
    assert audio.files[0].path == wav and audio.files[0].realtime is False
    assert _parse_none(tmp_path).audio is None


def _parse_none(tmp_path: Path) -> config.Settings:
    return config.parse({"model": {"path": "m.onnx"}}, base=tmp_path, source=tmp_path / "t.toml")


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        ({"microphone": [{"name": "m"}]}, "audio.model: is required"),
        ({"model": "k.onnx"}, "audio.microphone: configure at least one"),
        ({"model": "k.onnx", "microphone": [{"name": "a/b"}]}, r"audio.microphone\[0\].name"),
        ({"model": "k.onnx", "microphone": [{"name": "m", "block_size": 0}]}, "block_size"),
        ({"model": "k.onnx", "microphone": [{"name": "m", "device": 1.5}]}, "device"),
        ({"model": "k.onnx", "microphone": [{"name": "m", "rate": 1}]}, "rate: unknown key"),
        ({"model": "k.onnx", "microphone": {"name": "m"}, "threshold": 2.0}, "threshold"),
        ({"model": "k.onnx", "microphone": [{"name": "m"}, {"name": "m"}]}, "unique"),
        ({"model": "k.onnx", "microphone": [{"name": "m"}], "topic": "kw"}, "audio.topic"),
        ({"model": "k.onnx", "wavfile": [{"name": "w", "path": "no.wav"}]}, "file not found"),
    ],
)
def test_audio_config_errors_name_the_key(
    tmp_path: Path, audio: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _parse(audio, tmp_path)
