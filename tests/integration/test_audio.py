"""Keyword spotting end to end: synthetic data -> training -> a real PortAudio microphone.

No sound hardware: a private PulseAudio server with a null sink is the microphone
(see ``../shared/recipes/virtual-microphone.sh``): ``paplay`` plays into the sink, and
PortAudio captures its monitor through ALSA's pulse plugin, bit-exact at 16 kHz.
The keyword model is trained once per session on a small espeak-ng data set, and
tested on voices it never heard.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from pipeline.keywords import service as ks
from pipeline.keywords.generate import (
    KEYWORDS,
    TEST_VARIANTS,
    TRAIN_VARIANTS,
    GenerateConfig,
    SpokenWord,
    generate,
    make_recording,
    write_recording,
)
from pipeline.keywords.metrics import AudioMetrics
from pipeline.sources.audio import AudioBlock
from pipeline.sources.microphone import MicrophoneSettings, MicrophoneSource
from tests.integration.broker import Broker
from tests.integration.conftest import Collector, daemon_config, running_daemon

pytestmark = pytest.mark.slow

RATE = 16_000
REPORTS = os.environ.get("SEQSTREAM_REPORTS")  # also keep the accuracy report there

# The words of the end-to-end recording, in a held-out voice: every keyword once.
RECORDING = ("yes", "stop", "left", "go", "no", "right", "up", "on", "off", "down")
RECORDING_VOICE = "en-us+f5"

# The keyword recipe (docs/keywords/README.md), every knob spelled out so that a change
# to the generator's, the CLI's or the trainer's defaults cannot move it unseen. It holds
# for training seed 0 (checked offline and live); seeds 1 and 2 are not yet measured with
# it; SEQSTREAM_KEYWORDS_SEED picks another (see docs/keywords/README.md).
TRAIN_SEED = int(os.environ.get("SEQSTREAM_KEYWORDS_SEED", "0"))
DATA_RECIPE: dict[str, Any] = {
    "seed": 0,
    "train_per_class": 200,
    "test_per_class": 30,
    "unknown_factor": 2,
    "snr_db": (5.0, 30.0),
    "speeds_wpm": (120, 210),
    "pitches": (20, 80),
    "stretch": (0.9, 1.1),
    "preceded": 0.0,
    "gap_s": (0.3, 1.2),
}
# The session's first keyword test pays for the data and the training: ~7 minutes on 2
# shared cores for the LSTM, which the TCN costs 1.17x per batch; past the suite's 600 s
# when the machine is busier (53 minutes at load 9-14 beside other trainings).
KEYWORD_MODEL_TIMEOUT_S = 1800
TRAIN_RECIPE: dict[str, Any] = {
    "task": "classify",
    # A windowed causal conv stack (models.tcn): each output depends on the last 1.3 s
    # only, so the never-reset live stream answers as the fresh training clips did.
    "arch": "tcn",
    "filters": (64, 64, 64, 64, 64, 64, 64),
    "dilations": (1, 1, 2, 4, 8, 16, 32),
    "epochs": 40,
    "patience": 10,
    "batch_size": 32,
    "lr": 3e-3,
    "val_fraction": 0.2,
    "dropout": 0.1,
}


# -- the trained keyword model (once per session) ---------------------------------------


@dataclass(frozen=True)
class KeywordModel:
    data: Path
    onnx: Path
    train_metrics: dict[str, Any]


@pytest.fixture(scope="session")
def keyword_model(tmp_path_factory: pytest.TempPathFactory) -> KeywordModel:
    root = tmp_path_factory.mktemp("keywords")
    generate(GenerateConfig(out=root / "data", **DATA_RECIPE))  # before torch: cheaper spawns

    import torch

    from models.export import export_checkpoint
    from models.train import TrainConfig, train

    threads = torch.get_num_threads()
    # One thread: small recurrent nets gain little from two, and two spin badly when the
    # machine is shared.
    torch.set_num_threads(1)
    try:
        metrics = train(
            TrainConfig(
                data=str(root / "data" / "train"),
                out=str(root / "run"),
                seed=TRAIN_SEED,
                name="keywords",
                **TRAIN_RECIPE,
            )
        )
    finally:
        torch.set_num_threads(threads)
    onnx = root / "keywords.onnx"
    export_checkpoint(root / "run", onnx)
    return KeywordModel(root / "data", onnx, metrics)


# -- the virtual microphone --------------------------------------------------------------


class VirtualMicrophone:
    """A user-level PulseAudio with a null sink whose monitor is the default source."""

    PA = (
        "load-module module-native-protocol-unix auth-anonymous=1\n"
        "load-module module-null-sink sink_name=vmic_sink rate=16000 channels=1 format=s16le\n"
        "load-module module-remap-source source_name=vmic master=vmic_sink.monitor\n"
        "set-default-sink vmic_sink\n"
        "set-default-source vmic\n"
    )

    def __init__(self, base: Path) -> None:
        self.base = base
        for d in ("run", "home", "state"):
            (base / d).mkdir(parents=True, exist_ok=True)
        (base / "run").chmod(0o700)
        (base / "vmic.pa").write_text(self.PA)
        (base / "client.conf").write_text("autospawn = no\nenable-memfd = no\n")
        self.env = {
            "XDG_RUNTIME_DIR": str(base / "run"),
            "PULSE_RUNTIME_PATH": str(base / "run" / "pulse"),
            "PULSE_STATE_PATH": str(base / "state"),
            "PULSE_SERVER": f"unix:{base}/run/pulse/native",
            "PULSE_CLIENTCONFIG": str(base / "client.conf"),
        }
        self.server: subprocess.Popen[bytes] | None = None
        self.keeper: subprocess.Popen[bytes] | None = None

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.env, "HOME": str(self.base / "home")}

    def start(self) -> None:
        env = self._env()
        self.server = subprocess.Popen(
            ["pulseaudio", "-n", "-F", str(self.base / "vmic.pa"), "--daemonize=no",
             "--exit-idle-time=-1", "--use-pid-file=no", "--enable-memfd=no",
             f"--log-target=file:{self.base}/pulse.log"],
            env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode:
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pulseaudio did not start; see {self.base}/pulse.log")
            time.sleep(0.05)
        # A permanent low-latency reader makes the null sink render in small blocks;
        # without it a new capture stream's first block comes up to 2 s late.
        raw = self.base / "keeper.raw"
        with raw.open("wb") as out:
            self.keeper = subprocess.Popen(
                ["parec", "-d", "vmic_sink.monitor", "--latency-msec=20", "--raw"],
                env=env,
                stdout=out,
            )
        deadline = time.monotonic() + 5
        while raw.stat().st_size == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        raw.unlink()  # the open file keeps growing unseen; nothing to clean up later

    def kill_server(self) -> None:
        """The sound server dies (SIGKILL): the capture device disappears."""
        for p in (self.server, self.keeper):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)

    def stop(self) -> None:
        for p in (self.keeper, self.server):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)

    def play(self, wav: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["paplay", "--device=vmic_sink", str(wav)], env=self._env())


@pytest.fixture
def vmic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[VirtualMicrophone]:
    mic = VirtualMicrophone(tmp_path / "pulse")
    mic.start()
    for key, value in mic.env.items():
        monkeypatch.setenv(key, value)  # PortAudio's ALSA pulse plugin reads these
    try:
        yield mic
    finally:
        mic.stop()


# -- helpers -----------------------------------------------------------------------------


def _metric(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def _match(
    events: list[dict[str, Any]], words: list[SpokenWord], t0: float
) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Events assigned to the word they fall on (``t0`` + word's span + slack), and the rest."""
    hits: dict[int, dict[str, Any]] = {}
    stray: list[dict[str, Any]] = []
    for e in events:
        at = e["ts"] - t0
        for i, w in enumerate(words):
            if w.start_s - 0.3 <= at <= w.end_s + 1.0 and i not in hits:
                hits[i] = e
                break
        else:
            stray.append(e)
    return hits, stray


