"""The daemon's life cycle: start in order, tick while running, stop in order.

Start: restore the state checkpoint (streams continue where they stopped), open the
metrics endpoint, start the engine's worker, connect to the broker (which subscribes
and announces ``online``).

Run: the main thread only waits for ``should_exit`` and ticks once a second: a
checkpoint when one is due, then the ``tick_hooks`` (the place for a watchdog ping).
Idle expiry of streams is done by the worker itself, on the engine's thread. SIGHUP
only sets a flag too; the ``reload`` runs at the next tick (:mod:`pipeline.daemon.service`).
Under systemd the ``notifier`` says READY=1 once started (model loaded, broker
connected) and STOPPING=1 when the stop begins.

Stop (SIGTERM/SIGINT, uvicorn style: the handler only sets a flag): stop intake
(later messages stay unacknowledged and go to the next session), drain the queue,
wait for the remaining predictions to leave, checkpoint, publish ``offline``,
disconnect. A second signal skips the draining.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from pipeline.daemon.config import CheckpointConfig
from pipeline.daemon.service import Notifier
from pipeline.engine.engine import Engine
from pipeline.engine.worker import Worker
from pipeline.errors import CheckpointError, SeqstreamError
from pipeline.sources.acks import AckLedger
from pipeline.sources.mqtt import MqttSource
from pipeline.telemetry.metrics import Exporter, Metrics
from pipeline.transport.mqtt import Link

log = logging.getLogger(__name__)

TICK_S = 1.0
CONFIRM_TIMEOUT_S = 10.0  # how long a checkpoint waits for the broker to confirm predictions
EXIT_OK = 0
EXIT_CHECKPOINT_FAILED = 1


class Service(Protocol):
    """A part with its own threads (the audio path): started before the broker link
    connects, stopped first, so what it publishes while stopping still goes out."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Route:
    """One model's running parts: its engine (state store), the worker thread owning it,
    the source feeding it from the shared link, and its own checkpoint file."""

    name: str
    engine: Engine
    worker: Worker
    source: MqttSource
    checkpoint: Path | None


