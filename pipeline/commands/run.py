"""``seqstream run --config FILE.toml``: the MQTT daemon (see :mod:`pipeline.daemon`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="serve a model over MQTT (the daemon)",
        description="Subscribe to sensor topics, predict with carried state per stream, "
        "publish predictions and serve Prometheus metrics, as configured in FILE. "
        "SIGTERM/SIGINT stop it cleanly (drain, checkpoint, 'offline').",
    )
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="TOML config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline import app, config

    settings = config.load(args.config)
    return app.build(settings).run()
