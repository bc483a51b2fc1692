"""Every Prometheus metric of the daemon, created against an injected registry.

:class:`Metrics` owns the metric objects and is the engine's observer
(:class:`~pipeline.engine.engine.EngineObserver`). Nothing here is global: the daemon passes
its own :class:`~prometheus_client.CollectorRegistry`, tests pass a private one, so two
daemons in one process never share counters. Label values come only from fixed sets
(rejection and reset reasons); stream ids are never labels, so the number of series
stays bounded however many streams connect.

Gauges that mirror other objects' state (active streams, queue depth) are read at
scrape time through :meth:`Metrics.track`, which costs the hot path nothing.
"""

from __future__ import annotations

import errno
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler, make_wsgi_app

from pipeline.errors import ConfigError

NAMESPACE = "seqstream"

# Inference of a small step model costs tens of microseconds per batch.
INFERENCE_BUCKETS = (
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    1.0,
)
END_TO_END_BUCKETS = (
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = tuple(float(1 << i) for i in range(13))  # 1 .. 4096
# An anomaly score over the model's own threshold: one scale for every model, 1 = the line.
ANOMALY_RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0, 4.0, 8.0)


DEFAULT_MODEL = "default"  # the ``model`` label of a single-model config's one route


class Family:
    """Metric constructors for one registry (None: built now, registered later), all in
    the ``seqstream`` namespace: the one way every metrics module makes its metrics."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, doc, labels, namespace=NAMESPACE, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, doc, labels, namespace=NAMESPACE, registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(name, doc, namespace=NAMESPACE, registry=self.registry, buckets=buckets)


class Metrics:
    """The metrics of one route (one model); the engine's observer and the MQTT link's too.

    Every per-model series carries the label ``model`` (the route's name): one daemon may
    serve several models (``[[route]]``), each with its own engine, and a rate or a
    latency of one model must not be averaged into another's. The families live in
    :class:`MetricFamilies`, shared by all routes of a daemon; :meth:`route` gives the
    view of another model on the same registry. Broker, checkpoint and process series
    belong to the daemon and carry no ``model`` label.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        reject_reasons: Iterable[str] = (),
        reset_reasons: Iterable[str] = (),
        reload_results: Iterable[str] = (),
        exit_results: Iterable[str] = (),
        model: str = DEFAULT_MODEL,
        families: MetricFamilies | None = None,
    ) -> None:
        f = families if families is not None else MetricFamilies(registry, exit_results)
        self.families = f
        self.registry = f.registry
        self.name = model
        self._reasons = (tuple(reject_reasons), tuple(reset_reasons), tuple(reload_results))
        # -- this model's children: the hot path skips labels()' lock and lookup --
        self.received = f.received.labels(model)
        self.queued = f.queued.labels(model)
        self.reset_requests = f.reset_requests.labels(model)
        self.published = f.published.labels(model)
        self.errors_suppressed = f.errors_suppressed.labels(model)
        self.inference = f.inference.labels(model)
        self.batch_size = f.batch_size.labels(model)
        self.end_to_end = f.end_to_end.labels(model)
        self.active_streams = f.active_streams.labels(model)
        self.queue_depth = f.queue_depth.labels(model)
        self.queue_capacity = f.queue_capacity.labels(model)
        # -- the daemon's, shared by every route --
        self.rejected = f.rejected
        self.resets = f.resets
        self.publish_failures = f.publish_failures
        self.reconnects = f.reconnects
        self.checkpoints = f.checkpoints
        self.checkpoint_failures = f.checkpoint_failures
        self.acks_uncovered = f.acks_uncovered
        self.broker_connected = f.broker_connected
        self.reloads = f.reloads
        self.service_exits = f.service_exits
        self.engine_stall = f.engine_stall
        self.start_time = f.start_time
        self.process = f.process
        self._by_label: list[Counter] = []
        self._labels: tuple[str, ...] = ()
        self._anomaly: tuple[Histogram, Counter] | None = None
        self._reloads = {r: f.reloads.labels(model, r) for r in reload_results}
        # Known reasons are exported as 0 before they first happen.
        self._rejected = {r: f.rejected.labels(model, r) for r in reject_reasons}
        self._resets = {r: f.resets.labels(model, r) for r in reset_reasons}

    def unrouted(self) -> Unrouted:
        """The counters of messages that no route (no model) takes."""
        return Unrouted(self.families)

    def route(self, model: str) -> Metrics:
        """The metrics of another model of the same daemon (same registry and families)."""
        rejects, resets, reloads = self._reasons
        return Metrics(
            self.registry,
            reject_reasons=rejects,
            reset_reasons=resets,
            reload_results=reloads,
            model=model,
            families=self.families,
        )

    # -- engine observer ----------------------------------------------------------------

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def on_reset(self, reason: str, count: int = 1) -> None:
        child = self._resets.get(reason)
        if child is None:
            child = self._resets.setdefault(reason, self.resets.labels(self.name, reason))
        child.inc(count)

    def on_reject(self, reason: str) -> None:
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected.setdefault(reason, self.rejected.labels(self.name, reason))
        child.inc()

    def on_reload(self, result: str) -> None:
        """One SIGHUP reload of this model, by result (:mod:`pipeline.daemon.service`)."""
        child = self._reloads.get(result)
        if child is None:
            child = self._reloads.setdefault(result, self.reloads.labels(self.name, result))
        child.inc()

    def on_label(self, index: int) -> None:
        """One published classification; ``index`` into the labels of :meth:`set_labels`."""
        children = self._by_label
        if index < len(children):
            children[index].inc()

    def on_anomaly(self, score: float, threshold: float) -> None:
        """One scored step of an anomaly model (observed by whoever publishes it)."""
        if not math.isfinite(score) or self._anomaly is None:
            return  # counted as non_finite_output where it is published
        ratio = score / threshold if threshold > 0 else score
        self._anomaly[0].observe(ratio)
        if ratio > 1.0:
            self._anomaly[1].inc()

    # -- MQTT link observer ---------------------------------------------------------------

    def on_connected(self, first: bool) -> None:
        self.broker_connected.set(1)
        if not first:
            self.reconnects.inc()

    def on_disconnected(self) -> None:
        self.broker_connected.set(0)

    # -- wiring -------------------------------------------------------------------------

    def track(self, *, streams: Callable[[], float], depth: Callable[[], float]) -> None:
        """Read active streams and queue depth from their owners at scrape time."""
        self.active_streams.set_function(streams)
        self.queue_depth.set_function(depth)

    def set_model(self, *, name: str, version: str, provider: str, opset: int) -> None:
        self.families.model.labels(self.name).info(
            {"name": name, "version": version, "provider": provider, "opset": str(opset)}
        )

    def set_task(self, task: str) -> None:
        """Export the metrics that a model of ``task`` moves, and only those.

        A classifier has no anomaly score and an anomaly model no labels: series that
        cannot move would be noise in every query and dashboard. Called at start and when
        a reload brings a model of another task (the registry is thread-safe). A family
        is exported while some route's model moves it; each route has children only of
        its own task's families.
        """
        f = self.families
        if task == "anomaly" and self._anomaly is None:
            self._anomaly = (f.anomaly_ratio.labels(self.name), f.anomalies.labels(self.name))
        elif task != "anomaly" and self._anomaly is not None:
            self._anomaly = None
            f.anomaly_ratio.remove(self.name)
            f.anomalies.remove(self.name)
        if task != "classify":
            self.set_labels(())
        f.use(self.name, task)

    def set_labels(self, labels: Iterable[str]) -> None:
        """The current model's class labels (none for other tasks), exported from 0."""
        by_label = self.families.by_label
        for old in self._labels:
            by_label.remove(self.name, old)
        self._labels = tuple(labels)
        self._by_label = [by_label.labels(self.name, label) for label in self._labels]

    def set_exits(self, counts: dict[str, int]) -> None:
        """Counts restored from the state directory
        (:func:`pipeline.daemon.service.record_exit`)."""
        for result, n in counts.items():
            if n > 0:
                self.service_exits.labels(result).inc(n)


