"""WAV folders as a training data set, and the synthetic keyword data that fills them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.features.logmel import LogMelConfig, logmel
from pipeline.features.wav import read_wav, write_wav
from pipeline.keywords.generate import (
    CLASSES,
    GenerateConfig,
    generate,
    make_recording,
)
from pipeline.offline import datasets
from pipeline.offline.wavfolders import write_frontend


def _tone(freq: float, seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _folders(root: Path, rate: int = 16_000) -> Path:
    for label, freq in (("high", 3_000.0), ("low", 300.0)):
        for i in range(3):
            write_wav(root / label / f"{i}.wav", _tone(freq, 0.2 + 0.1 * i, rate), rate)
    return root


def test_a_directory_of_class_folders_is_a_labelled_dataset(tmp_path: Path) -> None:
    root = _folders(tmp_path / "d")
    (root / "notes.txt").write_text("ignored")
    (root / "empty").mkdir()
    data = datasets.load(root)
    cfg = LogMelConfig()
    assert data.classes == ("high", "low")
    assert data.labels == ("high",) * 3 + ("low",) * 3
    assert data.case_ids == tuple(f"{c}/{i}.wav" for c in ("high", "low") for i in range(3))
    assert data.features == cfg.feature_names()
    for case, cid in zip(data.cases, data.case_ids or (), strict=True):
        samples, _ = read_wav(root / cid)
        np.testing.assert_array_equal(case, logmel(samples, cfg))
    assert data.spec_fields() == {"frontend": cfg.to_dict(), "sample_rate_hz": 16_000}
    # the hash follows the audio and the front end
    again = datasets.load(root)
    assert again.sha256 == data.sha256
    write_frontend(root, LogMelConfig(n_mels=20))
    changed = datasets.load(root)
    assert changed.sha256 != data.sha256 and changed.cases[0].shape[1] == 20


def test_wav_folder_errors_name_the_file(tmp_path: Path) -> None:
    root = _folders(tmp_path / "d")
    with pytest.raises(DataError, match="apply to CSV files only, not a WAV directory"):
        datasets.load(root, label_column="x")
    write_wav(root / "low" / "8k.wav", _tone(300.0, 0.2, 8_000), 8_000)
    with pytest.raises(DataError, match=r"8k\.wav: sample rate 8000 Hz"):
        datasets.load(root)
    one = tmp_path / "one"
    write_wav(one / "only" / "a.wav", _tone(300.0, 0.2), 16_000)
    with pytest.raises(DataError, match="at least two"):
        datasets.load(one)
    short = _folders(tmp_path / "s")
    write_wav(short / "low" / "tiny.wav", _tone(300.0, 0.01), 16_000)
    with pytest.raises(DataError, match=r"tiny\.wav: shorter than one 25 ms frame"):
        datasets.load(short)
    bad = _folders(tmp_path / "b")
    (bad / "frontend.json").write_text(json.dumps({"type": "logmel", "n_mels": 0}))
    with pytest.raises(DataError, match=r"frontend\.json: 'n_mels'"):
        datasets.load(bad)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.wav")):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_generated_keyword_data_is_a_function_of_the_seed(tmp_path: Path) -> None:
    def make(out: Path, seed: int) -> Path:
        cfg = GenerateConfig(out=out, seed=seed, train_per_class=2, test_per_class=1, preceded=0.5)
        generate(cfg)
        return out

    a, b, c = make(tmp_path / "a", 5), make(tmp_path / "b", 5), make(tmp_path / "c", 6)
    assert _digest(a) == _digest(b) != _digest(c)
    train = datasets.load(a / "train")
    assert sorted(train.classes) == sorted(CLASSES)
    assert train.n_cases == 2 * (len(CLASSES) + 1)  # twice as many "unknown" clips
    manifest = json.loads((a / "manifest.json").read_text())
    voices = {f["voice"].split("+")[1] for f in manifest["files"]["test"].values() if "voice" in f}
    assert voices <= set(manifest["variants"]["test"])
    assert not set(manifest["variants"]["test"]) & set(manifest["variants"]["train"])
    for rel, info in manifest["files"]["train"].items():
        samples, rate = read_wav(a / "train" / rel)
        assert rate == 16_000 and 0 < np.abs(samples).max() < 1
        if info["class"] != "silence":  # a word ends shortly before the clip does
            assert 0.05 <= len(samples) / rate - info["word_end_s"] <= 0.3 + 1e-3
        if "preceded_by" in info:  # an earlier word, a pause, then the clip's own word
            assert info["word_start_s"] >= 0.3 + 0.1
    # Half of the word clips start with an earlier word (``preceded=0.5``), the rest do not.
    assert 0 < sum("preceded_by" in f for f in manifest["files"]["train"].values()) < 20


def test_recording_puts_words_where_it_says() -> None:
    signal, spoken = make_recording(["yes", "no", "stop"], "en-us+f4", seed=1, snr_db=30)
    assert [w.word for w in spoken] == ["yes", "no", "stop"]
    frames = np.sqrt(np.mean(signal[: len(signal) // 160 * 160].reshape(-1, 160) ** 2, axis=1))
    t = (np.arange(len(frames)) + 0.5) * 0.01
    inside = np.zeros(len(frames), bool)
    for w in spoken:
        inside |= (t >= w.start_s) & (t <= w.end_s)
        assert 1.0 <= w.start_s < w.end_s < len(signal) / 16_000
    # the pauses are ~30 dB quieter than the words
    assert np.median(frames[inside]) > 10 * np.median(frames[~inside])
