"""What a second model (``[[route]]``) costs each message on the network thread.

Prints one JSON document. Two daemons are built in this process, as ``seqstream run``
builds them (``pipeline.daemon.app.build``) but never connected: one with a single route
(``sensors/{stream}/data``), one with two (that route and ``plant/+/{stream}/flow``).
Messages for the first route are handed to paho's own router (``_handle_on_message``,
what paho's network thread calls for every PUBLISH), so each one is matched against the
subscriptions, decoded and queued for the engine exactly as from a socket; the engines
run on their own threads meanwhile. Rounds of the two daemons are interleaved (ABBA), the
median round is reported per message, with the ratio two-route / one-route. Also the
bare topic lookup (paho's ``MQTTMatcher.iter_match``) with each daemon's subscriptions.

    python benchmarks/route_dispatch.py [--messages 20000] [--rounds 7] [--streams 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry  # noqa: E402

from models.export import export_random  # noqa: E402
from pipeline.daemon import app, config  # noqa: E402
from pipeline.daemon.lifecycle import Daemon  # noqa: E402
from pipeline.sources import codecs  # noqa: E402


def build(tmp: Path, classifier: Path, forecaster: Path, two: bool) -> Daemon:
    motion = {
        "name": "motion",
        "model": {"path": str(classifier)},
        "input": {"topic": "sensors/{stream}/data", "reset_topic": ""},
        "output": {"topic": "predictions/{stream}"},
    }
    flow = {
        "name": "flow",
        "model": {"path": str(forecaster)},
        "input": {"topic": "plant/+/{stream}/flow", "reset_topic": ""},
        "output": {"topic": "forecasts/{stream}"},
    }
    doc: dict[str, Any] = {
        "route": [motion, flow] if two else [motion],
        "mqtt": {"client_id": "bench-two" if two else "bench-one"},
        "metrics": {"enabled": False},
        "queue": {"max_size": 1_000_000},
        "engine": {"max_seq_jump": False},
    }
    settings = config.parse(doc, base=tmp, source=tmp / "bench.toml")
    return app.build(settings, registry=CollectorRegistry())


def messages(n: int, streams: int, start: int) -> list[paho.MQTTMessage]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        msg = paho.MQTTMessage(mid=i + 1, topic=f"sensors/s{i % streams}/data".encode())
        msg.payload = codecs.encode_json(
            rng.normal(size=6).astype(np.float32), start + i // streams
        )
        msg.qos = 0
        out.append(msg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--streams", type=int, default=100)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="route-bench-"))
    classifier, forecaster = tmp / "c.onnx", tmp / "f.onnx"
    export_random(classifier, cell="lstm", task="classify", n_features=6, hidden=16)
    export_random(forecaster, cell="gru", task="forecast", n_features=3, hidden=16)
    daemons = {"one_route": build(tmp, classifier, forecaster, False)}
    daemons["two_routes"] = build(tmp, classifier, forecaster, True)
    for d in daemons.values():
        for r in d.routes:
            r.worker.start()
    per_msg: dict[str, list[float]] = {k: [] for k in daemons}
    lookup: dict[str, list[float]] = {k: [] for k in daemons}
    seq = {k: 0 for k in daemons}
    topic = "sensors/s1/data"
    try:
        for r in range(args.rounds):
            order = list(daemons.items())
            for name, d in order if r % 2 == 0 else order[::-1]:  # ABBA: no order bias
                batch = messages(args.messages, args.streams, seq[name])
                seq[name] += args.messages // args.streams
                handle = d.link.client._handle_on_message
                t0 = time.perf_counter()
                for msg in batch:
                    handle(msg)
                per_msg[name].append((time.perf_counter() - t0) / len(batch))
                d.worker.call(lambda e: None).result(timeout=120)  # drained: next round fair
                matcher = d.link.client._on_message_filtered
                t0 = time.perf_counter()
                for _ in range(args.messages):
                    for _cb in matcher.iter_match(topic):
                        pass
                lookup[name].append((time.perf_counter() - t0) / args.messages)
    finally:
        for d in daemons.values():
            for r in d.routes:
                r.worker.stop(drain=False, timeout=10)
    one, two = (statistics.median(per_msg[k]) for k in ("one_route", "two_routes"))
    l1, l2 = (statistics.median(lookup[k]) for k in ("one_route", "two_routes"))
    spread = {k: round((max(v) - min(v)) / statistics.median(v), 3) for k, v in per_msg.items()}
    print(
        json.dumps(
            {
                "messages_per_round": args.messages,
                "rounds": args.rounds,
                "network_thread_us_per_message": {
                    "one_route": round(one * 1e6, 2),
                    "two_routes": round(two * 1e6, 2),
                    "ratio": round(two / one, 3),
                    "spread_over_rounds": spread,
                },
                "topic_lookup_us": {
                    "one_route": round(l1 * 1e6, 3),
                    "two_routes": round(l2 * 1e6, 3),
                    "ratio": round(l2 / l1, 3),
                },
                "received": {k: d.metrics.received._value.get() for k, d in daemons.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
