"""Checkpoints: bit-exact round trips, atomic writes, refusals of foreign files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.contract import StateSpec, recurrent_state
from pipeline.engine.store.state import (
    REJECT_DUPLICATE,
    RESET_EVICTED,
    RESET_EXPLICIT,
    StateStore,
    StorePolicy,
)
from pipeline.errors import CheckpointError
from tests.pipeline.engine.store.conftest import admit, store_with, stream

# -- checkpoints --------------------------------------------------------------------------


def filled_store(n: int = 5) -> StateStore:
    store, _ = store_with()
    rng = np.random.default_rng(1)
    for k in range(n):
        admit(store, f"s{k}", seq=k * 10, ts=float(k), n=2)
        row = rng.standard_normal(store.layout.row_size).astype(np.float32)
        store.write_state(stream(store, f"s{k}"), row)
    if n > 1:
        store.reset("s1", RESET_EXPLICIT, forget_sequence=False)
        store.write_state(stream(store, "s1"), np.full(16, 1.5, np.float32))
    store.lend_twins(stream(store, f"s{n - 1}"))  # saved from its twin row
    return store


def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path) -> None:
    src = filled_store()
    path = tmp_path / "state.npz"
    assert src.save(path, {"model": "m"}) == 5
    dst, _ = store_with()
    admit(dst, "stale")  # replaced by the checkpoint
    assert dst.load(path, now=100.0) == 5
    assert "stale" not in dst and len(dst) == 5
    for k in range(5):
        a, b = src.get(f"s{k}"), dst.get(f"s{k}")
        assert a is not None and b is not None
        assert src.read_state(a).tobytes() == dst.read_state(b).tobytes()
        assert (a.next_seq, a.last_seq, a.last_ts, a.pending) == (
            b.next_seq,
            b.last_seq,
            b.last_ts,
            b.pending,
        )
        assert b.last_seen == 100.0
    assert dst.pending_streams == 1
    # Sequence bookkeeping survives: a redelivered step is still a duplicate.
    assert admit(dst, "s3", seq=30, n=2, now=100.0) == REJECT_DUPLICATE
    # LRU order survives: the oldest restored stream goes first.
    small, resets = store_with(max_streams=5, initial_capacity=5)
    small.load(path, now=0.0)
    admit(small, "new")
    assert "s0" not in small and resets.counts == {RESET_EVICTED: 1}


def test_checkpoint_round_trip_of_several_state_blocks(tmp_path: Path) -> None:
    """Tensors with different inner sizes live in separate blocks; a checkpoint still
    holds each stream's row in the model's batch-1 layout and restores it bit-exactly."""
    specs = (
        StateSpec("h", "h_out", (2, "batch", 3)),
        StateSpec("w", "w_out", ("batch", 4, 2), init=0.5),
    )
    src = StateStore(specs, StorePolicy(initial_capacity=2))
    rng = np.random.default_rng(3)
    rows = {}
    for k in range(5):
        admit(src, f"s{k}", seq=k)
        rows[f"s{k}"] = rng.standard_normal(src.layout.row_size).astype(np.float32)
        src.write_state(stream(src, f"s{k}"), rows[f"s{k}"])
    path = tmp_path / "state.npz"
    src.save(path, {})
    with np.load(path) as data:
        saved = data["rows"]
    assert saved.tolist() == [rows[f"s{k}"].tolist() for k in range(5)]  # LRU order
    dst = StateStore(specs, StorePolicy(initial_capacity=1))
    assert dst.load(path, now=0.0) == 5
    for key, row in rows.items():
        assert dst.read_state(stream(dst, key)).tobytes() == row.tobytes()


def test_checkpoint_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    filled_store(3).save(path, {})
    first = path.read_bytes()
    filled_store(4).save(path, {})
    assert path.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]  # no temp left


def test_failed_save_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    store = filled_store(2)
    store.save(path, {})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        store.save(path, {"not json": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]


def test_save_into_a_missing_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        filled_store(2).save(tmp_path / "missing" / "state.npz", {})


def test_restore_keeps_the_most_recent_streams_within_max_streams(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    filled_store(5).save(path, {})
    small, resets = store_with(max_streams=3, initial_capacity=1)
    assert small.load(path, now=0.0) == 3
    assert sorted(st.key for st in small) == ["s2", "s3", "s4"]
    assert resets.counts == {RESET_EVICTED: 2}


def test_restore_refuses_another_state_signature(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    filled_store(2).save(path, {})
    other = StateStore(recurrent_state("gru", 2, 4), StorePolicy())
    with pytest.raises(CheckpointError, match="state signature"):
        other.load(path, now=0.0)


def test_restore_of_missing_or_corrupt_files_is_a_checkpoint_error(tmp_path: Path) -> None:
    store, _ = store_with()
    with pytest.raises(CheckpointError, match="not found"):
        store.load(tmp_path / "absent.npz", now=0.0)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError):
        store.load(junk, now=0.0)
    good = tmp_path / "good.npz"
    filled_store(2).save(good, {})
    with np.load(good) as data:
        header = json.loads(str(data["header"][()]))
        rows = data["rows"]
    header["streams"][0][1] = "ten"  # a malformed entry
    bad = tmp_path / "bad.npz"
    np.savez(bad, rows=rows, header=np.array(json.dumps(header)))
    with pytest.raises(CheckpointError, match="malformed"):
        store.load(bad, now=0.0)
    header["streams"][0][1] = 10
    np.savez(bad, rows=rows[:1], header=np.array(json.dumps(header)))
    with pytest.raises(CheckpointError, match="do not agree"):
        store.load(bad, now=0.0)
    assert len(store) == 0  # nothing half-restored
