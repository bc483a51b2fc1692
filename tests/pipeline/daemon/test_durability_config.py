"""``checkpoint.ack_after_checkpoint``: refused where it cannot keep its promise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.daemon import config
from pipeline.errors import ConfigError


def parse(tmp_path: Path, **sections: dict[str, Any]) -> config.Settings:
    doc: dict[str, Any] = {"model": {"path": "m.onnx"}, **sections}
    return config.parse(doc, base=tmp_path, source=tmp_path / "c.toml")


def test_acks_after_checkpoint_need_a_checkpoint_and_qos_1(tmp_path: Path) -> None:
    s = parse(tmp_path, checkpoint={"path": "state.ckpt", "ack_after_checkpoint": True})
    assert s.checkpoint.ack_after_checkpoint and s.checkpoint.max_unacked == 10_000
    assert not parse(tmp_path).checkpoint.ack_after_checkpoint  # off by default
    with pytest.raises(ConfigError, match="checkpoint.ack_after_checkpoint: needs checkpoint.path"):
        parse(tmp_path, checkpoint={"ack_after_checkpoint": True})
    for qos in (0, 2):
        with pytest.raises(ConfigError, match="needs input.qos = 1"):
            parse(
                tmp_path,
                checkpoint={"path": "state.ckpt", "ack_after_checkpoint": True},
                input={"qos": qos},
            )


@pytest.mark.parametrize("value", [0, 30_001, True, "100"])
def test_max_unacked_stays_within_the_brokers_packet_ids(tmp_path: Path, value: Any) -> None:
    with pytest.raises(ConfigError, match="checkpoint.max_unacked"):
        parse(tmp_path, checkpoint={"max_unacked": value})
