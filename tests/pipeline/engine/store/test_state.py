"""The per-stream state store: slots, admission rules, resets, checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.contract import StateSpec, recurrent_state
from pipeline.engine.store.state import (
    REJECT_CAPACITY,
    REJECT_DUPLICATE,
    REJECT_OUT_OF_ORDER,
    REJECT_SEQ_JUMP,
    REPEAT,
    RESET_EVICTED,
    RESET_EXPLICIT,
    RESET_IDLE,
    RESET_MODEL_CHANGE,
    RESET_SEQ_GAP,
    RESET_TS_GAP,
    TWINS,
    Layout,
    StateStore,
    StorePolicy,
    Stream,
)
from pipeline.errors import CheckpointError, ConfigError

LSTM = recurrent_state("lstm", 2, 4)  # h, c: [2, batch, 4]


class Resets:
    """Counts what the store reports, like the engine's observer does."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, reason: str, count: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count


def store_with(**policy: object) -> tuple[StateStore, Resets]:
    resets = Resets()
    return StateStore(LSTM, StorePolicy(**policy), resets), resets  # type: ignore[arg-type]


def admit(
    store: StateStore,
    key: str,
    seq: int | None = None,
    ts: float | None = None,
    n: int = 1,
    now: float = 0.0,
) -> int | str:
    store.begin()
    return store.admit(key, seq, ts, n, now)


# -- layout and slots ---------------------------------------------------------------------


def test_layout_puts_every_state_tensor_of_a_stream_in_one_row() -> None:
    specs = (
        StateSpec("h", "h_out", (2, "batch", 3), init=0.5),
        StateSpec("w", "w_out", ("batch", 5)),
    )
    lay = Layout(specs)
    assert lay.offsets == (0, 6) and lay.sizes == (6, 5) and lay.row_size == 11
    assert lay.init_row.tolist() == [0.5] * 6 + [0.0] * 5
    assert lay.signature == (("h", (2, 3), "float32"), ("w", (5,), "float32"))


def test_new_streams_start_from_the_initial_state() -> None:
    specs = (StateSpec("h", "h_out", (2, "batch", 3), init=0.25),)
    store = StateStore(specs, StorePolicy(initial_capacity=1, idle_timeout_s=1.0))
    first = admit(store, "old")
    store.write_state(stream(store, "old"), np.full(6, 7.0, np.float32))  # garbage left behind
    assert store.expire(now=10.0) == 1
    assert admit(store, "a", now=10.0) == first  # the same slot again
    assert store.state_of("a")["h"].tolist() == [[0.25] * 3] * 2


def stream(store: StateStore, key: str) -> Stream:
    st = store.get(key)
    assert st is not None
    return st


def test_state_blocks_hold_each_slot_in_the_models_batch_layout() -> None:
    """gather fills exactly the buffer the model's state inputs read at batch B, and
    scatter writes each row back to its own stream (and only there)."""
    specs = (
        StateSpec("h", "h_out", (2, "batch", 3)),
        StateSpec("c", "c_out", (2, "batch", 3)),
        StateSpec("w", "w_out", ("batch", 4, 2)),
    )
    store = StateStore(specs, StorePolicy(initial_capacity=2))
    rng = np.random.default_rng(0)
    rows = {}
    for k in range(5):  # grows twice
        admit(store, f"s{k}")
        rows[f"s{k}"] = rng.standard_normal(store.layout.row_size).astype(np.float32)
        store.write_state(stream(store, f"s{k}"), rows[f"s{k}"])
    order = ["s3", "s0", "s4"]
    slots = np.array([stream(store, k).slot for k in order], dtype=np.intp)
    buf = np.empty(3 * store.layout.row_size, dtype=np.float32)
    index = store.gather(slots, buf)
    h = buf[:18].reshape(2, 3, 3)
    c = buf[18:36].reshape(2, 3, 3)
    w = buf[36:].reshape(3, 4, 2)
    for b, key in enumerate(order):
        want = rows[key]
        assert h[:, b].tolist() == want[:6].reshape(2, 3).tolist()
        assert c[:, b].tolist() == want[6:12].reshape(2, 3).tolist()
        assert w[b].tolist() == want[12:].reshape(4, 2).tolist()
    store.scatter(index, -buf, 3)
    for key in rows:
        sign = -1 if key in order else 1
        assert store.read_state(stream(store, key)).tolist() == (sign * rows[key]).tolist()


