"""The MQTT daemon through a real mosquitto, next to the paho ceiling measured in the same run.

Prints one JSON document. For each QoS (0, 1) and payload (1 reading per message as
JSON, 100 readings per message in the binary format), over ``--streams`` streams:

* ``pubsub``: one paho publisher (its own process) -> mosquitto -> one paho subscriber
  (this process), no inference: the classic paho publish/subscribe ceiling;
* ``relay``: the daemon's topology without inference: publisher -> mosquitto -> a
  paho relay process that republishes every message -> mosquitto -> subscriber;
* ``daemon``: the same with ``seqstream run`` (a separate process) in the middle;

then the end-to-end latency (publish -> prediction received, one reading per message)
at ``--rate`` messages/s through the relay and through the daemon. Every client sets
TCP_NODELAY. The model is a random 2-layer LSTM (hidden 64, 6 features), exported here.

    python benchmarks/mqtt_throughput.py [--streams 1000] [--messages 20000] [--rate 1000]

``--hot-path`` measures only the figures of issue 16 (QoS 0, one reading per message as
JSON): messages/s and the latency at ``--rate`` through the relay and the daemon, in
``--repeats`` rounds whose order rotates, so that every middle sees the same machine;
``--baseline DIR`` adds the daemon of another checkout (``git worktree add DIR REV``),
measured in the same rounds, for a before/after in one run. It prints the figures of
every round, their medians and spread, and per round the daemon's ratio to the relay
measured next to it (throughput) and its p99 above the relay's (latency). Each middle's
CPU time per message (``cpu_us_per_message``, from ``/proc``) comes along: on a shared
machine it is what other processes' load inflates least:

    python benchmarks/mqtt_throughput.py --hot-path --repeats 5 [--baseline /tmp/before]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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
from tests.integration.broker import HOST, Broker, wait_until  # noqa: E402

IN, OUT = "bench/in", "bench/out"
INFLIGHT = 1000  # QoS 1 window of every client (paho's default of 20 caps the ceiling)


def nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(port: int, client_id: str = "", clean: bool = True) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    c.on_socket_open = nodelay
    c.max_inflight_messages_set(INFLIGHT)
    c.max_queued_messages_set(0)
    c.connect(HOST, port)
    c.loop_start()
    wait_until(c.is_connected, 5, "connection")
    return c


class Counter:
    """Subscribes ``topic``; counts messages, optionally keeps their latency from ``ts``."""

    def __init__(self, port: int, topic: str, qos: int) -> None:
        self.n = 0
        self.last = 0.0
        self.latencies: list[float] | None = None
        self._sub = threading.Event()
        self.client = make_client(port)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._sub.set()
        self.client.subscribe(topic, qos)
        assert self._sub.wait(5)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        self.n += 1
        self.last = now
        if self.latencies is not None:
            self.latencies.append(now - json.loads(msg.payload)["ts"])

    def reset(self, latencies: bool = False) -> None:
        self.n = 0
        self.latencies = [] if latencies else None

    def wait(self, expected: int, idle_s: float = 5.0) -> None:
        """Until ``expected`` messages came, or none for ``idle_s`` (the rest is lost)."""
        seen, since = self.n, time.monotonic()
        while self.n < expected and time.monotonic() - since < idle_s:
            time.sleep(0.01)
            if self.n != seen:
                seen, since = self.n, time.monotonic()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def payloads(
    streams: int, readings: int, total: int, seq0: int, fmt: str
) -> list[tuple[str, bytes]]:
    """``total`` messages round-robin over ``streams``; sequence numbers continue from ``seq0``."""
    values = np.random.default_rng(0).normal(size=(64, readings, 6)).astype(np.float32)
    out = []
    for k in range(total):
        i, rnd = k % streams, k // streams
        seq = seq0 + rnd * readings
        v = values[k % 64]
        one = v[0] if readings == 1 else v
        data = codecs.encode_json(one, seq) if fmt == "json" else codecs.encode_binary(one, seq)
        out.append((f"{IN}/s{i}", data))
    return out


def publish_main(
    port: int, qos: int, readings: int, total: int, streams: int, seq0: int, rate: float, fmt: str
) -> None:
    """The sensors, in their own process: print when the first and the last message left
    and how many paho refused (with more than 65,535 unacknowledged its packet ids run
    out: the broker is not keeping up), then exit."""
    client = make_client(port)
    refused = 0
    info = None
    if rate > 0:  # paced, one reading per message, ts = send time (CLOCK_MONOTONIC)
        values = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
        started = time.monotonic()
        for k in range(total):
            delay = started + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            i = k % streams
            data = codecs.encode_json(values[k % 64], seq0 + k // streams, time.monotonic())
            sent = client.publish(f"{IN}/s{i}", data, qos)
            if sent.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                refused += 1
            else:
                info = sent
    else:
        batch = payloads(streams, readings, total, seq0, fmt)
        started = time.monotonic()
        for topic, data in batch:
            info = client.publish(topic, data, qos)
    ended = time.monotonic()
    if info is not None:
        info.wait_for_publish(120)
    print(json.dumps({"started": started, "ended": ended, "refused": refused}), flush=True)
    client.disconnect()
    client.loop_stop()


class Sensors:
    """Runs publisher processes, keeping each stream's sequence numbers increasing."""

    def __init__(self, port: int, streams: int) -> None:
        self.port = port
        self.streams = streams
        self.seq = 0  # every stream has sent rows [0, seq)
        self.last: dict[str, float] = {}  # what the last publisher process reported

    def run(
        self, qos: int, readings: int, total: int, rate: float = 0.0, fmt: str = "json"
    ) -> float:
        rows = -(-total // self.streams) * readings
        cmd = [sys.executable, __file__, "--publish", str(self.port), str(qos), str(readings)]
        cmd += [str(total), str(self.streams), str(self.seq), str(rate), fmt]
        self.seq += rows
        out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=3600)
        self.last = json.loads(out.stdout.decode().strip().splitlines()[-1])
        return float(self.last["started"])


