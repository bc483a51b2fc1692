"""Audio settings are checked once, by their owners; the TOML reader adds where they came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.daemon import config
from pipeline.errors import ConfigError
from pipeline.keywords.detector import DetectorSettings
from pipeline.sources.microphone import MicrophoneSettings


def _parse(audio: dict[str, Any], tmp_path: Path) -> config.Settings:
    doc = {"model": {"path": "m.onnx"}, "audio": {"model": "k.onnx", **audio}}
    return config.parse(doc, base=tmp_path, source=tmp_path / "t.toml")


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("channels", 65, "must be 1..64, got 65"),
        ("block_size", 8, "must be 16..1048576, got 8"),
        ("buffer_ms", 5.0, "must be 10.0..600000.0, got 5.0"),
        ("stall_s", 0.05, "must be 0.1..3600.0, got 0.05"),
        ("latency", "fast", "must be one of 'low', 'high', got 'fast'"),
        ("sample_rate_hz", 800, "must be >= 1000, got 800"),
        ("name", "a+b", "must be a non-empty topic level"),
    ],
)
def test_a_microphone_value_fails_alike_in_code_and_in_the_file(
    tmp_path: Path, field: str, value: Any, problem: str
) -> None:
    with pytest.raises(ConfigError) as direct:
        MicrophoneSettings(**{"name": "m", field: value})
    assert str(direct.value).startswith(f"{field}: {problem}")
    with pytest.raises(ConfigError) as parsed:
        _parse({"microphone": [{"name": "m", field: value}]}, tmp_path)
    assert str(parsed.value) == f"audio.microphone[0].{direct.value}"


def test_retry_bounds_and_detector_values_are_the_owners(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^audio\.microphone\[0\]\.retry_max_s: must be >= "):
        _parse({"microphone": [{"name": "m", "retry_min_s": 2.0, "retry_max_s": 1.0}]}, tmp_path)
    with pytest.raises(ConfigError, match=r"^threshold: must be 0\.01\.\.1\.0, got 0\.001$"):
        DetectorSettings(threshold=0.001)
    with pytest.raises(ConfigError, match=r"^audio\.threshold: must be 0\.01\.\.1\.0, got 0\.001$"):
        _parse({"microphone": [{"name": "m"}], "threshold": 0.001}, tmp_path)
    with pytest.raises(ConfigError, match=r"^audio\.max_queue: must be >= 1, got 0$"):
        _parse({"microphone": [{"name": "m"}], "max_queue": 0}, tmp_path)


def test_a_wrong_type_is_still_the_readers_to_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^audio\.microphone\[0\]\.channels: must be an integer"):
        _parse({"microphone": [{"name": "m", "channels": "two"}]}, tmp_path)
