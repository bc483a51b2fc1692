"""Cluster mode's pure parts: the [cluster] section, rendezvous ownership, checkpoint frames."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cluster import assign
from pipeline.cluster.member import decode_checkpoint, encode_checkpoint
from pipeline.daemon import config
from pipeline.errors import CheckpointError, ConfigError


def parse(cluster: dict[str, object]) -> config.Settings:
    doc = {"model": {"path": "m.onnx"}, "cluster": cluster}
    return config.parse(doc, base=Path("/tmp"), source=Path("/tmp/x.toml"))


def test_cluster_section_is_optional_and_parsed_with_defaults() -> None:
    doc = {"model": {"path": "m.onnx"}}
    assert config.parse(doc, base=Path("/tmp"), source=Path("/tmp/x.toml")).cluster is None
    c = parse({"servers": ["nats://a:4222", "nats://b:4222"], "member": "box-1"}).cluster
    assert c is not None
    assert (c.servers, c.member, c.group, c.partitions) == (
        ("nats://a:4222", "nats://b:4222"), "box-1", "seqstream", 64,
    )  # fmt: skip
    assert c.lease_ttl_s == 3.0 and c.replicas == 3


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ({}, "cluster.servers"),
        ({"servers": ["a:4222"]}, "cluster.servers"),
        ({"servers": ["nats://a"], "member": "a b"}, "cluster.member"),
        ({"servers": ["nats://a"], "group": "g.h"}, "cluster.group"),
        ({"servers": ["nats://a"], "partitions": 0}, "cluster.partitions"),
        ({"servers": ["nats://a"], "lease_ttl_s": 0.5}, "cluster.lease_ttl_s"),
        ({"servers": ["nats://a"], "input_max_age_s": 5.0}, "cluster.input_max_age_s"),
        ({"servers": ["nats://a"], "typo": 1}, "cluster.typo"),
    ],
)
def test_cluster_mistakes_name_the_key(cluster: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse(cluster)


def test_rendezvous_shares_cover_every_partition_once_and_move_little() -> None:
    members = ["a", "b", "c"]
    shares = {m: assign.share(members, m, 64) for m in members}
    assert sorted(p for s in shares.values() for p in s) == list(range(64))
    assert all(10 <= len(s) <= 35 for s in shares.values()), shares
    joined = {m: assign.share([*members, "d"], m, 64) for m in [*members, "d"]}
    moved = sum(len(shares[m] - joined[m]) for m in members)
    assert moved == len(joined["d"])  # only the newcomer's share moves
    assert assign.owner([], 3) is None


def test_checkpoint_frame_round_trips_and_refuses_garbage() -> None:
    blob = encode_checkpoint(41, True, "a", 7, b"PK\x03\x04state\nwith newline")
    c = decode_checkpoint(blob, 9)
    assert (c.seq, c.final, c.state, c.revision) == (41, True, b"PK\x03\x04state\nwith newline", 9)
    assert c.replay_until == 0
    # A replay one owner began is passed on by its checkpoint, so the next owner goes on
    # marking the repeats; a bound already behind the checkpoint is not written.
    assert decode_checkpoint(encode_checkpoint(41, True, "a", 7, b"", 90), 2).replay_until == 90
    assert decode_checkpoint(encode_checkpoint(41, True, "a", 7, b"", 30), 2).replay_until == 0
    for bad in (b"", b"not json\n", b'{"seq":"x"}\n', b'{"seq":1}'):
        with pytest.raises(CheckpointError):
            decode_checkpoint(bad, 1)
