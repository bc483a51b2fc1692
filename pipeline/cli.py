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
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import NoReturn

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
    "models.bench",  # bench (engine vs raw onnxruntime and PyTorch eager; not runtime code)
    "pipeline.commands.keywords",  # keywords generate|recording|detect (audio)
)

EXIT_ERROR = 2
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (``ts``, ``level``, ``logger``, ``msg``, ``exc``), so a
    log shipper needs no parsing rules and a multi-line traceback stays one record."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``seqstream: error: ...``), exit 2, like every
    other error of the CLI; ``--help`` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log lines as text (default) or one JSON object per line, for log shippers",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else logging.Formatter(TEXT))
    logging.basicConfig(level=args.log_level, handlers=[handler])
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