def test_capacity_grows_by_doubling_up_to_max_streams() -> None:
    store, _ = store_with(max_streams=5, initial_capacity=2)
    for k in range(5):
        assert isinstance(admit(store, f"s{k}"), int)
    assert store.capacity == 5 and len(store) == 5
    slots = {store.get(f"s{k}").slot for k in range(5)}  # type: ignore[union-attr]
    assert slots == set(range(5))


def test_growth_keeps_existing_rows() -> None:
    store, _ = store_with(initial_capacity=1)
    admit(store, "a")
    store.write_state(stream(store, "a"), np.full(16, 3.0, np.float32))
    admit(store, "b")
    assert store.capacity >= 2
    assert np.all(store.read_state(stream(store, "a")) == 3.0)
    assert np.all(store.read_state(stream(store, "b")) == 0.0)


def test_twin_rows_are_lent_recalled_and_returned() -> None:
    store, _ = store_with(initial_capacity=4)
    for k in range(TWINS + 1):
        admit(store, f"s{k}")
    first = stream(store, "s0")
    store.write_state(first, np.full(16, 4.0, np.float32))
    store.lend_twins(first)
    k0 = first.twin
    assert 0 <= k0 < TWINS and first.at == 2 * k0
    assert np.all(store.twins[first.at] == 4.0)  # the state moved into the pair
    store.lend_twins(first)  # already lent: nothing moves
    assert first.twin == k0
    store.twins[first.at ^ 1] = 5.0  # a run in place writes the other row of the pair
    first.at ^= 1
    for k in range(1, TWINS + 1):  # one loan more than there are pairs
        store.lend_twins(stream(store, f"s{k}"))
    assert first.twin == -1 and first.at == -1  # recalled, state brought home
    assert np.all(store.read_state(first) == 5.0)
    last = stream(store, f"s{TWINS}")
    assert last.twin == k0
    store.write_state(last, np.full(16, 2.0, np.float32))  # lands in its twin row
    assert store.state_of(f"s{TWINS}")["h"].tolist() == [[2.0] * 4] * 2
    store.return_twins()
    assert last.twin == -1 and np.all(store.read_state(last) == 2.0)
    store.lend_twins(last)
    store.expire(now=1e9)  # removal returns the loan
    assert len(store) == 0 and last.twin == -1


# -- eviction and idleness -------------------------------------------------------------------


def test_least_recently_used_stream_is_evicted_beyond_max_streams() -> None:
    store, resets = store_with(max_streams=2, initial_capacity=2)
    admit(store, "a")
    admit(store, "b")
    admit(store, "a")  # a is now more recent than b
    admit(store, "c")
    assert "b" not in store and "a" in store and "c" in store
    assert resets.counts == {RESET_EVICTED: 1}


def test_streams_of_the_current_call_are_never_evicted() -> None:
    store, resets = store_with(max_streams=2, initial_capacity=2)
    store.begin()
    assert isinstance(store.admit("a", None, None, 1, 0.0), int)
    assert isinstance(store.admit("b", None, None, 1, 0.0), int)
    assert store.admit("c", None, None, 1, 0.0) == REJECT_CAPACITY
    assert "c" not in store and resets.counts == {}


def test_idle_stream_is_reset_on_its_next_step_but_not_at_the_limit() -> None:
    store, _ = store_with(idle_timeout_s=10.0)
    admit(store, "a", now=0.0)
    admit(store, "a", now=10.0)
    assert store.wave_resets.get("a", "") == ""
    admit(store, "a", now=20.5)
    assert store.wave_resets.get("a", "") == RESET_IDLE


def test_expire_forgets_only_streams_idle_past_the_timeout() -> None:
    store, resets = store_with(idle_timeout_s=10.0)
    admit(store, "old", now=0.0)
    admit(store, "new", now=5.0)
    assert store.expire(now=10.0) == 0
    assert store.expire(now=12.0) == 1
    assert "old" not in store and "new" in store
    assert resets.counts == {RESET_IDLE: 1}


def test_without_idle_timeout_nothing_expires() -> None:
    store, _ = store_with(idle_timeout_s=None)
    admit(store, "a", now=0.0)
    assert store.expire(now=1e9) == 0
    admit(store, "a", now=1e9)
    assert store.wave_resets.get("a", "") == ""


# -- sequence numbers and timestamps ----------------------------------------------------


