"""Where a message's end-to-end latency goes inside the daemon, at a fixed offered rate.

Runs ``seqstream run`` (its own process, as in ``mqtt_throughput.py``) with a few
functions wrapped to note ``time.monotonic()`` (one clock for every process on the
machine) at four points of each message, keyed by the sensor's send time (the ``ts``
the prediction echoes):

* ``sent``: the sensor published it (its ``ts``);
* ``received``: paho's network thread handed it to the source (before decoding);
* ``engine``: the engine's thread began the call that runs it (after the queue);
* ``published``: the sink handed the last prediction of that call to paho;
* ``delivered``: the subscriber got the prediction (this process).

Prints one JSON document: p50/p99 of each segment (broker in, queue hand-off, engine
and sink, paho out and broker out) and the size of the engine's calls. The wrapping
costs a few microseconds per message; it is a diagnosis, the figures to compare are
``mqtt_throughput.py --hot-path``'s.

    python benchmarks/mqtt_latency_trace.py [--rate 1000] [--seconds 5] [--repeats 2]
        [--baseline DIR]  # also the daemon of another checkout (git worktree add DIR REV)
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def _bench() -> Any:
    """``mqtt_throughput.py``, imported only where this process runs no daemon: it puts
    this checkout's ``pipeline`` first on the path, and a ``--baseline`` daemon must run
    its own."""
    sys.path.insert(0, str(HERE))
    import mqtt_throughput

    return mqtt_throughput


def daemon_main(config: str, trace: str) -> None:
    """``seqstream run --config CONFIG`` with its hot path noted in ``trace`` at exit."""
    import pipeline
    from pipeline import cli
    from pipeline.engine import worker
    from pipeline.sinks.mqtt import PredictionSink
    from pipeline.sources.codecs import Decoder

    received: dict[float, float] = {}
    engine: dict[float, float] = {}
    published: dict[float, float] = {}
    calls: list[int] = []
    inline = [0]  # calls run on a producer's thread (the step was alone)
    clock = time.monotonic

    decode = Decoder.decode

    def traced_decode(self: Decoder, stream: str, payload: Any, at: float = 0.0) -> Any:
        step = decode(self, stream, payload, at)
        received[step.ts] = at
        return step

    flush = worker.Worker._flush

    def traced_flush(self: worker.Worker, steps: list[Any]) -> None:
        now = clock()
        for s in steps:
            engine[s.ts] = now
        if steps:
            calls.append(len(steps))
            if threading.current_thread().name != "seqstream-engine":
                inline[0] += 1
        flush(self, steps)

    call = PredictionSink.__call__

    def traced_call(self: PredictionSink, results: Any) -> None:
        call(self, results)
        now = clock()
        for r in results:
            published[r.step.ts] = now

    Decoder.decode = traced_decode  # type: ignore[method-assign]
    worker.Worker._flush = traced_flush  # type: ignore[method-assign]
    PredictionSink.__call__ = traced_call  # type: ignore[method-assign]

    def dump() -> None:
        doc = {
            "received": received,
            "engine": engine,
            "published": published,
            "calls": calls,
            "inline": inline[0],
            "pipeline": pipeline.__file__,
        }
        Path(trace).write_text(
            json.dumps({k: list(v.items()) if isinstance(v, dict) else v for k, v in doc.items()})
        )

    atexit.register(dump)
    sys.argv = ["seqstream", "--log-level", "WARNING", "run", "--config", config, "--allow-root"]
    cli.main()


def relay_main(port: str, trace: str) -> None:
    """``mqtt_throughput.py``'s relay, noting when each message came and went back out."""
    mt = _bench()
    import signal

    import paho.mqtt.client as mqtt

    received: dict[float, float] = {}
    published: dict[float, float] = {}
    clock = time.monotonic
    client = mt.make_client(int(port))
    prefix = len(mt.IN)

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        at = clock()
        c.publish(mt.OUT + msg.topic[prefix:], msg.payload, 0)
        ts = json.loads(msg.payload)["ts"]  # after the publish: not on the measured path
        received[ts] = at
        published[ts] = clock()

    def dump(*_: Any) -> None:
        doc = {"received": list(received.items()), "published": list(published.items())}
        Path(trace).write_text(json.dumps(doc))
        os._exit(0)

    signal.signal(signal.SIGTERM, dump)
    client.on_message = on_message
    client.subscribe(f"{mt.IN}/+", 0)
    client.publish("bench/relay", b"online", qos=1, retain=False)
    while True:
        time.sleep(1)


