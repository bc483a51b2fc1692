"""Synthetic keyword-spotting data from espeak-ng: the training set and test recordings.

There is no internet on the edge box or in CI, so the Speech Commands words are spoken
by Debian's ``espeak-ng`` in many voices (accent x voice variant), speeds and pitches,
stretched by resampling (+-10 %: vocal tract length and tempo), resampled to 16 kHz and
mixed with white, pink or brown noise at a random SNR and time shift. Every clip's
randomness comes from ``numpy.random.default_rng([seed, split, class, index])``, so a
data set is a pure function of its seed (and of espeak-ng's version), whatever the
number of worker threads.

Clips are laid out for a *streaming* classifier that carries its state across words:

* a keyword or unknown word ends 50-300 ms before the clip ends (the model learns to
  announce a word right after it ends);
* ``silence`` is noise alone, or a word followed by 0.7-1.2 s of noise (the model
  learns to let a word go once it is over, so detections do not linger);
* optionally (``preceded``, off by default) a share of the keyword and unknown clips
  start with another word in the same voice and a pause: live, the model's state comes
  from the words before, never from a fresh start. Measured so far it did not pay for
  its cost (docs/keywords/README.md).

The test split uses voice variants that training never hears (every sixth variant).
Training has twice as many ``unknown`` clips as keyword clips, spread over 35 other
words (near misses of the keywords included), which keeps false alarms down.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError, DependencyError
from pipeline.features.framing import Samples
from pipeline.features.logmel import LogMelConfig
from pipeline.features.wav import PCM_SCALE, write_wav
from pipeline.offline.wavfolders import write_frontend

log = logging.getLogger(__name__)

KEYWORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "unknown"
SILENCE = "silence"
CLASSES: tuple[str, ...] = (*KEYWORDS, UNKNOWN, SILENCE)
# Speech Commands' auxiliary words, plus near misses of the keywords.
UNKNOWN_WORDS: tuple[str, ...] = (
    "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "learn", "follow", "forward", "backward", "visual", "yet", "know", "cup", "town",
    "light", "bright", "own", "often", "stock", "goat",
)  # fmt: skip
ACCENTS: tuple[str, ...] = (
    "en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
    "en-gb-x-gbcwmd", "en-us-nyc",
)  # fmt: skip
# espeak-ng's voice variants (``+name``), minus whispers (no voicing) and "fast"; every
# sixth in this order never speaks in training: the test split's unseen voices.
VARIANTS: tuple[str, ...] = (
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Demonic", "Denis", "Diogo",
    "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike",
    "Nguyen", "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm", "Tweaky", "UniRobot",
    "adam", "anika", "anikaRobot", "announcer", "antonio", "aunty", "belinda", "benjamin",
    "boris", "caleb", "croak", "david", "ed", "edward", "edward2", "f1", "f2", "f3", "f4", "f5",
    "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4", "john", "kaukovalta",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "linda", "m1", "m2", "m3", "m4",
    "m5", "m6", "m7", "m8", "marcelo", "max", "michel", "miguel", "norbert", "pablo", "paul",
    "pedro", "quincy", "rob", "robert", "robosoft", "robosoft2", "robosoft3", "robosoft4",
    "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro", "shelby", "steph", "steph2",
    "steph3", "travis", "victor", "zac",
)  # fmt: skip
TEST_VARIANTS: tuple[str, ...] = VARIANTS[3::6]
TRAIN_VARIANTS: tuple[str, ...] = tuple(v for v in VARIANTS if v not in TEST_VARIANTS)
SPLITS: dict[str, int] = {"train": 0, "test": 1}
ESPEAK_RATE = 22_050
NOISES: tuple[str, ...] = ("white", "pink", "brown")


@dataclass(frozen=True)
class GenerateConfig:
    """What ``seqstream keywords generate`` makes; recorded in ``manifest.json``."""

    out: Path
    seed: int = 0
    train_per_class: int = 200
    test_per_class: int = 30
    unknown_factor: int = 2  # training clips of "unknown" per keyword clip: fewer false alarms
    snr_db: tuple[float, float] = (5.0, 30.0)
    speeds_wpm: tuple[int, int] = (120, 210)
    pitches: tuple[int, int] = (20, 80)
    stretch: tuple[float, float] = (0.9, 1.1)  # resampling factor: vocal tract length, tempo
    # Fraction of word clips that another word (same voice) and a pause precede: a
    # streaming model carries its state from word to word, so it must learn to let the
    # last word go and judge the next one afresh.
    preceded: float = 0.0
    gap_s: tuple[float, float] = (0.3, 1.2)  # pause after that earlier word
    workers: int = 4
    frontend: LogMelConfig = field(default_factory=LogMelConfig)

    def __post_init__(self) -> None:
        if self.train_per_class < 2 or self.test_per_class < 1:
            raise DataError("--per-class must be >= 2 (train) and >= 1 (test)")
        if self.workers < 1:
            raise DataError("--workers must be >= 1")
        if not self.snr_db[0] <= self.snr_db[1]:
            raise DataError(f"SNR range {self.snr_db} is empty")
        if not 0.0 <= self.preceded <= 1.0:
            raise DataError(f"preceded must be in [0, 1], got {self.preceded}")


@dataclass(frozen=True)
class Utterance:
    """One spoken word: what espeak-ng was asked to say, and how."""

    text: str
    voice: str  # accent+variant, e.g. "en-us+m3"
    speed_wpm: int
    pitch: int


# ---------------------------------------------------------------- synthesis


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise DependencyError(
            "espeak-ng is not installed: apt-get install --no-install-recommends espeak-ng"
        )
    return path


def synthesize(u: Utterance, rate: int, binary: str | None = None) -> Samples:
    """``u`` spoken by espeak-ng, at ``rate`` Hz, leading/trailing silence trimmed."""
    cmd = [binary or espeak_binary(), "--stdout", "-v", u.voice, "-s", str(u.speed_wpm)]
    cmd += ["-p", str(u.pitch), "-a", "100", u.text]
    try:
        # close_fds=False lets Python use posix_spawn (vfork): far cheaper than fork for
        # a big parent process, and espeak-ng inherits nothing but its pipes anyway.
        done = subprocess.run(cmd, capture_output=True, check=True, timeout=30, close_fds=False)
    except subprocess.CalledProcessError as exc:
        raise DataError(
            f"espeak-ng failed for {u}: {exc.stderr.decode(errors='replace')}"
        ) from None
    wav = done.stdout
    at = wav.find(b"data")
    if not wav.startswith(b"RIFF") or at < 0:
        raise DataError(f"espeak-ng wrote no WAV data for {u}")
    pcm = np.frombuffer(wav[at + 8 : at + 8 + (len(wav) - at - 8) // 2 * 2], dtype="<i2")
    x = resample(pcm.astype(np.float64) / PCM_SCALE, ESPEAK_RATE, rate)
    return trim(x.astype(np.float32))


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited resampling by FFT (the clip is short and padded, so wrap-around is moot)."""
    if src == dst or x.size == 0:
        return x
    n = x.shape[0]
    m = max(1, round(n * dst / src))
    spectrum = np.fft.rfft(x)
    keep = m // 2 + 1
    if keep <= spectrum.shape[0]:
        spectrum = spectrum[:keep]
    else:
        spectrum = np.concatenate([spectrum, np.zeros(keep - spectrum.shape[0], complex)])
    out: np.ndarray = np.fft.irfft(spectrum, m) * (m / n)
    return out


