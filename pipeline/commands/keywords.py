"""``seqstream keywords generate | recording | detect``: keyword-spotting data and checks.

* ``generate`` writes a synthetic training/test set (espeak-ng voices mixed with noise,
  deterministic in ``--seed``) as WAV folders that ``seqstream train --data DIR``
  reads directly.
* ``recording`` speaks a list of words with pauses into one WAV file plus a JSON file
  of where each word lies: input for replay, demos and end-to-end tests.
* ``evaluate`` scores a model on held-out WAV folders: ``confusion.json`` + ``.png``.
* ``detect`` runs the daemon's audio path (same features, engine and detector) over
  WAV files as fast as possible and prints the keyword events and the real-time factor
  as JSON, without a broker or a microphone.

None of these needs torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.commands.parsing import add_model_argument, subcommand
from pipeline.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "keywords",
        help="keyword spotting: synthetic data, test recordings, offline detection",
        description="Keyword-spotting tools (see the subcommands).",
    )
    kw = p.add_subparsers(dest="keywords_command", metavar="SUBCOMMAND", required=True)

    g = subcommand(
        kw,
        "generate",
        _generate,
        help="synthesize a keyword data set with espeak-ng",
        description="Writes OUT/train/<class>/*.wav and OUT/test/<class>/*.wav (test voices "
        "are never used in training), frontend.json in each, and OUT/manifest.json.",
    )
    g.add_argument("--out", type=Path, required=True, help="output directory")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--per-class", type=int, default=200, help="training clips per class (unknown: twice)"
    )
    g.add_argument("--test-per-class", type=int, default=30, help="test clips per class")
    g.add_argument("--workers", type=int, default=4, help="espeak-ng processes at once")

    r = subcommand(
        kw,
        "recording",
        _recording,
        help="speak words with pauses into one WAV file (+ JSON of word times)",
    )
    r.add_argument("--out", type=Path, required=True, help="WAV file to write (.json beside)")
    r.add_argument("--words", required=True, help="comma-separated words, in order")
    r.add_argument("--voice", default="en-us+f5", help="espeak-ng voice (accent+variant)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--pause", type=float, nargs=2, default=(1.5, 2.5), metavar=("MIN", "MAX"))
    r.add_argument("--snr-db", type=float, default=20.0)

    e = subcommand(
        kw,
        "evaluate",
        _evaluate,
        help="accuracy on held-out WAV folders: confusion.json and confusion.png",
    )
    add_model_argument(e, "keyword model (.onnx)")
    e.add_argument("--data", type=Path, required=True, help="WAV folders, e.g. OUT/test")
    e.add_argument("--out", type=Path, required=True, help="directory for the report")

    d = subcommand(
        kw,
        "detect",
        _detect,
        help="keyword events of WAV files through the daemon's audio path",
        description="Prints one JSON line per event, then a JSON summary with the real-time "
        "factor (audio seconds per wall second, all files at once).",
    )
    add_model_argument(d, "keyword model (.onnx)")
    d.add_argument("wav", type=Path, nargs="+", help="16-bit PCM WAV files, one stream each")
    d.add_argument("--threshold", type=float, default=0.7)
    d.add_argument("--smooth-ms", type=float, default=100.0)
    d.add_argument("--refractory-ms", type=float, default=1000.0)
    d.add_argument("--block-size", type=int, default=320, help="samples per block")
    d.add_argument("--realtime", action="store_true", help="pace the files as live audio")


def _generate(args: argparse.Namespace) -> int:
    from pipeline.keywords.generate import GenerateConfig, generate

    started = time.monotonic()
    summary = generate(
        GenerateConfig(
            out=args.out,
            seed=args.seed,
            train_per_class=args.per_class,
            test_per_class=args.test_per_class,
            workers=args.workers,
        )
    )
    summary["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(summary))
    return 0


def _recording(args: argparse.Namespace) -> int:
    from pipeline.keywords.generate import make_recording, write_recording

    words = [w.strip() for w in args.words.split(",") if w.strip()]
    if not words:
        raise ConfigError("--words: give at least one word")
    signal, spoken = make_recording(
        words, args.voice, seed=args.seed, pause_s=tuple(args.pause), snr_db=args.snr_db
    )
    write_recording(args.out, signal, spoken, 16_000)
    print(json.dumps({"wav": str(args.out), "seconds": round(len(signal) / 16_000, 3)}))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.keywords.report import evaluate_report

    report = evaluate_report(args.model, args.data, args.out)
    keep = ("model", "n_cases", "accuracy", "labels", "confusion_matrix")
    print(json.dumps({k: report[k] for k in keep if k in report}))
    return 0


def _detect(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from pipeline.keywords import service as ks
    from pipeline.keywords.detector import DetectorSettings
    from pipeline.sources.wavfile import WavFileSource

    names = [f"{i}-{p.stem}" for i, p in enumerate(args.wav)]
    settings = ks.AudioSettings(
        model=args.model,
        detector=DetectorSettings(
            threshold=args.threshold,
            smooth_ms=args.smooth_ms,
            refractory_ms=args.refractory_ms,
        ),
        files=tuple(
            ks.WavFileSettings(n, p, realtime=args.realtime, block_size=args.block_size)
            for n, p in zip(names, args.wav, strict=True)
        ),
    )

    class Printer:
        count = 0

        def publish(self, event: ks.KeywordEvent) -> None:
            self.count += 1
            sys.stdout.write(event.to_json().decode() + "\n")

    printer = Printer()
    service = ks.build(settings, printer, CollectorRegistry())
    audio_s = sum(
        f.source.duration_s for f in service.feeders if isinstance(f.source, WavFileSource)
    )
    started = time.perf_counter()
    service.start()
    try:
        service.wait_sources()
    finally:
        service.stop()
    wall = time.perf_counter() - started
    summary = {
        "streams": len(names),
        "audio_seconds": round(audio_s, 3),
        "wall_seconds": round(wall, 4),
        "realtime_factor": round(audio_s / wall, 1) if wall > 0 else None,
        "events": printer.count,
    }
    print(json.dumps(summary))
    return 0
