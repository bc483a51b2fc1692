"""The daemon's TOML configuration: parsed and validated once, then frozen.

:func:`load` reads one file and returns :class:`Settings`, a tree of frozen dataclasses
with every value type-checked and range-checked. Any problem -- an unknown key, a wrong
type, an impossible value, an unreadable secret -- raises one :class:`ConfigError` that
names the file and the dotted key (``seqstream.toml: mqtt.port: must be 1..65535, got 0``),
so a typo fails at start instead of being silently ignored. Nothing downstream parses
configuration again; collaborators receive the section they need.

Relative paths are resolved against the config file's directory, so a config and the
files it names can move together. The broker password is read here (from a file or an
environment variable) into a :class:`Secret`, whose ``repr`` hides it, so no log line or
traceback that prints the settings can leak it.

Several models in one daemon: ``[[route]]`` tables, each with ``name`` (the ``model``
label of its metrics), ``[route.model]``, ``[route.input]`` and ``[route.output]`` (the
same keys as the top-level tables; both topics required), instead of the top-level
``[model]``, ``[input]`` and ``[output]`` that make a single-model config's one route,
named ``default``. ``[engine]``, ``[queue]`` and ``[checkpoint]`` apply to every route,
each with its own engine, queue and state file. A topic that two routes' input
templates could both match, or two routes' prediction templates, is refused here:
each message goes to one model. Cluster mode serves one model.

Topic templates use one notation everywhere: ``{stream}`` marks the topic level that
carries the stream id, e.g. ``sensors/{stream}/data``. An input template is subscribed
with that level replaced by ``+``; an output template is filled with the stream id.
``{client_id}`` may appear in the status and error topics.

An input template may also hold ``+`` levels, matched but not part of the id
(``site/+/dev/{stream}/telemetry``), and ``{stream}`` at several levels, whose values
joined by ``/`` make the id (``site/{stream}/dev/{stream}/telemetry`` reads
``site/s1/dev/7/telemetry`` as stream ``s1/7``, predicted on ``predictions/s1/7``), so
ids stay unique when device names repeat across sites. The reset template has as many
``{stream}`` levels (the same ids) and matches no topic the data template matches.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from pipeline.engine.engine import EngineSettings
from pipeline.engine.worker import Overflow
from pipeline.errors import ConfigError
from pipeline.keywords.detector import DetectorSettings
from pipeline.keywords.service import AudioSettings, WavFileSettings
from pipeline.model import PROVIDERS
from pipeline.sinks.mqtt import OutputConfig
from pipeline.sources.microphone import MicrophoneSettings
from pipeline.sources.mqtt import InputConfig
from pipeline.transport.mqtt import PROTOCOLS, MqttConfig, Secret, TlsConfig, host_problem
from pipeline.transport.topics import CHANNEL, CLIENT_ID, STREAM

T = TypeVar("T")
log = logging.getLogger(__name__)

OVERFLOW: tuple[str, ...] = ("block", "drop")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    path: Path
    providers: tuple[str, ...] = ("cpu",)
    threads: int = 1
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class CheckpointConfig:
    path: Path | None = None  # None: no checkpoints, streams start fresh after a restart
    interval_s: float = 60.0
    # Lossless across a crash: acknowledge sensor messages only once a checkpoint covers
    # their steps (pipeline.sources.acks); a checkpoint is also taken when max_unacked wait.
    ack_after_checkpoint: bool = False
    max_unacked: int = 10_000


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """The hand-off between the network thread and the engine's worker."""

    max_size: int = 10_000
    overflow: Overflow = "block"
    # How long the worker waits for more steps to fill a batch. 0: run what is queued at
    # once; batches still grow under load from what queues while the engine is busy,
    # and a lone message is not held back (measured: p50 0.5 ms vs 1.7 ms with 1 ms).
    max_wait_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = 9108
    status_streams: int = 100  # streams /status and the page list (newest first)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``[cluster]``: share the streams with other daemons over NATS JetStream
    (:mod:`pipeline.cluster`). ``partitions`` must equal the servers' subject mapping
    and never change once data flows: a stream's partition is a hash mod this number."""

    servers: tuple[str, ...]
    member: str
    group: str = "seqstream"
    partitions: int = 64
    replicas: int = 3  # of the key-value buckets and the per-partition input holders
    lease_ttl_s: float = 3.0
    checkpoint_interval_s: float = 5.0
    fetch_batch: int = 256
    input_max_age_s: float = 86_400.0  # input older than this is dropped by JetStream


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One model of the daemon (``[[route]]``): its topics, its model, its own engine
    (state store, publish policy) built from the shared ``[engine]`` settings, and
    ``name``, the ``model`` label of its metrics. A config without ``[[route]]`` has one,
    named ``default``, made of ``[model]``, ``[input]`` and ``[output]``."""

    name: str
    model: ModelConfig
    input: InputConfig
    output: OutputConfig
    # Its own state file: checkpoint.path itself for a single route, else the path with
    # ".NAME" before the suffix (state.ckpt -> state.motion.ckpt); None: no checkpoints.
    checkpoint: Path | None = None


DEFAULT_ROUTE = "default"


@dataclass(frozen=True, slots=True)
class Settings:
    """``model``, ``input`` and ``output`` are the first route's (the only one of a
    single-model config, and the one cluster mode serves); ``routes`` lists them all."""

    source: Path
    model: ModelConfig
    engine: EngineSettings
    checkpoint: CheckpointConfig
    queue: QueueConfig
    mqtt: MqttConfig
    input: InputConfig
    output: OutputConfig
    metrics: MetricsConfig
    audio: AudioSettings | None = None  # [audio]: keyword spotting on microphones
    cluster: ClusterConfig | None = None  # [cluster]: many daemons over NATS (else MQTT)
    routes: tuple[RouteConfig, ...] = ()

    def error_topic(self) -> str | None:
        topic = self.output.error_topic
        return None if topic is None else topic.replace(CLIENT_ID, self.mqtt.client_id)


def load(path: str | Path) -> Settings:
    """Read and validate ``path``; the only way settings come into being."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    try:
        return parse(doc, base=path.parent.resolve(), source=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse(doc: dict[str, Any], *, base: Path, source: Path) -> Settings:
    """Validate an already-decoded TOML document; errors name the dotted key only."""
    root = _Table(doc, "", base)
    checkpoint = _checkpoint(root.table("checkpoint"))
    if "route" in doc:
        for key in ("model", "input", "output"):
            if key in doc:
                root.fail(key, f"give [route.{key}] in each [[route]], not [{key}] beside them")
        routes = tuple(_route(t, checkpoint.path) for t in root.tables("route"))
        if not routes:
            root.fail("route", "must hold at least one [[route]]")
        _check_routes(root, routes)
    else:
        routes = (
            RouteConfig(
                name=DEFAULT_ROUTE,
                model=_model(root.table("model", required=True)),
                input=_input(root.table("input")),
                output=_output(root.table("output")),
                checkpoint=checkpoint.path,
            ),
        )
    first = routes[0]
    settings = Settings(
        source=source,
        model=first.model,
        engine=_engine(root.table("engine")),
        checkpoint=checkpoint,
        queue=_queue(root.table("queue")),
        mqtt=_mqtt(root.table("mqtt")),
        input=first.input,
        output=first.output,
        metrics=_metrics(root.table("metrics")),
        audio=_audio(root.table("audio")) if "audio" in doc else None,
        cluster=_cluster(root.table("cluster")) if "cluster" in doc else None,
        routes=routes,
    )
    if settings.cluster is not None and "route" in doc:
        root.fail("route", "cluster mode serves one model: use [model], [input], [output]")
    if settings.checkpoint.ack_after_checkpoint:
        for i, r in enumerate(routes):
            if r.input.qos != 1:
                key = "input.qos" if "route" not in doc else f"route[{i}].input.qos"
                root.fail("checkpoint.ack_after_checkpoint", f"needs {key} = 1, got {r.input.qos}")
    root.done()
    return settings


def _route(t: _Table, checkpoint: Path | None) -> RouteConfig:
    name = t.text("name", "")
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_" for c in name):
        t.fail("name", f"must be 1-64 letters, digits, '-' or '_', got {name!r}")
    model = _model(t.table("model", required=True))
    tables = {key: t.table(key, required=True) for key in ("input", "output")}
    for table in tables.values():
        if "topic" not in table.doc:
            table.fail("topic", "is required in a [[route]] (each route has its own topics)")
    cfg = RouteConfig(
        name=name,
        model=model,
        input=_input(tables["input"]),
        output=_output(tables["output"]),
        checkpoint=None
        if checkpoint is None
        else checkpoint.with_name(f"{checkpoint.stem}.{name}{checkpoint.suffix}"),
    )
    t.done()
    return cfg


def _check_routes(root: _Table, routes: tuple[RouteConfig, ...]) -> None:
    """Names unique; no topic taken by two routes (it would be predicted twice, with
    two states), no prediction topic written by two (one stream's predictions would mix)."""
    seen: dict[str, int] = {}
    for i, r in enumerate(routes):
        if r.name in seen:
            root.fail(f"route[{i}].name", f"{r.name!r} is also route[{seen[r.name]}]'s name")
        seen[r.name] = i
    inputs = [(i, f, key) for i, r in enumerate(routes) for key, f in _input_filters(r.input)]
    for n, (i, a, ka) in enumerate(inputs):
        for j, b, kb in inputs[:n]:
            if j != i and _filters_overlap(a, b):
                root.fail(
                    f"route[{i}].input.{ka}",
                    f"{a!r} overlaps route[{j}].input.{kb} {b!r} ({routes[j].name}): "
                    "a topic matching both would go to two models; make them differ",
                )
    for i, r in enumerate(routes):
        for j in range(i):
            a, b = r.output.topic, routes[j].output.topic
            if _filters_overlap(a, b):
                root.fail(
                    f"route[{i}].output.topic",
                    f"{a!r} overlaps route[{j}].output.topic {b!r} ({routes[j].name}): "
                    "two models' predictions would mix on one topic",
                )


def _input_filters(cfg: InputConfig) -> list[tuple[str, str]]:
    """The input templates of a route as filters (``{channel}`` as a ``+`` level)."""
    out = [("topic", cfg.topic)]
    if cfg.reset_topic is not None:
        out.append(("reset_topic", cfg.reset_topic))
    if cfg.channel_topic is not None:
        out.append(("channel_topic", cfg.channel_topic.replace(CHANNEL, "+")))
    return out


def _model(t: _Table) -> ModelConfig:
    providers = t.strings("providers", ("cpu",))
    if not providers:
        t.fail("providers", "must name at least one provider")
    for p in providers:
        if p not in PROVIDERS:
            t.fail("providers", f"unknown provider {p!r}; use {', '.join(PROVIDERS)}")
    sha = t.opt_text("sha256")
    if sha is not None:
        sha = sha.lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            t.fail("sha256", "must be 64 hex digits")
    path = t.path("path", required=True)
    if path is None:
        t.fail("path", "is required")
    cfg = ModelConfig(
        path=path,
        providers=providers,
        threads=t.integer("threads", 1, lo=1, hi=256),
        sha256=sha,
    )
    t.done()
    return cfg


def _engine(t: _Table) -> EngineSettings:
    d = EngineSettings()
    max_streams = t.integer("max_streams", d.max_streams, lo=1)
    tolerance = t.integer("seq_gap_tolerance", d.seq_gap_tolerance, lo=0)
    jump = t.opt_integer("max_seq_jump", d.max_seq_jump, lo=1)
    if jump is not None and jump < tolerance:
        t.fail("max_seq_jump", f"must be >= seq_gap_tolerance ({tolerance}), or false for off")
    cfg = EngineSettings(
        max_streams=max_streams,
        idle_timeout_s=t.opt_number("idle_timeout_s", d.idle_timeout_s, positive=True),
        seq_gap_tolerance=tolerance,
        max_seq_jump=jump,
        ts_gap_tolerance_s=t.opt_number("ts_gap_tolerance_s", d.ts_gap_tolerance_s, positive=True),
        max_batch=t.integer("max_batch", d.max_batch, lo=1, hi=65_536),
        max_chunk=t.integer("max_chunk", d.max_chunk, lo=1, hi=65_535),
        check_state=t.flag("check_state", d.check_state),
        initial_capacity=min(d.initial_capacity, max_streams),
    )
    t.done()
    return cfg


def _checkpoint(t: _Table) -> CheckpointConfig:
    d = CheckpointConfig()
    path = t.path("path")
    if path is not None and not path.parent.is_dir():
        t.fail("path", f"directory {path.parent} does not exist")
    cfg = CheckpointConfig(
        path=path,
        interval_s=t.number("interval_s", d.interval_s, lo=1.0),
        ack_after_checkpoint=t.flag("ack_after_checkpoint", d.ack_after_checkpoint),
        # twice this stays below mosquitto's 65535 packet ids (see Daemon._save_running)
        max_unacked=t.integer("max_unacked", d.max_unacked, lo=1, hi=30_000),
    )
    if cfg.ack_after_checkpoint and path is None:
        t.fail("ack_after_checkpoint", "needs checkpoint.path")
    t.done()
    return cfg


def _queue(t: _Table) -> QueueConfig:
    d = QueueConfig()
    cfg = QueueConfig(
        max_size=t.integer("max_size", d.max_size, lo=1),
        overflow="drop" if t.choice("overflow", d.overflow, OVERFLOW) == "drop" else "block",
        max_wait_ms=t.number("max_wait_ms", d.max_wait_ms, lo=0.0, hi=10_000.0),
    )
    t.done()
    return cfg


def _mqtt(t: _Table) -> MqttConfig:
    d = MqttConfig()
    host = t.text("host", d.host)
    problem = host_problem(host)
    if problem:
        t.fail("host", problem)
    client_id = t.text("client_id", d.client_id)
    if not client_id or len(client_id.encode()) > 65_535:
        t.fail("client_id", "must be a non-empty string")
    clean = t.flag("clean_session", d.clean_session)
    password_file = t.path("password_file")
    password_env = t.opt_text("password_env")
    if password_file is not None and password_env is not None:
        t.fail("password_file", "give password_file or password_env, not both")
    password = _password(t, password_file, password_env)
    username = t.opt_text("username")
    if password is not None and username is None:
        t.fail("username", "is required when a password is configured")
    lo = t.integer("reconnect_min_s", d.reconnect_min_s, lo=1, hi=3600)
    hi = t.integer("reconnect_max_s", d.reconnect_max_s, lo=1, hi=3600)
    if hi < lo:
        t.fail("reconnect_max_s", f"must be >= reconnect_min_s ({lo}), got {hi}")
    status = t.text("status_topic", d.status_topic)
    _check_publish_topic(t, "status_topic", status, stream=False)
    tls = _tls(t.table("tls")) if "tls" in t.doc else None
    cfg = MqttConfig(
        host=host,
        port=t.integer("port", 8883 if tls else d.port, lo=1, hi=65_535),
        protocol=t.choice("protocol", d.protocol, PROTOCOLS),
        client_id=client_id,
        clean_session=clean,
        session_expiry_s=t.integer("session_expiry_s", d.session_expiry_s, lo=0, hi=0xFFFFFFFF),
        keepalive_s=t.integer("keepalive_s", d.keepalive_s, lo=5, hi=65_535),
        connect_timeout_s=t.number("connect_timeout_s", d.connect_timeout_s, lo=0.1, hi=3600.0),
        reconnect_min_s=lo,
        reconnect_max_s=hi,
        max_inflight=t.integer("max_inflight", d.max_inflight, lo=1, hi=65_535),
        max_queued_out=t.integer("max_queued_out", d.max_queued_out, lo=0),
        username=username,
        password=password,
        tls=tls,
        status_topic=status,
    )
    t.done()
    return cfg


def _password(t: _Table, file: Path | None, env: str | None) -> Secret | None:
    if file is not None:
        try:
            value = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            t.fail("password_file", f"cannot read {file} ({reason})")
        value = value.rstrip("\r\n")
        if not value:
            t.fail("password_file", f"{file} is empty")
        if file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("mqtt.password_file: %s is readable by other users; chmod 600 it", file)
        return Secret(value)
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            t.fail("password_env", f"environment variable {env} is not set or empty")
        return Secret(value)
    return None


def _tls(t: _Table) -> TlsConfig:
    cfg = TlsConfig(
        ca_file=t.path("ca_file", must_exist=True),
        cert_file=t.path("cert_file", must_exist=True),
        key_file=t.path("key_file", must_exist=True),
    )
    if (cfg.cert_file is None) != (cfg.key_file is None):
        t.fail("cert_file", "a client certificate needs both cert_file and key_file")
    t.done()
    return cfg


def _input(t: _Table) -> InputConfig:
    d = InputConfig()
    topic = t.text("topic", d.topic)
    _check_input_topic(t, "topic", topic)
    reset = t.opt_text("reset_topic", d.reset_topic)
    if reset == "":
        reset = None  # "" disables resets, as TOML has no null
    if reset is not None:
        _check_input_topic(t, "reset_topic", reset)
        if _filters_overlap(reset, topic):
            t.fail("reset_topic", f"must differ from topic: both match some topics ({topic!r})")
        if reset.split("/").count(STREAM) != topic.split("/").count(STREAM):
            t.fail("reset_topic", f"must have as many {STREAM} levels as topic ({topic!r})")
    channels = t.opt_text("channel_topic", d.channel_topic) or None  # "": off
    if channels is not None:
        levels = channels.split("/")
        if levels.count(CHANNEL) != 1 or channels.count(CHANNEL) != 1:
            t.fail("channel_topic", f"must contain {CHANNEL} once, as a whole level")
        _check_input_topic(t, "channel_topic", channels.replace(CHANNEL, "+"))
        for other in (topic, reset):
            if other is not None and _filters_overlap(channels.replace(CHANNEL, "+"), other):
                t.fail("channel_topic", f"must differ from {other!r}: both match some topics")
        if reset is not None and channels.count(STREAM) != reset.split("/").count(STREAM):
            t.fail("channel_topic", f"must have as many {STREAM} levels as reset_topic")
    cfg = InputConfig(
        topic=topic,
        reset_topic=reset,
        channel_topic=channels,
        channel_max_pending=t.integer("channel_max_pending", d.channel_max_pending, lo=1, hi=4096),
        qos=t.integer("qos", d.qos, lo=0, hi=2),
        max_payload_bytes=t.integer("max_payload_bytes", d.max_payload_bytes, lo=16, hi=256 << 20),
        max_stream_id_bytes=t.integer(
            "max_stream_id_bytes", d.max_stream_id_bytes, lo=1, hi=65_535
        ),
        reset_min_interval_s=t.number("reset_min_interval_s", d.reset_min_interval_s, lo=0),
    )
    t.done()
    return cfg


def _output(t: _Table) -> OutputConfig:
    d = OutputConfig()
    topic = t.text("topic", d.topic)
    _check_publish_topic(t, "topic", topic, stream=True)
    errors = t.opt_text("error_topic", d.error_topic)
    if errors == "":
        errors = None
    if errors is not None:
        _check_publish_topic(t, "error_topic", errors, stream=False)
    cfg = OutputConfig(
        topic=topic,
        qos=t.integer("qos", d.qos, lo=0, hi=2),
        retain=t.flag("retain", d.retain),
        every_k=t.integer("every_k", d.every_k, lo=1),
        on_change=t.flag("on_change", d.on_change),
        error_topic=errors,
        error_rate_per_s=t.number("error_rate_per_s", d.error_rate_per_s, lo=0.0),
        error_burst=t.integer("error_burst", d.error_burst, lo=1),
    )
    t.done()
    return cfg


def _cluster(t: _Table) -> ClusterConfig:
    servers = t.strings("servers", ())
    if not servers or not all(s.startswith(("nats://", "tls://")) for s in servers):
        t.fail("servers", f"must list nats:// or tls:// URLs, got {list(servers)!r}")
    member = t.text("member", socket.gethostname())
    group = t.text("group", "seqstream")
    for key, name in (("member", member), ("group", group)):
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            t.fail(key, f"must be letters, digits, '-' or '_', got {name!r}")
    ttl = t.number("lease_ttl_s", 3.0, lo=1.0, hi=300.0)
    cfg = ClusterConfig(
        servers=servers,
        member=member,
        group=group,
        partitions=t.integer("partitions", 64, lo=1, hi=4096),
        replicas=t.integer("replicas", 3, lo=1, hi=5),
        lease_ttl_s=ttl,
        checkpoint_interval_s=t.number("checkpoint_interval_s", 5.0, lo=0.1),
        fetch_batch=t.integer("fetch_batch", 256, lo=1, hi=65_536),
        input_max_age_s=t.number("input_max_age_s", 86_400.0, lo=ttl * 10),
    )
    t.done()
    return cfg


def _metrics(t: _Table) -> MetricsConfig:
    d = MetricsConfig()
    bind = t.text("bind", d.bind)
    if not bind:
        t.fail("bind", "must not be empty")
    cfg = MetricsConfig(
        enabled=t.flag("enabled", d.enabled),
        bind=bind,
        port=t.integer("port", d.port, lo=0, hi=65_535),
        status_streams=t.integer("status_streams", d.status_streams, lo=1, hi=10_000),
    )
    t.done()
    return cfg


def _audio(t: _Table) -> AudioSettings:
    """``[audio]``: the keyword model, detection, output topic and the audio sources."""
    model = t.path("model", required=True)
    if model is None:
        t.fail("model", "is required")
    providers = t.strings("providers", ("cpu",))
    for p in providers:
        if p not in PROVIDERS:
            t.fail("providers", f"unknown provider {p!r}; use {', '.join(PROVIDERS)}")
    topic = t.text("topic", "audio/{stream}/keyword")
    _check_publish_topic(t, "topic", topic, stream=True)
    d = DetectorSettings()
    detector = t.build(
        DetectorSettings,
        threshold=t.number("threshold", d.threshold),
        smooth_ms=t.number("smooth_ms", d.smooth_ms),
        refractory_ms=t.number("refractory_ms", d.refractory_ms),
        background=t.strings("background", d.background),
    )
    cfg = t.build(
        AudioSettings,
        model=model,
        providers=providers or ("cpu",),
        threads=t.integer("threads", 1, lo=1, hi=256),
        topic=topic,
        qos=t.integer("qos", 1, lo=0, hi=2),
        detector=detector,
        max_queue=t.integer("max_queue", 256),
        microphones=tuple(_microphone(m) for m in t.tables("microphone")),
        files=tuple(_wavfile(f) for f in t.tables("wavfile")),
    )
    t.done()
    return cfg


def _source_name(t: _Table) -> str:
    name = t.text("name", "")
    if not name or any(c in name for c in "/+#{}\0"):
        t.fail("name", f"must be a non-empty topic level without / + # {{ }}, got {name!r}")
    return name


def _microphone(t: _Table) -> MicrophoneSettings:
    """Types only: :class:`MicrophoneSettings` checks the values."""
    d = MicrophoneSettings()
    device = t.doc.get("device")
    t.seen.add("device")
    if device is not None and not (isinstance(device, str) and device) and not _is_int(device):
        t.fail("device", f"must be a device name or index, got {_kind(device)} {device!r}")
    rate = t.doc.get("sample_rate_hz")
    cfg = t.build(
        MicrophoneSettings,
        name=t.text("name", ""),
        device=device,
        sample_rate_hz=None if rate is None else t.integer("sample_rate_hz", 0),
        channels=t.integer("channels", d.channels),
        block_size=t.integer("block_size", d.block_size),
        buffer_ms=t.number("buffer_ms", d.buffer_ms),
        silence_timeout_s=t.opt_number("silence_timeout_s", d.silence_timeout_s, positive=False),
        stall_s=t.number("stall_s", d.stall_s),
        retry_min_s=t.number("retry_min_s", d.retry_min_s),
        retry_max_s=t.number("retry_max_s", d.retry_max_s),
        latency=t.text("latency", d.latency),
    )
    t.done()
    return cfg


def _wavfile(t: _Table) -> WavFileSettings:
    path = t.path("path", required=True, must_exist=True)
    if path is None:
        t.fail("path", "is required")
    cfg = WavFileSettings(
        name=_source_name(t),
        path=path,
        realtime=t.flag("realtime", True),
        block_size=t.integer("block_size", 320, lo=16, hi=1 << 20),
    )
    t.done()
    return cfg


def _check_input_topic(t: _Table, key: str, topic: str) -> None:
    levels = topic.split("/")
    n = levels.count(STREAM)
    if n == 0 or topic.count(STREAM) != n:
        t.fail(key, f"must contain {STREAM} once or more, each a whole topic level, got {topic!r}")
    if "#" in topic or "\0" in topic or any("+" in x and x != "+" for x in levels):
        t.fail(key, f"must not contain MQTT wildcards but whole + levels, got {topic!r}")
    if "{" in topic.replace(STREAM, "") or "}" in topic.replace(STREAM, ""):
        t.fail(key, f"only {STREAM} may appear in braces, got {topic!r}")


def _filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both input templates (it would be taken twice)."""
    la, lb = a.split("/"), b.split("/")
    wild = ("+", STREAM)
    if len(la) != len(lb):
        return False
    return all(x == y or x in wild or y in wild for x, y in zip(la, lb, strict=True))


def _check_publish_topic(t: _Table, key: str, topic: str, *, stream: bool) -> None:
    if not topic:
        t.fail(key, "must not be empty")
    if "+" in topic or "#" in topic or "\0" in topic:
        t.fail(key, f"must not contain MQTT wildcards, got {topic!r}")
    rest = topic.replace(CLIENT_ID, "")
    if stream:
        if rest.count(STREAM) != 1:
            t.fail(key, f"must contain {STREAM} exactly once, got {topic!r}")
        rest = rest.replace(STREAM, "")
    if "{" in rest or "}" in rest:
        allowed = f"{STREAM} and {CLIENT_ID}" if stream else CLIENT_ID
        t.fail(key, f"only {allowed} may appear in braces, got {topic!r}")


class _Table:
    """One TOML table being read: typed getters, then :meth:`done` rejects leftovers."""

    def __init__(self, doc: dict[str, Any], where: str, base: Path) -> None:
        self.doc = doc
        self.where = where
        self.base = base
        self.seen: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(f"{self.key(key)}: {problem}")

    def build(self, cls: Callable[..., T], **values: Any) -> T:
        """``cls(**values)``, its own check's error (``field: problem``) named from here.

        A settings type checks its values itself, once, in its owner's module; this
        reader only reads them with the right types and says where they came from.
        """
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(self.key(str(exc))) from None

    def _get(self, key: str, required: bool) -> Any:
        self.seen.add(key)
        if key not in self.doc:
            if required:
                self.fail(key, "is required")
            return None
        return self.doc[key]

    def table(self, key: str, *, required: bool = False) -> _Table:
        value = self._get(key, required)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(key, f"must be a table, got {_kind(value)}")
        return _Table(value, self.key(key), self.base)

    def tables(self, key: str) -> list[_Table]:
        """An array of tables (``[[key]]``; one ``[key]`` table counts as one); absent: none."""
        value = self._get(key, False)
        if value is None:
            return []
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.fail(key, f"must be an array of tables ([[{self.key(key)}]]), got {_kind(value)}")
        return [_Table(v, f"{self.key(key)}[{i}]", self.base) for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self.doc) - self.seen)
        if unknown:
            self.fail(unknown[0], "unknown key")

    def _typed(self, key: str, default: T, check: Callable[[Any], bool], kind: str) -> T:
        value = self._get(key, False)
        if value is None:
            return default
        if not check(value):
            self.fail(key, f"must be {kind}, got {_kind(value)} {value!r}")
        return value  # type: ignore[no-any-return]

    def text(self, key: str, default: str) -> str:
        return self._typed(key, default, lambda v: isinstance(v, str), "a string")

    def opt_text(self, key: str, default: str | None = None) -> str | None:
        return self._typed(key, default, lambda v: isinstance(v, str), "a string")

    def flag(self, key: str, default: bool) -> bool:
        return self._typed(key, default, lambda v: isinstance(v, bool), "true or false")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(key, default)
        if value not in choices:
            self.fail(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def integer(
        self, key: str, default: int, *, lo: int | None = None, hi: int | None = None
    ) -> int:
        value = self._typed(key, default, _is_int, "an integer")
        self._range(key, value, lo, hi)
        return value

    def opt_integer(self, key: str, default: int | None, *, lo: int | None = None) -> int | None:
        """An integer, or ``false``/absent for "off" (TOML has no null)."""
        value = self._get(key, False)
        if value is None or value is False:
            return default if value is None else None
        if not _is_int(value):
            self.fail(key, f"must be an integer or false, got {_kind(value)} {value!r}")
        self._range(key, value, lo, None)
        return int(value)

    def number(
        self, key: str, default: float, *, lo: float | None = None, hi: float | None = None
    ) -> float:
        value = self._float(key, self._typed(key, default, _is_number, "a number"))
        if not math.isfinite(value):
            self.fail(key, f"must be finite, got {value}")
        self._range(key, value, lo, hi)
        return value

    def opt_number(self, key: str, default: float | None, *, positive: bool) -> float | None:
        """A number, or ``false`` for "off"."""
        value = self._get(key, False)
        if value is None or value is False:
            return default if value is None else None
        if not _is_number(value):
            self.fail(key, f"must be a number or false, got {_kind(value)} {value!r}")
        value = self._float(key, value)
        if not math.isfinite(value) or (positive and value <= 0):
            self.fail(key, f"must be a finite number > 0 (or false for off), got {value}")
        return float(value)

    def _float(self, key: str, value: float) -> float:
        try:
            return float(value)
        except OverflowError:  # TOML integers have no size limit in tomllib
            self.fail(key, f"must be finite, got an integer of {len(str(value))} digits")

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(key, f"must be a list of strings, got {_kind(value)} {value!r}")
        return tuple(value)

    def path(self, key: str, *, required: bool = False, must_exist: bool = False) -> Path | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty path string, got {_kind(value)} {value!r}")
        if "\0" in value:
            self.fail(key, f"must not contain a NUL character, got {value!r}")
        try:
            p = Path(value).expanduser()
        except RuntimeError:  # ~user of an unknown user
            self.fail(key, f"cannot expand {value.split('/')[0]!r} (no such user or home)")
        p = p if p.is_absolute() else self.base / p
        if must_exist and not p.is_file():
            self.fail(key, f"file not found: {p}")
        return p

    def _range(self, key: str, value: float, lo: float | None, hi: float | None) -> None:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if lo is not None and hi is not None:
                self.fail(key, f"must be {lo}..{hi}, got {value}")
            if lo is not None:
                self.fail(key, f"must be >= {lo}, got {value}")
            self.fail(key, f"must be <= {hi}, got {value}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
    }.get(type(v), type(v).__name__)