def trim(x: Samples, threshold: float = 0.02) -> Samples:
    """Cut leading and trailing near-silence (below ``threshold`` of the peak)."""
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak == 0.0:
        return x
    loud = np.flatnonzero(np.abs(x) >= threshold * peak)
    return x[int(loud[0]) : int(loud[-1]) + 1]


def noise(rng: np.random.Generator, n: int, kind: str) -> Samples:
    """Unit-RMS noise: ``white``, ``pink`` (1/f power) or ``brown`` (1/f^2)."""
    white = rng.standard_normal(n)
    if kind != "white":
        spectrum = np.fft.rfft(white)
        f = np.arange(spectrum.shape[0], dtype=np.float64)
        f[0] = 1.0
        spectrum /= np.sqrt(f) if kind == "pink" else f
        spectrum[0] = 0.0
        white = np.fft.irfft(spectrum, n)
    rms = float(np.sqrt(np.mean(white**2))) or 1.0
    return (white / rms).astype(np.float32)


def rms(x: Samples) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


# ---------------------------------------------------------------- clips


class ClipMaker:
    """Renders clips of one split; ``clip(cls, index)`` is deterministic in (seed, split)."""

    def __init__(self, cfg: GenerateConfig, split: str) -> None:
        self.cfg = cfg
        self.split = split
        self.rate = cfg.frontend.sample_rate_hz
        self.variants = TRAIN_VARIANTS if split == "train" else TEST_VARIANTS
        self.binary = espeak_binary()

    def rng(self, cls: str, index: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, SPLITS[self.split], CLASSES.index(cls), index])

    def utterance(self, rng: np.random.Generator, text: str) -> Utterance:
        cfg = self.cfg
        accent = ACCENTS[int(rng.integers(len(ACCENTS)))]
        variant = self.variants[int(rng.integers(len(self.variants)))]
        return Utterance(
            text=text,
            voice=f"{accent}+{variant}",
            speed_wpm=int(rng.integers(cfg.speeds_wpm[0], cfg.speeds_wpm[1] + 1)),
            pitch=int(rng.integers(cfg.pitches[0], cfg.pitches[1] + 1)),
        )

    def seconds(self, rng: np.random.Generator, lo: float, hi: float) -> int:
        return round(float(rng.uniform(lo, hi)) * self.rate)

    def clip(self, cls: str, index: int) -> tuple[Samples, dict[str, Any]]:
        """One clip of class ``cls`` and what it holds (for the manifest)."""
        rng = self.rng(cls, index)
        info: dict[str, Any] = {"class": cls}
        word_then_noise = cls == SILENCE and rng.random() < 0.5
        if cls == SILENCE and not word_then_noise:
            signal = np.zeros(self.seconds(rng, 0.6, 1.5), dtype=np.float32)
            speech_rms = 0.0
        else:
            if cls in KEYWORDS:
                text = cls
            elif cls == UNKNOWN or rng.random() < 0.2:
                text = UNKNOWN_WORDS[int(rng.integers(len(UNKNOWN_WORDS)))]
            else:
                text = KEYWORDS[int(rng.integers(len(KEYWORDS)))]
            u = self.utterance(rng, text)
            speech = synthesize(u, self.rate, self.binary)
            stretch = float(rng.uniform(*self.cfg.stretch))
            speech = resample(speech, round(self.rate * stretch), self.rate).astype(np.float32)
            info["stretch"] = round(stretch, 3)
            lead = self.seconds(rng, 0.1, 0.5)
            tail = self.seconds(rng, 0.7, 1.2) if word_then_noise else self.seconds(rng, 0.05, 0.3)
            before, before_text = self.earlier_word(rng, u, stretch, word_then_noise)
            if before_text is not None:
                info["preceded_by"] = before_text
            lead += before.shape[0]
            signal = np.zeros(lead + speech.shape[0] + tail, dtype=np.float32)
            signal[: before.shape[0]] = before
            signal[lead : lead + speech.shape[0]] = speech
            speech_rms = rms(speech)
            info.update(asdict(u))
            info["word_start_s"] = lead / self.rate
            info["word_end_s"] = (lead + speech.shape[0]) / self.rate
        kind = NOISES[int(rng.integers(len(NOISES)))]
        if speech_rms > 0:
            snr = float(rng.uniform(*self.cfg.snr_db))
            level = speech_rms / 10 ** (snr / 20)
            info["snr_db"] = round(snr, 2)
        else:
            level = 10 ** float(rng.uniform(-4.0, -1.3))  # -80 .. -26 dBFS
        signal = signal + level * noise(rng, signal.shape[0], kind)
        # Loudness: the clip's peak between -30 and -2 dBFS.
        peak = float(np.abs(signal).max()) or 1.0
        target = 10 ** float(rng.uniform(-1.5, -0.1))
        if speech_rms > 0 or peak > target:
            signal = signal * (target / peak)
        info["noise"] = kind
        return signal.astype(np.float32), info

    def earlier_word(
        self, rng: np.random.Generator, u: Utterance, stretch: float, word_then_noise: bool
    ) -> tuple[Samples, str | None]:
        """Another word in the same voice and a pause, or nothing (see ``preceded``)."""
        if self.cfg.preceded <= 0.0 or word_then_noise or rng.random() >= self.cfg.preceded:
            return np.zeros(0, dtype=np.float32), None
        words = KEYWORDS + UNKNOWN_WORDS
        other = Utterance(words[int(rng.integers(len(words)))], u.voice, u.speed_wpm, u.pitch)
        speech = synthesize(other, self.rate, self.binary)
        speech = resample(speech, round(self.rate * stretch), self.rate).astype(np.float32)
        out = np.zeros(speech.shape[0] + self.seconds(rng, *self.cfg.gap_s), dtype=np.float32)
        out[: speech.shape[0]] = speech * np.float32(rng.uniform(0.5, 2.0))
        return out, other.text


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Write ``OUT/{train,test}/<class>/*.wav`` (+ ``frontend.json``) and ``manifest.json``."""
    out = Path(cfg.out)
    counts = {"train": cfg.train_per_class, "test": cfg.test_per_class}
    manifest: dict[str, Any] = {
        "seed": cfg.seed,
        "classes": list(CLASSES),
        "keywords": list(KEYWORDS),
        "unknown_words": list(UNKNOWN_WORDS),
        "accents": list(ACCENTS),
        "variants": {"train": list(TRAIN_VARIANTS), "test": list(TEST_VARIANTS)},
        "per_class": counts,
        "unknown_factor": cfg.unknown_factor,
        "recipe": {
            k: v for k, v in asdict(cfg).items() if k not in ("out", "seed", "workers", "frontend")
        },
        "sample_rate_hz": cfg.frontend.sample_rate_hz,
        "espeak_ng": _espeak_version(),
        "files": {},
    }
    for split, per_class in counts.items():
        maker = ClipMaker(cfg, split)
        root = out / split
        root.mkdir(parents=True, exist_ok=True)
        write_frontend(root, cfg.frontend)
        factor = {UNKNOWN: cfg.unknown_factor} if split == "train" else {}
        jobs = [(c, i) for c in CLASSES for i in range(per_class * factor.get(c, 1))]

        def render(job: tuple[str, int], maker: ClipMaker = maker, root: Path = root) -> Any:
            cls, i = job
            signal, info = maker.clip(cls, i)
            rel = f"{cls}/{i:05d}.wav"
            write_wav(root / rel, signal, maker.rate)
            return rel, info

        with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
            files = dict(pool.map(render, jobs))
        manifest["files"][split] = files
        log.info("keywords: wrote %d %s clips to %s", len(files), split, root)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return {k: v for k, v in manifest.items() if k != "files"}


def _espeak_version() -> str:
    done = subprocess.run([espeak_binary(), "--version"], capture_output=True, text=True)
    return done.stdout.strip()


# ---------------------------------------------------------------- recordings


@dataclass(frozen=True)
class SpokenWord:
    word: str
    start_s: float
    end_s: float


def make_recording(
    words: Sequence[str],
    voice: str,
    *,
    seed: int = 0,
    rate: int = 16_000,
    lead_s: float = 1.0,
    pause_s: tuple[float, float] = (1.5, 2.5),
    snr_db: float = 20.0,
    speed_wpm: int = 160,
    pitch: int = 50,
    peak: float = 0.5,
) -> tuple[Samples, list[SpokenWord]]:
    """Words spoken one after the other with noisy pauses; where each word lies.

    For end-to-end tests and demos: the times let a test check when each keyword
    should be detected, and that nothing is detected in the pauses.
    """
    rng = np.random.default_rng([seed, 99])
    binary = espeak_binary()
    pieces: list[Samples] = [np.zeros(round(lead_s * rate), dtype=np.float32)]
    spoken: list[SpokenWord] = []
    at = pieces[0].shape[0]
    levels: list[float] = []
    for k, word in enumerate(words):
        speech = synthesize(Utterance(word, voice, speed_wpm, pitch), rate, binary)
        speech = speech * np.float32(peak / (float(np.abs(speech).max()) or 1.0))
        levels.append(rms(speech))
        spoken.append(SpokenWord(word, at / rate, (at + speech.shape[0]) / rate))
        gap = round(float(rng.uniform(*pause_s)) * rate) if k < len(words) - 1 else rate
        pieces += [speech, np.zeros(gap, dtype=np.float32)]
        at += speech.shape[0] + gap
    signal = np.concatenate(pieces)
    level = (float(np.mean(levels)) if levels else 0.01) / 10 ** (snr_db / 20)
    signal = signal + np.float32(level) * noise(rng, signal.shape[0], "pink")
    return np.clip(signal, -1.0, 1.0).astype(np.float32), spoken


def write_recording(path: Path, signal: Samples, spoken: Sequence[SpokenWord], rate: int) -> Path:
    """``path`` (WAV) and ``path`` with ``.json``: the words and their times."""
    write_wav(path, signal, rate)
    doc = {"sample_rate_hz": rate, "words": [asdict(w) for w in spoken]}
    path.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    return path
