"""Data readers shared by training (``models/``) and evaluation (``pipeline/``).

One implementation of the ``.ts`` and CSV readers, in numpy only, so that
``seqstream eval`` needs no torch and a model is scored on exactly the rows it was
trained on. Every problem with a file is a :class:`~pipeline.errors.DataError` that
names the file, the line and what is wrong: the CLI prints it as one line.

Missing values (``?`` in ``.ts``, an empty cell or ``nan`` in CSV) are refused by
default (``missing="error"``): a silently invented reading would corrupt a stream's
carried state. ``missing="ffill"`` holds the last reading of the channel instead
(what a sensor stream does when a sample is lost); values missing before a channel's
first reading take that first reading.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypedDict, Unpack

import numpy as np

from pipeline.errors import DataError

# Re-exported: the readers return a Dataset, and their callers name it through them.
from pipeline.offline.dataset import Dataset as Dataset
from pipeline.offline.dataset import file_sha256 as file_sha256
from pipeline.offline.wavfolders import load_wav_folders

Missing = Literal["error", "ffill"]
MISSING_POLICIES: tuple[str, ...] = ("error", "ffill")
SUFFIXES: tuple[str, ...] = (".ts", ".csv")

# Header keys of the .ts format that change how @data is read.
_TS_UNSUPPORTED = {
    "targetlabel": "regression targets (@targetLabel) are not supported",
}
_YEAR_MONTH = re.compile(r"^\s*(\d{4})-(\d{2})\s*$")


def split_tail(length: int, fraction: float) -> int:
    """Index where the held-out tail of a series of ``length`` rows starts.

    Training fits on rows ``[:start]`` (normalisation included) and validates on the
    targets in ``[start:]``; evaluation feeds the whole series with carried state and
    scores only forecasts whose targets lie in ``[start:]``. ``fraction == 1`` scores
    everything (a separate test file).
    """
    if not (0.0 < fraction <= 1.0) or not math.isfinite(fraction):
        raise DataError(f"tail fraction must be in (0, 1], got {fraction}")
    n_tail = max(1, round(length * fraction))
    if fraction < 1.0 and n_tail >= length:
        raise DataError(f"a series of {length} rows is too short for a tail fraction of {fraction}")
    return max(0, length - n_tail)


class CsvColumns(TypedDict, total=False):
    """The column options of CSV files (``--label-column`` ...), passed on by :func:`load`
    to :func:`load_csv`; the other formats take none."""

    label_column: str | None
    time_column: str | None
    feature_columns: Sequence[str] | None
    case_column: str | None


def load(path: str | Path, *, missing: Missing = "error", **columns: Unpack[CsvColumns]) -> Dataset:
    """Read ``path`` by its suffix (``.ts`` or ``.csv``); the column options are CSV's.

    A directory is a WAV data set, one folder per class
    (:func:`pipeline.offline.wavfolders.load_wav_folders`).
    """
    p = Path(path)
    if p.is_dir() and p.suffix.lower() not in SUFFIXES:
        _no_csv_options(p, columns)
        return load_wav_folders(p)
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"{p}: unknown data format {suffix or '(no suffix)'!r}; expected .ts, .csv "
            "or a directory of WAV folders"
        )
    if suffix == ".ts":
        _no_csv_options(p, columns)
        return load_ts(p, missing=missing)
    return load_csv(p, missing=missing, **columns)


def _no_csv_options(p: Path, columns: CsvColumns) -> None:
    used = [f"--{k.replace('_', '-')}" for k, v in columns.items() if v is not None]
    if used:
        kind = "a WAV directory" if p.is_dir() else ".ts"
        raise DataError(f"{p}: {', '.join(used)} apply to CSV files only, not {kind}")


# ---------------------------------------------------------------- .ts


def load_ts(path: str | Path, *, missing: Missing = "error") -> Dataset:
    """Read a sktime/aeon ``.ts`` file (equal or unequal length, with class labels or none)."""
    p = Path(path)
    _check_missing_policy(missing)
    text = _read_text(p)
    header: dict[str, str] = {}
    classes: tuple[str, ...] = ()
    has_labels = False
    in_data = False
    cases: list[np.ndarray] = []
    labels: list[str] = []
    dims: int | None = None
    first_len: int | None = None
    lines = text.splitlines()
    last_line = len(lines)
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            if in_data:
                raise DataError(f"{p}, line {lineno}: header line {line.split()[0]!r} after @data")
            key, _, value = line[1:].partition(" ")
            key = key.lower()
            value = value.strip()
            if key == "data":
                in_data = True
                has_labels, classes = _ts_labels(p, header)
                dims = _ts_dimensions(p, header)
                for k, problem in _TS_UNSUPPORTED.items():
                    if _ts_bool(p, header, k):
                        raise DataError(f"{p}: {problem}")
                if _ts_bool(p, header, "timestamps"):
                    raise DataError(f"{p}: .ts files with @timeStamps true are not supported")
            else:
                header[key] = value
            continue
        if not in_data:
            raise DataError(f"{p}, line {lineno}: data before the @data line")
        cut = lineno == last_line and not text.endswith("\n")
        hint = " (is the file truncated?)" if cut else ""
        fields = line.split(":")
        n_channels = len(fields) - (1 if has_labels else 0)
        if dims is None:
            dims = n_channels
        if n_channels != dims or n_channels < 1:
            source = "@dimensions says" if "dimensions" in header else "the first case has"
            label_note = " plus a class label" if has_labels else ""
            raise DataError(
                f"{p}, line {lineno}: found {max(n_channels, 0)} channel(s){label_note}, "
                f"{source} {dims}{hint}"
            )
        if has_labels:
            label = fields[-1].strip()
            if label not in classes:
                raise DataError(
                    f"{p}, line {lineno}: class label {label!r} is not declared in "
                    f"@classLabel ({' '.join(classes)}){hint}"
                )
            labels.append(label)
        channels = [
            _parse_values(p, lineno, f"channel {c}", fields[c], missing) for c in range(dims)
        ]
        lengths = {len(ch) for ch in channels}
        if len(lengths) != 1:
            raise DataError(
                f"{p}, line {lineno}: channels have different lengths "
                f"({', '.join(str(len(ch)) for ch in channels)}){hint}"
            )
        length = lengths.pop()
        declared = _ts_int(p, header, "serieslength")
        if _ts_bool(p, header, "equallength"):
            expected = declared if declared is not None else first_len
            if expected is not None and length != expected:
                source = "@seriesLength" if declared is not None else "the first case"
                raise DataError(
                    f"{p}, line {lineno}: case has {length} values per channel, "
                    f"{source} says {expected}{hint}"
                )
        if first_len is None:
            first_len = length
        cases.append(np.stack(channels, axis=1).astype(np.float32))
    if not in_data:
        raise DataError(f"{p}: no @data line; not a .ts file")
    if not cases:
        raise DataError(f"{p}: no cases after @data")
    assert dims is not None
    return Dataset(
        name=header.get("problemname") or p.stem,
        path=p,
        cases=tuple(cases),
        features=tuple(f"dim_{i}" for i in range(dims)),
        classes=classes,
        labels=tuple(labels) if has_labels else None,
        sha256=file_sha256(p),
    )


def _ts_bool(p: Path, header: dict[str, str], key: str) -> bool:
    value = header.get(key)
    if value is None:
        return False
    word = value.split()[0].lower() if value.split() else ""
    if word not in ("true", "false"):
        raise DataError(f"{p}: header @{key} must be true or false, got {value!r}")
    return word == "true"


def _ts_int(p: Path, header: dict[str, str], key: str) -> int | None:
    value = header.get(key)
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise DataError(f"{p}: header @{key} must be a whole number, got {value!r}") from None
    if n < 1:
        raise DataError(f"{p}: header @{key} must be >= 1, got {n}")
    return n


def _ts_labels(p: Path, header: dict[str, str]) -> tuple[bool, tuple[str, ...]]:
    value = header.get("classlabel")
    if value is None:
        return False, ()
    words = value.split()
    if not words or words[0].lower() not in ("true", "false"):
        raise DataError(f"{p}: header @classLabel must start with true or false, got {value!r}")
    if words[0].lower() == "false":
        return False, ()
    classes = tuple(words[1:])
    if not classes:
        raise DataError(f"{p}: header @classLabel true declares no class names")
    if len(set(classes)) != len(classes):
        raise DataError(f"{p}: header @classLabel repeats a class name")
    return True, classes


def _ts_dimensions(p: Path, header: dict[str, str]) -> int | None:
    dims = _ts_int(p, header, "dimensions")
    if "univariate" in header and _ts_bool(p, header, "univariate"):
        if dims not in (None, 1):
            raise DataError(f"{p}: header says @univariate true but @dimensions {dims}")
        return 1
    return dims


# ---------------------------------------------------------------- CSV


def load_csv(
    path: str | Path,
    *,
    label_column: str | None = None,
    time_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    case_column: str | None = None,
    missing: Missing = "error",
) -> Dataset:
    """Read a CSV file with a header row: numeric feature columns, optional label/time/case.

    Without ``feature_columns`` every column not named as label, time or case is a
    feature and must be numeric. Without ``case_column`` the whole file is one case.
    The time column holds ISO-8601 times (``YYYY-MM`` too; no offset means UTC) or
    numeric seconds, and must not go backwards within a case.
    """
    p = Path(path)
    _check_missing_policy(missing)
    text = _read_text(p)
    rows = _csv_rows(p, text)
    try:
        lineno, header = next(rows)
    except StopIteration:
        raise DataError(f"{p}: empty file (expected a header row)") from None
    header = [h.strip() for h in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{p}, line {lineno}: duplicate column name(s) {dupes}")
    col = {h: i for i, h in enumerate(header)}
    roles = {"label": label_column, "time": time_column, "case": case_column}
    for role, name in roles.items():
        if name is not None and name not in col:
            raise DataError(f"{p}: {role} column {name!r} not found; columns are {header}")
    special = {n for n in roles.values() if n is not None}
    if feature_columns is None:
        features = tuple(h for h in header if h not in special)
    else:
        features = tuple(feature_columns)
        absent = [f for f in features if f not in col]
        if absent:
            raise DataError(f"{p}: feature column(s) {absent} not found; columns are {header}")
        clash = sorted(special & set(features))
        if clash:
            raise DataError(f"{p}: column(s) {clash} cannot be both a feature and label/time/case")
    if not features:
        raise DataError(f"{p}: no feature columns (columns are {header})")
    feat_idx = [col[f] for f in features]

    values: list[list[float]] = []
    row_lines: list[int] = []
    times: list[float] = []
    row_labels: list[str] = []
    case_keys: list[str] = []
    for lineno, row in rows:
        if len(row) != len(header):
            raise DataError(
                f"{p}, line {lineno}: {len(row)} field(s), the header has {len(header)}"
            )
        values.append([_csv_number(p, lineno, features[j], row[i]) for j, i in enumerate(feat_idx)])
        row_lines.append(lineno)
        if time_column is not None:
            times.append(_parse_time(p, lineno, time_column, row[col[time_column]]))
        if label_column is not None:
            label = row[col[label_column]].strip()
            if not label:
                raise DataError(f"{p}, line {lineno}: empty value in label column {label_column!r}")
            row_labels.append(label)
        if case_column is not None:
            case_keys.append(row[col[case_column]].strip())
    if not values:
        raise DataError(f"{p}: no data rows after the header")

    data = np.array(values, dtype=np.float64)
    lines_arr = np.array(row_lines, dtype=np.int64)
    groups = _group_rows(case_keys) if case_column is not None else [np.arange(len(values))]
    cases: list[np.ndarray] = []
    for idx in groups:
        block = _fill_missing(p, data[idx], lines_arr[idx], features, missing)
        cases.append(block.astype(np.float32))

    timestamps: tuple[np.ndarray, ...] | None = None
    if time_column is not None:
        t_all = np.array(times, dtype=np.float64)
        timestamps = tuple(t_all[idx] for idx in groups)
        for idx, t in zip(groups, timestamps, strict=True):
            back = np.flatnonzero(np.diff(t) < 0)
            if back.size:
                k = int(back[0]) + 1
                raise DataError(
                    f"{p}, line {int(lines_arr[idx][k])}: time in column {time_column!r} goes "
                    "backwards; rows of a case must be in time order"
                )

    labels: tuple[str, ...] | None = None
    per_row: tuple[np.ndarray, ...] | None = None
    classes: tuple[str, ...] = ()
    if label_column is not None:
        lab_all = np.array(row_labels, dtype=str)
        per_row = tuple(lab_all[idx] for idx in groups)
        classes = _sort_classes(set(row_labels))
        if all(np.all(r == r[0]) for r in per_row):
            labels = tuple(str(r[0]) for r in per_row)

    return Dataset(
        name=p.stem,
        path=p,
        cases=tuple(cases),
        features=features,
        classes=classes,
        labels=labels,
        row_labels=per_row,
        timestamps=timestamps,
        case_ids=tuple(dict.fromkeys(case_keys)) if case_column is not None else None,
        sha256=file_sha256(p),
    )


def _csv_rows(p: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """Non-blank records with the line number each starts on."""
    reader = csv.reader(text.splitlines())
    try:
        for row in reader:
            if row and any(cell.strip() for cell in row):
                yield reader.line_num, row
    except csv.Error as exc:
        raise DataError(f"{p}, line {reader.line_num}: malformed CSV: {exc}") from None


def _csv_number(p: Path, lineno: int, column: str, cell: str) -> float:
    s = cell.strip()
    if not s:
        return math.nan
    try:
        v = float(s)
    except ValueError:
        raise DataError(
            f"{p}, line {lineno}, column {column!r}: {s!r} is not a number; {_text_hint(column, s)}"
        ) from None
    if math.isinf(v):
        raise DataError(f"{p}, line {lineno}, column {column!r}: value {s!r} is not finite")
    return v


def _text_hint(column: str, value: str) -> str:
    try:
        _parse_iso(value)
    except ValueError:
        return (
            f"if {column!r} holds class labels name it with --label-column, "
            "or pick the numeric columns with --feature-columns"
        )
    return f"if {column!r} is a time column, name it with --time-column"


def _group_rows(keys: list[str]) -> list[np.ndarray]:
    """Row indices per case, cases in order of first appearance."""
    order: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        order.setdefault(k, []).append(i)
    return [np.array(v, dtype=np.int64) for v in order.values()]


def _sort_classes(values: set[str]) -> tuple[str, ...]:
    try:
        return tuple(sorted(values, key=float))
    except ValueError:
        return tuple(sorted(values))


def _parse_time(p: Path, lineno: int, column: str, cell: str) -> float:
    s = cell.strip()
    try:
        return float(s)
    except ValueError:
        pass
    try:
        return _parse_iso(s)
    except ValueError:
        raise DataError(
            f"{p}, line {lineno}, column {column!r}: {s!r} is neither an ISO-8601 time "
            "nor a number of seconds"
        ) from None


def _parse_iso(s: str) -> float:
    m = _YEAR_MONTH.match(s)
    dt = datetime(int(m.group(1)), int(m.group(2)), 1) if m else datetime.fromisoformat(s.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# ---------------------------------------------------------------- shared


def _read_text(p: Path) -> str:
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a file")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot read: {exc.strerror}") from None


def _check_missing_policy(missing: str) -> None:
    if missing not in MISSING_POLICIES:
        raise DataError(f"missing-value policy must be one of {MISSING_POLICIES}, got {missing!r}")


def _parse_values(p: Path, lineno: int, where: str, field: str, missing: Missing) -> np.ndarray:
    """One ``.ts`` channel: comma-separated numbers, ``?``/``NaN`` missing."""
    parts = field.split(",")
    try:
        arr = np.array(parts, dtype=np.float64)
    except ValueError:
        arr = np.empty(len(parts), dtype=np.float64)
        for k, s in enumerate(parts):
            s = s.strip()
            if s == "?":
                arr[k] = math.nan
                continue
            try:
                arr[k] = float(s)
            except ValueError:
                raise DataError(
                    f"{p}, line {lineno}, {where}, value {k + 1}: {s!r} is not a number"
                ) from None
    if np.isinf(arr).any():
        k = int(np.flatnonzero(np.isinf(arr))[0])
        raise DataError(f"{p}, line {lineno}, {where}, value {k + 1}: value is not finite")
    gaps = np.isnan(arr)
    if gaps.any():
        if missing == "error":
            k = int(np.flatnonzero(gaps)[0])
            raise DataError(
                f"{p}, line {lineno}, {where}, value {k + 1}: missing value "
                "(pass missing='ffill' / --missing ffill to hold the last reading)"
            )
        arr = _ffill(arr[:, None])[:, 0]
        if np.isnan(arr).any():
            raise DataError(f"{p}, line {lineno}, {where}: every value is missing")
    return arr


def _fill_missing(
    p: Path, block: np.ndarray, lines: np.ndarray, features: Sequence[str], missing: Missing
) -> np.ndarray:
    gaps = np.isnan(block)
    if not gaps.any():
        return block
    if missing == "error":
        r, c = (int(v) for v in np.argwhere(gaps)[0])
        raise DataError(
            f"{p}, line {int(lines[r])}, column {features[c]!r}: missing value "
            "(pass missing='ffill' / --missing ffill to hold the last reading)"
        )
    filled = _ffill(block)
    empty = np.flatnonzero(np.isnan(filled).all(axis=0))
    if empty.size:
        raise DataError(f"{p}: column {features[int(empty[0])]!r} has no values in a case")
    return filled


def _ffill(a: np.ndarray) -> np.ndarray:
    """Forward-fill NaNs down each column; leading NaNs take the first reading."""
    out = a.copy()
    valid = ~np.isnan(out)
    idx = np.where(valid, np.arange(len(out))[:, None], 0)
    np.maximum.accumulate(idx, axis=0, out=idx)
    out = np.take_along_axis(out, idx, axis=0)
    for c in range(out.shape[1]):
        col = out[:, c]
        first = np.flatnonzero(~np.isnan(col))
        if first.size:
            col[: first[0]] = col[first[0]]
    return out
