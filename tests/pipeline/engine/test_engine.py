"""The streaming engine against the offline reference: batching, resets, checkpoints, hostility.

Every model is a real ONNX export run by onnxruntime; the reference for a stream is the
same model run once over the stream's whole sequence from the initial state.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.engine.engine import (
    REJECT_BAD_DTYPE,
    REJECT_REASONS,
    Engine,
    EngineSettings,
    Rejected,
    Result,
    Step,
)
from pipeline.engine.store.state import (
    REJECT_DUPLICATE,
    REJECT_OUT_OF_ORDER,
    RESET_ENGINE_ERROR,
    RESET_EVICTED,
    RESET_EXPLICIT,
    RESET_IDLE,
    RESET_MODEL_CHANGE,
    RESET_NON_FINITE,
    RESET_REASONS,
    RESET_SEQ_GAP,
    RESET_TS_GAP,
    TWINS,
)
from pipeline.errors import CheckpointError, ConfigError, ModelError
from pipeline.model import StepModel
from tests.pipeline.conftest import ATOL, TRIP, F, Recorder, data, only_output

if TYPE_CHECKING:
    from tests.pipeline.conftest import ModelFactory, Offline


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_alone(engine: Engine, step: Step) -> Result | Rejected:
    (out,) = engine.process([step])
    return out


# -- many streams, one session ----------------------------------------------------------


def interleaved_calls(
    rng: np.random.Generator, seqs: dict[str, np.ndarray], max_t: int, max_call: int
) -> list[list[Step]]:
    """Every stream cut into chunks of 1..max_t rows, arrivals shuffled across streams
    (each stream's chunks in order), then cut into calls of 1..max_call steps."""
    chunks: dict[str, list[Step]] = {}
    for key, values in seqs.items():
        pos, out = 0, []
        while pos < len(values):
            t = min(int(rng.integers(1, max_t + 1)), len(values) - pos)
            out.append(Step(key, values[pos : pos + t], seq=pos))
            pos += t
        chunks[key] = out[::-1]
    arrivals: list[Step] = []
    while chunks:
        key = list(chunks)[int(rng.integers(len(chunks)))]
        arrivals.append(chunks[key].pop())
        if not chunks[key]:
            del chunks[key]
    calls, i = [], 0
    while i < len(arrivals):
        k = int(rng.integers(1, max_call + 1))
        calls.append(arrivals[i : i + k])
        i += k
    return calls


@pytest.mark.parametrize("max_batch", [1024, 5])
def test_interleaved_streams_match_each_stream_run_alone_offline(
    any_model: StepModel, offline: Offline, max_batch: int
) -> None:
    rng = np.random.default_rng(7)
    seqs = {f"s{k}": data(rng, int(rng.integers(3, 30))) for k in range(20)}
    rec = Recorder()
    engine = Engine(any_model, EngineSettings(max_batch=max_batch), observer=rec)
    got: dict[str, list[np.ndarray]] = {k: [] for k in seqs}
    n_steps = 0
    for call in interleaved_calls(rng, seqs, max_t=4, max_call=25):
        results = engine.process(call)
        assert len(results) == len(call)
        for step, result in zip(call, results, strict=True):
            assert isinstance(result, Result) and result.step is step
            assert result.resets == ()
            out = only_output(result)
            assert out.shape[0] == step.values.shape[0]
            got[step.stream].append(out)
        n_steps += len(call)
    for key, values in seqs.items():
        (want,) = offline(any_model, values).values()
        np.testing.assert_allclose(np.concatenate(got[key]), want, atol=ATOL, rtol=0)
    assert sum(rec.batches) == n_steps and max(rec.batches) <= max_batch
    assert not rec.resets and not rec.rejects
    assert engine.streams == len(seqs)


def test_steps_of_many_streams_share_one_session_run(lstm_model: StepModel) -> None:
    rng = np.random.default_rng(0)
    rec = Recorder()
    engine = Engine(lstm_model, EngineSettings(), observer=rec)
    engine.process([Step(f"s{k}", data(rng, 1)) for k in range(50)])
    assert rec.batches == [50]


def test_chunks_of_different_length_and_repeated_streams_get_separate_runs(
    lstm_model: StepModel, offline: Offline
) -> None:
    rng = np.random.default_rng(1)
    a, b, c = data(rng, 3), data(rng, 3), data(rng, 2)
    rec = Recorder()
    engine = Engine(lstm_model, EngineSettings(), observer=rec)
    results = engine.process([Step("a", a[:2]), Step("b", b), Step("c", c), Step("a", a[2:])])
    # wave 1: {a, c} with T=2 and {b} with T=3; wave 2: a's second chunk.
    assert sorted(rec.batches) == [1, 1, 2] and len(rec.batches) == 3
    want_a = offline(lstm_model, a)["probs"]
    got_a = np.concatenate([only_output(results[0]), only_output(results[3])])
    np.testing.assert_allclose(got_a, want_a, atol=ATOL, rtol=0)
    np.testing.assert_allclose(only_output(results[1]), offline(lstm_model, b)["probs"], atol=ATOL)


def test_max_batch_splits_a_large_call(lstm_model: StepModel) -> None:
    rng = np.random.default_rng(2)
    rec = Recorder()
    engine = Engine(lstm_model, EngineSettings(max_batch=4), observer=rec)
    engine.process([Step(f"s{k}", data(rng, 1)) for k in range(10)])
    assert rec.batches == [4, 4, 2]


@pytest.mark.parametrize("capacity", [1, 1024], ids=["store-grows", "buffers-grow"])
def test_a_stream_stepping_alone_between_growing_batches_stays_exact(
    lstm_model: StepModel, offline: Offline, capacity: int
) -> None:
    """Single steps run in place on the store rows; batches that grow every buffer (and
    the store) in between must not leave them reading stale memory."""
    rng = np.random.default_rng(16)
    a = data(rng, 12)
    got = []
    engine = Engine(lstm_model, EngineSettings(initial_capacity=capacity))
    for round_, size in enumerate([2, 40, 300]):
        for t in range(4 * round_, 4 * round_ + 4):
            got.append(only_output(run_alone(engine, Step("a", a[t : t + 1], seq=t))))
        crowd = [Step(f"c{round_}-{k}", data(rng, 1)) for k in range(size)]
        assert all(isinstance(r, Result) for r in engine.process(crowd))
    np.testing.assert_allclose(np.concatenate(got), offline(lstm_model, a)["probs"], atol=ATOL)


def test_more_streams_stepping_alone_than_spare_rows_stay_exact(
    lstm_model: StepModel, offline: Offline
) -> None:
    """Each stream stepping alone twice in a row borrows a spare row; with more such
    streams than spare rows, loans are recalled (state moved home) and reused."""
    rng = np.random.default_rng(17)
    seqs = {f"s{k}": data(rng, 9) for k in range(TWINS + 4)}
    engine = Engine(lstm_model, EngineSettings())
    got: dict[str, list[np.ndarray]] = {k: [] for k in seqs}
    for r in range(3):
        for key, x in seqs.items():
            for t in (2 * r, 2 * r + 1):  # two single calls in a row
                got[key].append(only_output(run_alone(engine, Step(key, x[t : t + 1]))))
        t = 6 + r  # then everybody in one batch (read from wherever each state lives)
        batch = [Step(key, x[t : t + 1]) for key, x in seqs.items()]
        for step, res in zip(batch, engine.process(batch), strict=True):
            got[step.stream].append(only_output(res))
    order = [0, 1, 6, 2, 3, 7, 4, 5, 8]
    for key, x in seqs.items():
        want = offline(lstm_model, x[order])["probs"]
        np.testing.assert_allclose(np.concatenate(got[key]), want, atol=ATOL, rtol=0)


def test_engine_refuses_a_model_whose_outputs_contradict_its_metadata(
    random_model_path: ModelFactory, tmp_path: Path
) -> None:
    import onnx

    proto = onnx.load(str(random_model_path("gru", "forecast")))
    (entry,) = [e for e in proto.metadata_props if e.key == "seqstream"]
    doc = json.loads(entry.value)
    assert doc["horizon"] == 3
    doc["horizon"] = 2  # the graph still forecasts 3 steps
    entry.value = json.dumps(doc)
    path = tmp_path / "lying.onnx"
    onnx.save(proto, str(path))
    model = StepModel.load(path)
    with pytest.raises(ModelError, match="'forecast' has shape"):
        Engine(model, EngineSettings())


def test_empty_call_returns_nothing(lstm_model: StepModel) -> None:
    assert Engine(lstm_model, EngineSettings()).process([]) == []


def test_engine_runs_with_the_configured_provider_list(
    random_model_path: ModelFactory, offline: Offline
) -> None:
    """cuda first: used where onnxruntime has it, else one log line and CPU."""
    model = StepModel.load(random_model_path("gru", "forecast"), providers=("cuda", "cpu"))
    assert model.provider in ("CUDAExecutionProvider", "CPUExecutionProvider")
    rng = np.random.default_rng(3)
    seqs = {f"s{k}": data(rng, 6) for k in range(4)}
    engine = Engine(model, EngineSettings())
    got: dict[str, list[np.ndarray]] = {k: [] for k in seqs}
    for t in range(6):
        for step, r in zip(
            steps := [Step(k, v[t : t + 1]) for k, v in seqs.items()],
            engine.process(steps),
            strict=True,
        ):
            got[step.stream].append(only_output(r))
    cpu = StepModel.load(random_model_path("gru", "forecast"))
    for key, values in seqs.items():
        want = offline(cpu, values)["forecast"]
        np.testing.assert_allclose(np.concatenate(got[key]), want, atol=1e-4, rtol=0)


# -- bad input ----------------------------------------------------------------------------


def _bad_steps() -> list[tuple[str, Any]]:
    ok = np.zeros((1, F), np.float32)
    nan = ok.copy()
    nan[0, 2] = np.nan
    inf_chunk = np.zeros((3, F), np.float32)
    inf_chunk[1, 0] = -np.inf
    return [
        ("bad_rank", Step("victim", np.zeros(F, np.float32))),
        ("bad_rank", Step("victim", np.zeros((1, 1, F), np.float32))),
        ("bad_features", Step("victim", np.zeros((1, F + 1), np.float32))),
        ("bad_features", Step("victim", np.zeros((1, F - 1), np.float32))),
        ("bad_dtype", Step("victim", np.zeros((1, F), np.float64))),
        ("bad_dtype", Step("victim", np.zeros((1, F), np.int32))),
        ("non_finite", Step("victim", nan)),
        ("non_finite", Step("victim", inf_chunk)),
        ("empty", Step("victim", np.zeros((0, F), np.float32))),
        ("too_long", Step("victim", np.zeros((9, F), np.float32))),
        ("bad_type", Step("victim", [[0.0] * F])),  # type: ignore[arg-type]
        ("bad_type", Step("victim", np.ma.zeros((1, F), np.float32))),
        ("bad_seq", Step("victim", ok, seq=-1)),
        ("bad_seq", Step("victim", ok, seq=1.5)),  # type: ignore[arg-type]
        ("bad_seq", Step("victim", ok, seq=True)),
        ("bad_ts", Step("victim", ok, ts=float("nan"))),
        ("bad_ts", Step("victim", ok, ts="soon")),  # type: ignore[arg-type]
        ("bad_stream", Step("", ok)),
        ("bad_stream", Step(5, ok)),  # type: ignore[arg-type]
        ("bad_step", None),
        ("bad_step", {"stream": "victim", "values": ok}),
    ]


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "in-batch"])
@pytest.mark.parametrize(("reason", "bad"), _bad_steps())
def test_bad_input_is_rejected_before_any_state_is_touched(
    lstm_model: StepModel, offline: Offline, reason: str, bad: Any, alone: bool
) -> None:
    rng = np.random.default_rng(4)
    victim, other = data(rng, 3), data(rng, 2)
    rec = Recorder()
    engine = Engine(lstm_model, EngineSettings(max_chunk=8), observer=rec)
    first = engine.process([Step("victim", victim[:1], seq=0), Step("other", other[:1], seq=0)])
    assert all(isinstance(r, Result) for r in first)
    before = engine.store.state_of("victim")
    if alone:
        (rejected,) = engine.process([bad])
        for name, arr in before.items():
            np.testing.assert_array_equal(engine.store.state_of("victim")[name], arr)
        rest = engine.process([Step("victim", victim[1:], seq=1), Step("other", other[1:], seq=1)])
    else:
        rejected, *rest = engine.process(
            [bad, Step("victim", victim[1:], seq=1), Step("other", other[1:], seq=1)]
        )
    assert isinstance(rejected, Rejected) and rejected.reason == reason and rejected.detail
    assert reason in REJECT_REASONS
    assert rec.rejects == Counter({reason: 1}) and not rec.resets
    assert engine.streams == 2
    got_victim = np.concatenate([only_output(first[0]), only_output(rest[0])])
    got_other = np.concatenate([only_output(first[1]), only_output(rest[1])])
    np.testing.assert_allclose(got_victim, offline(lstm_model, victim)["probs"], atol=ATOL)
    np.testing.assert_allclose(got_other, offline(lstm_model, other)["probs"], atol=ATOL)


def test_one_row_steps_in_any_memory_layout_give_the_same_outputs(
    lstm_model: StepModel,
) -> None:
    """The fast staging of one-row steps (their bytes end to end) must not be fooled by
    strided, Fortran-ordered or byte-swapped arrays."""
    rng = np.random.default_rng(21)
    x = data(rng, 4)
    wide = np.zeros((1, 2 * F), np.float32)
    wide[0, ::2] = x[1]
    layouts = [
        x[0:1].copy(),
        wide[:, ::2],  # a strided view
        np.asfortranarray(x[2:3]),
        x[3:4].astype(">f4"),  # the right values in the wrong byte order
    ]
    plain = [Step(f"s{k}", x[k : k + 1].copy(), seq=0) for k in range(4)]
    mixed = [Step(f"s{k}", v, seq=0) for k, v in enumerate(layouts)]
    want = Engine(lstm_model, EngineSettings()).process(plain)
    got = Engine(lstm_model, EngineSettings()).process(mixed)
    for k in range(3):
        np.testing.assert_array_equal(only_output(got[k]), only_output(want[k]))
    assert isinstance(got[3], Rejected) and got[3].reason == REJECT_BAD_DTYPE


def test_float_timestamps_given_as_ints_are_accepted(lstm_model: StepModel) -> None:
    engine = Engine(lstm_model, EngineSettings())
    assert isinstance(run_alone(engine, Step("a", np.zeros((1, F), np.float32), ts=3)), Result)


# -- resets -------------------------------------------------------------------------------


def test_explicit_reset_starts_the_stream_again(lstm_model: StepModel, offline: Offline) -> None:
    rng = np.random.default_rng(5)
    x = data(rng, 4)
    rec = Recorder()
    engine = Engine(lstm_model, EngineSettings(), observer=rec)
    engine.process([Step("a", x[:2], seq=0)])
    assert engine.reset("a") and not engine.reset("nobody")
    r = run_alone(engine, Step("a", x[2:], seq=0))  # sequence numbers may restart too
    assert isinstance(r, Result) and r.resets == (RESET_EXPLICIT,)
    np.testing.assert_allclose(only_output(r), offline(lstm_model, x[2:])["probs"], atol=ATOL)
    assert rec.resets == Counter({RESET_EXPLICIT: 1})
    r2 = run_alone(engine, Step("a", x[:1], seq=2))
    assert isinstance(r2, Result) and r2.resets == ()


@pytest.mark.parametrize("alone", [True, False])
def test_idle_stream_is_reset_then_forgotten_by_tick(
    lstm_model: StepModel, offline: Offline, alone: bool
) -> None:
    rng = np.random.default_rng(6)
    x = data(rng, 3)
    clock, rec = Clock(), Recorder()
    engine = Engine(lstm_model, EngineSettings(idle_timeout_s=10.0), observer=rec, clock=clock)
    extra = [] if alone else [Step("other", x[:1])]
    engine.process([Step("a", x[:1]), *extra])
    clock.now = 10.0  # exactly the timeout: still the same stream
    r = engine.process([Step("a", x[1:2]), *extra])[0]
    assert isinstance(r, Result) and r.resets == ()
    np.testing.assert_allclose(only_output(r), offline(lstm_model, x[:2])["probs"][1:], atol=ATOL)
    clock.now = 20.5
    r = engine.process([Step("a", x[2:]), *extra])[0]
    assert isinstance(r, Result) and r.resets == (RESET_IDLE,)
    np.testing.assert_allclose(only_output(r), offline(lstm_model, x[2:])["probs"], atol=ATOL)
    n = len(extra) + 1  # "other" idled as long as "a"
    assert rec.resets == Counter({RESET_IDLE: n})
    assert engine.tick(now=30.0) == 0
    assert engine.tick(now=31.0) == n
    assert engine.streams == 0 and rec.resets == Counter({RESET_IDLE: 2 * n})


def test_sequence_gaps_within_tolerance_continue_beyond_reset(
    lstm_model: StepModel, offline: Offline
) -> None:
    rng = np.random.default_rng(8)
    x = data(rng, 5)
    rec = Recorder()
    engine = Engine(lstm_model, EngineSettings(seq_gap_tolerance=1), observer=rec)
    outs = [engine.process([Step("a", x[i : i + 1], seq=s)])[0] for i, s in enumerate([0, 1, 3])]
    assert all(isinstance(r, Result) and r.resets == () for r in outs)
    np.testing.assert_allclose(
        np.concatenate([only_output(r) for r in outs]),
        offline(lstm_model, x[:3])["probs"],
        atol=ATOL,
    )
    r = run_alone(engine, Step("a", x[3:], seq=6))  # 4 and 5 missing: beyond tolerance
    assert isinstance(r, Result) and r.resets == (RESET_SEQ_GAP,)
    np.testing.assert_allclose(only_output(r), offline(lstm_model, x[3:])["probs"], atol=ATOL)
    assert rec.resets == Counter({RESET_SEQ_GAP: 1})


def test_timestamp_gap_beyond_tolerance_resets(lstm_model: StepModel) -> None:
    rec = Recorder()
    engine = Engine(lstm_model, EngineSettings(ts_gap_tolerance_s=0.5), observer=rec)
    x = np.zeros((1, F), np.float32)
    resets = [
        run_alone(engine, Step("a", x, ts=ts)).resets  # type: ignore[union-attr]
        for ts in (0.0, 0.5, 0.9, 1.5)
    ]
    assert resets == [(), (), (), (RESET_TS_GAP,)]
    assert rec.resets == Counter({RESET_TS_GAP: 1})


@pytest.mark.parametrize("alone", [True, False])
def test_duplicates_are_ignored_and_older_steps_rejected(
    lstm_model: StepModel, offline: Offline, alone: bool
) -> None:
    rng = np.random.default_rng(9)
    x = data(rng, 4)
    rec = Recorder()
    engine = Engine(lstm_model, EngineSettings(), observer=rec)
    engine.process([Step("a", x[:2], seq=0)])
    engine.process([Step("a", x[2:3], seq=2)])
    bad = [Step("a", x[2:3], seq=2), Step("a", x[:1], seq=0)]
    out = [engine.process([b])[0] for b in bad] if alone else engine.process(bad)
    assert [r.reason for r in out] == [REJECT_DUPLICATE, REJECT_OUT_OF_ORDER]  # type: ignore[union-attr]
    r = run_alone(engine, Step("a", x[3:], seq=3))
    np.testing.assert_allclose(only_output(r), offline(lstm_model, x)["probs"][3:], atol=ATOL)
    assert rec.rejects == Counter({REJECT_DUPLICATE: 1, REJECT_OUT_OF_ORDER: 1})
    assert not rec.resets


def test_duplicate_inside_one_call_is_caught(lstm_model: StepModel) -> None:
    engine = Engine(lstm_model, EngineSettings())
    x = np.zeros((1, F), np.float32)
    out = engine.process([Step("a", x, seq=0), Step("a", x, seq=0), Step("a", x, seq=1)])
    assert [type(r).__name__ for r in out] == ["Result", "Rejected", "Result"]
    assert out[1].reason == REJECT_DUPLICATE  # type: ignore[union-attr]


def test_least_recently_used_stream_is_evicted(lstm_model: StepModel, offline: Offline) -> None:
    rng = np.random.default_rng(10)
    xs = {k: data(rng, 2) for k in "abc"}
    rec = Recorder()
    engine = Engine(lstm_model, EngineSettings(max_streams=2, initial_capacity=1), observer=rec)
    engine.process([Step("a", xs["a"][:1])])
    engine.process([Step("b", xs["b"][:1])])
    engine.process([Step("c", xs["c"][:1])])
    assert engine.streams == 2 and rec.resets == Counter({RESET_EVICTED: 1})
    r = run_alone(engine, Step("a", xs["a"][1:]))  # a starts over (and evicts b)
    np.testing.assert_allclose(only_output(r), offline(lstm_model, xs["a"][1:])["probs"], atol=ATOL)
    r = run_alone(engine, Step("c", xs["c"][1:]))  # c carried on
    np.testing.assert_allclose(only_output(r), offline(lstm_model, xs["c"])["probs"][1:], atol=ATOL)
    assert rec.resets == Counter({RESET_EVICTED: 2})


def test_capacity_rejects_when_one_call_holds_more_streams_than_allowed(
    lstm_model: StepModel,
) -> None:
    engine = Engine(lstm_model, EngineSettings(max_streams=2, initial_capacity=2))
    x = np.zeros((1, F), np.float32)
    out = engine.process([Step(k, x) for k in "abc"])
    assert [getattr(r, "reason", "ok") for r in out] == ["ok", "ok", "capacity"]


@pytest.mark.parametrize("alone", [True, False])
@pytest.mark.parametrize("check", [True, False])
def test_non_finite_state_is_reset(
    lstm_model: StepModel, offline: Offline, alone: bool, check: bool
) -> None:
    rng = np.random.default_rng(11)
    x = data(rng, 3)
    rec = Recorder()
    engine = Engine(lstm_model, EngineSettings(check_state=check), observer=rec)
    extra = [] if alone else [Step("other", x[:1])]
    engine.process([Step("a", x[:1]), *extra])
    st = engine.store.get("a")
    assert st is not None
    engine.store.write_state(st, np.full(engine.store.layout.row_size, np.nan, np.float32))
    r = engine.process([Step("a", x[1:2]), *extra])[0]
    assert isinstance(r, Result) and not np.isfinite(only_output(r)).all()
    r = engine.process([Step("a", x[2:]), *extra])[0]
    assert isinstance(r, Result)
    if check:
        assert r.resets == (RESET_NON_FINITE,)
        np.testing.assert_allclose(only_output(r), offline(lstm_model, x[2:])["probs"], atol=ATOL)
        assert rec.resets == Counter({RESET_NON_FINITE: 1})
    else:
        assert r.resets == () and not rec.resets


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "in-batch"])
def test_a_batch_onnxruntime_fails_on_is_refused_and_its_streams_start_again(
    failing_model: StepModel, offline: Offline, alone: bool
) -> None:
    rng = np.random.default_rng(2)
    x = {k: data(rng, 2) for k in ("a", "b", "c")}
    rec = Recorder()
    engine = Engine(failing_model, EngineSettings(), observer=rec)
    keys = ["a"] if alone else ["a", "b", "c"]
    engine.process([Step(k, x[k][:1], seq=0) for k in keys])
    bad = x["a"][1:].copy()
    bad[0, 0] = TRIP + 1
    failed = engine.process([Step("a", bad, seq=1), *(Step(k, x[k][1:], seq=1) for k in keys[1:])])
    assert [(r.reason, r.detail[:18]) for r in failed if isinstance(r, Rejected)] == [
        ("engine_error", "session.run failed")
    ] * len(keys)  # the whole session.run is lost, every stream in it
    assert rec.rejects == Counter({"engine_error": len(keys)})
    again = engine.process([Step(k, x[k][1:], seq=5) for k in keys])  # any seq: forgotten
    for k, r in zip(keys, again, strict=True):
        assert isinstance(r, Result) and r.resets == (RESET_ENGINE_ERROR,)
        want = offline(failing_model, x[k][1:])["probs"]  # from the initial state
        np.testing.assert_allclose(only_output(r), want, atol=ATOL, rtol=0)
    assert engine.process([Step("other", x["b"][:1])])[0].resets == ()  # engine lives on


def test_model_swap_keeps_compatible_state_and_resets_incompatible(
    random_model_path: ModelFactory, offline: Offline
) -> None:
    rng = np.random.default_rng(12)
    x = data(rng, 3)
    first = StepModel.load(random_model_path("lstm", "classify", seed=0))
    same_shape = StepModel.load(random_model_path("lstm", "classify", seed=1))
    other = StepModel.load(random_model_path("gru", "forecast"))
    rec = Recorder()
    engine = Engine(first, EngineSettings(), observer=rec)
    engine.process([Step("a", x[:1]), Step("b", x[:1])])
    carried = {k: v[:, None] for k, v in engine.store.state_of("a").items()}
    assert engine.swap_model(same_shape) is True and engine.model is same_shape
    r = run_alone(engine, Step("a", x[1:2]))
    assert isinstance(r, Result) and r.resets == ()
    want, _ = same_shape.run(x[None, 1:2], carried)
    np.testing.assert_allclose(only_output(r), want["probs"][0], atol=ATOL)
    assert engine.swap_model(other) is False
    out = engine.process([Step("a", x[2:]), Step("b", x[2:])])
    for r in out:
        assert isinstance(r, Result) and r.resets == (RESET_MODEL_CHANGE,)
        np.testing.assert_allclose(only_output(r), offline(other, x[2:])["forecast"], atol=ATOL)
    assert rec.resets == Counter({RESET_MODEL_CHANGE: 2})


def test_every_reset_reason_is_a_stable_word() -> None:
    assert len(set(RESET_REASONS)) == len(RESET_REASONS)
    assert all(r.replace("_", "").isalpha() and r.islower() for r in RESET_REASONS)
    assert len(set(REJECT_REASONS)) == len(REJECT_REASONS)


# -- checkpoint and restore ------------------------------------------------------------------


def test_restored_streams_continue_as_if_never_stopped(
    any_model: StepModel, offline: Offline, tmp_path: Path
) -> None:
    rng = np.random.default_rng(13)
    seqs = {f"s{k}": data(rng, 12) for k in range(6)}
    calls = interleaved_calls(rng, seqs, max_t=3, max_call=6)
    half = len(calls) // 2
    uninterrupted = Engine(any_model, EngineSettings())
    for call in calls[:half]:
        uninterrupted.process(call)
    path = tmp_path / "state.npz"
    assert uninterrupted.save(path) == uninterrupted.streams
    restored = Engine(any_model, EngineSettings())
    restored.process([Step("forgotten", np.zeros((1, F), np.float32))])
    assert restored.restore(path) == uninterrupted.streams
    assert restored.store.get("forgotten") is None
    for call in calls[half:]:
        a = uninterrupted.process(call)
        b = restored.process(call)
        for ra, rb in zip(a, b, strict=True):
            np.testing.assert_allclose(only_output(rb), only_output(ra), atol=1e-6, rtol=0)
    # The redelivery of an already-run step is still recognised after a restore.
    replay = calls[half - 1][-1]
    dup = restored.process([replay])[0]
    assert isinstance(dup, Rejected) and dup.reason in (REJECT_DUPLICATE, REJECT_OUT_OF_ORDER)
    for key in seqs:
        for name, arr in uninterrupted.store.state_of(key).items():
            np.testing.assert_allclose(restored.store.state_of(key)[name], arr, atol=1e-6)


def test_restore_refuses_a_checkpoint_of_another_state_shape(
    random_model_path: ModelFactory, tmp_path: Path
) -> None:
    lstm = StepModel.load(random_model_path("lstm", "classify"))
    gru = StepModel.load(random_model_path("gru", "classify"))
    engine = Engine(lstm, EngineSettings())
    engine.process([Step("a", np.zeros((1, F), np.float32))])
    engine.save(tmp_path / "s.npz")
    with pytest.raises(CheckpointError, match="signature"):
        Engine(gru, EngineSettings()).restore(tmp_path / "s.npz")


# -- hostile input ----------------------------------------------------------------------------

_VICTIMS = {
    f"v{k}": np.random.default_rng(100 + k).standard_normal((10, F)).astype(np.float32)
    for k in range(3)
}


def _full(shape: tuple[int, ...], fill: float, dtype: Any) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.full(shape, fill).astype(dtype)


_values = st.one_of(
    st.builds(
        lambda shape, dtype, fill: _full(shape, fill, dtype),
        st.lists(st.integers(0, 10), min_size=0, max_size=3).map(tuple)
        | st.integers(0, 10).map(lambda t: (t, F)),
        st.sampled_from([np.float32, np.float64, np.int32, np.float16, np.bool_]),
        st.sampled_from([0.0, 1.0, -1e30, 3e38, np.nan, np.inf, -np.inf]),
    ),
    st.builds(
        lambda t, seed: (
            np.random.default_rng(seed).standard_normal((t, F)).astype(np.float32) * 1e6
        ),
        st.integers(1, 4),
        st.integers(0, 1000),
    ),
    st.just([[0.0] * F]),
    st.none(),
    st.just("values"),
)
_hostile_step = st.one_of(
    st.builds(
        Step,
        stream=st.sampled_from(["h0", "h1", "", "h\x00", "h" * 300]) | st.integers(),
        values=_values,
        seq=st.none() | st.integers(-5, 2**70) | st.floats() | st.booleans(),
        ts=st.none() | st.floats(allow_nan=True) | st.integers(-5, 5) | st.text(max_size=2),
    ),
    st.none(),
    st.integers(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hostile=st.lists(_hostile_step, max_size=12),
    order=st.randoms(use_true_random=False),
    cuts=st.lists(st.integers(1, 8), min_size=1, max_size=20),
)
def test_hostile_input_never_raises_and_never_changes_other_streams(
    lstm_model: StepModel, hostile: list[Any], order: Any, cuts: list[int]
) -> None:
    engine = Engine(lstm_model, EngineSettings(max_chunk=8))
    arrivals: list[Any] = []
    victim_steps = {
        k: [Step(k, v[i : i + 1], seq=i) for i in range(len(v))][::-1] for k, v in _VICTIMS.items()
    }
    pool = list(hostile)
    while pool or any(victim_steps.values()):
        live = [k for k, s in victim_steps.items() if s]
        if pool and (not live or order.random() < 0.4):
            arrivals.append(pool.pop(order.randrange(len(pool))))
        else:
            arrivals.append(victim_steps[order.choice(live)].pop())
    got: dict[str, list[np.ndarray]] = {k: [] for k in _VICTIMS}
    i, c = 0, 0
    while i < len(arrivals):
        call = arrivals[i : i + cuts[c % len(cuts)]]
        i += len(call)
        c += 1
        results = engine.process(call)
        assert len(results) == len(call)
        for step, r in zip(call, results, strict=True):
            assert r.step is step
            if isinstance(step, Step) and isinstance(step.stream, str) and step.stream in got:
                assert isinstance(r, Result) and r.resets == ()
                got[step.stream].append(only_output(r))
    for key, values in _VICTIMS.items():
        want, _ = lstm_model.run(values[None], lstm_model.initial_state(1))
        np.testing.assert_allclose(np.concatenate(got[key]), want["probs"][0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_chunk": 0}, {"max_streams": 0}])
def test_engine_settings_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        EngineSettings(**kwargs)


# -- the benchmark command ------------------------------------------------------------------


def test_bench_prints_one_json_document_with_every_figure(
    random_model_path: ModelFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    path = random_model_path("lstm", "classify")
    code = main(
        [
            "bench",
            str(path),
            "--streams",
            "40",
            "--steps",
            "2",
            "--single-steps",
            "20",
            "--repeats",
            "1",
            "--max-batch",
            "16",
            "--no-torch",
        ]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    single = doc["single_stream"]
    for key in ("raw_session_run_us", "raw_iobinding_floor_us", "engine_us"):
        figures = single[key]
        assert figures["p99"] >= figures["median"] > 0 and figures["mean"] > 0
    (many,) = doc["streams"]
    assert many["streams"] == 40 and many["streams_held"] == many["arrays_streams_held"] == 40
    assert many["resets_and_rejections"] == 0
    assert many["engine_batch_sizes"] == {"8": 2, "16": 4}  # 40 = 16 + 16 + 8, 2 rounds
    for key in (
        "engine_us_per_step",
        "engine_arrays_us_per_step",
        "raw_batched_us_per_step",
        "naive_us_per_step",
    ):
        assert many[key]["median"] > 0
    assert many["engine_steps_per_s"] > 0 and many["naive_steps_per_s"] > 0
    assert doc["rss"]["streams"] == 40 and doc["rss"]["rss_mb"] > 0
    ratios = doc["ratios"]
    assert ratios["engine_over_raw_batched_40_streams"] == pytest.approx(
        many["raw_batched_us_per_step"]["median"] / many["engine_us_per_step"]["median"]
    )
    assert ratios["engine_arrays_over_raw_batched_40_streams"] == pytest.approx(
        many["raw_batched_us_per_step"]["median"] / many["engine_arrays_us_per_step"]["median"]
    )
    assert "single_stream_engine_over_raw <= 1.0" in doc["targets"]


@pytest.mark.parametrize("task", ["forecast", "anomaly", "seq2seq"])
def test_bench_measures_every_task_against_pytorch_eager(
    random_model_path: ModelFactory, task: str
) -> None:
    from models.bench import benchmark

    doc = benchmark(
        random_model_path("gru", task), streams=(12,), rounds=2, single_steps=30,
        max_batch=8, repeats=1, rss=False,
    )  # fmt: skip
    eager = doc["single_stream"]["torch_eager_us"]
    assert eager is not None and eager["median"] > 0
    assert doc["ratios"]["single_stream_torch_eager_over_engine"] > 0
    assert doc["streams"][0]["streams_held"] == 12


def test_bench_rejects_bad_arguments(
    random_model_path: ModelFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", str(random_model_path()), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