def offline_events(model: Path, wav: Path) -> list[ks.KeywordEvent]:
    """The oracle: the same audio path without MQTT, as fast as possible."""

    class Collect:
        def __init__(self) -> None:
            self.events: list[ks.KeywordEvent] = []

        def publish(self, event: ks.KeywordEvent) -> None:
            self.events.append(event)

    out = Collect()
    settings = ks.AudioSettings(
        model=model, files=(ks.WavFileSettings("w", wav, realtime=False, block_size=800),)
    )
    service = ks.build(settings, out, CollectorRegistry())
    service.start()
    assert service.wait_sources(60)
    service.stop()
    return out.events


# -- tests -------------------------------------------------------------------------------


@pytest.mark.timeout(KEYWORD_MODEL_TIMEOUT_S)
def test_held_out_voices_accuracy_and_confusion_report(
    keyword_model: KeywordModel, tmp_path: Path
) -> None:
    from pipeline.keywords.report import evaluate_report

    assert not set(TEST_VARIANTS) & set(TRAIN_VARIANTS)
    out = Path(REPORTS) if REPORTS else tmp_path
    report = evaluate_report(keyword_model.onnx, keyword_model.data / "test", out)
    assert (out / "confusion.png").stat().st_size > 10_000
    saved = json.loads((out / "confusion.json").read_text())
    matrix = np.array(saved["confusion_matrix"])
    assert matrix.sum() == 12 * 30 and saved["labels"] == sorted([*KEYWORDS, "silence", "unknown"])
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    # Voices the model never heard: well above chance (1/12), most keywords recognised.
    assert report["accuracy"] >= 0.75, report["accuracy"]


