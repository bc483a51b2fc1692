"""Living under systemd: readiness and status, the watchdog, reloads, how earlier runs ended.

The unit (``systemd/seqstream.service``) is ``Type=notify``; everything here is a no-op
when the daemon runs outside systemd, so the same code serves tests and a terminal.

* :class:`Notifier` speaks sd_notify(3): one datagram per message to ``$NOTIFY_SOCKET``
  (a path, or ``@name`` for the abstract namespace). No libsystemd: the protocol is a
  few ``KEY=value`` lines.
* :class:`EngineWatchdog` sends ``WATCHDOG=1`` only while the engine's worker thread
  makes progress. Each tick queues a no-op probe on the worker, behind whatever is
  already queued; a pending probe older than half of ``WatchdogSec`` means the engine is
  stuck (an idle engine answers at once), so the pings stop and systemd restarts the
  service. Message arrival plays no part: a quiet sensor network is not a fault.
* :class:`Reloader` (SIGHUP, ``systemctl reload``) re-reads the config, loads the model
  it names and swaps it in on the engine's thread between two batches; the broker
  connection is untouched. A model that cannot be loaded, or does not fit the running
  daemon (another input width), leaves the old one serving and the reason in the log.
* :func:`record_exit` turns the ``last-exit`` file that the unit's ``ExecStopPost``
  writes (systemd's ``$SERVICE_RESULT``: ``watchdog``, ``exit-code``, ...) into counts
  kept in the state directory, so Prometheus can alert on watchdog restarts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError, ModelError, SeqstreamError

if TYPE_CHECKING:
    from pipeline.daemon.config import Settings
    from pipeline.engine.engine import Engine
    from pipeline.model import StepModel
    from pipeline.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

# Without a systemd watchdog the engine still counts as stalled after this long.
DEFAULT_STALL_S = 10.0
# systemd's $SERVICE_RESULT values (systemd.exec(5)); anything else counts as "other".
EXIT_RESULTS: tuple[str, ...] = (
    "success",
    "protocol",
    "timeout",
    "exit-code",
    "signal",
    "core-dump",
    "watchdog",
    "start-limit-hit",
    "resources",
    "other",
)
LAST_EXIT = "last-exit"  # written by ExecStopPost, read and removed at start
EXIT_COUNTS = "exits.json"
# "bad_config": the config file itself was refused (nothing about the model was tried).
RELOAD_RESULTS: tuple[str, ...] = ("ok", "failed", "bad_config")
_STATUS_MAX = 200  # characters of an error shown in STATUS=


@dataclass(frozen=True, slots=True)
class ServiceEnv:
    """What systemd tells the process through its environment (read once, at the edge)."""

    notify_socket: str | None = None
    watchdog_s: float | None = None  # None: no watchdog configured for this process
    state_directory: Path | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ServiceEnv:
        env = os.environ if environ is None else environ
        watchdog_s = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process meant to ping; a child that inherited it is not.
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_s = int(usec) / 1e6
        state = env.get("STATE_DIRECTORY", "").split(":")[0]
        return cls(
            notify_socket=env.get("NOTIFY_SOCKET") or None,
            watchdog_s=watchdog_s,
            state_directory=Path(state) if state else None,
        )


class Notifier:
    """sd_notify(3) without libsystemd; every method is a no-op without a socket.

    Thread-safe (one ``sendto`` per message). A send that fails is logged once and
    otherwise ignored: losing systemd must not stop the daemon.
    """

    def __init__(self, address: str | None) -> None:
        self._address: str | bytes | None = None
        if address:
            # "@name" is Linux's abstract namespace: a leading NUL byte on the wire.
            self._address = b"\0" + address[1:].encode() if address[0] == "@" else address
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """One message of ``KEY=value`` fields; False when there is no socket or it failed."""
        if self._address is None:
            return False
        data = "\n".join(fields).encode()
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._sock.sendto(data, self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify: cannot send to %r (%s)", self._address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) match the reload.
        return self.send(
            "RELOADING=1", "STATUS=reloading", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}"
        )

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class EngineWatchdog:
    """A tick hook: ``WATCHDOG=1`` while the engine answers probes, silence when it cannot.

    ``call`` queues a function on the engine's worker (``Worker.call``). One probe is
    outstanding at a time; :meth:`stall_s` is how long it has been waiting (0 once
    answered). Pings stop when that passes ``stall_after_s``, and resume when the engine
    answers again (systemd may restart the service before).
    """

    def __init__(
        self,
        call: Callable[[Callable[[Engine], None]], Future[None]],
        notifier: Notifier,
        *,
        watchdog_s: float | None,
        stall_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._call = call
        self._notifier = notifier
        self._ping = watchdog_s is not None
        if stall_after_s is None:
            stall_after_s = watchdog_s / 2 if watchdog_s is not None else DEFAULT_STALL_S
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._probe: Future[None] | None = None
        self._sent = 0.0
        self.stalled = False

    def stall_s(self) -> float:
        """Seconds the current probe has waited for the engine; 0 when it has answered."""
        probe = self._probe
        if probe is None or probe.done():
            return 0.0
        return max(0.0, self._clock() - self._sent)

    def tick(self) -> None:
        if self._probe is None or self._probe.done():
            self._sent = self._clock()
            self._probe = self._call(_probe)
        stall = self.stall_s()
        if stall <= self.stall_after_s:
            if self.stalled:
                self.stalled = False
                log.warning("engine is making progress again; watchdog pings resume")
            if self._ping:
                self._notifier.watchdog()
            return
        if not self.stalled:
            self.stalled = True
            log.error(
                "engine has made no progress for %.1f s; watchdog pings withheld "
                "(systemd restarts the service when WatchdogSec= passes)",
                stall,
            )
            self._notifier.status(f"engine stalled for {stall:.0f} s")


def _probe(engine: Engine) -> None:
    """Runs on the engine's thread: that it runs at all is the proof of progress."""


