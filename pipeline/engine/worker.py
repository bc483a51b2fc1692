"""The engine's thread: a bounded queue in front of :meth:`Engine.process`.

Producers (the MQTT network thread, the audio callback) :meth:`Worker.submit` steps;
one thread takes them in batches, runs them and hands the results to the sink. One
thread at a time touches the engine once started: the worker's, or a producer's that
runs its step itself while the worker is idle (``alone``, below).

Why a producer may run its step itself: at a moderate rate each message arrives to an
empty queue, and handing it to the worker costs two thread wake-ups per message (the
worker's, then paho's network thread's to write the prediction), each a trip through
the scheduler and the GIL. On a busy machine those wake-ups are the daemon's latency
tail (``benchmarks/mqtt_latency_trace.py``). A step that is the only input waiting
runs on the producer's thread instead, as a bare relay would, unless the engine ran
longer than it has rested since (busy over half the time: then one batch is cheaper than
the steps run one by one, ``cpu_us_per_message`` of ``mqtt_throughput.py --hot-path``).
As soon as input piles up, steps queue and the worker runs them in batches, as before.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Literal, TypeVar

from pipeline.engine.engine import Engine, Rejected, Result, Step
from pipeline.engine.store.state import RESET_DROPPED, RESET_EXPLICIT
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

Overflow = Literal["block", "drop"]
Sink = Callable[[Sequence[Result | Rejected]], None]


class _Call:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[Engine], Any], future: Future[Any]) -> None:
        self.fn = fn
        self.future = future


# A queue item: a step, ("reset", stream, reason), or a call to run on the worker.
_Item = Step | tuple[str, str, str] | _Call


class Worker:
    """One thread: bounded queue -> :meth:`Engine.process` in batches -> ``sink``.

    Only this thread touches the engine once started (or a producer whose step runs
    alone, while this thread waits); use :meth:`call` to checkpoint, swap models or read
    anything from the engine. ``overflow="drop"`` refuses steps
    when the queue is full: :meth:`submit` returns False, and the stream is reset
    (reason ``dropped``) where the lost step would have run, since its carried state
    skipped a step. ``overflow="block"`` makes the producer wait (up to its timeout;
    a step that times out is dropped the same way).
    """

    def __init__(
        self,
        engine: Engine,
        sink: Sink,
        *,
        max_queue: int = 10_000,
        max_batch: int = 256,
        max_wait_ms: float = 1.0,
        overflow: Overflow = "block",
        tick_interval_s: float = 1.0,
    ) -> None:
        if max_queue < 1:
            raise ConfigError("max_queue: must be >= 1")
        if max_batch < 1:
            raise ConfigError("max_batch: must be >= 1")
        if max_wait_ms < 0:
            raise ConfigError("max_wait_ms: must be >= 0")
        if overflow not in ("block", "drop"):
            raise ConfigError(f"overflow: must be 'block' or 'drop', got {overflow!r}")
        self._engine = engine
        self._sink = sink
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._max_wait = max_wait_ms / 1000.0
        self._overflow = overflow
        self._tick_interval = tick_interval_s
        self._queue: deque[_Item] = deque()
        self._steps_queued = 0
        self._cv = threading.Condition()
        self._drop_resets: set[str] = set()  # streams with a queued "dropped" reset
        self._dropped = 0
        self._stopping = False
        self._drain = True
        self._thread: threading.Thread | None = None
        # True while a thread runs the engine: the worker with its batch, or a producer
        # with its step (submit's ``alone``); the other waits for the engine meanwhile.
        self._busy = False
        self._awaiting = False  # the worker waits for a producer's step to end
        # How long the engine's last run took and when it ended: a step runs on its
        # producer's thread only when the engine has rested at least that long since.
        self._ran_s = 0.0
        self._ran_until = 0.0

    # -- producers (any thread) ---------------------------------------------------------

    def submit(
        self, step: Step, timeout: float | None = None, alone: Callable[[], bool] | None = None
    ) -> bool:
        """Queue a step; False when it was dropped (queue full, or the worker stopped).

        ``alone``: asked when nothing is queued and the engine has rested since its last
        run at least as long as that run took, whether this step is the only input
        waiting (no message behind it); then the step runs here, on the caller's thread,
        and its results reach the sink before this returns.
        """
        with self._cv:
            if self._stopping:
                return False
            if (
                alone is not None
                and not self._queue
                and not self._busy
                and time.monotonic() - self._ran_until >= self._ran_s
                and alone()
            ):
                self._busy = True
            else:
                return self._queue_locked(step, timeout)
        started = time.monotonic()
        try:
            self._flush([step])
        finally:
            with self._cv:
                self._ran_until = time.monotonic()
                self._ran_s = self._ran_until - started
                self._busy = False
                if self._queue or self._awaiting:
                    self._cv.notify_all()
        return True

    def _queue_locked(self, step: Step, timeout: float | None) -> bool:
        """Append ``step`` to the queue, or drop it when full (``self._cv`` held)."""
        if self._steps_queued >= self._max_queue:
            if self._overflow == "block":
                self._cv.wait_for(
                    lambda: self._steps_queued < self._max_queue or self._stopping, timeout
                )
            if self._steps_queued >= self._max_queue or self._stopping:
                self._dropped += 1
                self._reset_after_drop(step.stream)
                return False
        self._queue.append(step)
        self._steps_queued += 1
        # Wake the worker only when it can be waiting for this step: for a first item,
        # or for a full batch. A wake-up per message costs the producer ~10 % of CPU.
        if len(self._queue) == 1 or self._steps_queued == self._max_batch:
            self._cv.notify_all()
        return True

    def _reset_after_drop(self, stream: str) -> None:
        """Queue a ``dropped`` reset where the lost step would have run (lock held).

        It goes past the bound (it is tiny), once per stream until it has run, so the
        queue grows by at most one marker per stream however long the overload lasts.
        """
        if stream not in self._drop_resets:
            self._drop_resets.add(stream)
            self._queue.append(("reset", stream, RESET_DROPPED))

    def submit_reset(self, stream: str) -> None:
        """Reset ``stream`` after the steps already queued for it (never dropped)."""
        self._enqueue(("reset", stream, RESET_EXPLICIT))

    def call(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run ``fn(engine)`` on the worker thread, after what is queued; returns its future."""
        future: Future[T] = Future()
        self._enqueue(_Call(fn, future))
        return future

    def _enqueue(self, item: Any) -> None:
        with self._cv:
            if self._stopping and not self._drain:
                if isinstance(item, _Call):
                    item.future.cancel()
                return
            self._queue.append(item)
            self._cv.notify_all()

    @property
    def depth(self) -> int:
        """Steps waiting in the queue."""
        return self._steps_queued

    @property
    def dropped(self) -> int:
        """Steps refused since start (queue full or stopped)."""
        return self._dropped

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self._thread = threading.Thread(target=self._loop, name="seqstream-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = 10.0) -> bool:
        """Stop the thread, first running what is queued when ``drain``; True if it ended."""
        with self._cv:
            self._stopping = True
            self._drain = drain
            if not drain:
                self._discard_locked()
            self._cv.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _discard_locked(self) -> None:
        for item in self._queue:
            if isinstance(item, _Call):
                item.future.cancel()
        self._queue.clear()
        self._drop_resets.clear()
        self._steps_queued = 0

    # -- the thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        next_tick = time.monotonic() + self._tick_interval
        while True:
            with self._cv:
                while True:
                    if self._busy:  # a producer runs its step: the engine is taken
                        self._awaiting = True
                        self._cv.wait()
                        self._awaiting = False
                        continue
                    if self._queue or self._stopping:
                        break
                    left = next_tick - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._stopping and not self._queue:
                    return
                if self._queue and self._max_wait > 0 and self._steps_queued < self._max_batch:
                    deadline = time.monotonic() + self._max_wait
                    self._cv.wait_for(
                        lambda: self._steps_queued >= self._max_batch or self._stopping,
                        max(0.0, deadline - time.monotonic()),
                    )
                batch = self._take_locked()
                self._busy = True
                self._cv.notify_all()  # room for blocked producers
            started = time.monotonic()
            try:
                self._handle(batch)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + self._tick_interval
                    self._guard(self._engine.tick)
            finally:
                with self._cv:
                    self._ran_until = time.monotonic()
                    self._ran_s = self._ran_until - started
                    self._busy = False

    def _take_locked(self) -> list[_Item]:
        batch: list[_Item] = []
        taken = 0
        q = self._queue
        while q and taken < self._max_batch:
            item = q.popleft()
            if isinstance(item, Step):
                taken += 1
            batch.append(item)
        self._steps_queued -= taken
        return batch

    def _handle(self, batch: list[_Item]) -> None:
        steps: list[Step] = []
        for item in batch:
            if isinstance(item, Step):
                steps.append(item)
                continue
            self._flush(steps)  # what came before runs before the reset or call
            steps = []
            if isinstance(item, _Call):
                if item.future.set_running_or_notify_cancel():
                    try:
                        item.future.set_result(item.fn(self._engine))
                    except BaseException as exc:
                        item.future.set_exception(exc)
            else:
                _tag, stream, reason = item
                if reason == RESET_DROPPED:
                    with self._cv:
                        self._drop_resets.discard(stream)
                self._guard(functools.partial(self._engine.reset, stream, reason))
        self._flush(steps)

    def _flush(self, steps: list[Step]) -> None:
        if not steps:
            return
        results = self._guard(lambda: self._engine.process(steps))
        if results is not None:
            self._guard(lambda: self._sink(results))

    def _guard(self, fn: Callable[[], T]) -> T | None:
        """Keep the thread alive whatever a callee raises (logged: it is a bug somewhere)."""
        try:
            return fn()
        except Exception:
            log.exception("engine worker: unexpected error")
            return None