class Unrouted:
    """Where a daemon with several models counts a message whose topic no route takes:
    under an empty ``model`` label (no model's), received and rejected only."""

    def __init__(self, families: MetricFamilies) -> None:
        self.received = families.received.labels("")
        self._rejected = families.rejected

    def on_reject(self, reason: str) -> None:
        self._rejected.labels("", reason).inc()


class MetricFamilies:
    """Every metric family of one daemon, on its registry; :class:`Metrics` are views."""

    def __init__(self, registry: CollectorRegistry, exit_results: Iterable[str] = ()) -> None:
        self.registry = registry
        m = ("model",)

        def counter(name: str, doc: str, labels: tuple[str, ...] = m) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = m) -> Gauge:
            return Gauge(name, doc, labels, namespace=NAMESPACE, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, m, namespace=NAMESPACE, registry=registry, buckets=buckets)

        self.received = counter(
            "messages_received",
            "Sensor messages (data and resets) received from the broker (incl. rejected).",
        )
        self.rejected = counter(
            "messages_rejected",
            "Messages or steps refused, by reason (model: the route; empty when the topic "
            "matches none).",
            ("model", "reason"),
        )
        self.queued = counter(
            "messages_queued",
            "Sensor messages (data and resets) handed to the engine's queue; every received "
            "message is either that or rejected at the source (by a reason of its own).",
        )
        self.reset_requests = counter(
            "reset_requests", "Reset messages received (incl. refused: see messages_rejected)."
        )
        self.published = counter("predictions_published", "Prediction messages published.")
        self.publish_failures = counter(
            "publish_failures", "Messages the MQTT client refused to queue, by reason.", ("reason",)
        )
        self.errors_suppressed = counter(
            "error_reports_suppressed", "Error-topic reports skipped by the rate limit."
        )
        self.resets = counter(
            "state_resets", "Stream state resets, by reason.", ("model", "reason")
        )
        self.reconnects = counter(
            "broker_reconnects", "Successful connections to the broker after the first.", ()
        )
        self.checkpoints = counter("checkpoints", "State checkpoints written.", ())
        self.checkpoint_failures = counter(
            "checkpoint_failures", "State checkpoints that could not be written.", ()
        )
        self.acks_uncovered = counter(
            "acks_uncovered",
            "Sensor messages acknowledged to the broker with no checkpoint covering their "
            "step (ack_after_checkpoint while checkpoints keep failing): a crash now loses them.",
            (),
        )
        self.inference = histogram(
            "inference_seconds",
            "Wall time of one engine batch (gather, session.run, scatter).",
            INFERENCE_BUCKETS,
        )
        self.batch_size = histogram("batch_size", "Stream steps per engine batch.", BATCH_BUCKETS)
        self.end_to_end = histogram(
            "end_to_end_seconds",
            "From a message's arrival to its prediction being handed to the MQTT client.",
            END_TO_END_BUCKETS,
        )
        self.active_streams = gauge("active_streams", "Streams with carried state.")
        self.queue_depth = gauge("queue_depth", "Steps waiting between network and engine.")
        self.queue_capacity = gauge("queue_capacity", "The queue's limit (queue.max_size).")
        self.broker_connected = gauge("broker_connected", "1 while connected to the broker.", ())
        self.model = Info("model", "The loaded model.", m, namespace=NAMESPACE, registry=registry)
        # -- operations (pipeline.daemon.service) --
        self.reloads = counter(
            "model_reloads", "Model reloads (SIGHUP), by result.", ("model", "result")
        )
        self.service_exits = counter(
            "service_exits",
            "How earlier runs of the service ended (systemd's $SERVICE_RESULT), by result; "
            "kept in the state directory across restarts.",
            ("result",),
        )
        self.engine_stall = gauge(
            "engine_stall_seconds",
            "How long the engines have owed the watchdog's probe; 0 while they keep up.",
            (),
        )
        self.start_time = gauge("start_time_seconds", "When this process started (Unix time).", ())
        self.start_time.set(time.time())
        # process_* (RSS, CPU seconds, open fds, start time) of this process, on this registry.
        self.process = ProcessCollector(registry=registry)
        # Task metrics: registered only while some route's model can move them.
        self.by_label = Counter(
            "predictions_by_label",
            "Published classifications, by predicted label.",
            ("model", "label"),
            namespace=NAMESPACE,
            registry=None,
        )
        self.anomaly_ratio = Histogram(
            "anomaly_score_ratio",
            "Anomaly scores divided by the model's threshold (above 1: flagged).",
            m,
            namespace=NAMESPACE,
            registry=None,
            buckets=ANOMALY_RATIO_BUCKETS,
        )
        self.anomalies = Counter(
            "anomalies", "Steps flagged as anomalous.", m, namespace=NAMESPACE, registry=None
        )
        self._task_metrics: dict[str, tuple[Counter | Histogram, ...]] = {
            "classify": (self.by_label,),
            "anomaly": (self.anomaly_ratio, self.anomalies),
        }
        self._tasks: dict[str, str] = {}
        self._exported: set[Counter | Histogram] = set()
        self._lock = threading.Lock()
        for r in exit_results:
            self.service_exits.labels(r)

    def use(self, model: str, task: str) -> None:
        """``model`` now serves ``task``: export the union of the routes' task metrics."""
        with self._lock:
            self._tasks[model] = task
            wanted = {m for t in self._tasks.values() for m in self._task_metrics.get(t, ())}
            for metric in self._exported - wanted:
                self.registry.unregister(metric)
            for metric in wanted - self._exported:
                self.registry.register(metric)
            self._exported = wanted


