"""Feature names, units and sample rate reach the model and ``seqstream info`` prints them.

A sensor author has only the ONNX file: these prove that what training read from the
CSV header and time column (or from ``--feature-names``/``--sample-rate``) comes back
out of ``seqstream info``, in payload order, and that the example payload it prints is
one the daemon's decoder accepts for that model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.naming import name_features, sample_rate, split_unit
from pipeline.errors import ConfigError, DataError
from pipeline.offline import datasets
from pipeline.sources.codecs import Decoder


def seqstream(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, check=False
    )


def write_csv(path: Path, header: str, rows: int = 400, period_s: float = 0.1) -> Path:
    t = np.arange(rows) * period_s
    temp = 20 + np.sin(t)
    hum = 40 + np.cos(t / 3)
    lines = [header] + [f"{a:.3f},{b:.4f},{c:.4f}" for a, b, c in zip(t, temp, hum, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_split_unit_takes_the_bracketed_tail_only() -> None:
    assert split_unit("temp [C]") == ("temp", "C")
    assert split_unit("ax[m/s^2]") == ("ax", "m/s^2")
    assert split_unit("hum") == ("hum", None)
    assert split_unit("x[]") == ("x", None)
    assert split_unit("a[b]c") == ("a[b]c", None)


def test_names_and_rate_come_from_the_header_and_time_column(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "d.csv", "time,temp [C],hum[%]")
    data = datasets.load(csv, time_column="time")
    named, units = name_features(data)
    assert named.features == ("temp", "hum")
    assert units == {"units": {"temp": "C", "hum": "%"}, "columns": ["temp [C]", "hum[%]"]}
    assert sample_rate(named) == pytest.approx(10.0)
    assert sample_rate(named, 50.0) == 50.0
    assert sample_rate(datasets.load(csv)) is None  # no time column: nothing says


def test_bad_names_and_rates_are_refused(tmp_path: Path) -> None:
    data = datasets.load(write_csv(tmp_path / "d.csv", "time,a,b"), time_column="time")
    with pytest.raises(ConfigError, match="1 name"):
        name_features(data, ["only"])
    with pytest.raises(ConfigError, match="repeat"):
        name_features(data, ["x[C]", "x[F]"])
    with pytest.raises(ConfigError, match="no name"):
        name_features(data, ["[C]", "y"])
    with pytest.raises(ConfigError, match="> 0"):
        sample_rate(data, 0.0)
    frozen = write_csv(tmp_path / "f.csv", "time,a,b", period_s=0.0)
    with pytest.raises(DataError, match="never advances"):
        sample_rate(datasets.load(frozen, time_column="time"))


@pytest.fixture(scope="module")
def named_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny forecaster trained on a CSV whose header carries units, at 10 Hz."""
    root = tmp_path_factory.mktemp("named")
    csv = write_csv(root / "room.csv", "time,temp [C],hum[%]")
    out = root / "run"
    proc = seqstream(
        "train", "--task", "forecast", "--data", str(csv), "--time-column", "time",
        "--target", "temp", "--horizon", "2", "--hidden", "4", "--layers", "1",
        "--epochs", "1", "--window", "32", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    model = root / "room.onnx"
    proc = seqstream("export", str(out), "--out", str(model))
    assert proc.returncode == 0, proc.stderr
    return model


def test_info_prints_what_training_recorded(named_model: Path) -> None:
    proc = seqstream("info", str(named_model), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["task"] == "forecast"
    assert [(f["name"], f["unit"]) for f in doc["features"]] == [("temp", "C"), ("hum", "%")]
    assert doc["sample_rate_hz"] == pytest.approx(10.0)
    assert doc["targets"] == ["temp"] and doc["horizon"] == 2
    assert doc["state"][0]["shape"] == [1, 4]  # [layers, hidden] per stream
    assert doc["state_bytes_per_stream"] == 2 * 4 * 4  # LSTM: h and c, float32
    # The example is a payload the daemon accepts for this model, with the training means.
    decoder = Decoder(len(doc["features"]), max_payload_bytes=4096, max_steps=8)
    step = decoder.decode("s1", doc["example_payload"].encode())
    values = np.asarray(step.values)
    assert values.shape == (1, 2)
    assert 19 < values[0, 0] < 21.5 and 39 < values[0, 1] < 41.5
    # and the same step in the named form, keyed by the model's feature names
    assert json.loads(doc["example_payload_named"])["values"].keys() == {"temp", "hum"}
    named = Decoder(2, max_payload_bytes=4096, max_steps=8, features=("temp", "hum"))
    step = named.decode("s1", doc["example_payload_named"].encode())
    np.testing.assert_array_equal(np.asarray(step.values), values)

    # eval reads the same CSV back: the model records the columns its names came from
    csv = named_model.parent / "room.csv"
    proc = seqstream("eval", str(named_model), "--data", str(csv), "--time-column", "time")
    assert proc.returncode == 0, proc.stderr
    assert "mase" in proc.stdout.lower()

    text = seqstream("info", str(named_model)).stdout
    assert "sample rate: 10 Hz (a step every 0.1 s)" in text
    rows = [ln.split() for ln in text.splitlines() if ln.startswith("  ")]
    assert rows == [["0", "temp", "[C]"], ["1", "hum", "[%]"]]  # payload order, with units
    assert "horizon:     2 steps" in text


def test_train_takes_names_and_rate_from_flags(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "d.csv", "time,a,b", rows=200)
    out = tmp_path / "run"
    proc = seqstream(
        "train", "--task", "anomaly", "--data", str(csv), "--time-column", "time",
        "--feature-names", "pressure[kPa]", "flow", "--sample-rate", "2.5",
        "--hidden", "4", "--epochs", "1", "--context", "8", "--window", "48",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    model = tmp_path / "m.onnx"
    assert seqstream("export", str(out), "--out", str(model)).returncode == 0
    doc = json.loads(seqstream("info", str(model), "--json").stdout)
    assert [(f["name"], f["unit"]) for f in doc["features"]] == [
        ("pressure", "kPa"),
        ("flow", None),
    ]
    assert doc["sample_rate_hz"] == 2.5
    assert doc["threshold"] > 0 and doc["window"] == 8


def test_info_on_a_missing_model_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = seqstream("info", str(tmp_path / "nope.onnx"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr
