"""The engine's worker thread: batching producers, overflow policies, ordering, failures."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from pipeline.engine.engine import Engine, EngineSettings, Rejected, Result, Step
from pipeline.engine.store.state import RESET_DROPPED, RESET_EXPLICIT
from pipeline.engine.worker import Worker
from pipeline.errors import ConfigError
from pipeline.model import StepModel
from tests.pipeline.conftest import ATOL, F, Offline, Recorder, data, only_output


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[Result | Rejected]] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.expect = 0

    def __call__(self, results: Sequence[Result | Rejected]) -> None:
        with self.lock:
            self.batches.append(list(results))
            if sum(map(len, self.batches)) >= self.expect:
                self.done.set()

    @property
    def results(self) -> list[Result | Rejected]:
        return [r for b in self.batches for r in b]


def test_worker_batches_two_producers_in_per_stream_order(
    lstm_model: StepModel, offline: Offline
) -> None:
    rng = np.random.default_rng(14)
    seqs = {f"s{k}": data(rng, 30) for k in range(8)}
    sink = Sink()
    sink.expect = 8 * 30
    worker = Worker(Engine(lstm_model, EngineSettings()), sink, max_batch=16, max_wait_ms=1.0)
    worker.start()

    def produce(keys: list[str]) -> None:
        for t in range(30):
            for key in keys:
                assert worker.submit(Step(key, seqs[key][t : t + 1], seq=t))

    threads = [threading.Thread(target=produce, args=(list(seqs)[k::2],)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sink.done.wait(30)
    assert worker.stop(drain=True)
    assert max(len(b) for b in sink.batches) <= 16
    got: dict[str, list[np.ndarray]] = {k: [] for k in seqs}
    for r in sink.results:
        got[r.step.stream].append(only_output(r))
    for key, values in seqs.items():
        np.testing.assert_allclose(
            np.concatenate(got[key]), offline(lstm_model, values)["probs"], atol=ATOL
        )
    assert worker.depth == 0


def test_a_step_alone_runs_on_the_producers_thread_before_submit_returns(
    lstm_model: StepModel, offline: Offline
) -> None:
    x = data(np.random.default_rng(3), 5)
    threads: list[str] = []
    sink = Sink()

    def record(results: Sequence[Result | Rejected]) -> None:
        threads.append(threading.current_thread().name)
        sink(results)

    worker = Worker(Engine(lstm_model, EngineSettings()), record)
    worker.start()
    asked = 0

    def alone() -> bool:
        nonlocal asked
        asked += 1
        return True

    for t in range(5):
        started = time.monotonic()
        assert worker.submit(Step("a", x[t : t + 1], seq=t), alone=alone)
        assert len(sink.results) == t + 1  # published before submit returned
        # the next message comes after a rest as long as this one's run (a moderate rate)
        time.sleep(time.monotonic() - started)
    assert threads == [threading.current_thread().name] * 5 and asked == 5
    assert worker.depth == 0 and worker.stop()
    got = np.concatenate([only_output(r) for r in sink.results])
    np.testing.assert_allclose(got, offline(lstm_model, x)["probs"], atol=ATOL)


def test_a_step_alone_queues_while_the_engine_is_busier_than_idle(
    lstm_model: StepModel,
) -> None:
    """A step right after a run longer than the rest since goes to the worker's batches:
    at such a rate one batch costs less than the steps run one by one."""
    threads: list[str] = []
    sink = Sink()
    sink.expect = 2

    def slow(results: Sequence[Result | Rejected]) -> None:
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            time.sleep(0.5)  # an engine run far longer than the gap to the next message
        sink(results)

    worker = Worker(Engine(lstm_model, EngineSettings()), slow)
    worker.start()
    x = data(np.random.default_rng(5), 2)
    assert worker.submit(Step("a", x[:1], seq=0), alone=lambda: True)
    assert worker.submit(Step("a", x[1:], seq=1), alone=lambda: True)
    assert sink.done.wait(10) and worker.stop()
    assert threads == [threading.current_thread().name, "seqstream-engine"]


def test_steps_alone_and_queued_keep_each_streams_order(
    lstm_model: StepModel, offline: Offline
) -> None:
    """Two producers, one claiming every step alone, one never: each stream's steps run
    in order and exactly once, on whichever thread, and the worker's own batches and
    the producer's steps never run the engine at the same time."""
    rng = np.random.default_rng(15)
    seqs = {f"s{k}": data(rng, 40) for k in range(6)}
    sink = Sink()
    sink.expect = 6 * 40
    running = threading.Lock()  # held while the engine runs: a second holder would fail
    overlaps = 0

    def exclusive(results: Sequence[Result | Rejected]) -> None:
        nonlocal overlaps
        if not running.acquire(blocking=False):
            overlaps += 1
            return
        try:
            time.sleep(0.0002)  # widen the window a concurrent run would hit
            sink(results)
        finally:
            running.release()

    worker = Worker(Engine(lstm_model, EngineSettings()), exclusive, max_batch=8)
    worker.start()

    def produce(keys: list[str], alone: bool) -> None:
        for t in range(40):
            for key in keys:
                step = Step(key, seqs[key][t : t + 1], seq=t)
                assert worker.submit(step, alone=(lambda: True) if alone else None)

    threads = [threading.Thread(target=produce, args=(list(seqs)[k::2], k == 0)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sink.done.wait(30)
    assert worker.stop(drain=True)
    assert overlaps == 0
    assert not any(isinstance(r, Rejected) for r in sink.results)
    got: dict[str, list[np.ndarray]] = {k: [] for k in seqs}
    for r in sink.results:
        got[r.step.stream].append(only_output(r))
    for key, values in seqs.items():
        np.testing.assert_allclose(
            np.concatenate(got[key]), offline(lstm_model, values)["probs"], atol=ATOL
        )


def test_stop_waits_for_a_step_running_alone(lstm_model: StepModel) -> None:
    entered, release = threading.Event(), threading.Event()
    done: list[int] = []

    def slow(results: Sequence[Result | Rejected]) -> None:
        entered.set()
        assert release.wait(10)
        done.append(len(results))

    worker = Worker(Engine(lstm_model, EngineSettings()), slow)
    worker.start()
    x = data(np.random.default_rng(4), 1)
    producer = threading.Thread(
        target=worker.submit, args=(Step("a", x),), kwargs={"alone": lambda: True}
    )
    producer.start()
    assert entered.wait(10)
    # the worker cannot end (nor run anything) while the producer holds the engine
    calls = worker.call(lambda e: e.streams)
    assert not worker.stop(timeout=0.2) and not calls.done()
    release.set()
    producer.join(10)
    assert worker.stop(timeout=10) and done == [1]
    assert calls.result(0) == 1


def test_worker_drop_overflow_resets_the_stream_before_its_next_step(
    lstm_model: StepModel, offline: Offline
) -> None:
    rng = np.random.default_rng(15)
    x = data(rng, 4)
    rec = Recorder()
    sink = Sink()
    sink.expect = 3
    worker = Worker(
        Engine(lstm_model, EngineSettings(), observer=rec), sink, max_queue=2, overflow="drop"
    )
    assert worker.submit(Step("a", x[0:1], seq=0))
    assert worker.submit(Step("a", x[1:2], seq=1))
    assert not worker.submit(Step("a", x[2:3], seq=2))  # queue full: dropped
    assert worker.dropped == 1 and worker.depth == 2
    worker.start()
    worker.call(lambda engine: None).result(timeout=10)  # the queue has drained
    assert worker.submit(Step("a", x[3:4], seq=3))
    assert sink.done.wait(10)
    worker.stop()
    out = sink.results
    assert [r.resets for r in out] == [(), (), (RESET_DROPPED,)]  # type: ignore[union-attr]
    np.testing.assert_allclose(only_output(out[2]), offline(lstm_model, x[3:])["probs"], atol=ATOL)
    assert rec.resets == Counter({RESET_DROPPED: 1})


def test_worker_block_overflow_waits_for_room(lstm_model: StepModel) -> None:
    sink = Sink()
    sink.expect = 3
    worker = Worker(Engine(lstm_model, EngineSettings()), sink, max_queue=1, overflow="block")
    x = np.zeros((1, F), np.float32)
    assert worker.submit(Step("a", x))
    started = time.monotonic()
    assert not worker.submit(Step("b", x), timeout=0.05)  # nobody drains yet
    assert time.monotonic() - started >= 0.04
    worker.start()
    assert worker.submit(Step("b", x), timeout=5)
    assert worker.submit(Step("c", x), timeout=5)
    assert sink.done.wait(10)
    assert worker.stop()


def test_worker_reset_and_calls_are_ordered_with_steps(lstm_model: StepModel) -> None:
    sink = Sink()
    sink.expect = 3
    worker = Worker(Engine(lstm_model, EngineSettings()), sink)
    x = np.zeros((1, F), np.float32)
    worker.submit(Step("a", x, seq=0))
    worker.submit(Step("a", x, seq=1))
    worker.submit_reset("a")
    worker.submit(Step("a", x, seq=0))
    streams = worker.call(lambda engine: engine.streams)
    worker.start()
    assert streams.result(timeout=10) == 1
    assert sink.done.wait(10)
    assert worker.stop()
    assert [r.resets for r in sink.results] == [(), (), (RESET_EXPLICIT,)]  # type: ignore[union-attr]
    assert not worker.submit(Step("a", x, seq=1))  # stopped


def test_worker_stop_without_drain_discards_the_queue(lstm_model: StepModel) -> None:
    sink = Sink()
    worker = Worker(Engine(lstm_model, EngineSettings()), sink)
    for k in range(5):
        worker.submit(Step("a", np.zeros((1, F), np.float32), seq=k))
    pending = worker.call(lambda engine: engine.streams)
    assert worker.stop(drain=False)
    assert pending.cancelled() and worker.depth == 0 and sink.results == []


def test_worker_survives_a_failing_sink(lstm_model: StepModel) -> None:
    calls: list[int] = []

    def sink(results: Sequence[Result | Rejected]) -> None:
        calls.append(len(results))
        raise RuntimeError("sink down")

    worker = Worker(Engine(lstm_model, EngineSettings()), sink, max_wait_ms=0)
    worker.start()
    x = np.zeros((1, F), np.float32)
    worker.submit(Step("a", x, seq=0))
    assert worker.call(lambda e: e.streams).result(timeout=10) == 1
    worker.submit(Step("a", x, seq=1))
    assert worker.call(lambda e: e.streams).result(timeout=10) == 1
    assert worker.stop() and sum(calls) == 2


@pytest.mark.parametrize(
    "kwargs", [{"max_queue": 0}, {"max_batch": 0}, {"max_wait_ms": -1}, {"overflow": "spill"}]
)
def test_worker_settings_are_checked(lstm_model: StepModel, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Worker(Engine(lstm_model, EngineSettings()), lambda r: None, **kwargs)