class Daemon:
    """Owns the running parts' order of start and stop; builds none of them (see app).

    ``routes``: one per model, all fed through the one ``link``; each engine is saved to
    its own checkpoint file, all at the same ticks, and a held acknowledgement is only
    released once every route's checkpoint has been written.
    """

    def __init__(
        self,
        *,
        routes: Sequence[Route],
        link: Link,
        metrics: Metrics,
        checkpoint: CheckpointConfig,
        exporter: Callable[[], Exporter] | None = None,
        tick_hooks: Sequence[Callable[[], None]] = (),
        services: Sequence[Service] = (),
        drain_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
        reload: Callable[[], object] | None = None,
        acks: AckLedger | None = None,
    ) -> None:
        """``notifier``: systemd readiness; ``reload``: run on SIGHUP, on this thread;
        ``acks``: sensor acknowledgements released by checkpoints (:mod:`pipeline.sources.acks`)."""
        self.routes = tuple(routes)
        self.link = link
        self.metrics = metrics
        self.checkpoint = checkpoint
        self.exporter: Exporter | None = None
        self._make_exporter = exporter
        self.tick_hooks = list(tick_hooks)
        self.services = list(services)
        self.drain_timeout_s = drain_timeout_s
        self.should_exit = threading.Event()
        self.force_exit = False
        self.started = threading.Event()
        self._clock = clock
        self._next_checkpoint = 0.0
        self._previous_handlers: dict[int, Any] = {}
        self.notifier = notifier if notifier is not None else Notifier(None)
        self._reload = reload
        self._reload_requested = threading.Event()
        self.acks = acks

    @property
    def engine(self) -> Engine:
        """The first route's engine (the only one of a single-model daemon)."""
        return self.routes[0].engine

    @property
    def worker(self) -> Worker:
        """The first route's worker (the only one of a single-model daemon)."""
        return self.routes[0].worker

    # -- whole life ---------------------------------------------------------------------

    def run(self, *, install_signals: bool = True) -> int:
        """Start, serve until :attr:`should_exit`, stop; the exit code."""
        if install_signals:
            self._install_signals()
        try:
            self.start()
            self.notifier.ready(f"serving; status on {self.link.status_topic}")
            while not self.should_exit.wait(TICK_S):
                self.tick()
        finally:
            code = self.stop()
            self._restore_signals()
        return code

    def start(self) -> None:
        for route in self.routes:
            path = route.checkpoint
            if path is not None and path.exists():
                n = route.engine.restore(path)
                log.info("restored %d streams of %s from %s", n, route.name, path)
        if self._make_exporter is not None:
            self.exporter = self._make_exporter()
            url = self.exporter.url
            log.info("http: %s (status page), /metrics, /healthz, /readyz, /status", url)
        for route in self.routes:
            route.worker.start()
        for service in self.services:
            service.start()
        try:
            self.link.start()
        except BaseException:
            for service in self.services:
                service.stop()
            for route in self.routes:
                route.worker.stop(drain=False, timeout=5.0)
            if self.exporter is not None:
                self.exporter.close()
            raise
        self._next_checkpoint = self._clock() + self.checkpoint.interval_s
        # Everything allocated so far lives for the whole run: keep it out of the
        # collector's generations so full collections stay short on the hot path.
        gc.freeze()
        self.started.set()
        log.info("running; status on %r", self.link.status_topic)

    def request_reload(self) -> None:
        """Reload at the next tick (what SIGHUP does); ignored without a ``reload``."""
        self._reload_requested.set()

    def tick(self) -> None:
        if self._reload is not None and self._reload_requested.is_set():
            self._reload_requested.clear()
            self._reload()
        if self.checkpoint.path is not None and (
            self._clock() >= self._next_checkpoint or (self.acks is not None and self.acks.due)
        ):
            self._next_checkpoint = self._clock() + self.checkpoint.interval_s
            self._save_running()
        for hook in self.tick_hooks:
            hook()

    def stop(self) -> int:
        """Stop in order; safe to call when :meth:`start` failed part way."""
        if not self.started.is_set():
            return EXIT_OK
        self.started.clear()
        drain = not self.force_exit
        self.notifier.stopping("stopping: draining the queue" if drain else "stopping")
        log.info("stopping (%s)", "draining the queue" if drain else "without draining")
        for service in self.services:
            service.stop()
        for route in self.routes:
            route.source.close()
        worker_stopped = True
        for route in self.routes:
            if not route.worker.stop(drain=drain, timeout=self.drain_timeout_s):
                worker_stopped = False
                log.warning(
                    "worker of %s did not finish within %g s", route.name, self.drain_timeout_s
                )
        flushed = self.link.flush(self.drain_timeout_s)
        if not flushed:
            log.warning("some predictions were not confirmed by the broker before stopping")
        code = EXIT_OK
        saving = self.checkpoint.path is not None
        if saving and not worker_stopped:
            # An engine thread may still be inside a batch: saving now could write a torn
            # state. The last periodic checkpoints stay the restart point.
            self.metrics.checkpoint_failures.inc()
            log.error("no checkpoint on stop: an engine is still busy; keeping the previous one")
            code = EXIT_CHECKPOINT_FAILED
        elif saving and self.acks is not None and not flushed:
            # A checkpoint now would cover steps whose predictions may never reach the
            # broker; their messages stay unacknowledged and the next run redoes them.
            log.warning("no checkpoint on stop: the next run redoes the unconfirmed steps")
        elif saving:
            cut = self.acks.cut() if self.acks is not None else None
            try:
                for route in self.routes:  # the workers have stopped: this thread owns them
                    if route.checkpoint is not None:
                        n = route.engine.save(route.checkpoint)
                        log.info("checkpointed %d streams to %s", n, route.checkpoint)
                self.metrics.checkpoints.inc()
                if cut is not None and self.acks is not None:
                    self.acks.release(cut)
            except SeqstreamError as exc:
                self.metrics.checkpoint_failures.inc()
                log.error("checkpoint failed: %s", exc)
                code = EXIT_CHECKPOINT_FAILED
        self.link.stop()
        if self.exporter is not None:
            self.exporter.close()
        log.info("stopped")
        return code

    # -- helpers ------------------------------------------------------------------------

    def _save_running(self) -> None:
        """A checkpoint of every route, each taken on its engine's thread between two
        batches; then the acknowledgements they cover (taken before any was queued) go
        to the broker, once all of them are written."""
        acks = self.acks
        cut = acks.cut() if acks is not None else None
        try:
            for route in self.routes:
                path = route.checkpoint
                if path is not None:
                    save = self._saver(path)
                    route.worker.call(save).result(timeout=60.0)
            self.metrics.checkpoints.inc()
        except SeqstreamError as exc:
            self.metrics.checkpoint_failures.inc()
            log.error("checkpoint failed (the previous one is kept): %s", exc)
        except TimeoutError:
            self.metrics.checkpoint_failures.inc()
            log.error("checkpoint did not finish within 60 s")
        else:
            if acks is not None and cut is not None:
                acks.release(cut)
            return
        if acks is not None and cut is not None:
            acks.keep(cut)
            if acks.held >= 2 * acks.max_held:  # the broker's 65535 packet ids would run out
                n = acks.release(acks.cut())
                self.metrics.acks_uncovered.inc(n)
                log.error("checkpoints keep failing: acknowledged %d messages none covers", n)

    def _saver(self, path: Path) -> Callable[[Engine], int]:
        return lambda engine: self._save_confirmed(engine, path)

    def _save_confirmed(self, engine: Engine, path: Path) -> int:
        """On the engine's thread. With held acknowledgements, the checkpoint must not
        cover a step whose prediction the broker may not have: a crash would lose it."""
        if self.acks is not None and not self.link.flush(CONFIRM_TIMEOUT_S):
            raise CheckpointError(f"{path}: deferred, predictions not confirmed by the broker")
        return engine.save(path)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        if self._reload is not None:
            self._previous_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)

    def _restore_signals(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload_requested.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.should_exit.is_set():
            self.force_exit = True
        self.should_exit.set()
