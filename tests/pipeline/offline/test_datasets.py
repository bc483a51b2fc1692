"""The .ts and CSV readers on the real data sets, and their errors on broken files."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.offline.datasets import Dataset, load, load_csv, load_ts, split_tail


def _ts_lines(path: Path) -> tuple[list[str], list[str]]:
    """Header lines (up to and including @data) and data lines of a .ts file, as text."""
    lines = path.read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.strip().lower() == "@data")
    return lines[: at + 1], [ln for ln in lines[at + 1 :] if ln.strip()]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- real files


@pytest.mark.parametrize("which", [0, 1])
def test_basicmotions_matches_the_raw_text(basicmotions: tuple[Path, Path], which: int) -> None:
    path = basicmotions[which]
    data = load(path)
    header, rows = _ts_lines(path)
    declared = next(ln for ln in header if ln.startswith("@classLabel")).split()[2:]
    assert data.name == "BasicMotions"
    assert data.classes == tuple(declared)
    assert data.features == tuple(f"dim_{i}" for i in range(6))
    assert data.n_cases == len(rows) == 40
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data.labels is not None and Counter(data.labels) == Counter(
        r.split(":")[-1] for r in rows
    )
    for case, row in zip(data.cases, rows, strict=True):
        assert case.dtype == np.float32 and case.shape == (100, 6)
        channels = row.split(":")[:-1]
        expected = np.array([[float(v) for v in ch.split(",")] for ch in channels]).T
        np.testing.assert_array_equal(case, expected.astype(np.float32))
    idx = data.label_indices()
    assert [data.classes[i] for i in idx] == list(data.labels)


def test_waterflow_with_time_column(waterflow: Path) -> None:
    data = load(waterflow, time_column="Time")
    with waterflow.open() as fh:
        rows = list(csv.DictReader(fh))
    assert data.features == ("Water flow [l/s]",)
    assert data.n_cases == 1 and data.cases[0].shape == (len(rows), 1)
    np.testing.assert_array_equal(
        data.cases[0][:, 0], np.array([float(r["Water flow [l/s]"]) for r in rows], np.float32)
    )
    assert data.timestamps is not None
    t = data.timestamps[0]
    assert t.dtype == np.float64
    assert t[0] == datetime.fromisoformat(rows[0]["Time"]).timestamp()
    # DST switches the offset (+01:00 -> +02:00) but UTC time keeps going forward
    assert np.all(np.diff(t) > 0)
    assert data.labels is None and data.row_labels is None


def test_waterflow_time_text_without_time_column_is_named(waterflow: Path) -> None:
    with pytest.raises(DataError) as err:
        load(waterflow)
    msg = str(err.value)
    assert str(waterflow) in msg
    assert "line 2" in msg and "column 'Time'" in msg
    assert "'2022-03-20T11:00:00+01:00' is not a number" in msg
    assert "--time-column" in msg


def test_mitdb_keeps_per_row_anomaly_labels(mitdb: Path) -> None:
    data = load(mitdb, label_column="label")
    with mitdb.open() as fh:
        rows = list(csv.DictReader(fh))
    assert data.features == ("data",)
    assert data.classes == ("0", "1")
    assert data.labels is None  # the label varies within the single case
    assert data.row_labels is not None and len(data.row_labels) == 1
    assert Counter(data.row_labels[0].tolist()) == Counter(r["label"] for r in rows)
    with pytest.raises(DataError, match="varies within a case"):
        data.label_indices()


def test_airline_year_month_times(airline: Path) -> None:
    data = load(airline, time_column="Date")
    assert data.features == ("Passengers",)
    assert data.timestamps is not None
    t = data.timestamps[0]
    days = np.diff(t) / 86400
    assert set(days.tolist()) <= {28.0, 29.0, 30.0, 31.0}
    assert len(t) == data.cases[0].shape[0] == 144


# ---------------------------------------------------------------- CSV layouts


def test_csv_case_column_groups_rows_and_labels(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "cases.csv",
        [
            "id,t,a,b,y",
            "s1,0,1,10,up",
            "s2,0,5,50,down",
            "s1,1,2,20,up",
            "s2,1,6,60,down",
            "s1,2,3,30,up",
        ],
    )
    data = load_csv(p, case_column="id", time_column="t", label_column="y")
    assert data.case_ids == ("s1", "s2")
    assert data.features == ("a", "b")
    assert data.labels == ("up", "down")
    assert data.classes == ("down", "up")
    np.testing.assert_array_equal(data.cases[0], [[1, 10], [2, 20], [3, 30]])
    np.testing.assert_array_equal(data.cases[1], [[5, 50], [6, 60]])
    assert data.timestamps is not None
    np.testing.assert_array_equal(data.timestamps[1], [0.0, 1.0])
    np.testing.assert_array_equal(data.label_indices(), [1, 0])
    picked = load_csv(p, case_column="id", feature_columns=["b"])
    assert picked.features == ("b",)


def test_csv_numeric_classes_sort_numerically(tmp_path: Path) -> None:
    p = _write(tmp_path / "n.csv", ["x,k,y", "1,a,10", "2,b,2", "3,c,9"])
    assert load_csv(p, label_column="y", case_column="k").classes == ("2", "9", "10")


def test_csv_missing_values_refused_or_held(tmp_path: Path) -> None:
    p = _write(tmp_path / "gap.csv", ["a,b", "1,", "2,7", ",8", "4,nan"])
    with pytest.raises(DataError) as err:
        load_csv(p)
    assert "gap.csv, line 2, column 'b': missing value" in str(err.value)
    data = load_csv(p, missing="ffill")
    np.testing.assert_array_equal(data.cases[0], [[1, 7], [2, 7], [2, 8], [4, 8]])


@pytest.mark.parametrize(
    ("lines", "kwargs", "expected"),
    [
        (["a,b", "1,2", "3,oops"], {}, "bad.csv, line 3, column 'b': 'oops' is not a number"),
        (["a,b", "1,2", "3"], {}, "bad.csv, line 3: 1 field(s), the header has 2"),
        (["a,a", "1,2"], {}, "duplicate column name(s) ['a']"),
        (["a,b"], {}, "no data rows after the header"),
        ([""], {}, "empty file"),
        (["a,b", "1,2"], {"label_column": "y"}, "label column 'y' not found"),
        (["a,b", "1,2"], {"feature_columns": ["c"]}, "feature column(s) ['c'] not found"),
        (["a,t", "1,5", "2,4"], {"time_column": "t"}, "line 3: time in column 't' goes backwards"),
        (["a,t", "1,noon"], {"time_column": "t"}, "'noon' is neither an ISO-8601 time"),
        (["a,b", "1,inf"], {}, "value 'inf' is not finite"),
        (["a,y", "1,"], {"label_column": "y"}, "line 2: empty value in label column 'y'"),
        (["y", "1"], {"label_column": "y"}, "no feature columns"),
    ],
)
def test_csv_errors_name_file_line_and_problem(
    tmp_path: Path, lines: list[str], kwargs: dict[str, object], expected: str
) -> None:
    p = _write(tmp_path / "bad.csv", lines)
    with pytest.raises(DataError) as err:
        load(p, **kwargs)  # type: ignore[arg-type]
    assert str(p) in str(err.value)
    assert expected in str(err.value)


def test_text_in_label_like_column_hints_label_column(tmp_path: Path) -> None:
    p = _write(tmp_path / "lab.csv", ["a,kind", "1,walk"])
    with pytest.raises(DataError, match="--label-column"):
        load(p)


# ---------------------------------------------------------------- .ts variants and errors


def test_ts_unequal_length_and_missing_values(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "u.ts",
        [
            "# unequal",
            "@problemName Tiny",
            "@dimensions 2",
            "@equalLength false",
            "@classLabel true a b",
            "@data",
            "1,2,3:4,5,6:a",
            "",
            "7,?:8,9:b",
            "?,1,?:2,3,4:a",
        ],
    )
    with pytest.raises(DataError) as err:
        load_ts(p)
    assert "u.ts, line 9, channel 0, value 2: missing value" in str(err.value)
    data = load_ts(p, missing="ffill")
    assert data.name == "Tiny" and data.lengths == (3, 2, 3)
    np.testing.assert_array_equal(data.cases[1], [[7, 8], [7, 9]])
    np.testing.assert_array_equal(data.cases[2], [[1, 2], [1, 3], [1, 4]])
    assert data.labels == ("a", "b", "a")


def test_ts_without_labels(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "n.ts", ["@univariate true", "@classLabel false", "@data", "1,2,3", "4,5"]
    )
    data = load_ts(p)
    assert data.labels is None and data.classes == () and data.features == ("dim_0",)
    assert data.lengths == (3, 2)


def test_ts_header_lying_about_dimensions(basicmotions: tuple[Path, Path], tmp_path: Path) -> None:
    header, rows = _ts_lines(basicmotions[0])
    header = [("@dimensions 3" if ln.startswith("@dimensions") else ln) for ln in header]
    p = _write(tmp_path / "liar.ts", header + rows)
    with pytest.raises(DataError) as err:
        load(p)
    first_data_line = len(header) + 1
    assert str(err.value) == (
        f"{p}, line {first_data_line}: found 6 channel(s) plus a class label, @dimensions says 3"
    )


def test_ts_header_lying_about_series_length(
    basicmotions: tuple[Path, Path], tmp_path: Path
) -> None:
    header, rows = _ts_lines(basicmotions[0])
    header = [("@seriesLength 99" if ln.startswith("@seriesLength") else ln) for ln in header]
    p = _write(tmp_path / "long.ts", header + rows)
    with pytest.raises(
        DataError, match=r"line \d+: case has 100 values per channel, @seriesLength says 99"
    ):
        load(p)


def test_truncated_ts_is_reported(basicmotions: tuple[Path, Path], tmp_path: Path) -> None:
    raw = basicmotions[1].read_bytes()
    p = tmp_path / "cut.ts"
    p.write_bytes(raw[: len(raw) - 3000])  # cuts the last case mid-channel
    with pytest.raises(DataError) as err:
        load(p)
    msg = str(err.value)
    n_lines = len(p.read_text().splitlines())
    assert msg.startswith(f"{p}, line {n_lines}: found ")
    assert msg.endswith("(is the file truncated?)")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (["@classLabel true a b", "@data", "1,2:c"], "line 3: class label 'c' is not declared"),
        (["@classLabel true a b", "@data", "1,x,3:a"], "line 3, channel 0, value 2: 'x' is not"),
        (["@dimensions 2", "@data", "1,2:3"], "line 3: channels have different lengths (2, 1)"),
        (["@classLabel true a", "@data"], "no cases after @data"),
        (["@dimensions 2"], "no @data line"),
        (["@data", "1,2", "@dimensions 1"], "line 3: header line '@dimensions' after @data"),
        (["@timeStamps true", "@data", "(1,2)"], "@timeStamps true are not supported"),
        (["@targetLabel true", "@data", "1,2:3"], "regression targets"),
        (["@equalLength maybe", "@data", "1"], "@equallength must be true or false"),
        (["@dimensions two", "@data", "1"], "@dimensions must be a whole number"),
        (
            ["@equalLength true", "@data", "1,2", "1,2,3"],
            "line 4: case has 3 values per channel, the first case says 2",
        ),
        (["@data", "1,inf"], "value 2: value is not finite"),
    ],
)
def test_ts_errors(tmp_path: Path, body: list[str], expected: str) -> None:
    p = _write(tmp_path / "bad.ts", body)
    with pytest.raises(DataError) as err:
        load(p)
    assert str(p) in str(err.value)
    assert expected in str(err.value)


# ---------------------------------------------------------------- dispatch and split


def test_load_dispatch_errors(tmp_path: Path, basicmotions: tuple[Path, Path]) -> None:
    with pytest.raises(DataError, match=r"unknown data format '\.txt'"):
        load(tmp_path / "x.txt")
    with pytest.raises(DataError, match="data file not found"):
        load(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="not a file"):
        (tmp_path / "dir.csv").mkdir()
        load(tmp_path / "dir.csv")
    with pytest.raises(DataError, match="--label-column apply to CSV files only"):
        load(basicmotions[0], label_column="y")
    bad = tmp_path / "bin.csv"
    bad.write_bytes(b"a\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load(bad)


def test_dataset_is_frozen(basicmotions: tuple[Path, Path]) -> None:
    data = load(basicmotions[1])
    assert isinstance(data, Dataset)
    with pytest.raises(AttributeError):
        data.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize("length", [10, 101, 1268])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_split_tail(length: int, fraction: float) -> None:
    start = split_tail(length, fraction)
    assert 0 < start < length
    assert abs((length - start) - length * fraction) <= 0.5 + 1e-9
    assert split_tail(length, 1.0) == 0


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_split_tail_rejects_bad_fractions(fraction: float) -> None:
    with pytest.raises(DataError, match="tail fraction"):
        split_tail(100, fraction)


def test_split_tail_too_short() -> None:
    with pytest.raises(DataError, match="too short"):
        split_tail(1, 0.5)