def throughput(
    sensors: Sensors, sink: Counter, qos: int, readings: int, total: int, fmt: str
) -> dict[str, Any]:
    sink.reset()
    started = sensors.run(qos, readings, total, fmt=fmt)
    sink.wait(total)
    elapsed = max(sink.last - started, 1e-9)
    return {
        "messages": total,
        "received": sink.n,
        "messages_per_s": round(sink.n / elapsed),
        "readings_per_s": round(sink.n * readings / elapsed),
    }


def latency(
    sensors: Sensors, sink: Counter, qos: int, rate: float, seconds: float
) -> dict[str, Any]:
    total = int(rate * seconds)
    sink.reset(latencies=True)
    sensors.run(qos, 1, total, rate)
    sink.wait(total)
    assert sink.latencies is not None
    lat = np.array(sink.latencies) * 1000
    return {
        "rate_msgs_per_s": rate,
        "messages": total,
        "received": len(lat),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "max_ms": round(float(lat.max()), 3),
    }


def relay_main(port: int, qos: int) -> None:
    """The no-inference middle: republish every input message on the output topic."""
    client = make_client(port)
    prefix = len(IN)

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        c.publish(OUT + msg.topic[prefix:], msg.payload, qos)

    client.on_message = on_message
    client.subscribe(f"{IN}/+", qos)
    client.publish("bench/relay", b"online", qos=1, retain=False)
    threading.Event().wait()


def daemon_config(work: Path, port: int, qos: int, model: Path, max_wait_ms: float) -> Path:
    """The benchmark daemon's configuration file (metrics off, TCP_NODELAY in the link)."""
    conf = work / f"daemon-qos{qos}.toml"
    conf.write_text(
        f"""
[model]
path = "{model}"
[queue]
max_wait_ms = {max_wait_ms}
[mqtt]
port = {port}
client_id = "bench"
clean_session = true
max_inflight = {INFLIGHT}
[input]
topic = "{IN}/{{stream}}"
qos = {qos}
[output]
topic = "{OUT}/{{stream}}"
qos = {qos}
[metrics]
enabled = false
"""
    )
    return conf


