"""The ``seqstream`` command: argument parsing and exit codes, nothing else.

Each command lives in its own module exposing ``register(subparsers)``, which adds a
parser whose ``func`` default takes the parsed namespace and returns an exit code.
Command modules import their heavy dependencies (torch, onnxruntime) inside ``func``,
so ``seqstream --help`` is fast and the runtime commands never load torch.

This is the only place that maps :class:`~pipeline.errors.SeqstreamError` to an exit
status: one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from pipeline import __version__
from pipeline.errors import SeqstreamError

# Command modules, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "models.cli",  # train, export, verify (need the [train] extra when run)
    "pipeline.commands.evaluate",  # eval
    "pipeline.commands.info",  # info (what a model takes and gives)
    "pipeline.commands.run",  # run (the MQTT daemon)
    "pipeline.commands.replay",  # replay
    "pipeline.commands.config",  # config check
    "pipeline.commands.status",  # status (a running daemon's /status as a table)
    "pipeline.commands.bench",  # bench (engine vs raw onnxruntime)
    "pipeline.commands.keywords",  # keywords generate|recording|detect (audio)
)

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqstream",
        description="Train, export and serve stateful streaming sequence models.",
    )
    parser.add_argument("--version", action="version", version=f"seqstream {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default: INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SeqstreamError as exc:
        print(f"seqstream: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("seqstream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
