"""Keyword spotting speed and timing: real-time factor per stream, detection delay.

Prints one JSON document:

* ``rtf``: for 1, 4 and 16 streams and two block sizes (20 ms, 100 ms), the daemon's
  audio path (WAV sources as fast as possible -> streaming log-mel -> engine batched
  across streams -> detector) over a generated recording; ``per_stream_rtf`` is audio
  seconds of one stream per wall second with all streams running (>= 50 is the goal on
  2 cores), ``aggregate_rtf`` how many such streams one process keeps up with.
* ``detection``: over recordings of every keyword in held-out voices, hits, misses and
  false alarms, and the delay from the end of each spoken word to the frame that fired
  (stream time, so no capture or network latency: see the microphone test for those).
* ``false_accepts``: a long recording of non-keyword speech (the training set's unknown
  words, near misses included, and words training never heard) with short pauses, in
  held-out voices and four accents: every event is a false accept; ``per_hour`` of that
  speech is the figure to compare (it is not the rate in ordinary conversation, which
  holds fewer near misses).

    python benchmarks/keywords_rtf.py MODEL.onnx [--seconds 60] [--threshold 0.7]

Without a model, train one: ``seqstream keywords generate --out D`` then
``seqstream train --task classify --data D/train --out RUN`` and ``seqstream export``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.keywords import service as ks  # noqa: E402
from pipeline.keywords.detector import DetectorSettings  # noqa: E402
from pipeline.keywords.generate import (  # noqa: E402
    KEYWORDS,
    TEST_VARIANTS,
    UNKNOWN_WORDS,
    make_recording,
    write_recording,
)

RATE = 16_000
# Words no training clip holds: some sound like a keyword ("lights", "going", "upper").
UNHEARD_WORDS = (
    "hello", "water", "music", "kitchen", "open", "close", "please", "morning", "weather",
    "number", "lights", "yellow", "going", "nobody", "upper", "store", "lift", "yesterday",
    "dawn", "window",
)  # fmt: skip
FA_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-us-nyc")


class Collect:
    def __init__(self) -> None:
        self.events: list[ks.KeywordEvent] = []

    def publish(self, event: ks.KeywordEvent) -> None:
        self.events.append(event)


def run(
    model: Path, wavs: list[Path], block: int, detector: DetectorSettings | None = None
) -> tuple[float, Collect]:
    """Wall seconds to process every WAV as its own stream, and the events."""
    files = tuple(
        ks.WavFileSettings(f"s{i}", w, realtime=False, block_size=block) for i, w in enumerate(wavs)
    )
    sink = Collect()
    settings = ks.AudioSettings(model=model, files=files, detector=detector or DetectorSettings())
    service = ks.build(settings, sink, CollectorRegistry())
    started = time.perf_counter()
    service.start()
    service.wait_sources()
    wall = time.perf_counter() - started
    service.stop()
    return wall, sink


def rtf(model: Path, tmp: Path, seconds: float) -> list[dict[str, Any]]:
    words = [KEYWORDS[i % len(KEYWORDS)] for i in range(int(seconds / 2.5))]
    signal, spoken = make_recording(words, "en-us+f4", seed=7, pause_s=(1.0, 2.0))
    wav = write_recording(tmp / "rtf.wav", signal, spoken, RATE)
    audio_s = len(signal) / RATE
    rows = []
    for block in (320, 1600):
        for streams in (1, 4, 16):
            wall, _ = run(model, [wav] * streams, block)
            rows.append(
                {
                    "streams": streams,
                    "block_ms": block * 1000 // RATE,
                    "audio_seconds_per_stream": round(audio_s, 2),
                    "wall_seconds": round(wall, 3),
                    "per_stream_rtf": round(audio_s / wall, 1),
                    "aggregate_rtf": round(streams * audio_s / wall, 1),
                }
            )
    return rows


def detection(model: Path, tmp: Path, detector: DetectorSettings) -> dict[str, Any]:
    """Every keyword plus unknown words, in each held-out voice variant (en-us accent)."""
    words = [*KEYWORDS, "house", "seven", "bird"]
    hits = misses = false_alarms = wrong = 0
    delays: list[float] = []
    for k, variant in enumerate(TEST_VARIANTS):
        order = list(np.random.default_rng(k).permutation(words))
        signal, spoken = make_recording(order, f"en-us+{variant}", seed=k)
        wav = write_recording(tmp / f"det{k}.wav", signal, spoken, RATE)
        _, sink = run(model, [wav], 320, detector)
        used: set[int] = set()
        for e in sink.events:
            match = [
                i
                for i, w in enumerate(spoken)
                if w.start_s - 0.3 <= e.time_s <= w.end_s + 1.0 and i not in used
            ]
            if not match:
                false_alarms += 1
                continue
            i = match[0]
            used.add(i)
            if spoken[i].word == e.keyword:
                hits += 1
                delays.append(e.time_s - spoken[i].end_s)
            elif spoken[i].word in KEYWORDS:
                wrong += 1
            else:
                false_alarms += 1  # an unknown word fired
        misses += sum(1 for i, w in enumerate(spoken) if w.word in KEYWORDS and i not in used)
    n = len(TEST_VARIANTS) * len(KEYWORDS)
    return {
        "voices": [f"en-us+{v}" for v in TEST_VARIANTS],
        "keywords_spoken": n,
        "hits": hits,
        "wrong_keyword": wrong,
        "misses": misses,
        "false_alarms": false_alarms,
        "recall": round(hits / n, 3),
        "word_end_to_detection_s": {
            "median": round(float(np.median(delays)), 3) if delays else None,
            "p90": round(float(np.percentile(delays, 90)), 3) if delays else None,
            "min": round(float(np.min(delays)), 3) if delays else None,
            "max": round(float(np.max(delays)), 3) if delays else None,
        },
    }


def false_accepts(model: Path, tmp: Path, detector: DetectorSettings) -> dict[str, Any]:
    """Events per hour of speech that holds no keyword (each held-out voice, 20 words)."""
    pool = [*UNKNOWN_WORDS, *UNHEARD_WORDS]
    wavs: list[Path] = []
    seconds = 0.0
    for k, variant in enumerate(TEST_VARIANTS):
        rng = np.random.default_rng(100 + k)
        words = [pool[i] for i in rng.permutation(len(pool))[:20]]
        voice = f"{FA_ACCENTS[k % len(FA_ACCENTS)]}+{variant}"
        signal, spoken = make_recording(words, voice, seed=200 + k, pause_s=(0.3, 1.5))
        wavs.append(write_recording(tmp / f"fa{k}.wav", signal, spoken, RATE))
        seconds += len(signal) / RATE
    _, sink = run(model, wavs, 1600, detector)
    fired: dict[str, int] = {}
    for e in sink.events:
        fired[e.keyword] = fired.get(e.keyword, 0) + 1
    return {
        "words": len(wavs) * 20,
        "audio_seconds": round(seconds, 1),
        "false_accepts": len(sink.events),
        "per_hour": round(len(sink.events) / (seconds / 3600), 1),
        "by_keyword": dict(sorted(fired.items())),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--seconds", type=float, default=60.0, help="length of the RTF recording")
    p.add_argument("--threshold", type=float, default=DetectorSettings.threshold)
    p.add_argument("--smooth-ms", type=float, default=DetectorSettings.smooth_ms)
    args = p.parse_args()
    detector = DetectorSettings(threshold=args.threshold, smooth_ms=args.smooth_ms)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        report = {
            "cpus": os.cpu_count(),
            "model": str(args.model),
            "rtf": rtf(args.model, tmp, args.seconds),
            "detector": {"threshold": detector.threshold, "smooth_ms": detector.smooth_ms},
            "detection": detection(args.model, tmp, detector),
            "false_accepts": false_accepts(args.model, tmp, detector),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