def start_middle(
    kind: str,
    port: int,
    qos: int,
    work: Path,
    model: Path,
    max_wait_ms: float,
    tree: Path = REPO,
) -> subprocess.Popen[bytes]:
    """``kind`` "relay" or "daemon" (the daemon of the checkout at ``tree``), once ready."""
    ready = Counter(port, "bench/relay" if kind == "relay" else "seqstream/bench/status", 1)
    if kind == "relay":
        cmd = [sys.executable, __file__, "--relay", str(port), str(qos)]
    else:
        conf = daemon_config(work, port, qos, model, max_wait_ms)
        cmd = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "--log-level",
            "WARNING",
            "run",
            "--config",
            str(conf),
            "--allow-root",  # as the benchmark's user, whoever that is
        ]
    proc = subprocess.Popen(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    wait_until(lambda: ready.n > 0 or proc.poll() is not None, 30, f"{kind} ready")
    ready.close()
    if proc.poll() is not None:
        raise RuntimeError(f"{kind} exited with {proc.returncode}")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` used so far: what the machine's other
    load inflates far less than wall time (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of a figure over the rounds (its spread is the noise)."""
    a = np.array(values, dtype=float)
    return {
        "median": round(float(np.median(a)), 3),
        "min": round(float(a.min()), 3),
        "max": round(float(a.max()), 3),
    }


def hot_path(broker: Broker, args: argparse.Namespace, work: Path, model: Path) -> dict[str, Any]:
    """Issue 16's figures, relay and daemon(s) in rotating order over ``args.repeats`` rounds."""
    middles: list[tuple[str, str, Path]] = [("relay", "relay", REPO), ("daemon", "daemon", REPO)]
    if args.baseline is not None:
        middles.append(("daemon_baseline", "daemon", Path(args.baseline).resolve()))
    sensors = Sensors(broker.port, args.streams)
    sink = Counter(broker.port, f"{OUT}/#", 0)
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.repeats):
            row: dict[str, Any] = {}
            for k in range(len(middles)):
                name, kind, tree = middles[(k + r) % len(middles)]
                proc = start_middle(kind, broker.port, 0, work, model, args.max_wait_ms, tree)
                try:
                    throughput(sensors, sink, 0, 1, min(args.messages, 2000), "json")  # warm-up
                    cpu = cpu_s(proc.pid)
                    tp = throughput(sensors, sink, 0, 1, args.messages, "json")
                    tp["cpu_us_per_message"] = round((cpu_s(proc.pid) - cpu) / tp["received"] * 1e6)
                    latency(sensors, sink, 0, args.rate, 1.0)  # warm-up
                    cpu = cpu_s(proc.pid)
                    lat = latency(sensors, sink, 0, args.rate, args.seconds)
                    lat["cpu_us_per_message"] = round(
                        (cpu_s(proc.pid) - cpu) / lat["received"] * 1e6
                    )
                finally:
                    stop(proc)
                row[name] = {"throughput": tp, "latency": lat}
            for name, _, _ in middles[1:]:
                d, relay = row[name], row["relay"]
                d["vs_relay"] = round(
                    d["throughput"]["messages_per_s"] / relay["throughput"]["messages_per_s"], 3
                )
                d["cpu_vs_relay"] = round(
                    d["throughput"]["cpu_us_per_message"]
                    / relay["throughput"]["cpu_us_per_message"],
                    3,
                )
                d["p99_above_relay_ms"] = round(
                    d["latency"]["p99_ms"] - relay["latency"]["p99_ms"], 3
                )
            rounds.append(row)
            print(json.dumps({"round": r, **row}), file=sys.stderr, flush=True)
    finally:
        sink.close()
    summary: dict[str, Any] = {}
    for name, _, _ in middles:
        summary[name] = {
            "messages_per_s": _spread([x[name]["throughput"]["messages_per_s"] for x in rounds]),
            "cpu_us_per_message": _spread(
                [x[name]["throughput"]["cpu_us_per_message"] for x in rounds]
            ),
            "p50_ms": _spread([x[name]["latency"]["p50_ms"] for x in rounds]),
            "p99_ms": _spread([x[name]["latency"]["p99_ms"] for x in rounds]),
            "lost": sum(
                x[name]["throughput"]["messages"]
                - x[name]["throughput"]["received"]
                + x[name]["latency"]["messages"]
                - x[name]["latency"]["received"]
                for x in rounds
            ),
        }
        if name != "relay":
            summary[name]["vs_relay"] = _spread([x[name]["vs_relay"] for x in rounds])
            summary[name]["cpu_vs_relay"] = _spread([x[name]["cpu_vs_relay"] for x in rounds])
            summary[name]["p99_above_relay_ms"] = _spread(
                [x[name]["p99_above_relay_ms"] for x in rounds]
            )
    return {
        "qos": 0,
        "readings_per_message": 1,
        "format": "json",
        "messages": args.messages,
        "rate_msgs_per_s": args.rate,
        "latency_seconds": args.seconds,
        "repeats": args.repeats,
        "baseline": args.baseline,
        "load_average": os.getloadavg(),
        "summary": summary,
        "rounds": rounds,
        "targets": {"vs_relay_min": 0.85, "p99_above_relay_ms_max": 1.0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=20_000, help="per run with 1 reading/message")
    ap.add_argument("--rate", type=float, default=1000.0, help="messages/s for the latency runs")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each latency run")
    ap.add_argument("--max-wait-ms", type=float, default=0.0, help="the daemon's queue.max_wait_ms")
    ap.add_argument("--hot-path", action="store_true", help="only issue 16's figures (QoS 0)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of --hot-path")
    ap.add_argument("--baseline", help="--hot-path: also the daemon of this checkout")
    ap.add_argument("--relay", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--publish", nargs=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.relay:
        relay_main(*args.relay)
        return
    if args.publish:
        port, qos, readings, total, streams, seq0, rate, fmt = args.publish
        publish_main(
            int(port),
            int(qos),
            int(readings),
            int(total),
            int(streams),
            int(seq0),
            float(rate),
            fmt,
        )
        return

    from models.export import export_random

    work = Path(tempfile.mkdtemp(prefix="seqstream-bench-"))
    model = work / "lstm64.onnx"
    export_random(model, cell="lstm", task="classify", n_features=6, hidden=64, layers=2)
    broker = Broker(
        work / "broker",
        extra="allow_anonymous true\nmax_inflight_messages 1000\nset_tcp_nodelay true",
    )
    broker.start()
    if args.hot_path:
        try:
            report = hot_path(broker, args, work, model)
            report["model"] = "random lstm, 2 layers, hidden 64, 6 features"
            report["streams"] = args.streams
            report["cpus"] = os.cpu_count()
            report["daemon_max_wait_ms"] = args.max_wait_ms
        finally:
            broker.stop()
        print(json.dumps(report, indent=2))
        return
    report = {
        "streams": args.streams,
        "model": "random lstm, 2 layers, hidden 64, 6 features",
        "cpus": os.cpu_count(),
        "daemon_max_wait_ms": args.max_wait_ms,
        "throughput": {},
    }
    few = max(1, args.messages // 10)
    plans = [(1, args.messages, "json"), (100, few, "json"), (100, few, "binary")]
    sensors = Sensors(broker.port, args.streams)
    try:
        for qos in (0, 1):
            for readings, total, fmt in plans:
                row: dict[str, Any] = {}
                sink = Counter(broker.port, f"{IN}/#", qos)
                row["pubsub"] = throughput(sensors, sink, qos, readings, total, fmt)
                sink.close()
                sink = Counter(broker.port, f"{OUT}/#", qos)
                for kind in ("relay", "daemon"):
                    proc = start_middle(kind, broker.port, qos, work, model, args.max_wait_ms)
                    try:
                        throughput(sensors, sink, qos, readings, min(total, 2000), fmt)  # warm-up
                        row[kind] = throughput(sensors, sink, qos, readings, total, fmt)
                    finally:
                        stop(proc)
                sink.close()
                d = row["daemon"]["messages_per_s"]
                row["daemon_vs_pubsub"] = round(d / row["pubsub"]["messages_per_s"], 3)
                row["daemon_vs_relay"] = round(d / row["relay"]["messages_per_s"], 3)
                report["throughput"][f"qos{qos}_{readings}_readings_{fmt}"] = row
        report["latency"] = {}
        for qos in (0, 1):
            sink = Counter(broker.port, f"{OUT}/#", qos)
            for kind in ("relay", "daemon"):
                proc = start_middle(kind, broker.port, qos, work, model, args.max_wait_ms)
                try:
                    latency(sensors, sink, qos, args.rate, 1.0)  # warm-up
                    key = f"qos{qos}_{kind}"
                    report["latency"][key] = latency(sensors, sink, qos, args.rate, args.seconds)
                finally:
                    stop(proc)
            sink.close()
    finally:
        broker.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