@pytest.mark.timeout(KEYWORD_MODEL_TIMEOUT_S)
def test_wav_source_through_the_daemon_publishes_the_offline_detections(
    keyword_model: KeywordModel, broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    signal, _ = make_recording(RECORDING, RECORDING_VOICE, seed=3)
    wav = write_recording(tmp_path / "rec.wav", signal, [], RATE)

    offline = offline_events(keyword_model.onnx, wav)
    assert offline

    events = Collector(broker.port, "audio/+/keyword")
    audio = {
        "model": str(keyword_model.onnx),
        "wavfile": [{"name": "replay", "path": str(wav), "realtime": False, "block_size": 800}],
    }
    doc = daemon_config(tmp_path, model_path, broker.port, "audio-wav", audio=audio)
    with running_daemon(doc, tmp_path) as daemon:
        got = [json.loads(p) for _, p, _ in events.take(len(offline), timeout=60)]
        assert events.quiet(0.5) == []
        registry = daemon.metrics.registry
    events.close()
    assert [(e["keyword"], e["time_s"]) for e in got] == [
        (e.keyword, round(e.time_s, 3)) for e in offline
    ]
    assert all(e["stream"] == "replay" and e["model"] == "keywords" for e in got)
    total = sum(
        _metric(registry, "seqstream_keywords_detected_total", {"keyword": k}) for k in KEYWORDS
    )
    assert total == len(got)


@pytest.mark.timeout(KEYWORD_MODEL_TIMEOUT_S)
def test_virtual_microphone_keywords_reach_mqtt_at_the_right_times(
    keyword_model: KeywordModel,
    broker: Broker,
    model_path: Path,
    vmic: VirtualMicrophone,
    tmp_path: Path,
) -> None:
    signal, spoken = make_recording(RECORDING, RECORDING_VOICE, seed=3)
    wav = write_recording(tmp_path / "rec.wav", signal, spoken, RATE)
    arrivals: list[tuple[float, dict[str, Any]]] = []
    events = Collector(broker.port, "audio/+/keyword")
    audio = {
        "model": str(keyword_model.onnx),
        "microphone": [{"name": "kitchen", "device": "default", "silence_timeout_s": 20.0}],
    }
    doc = daemon_config(tmp_path, model_path, broker.port, "audio-mic", audio=audio)
    with running_daemon(doc, tmp_path) as daemon:
        registry = daemon.metrics.registry
        up = {"source": "kitchen"}
        deadline = time.monotonic() + 10
        while _metric(registry, "seqstream_audio_seconds_total", up) < 0.5:
            assert time.monotonic() < deadline, "the virtual microphone delivers no audio"
            time.sleep(0.05)
        t_play = time.time()
        player = vmic.play(wav)
        deadline = time.monotonic() + len(signal) / RATE + 15
        done_at = None
        while done_at is None or time.monotonic() < done_at + 2.0:  # 2 s after playing
            assert time.monotonic() < deadline, "paplay did not finish"
            with contextlib.suppress(queue.Empty):
                _, payload, _ = events.messages.get(timeout=0.1)
                arrivals.append((time.time(), json.loads(payload)))
            if done_at is None and player.poll() is not None:
                done_at = time.monotonic()
        assert player.returncode == 0
        overflows = _metric(
            registry, "seqstream_audio_overflows_total", {"source": "kitchen", "where": "buffer"}
        )
    events.close()

    got = [e for _, e in arrivals]
    hits, stray = _match(got, spoken, t_play)
    expected = {i: w.word for i, w in enumerate(spoken) if w.word in KEYWORDS}
    detected = {i: hits[i]["keyword"] for i in hits}
    # What the model finds in the same recording read from the file: the live path must
    # find that, give or take one borderline word (the capture's frames start anywhere).
    from_file = [{"ts": e.time_s, "keyword": e.keyword} for e in offline_events(
        keyword_model.onnx, wav)]  # fmt: skip
    offline = {i: e["keyword"] for i, e in _match(from_file, spoken, 0.0)[0].items()}
    summary = {
        "expected": expected,
        "detected": detected,
        "offline": offline,
        "stray": [(e["keyword"], round(e["ts"] - t_play, 2)) for e in stray],
    }
    assert not stray, summary  # nothing in the pauses
    # never a wrong keyword, and no unknown word fires
    assert all(expected.get(i) == kw for i, kw in detected.items()), summary
    assert all(expected.get(i) == kw for i, kw in offline.items()), summary
    # the model on an unheard voice: at least 9 of the 10 keywords, live and from the file
    assert len(detected) >= 9 and len(offline) >= 9, summary
    assert overflows == 0
    # Latency figures for the note: from the end of the word (paplay start + offset in
    # the file, an upper bound: it includes paplay's start-up and PulseAudio's buffer)
    # and from the capture of the frame that fired, to the event's arrival here.
    by_event = {id(e): t for t, e in arrivals}
    end_to_event = [by_event[id(hits[i])] - (t_play + spoken[i].end_s) for i in detected]
    capture_to_mqtt = [by_event[id(hits[i])] - hits[i]["ts"] for i in detected]
    figures = {
        "speech_end_to_mqtt_s": {
            "median": float(np.median(end_to_event)),
            "max": float(np.max(end_to_event)),
        },
        "capture_to_mqtt_s": {
            "median": float(np.median(capture_to_mqtt)),
            "max": float(np.max(capture_to_mqtt)),
        },
    }
    print(json.dumps(figures))
    if REPORTS:
        Path(REPORTS, "latency.json").write_text(json.dumps(figures, indent=2) + "\n")
    assert max(capture_to_mqtt) < 0.5


class Recorder:
    """A microphone observer that keeps what it is told (real metrics next to it)."""

    def __init__(self, metrics: AudioMetrics) -> None:
        self.metrics = metrics
        self.problems: list[str] = []
        self.lock = threading.Lock()

    def on_overflow(self, source: str, where: str) -> None:
        self.metrics.on_overflow(source, where)

    def on_device_problem(self, source: str, problem: str) -> None:
        with self.lock:
            self.problems.append(problem)
        self.metrics.on_device_problem(source, problem)

    def on_device_up(self, source: str, up: bool) -> None:
        self.metrics.on_device_up(source, up)


def _pump(src: MicrophoneSource, seconds: float) -> list[AudioBlock]:
    blocks = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        b = src.read(0.05)
        if b is not None:
            blocks.append(b)
    return blocks


def test_silent_and_vanished_devices_are_reported_and_capture_resumes(
    vmic: VirtualMicrophone,
) -> None:
    registry = CollectorRegistry()
    metrics = AudioMetrics(registry, sources=["m"], keywords=["yes"])
    metrics.set_rate("m", RATE)
    obs = Recorder(metrics)
    cfg = MicrophoneSettings(
        name="m", device="default", silence_timeout_s=1.0, retry_min_s=0.2, retry_max_s=0.5
    )
    src = MicrophoneSource(cfg, RATE, obs)
    labels = {"source": "m"}
    src.start()
    try:
        # Nothing plays: the null sink delivers exact zeros -> "silent", reopened.
        blocks = _pump(src, 2.0)
        assert blocks and all(not b.samples.any() for b in blocks)
        assert "silent" in obs.problems and src.opened >= 2
        assert _metric(registry, "seqstream_audio_device_problems_total",
                       {**labels, "problem": "silent"}) >= 1  # fmt: skip
        # The sound server dies: the device is lost, reopening fails until it is back.
        vmic.kill_server()
        _pump(src, 1.5)
        assert "lost" in obs.problems or "stalled" in obs.problems
        assert "open_failed" in obs.problems
        assert _metric(registry, "seqstream_audio_device_up", labels) == 0
        vmic.start()
        after = _pump(src, 2.0)
        assert after, "capture did not resume after the device came back"
        assert _metric(registry, "seqstream_audio_device_up", labels) == 1
        # The outage is a gap the consumer sees, never silently joined audio.
        assert after[0].lost >= RATE  # more than a second was missed
        for a, b in itertools.pairwise(after):
            assert b.start == a.end + b.lost
    finally:
        src.close()
