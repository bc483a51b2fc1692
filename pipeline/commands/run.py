"""``seqstream run --config FILE.toml``: the MQTT daemon (see :mod:`pipeline.daemon.lifecycle`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pipeline.commands.parsing import subcommand
from pipeline.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "run",
        run,
        help="serve a model over MQTT (the daemon)",
        description="Subscribe to sensor topics, predict with carried state per stream, "
        "publish predictions and serve Prometheus metrics, as configured in FILE. "
        "SIGTERM/SIGINT stop it cleanly (drain, checkpoint, 'offline'); SIGHUP re-reads "
        "FILE and hot-swaps the model. Under systemd (Type=notify) it reports readiness, "
        "status and watchdog pings.",
    )
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="TOML config")
    p.add_argument(
        "--allow-root",
        action="store_true",
        help="run even as root (refused by default: a parser of network input should not "
        "hold every privilege; use a service user, e.g. systemd's DynamicUser)",
    )


def refuse_root(allow_root: bool, euid: int | None = None) -> None:
    """A daemon that parses untrusted network input does not start as root unless told."""
    if (os.geteuid() if euid is None else euid) == 0 and not allow_root:
        raise ConfigError("refusing to run as root; run as a service user, or pass --allow-root")


def run(args: argparse.Namespace) -> int:
    from pipeline.daemon import app, config, service

    refuse_root(args.allow_root)
    settings = config.load(args.config)
    if settings.cluster is not None:  # many daemons over NATS JetStream
        try:
            from pipeline.cluster import app as cluster_app
        except ImportError as exc:
            raise ConfigError(
                f"[cluster] needs nats-py ({exc}): pip install 'seqstream[cluster]'"
            ) from None
        return cluster_app.run(settings)
    return app.build(settings, env=service.ServiceEnv.from_environ()).run()
