"""The per-stream state store: layout and slots, twins, eviction, idleness, resets."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.contract import StateSpec, recurrent_state
from pipeline.engine.store.state import (
    REJECT_CAPACITY,
    RESET_EVICTED,
    RESET_EXPLICIT,
    RESET_IDLE,
    RESET_MODEL_CHANGE,
    TWINS,
    Layout,
    StateStore,
    StorePolicy,
)
from pipeline.errors import ConfigError
from tests.pipeline.engine.store.conftest import admit, store_with, stream

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


# -- resets -------------------------------------------------------------------------------


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
