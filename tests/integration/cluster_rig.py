"""A real cluster for tests and the benchmark: 3 NATS nodes and ``seqstream run`` members.

* :class:`Member` -- ``seqstream run`` with a ``[cluster]`` section, its own process,
  signalled and waited for by PID; its metrics scraped over HTTP.
* :class:`Sensors` -- paho clients, one per NATS node's MQTT port, playing the sensors.
* :class:`Predictions` -- an MQTT subscriber of ``predictions/+`` (what users see) and a
  NATS subscriber of ``predictions.>`` that also reads the owner headers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.cluster import assign
from pipeline.sources import codecs
from tests.integration.broker import HOST, free_port, wait_until
from tests.integration.conftest import exposition, write_toml
from tests.integration.nats_cluster import NatsCluster

REPO = Path(__file__).resolve().parents[2]
RUN = [sys.executable, "-m", "pipeline.cli", "run", "--allow-root"]  # CI runs as root


class Member:
    """One ``seqstream run`` cluster member, in its own process."""

    def __init__(self, name: str, tmp: Path, model: Path, cluster: NatsCluster, **cl: Any):
        self.name = name
        self.metrics_port = free_port()
        self.log = tmp / f"{name}.log"
        doc = {
            "model": {"path": str(model)},
            "metrics": {"port": self.metrics_port},
            "cluster": {"servers": cluster.urls, "member": name, **cl},
        }
        self.config = write_toml(tmp / f"{name}.toml", doc)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*RUN, "--config", str(self.config)],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def metrics(self) -> dict[str, float]:
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return exposition(text)  # the one route's model="default" left out

    def owned(self) -> set[int]:
        """Partitions this member reports owning (empty while it is not serving)."""
        try:
            m = self.metrics()
        except OSError:
            return set()
        prefix = 'seqstream_cluster_partition_owned{partition="'
        return {int(k[len(prefix) : -2]) for k, v in m.items() if k.startswith(prefix) and v}

    def value(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill_if_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_owned(members: list[Member], partitions: int, timeout: float = 60) -> None:
    """Balanced: each of ``members`` owns exactly its rendezvous share of the partitions
    (so every partition is owned, by one member)."""
    names = [m.name for m in members]
    want = {m.name: assign.share(names, m.name, partitions) for m in members}

    def done() -> bool:
        return all(m.owned() == want[m.name] for m in members)

    wait_until(done, timeout, f"{partitions} partitions balanced over {names}")


class Sensors:
    """MQTT publishers, one per NATS node; stream i always goes through node i % n."""

    def __init__(self, cluster: NatsCluster) -> None:
        self.clients = []
        for i, node in enumerate(cluster.nodes):
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sensors-{i}")
            c.max_inflight_messages_set(1000)
            c.max_queued_messages_set(0)
            c.connect(HOST, node.mqtt_port)
            c.loop_start()
            self.clients.append(c)
        wait_until(lambda: all(c.is_connected() for c in self.clients), 10, "sensors connected")
        self._sent: list[mqtt.MQTTMessageInfo] = []

    def send(self, data: list[np.ndarray], rows: range) -> None:
        """Rows ``rows`` of every stream (binary payloads with seq), interleaved."""
        for r in rows:
            for i, x in enumerate(data):
                payload = codecs.encode_binary(x[r : r + 1], seq=r)
                c = self.clients[i % len(self.clients)]
                self._sent.append(c.publish(f"sensors/s{i}/data", payload, qos=1))

    def wait_sent(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for info in self._sent:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        self._sent.clear()

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


class Predictions:
    """What reaches subscribers: MQTT ``predictions/+`` and NATS ``predictions.>``."""

    def __init__(self, cluster: NatsCluster, node: int = 0) -> None:
        self.lock = threading.Lock()
        self.mqtt: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.owners: dict[str, list[tuple[int, str, int]]] = defaultdict(list)  # seq, who, lease
        self.count = 0
        subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"predictions-{free_port()}")
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("predictions/+", 0)
        c.on_subscribe = lambda cl, u, mid, rc, p: subscribed.set()
        c.on_message = self._on_mqtt
        c.connect(HOST, cluster.nodes[node].mqtt_port)
        c.loop_start()
        self.client = c
        assert subscribed.wait(10), "no SUBACK for predictions/+"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._nc = asyncio.run_coroutine_threadsafe(self._nats(cluster.urls), self._loop).result(10)

    async def _nats(self, urls: list[str]) -> Any:
        import nats

        nc = await nats.connect(servers=urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)

        async def on_msg(msg: Any) -> None:
            doc = json.loads(msg.data)
            stream = msg.subject.rsplit(".", 1)[-1]
            h = msg.headers or {}
            with self.lock:
                self.owners[stream].append(
                    (doc["seq"], h.get("Seqstream-Member", ""), int(h.get("Seqstream-Lease", 0)))
                )

        await nc.subscribe("predictions.>", cb=on_msg)
        await nc.flush()
        return nc

    def _on_mqtt(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        doc = json.loads(msg.payload)
        with self.lock:
            self.mqtt[msg.topic.rsplit("/", 1)[-1]].append(doc)
            self.count += 1

    def distinct(self) -> int:
        """(stream, seq) pairs seen over MQTT."""
        with self.lock:
            return sum(len({p["seq"] for p in preds}) for preds in self.mqtt.values())

    def wait_distinct(self, n: int, timeout: float = 120) -> None:
        wait_until(lambda: self.distinct() >= n, timeout, f"{n} distinct predictions")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
