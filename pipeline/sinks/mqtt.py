"""Predictions and error reports out over MQTT.

:class:`PredictionSink` is the worker's sink: called on the thread running the engine (the
worker's, or paho's for a step that ran alone: :mod:`pipeline.engine.worker`) with each
batch of results, it publishes one prediction per input message (see
:mod:`pipeline.sources.codecs` for the JSON), optionally only every k-th message of a stream
or when its label changes. Publishing hands the message to paho's queue and returns;
paho's network thread writes it.

:class:`ErrorReporter` publishes rejections on the error topic, rate-limited by a
token bucket so that a sensor sending garbage at 10 kHz costs a counter increment per
message, not a publish.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from paho.mqtt.enums import MQTTErrorCode

from pipeline.engine.engine import Rejected, Result
from pipeline.sinks.encoder import PredictionEncoder
from pipeline.sinks.recent import LastPredictions
from pipeline.telemetry.metrics import Metrics
from pipeline.transport.mqtt import Link
from pipeline.transport.topics import STREAM

NON_FINITE_OUTPUT = "non_finite_output"
# Engine rejections that are routine, not worth an error report: QoS 1 redelivers.
QUIET = frozenset({"duplicate"})

DISCONNECTED = "disconnected"  # QoS 0 while the broker is away: paho drops it
QUEUE_FULL = "client_queue_full"  # mqtt.max_queued_out messages already wait
PUBLISH_FAILURES: dict[MQTTErrorCode, str] = {
    MQTTErrorCode.MQTT_ERR_QUEUE_SIZE: QUEUE_FULL,
}


ECHO_LIMIT = 200  # characters of a peer's topic, stream id or detail echoed in a report


@dataclass(frozen=True, slots=True)
class OutputConfig:
    topic: str = "predictions/{stream}"
    qos: int = 1
    retain: bool = False
    every_k: int = 1
    on_change: bool = False
    error_topic: str | None = "seqstream/{client_id}/errors"
    error_rate_per_s: float = 10.0
    error_burst: int = 20


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """At most ``limit`` characters of ``text``, saying how long it was when cut."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


class ErrorReporter:
    """Rejections to the error topic, at most ``rate`` per second (bursts of ``burst``).

    Thread-safe: the source reports on the network thread, the sink on the engine's.
    """

    def __init__(
        self,
        link: Link,
        topic: str | None,
        *,
        rate_per_s: float,
        burst: int,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._link = link
        self._topic = topic
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._metrics = metrics
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()

    def report(self, reason: str, detail: str, *, topic: str = "", stream: str = "") -> None:
        if self._topic is None:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1.0:
                self._metrics.errors_suppressed.inc()
                return
            self._tokens -= 1.0
        # What a peer chose (its topic, its stream id) is echoed clipped: a report must
        # not amplify a hostile 64 KiB topic into every consumer of the error topic.
        doc = {"reason": reason, "detail": clip(detail)}
        if topic:
            doc["topic"] = clip(topic)
        if stream:
            doc["stream"] = clip(stream)
        self._link.publish(self._topic, json.dumps(doc).encode(), qos=0)


class PublishPolicy:
    """Which results of a stream get published: every k-th message and/or label changes.

    Remembers a count and the last published label per stream, for at most
    ``max_streams`` streams (least recently seen forgotten first), so memory stays
    bounded. A stream whose state was reset starts counting again.
    """

    def __init__(self, every_k: int, on_change: bool, max_streams: int) -> None:
        self.every_k = every_k
        self.on_change = on_change
        self.max_streams = max_streams
        self._seen: OrderedDict[str, tuple[int, int]] = OrderedDict()  # stream -> (count, label)

    def admit(self, stream: str, label: int, reset: bool) -> bool:
        count, last = self._seen.pop(stream, (0, -1))
        if reset:
            count, last = 0, -1
        count += 1
        # every_k > 1 with on_change: changes, plus every k-th message as a heartbeat
        periodic = self.every_k > 1 or not self.on_change
        publish = (periodic and count % self.every_k == 0) or (self.on_change and label != last)
        self._seen[stream] = (count, label if publish else last)
        if len(self._seen) > self.max_streams:
            self._seen.popitem(last=False)
        return publish


class PredictionSink:
    """The worker's sink: results -> prediction messages on ``predictions/{stream}``."""

    def __init__(
        self,
        link: Link,
        encoder: PredictionEncoder,
        cfg: OutputConfig,
        *,
        metrics: Metrics,
        errors: ErrorReporter,
        policy: PublishPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        last: LastPredictions | None = None,
    ) -> None:
        """``last``: where each stream's last published prediction is kept for /status."""
        self._link = link
        self._last = last
        self._encoder = encoder
        self._prefix, self._suffix = cfg.topic.split(STREAM)
        self._qos = cfg.qos
        self._retain = cfg.retain
        self._metrics = metrics
        self._errors = errors
        self._policy = policy
        self._clock = clock

    def use_encoder(self, encoder: PredictionEncoder) -> None:
        """A reloaded model's message format; call it on the engine's thread."""
        self._encoder = encoder

    def __call__(self, results: Sequence[Result | Rejected]) -> None:
        published = 0
        observe = self._metrics.end_to_end.observe
        encoder = self._encoder
        classify = encoder.task == "classify"
        anomaly = encoder.task == "anomaly"
        for r in results:
            if isinstance(r, Rejected):
                if r.reason not in QUIET:
                    self._errors.report(r.reason, r.detail, stream=r.step.stream)
                continue
            stream = r.step.stream
            if anomaly:  # every scored step, published or not
                for score in r.output("score").tolist():
                    self._metrics.on_anomaly(score, encoder.threshold)
            label = encoder.label(r) if classify or self._policy is not None else 0
            if self._policy is not None and not self._policy.admit(stream, label, bool(r.resets)):
                continue
            payload = encoder.encode(r)
            if payload is None:
                self._metrics.on_reject(NON_FINITE_OUTPUT)
                self._errors.report(NON_FINITE_OUTPUT, "model output is NaN/Inf", stream=stream)
                continue
            info = self._link.publish(
                self._prefix + stream + self._suffix, payload, self._qos, self._retain
            )
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not (
                info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self._qos > 0
            ):
                reason = PUBLISH_FAILURES.get(info.rc, DISCONNECTED)
                self._metrics.publish_failures.labels(reason).inc()
                continue
            published += 1
            observe(self._clock() - r.step.received)
            if self._last is not None:
                self._last.record(stream, payload, r.step.received)
            if classify:
                self._metrics.on_label(label)
        if published:
            self._metrics.published.inc(published)