class Exporter:
    """The HTTP endpoint on its own thread: ``/metrics``, plus ``routes``; :meth:`close` stops it.

    ``routes`` maps a path to a handler returning ``(status, content type, body)``
    (:meth:`pipeline.daemon.status.StatusView.routes`); any other path is a 404, so a probe
    pointed at the wrong path fails instead of reading the metrics as health.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        bind: str,
        port: int,
        routes: Mapping[str, Callable[[], tuple[int, str, bytes]]] | None = None,
    ) -> None:
        metrics_app = make_wsgi_app(registry)
        table = dict(routes or {})

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                body: list[bytes] = metrics_app(environ, start_response)
                return body
            route = table.get(path)
            if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                code, ctype, data = 405, "text/plain", b"read-only: use GET\n"
            elif route is None:
                code, ctype, data = 404, "text/plain", b"not found; see /, /status, /metrics\n"
            else:
                code, ctype, data = route()
            headers = [("Content-Type", ctype), ("Cache-Control", "no-store")]
            if ctype.startswith("text/html"):
                headers.append(("Content-Security-Policy", PAGE_CSP))
            start_response(f"{code} {HTTPStatus(code).phrase}", headers)
            return [data]

        class Server(ThreadingWSGIServer):
            pass

        try:
            # IPv6 binds ("::") need their family before the socket exists.
            info = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            Server.address_family, addr = info[0][0], str(info[0][4][0])
            self._server = make_server(addr, port, app, Server, handler_class=_SilentHandler)
        except OSError as exc:  # socket.gaierror too: a bind address that does not resolve
            why = "address in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ConfigError(f"metrics: cannot listen on {bind}:{port} ({why})") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The bound port (the real one when configured as 0)."""
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        """Where to point a browser or a scraper (the bound address and port)."""
        host = str(self._server.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


# The status page runs its own inline script and reads /status; nothing else may load.
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'"
)
