"""The audio path of the daemon: sources -> log-mel -> engine -> detector -> events.

::

    MicrophoneSource / WavFileSource  [capture thread]
      -> BlockRing (bounded)            -> Feeder [one thread per source]: StreamingLogMel
      -> Worker(Engine(keyword model))  [engine thread; state carried per source]
      -> KeywordSink: Detector per source -> EventPublisher (MQTT) + AudioMetrics

Each source is one stream of the engine, named after the source. A feature step's
``seq`` is the stream's frame index: after lost audio the feeder restarts its
extractor and skips at least one frame number, so the engine resets that stream's
state (reason ``seq_gap``) and the sink resets its detector; a step the full engine
queue refuses resets the stream too (``dropped``). Nothing joins audio across a gap.

:func:`build` wires it from :class:`AudioSettings` and the model's own front-end
settings (``ModelSpec.frontend``), so serving computes exactly the features the model
was trained on.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from pipeline.engine.engine import Engine, EngineSettings, Rejected, Result, Step
from pipeline.engine.store.state import RESET_REASONS
from pipeline.engine.worker import Worker
from pipeline.errors import ConfigError, ContractError, ModelError
from pipeline.features.logmel import LogMelConfig, StreamingLogMel
from pipeline.keywords.detector import Detector, DetectorSettings
from pipeline.keywords.metrics import AudioMetrics
from pipeline.model import StepModel
from pipeline.sources.audio import AudioSource
from pipeline.sources.microphone import (
    MicrophoneSettings,
    MicrophoneSource,
    Opener,
    open_sounddevice,
    require_sounddevice,
)
from pipeline.sources.wavfile import WavFileSource
from pipeline.transport.topics import STREAM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WavFileSettings:
    """A WAV file played as a source (``[[audio.wavfile]]``): replay, demos, tests."""

    name: str
    path: Path
    realtime: bool = True
    block_size: int = 320


@dataclass(frozen=True)
class AudioSettings:
    """The ``[audio]`` section: the keyword model, detection, output and sources."""

    model: Path
    providers: tuple[str, ...] = ("cpu",)
    threads: int = 1
    topic: str = "audio/{stream}/keyword"
    qos: int = 1
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    max_queue: int = 256  # feature steps waiting for the engine (then: drop + reset)
    microphones: tuple[MicrophoneSettings, ...] = ()
    files: tuple[WavFileSettings, ...] = ()

    def __post_init__(self) -> None:
        # The one check of these values; the TOML reader prefixes its table ("audio.").
        names = [m.name for m in self.microphones] + [f.name for f in self.files]
        if not names:
            raise ConfigError(
                "microphone: configure at least one [[audio.microphone]] (or wavfile)"
            )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"microphone: source names must be unique, {dupes} repeat")
        if self.topic.count(STREAM) != 1:
            raise ConfigError(f"topic: must contain {STREAM} exactly once, got {self.topic!r}")
        if self.max_queue < 1:
            raise ConfigError(f"max_queue: must be >= 1, got {self.max_queue}")

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.microphones) + tuple(f.name for f in self.files)


@dataclass(frozen=True, slots=True)
class KeywordEvent:
    """One detected keyword."""

    stream: str
    keyword: str
    score: float
    time_s: float  # stream time of the frame that fired (seconds since the source started)
    ts: float  # the same moment, wall clock (seconds since the epoch)
    model: str
    version: str

    def to_json(self) -> bytes:
        doc = {
            "keyword": self.keyword,
            "score": round(self.score, 4),
            "time_s": round(self.time_s, 3),
            "ts": round(self.ts, 3),
            "stream": self.stream,
            "model": self.model,
            "version": self.version,
        }
        return json.dumps(doc, separators=(",", ":")).encode()


class EventPublisher(Protocol):
    def publish(self, event: KeywordEvent) -> None: ...


class TopicClient(Protocol):
    """What :class:`MqttEventPublisher` needs of the MQTT link
    (``pipeline.transport.mqtt.Link``)."""

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> Any: ...


class MqttEventPublisher:
    """Keyword events as JSON on ``topic`` with the source name as ``{stream}``."""

    def __init__(self, link: TopicClient, topic: str, qos: int) -> None:
        self._link = link
        self._prefix, self._suffix = topic.split(STREAM)
        self._qos = qos

    def publish(self, event: KeywordEvent) -> None:
        self._link.publish(self._prefix + event.stream + self._suffix, event.to_json(), self._qos)


class KeywordSink:
    """The audio worker's sink: posteriors -> :class:`Detector` per stream -> events."""

    def __init__(
        self,
        model: StepModel,
        frontend: LogMelConfig,
        settings: DetectorSettings,
        publisher: EventPublisher,
        metrics: AudioMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        spec = model.spec
        self._labels = spec.labels
        self._settings = settings
        self._frontend = frontend
        self._hop_s = frontend.hop / frontend.sample_rate_hz
        self._publisher = publisher
        self._metrics = metrics
        self._clock = clock
        self._model = (spec.name, spec.version)
        self._detectors: dict[str, Detector] = {}
        Detector(self._labels, settings, frontend.frame_rate_hz)  # validate labels now

    def __call__(self, results: Sequence[Result | Rejected]) -> None:
        for r in results:
            if isinstance(r, Rejected):
                continue  # counted by the engine's observer; the stream is reset by it
            step = r.step
            det = self._detectors.get(step.stream)
            if det is None:
                det = Detector(self._labels, self._settings, self._frontend.frame_rate_hz)
                self._detectors[step.stream] = det
            elif r.resets:
                det.reset()
            seq = step.seq or 0
            probs = r.output("probs")
            for d in det.update(probs, seq):
                k = d.frame - seq
                ts = (step.ts or 0.0) + k * self._hop_s
                event = KeywordEvent(
                    stream=step.stream,
                    keyword=self._labels[d.label],
                    score=d.score,
                    time_s=self._frontend.frame_end_s(d.frame),
                    ts=ts,
                    model=self._model[0],
                    version=self._model[1],
                )
                self._publisher.publish(event)
                self._metrics.keywords.labels(event.keyword).inc()
                behind = (probs.shape[0] - 1 - k) * self._hop_s  # frames after it, same step
                self._metrics.latency.observe(max(0.0, self._clock() - step.received + behind))


class Intake(Protocol):
    def submit(self, step: Step, timeout: float | None = None) -> bool: ...


class Feeder:
    """One source's thread: blocks -> log-mel steps -> the engine's queue."""

    def __init__(
        self,
        source: AudioSource,
        frontend: LogMelConfig,
        intake: Intake,
        metrics: AudioMetrics,
        poll_s: float = 0.1,
    ) -> None:
        self.source = source
        self._cfg = frontend
        self._intake = intake
        self._metrics = metrics
        self._poll_s = poll_s
        self._stop = threading.Event()
        self.finished = threading.Event()
        self.frames = 0  # feature frames handed to the engine
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.source.start()
        self._thread = threading.Thread(
            target=self._run, name=f"seqstream-audio-{self.source.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.source.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("audio source %r: feeder failed", self.source.name)
        finally:
            self.finished.set()

    def _loop(self) -> None:
        cfg = self._cfg
        name = self.source.name
        rate = float(cfg.sample_rate_hz)
        hop, window = cfg.hop, cfg.window
        extractor = StreamingLogMel(cfg)
        timeout = 0.0 if self.source.live else None  # a file waits for room; a device cannot
        base = 0  # stream position of the extractor's first sample
        seq0 = 0  # frame number of the extractor's first frame
        started = False
        while not self._stop.is_set():
            block = self.source.read(self._poll_s)
            if block is None:
                if self.source.exhausted:
                    return
                continue
            self._metrics.on_audio(name, int(block.samples.shape[0]))
            if not started or block.lost:
                # A new extractor after lost audio; frame numbers jump by at least one, so
                # the engine resets the stream's state before these frames.
                next_seq = seq0 + extractor.frames_out
                extractor.reset()
                base = block.start
                seq0 = max(math.ceil(base / hop), next_seq + 1 if started else 0)
                started = True
            first = extractor.frames_out
            feats = extractor.push(block.samples)
            k = feats.shape[0]
            if k == 0:
                continue
            first_end = base + first * hop + window  # stream position where frame `first` ends
            ts = block.wall_end - (block.end - first_end) / rate
            step = Step(name, feats, seq=seq0 + first, ts=float(ts), received=block.mono_end)
            if not self._intake.submit(step, timeout):
                self._metrics.engine_dropped.labels(name).inc()
            self.frames += k


class AudioService:
    """Starts and stops the audio path; the daemon holds it as one of its services."""

    def __init__(
        self,
        model: StepModel,
        frontend: LogMelConfig,
        worker: Worker,
        feeders: Sequence[Feeder],
        metrics: AudioMetrics,
    ) -> None:
        self.model = model
        self.frontend = frontend
        self.worker = worker
        self.feeders = list(feeders)
        self.metrics = metrics
        self._started = False

    def start(self) -> None:
        self.worker.start()
        for f in self.feeders:
            f.start()
        self._started = True
        log.info(
            "audio: keyword model %s on %s",
            self.model.spec.name,
            ", ".join(f.source.name for f in self.feeders),
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the sources, then let the engine finish what they delivered."""
        if not self._started:
            return
        self._started = False
        for f in self.feeders:
            f.stop(timeout)
        self.worker.stop(drain=True, timeout=timeout)

    def wait_sources(self, timeout: float | None = None) -> bool:
        """Wait until every source has ended (files) and its frames were processed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for f in self.feeders:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not f.finished.wait(left):
                return False
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self.worker.call(lambda engine: None).result(timeout=left)
        except TimeoutError:
            return False
        return True


def load_keyword_model(settings: AudioSettings) -> tuple[StepModel, LogMelConfig]:
    """The keyword model and the front end its metadata declares."""
    model = StepModel.load(settings.model, settings.providers, settings.threads)
    spec = model.spec
    if spec.task != "classify":
        raise ModelError(f"{settings.model}: a keyword model must classify; this one {spec.task}s")
    if spec.frontend is None:
        raise ModelError(
            f"{settings.model}: no audio front end in its metadata (field 'frontend'); "
            "train it on a directory of WAV folders"
        )
    try:
        frontend = LogMelConfig.from_dict(spec.frontend)
    except ValueError as exc:
        raise ContractError(f"{settings.model}: metadata field 'frontend': {exc}") from None
    return model, frontend


def build(
    settings: AudioSettings,
    publisher: EventPublisher,
    registry: CollectorRegistry,
    *,
    opener: Opener = open_sounddevice,
) -> AudioService:
    """The audio path of ``settings``, built but not started."""
    model, frontend = load_keyword_model(settings)
    rate = frontend.sample_rate_hz
    labels = model.spec.labels
    metrics = AudioMetrics(
        registry,
        sources=settings.source_names,
        keywords=[lb for lb in labels if lb not in settings.detector.background],
        reset_reasons=RESET_REASONS,
    )
    sources: list[AudioSource] = []
    if settings.microphones and opener is open_sounddevice:
        require_sounddevice()  # fail at start, not in a capture thread
    for mic in settings.microphones:
        if mic.sample_rate_hz is not None and mic.sample_rate_hz != rate:
            raise ConfigError(
                f"audio.microphone {mic.name!r}: sample_rate_hz {mic.sample_rate_hz}; the "
                f"model was trained at {rate} Hz (leave it out to capture at {rate} Hz)"
            )
        sources.append(MicrophoneSource(mic, rate, metrics, opener=opener))
    for wav in settings.files:
        sources.append(
            WavFileSource.open(
                wav.name,
                wav.path,
                sample_rate=rate,
                block_size=wav.block_size,
                realtime=wav.realtime,
            )
        )
    for s in sources:
        metrics.set_rate(s.name, rate)
    n = len(sources)
    engine = Engine(
        model,
        EngineSettings(max_streams=n, idle_timeout_s=None, max_batch=max(1, n), initial_capacity=n),
        observer=metrics,
    )
    sink = KeywordSink(model, frontend, settings.detector, publisher, metrics)
    # "block" with a per-source timeout: files wait for room, live sources drop at once.
    worker = Worker(
        engine, sink, max_queue=settings.max_queue, max_batch=max(1, n), max_wait_ms=0.0,
        overflow="block",
    )  # fmt: skip
    feeders = [Feeder(s, frontend, worker, metrics) for s in sources]
    return AudioService(model, frontend, worker, feeders, metrics)