class StatusLine:
    """A tick hook: ``STATUS=`` with what the daemon is doing, sent when it changes."""

    def __init__(self, notifier: Notifier, describe: Callable[[], str]) -> None:
        self._notifier = notifier
        self._describe = describe
        self._last = ""

    def tick(self) -> None:
        if not self._notifier.enabled:
            return
        text = self._describe()
        if text != self._last:
            self._last = text
            self._notifier.status(text)


class Reloader:
    """SIGHUP: re-read the config and hot-swap the model; the old one serves on failure.

    Only ``[model]`` takes effect on a reload; changes to other sections are logged as
    needing a restart (they shape the broker connection, topics and queues). ``check``
    applies the daemon's own rules (:func:`pipeline.daemon.app.check_model`); the input width
    and feature names must stay the same because the decoder already validates payloads
    against them (and maps named ``values`` by the names).
    ``swap`` queues the swap on the engine's thread and returns its future (True when
    streams kept their state).
    """

    def __init__(
        self,
        settings: Settings,
        model: StepModel,
        *,
        load_settings: Callable[[Path], Settings],
        load_model: Callable[[Settings], StepModel],
        check: Callable[[Settings, StepModel], None],
        swap: Callable[[StepModel], Future[bool]],
        metrics: Metrics,
        notifier: Notifier,
        timeout_s: float = 60.0,
    ) -> None:
        self.settings = settings
        self.model = model
        self._load_settings = load_settings
        self._load_model = load_model
        self._check = check
        self._swap = swap
        self._metrics = metrics
        self._notifier = notifier
        self._timeout_s = timeout_s

    def __call__(self) -> bool:
        """Reload now (on the main thread); True when the new model is serving."""
        self._notifier.reloading()
        old = self.model
        try:
            settings = self._load_settings(self.settings.source)
        except ConfigError as exc:  # an operator's typo, not a model that failed to load
            return self._failed(old, str(exc), result="bad_config")
        try:
            model = self._load_model(settings)
            if model.spec.n_features != old.spec.n_features:
                raise ModelError(
                    f"{settings.model.path}: takes {model.spec.n_features} features, the "
                    f"running model {old.spec.n_features}; restart the service to change "
                    "the input"
                )
            if model.spec.features != old.spec.features:  # named payloads map by these
                raise ModelError(
                    f"{settings.model.path}: features {list(model.spec.features)}, the "
                    f"running model {list(old.spec.features)}; restart the service to "
                    "change the input"
                )
            self._check(settings, model)
            kept = self._wait(self._swap(model))
        except SeqstreamError as exc:
            return self._failed(old, str(exc))
        except Exception as exc:  # a bug must not take the serving daemon down with it
            log.exception("reload: unexpected error")
            return self._failed(old, f"unexpected {type(exc).__name__}: {exc}")
        stale = _changed_sections(self.settings, settings)
        if stale:
            log.warning("reload: [%s] changed; takes effect after a restart", "], [".join(stale))
        self.settings = dataclasses.replace(self.settings, model=settings.model)
        self.model = model
        spec = model.spec
        self._metrics.set_model(
            name=spec.name, version=spec.version, provider=model.provider, opset=spec.opset
        )
        self._metrics.reloads.labels("ok").inc()
        log.info(
            "reloaded: %s replaces %s; %s",
            _describe(model),
            _describe(old),
            "streams kept their state" if kept else "streams were reset (model_change)",
        )
        self._notifier.ready(f"serving {_describe(model)}")
        return True

    def _failed(self, old: StepModel, why: str, result: str = "failed") -> bool:
        self._metrics.reloads.labels(result).inc()
        what = "refused: the config is invalid" if result == "bad_config" else "failed"
        log.error("reload %s; still serving %s: %s", what, _describe(old), why)
        self._notifier.ready(f"reload {what}, serving {_describe(old)}: {why}"[:_STATUS_MAX])
        return False

    def _wait(self, future: Future[bool]) -> bool:
        try:
            return future.result(timeout=self._timeout_s)
        except TimeoutError:
            future.cancel()  # still queued: it must not swap later, behind our back
            raise ModelError(
                f"the engine did not take the new model within {self._timeout_s:g} s"
            ) from None
        except CancelledError:
            raise ModelError("the engine stopped before taking the new model") from None