def test_duplicate_and_older_steps_are_refused_without_changing_anything() -> None:
    store, _ = store_with()
    admit(store, "a", seq=10, n=3)  # rows 10, 11, 12
    st = store.get("a")
    assert st is not None and st.next_seq == 13
    assert admit(store, "a", seq=10, n=3) == REJECT_DUPLICATE
    assert admit(store, "a", seq=11) == REJECT_OUT_OF_ORDER
    assert admit(store, "a", seq=4) == REJECT_OUT_OF_ORDER
    assert st.next_seq == 13 and st.last_seq == 10
    assert isinstance(admit(store, "a", seq=13), int) and not store.wave_resets


@pytest.mark.parametrize(
    ("tolerance", "gap", "reset"),
    [(0, 0, ""), (0, 1, RESET_SEQ_GAP), (2, 2, ""), (2, 3, RESET_SEQ_GAP)],
)
def test_sequence_gap_beyond_tolerance_resets(tolerance: int, gap: int, reset: str) -> None:
    store, _ = store_with(seq_gap_tolerance=tolerance)
    admit(store, "a", seq=0)
    admit(store, "a", seq=1 + gap)
    assert store.wave_resets.get("a", "") == reset


@pytest.mark.parametrize("forged", [1 + 101, 2**62 - 2])
def test_a_forged_jump_is_refused_without_touching_the_stream(forged: int) -> None:
    """One forged seq far ahead must not reset the stream nor lock its sender out."""
    store, resets = store_with(max_seq_jump=100)
    admit(store, "a", seq=0)
    st = store.get("a")
    assert st is not None
    before = (st.next_seq, st.last_seq, st.mark, st.last_seen, st.last_ts)
    assert admit(store, "a", seq=forged, now=1.0) == REJECT_SEQ_JUMP
    assert (st.next_seq, st.last_seq, st.mark, st.last_seen, st.last_ts) == before
    assert not store.wave_resets and resets.counts == {}
    assert isinstance(admit(store, "a", seq=1, now=2.0), int)  # the real sender goes on
    assert not store.wave_resets and st.next_seq == 2


def test_a_jump_within_the_bound_is_a_gap() -> None:
    store, _ = store_with(max_seq_jump=100)
    admit(store, "a", seq=0)
    assert isinstance(admit(store, "a", seq=1 + 100), int)
    assert store.wave_resets == {"a": RESET_SEQ_GAP}


def test_without_a_bound_any_jump_is_a_gap() -> None:
    store, _ = store_with(max_seq_jump=None)
    admit(store, "a", seq=0)
    assert isinstance(admit(store, "a", seq=2**62 - 2), int)
    assert store.wave_resets == {"a": RESET_SEQ_GAP}


def test_a_sensor_that_restarts_its_numbering_recovers_by_its_reset_or_idleness() -> None:
    """The documented ways back for a sender whose seq restarts (or leaps): a reset
    request forgets the stream's numbers at once; without one the idle timeout does."""
    store, _ = store_with(idle_timeout_s=60.0, max_seq_jump=100)
    admit(store, "a", seq=5000, now=0.0)
    assert admit(store, "a", seq=0, now=1.0) == REJECT_OUT_OF_ORDER  # restarted at 0
    assert store.reset("a", RESET_EXPLICIT, forget_sequence=True)
    assert isinstance(admit(store, "a", seq=0, now=2.0), int)
    assert not store.wave_resets
    # a leap ahead after an outage, no reset request: refused until the stream is idle
    assert admit(store, "a", seq=10**6, now=30.0) == REJECT_SEQ_JUMP
    assert isinstance(admit(store, "a", seq=10**6, now=62.5), int)
    assert store.wave_resets == {"a": RESET_IDLE}
    st = store.get("a")
    assert st is not None and st.next_seq == 10**6 + 1


def test_timestamps_order_steps_without_sequence_numbers() -> None:
    store, _ = store_with()
    admit(store, "a", ts=5.0)
    assert admit(store, "a", ts=5.0) == REJECT_DUPLICATE
    assert admit(store, "a", ts=4.0) == REJECT_OUT_OF_ORDER
    assert isinstance(admit(store, "a", ts=6.0), int)


@pytest.mark.parametrize(("gap", "reset"), [(0.5, ""), (1.0, ""), (1.01, RESET_TS_GAP)])
def test_timestamp_gap_beyond_tolerance_resets(gap: float, reset: str) -> None:
    store, _ = store_with(ts_gap_tolerance_s=1.0)
    admit(store, "a", ts=100.0)
    admit(store, "a", ts=100.0 + gap)
    assert store.wave_resets.get("a", "") == reset


def test_without_ts_tolerance_timestamp_gaps_never_reset() -> None:
    store, _ = store_with(ts_gap_tolerance_s=None)
    admit(store, "a", ts=0.0)
    admit(store, "a", ts=1e6)
    assert store.wave_resets.get("a", "") == ""


