"""``seqstream config check FILE``: validate a daemon config and nothing else.

Exit 0 and one line when the file is valid; otherwise the CLI prints the one-line
:class:`~pipeline.errors.ConfigError` naming the key. The model is not loaded: this
runs on a machine that does not have it yet (CI, a deployment pipeline).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "config",
        help="check a daemon configuration file",
        description="Configuration tools for 'seqstream run'.",
    )
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        help="validate FILE (unknown keys, types, ranges, secrets readable) and exit",
        description="Parse and validate a TOML config exactly as 'seqstream run' does, "
        "without loading the model or connecting to the broker.",
    )
    check.add_argument("file", type=Path, help="the TOML config")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from pipeline import config

    settings = config.load(args.file)
    mqtt = settings.mqtt
    print(
        f"{args.file}: ok (model {settings.model.path}, broker {mqtt.host}:{mqtt.port}, "
        f"MQTT {mqtt.protocol}{' over TLS' if mqtt.tls else ''}, input {settings.input.topic!r})"
    )
    return 0
