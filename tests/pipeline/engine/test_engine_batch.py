"""Engine.process_batch: steps of many streams as arrays, judged exactly as Engine.process
judges the same steps one by one (its plain case skips the per-step objects)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.engine.engine import (
    REJECT_BAD_DTYPE,
    REJECT_BAD_SEQ,
    REJECT_NON_FINITE,
    Engine,
    EngineSettings,
    Rejected,
    Result,
    StepBatch,
)
from pipeline.engine.store.state import (
    REJECT_DUPLICATE,
    RESET_ENGINE_ERROR,
    RESET_EXPLICIT,
    RESET_SEQ_GAP,
)
from pipeline.model import StepModel
from tests.pipeline.conftest import ATOL, TRIP, F, Recorder

if TYPE_CHECKING:
    from tests.pipeline.conftest import Offline


def _rows(batch: StepBatch, name: str, got: Any) -> dict[int, np.ndarray]:
    return {i: got.outputs[name][i] for i in range(len(batch)) if i not in got.rejected}


@pytest.mark.parametrize("max_batch", [1024, 5])
def test_interleaved_batches_match_each_stream_run_alone_offline(
    any_model: StepModel, offline: Offline, max_batch: int
) -> None:
    rng = np.random.default_rng(3)
    n, rounds = 12, 9
    values = {f"s{k}": rng.standard_normal((3 * rounds, F)).astype(np.float32) for k in range(n)}
    keys = list(values)
    pos = dict.fromkeys(keys, 0)
    got: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    rec = Recorder()
    engine = Engine(any_model, EngineSettings(max_batch=max_batch), observer=rec)
    (name,) = any_model.spec.outputs
    for _ in range(rounds):
        t = int(rng.integers(1, 4))  # one chunk length per batch
        chosen = [keys[k] for k in rng.permutation(n)[: int(rng.integers(2, n + 1))]]
        batch = StepBatch(
            chosen,
            np.stack([values[k][pos[k] : pos[k] + t] for k in chosen]),
            np.array([pos[k] for k in chosen]),
        )
        done = engine.process_batch(batch)
        assert not done.rejected and not done.resets
        for i, k in enumerate(chosen):
            got[k].append(done.outputs[name][i])
            pos[k] += t
    for k in keys:
        if pos[k]:
            (want,) = offline(any_model, values[k][: pos[k]]).values()
            np.testing.assert_allclose(np.concatenate(got[k]), want, atol=ATOL, rtol=0)
    assert max(rec.batches) <= max_batch and not rec.rejects and not rec.resets


_KEYS = ["a", "b", "c", "d", "e"]
_step_plan = st.tuples(
    st.sampled_from(_KEYS),
    st.sampled_from(["next"] * 12 + ["repeat", "gap", "old"]),
    st.integers(0, 19).map(lambda k: k == 0),  # a NaN in the values, now and then
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rounds=st.lists(
        st.tuples(
            st.lists(_step_plan, min_size=2, max_size=5, unique_by=lambda p: p[0]),
            st.integers(0, 3).flatmap(  # now and then, steps of streams already in the batch
                lambda k: st.lists(_step_plan, min_size=1, max_size=2) if k == 0 else st.just([])
            ),
            st.sampled_from(["float32"] * 6 + ["float64"]),
            st.integers(1, 3),  # rows per step
            st.sampled_from(["array"] * 4 + ["list", "none"]),  # how seqs are given
            st.sampled_from([None] * 6 + _KEYS),  # reset this stream before the round
            st.sampled_from([None] * 6 + _KEYS),  # ... or turn its carried state to NaN
        ),
        min_size=1,
        max_size=10,
    ),
    seed=st.integers(0, 2**16),
)
def test_a_batch_is_judged_exactly_as_the_same_steps_in_one_process_call(
    lstm_model: StepModel, rounds: list[Any], seed: int
) -> None:
    """Same outputs, rejections (by reason), resets and final state, whatever the mix:
    repeated streams, duplicates, gaps, older steps, NaN, a wrong dtype, no seqs."""
    rng = np.random.default_rng(seed)
    cfg = EngineSettings(max_batch=3, seq_gap_tolerance=1)
    arrays, steps = Engine(lstm_model, cfg), Engine(lstm_model, cfg)
    nxt = dict.fromkeys(_KEYS, 0)
    for distinct, more, dtype, t, seq_kind, reset, poison in rounds:
        plan = distinct + more
        if reset:
            assert arrays.reset(reset) == steps.reset(reset)
        if poison and poison in steps.store:
            for engine in (arrays, steps):
                nan = np.full(engine.store.layout.row_size, np.nan, np.float32)
                engine.store.write_state(engine.store.get(poison), nan)  # type: ignore[arg-type]
        keys, seqs = [], []
        vals = rng.standard_normal((len(plan), t, F)).astype(dtype)
        for i, (key, kind, nan) in enumerate(plan):
            seq = {"next": nxt[key], "repeat": max(0, nxt[key] - t), "gap": nxt[key] + 3}.get(
                kind, max(0, nxt[key] - 2 * t)
            )
            nxt[key] = max(nxt[key], seq + t)
            keys.append(key)
            seqs.append(seq)
            if nan:
                vals[i, -1, 0] = np.nan
        given_seqs = {"array": np.array(seqs), "list": seqs, "none": None}[seq_kind]
        batch = StepBatch(keys, vals, given_seqs)
        done = arrays.process_batch(batch)
        want = steps.process([batch.step(i) for i in range(len(batch))])
        assert {i: r.reason for i, r in done.rejected.items()} == {
            i: r.reason for i, r in enumerate(want) if isinstance(r, Rejected)
        }
        assert done.resets == {
            i: r.resets for i, r in enumerate(want) if isinstance(r, Result) and r.resets
        }
        for i, r in enumerate(want):
            if isinstance(r, Result):
                np.testing.assert_allclose(
                    done.outputs["probs"][i], r.output("probs"), atol=1e-6, equal_nan=True
                )
            else:
                assert np.isnan(done.outputs["probs"][i]).all()
    assert {s.key for s in arrays.store} == {s.key for s in steps.store}
    for s in steps.store:
        a, b = arrays.store.state_of(s.key), steps.store.state_of(s.key)
        for name in b:
            np.testing.assert_allclose(a[name], b[name], atol=1e-6)


def test_plain_batch_reports_resets_and_refusals_like_process(lstm_model: StepModel) -> None:
    rng = np.random.default_rng(0)
    engine = Engine(lstm_model, EngineSettings())
    keys = ["x", "y", "z"]

    def batch(seqs: list[int], dtype: Any = np.float32) -> StepBatch:
        return StepBatch(keys, rng.standard_normal((3, 1, F)).astype(dtype), np.array(seqs))

    assert not engine.process_batch(batch([0, 0, 0])).rejected
    engine.reset("x")
    engine.reset("y")
    done = engine.process_batch(batch([1, 1, 1]))  # plain: the explicit resets come along
    assert done.resets == {0: (RESET_EXPLICIT,), 1: (RESET_EXPLICIT,)} and not done.rejected
    done = engine.process_batch(batch([2, 1, 5]))  # y repeats, z skips ahead
    assert {i: r.reason for i, r in done.rejected.items()} == {1: REJECT_DUPLICATE}
    assert done.resets == {2: (RESET_SEQ_GAP,)}
    assert np.isnan(done.outputs["probs"][1]).all()
    assert np.isfinite(done.outputs["probs"][[0, 2]]).all()
    done = engine.process_batch(batch([3, 2, 6], np.float64))
    assert {r.reason for r in done.rejected.values()} == {REJECT_BAD_DTYPE}
    bad = batch([3, 2, 6])
    bad.values[0, 0, 0] = np.inf
    done = engine.process_batch(bad)
    assert {i: r.reason for i, r in done.rejected.items()} == {0: REJECT_NON_FINITE}
    done = engine.process_batch(batch([2**62, 3, 7]))  # seq beyond the bound
    assert {i: r.reason for i, r in done.rejected.items()} == {0: REJECT_BAD_SEQ}
    view = done.results(bad)
    assert isinstance(view[0], Rejected) and isinstance(view[1], Result)
    assert view[1].step.stream == "y" and view[1].step.seq == 2
    np.testing.assert_array_equal(view[2].output("probs"), done.outputs["probs"][2])


def test_a_batch_whose_arrays_disagree_in_length_is_a_programming_error() -> None:
    values = np.zeros((2, 1, F), dtype=np.float32)
    with pytest.raises(ValueError, match="values has 2 entries for 3 streams"):
        StepBatch(["a", "b", "c"], values)
    with pytest.raises(ValueError, match="seqs has 1 entries"):
        StepBatch(["a", "b"], values, np.array([0]))
    with pytest.raises(TypeError, match="numpy array"):
        StepBatch(["a", "b"], [[1.0], [2.0]])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("streams", "values", "seqs", "ts", "reasons"),
    [
        (["v", 7], np.zeros((2, 1, F), np.float32), None, None, {1: "bad_stream"}),
        (["v", ""], np.zeros((2, 1, F), np.float32), None, None, {1: "bad_stream"}),
        (["v", "w"], np.zeros((2, 1, F), object), None, None, {0: "bad_dtype", 1: "bad_dtype"}),
        (["v", "w"], np.zeros((2, F), np.float32), None, None, {0: "bad_rank", 1: "bad_rank"}),
        (["v", "w"], np.zeros((2, 0, F), np.float32), None, None, {0: "empty", 1: "empty"}),
        (
            ["v", "w"],
            np.zeros((2, 1, F + 1), np.float32),
            None,
            None,
            {0: "bad_features", 1: "bad_features"},
        ),
        (
            ["v", "w"],
            np.zeros((2, 1, F), np.float32),
            np.array([0.0, 1.5]),
            None,
            {0: "bad_seq", 1: "bad_seq"},
        ),
        (["v", "w"], np.zeros((2, 1, F), np.float32), np.array([-1, 0]), None, {0: "bad_seq"}),
        (["v", "w"], np.zeros((2, 1, F), np.float32), None, np.array([np.nan, 1.0]), {0: "bad_ts"}),
    ],
)
def test_hostile_batches_are_refused_per_step_and_leave_other_streams_alone(
    lstm_model: StepModel, streams: list[Any], values: np.ndarray, seqs: Any, ts: Any,
    reasons: dict[int, str],
) -> None:  # fmt: skip
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, F)).astype(np.float32)
    engine = Engine(lstm_model, EngineSettings())
    first = engine.process_batch(StepBatch(["victim", "other"], x[:1, None].repeat(2, 0)))
    hostile = engine.process_batch(StepBatch(streams, values, seqs, ts))
    assert {i: r.reason for i, r in hostile.rejected.items()} == reasons
    last = engine.process_batch(StepBatch(["victim", "other"], x[1:, None].repeat(2, 0)))
    want, _ = lstm_model.run(x[None], lstm_model.initial_state(1))
    got = np.concatenate([first.outputs["probs"][0], last.outputs["probs"][0]])
    np.testing.assert_allclose(got, want["probs"][0], atol=ATOL, rtol=0)


def test_a_plain_batch_onnxruntime_fails_on_is_refused_and_its_streams_start_again(
    failing_model: StepModel, offline: Offline
) -> None:
    rng = np.random.default_rng(4)
    keys = ["a", "b", "c"]
    x = rng.standard_normal((3, 2, F)).astype(np.float32)
    engine = Engine(failing_model, EngineSettings(max_batch=2))  # two session.runs
    assert not engine.process_batch(StepBatch(keys, x[:, :1], np.zeros(3, np.int64))).rejected
    bad = x[:, 1:].copy()
    bad[2, 0, 0] = TRIP + 1  # the second run (stream c alone) fails
    done = engine.process_batch(StepBatch(keys, bad, np.ones(3, np.int64)))
    assert {i: r.reason for i, r in done.rejected.items()} == {2: "engine_error"}
    assert np.isnan(done.outputs["probs"][2]).all()
    assert np.isfinite(done.outputs["probs"][:2]).all()
    again = engine.process_batch(StepBatch(["c"], x[2:, 1:], np.array([9])))
    assert again.resets == {0: (RESET_ENGINE_ERROR,)}
    want = offline(failing_model, x[2, 1:])["probs"]  # from the initial state
    np.testing.assert_allclose(again.outputs["probs"][0], want, atol=ATOL, rtol=0)