def test_a_stream_admits_one_step_per_wave() -> None:
    store, _ = store_with()
    store.begin()
    assert isinstance(store.admit("a", 0, None, 1, 0.0), int)
    assert store.admit("a", 1, None, 1, 0.0) == REPEAT
    assert store.call_repeats == 1
    store.next_wave()
    assert isinstance(store.admit("a", 1, None, 1, 0.0), int)
    assert store.call_repeats == 0


# -- resets -------------------------------------------------------------------------------


_STEP = st.tuples(
    st.sampled_from(["a", "b", "c", "d", "e"]),  # more keys than max_streams: evictions
    st.one_of(st.none(), st.integers(0, 12)),  # seq
    st.one_of(st.none(), st.floats(0.0, 12.0)),  # ts
    st.integers(1, 3),  # rows
)


@settings(max_examples=200, deadline=None)
@given(calls=st.lists(st.tuples(st.lists(_STEP, min_size=1, max_size=6), st.floats(0, 30))))
def test_admit_many_decides_exactly_like_admit_one_by_one(
    calls: list[tuple[list[tuple[str, int | None, float | None, int]], float]],
) -> None:
    """The inlined plain case of admit_many must never drift from admit: same answers,
    same per-stream bookkeeping, same LRU order, same resets reported."""
    policy = {"max_streams": 4, "initial_capacity": 2, "idle_timeout_s": 5.0,
              "seq_gap_tolerance": 2, "ts_gap_tolerance_s": 3.0, "max_seq_jump": 5}  # fmt: skip
    one, one_resets = store_with(**policy)
    many, many_resets = store_with(**policy)
    many.plain_min = 2  # the array path for every call it can take
    now = 0.0
    for steps, dt in calls:
        now += dt
        keys, seqs, tss, lens = (list(c) for c in zip(*steps, strict=True))
        one.begin()
        want = [one.admit(k, q, t, n, now) for k, q, t, n in steps]
        many.begin()
        got = many.admit_many(keys, seqs, tss, lens, now)
        assert [a if isinstance(a, str) else int(a) for a in got] == want
        assert [s.key for s in many] == [s.key for s in one]  # LRU order
        fields = ("slot", "at", "mark", "last_seen", "last_seq", "next_seq", "last_ts")
        for a, b in zip(many, one, strict=True):
            assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
        assert (many.call_rejects, many.call_repeats, many.wave_resets) == (
            one.call_rejects, one.call_repeats, one.wave_resets)  # fmt: skip
    assert many_resets.counts == one_resets.counts


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.tuples(_STEP, st.floats(0, 4), st.sampled_from(["lend", "home", ""]))),
)
def test_a_stream_lent_twin_rows_is_admitted_exactly_like_one_at_home(
    steps: list[tuple[tuple[str, int | None, float | None, int], float, str]],
) -> None:
    """While lent twin rows a stream's numbers live in a list (the lone stream's fast
    path); decisions, numbers, LRU order and evictions must not notice."""
    policy = {"max_streams": 4, "initial_capacity": 2, "idle_timeout_s": 5.0,
              "seq_gap_tolerance": 1, "ts_gap_tolerance_s": 3.0, "max_seq_jump": 4}  # fmt: skip
    home, home_resets = store_with(**policy)
    lent, lent_resets = store_with(**policy)
    now = 0.0
    for (key, seq, ts, n), dt, move in steps:
        now += dt
        home.begin()
        lent.begin()
        assert lent.admit(key, seq, ts, n, now) == home.admit(key, seq, ts, n, now)
        assert lent.wave_resets == home.wave_resets
        st = lent.get(key)
        if move == "lend" and st is not None:
            lent.lend_twins(st)
        elif move == "home":
            lent.return_twins()
        fields = ("next_seq", "last_seq", "last_ts", "last_seen", "mark")
        for s in home:
            other = lent.get(s.key)
            assert other is not None
            assert [getattr(other, f) for f in fields] == [getattr(s, f) for f in fields]
        if move == "home":  # (iterating returns the loans, so only now and then)
            assert [s.key for s in lent] == [s.key for s in home]  # LRU order
    assert [s.key for s in lent] == [s.key for s in home]
    assert lent_resets.counts == home_resets.counts


