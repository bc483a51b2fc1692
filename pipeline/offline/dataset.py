"""One data set in memory, whatever file format it came from.

Its own module, below the readers (:mod:`pipeline.offline.datasets` for ``.ts`` and CSV,
:mod:`pipeline.offline.wavfolders` for WAV folders), so that each reader builds it without
importing another reader.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError


@dataclass(frozen=True)
class Dataset:
    """Cases of one data file, in raw units, in file order.

    ``cases[i]`` is float32 ``[T_i, F]``. ``labels`` holds one class label per case
    (``None`` without labels, or when a CSV label column varies inside a case);
    ``row_labels`` keeps a CSV label column per row (anomaly flags such as mitdb's
    ``label``). ``classes`` is the declared order (``@classLabel``) or, for CSV, the
    sorted distinct labels (numerically when all are numbers). ``timestamps[i]`` is
    float64 seconds since the epoch (UTC) per row of case ``i``.
    """

    name: str
    path: Path
    cases: tuple[np.ndarray, ...]
    features: tuple[str, ...]
    classes: tuple[str, ...] = ()
    labels: tuple[str, ...] | None = None
    row_labels: tuple[np.ndarray, ...] | None = None
    timestamps: tuple[np.ndarray, ...] | None = None
    case_ids: tuple[str, ...] | None = None
    sha256: str = ""
    # The audio front end (pipeline.features.logmel.LogMelConfig.to_dict()) that turned
    # WAV files into these cases; None for sensor data.
    frontend: Mapping[str, Any] | None = None

    def spec_fields(self) -> dict[str, Any]:
        """ModelSpec fields the data implies: an audio front end and its sample rate."""
        if self.frontend is None:
            return {}
        return {"frontend": dict(self.frontend), "sample_rate_hz": self.frontend["sample_rate_hz"]}

    @property
    def n_cases(self) -> int:
        return len(self.cases)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(int(c.shape[0]) for c in self.cases)

    def case_name(self, i: int) -> str:
        """How messages and reports name case ``i`` (its id, else its index)."""
        return self.case_ids[i] if self.case_ids is not None else str(i)

    def label_indices(self, classes: Sequence[str] | None = None) -> np.ndarray:
        """Case labels as int64 indices into ``classes`` (default: the data's own)."""
        order = tuple(classes) if classes is not None else self.classes
        if self.labels is None:
            if self.row_labels is not None:
                raise DataError(
                    f"{self.path}: the label column varies within a case; a per-case label "
                    "needs one value per case (group rows into cases with --case-column)"
                )
            raise DataError(f"{self.path}: the data has no class labels")
        index = {c: i for i, c in enumerate(order)}
        unknown = sorted({lb for lb in self.labels if lb not in index})
        if unknown:
            raise DataError(
                f"{self.path}: label(s) {', '.join(map(repr, unknown))} are not among the "
                f"classes {list(order)}"
            )
        return np.array([index[lb] for lb in self.labels], dtype=np.int64)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
