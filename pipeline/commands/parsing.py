"""What every subcommand's parser shares: how it is added and run, and its model argument.

A command module's ``register(subparsers)`` adds its parsers through :func:`subcommand`,
so each one carries the function that runs it (``args.func``, called by
:func:`pipeline.cli.main` with the parsed arguments; its return value is the exit code).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

Run = Callable[[argparse.Namespace], int]
MODEL_HELP = "MODEL.onnx written by 'seqstream export'"


def subcommand(
    parent: Any, name: str, run: Run, *, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """Add ``name`` to ``parent`` (the CLI's subparsers, or a command's own), run by ``run``."""
    p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=description)
    p.set_defaults(func=run)
    return p


def add_model_argument(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    """The positional ``model``: an exported step model's path."""
    p.add_argument("model", type=Path, help=help)
