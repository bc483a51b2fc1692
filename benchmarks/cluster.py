"""Cluster mode on this box: handoffs, and throughput of 1 and 2 members next to the
single-box MQTT daemon measured in the same run. Prints one JSON document.

Throughput is a backlog drain, so that the publisher's own speed does not cap it: the
daemons are paused (SIGSTOP) while ``--streams`` x ``--rows`` readings (binary, one
row per message, QoS 1) are published over MQTT -- to mosquitto for the single-box
daemon, to the NATS nodes' MQTT gateway for the cluster, where they wait in JetStream --
then resumed (SIGCONT); the clock runs from the resume to the last prediction received
by an MQTT subscriber. CPU time per message is the daemons' user+system time over the
drain (from /proc) divided by the messages. The cluster members run with a long lease
TTL here, so that the pause does not cost their leases.

Handoffs (lease TTL ``--ttl``): with 3 members serving, one is SIGKILLed; ``resume_s``
is the time from the kill until the survivors own every partition (their metrics
scraped every 20 ms), and the replay per takeover comes from their metrics. Then one
survivor is stopped with SIGTERM and the same clock gives ``handover_s``.

    python benchmarks/cluster.py [--streams 1000] [--rows 10] [--partitions 64]

Timings on a shared box are noisy; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.sources import codecs  # noqa: E402
from tests.integration.broker import HOST, Broker, free_port, wait_until  # noqa: E402
from tests.integration.cluster_rig import (  # noqa: E402
    RUN,
    Member,
    Predictions,
    Sensors,
    wait_owned,
)
from tests.integration.conftest import daemon_config, write_toml  # noqa: E402
from tests.integration.nats_cluster import NatsCluster  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Count:
    """Messages on ``predictions/+`` at an MQTT broker."""

    def __init__(self, port: int) -> None:
        self.n = 0
        self.lock = threading.Lock()
        ok = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"count-{free_port()}")
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("predictions/+", 0)
        c.on_subscribe = lambda *a: ok.set()
        c.on_message = self._on
        c.connect(HOST, port)
        c.loop_start()
        assert ok.wait(10)
        self.client = c

    def _on(self, *a: Any) -> None:
        with self.lock:
            self.n += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def drain(pids: list[int], send: Any, done: Any, messages: int) -> dict[str, float]:
    """Pause ``pids``, ``send()``, resume them; time and CPU until ``done()``."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        send()
    finally:
        cpu0 = sum(cpu_s(p) for p in pids)
        t0 = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    wait_until(done, 600, "the backlog drained")
    seconds = time.monotonic() - t0
    cpu = sum(cpu_s(p) for p in pids) - cpu0
    return {
        "seconds": round(seconds, 3),
        "messages_per_s": round(messages / seconds, 1),
        "cpu_us_per_message": round(1e6 * cpu / messages, 1),
    }