def _describe(model: StepModel) -> str:
    return f"{model.spec.name} {model.spec.version} ({model.path})"


def _changed_sections(old: Settings, new: Settings) -> list[str]:
    skip = {"source", "model"}
    return [
        f.name
        for f in dataclasses.fields(old)
        if f.name not in skip and getattr(old, f.name) != getattr(new, f.name)
    ]


def record_exit(state_dir: Path) -> dict[str, int]:
    """How earlier runs ended, counted by result, with the run that just ended added.

    ``ExecStopPost`` leaves ``$SERVICE_RESULT`` in ``state_dir/last-exit``; it is
    counted once (the file is removed) and the counts persist in ``exits.json``, so
    the exported counter keeps growing across restarts as Prometheus expects.
    """
    counts = dict.fromkeys(EXIT_RESULTS, 0)
    path = state_dir / EXIT_COUNTS
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        for key in EXIT_RESULTS:
            value = saved.get(key, 0) if isinstance(saved, dict) else 0
            counts[key] = value if isinstance(value, int) and value >= 0 else 0
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable, counting service exits from zero (%s)", path, exc)
    marker = state_dir / LAST_EXIT
    try:
        result = marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return counts
    except OSError as exc:
        log.warning("%s: unreadable (%s)", marker, exc)
        return counts
    counts[result if result in counts else "other"] += 1
    if result == "watchdog":
        log.warning("the previous run was killed by the systemd watchdog (engine stalled)")
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(counts), encoding="utf-8")
        tmp.replace(path)
        marker.unlink()
    except OSError as exc:
        log.warning("%s: cannot update (%s)", path, exc)
    return counts
