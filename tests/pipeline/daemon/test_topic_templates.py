"""Input topic templates with ``+`` levels and several ``{stream}`` levels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from pipeline.daemon import config
from pipeline.errors import ConfigError
from pipeline.sources.mqtt import InputConfig, stream_id, topic_filter


def parse_input(tmp_path: Path, **values: Any) -> InputConfig:
    doc = {"model": {"path": "m.onnx"}, "input": values}
    return config.parse(doc, base=tmp_path, source=tmp_path / "t.toml").input


@pytest.mark.parametrize(
    ("template", "filt", "topic", "stream"),
    [
        ("sensors/{stream}/data", "sensors/+/data", "sensors/s1/data", "s1"),
        ("site/+/dev/{stream}/telemetry", "site/+/dev/+/telemetry", "site/x/dev/7/telemetry", "7"),
        ("site/{stream}/dev/{stream}/t", "site/+/dev/+/t", "site/a/dev/7/t", "a/7"),
        ("{stream}/+/{stream}", "+/+/+", "a/b/c", "a/c"),
        ("{stream}", "+", "dev-1", "dev-1"),
    ],
)
def test_a_template_subscribes_with_wildcards_and_names_its_stream(
    tmp_path: Path, template: str, filt: str, topic: str, stream: str
) -> None:
    cfg = parse_input(tmp_path, topic=template, reset_topic="")
    pattern, levels = topic_filter(cfg.topic)
    assert pattern == filt and paho.topic_matches_sub(pattern, topic)
    assert stream_id(topic, levels) == stream


def test_an_empty_id_level_or_a_short_topic_has_no_stream() -> None:
    _, levels = topic_filter("site/{stream}/dev/{stream}/t")
    assert stream_id("site//dev/7/t", levels) is None
    assert stream_id("site/a/dev//t", levels) is None
    assert stream_id("site/a/dev", levels) is None
    _, one = topic_filter("s/{stream}")
    assert stream_id("s/", one) is None and stream_id("s", one) is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"topic": "site/+/dev/+/t"}, "must contain {stream} once or more"),
        ({"topic": "site/a+/dev/{stream}"}, "must not contain MQTT wildcards but whole + levels"),
        ({"topic": "site/#/{stream}"}, "must not contain MQTT wildcards"),
        ({"topic": "s/{stream}x/{stream}"}, "each a whole topic level"),
        (  # the same topic would be taken as data and as a reset
            {"topic": "s/+/{stream}/data", "reset_topic": "s/{stream}/+/data"},
            "input.reset_topic: must differ from topic",
        ),
        (
            {"topic": "s/{stream}/{stream}/data", "reset_topic": "s/x/{stream}/reset"},
            "input.reset_topic: must have as many {stream} levels as topic",
        ),
    ],
)
def test_ambiguous_templates_are_refused(
    tmp_path: Path, values: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+").replace("{", r"\{")):
        parse_input(tmp_path, **values)


def test_a_reset_template_beside_a_nested_one_is_accepted(tmp_path: Path) -> None:
    cfg = parse_input(
        tmp_path,
        topic="fleet/+/site/{stream}/dev/{stream}/telemetry",
        reset_topic="fleet/+/site/{stream}/dev/{stream}/reset",
    )
    assert cfg.reset_topic is not None
    data, levels = topic_filter(cfg.topic)
    reset, reset_levels = topic_filter(cfg.reset_topic)
    topic = "fleet/gw/site/a/dev/7/reset"
    assert paho.topic_matches_sub(reset, topic) and not paho.topic_matches_sub(data, topic)
    assert stream_id(topic, reset_levels) == "a/7" == stream_id(topic, levels)


def test_a_channel_template_is_checked_like_the_others(tmp_path: Path) -> None:
    cfg = parse_input(tmp_path, channel_topic="site/+/{stream}/ch/{channel}", reset_topic="")
    assert cfg.channel_topic == "site/+/{stream}/ch/{channel}" and cfg.channel_max_pending == 4
    assert parse_input(tmp_path, channel_topic="").channel_topic is None
    refused = {
        "sensors/{stream}/ch": "must contain {channel} once",
        "sensors/{stream}/ch{channel}": "must contain {channel} once",
        "sensors/{stream}/{channel}": "must differ from 'sensors/{stream}/data'",
        "s/{stream}/{stream}/{channel}": "must have as many {stream} levels as reset_topic",
        "s/#/{stream}/{channel}": "must not contain MQTT wildcards",
    }
    for template, message in refused.items():
        with pytest.raises(ConfigError, match="input.channel_topic: " + _literal(message)):
            parse_input(tmp_path, channel_topic=template)


def _literal(text: str) -> str:
    return text.replace("{", r"\{").replace("}", r"\}").replace("+", r"\+")
