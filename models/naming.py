"""Feature names, units and sample rate for a model's metadata, from the data or the user.

A sensor author reads these with ``seqstream info``: ``dim_0 .. dim_5`` says nothing,
``ax [m/s^2]`` at 10 Hz says what to send. Names come from the CSV header (or the
``.ts`` reader's ``dim_i``) unless ``--feature-names`` gives them; a unit rides in the
name as ``name[unit]`` either way (``temp[C]``, ``ax [m/s^2]``) and is split off, so
the model's features are plain names (what ``--target`` refers to) and the units go to
``extra.units``. When a feature's name differs from the CSV column it was read from,
``extra.columns`` keeps the columns, so ``seqstream eval`` reads the same file again.
The sample rate is the median spacing of the data's time column unless ``--sample-rate``
gives it; audio data carry theirs in the front end.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.commands.info import COLUMNS_KEY, UNITS_KEY
from pipeline.errors import ConfigError, DataError
from pipeline.offline.datasets import Dataset

_UNIT = re.compile(r"^(?P<name>.*?)\s*\[(?P<unit>[^\[\]]*)\]$")


def split_unit(label: str) -> tuple[str, str | None]:
    """``"temp [C]"`` -> ``("temp", "C")``; a label without brackets has no unit."""
    m = _UNIT.match(label.strip())
    if m is None:
        return label.strip(), None
    unit = m.group("unit").strip()
    return m.group("name"), unit or None


def name_features(data: Dataset, given: Sequence[str] = ()) -> tuple[Dataset, dict[str, Any]]:
    """``data`` with plain feature names, and what ``ModelSpec.extra`` should record:
    ``units`` (those found) and ``columns`` (the CSV columns, when the names differ).

    ``given`` (``--feature-names``) replaces the data's names one for one.
    """
    labels = list(given) if given else list(data.features)
    if len(labels) != data.n_features:
        raise ConfigError(
            f"--feature-names: {len(labels)} name(s) for {data.n_features} feature(s) "
            f"{list(data.features)}"
        )
    names: list[str] = []
    units: dict[str, str] = {}
    for label in labels:
        name, unit = split_unit(label)
        if not name:
            raise ConfigError(f"--feature-names: {label!r} has no name before its unit")
        names.append(name)
        if unit is not None:
            units[name] = unit
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"feature names repeat once units are split off: {dupes}")
    extra: dict[str, Any] = {UNITS_KEY: units} if units else {}
    if tuple(names) != tuple(data.features) and data.path.suffix.lower() == ".csv":
        extra[COLUMNS_KEY] = list(data.features)
    return dataclasses.replace(data, features=tuple(names)), extra


def sample_rate(data: Dataset, given: float | None = None) -> float | None:
    """The rate the model was trained at: ``given``, else the audio front end's, else the
    median spacing of the time column; ``None`` when nothing says."""
    implied = data.spec_fields().get("sample_rate_hz")
    if given is not None:
        if given <= 0:
            raise ConfigError("--sample-rate: must be > 0")
        if implied is not None and abs(float(implied) - given) > 1e-9:
            raise ConfigError(f"--sample-rate: {given:g} Hz, but the audio is {implied} Hz")
        return float(given)
    if implied is not None:
        return float(implied)
    if not data.timestamps:
        return None
    gaps = np.concatenate([np.diff(t) for t in data.timestamps if len(t) > 1] or [np.zeros(0)])
    gaps = gaps[gaps > 0]
    if gaps.size == 0:
        raise DataError(f"{data.path}: the time column never advances; give --sample-rate")
    return float(f"{1.0 / float(np.median(gaps)):.6g}")
