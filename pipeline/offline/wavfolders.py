"""A directory of WAV folders, one folder per class, as a
:class:`~pipeline.offline.dataset.Dataset`.

``DIR/<class>/*.wav`` (16-bit PCM, any channel count, averaged to mono) become cases of
log-mel features ``[T, n_mels]`` labelled ``<class>``, computed with the same
:func:`~pipeline.features.logmel.logmel` the daemon streams with. The front-end
settings come from ``DIR/frontend.json`` when present (written by ``seqstream keywords
generate``), else the defaults; they travel on as ``Dataset.frontend`` into the model's
metadata. Every file must have the front end's sample rate: resampling is not this
reader's job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import DataError
from pipeline.features.logmel import LogMelConfig, logmel
from pipeline.features.wav import read_wav
from pipeline.offline.dataset import Dataset, file_sha256

FRONTEND_FILE = "frontend.json"
SUFFIX = ".wav"


def read_frontend(directory: Path) -> LogMelConfig:
    """The front end a data directory declares (``frontend.json``), else the default."""
    path = directory / FRONTEND_FILE
    if not path.is_file():
        return LogMelConfig()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return LogMelConfig.from_dict(doc)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable front-end settings ({exc})") from None
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None


def write_frontend(directory: Path, cfg: LogMelConfig) -> Path:
    path = directory / FRONTEND_FILE
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return path


def load_wav_folders(path: str | Path) -> Dataset:
    """Read ``DIR/<class>/*.wav`` into log-mel cases; classes in sorted folder order."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    cfg = read_frontend(root)
    folders = sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob(f"*{SUFFIX}")))
    if len(folders) < 2:
        raise DataError(
            f"{root}: expected one folder of {SUFFIX} files per class (at least two), "
            f"found {len(folders)}"
        )
    cases = []
    labels: list[str] = []
    ids: list[str] = []
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for folder in folders:
        for wav in sorted(folder.glob(f"*{SUFFIX}")):
            samples, rate = read_wav(wav)
            if rate != cfg.sample_rate_hz:
                raise DataError(
                    f"{wav}: sample rate {rate} Hz; the front end expects {cfg.sample_rate_hz} Hz"
                )
            feats = logmel(samples, cfg)
            if feats.shape[0] == 0:
                raise DataError(f"{wav}: shorter than one {cfg.window_ms:g} ms frame")
            rel = f"{folder.name}/{wav.name}"
            cases.append(feats)
            labels.append(folder.name)
            ids.append(rel)
            digest.update(f"{rel}:{file_sha256(wav)}\n".encode())
    return Dataset(
        name=root.name,
        path=root,
        cases=tuple(cases),
        features=cfg.feature_names(),
        classes=tuple(f.name for f in folders),
        labels=tuple(labels),
        case_ids=tuple(ids),
        sha256=digest.hexdigest(),
        frontend=cfg.to_dict(),
    )