def pct(values: list[float]) -> dict[str, float]:
    a = np.array(values) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
    }


def traced(
    kind: str, broker: Any, args: argparse.Namespace, conf: Path, trace: Path, tree: Path
) -> dict[str, Any]:
    """One traced run of the relay or the daemon: each segment's p50/p99."""
    mt = _bench()
    status = "bench/relay" if kind == "relay" else "seqstream/bench/status"
    ready = mt.Counter(broker.port, status, 1)
    arg = str(broker.port) if kind == "relay" else str(conf)
    proc = subprocess.Popen(
        [sys.executable, __file__, f"--{kind}", arg, str(trace)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    try:
        mt.wait_until(lambda: ready.n > 0 or proc.poll() is not None, 30, f"{kind} ready")
        ready.close()
        sensors = mt.Sensors(broker.port, args.streams)
        sink = mt.Counter(broker.port, f"{mt.OUT}/#", 0)
        delivered: dict[float, float] = {}

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            delivered[json.loads(msg.payload)["ts"]] = time.monotonic()
            sink.n += 1

        sink.client.on_message = on_message
        for seconds in (1.0, args.seconds):  # a warm-up, then the run
            delivered.clear()
            total = int(args.rate * seconds)
            sink.n = 0
            sensors.run(0, 1, total, args.rate)
            sink.wait(total)
        sink.close()
    finally:
        mt.stop(proc)
    got = json.loads(trace.read_text())
    rec = dict(got["received"])
    pub = dict(got["published"])
    eng = dict(got.get("engine", got["received"]))
    keys = [ts for ts in delivered if ts in rec and ts in eng and ts in pub]
    out: dict[str, Any] = {
        "pipeline": got.get("pipeline", ""),
        "delivered": len(delivered),
        "total": pct([delivered[k] - k for k in keys]),
        "broker_in (sent -> received)": pct([rec[k] - k for k in keys]),
    }
    if kind == "daemon":
        calls = np.array(got["calls"])
        out["queue (received -> engine)"] = pct([eng[k] - rec[k] for k in keys])
        out["engine_and_sink (engine -> published)"] = pct([pub[k] - eng[k] for k in keys])
        out["engine_call_size"] = {
            "calls": len(calls),
            "mean": round(float(calls.mean()), 2) if len(calls) else 0,
            "max": int(calls.max()) if len(calls) else 0,
            "on_producer_thread": got.get("inline", 0),
        }
    else:
        out["relay (received -> published)"] = pct([pub[k] - rec[k] for k in keys])
    out["out (published -> delivered)"] = pct([delivered[k] - pub[k] for k in keys])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--max-wait-ms", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=2, help="rounds, their order rotating")
    ap.add_argument("--baseline", type=Path, help="also the daemon of this checkout")
    ap.add_argument("--daemon", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--relay", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.daemon:
        daemon_main(*args.daemon)
        return
    if args.relay:
        relay_main(*args.relay)
        return
    mt = _bench()

    from models.export import export_random

    work = Path(tempfile.mkdtemp(prefix="seqstream-trace-"))
    model = work / "lstm64.onnx"
    export_random(model, cell="lstm", task="classify", n_features=6, hidden=64, layers=2)
    broker = mt.Broker(
        work / "broker",
        extra="allow_anonymous true\nmax_inflight_messages 1000\nset_tcp_nodelay true",
    )
    broker.start()
    report: dict[str, Any] = {
        "rate_msgs_per_s": args.rate,
        "messages": int(args.rate * args.seconds),
    }
    try:
        middles = [("relay", "relay", mt.REPO), ("daemon", "daemon", mt.REPO)]
        if args.baseline is not None:
            middles.append(("daemon_baseline", "daemon", args.baseline.resolve()))
        for r in range(args.repeats):
            for k in range(len(middles)):
                name, kind, tree = middles[(k + r) % len(middles)]
                conf = mt.daemon_config(work, broker.port, 0, model, args.max_wait_ms)
                got = traced(kind, broker, args, conf, work / "trace.json", tree)
                report.setdefault(name, []).append(got)
    finally:
        broker.stop()
    report["load_average"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
