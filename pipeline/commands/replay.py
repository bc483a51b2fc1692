"""``seqstream replay DATA --broker URL``: publish a data set as live sensors.

Every case of a ``.ts``/CSV file becomes one stream; the streams are interleaved row
by row (all streams' row 0, then all row 1 ...), each message numbered with ``seq``
(the row index) and, when the data has them, the row's timestamp as ``ts``. With
``--rate HZ`` each stream sends HZ rows per second, as a sensor would; without it, as
fast as the broker takes them. Payloads are positional JSON, named JSON (``--named``:
values keyed by feature name) or binary; ``--channel-topic`` publishes one message per
feature instead, on the feature's own topic, as ``input.channel_topic`` reads them.
For demos, tests and load: the daemon cannot tell it from real sensors.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline.commands.data_args import add_data_arguments, data_options
from pipeline.commands.parsing import subcommand

SCHEMES = {"mqtt": 1883, "mqtts": 8883}
FLUSH_EVERY = 10_000  # messages; bounds what waits in the client's queue


def register(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "replay",
        run,
        help="publish a data set's cases as live sensor streams over MQTT",
        description="Publish every case of DATA as one stream, row by row, in the payload "
        "format 'seqstream run' reads.",
    )
    p.add_argument("data", type=Path, help="data file (.ts or .csv)")
    p.add_argument(
        "--broker",
        default="mqtt://127.0.0.1:1883",
        help="mqtt://[user@]host[:port] or mqtts://... (default: %(default)s)",
    )
    p.add_argument(
        "--topic-template",
        default="sensors/{stream}/data",
        help="topic per stream; {stream} is replaced by the case name (default: %(default)s)",
    )
    p.add_argument(
        "--channel-topic",
        metavar="TEMPLATE",
        help="publish one message per feature instead, on this template with {stream} and "
        "{channel} (the feature's name), as input.channel_topic reads it; JSON only",
    )
    p.add_argument(
        "--named",
        action="store_true",
        help='JSON values named by feature ({"values": {"temp": 21.5, ...}}) instead of positional',
    )
    p.add_argument(
        "--feature-names",
        nargs="+",
        metavar="NAME",
        help="the names for --named and --channel-topic, in column order (default: the "
        "data's own feature names, e.g. the CSV header, which train also uses)",
    )
    p.add_argument("--rate", type=float, default=0.0, help="rows per second per stream (0: max)")
    p.add_argument("--chunk", type=int, default=1, help="rows per message (default: 1)")
    p.add_argument("--format", choices=("json", "binary"), default="json")
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=1)
    p.add_argument("--prefix", default="", help="prepended to every stream name")
    p.add_argument("--cases", type=int, help="replay only the first N cases")
    p.add_argument("--client-id", default="", help="MQTT client id (default: random)")
    p.add_argument("--ca-file", type=Path, help="CA certificate for mqtts://")
    p.add_argument("--password-env", help="environment variable holding the password")
    add_data_arguments(p)


def run(args: argparse.Namespace) -> int:
    import os

    import numpy as np

    from pipeline.errors import ConfigError
    from pipeline.offline import datasets
    from pipeline.sources import codecs
    from pipeline.transport.mqtt import Link, MqttConfig, Secret, TlsConfig, host_problem
    from pipeline.transport.topics import CHANNEL, STREAM

    if STREAM not in args.topic_template:
        raise ConfigError(f"--topic-template: must contain {STREAM}")
    channel_topic = args.channel_topic
    if channel_topic is not None and (
        channel_topic.count(STREAM) != 1 or channel_topic.count(CHANNEL) != 1
    ):
        raise ConfigError(f"--channel-topic: must contain {STREAM} and {CHANNEL} once each")
    if (args.named or channel_topic is not None) and args.format == "binary":
        raise ConfigError("--named and --channel-topic are JSON payloads: not with --format binary")
    if channel_topic is not None and args.chunk != 1:
        raise ConfigError("--channel-topic sends one reading per message: not with --chunk")
    if args.rate < 0 or args.chunk < 1:
        raise ConfigError("--rate must be >= 0 and --chunk >= 1")
    url = urlsplit(args.broker)
    try:
        port = url.port or SCHEMES.get(url.scheme, 0)
    except ValueError:  # urllib's own: a port that is not a number in 0..65535
        raise ConfigError(f"--broker: {args.broker!r} has no valid port (1..65535)") from None
    if url.scheme not in SCHEMES or not url.hostname:
        raise ConfigError(
            f"--broker: expected mqtt://host[:port] or mqtts://..., got {args.broker}"
        )
    bad_host = host_problem(url.hostname)
    if bad_host:
        raise ConfigError(f"--broker: host {bad_host}")
    password = None
    if args.password_env:
        value = os.environ.get(args.password_env, "")
        if not value:
            raise ConfigError(f"--password-env: {args.password_env} is not set or empty")
        password = Secret(value)
    options = data_options(args)
    data = datasets.load(args.data, **options)
    n = data.n_cases if args.cases is None else min(args.cases, data.n_cases)
    names = tuple(args.feature_names) if args.feature_names else data.features
    if len(names) != data.n_features:
        raise ConfigError(
            f"--feature-names: {len(names)} names for the data's {data.n_features} features"
        )
    named = names if args.named else None

    def encode(values: Any, seq: int, ts: float | None) -> bytes:
        if args.format == "binary":
            return codecs.encode_binary(values, seq, ts)
        return codecs.encode_json(values, seq, ts, names=named)

    template = args.topic_template if channel_topic is None else channel_topic
    prefix, suffix = template.split(STREAM, 1)
    topics = [f"{prefix}{args.prefix}{data.case_name(i)}{suffix}" for i in range(n)]
    # per channel: each stream's topic once per feature, {channel} filled in
    channels = [[t.replace(CHANNEL, name) for name in names] for t in topics]

    cfg = MqttConfig(
        host=url.hostname,
        port=port,
        client_id=args.client_id or f"seqstream-replay-{os.getpid()}",
        clean_session=True,
        username=unquote(url.username) if url.username else None,
        password=password,
        tls=TlsConfig(ca_file=args.ca_file) if url.scheme == "mqtts" else None,
        max_queued_out=0,
    )
    link = Link(cfg, announce=False)
    link.start()
    messages = rows = 0
    started = time.monotonic()
    try:
        longest = max((c.shape[0] for c in data.cases[:n]), default=0)
        for row in range(0, longest, args.chunk):
            if args.rate > 0:
                delay = started + row / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            for i in range(n):
                case = data.cases[i]
                if row >= case.shape[0]:
                    continue
                values = np.ascontiguousarray(case[row : row + args.chunk], dtype=np.float32)
                ts = None
                if data.timestamps is not None:
                    ts = float(data.timestamps[i][row])
                one = values[0] if values.shape[0] == 1 else values
                if channel_topic is not None:
                    for topic, value in zip(channels[i], values[0], strict=True):
                        link.publish(topic, codecs.encode_channel(value, row, ts), args.qos)
                    messages += len(names) - 1
                else:
                    link.publish(topics[i], encode(one, row, ts), args.qos)
                messages += 1
                rows += values.shape[0]
                if messages % FLUSH_EVERY == 0:
                    link.flush(60.0)
        link.flush(60.0)
    finally:
        link.stop()
    seconds = time.monotonic() - started
    summary = {"streams": n, "messages": messages, "rows": rows, "seconds": round(seconds, 3)}
    print(json.dumps(summary))
    return 0
