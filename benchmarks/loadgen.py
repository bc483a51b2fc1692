"""Load and soak: N sensor streams at R Hz through mosquitto into ``seqstream run``.

Prints one JSON document, all measured in one run on this machine:

* ``ceiling``: paho publish -> mosquitto -> paho subscribe without inference, QoS 0 and
  1, one reading per message (the code of ``benchmarks/mqtt_throughput.py``);
* ``soak``: ``--streams`` x ``--rate`` Hz for ``--seconds``: offered and achieved
  messages/s, end-to-end latency (sensor publish -> prediction received) p50/p99/max,
  predictions lost or duplicated (by ``seq`` per stream), the daemon's rejections,
  drops and resets by reason, its RSS every second and the growth after warm-up;
* ``search``: short runs at rising total rates until one is not sustained; the breaking
  point is the highest rate sustained with 0 loss (every reading accepted by the broker
  and predicted, none twice, the last prediction within a second of the last reading,
  throughput >= 97 % of offered).

Targets (issue 8, 2-core box): 1,000 streams x 10 Hz for 600 s with 0 loss, p99 < 50 ms
and RSS growth < 5 % after warm-up. The sensors are one publisher process (the paced
mode of ``mqtt_throughput.py``); the daemon is its own process; this process subscribes.

    python benchmarks/loadgen.py [--streams 1000] [--rate 10] [--seconds 600]
        [--search-seconds 10] [--search-rates 1000 2000 ...] [--broker throughput|shipped]
        [--ack-after-checkpoint]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import mqtt_throughput as mt  # noqa: E402  (the ceiling's code, reused)

from tests.integration.broker import Broker, free_port, shipped_broker, wait_until  # noqa: E402

CLIENT_ID = "loadgen"
WARM_UP = 0.2  # fraction of the soak before RSS growth is measured
SEARCH = (1_000, 2_000, 4_000, 6_000, 8_000, 10_000, 12_000, 16_000, 20_000)  # messages/s


class Predictions:
    """Subscribes the prediction topics; latency, loss and duplicates per stream by seq.

    Parses only what it needs (the payload starts ``{"seq":N,"ts":T,``) into
    preallocated arrays, so a long soak costs no memory growth here.
    """

    def __init__(self, port: int, qos: int, capacity: int) -> None:
        self.latency = np.empty(capacity, dtype=np.float64)
        self.n = 0
        self.lost = 0
        self.duplicates = 0
        self.first = self.last = 0.0
        self._next: dict[str, int] = {}
        self._subscribed = threading.Event()
        self.client = mt.make_client(port)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.subscribe(f"{mt.OUT}/#", qos)
        assert self._subscribed.wait(5)

    def reset(self, capacity: int) -> None:
        if capacity > len(self.latency):
            self.latency = np.empty(capacity, dtype=np.float64)
        self.n = self.lost = self.duplicates = 0
        self.first = self.last = 0.0

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        head = msg.payload[:64].split(b",", 2)
        seq = int(head[0][7:])  # {"seq":N
        ts = float(head[1][5:])  # "ts":T
        stream = msg.topic
        expected = self._next.get(stream)
        if expected is not None and seq < expected:
            self.duplicates += 1
            return
        if expected is not None:
            self.lost += seq - expected
        self._next[stream] = seq + 1
        if self.n < len(self.latency):
            self.latency[self.n] = now - ts
        if not self.n:
            self.first = now
        self.n += 1
        self.last = now

    def wait(self, expected: int, idle_s: float = 5.0) -> None:
        seen, since = self.n, time.monotonic()
        while self.n < expected and time.monotonic() - since < idle_s:
            time.sleep(0.01)
            if self.n != seen:
                seen, since = self.n, time.monotonic()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Daemon:
    """``seqstream run`` as a process: its RSS from /proc, its counters from /metrics."""

    def __init__(self, work: Path, model: Path, port: int, qos: int, ack: bool) -> None:
        self.metrics_port = free_port()
        checkpoint = ""
        if ack:
            checkpoint = f'[checkpoint]\npath = "{work}/state.ckpt"\ninterval_s = 5\n'
            checkpoint += "ack_after_checkpoint = true\n"
        conf = work / "loadgen.toml"
        conf.write_text(
            f"""[model]
path = "{model}"
[engine]
idle_timeout_s = 3600
[queue]
max_wait_ms = 0.0
[mqtt]
port = {port}
client_id = "{CLIENT_ID}"
clean_session = {"false" if ack else "true"}
max_inflight = {mt.INFLIGHT}
[input]
topic = "{mt.IN}/{{stream}}"
qos = {qos}
[output]
topic = "{mt.OUT}/{{stream}}"
qos = {qos}
error_topic = ""
[metrics]
port = {self.metrics_port}
{checkpoint}"""
        )
        ready = mt.Counter(port, f"seqstream/{CLIENT_ID}/status", 1)
        cmd = [sys.executable, "-m", "pipeline.cli", "--log-level", "WARNING", "run"]
        cmd += ["--config", str(conf), "--allow-root"]  # as whoever runs the benchmark
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        wait_until(lambda: ready.n > 0 or self.proc.poll() is not None, 60, "daemon online")
        ready.close()
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {self.proc.returncode}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def counters(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("seqstream_") and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        mt.stop(self.proc)


def nonzero(counters: dict[str, float], prefix: str) -> dict[str, float]:
    return {
        k[len(prefix) :].strip("{}"): v
        for k, v in counters.items()
        if k.startswith(prefix + "{") and v
    }


def trial(
    sensors: mt.Sensors,
    sink: Predictions,
    daemon: Daemon,
    qos: int,
    rate: float,
    seconds: float,
    rss_every_s: float = 1.0,
) -> dict[str, Any]:
    """``rate`` messages/s (one reading each) over every stream for about ``seconds``.

    Whole rounds only (every stream the same number of readings): the publisher
    continues all streams from one sequence number, so a partial round would leave a
    one-reading gap in the streams it skipped, which the daemon rightly resets.
    """
    streams = sensors.streams
    total = max(1, round(rate * seconds / streams)) * streams
    seconds = total / rate
    sink.reset(total)
    before = daemon.counters()
    rss: list[tuple[float, float]] = []
    depth: list[float] = []
    done = threading.Event()
    failed: list[BaseException] = []

    def publish() -> None:
        try:
            sensors.run(qos, 1, total, rate)
        except BaseException as exc:  # reported below, not lost in a thread
            failed.append(exc)
        finally:
            done.set()

    t0 = time.monotonic()
    threading.Thread(target=publish, daemon=True).start()
    while not done.wait(rss_every_s):
        rss.append((round(time.monotonic() - t0, 1), round(daemon.rss_mb(), 1)))
        depth.append(daemon.counters().get("seqstream_queue_depth", 0.0))
    if failed:
        raise RuntimeError(f"the sensors failed: {failed[0]}")
    refused = int(sensors.last["refused"])  # never reached the broker: it was behind
    sink.wait(total - refused)
    after = daemon.counters()
    lat = sink.latency[: min(sink.n, len(sink.latency))] * 1000
    schedule = sensors.last["started"] + total / rate
    achieved = sink.n / max(sink.last - sink.first, 1e-9)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    out: dict[str, Any] = {
        "offered_msgs_per_s": rate,
        "streams": sensors.streams,
        "hz_per_stream": round(rate / sensors.streams, 3),
        "seconds": round(seconds, 3),
        "messages": total,
        "predictions": sink.n,
        "sensor_refused": refused,
        "sensor_behind_schedule_s": round(sensors.last["ended"] - schedule, 3),
        "lost": total - refused - sink.n,
        "gaps_in_seq": sink.lost,
        "duplicates": sink.duplicates,
        "achieved_msgs_per_s": round(achieved),
        "drain_s": round(sink.last - sensors.last["ended"], 3),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
            "p99": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
            "max": round(float(lat.max()), 3) if len(lat) else None,
        },
        "daemon": {
            "rejected": nonzero(delta, "seqstream_messages_rejected_total"),
            "resets": nonzero(delta, "seqstream_state_resets_total"),
            "publish_failures": nonzero(delta, "seqstream_publish_failures_total"),
            "checkpoints": delta.get("seqstream_checkpoints_total", 0.0),
            "max_queue_depth": max(depth, default=0.0),
        },
        "rss_mb": rss,
    }
    out["sustained"] = bool(
        out["lost"] == 0
        and refused == 0
        and sink.duplicates == 0
        and out["drain_s"] < 1.0
        and achieved >= 0.97 * rate
    )
    return out


def rss_growth(rss: list[tuple[float, float]]) -> float | None:
    """Relative RSS growth from the end of warm-up to the end of the run."""
    if len(rss) < 5:
        return None
    base = rss[int(len(rss) * WARM_UP)][1]
    return round((rss[-1][1] - base) / base, 4)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=10.0, help="Hz per stream in the soak")
    ap.add_argument("--seconds", type=float, default=600.0, help="soak duration")
    ap.add_argument("--search-seconds", type=float, default=10.0, help="each search run; 0: none")
    ap.add_argument(
        "--search-rates",
        type=int,
        nargs="+",
        default=list(SEARCH),
        metavar="MSGS_PER_S",
        help="total rates tried in the search, rising (default: %(default)s)",
    )
    ap.add_argument("--qos", type=int, default=1, choices=(0, 1))
    ap.add_argument(
        "--broker",
        choices=("throughput", "shipped"),
        default="throughput",
        help="throughput: persistence saved periodically (mqtt_throughput.py's broker); "
        "shipped: deploy/mosquitto.conf, which saves its store after every change",
    )
    ap.add_argument(
        "--ack-after-checkpoint",
        action="store_true",
        help="the daemon's lossless mode (checkpoint every 5 s or max_unacked)",
    )
    ap.add_argument("--ceiling-messages", type=int, default=20_000)
    args = ap.parse_args()

    from models.export import export_random

    work = Path(tempfile.mkdtemp(prefix="seqstream-loadgen-"))
    model = work / "lstm64.onnx"
    export_random(model, cell="lstm", task="classify", n_features=6, hidden=64, layers=2)
    if args.broker == "shipped":
        broker = shipped_broker(work / "broker")
    else:
        extra = "allow_anonymous true\nmax_inflight_messages 0\nset_tcp_nodelay true"
        broker = Broker(work / "broker", extra=extra)
    broker.start()
    report: dict[str, Any] = {
        "model": "random lstm, 2 layers, hidden 64, 6 features",
        "cpus": os.cpu_count(),
        "broker": args.broker,
        "ack_after_checkpoint": args.ack_after_checkpoint,
        "qos": args.qos,
        "load_average_at_start": load_average(),
    }
    sensors = mt.Sensors(broker.port, args.streams)
    try:
        report["ceiling"] = {}
        for qos in (0, 1):
            counter = mt.Counter(broker.port, f"{mt.IN}/#", qos)
            mt.throughput(sensors, counter, qos, 1, 2000, "json")  # warm-up
            row = mt.throughput(sensors, counter, qos, 1, args.ceiling_messages, "json")
            report["ceiling"][f"qos{qos}_pubsub"] = row
            counter.close()
        daemon = Daemon(work, model, broker.port, args.qos, args.ack_after_checkpoint)
        sink = Predictions(broker.port, args.qos, int(args.streams * args.rate * args.seconds))
        try:
            trial(sensors, sink, daemon, args.qos, args.streams * args.rate, 3.0)  # warm-up
            soak = trial(sensors, sink, daemon, args.qos, args.streams * args.rate, args.seconds)
            growth = soak["rss_growth_after_warm_up"] = rss_growth(soak["rss_mb"])
            p99 = soak["latency_ms"]["p99"]
            soak["targets_met"] = {
                "zero_loss": soak["lost"] == 0 and soak["duplicates"] == 0,
                "p99_below_50_ms": p99 is not None and p99 < 50.0,
                # (None: too few samples; 0.0 growth is a pass, not a falsy miss)
                "rss_growth_below_5_percent": growth is not None and growth < 0.05,
                "sustained": soak["sustained"],
            }
            report["soak"] = soak
            report["load_average_after_soak"] = load_average()
            if args.search_seconds > 0:
                runs = []
                for rate in args.search_rates:
                    run = trial(sensors, sink, daemon, args.qos, rate, args.search_seconds)
                    run.pop("rss_mb")
                    runs.append(run)
                    if not run["sustained"]:
                        break
                ok = [r["offered_msgs_per_s"] for r in runs if r["sustained"]]
                report["search"] = {
                    "runs": runs,
                    "breaking_point_msgs_per_s": max(ok, default=None),
                    "vs_qos_ceiling": round(
                        max(ok, default=0)
                        / report["ceiling"][f"qos{args.qos}_pubsub"]["messages_per_s"],
                        3,
                    ),
                }
        finally:
            sink.close()
            daemon.stop()
    finally:
        broker.stop()
    report["load_average_at_end"] = load_average()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
