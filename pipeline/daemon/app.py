"""Composition root: the one place that builds the daemon's parts from settings.

Every other module receives its collaborators through its constructor; only this one
names the concrete classes and decides how they are wired::

    broker -> Link -> MqttSource -> Decoder -> Worker(Engine(StepModel)) -> PredictionSink -> Link
                                 \\-> ErrorReporter <-/           \\-> Metrics (observer)

once per route (``[[route]]``: one model each), all on the one ``Link``: paho's topic
matcher hands each message to the source whose filter it matches (config refuses
overlapping templates, so that is one), and the route's own worker thread owns its
engine and state store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, disable_created_metrics

from pipeline.daemon import config
from pipeline.daemon.config import DEFAULT_ROUTE, RouteConfig, Settings
from pipeline.daemon.lifecycle import Daemon, Route, Service
from pipeline.daemon.service import (
    EXIT_RESULTS,
    RELOAD_RESULTS,
    EngineWatchdog,
    Notifier,
    Reloader,
    ServiceEnv,
    StatusLine,
    record_exit,
)
from pipeline.daemon.status import RouteStatus, StatusView
from pipeline.engine import engine as engine_module
from pipeline.engine.engine import Engine
from pipeline.engine.store.state import RESET_REASONS
from pipeline.engine.worker import Worker
from pipeline.errors import ConfigError
from pipeline.keywords import service as keywords_service
from pipeline.model import StepModel
from pipeline.sinks import mqtt as sink_mqtt
from pipeline.sinks.encoder import PredictionEncoder
from pipeline.sinks.mqtt import ErrorReporter, PredictionSink, PublishPolicy
from pipeline.sinks.recent import LastPredictions
from pipeline.sources import channels as channels_module
from pipeline.sources import codecs
from pipeline.sources import mqtt as source_mqtt
from pipeline.sources.acks import AckLedger
from pipeline.sources.channels import Assembler
from pipeline.sources.codecs import Decoder
from pipeline.sources.mqtt import MqttSource
from pipeline.telemetry.metrics import Exporter, Metrics, Unrouted
from pipeline.transport.mqtt import Link

log = logging.getLogger(__name__)

# Every rejection reason the daemon can count, exported as 0 from the start.
REJECT_REASONS: tuple[str, ...] = tuple(
    dict.fromkeys(
        (
            *codecs.REASONS,
            *source_mqtt.REASONS,
            *channels_module.REASONS,
            sink_mqtt.NON_FINITE_OUTPUT,
            *engine_module.REJECT_REASONS,
        )
    )
)


def load_route_model(route: RouteConfig) -> StepModel:
    """A route's model; with ``model.sha256`` the bytes loaded are the bytes hashed."""
    cfg = route.model
    return StepModel.load(cfg.path, cfg.providers, cfg.threads, sha256=cfg.sha256)


def check_route_model(route: RouteConfig, model: StepModel) -> None:
    """What a route's settings require of its model (at start and at every reload)."""
    spec = model.spec
    if route.output.on_change and spec.task != "classify":
        where = "" if route.name == DEFAULT_ROUTE else f"route {route.name}: "
        raise ConfigError(
            f"{where}output.on_change: needs a classify model; {spec.name} is {spec.task}"
        )


def load_model(settings: Settings) -> StepModel:
    """The first route's model (cluster mode's only one)."""
    return load_route_model(settings.routes[0])


def check_model(settings: Settings, model: StepModel) -> None:
    """:func:`check_route_model` for the first route (cluster mode's only one)."""
    check_route_model(settings.routes[0], model)


def build(
    settings: Settings, registry: CollectorRegistry | None = None, env: ServiceEnv | None = None
) -> Daemon:
    """Everything ``seqstream run`` needs, built but not started.

    ``env``: what systemd passed (notify socket, watchdog, state directory); by default
    none, as outside systemd. Every model is loaded and checked before anything else is
    built, so a bad one stops the start with its route's name.
    """
    env = env if env is not None else ServiceEnv()
    models: dict[str, StepModel] = {}
    for r in settings.routes:
        model = load_route_model(r)
        check_route_model(r, model)
        models[r.name] = model
    registry = registry if registry is not None else CollectorRegistry()
    # No *_created series: they double the exposition and no rule or panel reads them.
    # prometheus_client only offers this process-wide; the daemon is the process.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
    metrics = Metrics(
        registry,
        reject_reasons=REJECT_REASONS,
        reset_reasons=RESET_REASONS,
        reload_results=RELOAD_RESULTS,
        exit_results=EXIT_RESULTS,
        model=settings.routes[0].name,
    )
    if env.state_directory is not None:
        metrics.set_exits(record_exit(env.state_directory))
    metrics.broker_connected.set(0)

    link = Link(settings.mqtt, observer=metrics)
    ckpt = settings.checkpoint
    acks = AckLedger(link, ckpt.max_unacked) if ckpt.ack_after_checkpoint else None
    # Several models: a topic no route takes is no model's (an empty model label).
    unrouted = metrics.unrouted() if len(settings.routes) > 1 else None
    built = [
        _route(settings, r, models[r.name], link, metrics.route(r.name), acks, unrouted)
        for r in settings.routes
    ]
    routes = [b.route for b in built]
    services: list[Service] = []
    if settings.audio is not None:  # keyword spotting: its own model, engine and sources
        a = settings.audio
        publisher = keywords_service.MqttEventPublisher(link, a.topic, a.qos)
        services.append(keywords_service.build(a, publisher, registry))

    # -- operations: systemd readiness and status, the watchdog, SIGHUP reloads --
    notifier = Notifier(env.notify_socket)
    watchdog = EngineWatchdog(
        _call_all([r.worker for r in routes]), notifier, watchdog_s=env.watchdog_s
    )
    metrics.engine_stall.set_function(watchdog.stall_s)

    exporter = None
    if settings.metrics.enabled:
        bind, port = settings.metrics.bind, settings.metrics.port
        view = StatusView(
            routes=[b.status for b in built],
            link=link,
            watchdog=watchdog,
            max_streams=settings.metrics.status_streams,
        )

        def exporter() -> Exporter:
            return Exporter(registry, bind, port, view.routes())

    def describe() -> str:
        broker = "connected" if link.connected else "disconnected"
        stalled = "; ENGINE STALLED" if watchdog.stalled else ""
        serving = ", ".join(
            f"{r.engine.model.spec.name} {r.engine.model.spec.version}: {r.engine.streams} "
            f"streams, queue {r.worker.depth}"
            for r in routes
        )
        return f"serving {serving}, broker {broker}{stalled}"

    by_name = {b.route.name: b for b in built}
    reloader = Reloader(
        settings,
        models,
        load_settings=config.load,
        load_model=load_route_model,
        check=check_route_model,
        swap=lambda name, new: by_name[name].swap(new),
        metrics={b.route.name: b.metrics for b in built},
        notifier=notifier,
    )
    return Daemon(
        routes=routes,
        link=link,
        metrics=metrics,
        checkpoint=settings.checkpoint,
        exporter=exporter,
        services=services,
        tick_hooks=(watchdog.tick, StatusLine(notifier, describe).tick),
        notifier=notifier,
        reload=reloader,
        acks=acks,
    )


