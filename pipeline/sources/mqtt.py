"""Sensor messages from MQTT into the engine's queue.

Runs on paho's network thread: take the stream id from the topic, decode the payload
(:mod:`pipeline.codecs`), hand the step to the worker, acknowledge the message. A bad
message is counted by reason and reported on the error topic; it never reaches the
queue or any stream's state. With ``overflow = "block"`` a full queue blocks this
thread, which stops reading the socket, so the broker holds the backlog (TCP
backpressure); with ``"drop"`` the worker drops the step and resets that stream.

After :meth:`MqttSource.close` messages are neither processed nor acknowledged, so
the broker redelivers them to the next session (persistent sessions) instead of this
daemon losing them during shutdown. With an :class:`~pipeline.acks.AckLedger` a queued
step's acknowledgement (and a reset's) waits for the checkpoint that covers it, so not
even a crash loses it; a rejected message is acknowledged at once either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from pipeline.acks import AckLedger
from pipeline.codecs import Decoder
from pipeline.config import STREAM, InputConfig
from pipeline.engine import Step
from pipeline.errors import PayloadError
from pipeline.metrics import Metrics
from pipeline.mqtt import Link, Message
from pipeline.sinks.mqtt import ErrorReporter

log = logging.getLogger(__name__)

UNKNOWN_TOPIC = "unknown_topic"
QUEUE_FULL = "queue_full"
REASONS: tuple[str, ...] = (UNKNOWN_TOPIC, QUEUE_FULL)


class Intake(Protocol):
    """Where steps go (the engine's :class:`~pipeline.engine.Worker`)."""

    def submit(self, step: Step, timeout: float | None = None) -> bool: ...
    def submit_reset(self, stream: str) -> None: ...


def topic_filter(template: str) -> tuple[str, int]:
    """The subscription filter of an input template and the level holding the stream id."""
    levels = template.split("/")
    index = levels.index(STREAM)
    levels[index] = "+"
    return "/".join(levels), index


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
    ) -> None:
        self._link = link
        self._acks = acks
        self._decoder = decoder
        self._intake = intake
        self._metrics = metrics
        self._errors = errors
        self._clock = clock
        self._open = True
        self._data_filter, self._data_level = topic_filter(cfg.topic)
        link.subscribe(self._data_filter, cfg.qos, self._on_data)
        if cfg.reset_topic is not None:
            reset_filter, self._reset_level = topic_filter(cfg.reset_topic)
            link.subscribe(reset_filter, cfg.qos, self._on_reset)
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
            stream = _level(msg.topic, self._data_level)
            if stream is None:
                self._reject(UNKNOWN_TOPIC, msg.topic, "empty stream id level")
            else:
                step = self._decoder.decode(stream, msg.payload, received)
                if not self._intake.submit(step):
                    if not self._open:
                        return  # refused because we are stopping: the next session gets it
                    self._reject(QUEUE_FULL, msg.topic, "queue full; step dropped, stream reset")
                elif self._acks is not None and msg.qos == 1:
                    self._acks.hold(msg.mid)
                    return
        except PayloadError as exc:
            self._reject(exc.reason, msg.topic, exc.detail)
        except Exception:  # a bug here must not stall the broker's delivery to us
            log.exception("mqtt source: unexpected error on %r", msg.topic)
        self._link.ack(msg.mid, msg.qos)

    def _on_reset(self, msg: Message) -> None:
        if not self._open:
            return
        stream = _level(msg.topic, self._reset_level)
        if stream is not None:
            self._intake.submit_reset(stream)
            if self._acks is not None and msg.qos == 1:
                self._acks.hold(msg.mid)
                return
        self._link.ack(msg.mid, msg.qos)

    def _on_unknown(self, msg: Message) -> None:
        if not self._open:
            return
        self._metrics.received.inc()
        self._reject(UNKNOWN_TOPIC, msg.topic, "matches no configured topic")
        self._link.ack(msg.mid, msg.qos)

    def _reject(self, reason: str, topic: str, detail: str) -> None:
        self._metrics.on_reject(reason)
        self._errors.report(reason, detail, topic=topic)


def _level(topic: str, index: int) -> str | None:
    levels = topic.split("/")
    stream = levels[index] if index < len(levels) else ""
    return stream or None
