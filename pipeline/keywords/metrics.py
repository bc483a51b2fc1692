"""Prometheus metrics of the audio path, on the daemon's injected registry.

:class:`AudioMetrics` is the microphone's observer, the audio engine's observer and the
keyword sink's counter. Label values come from fixed sets only: configured source
names, the model's labels, and the overflow/problem/reset words of the modules that
report them, so the number of series is bounded.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry

from pipeline.sources.microphone import OVERFLOWS, PROBLEMS
from pipeline.telemetry.metrics import INFERENCE_BUCKETS, Family

# From the end of the frame that fired to the event handed to the MQTT client.
LATENCY_BUCKETS = (1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5)


class AudioMetrics:
    """Every audio metric; thread-safe (prometheus-client's own locks)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        sources: Iterable[str],
        keywords: Iterable[str],
        reset_reasons: Iterable[str] = (),
    ) -> None:
        family = Family(registry)
        counter, histogram = family.counter, family.histogram

        self.audio_seconds = counter(
            "audio_seconds", "Audio read from each source into the keyword pipeline.", ("source",)
        )
        self.overflows = counter(
            "audio_overflows",
            "Audio lost: 'device' (PortAudio input overflow) or 'buffer' (ring full).",
            ("source", "where"),
        )
        self.device_problems = counter(
            "audio_device_problems",
            "Capture device trouble that made the source reopen it, by problem.",
            ("source", "problem"),
        )
        self.device_up = family.gauge(
            "audio_device_up",
            "1 while the source's capture device is open and delivering.",
            ("source",),
        )
        self.engine_dropped = counter(
            "audio_steps_dropped", "Feature steps refused by the full engine queue.", ("source",)
        )
        self.keywords = counter(
            "keywords_detected", "Keyword events published, by keyword.", ("keyword",)
        )
        self.resets = counter(
            "audio_state_resets", "Keyword model state resets, by reason.", ("reason",)
        )
        self.rejected = counter(
            "audio_steps_rejected", "Feature steps the engine refused, by reason.", ("reason",)
        )
        self.inference = histogram(
            "audio_inference_seconds", "Wall time of one keyword-engine batch.", INFERENCE_BUCKETS
        )
        self.latency = histogram(
            "keyword_latency_seconds",
            "From capture of the audio that fired a keyword to its event being published.",
            LATENCY_BUCKETS,
        )
        self._sample_rate: dict[str, float] = {}
        for s in sources:
            self.audio_seconds.labels(s)
            self.device_up.labels(s).set(0)
            self.engine_dropped.labels(s)
            for w in OVERFLOWS:
                self.overflows.labels(s, w)
            for p in PROBLEMS:
                self.device_problems.labels(s, p)
        for k in keywords:
            self.keywords.labels(k)
        for r in reset_reasons:
            self.resets.labels(r)

    def set_rate(self, source: str, sample_rate: int) -> None:
        self._sample_rate[source] = float(sample_rate)

    def on_audio(self, source: str, samples: int) -> None:
        self.audio_seconds.labels(source).inc(samples / self._sample_rate.get(source, 16_000.0))

    # -- microphone observer --------------------------------------------------------------

    def on_overflow(self, source: str, where: str) -> None:
        self.overflows.labels(source, where).inc()

    def on_device_problem(self, source: str, problem: str) -> None:
        self.device_problems.labels(source, problem).inc()

    def on_device_up(self, source: str, up: bool) -> None:
        self.device_up.labels(source).set(1 if up else 0)

    # -- engine observer ------------------------------------------------------------------

    def on_batch(self, size: int, seconds: float) -> None:
        self.inference.observe(seconds)

    def on_reset(self, reason: str, count: int = 1) -> None:
        self.resets.labels(reason).inc(count)

    def on_reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()
