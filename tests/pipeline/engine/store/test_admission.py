"""Admission: sequence numbers, timestamps, waves, and the array path deciding alike."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.engine.store.state import (
    REJECT_DUPLICATE,
    REJECT_OUT_OF_ORDER,
    REJECT_SEQ_JUMP,
    REPEAT,
    RESET_EXPLICIT,
    RESET_IDLE,
    RESET_SEQ_GAP,
    RESET_TS_GAP,
)
from tests.pipeline.engine.store.conftest import admit, store_with, stream

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
