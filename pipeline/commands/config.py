"""``seqstream config check FILE``: check a daemon config as ``run`` would, without connecting.

Exit 0 and one line when ``run`` would accept it; otherwise the CLI prints the one-line
:class:`~pipeline.errors.SeqstreamError` naming the key or the file. It checks what
``run`` checks before it touches the network: the TOML and every key (types, ranges,
``mqtt.host`` a host, ports), secrets and TLS files readable, the model file present,
loadable and fitting the contract and the config (``model.sha256``, ``output.on_change``
needs a classifier) for every ``[[route]]``, the keyword model of ``[audio]``, and that
the metrics bind address resolves. It binds nothing and connects to nothing, so it
runs in CI or a deployment pipeline; ``--no-model`` skips the model files for a
machine that does not have them.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

from pipeline.commands.parsing import subcommand


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "config",
        help="check a daemon configuration file",
        description="Configuration tools for 'seqstream run'.",
    )
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = subcommand(
        sub,
        "check",
        run_check,
        help="check FILE as 'seqstream run' would (keys, secrets, model), without connecting",
        description="Parse and validate a TOML config exactly as 'seqstream run' does and "
        "load the model(s) it names, without binding a port or connecting to the broker.",
    )
    check.add_argument("file", type=Path, help="the TOML config")
    check.add_argument(
        "--no-model",
        action="store_true",
        help="do not load the model files (a machine that does not have them yet)",
    )


def run_check(args: argparse.Namespace) -> int:
    from pipeline.daemon import app, config
    from pipeline.errors import ConfigError

    settings = config.load(args.file)
    mqtt = settings.mqtt
    routes = []
    for route in settings.routes:  # each as run loads and checks it
        model = "not loaded (--no-model)"
        if not args.no_model:
            loaded = app.load_route_model(route)
            app.check_route_model(route, loaded)
            spec = loaded.spec
            model = f"{spec.name} {spec.version}, {spec.task}, {spec.n_features} features"
        name = "" if len(settings.routes) == 1 else f"route {route.name}: "
        routes.append(f"{name}model {route.model.path}: {model}, input {route.input.topic!r}")
    if not args.no_model and settings.audio is not None:
        from pipeline.keywords.service import load_keyword_model

        load_keyword_model(settings.audio)
    m = settings.metrics
    if m.enabled:
        try:
            socket.getaddrinfo(m.bind, m.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise ConfigError(f"metrics.bind: {m.bind!r} does not resolve ({exc})") from None
    broker = f"broker {mqtt.host}:{mqtt.port}, MQTT {mqtt.protocol}"
    print(f"{args.file}: ok ({'; '.join(routes)}; {broker}{' over TLS' if mqtt.tls else ''})")
    return 0