def test_a_plain_call_is_admitted_as_one_array() -> None:
    """Known, distinct streams continuing without a reset: the array path, whose
    bookkeeping equals admit's; anything else falls back to admit, step by step."""
    one, _ = store_with(seq_gap_tolerance=1)
    many, _ = store_with(seq_gap_tolerance=1)
    many.plain_min = 3
    keys = ["a", "b", "c"]
    for store in (one, many):
        store.begin()
        assert store.admit_many(keys, [0, 5, 9], [None] * 3, None, 0.0) == [0, 1, 2]  # new
    one.begin()
    steps = zip(keys, [1, 7, 10], [2, 1, 3], strict=True)
    want = [one.admit(k, q, None, n, 1.0) for k, q, n in steps]
    many.begin()
    got = many.admit_many(keys, [1, 7, 10], [None] * 3, [2, 1, 3], 1.0)
    assert isinstance(got, np.ndarray) and got.tolist() == want
    for k in keys:
        a, b = stream(many, k), stream(one, k)
        assert (a.next_seq, a.last_seq, a.last_seen, a.mark) == (
            b.next_seq, b.last_seq, b.last_seen, b.mark)  # fmt: skip
    many.begin()  # a gap beyond the tolerance: admit decides, and plans the reset
    got = many.admit_many(keys, [3, 8, 15], [None] * 3, None, 2.0)
    assert isinstance(got, list) and many.wave_resets == {"c": RESET_SEQ_GAP}
    many.begin()  # fewer steps than plain_min: one by one, the same decisions
    assert many.admit_many(keys[:2], [4, 9], [None] * 2, None, 3.0) == [0, 1]


def test_the_array_path_refuses_what_admit_would_not_run_plainly() -> None:
    """admit_plain returns None, changing nothing, for each case admit treats specially."""
    store, _ = store_with(seq_gap_tolerance=1, ts_gap_tolerance_s=5.0)
    keys = ["a", "b"]
    store.begin()
    assert store.admit_many(keys, [None, None], [1.0, 1.0], None, 0.0) == [0, 1]
    cases = {
        "same ts again, no seq (a duplicate)": ([2.0, 1.0], None),
        "older ts, no seq": ([2.0, 0.5], None),
        "ts jump beyond the tolerance": ([2.0, 7.0], None),
        "a stream already admitted in this wave": ([2.0, 2.0], "a"),
    }
    for why, (tss, first) in cases.items():
        store.begin()
        if first:
            store.admit(first, None, 1.5, 1, 0.0)
        before = [(s.key, s.last_ts, s.mark, s.last_seen) for s in store]
        got = store.admit_plain(keys, None, np.array(tss), 1, 0.0)
        assert got is None, why
        if not first:
            assert [(s.key, s.last_ts, s.mark, s.last_seen) for s in store] == before, why
    store.begin()
    got = store.admit_plain(keys, None, np.array([2.0, 2.0]), 1, 0.0)
    assert got is not None and got.tolist() == [0, 1]


def test_explicit_reset_restores_the_initial_row_and_is_pending_once() -> None:
    store, resets = store_with()
    admit(store, "a", seq=0)
    st = stream(store, "a")
    store.write_state(st, np.full(16, 9.0, np.float32))
    assert store.reset("a", RESET_EXPLICIT, forget_sequence=True)
    assert not store.reset("nobody", RESET_EXPLICIT, forget_sequence=True)
    assert np.all(store.read_state(st) == 0.0)
    assert st.next_seq is None  # a new sequence may start anywhere
    assert store.pending_streams == 1
    assert store.take_pending(st) == (RESET_EXPLICIT,)
    assert store.take_pending(st) == () and store.pending_streams == 0
    assert resets.counts == {RESET_EXPLICIT: 1}


def test_reset_all_relays_rows_for_new_specs() -> None:
    store, resets = store_with()
    admit(store, "a")
    admit(store, "b")
    gru = recurrent_state("gru", 1, 8)
    assert store.reset_all(gru, RESET_MODEL_CHANGE) == 2
    assert store.layout.row_size == 8
    assert store.state_of("a")["h"].shape == (1, 8)
    assert store.get("b").pending == (RESET_MODEL_CHANGE,)  # type: ignore[union-attr]
    assert resets.counts == {RESET_MODEL_CHANGE: 2}


@pytest.mark.parametrize(
    "policy",
    [
        {"max_streams": 0},
        {"idle_timeout_s": 0.0},
        {"seq_gap_tolerance": -1},
        {"ts_gap_tolerance_s": -1.0},
        {"initial_capacity": 0},
        {"seq_gap_tolerance": 5, "max_seq_jump": 4},
    ],
)
def test_bad_policy_is_a_config_error(policy: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        StorePolicy(**policy)  # type: ignore[arg-type]


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
