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
import urllib.error
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

    def __init__(
        self,
        name: str,
        tmp: Path,
        model: Path,
        cluster: NatsCluster,
        output: dict[str, Any] | None = None,
        **cl: Any,
    ):
        self.name = name
        self.metrics_port = free_port()
        self.log = tmp / f"{name}.log"
        doc = {
            "model": {"path": str(model)},
            "metrics": {"port": self.metrics_port},
            "output": output or {},
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

    def http(self, path: str) -> tuple[int, Any]:
        """GET ``path`` on the member's HTTP endpoint: status code and JSON body."""
        url = f"http://{HOST}:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

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
    """MQTT publishers, one per NATS node; stream i always goes through node i % n.

    Acknowledgements are counted from PUBACKs (``on_publish``), not from the message
    handles: a handle made while its client was reconnecting (a server closed the
    session after a failed store) reports an error even once paho resent it and it was
    acknowledged. A rig publishes fewer than 65,535 messages per client, so a message id
    (mid) is never reused."""

    def __init__(self, cluster: NatsCluster) -> None:
        self._lock = threading.Lock()  # the clients and _sent
        # id(client) -> mids acknowledged; its own lock, never held across a publish
        # (paho runs on_publish under its own lock, which publish takes too).
        self._ack_lock = threading.Lock()
        self._acks: dict[int, set[int]] = {}
        self.clients = []
        for i, node in enumerate(cluster.nodes):
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sensors-{i}")
            c.max_inflight_messages_set(1000)
            c.max_queued_messages_set(0)
            acks = self._acks[id(c)] = set()
            c.on_publish = lambda cl, u, mid, rc, p, acks=acks: self._on_ack(acks, mid)
            c.connect(HOST, node.mqtt_port)
            c.loop_start()
            self.clients.append(c)
        wait_until(lambda: all(c.is_connected() for c in self.clients), 10, "sensors connected")
        # Every publish not yet known acknowledged: client, mid, topic, payload.
        self._sent: list[tuple[mqtt.Client, int, str, bytes]] = []
        self.republished = 0

    def _on_ack(self, acks: set[int], mid: int) -> None:
        with self._ack_lock:
            acks.add(mid)

    def _publish(self, c: mqtt.Client, topic: str, payload: bytes) -> None:
        """Under ``_lock``: publish and remember."""
        info = c.publish(topic, payload, qos=1)
        self._sent.append((c, info.mid, topic, payload))

    def fail_over(self, node: int) -> None:
        """The server behind ``node``'s client died: as a sensor with a list of servers
        does, publish again through another node every message it did not acknowledge
        (some may have been stored: the daemon rejects the repeat of a seq it applied)."""
        with self._lock:
            dead = self.clients[node]
            survivor = next(c for c in self.clients if c is not dead)
            self.clients = [survivor if c is dead else c for c in self.clients]
            dead.loop_stop()
            with self._ack_lock:
                acks = set(self._acks[id(dead)])
            again = [(t, p) for c, mid, t, p in self._sent if c is dead and mid not in acks]
            self._sent = [e for e in self._sent if e[0] is not dead]
            for topic, payload in again:
                self._publish(survivor, topic, payload)
            self.republished += len(again)

    def send(self, data: list[np.ndarray], rows: range) -> None:
        """Rows ``rows`` of every stream (binary payloads with seq), interleaved."""
        n = len(self.clients)
        for r in rows:
            for i, x in enumerate(data):
                payload = codecs.encode_binary(x[r : r + 1], seq=r)
                with self._lock:
                    self._publish(self.clients[i % n], f"sensors/s{i}/data", payload)

    def wait_sent(self, timeout: float = 60) -> None:
        """Until every publish so far was acknowledged by a server."""
        wait_until(self._acked, timeout, "every publish acknowledged")
        with self._lock:
            self._sent.clear()

    def _acked(self) -> bool:
        with self._lock:
            sent = [(id(c), mid) for c, mid, _t, _p in self._sent]
        with self._ack_lock:
            return all(mid in self._acks[c] for c, mid in sent)

    def close(self) -> None:
        for c in {id(c): c for c in self.clients}.values():
            c.disconnect()
            c.loop_stop()


class Predictions:
    """What reaches subscribers: MQTT ``predictions/+`` and NATS ``predictions.>``."""

    def __init__(self, cluster: NatsCluster, node: int = 0) -> None:
        self.lock = threading.Lock()
        self.mqtt: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.owners: dict[str, list[tuple[int, str, int]]] = defaultdict(list)  # seq, who, lease
        self.count = 0
        self.inputs: set[tuple[str, int | None]] = set()  # (stream, seq) seen on core NATS
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

        async def on_input(msg: Any) -> None:
            binary = msg.data[:2] == codecs.MAGIC and len(msg.data) >= codecs.HEADER.size
            seq = codecs.HEADER.unpack_from(msg.data)[3] if binary else None
            with self.lock:
                self.inputs.add((msg.subject.split(".")[3], seq))

        await nc.subscribe("predictions.>", cb=on_msg)
        await nc.subscribe("part.*.sensors.*.data", cb=on_input)
        await nc.flush()
        return nc

    def stream_info(self, name: str) -> Any:
        """JetStream's view of stream ``name`` (state, cluster leader and replicas)."""

        async def info() -> Any:
            return await self._nc.jetstream(timeout=5).stream_info(name)

        return asyncio.run_coroutine_threadsafe(info(), self._loop).result(10)

    def probe(self, subject: str) -> Any:
        """Diagnostics: what $MQTT_msgs holds for ``subject``, and its consumers."""

        async def go() -> Any:
            js = self._nc.jetstream(timeout=5)
            out: list[Any] = []
            try:
                si = await js.stream_info("$MQTT_msgs", subjects_filter=subject)
                out.append(("subjects", si.state.subjects, si.state.first_seq, si.state.last_seq))
            except Exception as exc:
                out.append(("stream_info", repr(exc)))
            try:
                sub = await js.pull_subscribe(subject, stream="$MQTT_msgs")
                msgs = await sub.fetch(20, timeout=2)
                out.append([(m.metadata.sequence.stream, m.data[:16].hex()) for m in msgs])
            except Exception as exc:
                out.append(("fetch", repr(exc)))
            try:
                for ci in await js.consumers_info("$MQTT_msgs"):
                    f = ci.config.filter_subject or ""
                    if ".part." in f and f.split(".")[3] == subject.split(".")[3]:
                        out.append(
                            (
                                "consumer",
                                ci.name,
                                f,
                                ci.num_pending,
                                ci.delivered.stream_seq,
                                ci.cluster.leader if ci.cluster else None,
                            )
                        )
            except Exception as exc:
                out.append(("consumers", repr(exc)))
            return out

        return asyncio.run_coroutine_threadsafe(go(), self._loop).result(60)

    def leader_off(self, name: str, node: str) -> Any:
        """Stream ``name``'s info once its leader is not ``node`` (asking it to step down)."""
        for _ in range(10):
            info = self.stream_info(name)
            if info.cluster is not None and info.cluster.leader not in (None, node):
                return info
            if info.cluster is not None and info.cluster.leader == node:
                subject = f"$JS.API.STREAM.LEADER.STEPDOWN.{name}"
                asyncio.run_coroutine_threadsafe(
                    self._nc.request(subject, b"", timeout=5), self._loop
                ).result(10)
            time.sleep(0.5)
        raise AssertionError(f"stream {name} still led by {node}")

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
