"""A slot's numbers by name: the columns, the lent list and a stream's view agree."""

from __future__ import annotations

import math

from pipeline.engine.store.slots import (
    FREE_USE,
    LAST_SEEN,
    LAST_SEQ,
    LAST_TS,
    LENT_SEEN,
    LENT_TS,
    MARK,
    NEXT_SEQ,
    NO_SEQ,
    STAMP,
    SlotNumbers,
)
from tests.pipeline.engine.store.conftest import admit, store_with, stream


def test_an_admission_writes_the_named_columns_a_stream_reads() -> None:
    store, _ = store_with()
    admit(store, "a", seq=5, ts=1.0, n=2, now=3.0)
    st = stream(store, "a")
    cols = store.numbers
    assert cols.ints[st.slot, NEXT_SEQ] == st.next_seq == 7
    assert cols.ints[st.slot, LAST_SEQ] == st.last_seq == 5
    assert cols.ints[st.slot, MARK] == st.mark == store.mark
    assert cols.floats[st.slot, LAST_TS] == st.last_ts == 1.0
    assert cols.floats[st.slot, LAST_SEEN] == st.last_seen == 3.0
    assert st.numbers() == cols.read(st.slot)


def test_lent_numbers_keep_the_column_order_and_go_home_unchanged() -> None:
    store, _ = store_with()
    admit(store, "a", seq=5, ts=1.0, now=3.0)
    st = stream(store, "a")
    home = store.numbers.read(st.slot)
    store.lend_twins(st)
    assert st.nums == home
    assert (st.nums[LENT_TS], st.nums[LENT_SEEN]) == (1.0, 3.0)
    admit(store, "a", seq=6, ts=2.0, now=4.0)  # decided on the lent list
    assert store.numbers.read(st.slot) == home  # the columns wait
    store.return_twins()
    assert st.nums is None
    assert store.numbers.read(st.slot)[NEXT_SEQ] == st.next_seq == 7
    assert (st.last_ts, st.last_seen) == (2.0, 4.0)


def test_resize_keeps_numbers_and_frees_new_slots() -> None:
    cols = SlotNumbers()
    cols.resize(2)
    cols.occupy(1, now=5.0)
    cols.set_sequence(1, 10, 9, 0.5)
    cols.resize(4)
    assert cols.read(1)[:2] == [10, 9] and cols.read(1)[4:] == [0.5, 5.0]
    for slot in (2, 3):
        nums = cols.read(slot)
        assert nums[NEXT_SEQ] == nums[LAST_SEQ] == NO_SEQ and nums[STAMP] == FREE_USE
        assert math.isnan(nums[LENT_TS]) and nums[LENT_SEEN] == math.inf
    cols.release(1)
    assert cols.read(1)[STAMP] == FREE_USE and cols.read(1)[MARK] == -1