@dataclass(frozen=True, slots=True)
class _Built:
    route: Route
    status: RouteStatus
    metrics: Metrics
    swap: Callable[[StepModel], Future[bool]]


def _route(
    settings: Settings,
    r: RouteConfig,
    model: StepModel,
    link: Link,
    metrics: Metrics,
    acks: AckLedger | None,
    unrouted: Unrouted | None,
) -> _Built:
    """One model's parts: engine, worker, sink, source, all on the shared link."""
    spec = model.spec
    out = r.output
    metrics.set_model(
        name=spec.name, version=spec.version, provider=model.provider, opset=spec.opset
    )
    metrics.set_task(spec.task)
    metrics.set_labels(spec.labels if spec.task == "classify" else ())
    errors = ErrorReporter(
        link,
        settings.error_topic(),
        rate_per_s=out.error_rate_per_s,
        burst=out.error_burst,
        metrics=metrics,
    )
    engine = Engine(model, settings.engine, observer=metrics)
    policy = None
    if out.every_k > 1 or out.on_change:
        policy = PublishPolicy(out.every_k, out.on_change, settings.engine.max_streams)
    last = LastPredictions(lambda stream: stream in engine.store, settings.engine.max_streams)
    sink = PredictionSink(
        link,
        PredictionEncoder(spec),
        out,
        metrics=metrics,
        errors=errors,
        policy=policy,
        last=last,
    )
    queue = settings.queue
    worker = Worker(
        engine,
        sink,
        max_queue=queue.max_size,
        max_batch=settings.engine.max_batch,
        max_wait_ms=queue.max_wait_ms,
        overflow=queue.overflow,
    )
    metrics.track(streams=lambda: engine.streams, depth=lambda: worker.depth)
    metrics.queue_capacity.set(queue.max_size)
    decoder = Decoder(
        spec.n_features,
        max_payload_bytes=r.input.max_payload_bytes,
        max_steps=settings.engine.max_chunk,
        features=spec.features,
    )
    channels = None
    if r.input.channel_topic is not None:  # one topic per feature
        channels = Assembler(
            spec.features,
            max_pending=r.input.channel_max_pending,
            max_streams=settings.engine.max_streams,
            max_seq_jump=settings.engine.max_seq_jump,
        )
    source = MqttSource(
        link,
        decoder,
        worker,
        r.input,
        metrics=metrics,
        errors=errors,
        acks=acks,
        max_tracked=settings.engine.max_streams,
        channels=channels,
        unrouted=unrouted,
    )

    def swap(new: StepModel) -> Future[bool]:
        encoder = PredictionEncoder(new.spec)
        labels = new.spec.labels if new.spec.task == "classify" else ()

        def on_engine(e: Engine) -> bool:  # between two batches: nothing else runs
            kept = e.swap_model(new)
            sink.use_encoder(encoder)
            metrics.set_task(new.spec.task)
            metrics.set_labels(labels)
            return kept

        return worker.call(on_engine)

    status = RouteStatus(
        name=r.name,
        engine=engine,
        call=worker.call,
        last=last,
        metrics=metrics,
        depth=lambda: worker.depth,
        capacity=queue.max_size,
    )
    return _Built(Route(r.name, engine, worker, source, r.checkpoint), status, metrics, swap)


def _call_all(workers: list[Worker]) -> Callable[[Callable[[Engine], None]], Future[None]]:
    """The watchdog's probe on every route's engine: done once all of them answered, so
    one stuck engine stalls the daemon's readiness and its systemd watchdog."""
    if len(workers) == 1:
        return workers[0].call

    def call(fn: Callable[[Engine], None]) -> Future[None]:
        done: Future[None] = Future()
        left = [len(workers)]
        lock = threading.Lock()

        def answered(_: Future[None]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                done.set_result(None)

        for w in workers:
            w.call(fn).add_done_callback(answered)
        return done

    return call
