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
* :class:`Reloader` (SIGHUP, ``systemctl reload``) re-reads the config, loads each model
  whose file or settings changed (per route: the others are not touched) and swaps it
  in on its engine's thread between two batches; the broker connection is untouched.
  A model that cannot be loaded, or does not fit the running daemon (another input
  width), leaves the old one serving and the reason in the log.
* :func:`record_exit` turns the ``last-exit`` file that the unit's ``ExecStopPost``
  writes (systemd's ``$SERVICE_RESULT``: ``watchdog``, ``exit-code``, ...) into counts
  kept in the state directory, so Prometheus can alert on watchdog restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
    from pipeline.daemon.config import RouteConfig, Settings
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
    """SIGHUP: re-read the config and hot-swap each model whose file or ``[model]``
    settings changed; an old model serves on when its new one fails.

    Models are reloaded per route (``[[route]]``): a route whose model is unchanged (same
    settings, same file bytes) is not touched, so its streams keep their state whatever
    happens to the others. Only the models take effect on a reload; changes to other
    sections (and routes added or removed) are logged as needing a restart (they shape
    the broker connection, topics and queues). ``check`` applies the daemon's own rules
    (:func:`pipeline.daemon.app.check_route_model`); the input width and feature names
    must stay the same because the decoder already validates payloads against them (and
    maps named ``values`` by the names). ``swap(route, model)`` queues the swap on that
    route's engine thread and returns its future (True when streams kept their state).
    """

    def __init__(
        self,
        settings: Settings,
        models: Mapping[str, StepModel],
        *,
        load_settings: Callable[[Path], Settings],
        load_model: Callable[[RouteConfig], StepModel],
        check: Callable[[RouteConfig, StepModel], None],
        swap: Callable[[str, StepModel], Future[bool]],
        metrics: Mapping[str, Metrics],
        notifier: Notifier,
        timeout_s: float = 60.0,
    ) -> None:
        self.settings = settings
        self.models = dict(models)
        self._digests = {r.name: file_digest(r.model.path) for r in settings.routes}
        self._load_settings = load_settings
        self._load_model = load_model
        self._check = check
        self._swap = swap
        self._metrics = metrics
        self._notifier = notifier
        self._timeout_s = timeout_s

    @property
    def model(self) -> StepModel:
        """The first route's model (the only one of a single-model config)."""
        return self.models[self.settings.routes[0].name]

    def __call__(self) -> bool:
        """Reload now (on the main thread); True when every changed model is serving."""
        self._notifier.reloading()
        try:
            settings = self._load_settings(self.settings.source)
        except ConfigError as exc:  # an operator's typo, not a model that failed to load
            for route in self.settings.routes:
                self._metrics[route.name].on_reload("bad_config")
            what = "refused: the config is invalid"
            log.error("reload %s; still serving %s: %s", what, self._serving(), exc)
            self._notifier.ready(f"reload {what}, serving {self._serving()}: {exc}"[:_STATUS_MAX])
            return False
        new_routes = {r.name: r for r in settings.routes}
        old_names = [r.name for r in self.settings.routes]
        if set(new_routes) != set(old_names):
            log.warning(
                "reload: routes %s -> %s; adding or removing routes takes effect after a restart",
                sorted(old_names),
                sorted(new_routes),
            )
        kept_routes = []
        failures = []
        changed = 0
        for old in self.settings.routes:
            new = new_routes.get(old.name)
            if new is None:
                kept_routes.append(old)
                continue
            digest = file_digest(new.model.path)
            if new.model == old.model and digest is not None and digest == self._digests[old.name]:
                kept_routes.append(old)  # untouched: its streams keep their state
                continue
            changed += 1
            why = self._reload(old, new)
            if why is None:
                self._digests[old.name] = digest
                kept_routes.append(dataclasses.replace(old, model=new.model))
            else:
                failures.append(why)
                kept_routes.append(old)
        stale = _changed_sections(self.settings, settings)
        if stale:
            log.warning("reload: [%s] changed; takes effect after a restart", "], [".join(stale))
        routes = tuple(kept_routes)
        self.settings = dataclasses.replace(self.settings, model=routes[0].model, routes=routes)
        if failures:
            self._notifier.ready(
                f"reload failed, serving {self._serving()}: {'; '.join(failures)}"[:_STATUS_MAX]
            )
            return False
        if changed == 0:
            log.info("reload: no model changed; still serving %s", self._serving())
        self._notifier.ready(f"serving {self._serving()}"[:_STATUS_MAX])
        return True

    def _reload(self, old_route: RouteConfig, route: RouteConfig) -> str | None:
        """Load, check and swap one route's model; None when it serves, else why not."""
        name = route.name
        old = self.models[name]
        try:
            model = self._load_model(route)
            if model.spec.n_features != old.spec.n_features:
                raise ModelError(
                    f"{route.model.path}: takes {model.spec.n_features} features, the "
                    f"running model {old.spec.n_features}; restart the service to change "
                    "the input"
                )
            if model.spec.features != old.spec.features:  # named payloads map by these
                raise ModelError(
                    f"{route.model.path}: features {list(model.spec.features)}, the "
                    f"running model {list(old.spec.features)}; restart the service to "
                    "change the input"
                )
            self._check(route, model)
            kept = self._wait(self._swap(name, model))
        except SeqstreamError as exc:
            return self._failed(name, old, str(exc))
        except Exception as exc:  # a bug must not take the serving daemon down with it
            log.exception("reload: unexpected error")
            return self._failed(name, old, f"unexpected {type(exc).__name__}: {exc}")
        self.models[name] = model
        spec = model.spec
        metrics = self._metrics[name]
        metrics.set_model(
            name=spec.name, version=spec.version, provider=model.provider, opset=spec.opset
        )
        metrics.on_reload("ok")
        log.info(
            "reloaded%s: %s replaces %s; %s",
            _route_name(self.settings, name),
            _describe(model),
            _describe(old),
            "streams kept their state" if kept else "streams were reset (model_change)",
        )
        return None

    def _failed(self, name: str, old: StepModel, why: str) -> str:
        self._metrics[name].on_reload("failed")
        where = _route_name(self.settings, name)
        log.error("reload failed%s; still serving %s: %s", where, _describe(old), why)
        return why

    def _serving(self) -> str:
        return ", ".join(_describe(self.models[r.name]) for r in self.settings.routes)

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


def file_digest(path: Path) -> str | None:
    """SHA-256 of a model file, to tell a changed model from an untouched one on SIGHUP;
    None when unreadable (then the reload is tried, and fails with the loader's reason)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _route_name(settings: Settings, name: str) -> str:
    """`` (route NAME)`` in log lines of a daemon with several routes; else nothing."""
    return f" (route {name})" if len(settings.routes) > 1 else ""


def _describe(model: StepModel) -> str:
    return f"{model.spec.name} {model.spec.version} ({model.path})"


def _changed_sections(old: Settings, new: Settings) -> list[str]:
    skip = {"source", "model", "input", "output", "routes"}
    changed = [
        f.name
        for f in dataclasses.fields(old)
        if f.name not in skip and getattr(old, f.name) != getattr(new, f.name)
    ]
    strip = [dataclasses.replace(r, model=old.model) for r in old.routes]
    if strip != [dataclasses.replace(r, model=old.model) for r in new.routes]:
        changed.append("route topics")
    return changed


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
