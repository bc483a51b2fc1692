"""The audio front end: streaming features equal whole-signal features, whatever the blocks."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.contract import ModelSpec, Normalisation, recurrent_state
from pipeline.errors import ContractError
from pipeline.features.framing import Framer, frame_signal, n_frames
from pipeline.features.logmel import LogMelConfig, StreamingLogMel, logmel, mel_filterbank

# Features are float32 logs; the same frame gives the same row up to BLAS rounding of
# the mel projection when it is computed in a batch of another height.
ATOL = 2e-5

CONFIGS = [
    LogMelConfig(),
    LogMelConfig(sample_rate_hz=8_000, window_ms=32.0, hop_ms=16.0, n_mels=20, fmax_hz=3_800),
    LogMelConfig(window_ms=20.0, hop_ms=5.0, n_mels=64, fmin_hz=60.0, fmax_hz=8_000),
    LogMelConfig(window_ms=25.0, hop_ms=25.0, n_mels=13),  # no overlap
]


def _signal(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16_000
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4_000) * t)
    return (tone + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _split(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """``x`` cut into blocks of the given sizes, cycled; empty blocks included."""
    blocks, at, i = [], 0, 0
    while at < x.shape[0]:
        size = sizes[i % len(sizes)]
        blocks.append(x[at : at + size])
        at += size
        i += 1
    return blocks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cfg=st.sampled_from(CONFIGS),
    n=st.integers(0, 6_000),
    sizes=st.lists(st.integers(0, 2_500), min_size=1, max_size=8).filter(any),
    seed=st.integers(0, 2**16),
)
def test_blocks_of_any_size_give_the_whole_signal_features(
    cfg: LogMelConfig, n: int, sizes: list[int], seed: int
) -> None:
    x = _signal(seed, n)
    whole = logmel(x, cfg)
    extractor = StreamingLogMel(cfg)
    parts = [extractor.push(b) for b in _split(x, sizes)]
    streamed = np.concatenate([np.empty((0, cfg.n_mels), np.float32), *parts])
    assert whole.shape == (n_frames(n, cfg.window, cfg.hop), cfg.n_mels)
    assert streamed.shape == whole.shape
    assert streamed.dtype == np.float32
    np.testing.assert_allclose(streamed, whole, atol=ATOL, rtol=0)
    assert extractor.frames_out == whole.shape[0]


@settings(max_examples=60, deadline=None)
@given(
    window=st.integers(1, 64),
    hop_frac=st.floats(0.01, 1.0),
    n=st.integers(0, 500),
    sizes=st.lists(st.integers(1, 97), min_size=1, max_size=5),
)
def test_framer_is_exact_for_any_blocks(
    window: int, hop_frac: float, n: int, sizes: list[int]
) -> None:
    hop = max(1, round(window * hop_frac))
    x = np.arange(n, dtype=np.float32)
    framer = Framer(window, hop)
    got = [np.array(framer.push(b)) for b in _split(x, sizes)]
    streamed = np.concatenate([np.empty((0, window), np.float32), *got])
    np.testing.assert_array_equal(streamed, frame_signal(x, window, hop))
    assert framer.buffered < window + hop


def test_reset_starts_a_new_stream() -> None:
    cfg = LogMelConfig()
    x = _signal(1, 4_000)
    extractor = StreamingLogMel(cfg)
    extractor.push(_signal(2, 1_234))
    extractor.reset()
    assert extractor.frames_out == 0
    np.testing.assert_allclose(extractor.push(x), logmel(x, cfg), atol=ATOL, rtol=0)


def test_a_tone_lights_up_its_own_mel_band() -> None:
    cfg = LogMelConfig()
    t = np.arange(16_000) / cfg.sample_rate_hz
    feats = logmel((0.5 * np.sin(2 * np.pi * 1_000.0 * t)).astype(np.float32), cfg)
    bank = mel_filterbank(cfg)
    bin_1k = round(1_000.0 * cfg.n_fft / cfg.sample_rate_hz)
    expected = int(np.argmax(bank[bin_1k]))
    assert abs(int(np.median(np.argmax(feats, axis=1))) - expected) <= 1
    # Digital silence is the log offset, exactly.
    silent = logmel(np.zeros(1_600, np.float32), cfg)
    np.testing.assert_allclose(silent, np.log(np.float32(cfg.log_offset)), rtol=1e-6)


def test_filterbank_covers_every_band_and_refuses_empty_ones() -> None:
    bank = mel_filterbank(LogMelConfig())
    assert bank.shape == (257, 40)
    assert (bank.sum(axis=0) > 0).all() and bank.min() >= 0 and bank.max() <= 1
    with pytest.raises(ValueError, match="covers no FFT bin"):
        mel_filterbank(LogMelConfig(n_mels=200, fmin_hz=0.0))


def test_config_round_trip_and_errors_name_the_field() -> None:
    cfg = LogMelConfig(window_ms=30.0, hop_ms=10.0, n_mels=32)
    assert LogMelConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.window, cfg.hop, cfg.n_fft) == (480, 160, 512)
    bad: list[tuple[dict[str, Any], str]] = [
        ({**cfg.to_dict(), "type": "mfcc"}, "'type'"),
        ({**cfg.to_dict(), "dither": 1.0}, "dither"),
        ({**cfg.to_dict(), "n_mels": 32.5}, "'n_mels'"),
        ({**cfg.to_dict(), "hop_ms": "10"}, "'hop_ms'"),
        ({**cfg.to_dict(), "window_ms": 25.03}, "'window_ms'"),
        ({**cfg.to_dict(), "fmax_hz": 9_000.0}, "'fmax_hz'"),
        ({**cfg.to_dict(), "log_offset": 0.0}, "'log_offset'"),
    ]
    for doc, field in bad:
        with pytest.raises(ValueError, match=field):
            LogMelConfig.from_dict(doc)


def _audio_spec(**changes: Any) -> ModelSpec:
    cfg = LogMelConfig(n_mels=4, fmax_hz=4_000.0)
    base = ModelSpec(
        name="kws",
        version="1",
        task="classify",
        cell="gru",
        layers=1,
        hidden=8,
        features=cfg.feature_names(),
        normalisation=Normalisation((0.0,) * 4, (1.0,) * 4),
        state=recurrent_state("gru", 1, 8),
        outputs=("probs",),
        labels=("yes", "silence"),
        sample_rate_hz=16_000,
        frontend=cfg.to_dict(),
    )
    return replace(base, **changes)


def test_model_metadata_carries_the_front_end() -> None:
    spec = _audio_spec()
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    assert LogMelConfig.from_dict(again.frontend or {}) == LogMelConfig(n_mels=4, fmax_hz=4_000.0)
    with pytest.raises(ContractError, match="'frontend'.*'n_mels'"):
        _audio_spec(frontend={**(spec.frontend or {}), "n_mels": -1})
    with pytest.raises(ContractError, match="'sample_rate_hz'"):
        _audio_spec(sample_rate_hz=8_000)
    with pytest.raises(ContractError, match="'features'"):
        _audio_spec(features=("a", "b", "c"), normalisation=Normalisation((0.0,) * 3, (1.0,) * 3))
