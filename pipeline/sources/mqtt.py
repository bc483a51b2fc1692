"""Sensor messages from MQTT into the engine's queue.

Runs on paho's network thread: take the stream id from the topic (its ``{stream}``
levels, joined by ``/`` when there are several), decode the payload
(:mod:`pipeline.sources.codecs`), hand the step to the worker, acknowledge the message. A
message with no other behind it (:meth:`Link.input_idle`) while the engine is idle runs
on this thread, the prediction published before the acknowledgement (see
:mod:`pipeline.engine.worker` for why).
Per-channel readings (``input.channel_topic``) are joined into steps by
:mod:`pipeline.sources.channels` first, and acknowledged on arrival. A bad
message is counted by reason and reported on the error topic; it never reaches the
queue or any stream's state. With ``overflow = "block"`` a full queue blocks this
thread, which stops reading the socket, so the broker holds the backlog (TCP
backpressure); with ``"drop"`` the worker drops the step and resets that stream.

After :meth:`MqttSource.close` messages are neither processed nor acknowledged, so
the broker redelivers them to the next session (persistent sessions) instead of this
daemon losing them during shutdown. With an :class:`~pipeline.sources.acks.AckLedger` a queued
step's acknowledgement (and a reset's) waits for the checkpoint that covers it, so not
even a crash loses it; a rejected message is acknowledged at once either way.

Anyone allowed to publish here may be hostile, so every path ends in a counted
rejection with a reason, never a traceback: a stream id longer than
``input.max_stream_id_bytes`` (``stream_id_too_long``: ids are state keys and topics),
a retained message (``retained``: the broker would replay it at every resubscribe, a
stale reading or reset out of time), a reset closer than ``input.reset_min_interval_s``
to the stream's last one (``reset_rate_limited``), and even a bug of ours
(``internal_error``, one log line per minute at most). Each data message is counted
once as received and once as either rejected here or queued for the engine (a
reset message too: ``reset_requests`` counts those apart).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pipeline.engine.engine import Step
from pipeline.errors import PayloadError
from pipeline.sinks.mqtt import ErrorReporter, clip
from pipeline.sources.acks import AckLedger
from pipeline.sources.channels import INCOMPLETE_STEP, UNKNOWN_CHANNEL, Assembler
from pipeline.sources.codecs import Decoder
from pipeline.telemetry.metrics import Metrics, Unrouted
from pipeline.transport.mqtt import Link, Message
from pipeline.transport.topics import CHANNEL, STREAM

log = logging.getLogger(__name__)

UNKNOWN_TOPIC = "unknown_topic"
QUEUE_FULL = "queue_full"
STREAM_ID_TOO_LONG = "stream_id_too_long"
RETAINED = "retained"
RESET_RATE_LIMITED = "reset_rate_limited"
INTERNAL_ERROR = "internal_error"
REASONS: tuple[str, ...] = (
    UNKNOWN_TOPIC,
    QUEUE_FULL,
    STREAM_ID_TOO_LONG,
    RETAINED,
    RESET_RATE_LIMITED,
    INTERNAL_ERROR,
)
LOG_EVERY_S = 60.0  # unexpected errors: at most one log line per this many seconds


@dataclass(frozen=True, slots=True)
class InputConfig:
    topic: str = "sensors/{stream}/data"
    reset_topic: str | None = "sensors/{stream}/reset"
    qos: int = 1
    max_payload_bytes: int = 1 << 20
    # Longer stream ids (UTF-8 bytes) are refused (stream_id_too_long): each id is a key in
    # the state, the publish policy and a prediction topic, so its length bounds memory.
    max_stream_id_bytes: int = 128
    # A stream's reset requests closer together than this are refused (reset_rate_limited).
    reset_min_interval_s: float = 1.0
    # One topic per feature (pipeline.sources.channels): a template with {stream} and {channel};
    # None: off. Steps waiting for a channel, per stream, before the oldest is dropped.
    channel_topic: str | None = None
    channel_max_pending: int = 4


class Intake(Protocol):
    """Where steps go (the engine's :class:`~pipeline.engine.engine.Worker`)."""

    def submit(
        self, step: Step, timeout: float | None = None, alone: Callable[[], bool] | None = None
    ) -> bool: ...
    def submit_reset(self, stream: str) -> None: ...


def topic_filter(template: str) -> tuple[str, tuple[int, ...]]:
    """The subscription filter of an input template and the levels holding the stream id
    (``{stream}`` levels become ``+``; the template's own ``+`` levels stay wildcards)."""
    levels = template.split("/")
    index = tuple(i for i, level in enumerate(levels) if level == STREAM)
    return "/".join("+" if i in index else level for i, level in enumerate(levels)), index


def stream_id(topic: str, levels: tuple[int, ...]) -> str | None:
    """The stream id in ``topic``: its ``levels`` joined by ``/``; None if one is empty
    (``+`` matches an empty level) or the topic is too short (a stale subscription's)."""
    parts = topic.split("/")
    if len(parts) <= levels[-1]:
        return None
    if len(levels) == 1:  # the common case: no list, no join
        return parts[levels[0]] or None
    picked = [parts[i] for i in levels]
    return "/".join(picked) if all(picked) else None


class MqttSource:
    """Subscribes the input and reset topics on ``link`` and feeds ``intake``."""

    def __init__(
        self,
        link: Link,
        decoder: Decoder,
        intake: Intake,
        cfg: InputConfig,
        *,
        metrics: Metrics,
        errors: ErrorReporter,
        clock: Callable[[], float] = time.monotonic,
        acks: AckLedger | None = None,
        max_tracked: int = 10_000,
        channels: Assembler | None = None,
        unrouted: Unrouted | None = None,
    ) -> None:
        """``max_tracked``: streams whose last reset time is kept (engine.max_streams);
        ``channels``: joins ``input.channel_topic`` readings into steps (when set);
        ``unrouted``: where a topic matching no subscription is counted, when the link
        feeds several sources (several models): such a message is no model's."""
        self._link = link
        self._acks = acks
        self._decoder = decoder
        self._intake = intake
        self._metrics = metrics
        self._errors = errors
        self._clock = clock
        self._open = True
        self._max_id = cfg.max_stream_id_bytes
        self._reset_gap = cfg.reset_min_interval_s
        # Last reset time of recent streams, oldest first; as long as the state's own
        # stream limit, so a flood of reset topics cannot grow it.
        self._last_reset: OrderedDict[str, float] = OrderedDict()
        self._max_tracked = max_tracked
        self._log_after = -LOG_EVERY_S
        self._unlogged = 0
        self._data_filter, self._data_levels = topic_filter(cfg.topic)
        link.subscribe(self._data_filter, cfg.qos, self._on_data)
        if cfg.reset_topic is not None:
            reset_filter, self._reset_levels = topic_filter(cfg.reset_topic)
            link.subscribe(reset_filter, cfg.qos, self._on_reset)
        self._channels = channels if cfg.channel_topic is not None else None
        if self._channels is not None and cfg.channel_topic is not None:
            self._channel_level = cfg.channel_topic.split("/").index(CHANNEL)
            channel_filter, self._channel_levels = topic_filter(
                cfg.channel_topic.replace(CHANNEL, "+")
            )
            link.subscribe(channel_filter, cfg.qos, self._on_channel)
        self._unrouted: Metrics | Unrouted = unrouted if unrouted is not None else metrics
        link.on_other(self._on_unknown)

    def close(self) -> None:
        """Stop intake: later messages stay unacknowledged for the broker to redeliver."""
        self._open = False

    def _on_data(self, msg: Message) -> None:
        received = self._clock()
        if not self._open:
            return
        self._metrics.received.inc()
        try:
            stream = self._stream(msg, self._data_levels)
            if stream is not None:
                step = self._decoder.decode(stream, msg.payload, received)
                # a message with none behind it runs at once on this thread (no hand-off)
                if not self._intake.submit(step, alone=self._link.input_idle):
                    if not self._open:
                        return  # refused because we are stopping: the next session gets it
                    self._reject(QUEUE_FULL, msg.topic, "queue full; step dropped, stream reset")
                else:
                    self._metrics.queued.inc()
                    if self._acks is not None and msg.qos == 1:
                        self._acks.hold(msg.mid)
                        return
        except PayloadError as exc:
            self._reject(exc.reason, msg.topic, exc.detail)
        except Exception as exc:  # a bug here must not stall the broker's delivery to us
            self._unexpected(msg, exc)
        self._link.ack(msg.mid, msg.qos)

    def _on_channel(self, msg: Message) -> None:
        """One feature's reading: acknowledged at once (a step waiting for its other
        channels is not covered by ``ack_after_checkpoint``)."""
        received = self._clock()
        if not self._open:
            return
        self._metrics.received.inc()
        try:
            stream = self._stream(msg, self._channel_levels)
            if stream is not None:
                self._channel(msg, stream, received)
        except PayloadError as exc:
            self._reject(exc.reason, msg.topic, exc.detail)
        except Exception as exc:
            self._unexpected(msg, exc)
        self._link.ack(msg.mid, msg.qos)

    def _channel(self, msg: Message, stream: str, received: float) -> None:
        assembler = self._channels
        assert assembler is not None  # only subscribed with one
        name = msg.topic.split("/")[self._channel_level]
        feature = assembler.channel_index(name)
        if feature is None:
            self._reject(UNKNOWN_CHANNEL, msg.topic, f"{name[:64]!r} is not one of the features")
            return
        seq, ts, value = self._decoder.channel(msg.payload)
        out = assembler.add(stream, feature, seq, ts, value, received)
        if out.dropped:
            for _ in range(out.dropped):
                self._metrics.on_reject(out.dropped_as)
            self._errors.report(
                out.dropped_as, f"{out.dropped} reading(s) dropped (seq {seq})", topic=msg.topic
            )
        for step in out.steps:
            readings = step.values.shape[1]  # one per feature made this step
            if self._intake.submit(step):
                self._metrics.queued.inc(readings)
            elif self._open:
                for _ in range(readings):
                    self._metrics.on_reject(QUEUE_FULL)
                self._errors.report(QUEUE_FULL, "queue full; step dropped", topic=msg.topic)

    def _on_reset(self, msg: Message) -> None:
        if not self._open:
            return
        self._metrics.received.inc()
        self._metrics.reset_requests.inc()
        try:
            stream = self._stream(msg, self._reset_levels)
            if stream is not None and self._reset_allowed(stream, msg.topic):
                if self._channels is not None:  # the stream restarts: so do its steps
                    for _ in range(self._channels.reset(stream)):
                        self._metrics.on_reject(INCOMPLETE_STEP)
                self._intake.submit_reset(stream)
                self._metrics.queued.inc()
                if self._acks is not None and msg.qos == 1:
                    self._acks.hold(msg.mid)
                    return
        except Exception as exc:
            self._unexpected(msg, exc)
        self._link.ack(msg.mid, msg.qos)

    def _on_unknown(self, msg: Message) -> None:
        if not self._open:
            return
        metrics = self._unrouted
        metrics.received.inc()
        metrics.on_reject(UNKNOWN_TOPIC)
        self._errors.report(UNKNOWN_TOPIC, "matches no configured topic", topic=msg.topic)
        self._link.ack(msg.mid, msg.qos)

    def _stream(self, msg: Message, levels: tuple[int, ...]) -> str | None:
        """The message's stream id, or None when the message is refused (and counted)."""
        if msg.retain:
            self._reject(RETAINED, msg.topic, "retained messages are not sensor input")
            return None
        stream = stream_id(msg.topic, levels)
        if stream is None:
            self._reject(UNKNOWN_TOPIC, msg.topic, "empty stream id level")
            return None
        # Characters never outnumber UTF-8 bytes, and a byte is at most 4 characters'
        # worth: encode only ids that might be too long.
        if len(stream) * 4 > self._max_id and len(stream.encode()) > self._max_id:
            self._reject(
                STREAM_ID_TOO_LONG,
                msg.topic,
                f"stream id of {len(stream.encode())} bytes > {self._max_id}",
            )
            return None
        return stream

    def _reset_allowed(self, stream: str, topic: str) -> bool:
        now = self._clock()
        seen = self._last_reset
        last = seen.pop(stream, None)
        if last is not None and now - last < self._reset_gap:
            seen[stream] = last  # the window runs from the last reset that was let through
            self._reject(
                RESET_RATE_LIMITED,
                topic,
                f"reset {now - last:.3f} s after the last; at most one per "
                f"{self._reset_gap:g} s per stream",
            )
            return False
        seen[stream] = now
        if len(seen) > self._max_tracked:
            seen.popitem(last=False)
        return True

    def _unexpected(self, msg: Message, exc: Exception) -> None:
        """A bug of ours, triggered by some message: counted, one line a minute at most."""
        self._metrics.on_reject(INTERNAL_ERROR)
        now = self._clock()
        if now < self._log_after:
            self._unlogged += 1
            return
        self._log_after = now + LOG_EVERY_S
        log.error(
            "mqtt source: unexpected %s on a message of %d bytes (%s); %d more since the last "
            "such line",
            type(exc).__name__,
            len(msg.payload),
            clip(str(exc)),
            self._unlogged,
        )
        self._unlogged = 0

    def _reject(self, reason: str, topic: str, detail: str) -> None:
        self._metrics.on_reject(reason)
        self._errors.report(reason, detail, topic=topic)