def single_box(model: Path, tmp: Path, data: list[np.ndarray], rows: int) -> dict[str, float]:
    broker = Broker(tmp / "mosquitto", extra="allow_anonymous true")
    broker.start()
    count = Count(broker.port)
    doc = daemon_config(tmp, model, broker.port, "bench-single")
    doc["metrics"] = {"enabled": False}
    cfg = write_toml(tmp / "single.toml", doc)
    with (tmp / "single.log").open("ab") as log:
        proc = subprocess.Popen(
            [*RUN, "--config", str(cfg)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        online = threading.Event()
        st = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-status")
        st.on_connect = lambda cl, u, f, rc, p: cl.subscribe("seqstream/bench-single/status", 1)
        st.on_message = lambda cl, u, m: m.payload == b"online" and online.set()
        st.connect(HOST, broker.port)
        st.loop_start()
        assert online.wait(60), "the daemon did not come online"
        st.disconnect()
        st.loop_stop()
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sensors")
        pub.max_inflight_messages_set(1000)
        pub.connect(HOST, broker.port)
        pub.loop_start()
        total = len(data) * rows

        def send() -> None:
            infos = []
            for r in range(rows):
                for i, x in enumerate(data):
                    payload = codecs.encode_binary(x[r : r + 1], seq=r)
                    infos.append(pub.publish(f"sensors/s{i}/data", payload, qos=1))
            for info in infos:
                info.wait_for_publish(120)

        result = drain([proc.pid], send, lambda: count.n >= total, total)
        pub.disconnect()
        pub.loop_stop()
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        count.close()
        broker.stop()


def cluster_drain(
    model: Path, tmp: Path, data: list[np.ndarray], rows: int, n: int, p: int
) -> dict[str, float]:
    nats3 = NatsCluster(tmp / f"nats-{n}", p)  # its own cluster: a fresh input stream
    nats3.start()
    members = [
        Member(f"t{n}-{i}", tmp, model, nats3, partitions=p, lease_ttl_s=60.0) for i in range(n)
    ]
    preds = Predictions(nats3)
    sensors = Sensors(nats3)
    try:
        for m in members:
            m.start()
        wait_until(lambda: sum(len(m.owned()) for m in members) == p, 120, "partitions owned")
        total = len(data) * rows
        before = preds.count

        def send() -> None:
            sensors.send(data, range(rows))
            sensors.wait_sent(120)

        pids = [m.proc.pid for m in members if m.proc is not None]
        result = drain(pids, send, lambda: preds.count - before >= total, total)
        for m in members:
            m.stop(signal.SIGTERM)
        return result
    finally:
        for m in members:
            m.kill_if_running()
        sensors.close()
        preds.close()
        nats3.stop()


def handoffs(
    nats3: NatsCluster, model: Path, tmp: Path, data: list[np.ndarray], p: int, ttl: float
) -> dict[str, Any]:
    members = [
        Member(f"h-{i}", tmp, model, nats3, partitions=p, group="h", lease_ttl_s=ttl)
        for i in range(3)
    ]
    preds = Predictions(nats3)
    sensors = Sensors(nats3)
    try:
        for m in members:
            m.start()
        wait_owned(members, p, 120)
        sensors.send(data, range(3))
        sensors.wait_sent(120)
        wait_until(lambda: preds.distinct() >= 3 * len(data), 120, "predictions")
        victim, survivors = members[0], members[1:]
        moved = len(victim.owned())
        victim.stop(signal.SIGKILL)
        t0 = time.monotonic()

        def owned() -> bool:
            return sum(len(m.owned()) for m in survivors) == p

        wait_until(owned, 60, "takeover")
        resume = time.monotonic() - t0
        takeovers = sum(
            m.value('seqstream_cluster_handoffs_total{reason="takeover"}') for m in survivors
        )
        replayed = sum(m.value("seqstream_cluster_replayed_steps_total") for m in survivors)
        leaving, last = survivors
        t0 = time.monotonic()
        leaving.stop(signal.SIGTERM)
        wait_until(lambda: len(last.owned()) == p, 60, "handover")
        handover = time.monotonic() - t0
        return {
            "lease_ttl_s": ttl,
            "partitions_moved_on_sigkill": moved,
            "resume_s": round(resume, 3),
            "takeovers": int(takeovers),
            "replayed_steps": int(replayed),
            "replayed_steps_per_takeover": round(replayed / max(1.0, takeovers), 1),
            "sigterm_handover_s": round(handover, 3),
        }
    finally:
        for m in members:
            m.kill_if_running()
        sensors.close()
        preds.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=10, help="messages per stream per drain")
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--ttl", type=float, default=3.0, help="lease TTL of the handoff run")
    args = ap.parse_args()
    from models.export import export_random

    with tempfile.TemporaryDirectory(prefix="seqstream-cluster-bench-") as d:
        tmp = Path(d)
        model = tmp / "model.onnx"
        export_random(model, cell="lstm", task="classify", n_features=6, hidden=64, layers=2)
        rng = np.random.default_rng(0)
        data = [rng.normal(size=(args.rows, 6)).astype(np.float32) for _ in range(args.streams)]
        out: dict[str, Any] = {
            "streams": args.streams,
            "messages_per_drain": args.streams * args.rows,
            "partitions": args.partitions,
            "cpus": os.cpu_count(),
            "model": "random LSTM, 2 layers, hidden 64, 6 features",
        }
        out["single_box_mqtt_daemon"] = single_box(model, tmp, data, args.rows)
        for n in (1, 2):
            out[f"cluster_{n}_members"] = cluster_drain(
                model, tmp, data, args.rows, n, args.partitions
            )
        nats3 = NatsCluster(tmp / "nats-h", args.partitions)
        nats3.start()
        try:
            out["handoff"] = handoffs(nats3, model, tmp, data, args.partitions, args.ttl)
        finally:
            nats3.stop()
        base = out["single_box_mqtt_daemon"]["messages_per_s"]
        one = out["cluster_1_members"]["messages_per_s"]
        out["ratio_cluster_1_vs_single_box"] = round(one / base, 3)
        out["ratio_cluster_2_vs_1"] = round(out["cluster_2_members"]["messages_per_s"] / one, 3)
        out["scale_note"] = (
            "Ownership is per partition: members <= partitions, and a partition's streams run "
            "on one member's engine (batched per partition, so more partitions per member "
            "means smaller batches). Each member holds one consumer and one lease per owned "
            "partition and renews every lease each TTL/3 (partitions x members/TTL key-value "
            "writes per second cluster-wide); the input stays in the MQTT gateway's R3 "
            "stream, held by one durable R3 consumer per partition (a Raft group each, "
            "whatever the member count); a partition's checkpoint must fit NATS's "
            "max_payload. Streams per partition are bounded only by engine.max_streams and "
            "that payload. On one 2-core box the members share the CPUs with the 3 NATS "
            "servers, so 2 members cannot scale here as they would on 2 boxes."
        )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
