"""Composition root: the one place that builds the daemon's parts from settings.

Every other module receives its collaborators through its constructor; only this one
names the concrete classes and decides how they are wired::

    broker -> Link -> MqttSource -> Decoder -> Worker(Engine(StepModel)) -> PredictionSink -> Link
                                 \\-> ErrorReporter <-/           \\-> Metrics (observer)
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

from prometheus_client import CollectorRegistry, disable_created_metrics

from pipeline.daemon import config
from pipeline.daemon.config import Settings
from pipeline.daemon.lifecycle import Daemon, Service
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
from pipeline.daemon.status import StatusView
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
from pipeline.telemetry.metrics import Exporter, Metrics
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


def load_model(settings: Settings) -> StepModel:
    """The configured model; with ``model.sha256`` the bytes loaded are the bytes hashed."""
    cfg = settings.model
    return StepModel.load(cfg.path, cfg.providers, cfg.threads, sha256=cfg.sha256)


def check_model(settings: Settings, model: StepModel) -> None:
    """What the daemon's settings require of a model (at start and at every reload)."""
    spec = model.spec
    if settings.output.on_change and spec.task != "classify":
        raise ConfigError(f"output.on_change: needs a classify model; {spec.name} is {spec.task}")


def build(
    settings: Settings, registry: CollectorRegistry | None = None, env: ServiceEnv | None = None
) -> Daemon:
    """Everything ``seqstream run`` needs, built but not started.

    ``env``: what systemd passed (notify socket, watchdog, state directory); by default
    none, as outside systemd.
    """
    env = env if env is not None else ServiceEnv()
    model = load_model(settings)
    spec = model.spec
    out = settings.output
    check_model(settings, model)
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
    )
    metrics.set_model(
        name=spec.name, version=spec.version, provider=model.provider, opset=spec.opset
    )
    metrics.set_task(spec.task)
    metrics.set_labels(spec.labels if spec.task == "classify" else ())
    if env.state_directory is not None:
        metrics.set_exits(record_exit(env.state_directory))
    metrics.broker_connected.set(0)

    link = Link(settings.mqtt, observer=metrics)
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
        max_payload_bytes=settings.input.max_payload_bytes,
        max_steps=settings.engine.max_chunk,
        features=spec.features,
    )
    ckpt = settings.checkpoint
    acks = AckLedger(link, ckpt.max_unacked) if ckpt.ack_after_checkpoint else None
    channels = None
    if settings.input.channel_topic is not None:  # one topic per feature
        channels = Assembler(
            spec.features,
            max_pending=settings.input.channel_max_pending,
            max_streams=settings.engine.max_streams,
            max_seq_jump=settings.engine.max_seq_jump,
        )
    source = MqttSource(
        link,
        decoder,
        worker,
        settings.input,
        metrics=metrics,
        errors=errors,
        acks=acks,
        max_tracked=settings.engine.max_streams,
        channels=channels,
    )
    services: list[Service] = []
    if settings.audio is not None:  # keyword spotting: its own model, engine and sources
        a = settings.audio
        publisher = keywords_service.MqttEventPublisher(link, a.topic, a.qos)
        services.append(keywords_service.build(a, publisher, registry))

    # -- operations: systemd readiness and status, the watchdog, SIGHUP reloads --
    notifier = Notifier(env.notify_socket)
    watchdog = EngineWatchdog(worker.call, notifier, watchdog_s=env.watchdog_s)
    metrics.engine_stall.set_function(watchdog.stall_s)

    exporter = None
    if settings.metrics.enabled:
        bind, port = settings.metrics.bind, settings.metrics.port
        view = StatusView(
            engine=engine,
            call=worker.call,
            last=last,
            metrics=metrics,
            link=link,
            watchdog=watchdog,
            depth=lambda: worker.depth,
            capacity=queue.max_size,
            max_streams=settings.metrics.status_streams,
        )

        def exporter() -> Exporter:
            return Exporter(registry, bind, port, view.routes())

    def describe() -> str:
        s = engine.model.spec
        broker = "connected" if link.connected else "disconnected"
        stalled = "; ENGINE STALLED" if watchdog.stalled else ""
        return (
            f"serving {s.name} {s.version}: {engine.streams} streams, queue {worker.depth}, "
            f"broker {broker}{stalled}"
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

    reloader = Reloader(
        settings,
        model,
        load_settings=config.load,
        load_model=load_model,
        check=check_model,
        swap=swap,
        metrics=metrics,
        notifier=notifier,
    )
    return Daemon(
        engine=engine,
        worker=worker,
        link=link,
        source=source,
        metrics=metrics,
        checkpoint=settings.checkpoint,
        exporter=exporter,
        services=services,
        tick_hooks=(watchdog.tick, StatusLine(notifier, describe).tick),
        notifier=notifier,
        reload=reloader,
        acks=acks,
    )
