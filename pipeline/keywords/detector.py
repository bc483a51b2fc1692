"""Keyword detection from a stream of class posteriors: smooth, threshold, refractory.

The keyword model outputs class probabilities at every feature frame (10 ms). A
:class:`Detector` per stream turns them into a few events:

1. *smoothing*: the moving average of the last ``smooth_ms`` of posteriors, which
   removes single-frame spikes;
2. *threshold*: a keyword fires when its smoothed score reaches ``threshold``;
   background labels (``silence``, ``unknown``) never fire;
3. *refractory period*: after an event, nothing fires for ``refractory_ms``, and a
   keyword must fall below the threshold before it can fire again (one word, one event).

The detector carries its smoothing window across calls, so results do not depend on
how frames were grouped into calls; :meth:`Detector.reset` forgets it when the
stream's model state is reset (a gap in the audio).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

Probs = np.ndarray[Any, np.dtype[np.float32]]

DEFAULT_BACKGROUND: tuple[str, ...] = ("silence", "unknown")


@dataclass(frozen=True)
class DetectorSettings:
    """How posteriors become events; parsed once from ``[audio]``."""

    threshold: float = 0.7
    smooth_ms: float = 100.0
    refractory_ms: float = 1_000.0
    background: tuple[str, ...] = DEFAULT_BACKGROUND

    def __post_init__(self) -> None:
        # The one check of these values; the TOML reader prefixes its table ("audio.").
        if not (0.01 <= self.threshold <= 1.0):
            raise ConfigError(f"threshold: must be 0.01..1.0, got {self.threshold}")
        if not (math.isfinite(self.smooth_ms) and 0 <= self.smooth_ms <= 10_000):
            raise ConfigError(f"smooth_ms: must be 0.0..10000.0, got {self.smooth_ms}")
        if not (math.isfinite(self.refractory_ms) and 0 <= self.refractory_ms <= 60_000):
            raise ConfigError(f"refractory_ms: must be 0.0..60000.0, got {self.refractory_ms}")


@dataclass(frozen=True, slots=True)
class Detection:
    """A keyword fired at ``frame`` (stream frame index) with smoothed ``score``."""

    frame: int
    label: int
    score: float


class Detector:
    """One stream's detection state; ``update`` with each new block of posteriors."""

    def __init__(
        self, labels: Sequence[str], settings: DetectorSettings, frame_rate_hz: float
    ) -> None:
        unknown = [b for b in settings.background if b not in labels]
        if unknown:
            raise ConfigError(
                f"audio.background: {unknown} are not labels of the model ({list(labels)})"
            )
        keywords = [i for i, lb in enumerate(labels) if lb not in settings.background]
        if not keywords:
            raise ConfigError("audio.background: every label of the model is background")
        self.labels = tuple(labels)
        self.settings = settings
        self.window = max(1, round(settings.smooth_ms * frame_rate_hz / 1000.0))
        self.refractory = round(settings.refractory_ms * frame_rate_hz / 1000.0)
        self._keywords = np.array(keywords, dtype=np.intp)
        self._threshold = settings.threshold
        self.reset()

    def reset(self) -> None:
        """Forget the smoothing window, the refractory period and the re-arm flags."""
        n = len(self.labels)
        self._history = np.zeros((0, n), dtype=np.float64)  # last window-1 frames
        self._quiet_until = -1  # first frame allowed to fire
        self._armed = np.ones(len(self._keywords), dtype=bool)

    def update(self, probs: Probs, first_frame: int) -> list[Detection]:
        """Detections among frames ``first_frame ..`` of ``probs`` ``[T, C]``."""
        t = probs.shape[0]
        if t == 0:
            return []
        w = self.window
        rows = np.concatenate((self._history, np.asarray(probs, dtype=np.float64)))
        csum = np.cumsum(np.vstack((np.zeros((1, rows.shape[1])), rows)), axis=0)
        h = self._history.shape[0]
        ends = np.arange(h + 1, h + t + 1)
        starts = np.maximum(0, ends - w)
        smooth = (csum[ends] - csum[starts]) / (ends - starts)[:, None]
        self._history = rows[-(w - 1) :] if w > 1 else rows[:0]
        scores = smooth[:, self._keywords]
        above = scores >= self._threshold
        out: list[Detection] = []
        if not above.any():
            self._armed[:] = True
            return out
        for k in range(t):
            row = above[k]
            if not row.any():
                self._armed[:] = True
                continue
            self._armed |= ~row
            frame = first_frame + k
            if frame < self._quiet_until:
                continue
            candidates = np.flatnonzero(row & self._armed)
            if candidates.size == 0:
                continue
            best = int(candidates[np.argmax(scores[k, candidates])])
            out.append(Detection(frame, int(self._keywords[best]), float(scores[k, best])))
            self._armed[best] = False
            self._quiet_until = frame + self.refractory
        return out
