"""The shipped broker config and ACL against a real mosquitto: who may write what.

``deploy/mosquitto-tls.conf`` (only its paths and port replaced) with
``deploy/mosquitto.acl``: each sensor account may write its own stream's topics and
nothing else; a consumer writes nothing; anonymous clients are refused; a packet beyond
``max_packet_size`` (the daemon's ``input.max_payload_bytes`` plus a topic) gets its
sender disconnected.

A denied publish is dropped silently (MQTT 3.1.1 still acknowledges it), so "nothing
arrived" is proven by an event, not a wait: once the denied message's PUBACK is back,
the broker has dealt with it; then an allowed *witness* message goes to the same
subscriber, which receives messages in the order the broker queued them. When the
witness arrives, the denied message would have arrived before it.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.sources.mqtt import InputConfig
from tests.integration.broker import HOST, Broker, make_tls

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
USERS = {
    "seqstream": "daemon pw",
    "consumer": "consumer pw",
    "sensor-a": "a pw",
    "sensor-b": "b pw",
}


class Client:
    """A TLS client of one account; records what it receives, in order."""

    def __init__(self, port: int, ca: Path, user: str | None, password: str | None) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.refused: str | None = None
        self.connected = threading.Event()
        self.answered = threading.Event()
        self.dropped = threading.Event()
        self._cv = threading.Condition()
        self.acked: set[int] = set()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{port}-{id(self)}")
        if user is not None:
            c.username_pw_set(user, password)
        c.tls_set(ca_certs=str(ca))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        self.subscribed = threading.Event()
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.connect(HOST, port)
        c.loop_start()
        self.client = c
        assert self.answered.wait(10), f"no CONNACK for {user}"

    def _on_connect(self, cl: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if reason.is_failure:
            self.refused = str(reason)
        else:
            self.connected.set()
        self.answered.set()

    def _on_disconnect(self, *args: Any) -> None:
        with self._cv:
            self.dropped.set()
            self._cv.notify_all()

    def _on_publish(self, cl: mqtt.Client, u: Any, mid: int, reason: Any, p: Any) -> None:
        with self._cv:
            self.acked.add(mid)
            self._cv.notify_all()

    def _on_message(self, cl: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cv:
            self.got.append((msg.topic, msg.payload))
            self._cv.notify_all()

    def subscribe(self, *topics: str) -> None:
        self.subscribed.clear()
        self.client.subscribe([(t, 1) for t in topics])
        assert self.subscribed.wait(10), "no SUBACK"

    def send(self, topic: str, payload: bytes = b"1") -> None:
        info = self.client.publish(topic, payload, 1)
        info.wait_for_publish(10)
        assert info.is_published(), f"no PUBACK for {topic}"

    def attempt(self, topic: str, payload: bytes = b"forged") -> int:
        """A publish the ACL should deny; returns once the broker has dealt with it.

        mosquitto 2.0.11 answers a denied QoS 1 publish with a PUBACK carrying reason
        code 135 and drops the connection (a 3.1.1 client reads that PUBACK as a protocol
        error anyway): either ends the attempt.
        """
        mid = self.client.publish(topic, payload, 1).mid
        with self._cv:
            ok = self._cv.wait_for(lambda: mid in self.acked or self.dropped.is_set(), 10)
        assert ok, f"the broker never answered the publish to {topic!r}"
        return mid

    def wait_for(self, topic: str, payload: bytes) -> list[str]:
        """Every topic received up to ``(topic, payload)``, once that arrived."""
        with self._cv:
            ok = self._cv.wait_for(lambda: (topic, payload) in self.got, 10)
            assert ok, f"{topic!r} never arrived"
            return [t for t, _ in self.got[: self.got.index((topic, payload))]]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Path]]:
    tmp = tmp_path_factory.mktemp("acl")
    pki = make_tls(tmp / "pki")
    passwd = tmp / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        flags = ["-c"] if i == 0 else []
        subprocess.run(
            ["mosquitto_passwd", *flags, "-b", str(passwd), user, password],
            check=True,
            capture_output=True,
        )
    broker = Broker(tmp / "broker")
    conf = (DEPLOY / "mosquitto-tls.conf").read_text()
    conf = conf.replace("listener 8883", f"listener {broker.port} {HOST}")
    for old, new in {
        "/etc/mosquitto/certs/ca.crt": pki["ca"],
        "/etc/mosquitto/certs/server.crt": pki["cert"],
        "/etc/mosquitto/certs/server.key": pki["key"],
        "/etc/mosquitto/passwd": passwd,
        "/etc/mosquitto/seqstream.acl": DEPLOY / "mosquitto.acl",
        "/var/lib/mosquitto/": f"{broker.dir}/",
    }.items():
        assert old in conf
        conf = conf.replace(old, str(new))
    conf += f"log_dest file {broker.log}\nlog_type all\n"
    broker.conf.write_text(conf + ("user root\n" if os.geteuid() == 0 else ""))
    broker.start()
    yield broker, pki["ca"]
    broker.stop()


@pytest.fixture
def clients(acl_broker: tuple[Broker, Path]) -> Iterator[dict[str, Client]]:
    broker, ca = acl_broker
    made = {user: Client(broker.port, ca, user, pw) for user, pw in USERS.items()}
    for c in made.values():
        assert c.connected.is_set(), c.refused
    made["seqstream"].subscribe("sensors/+/data", "sensors/+/reset")  # the daemon's reads
    made["consumer"].subscribe("predictions/#")
    yield made
    for c in made.values():
        c.close()


def denied(acl_broker: tuple[Broker, Path], user: str, *topics: str) -> None:
    """Each of ``topics`` published by ``user`` on a connection of its own."""
    broker, ca = acl_broker
    for topic in topics:
        c = Client(broker.port, ca, user, USERS[user])
        try:
            c.attempt(topic)
        finally:
            c.close()


def test_a_sensor_writes_its_own_topics_only(
    acl_broker: tuple[Broker, Path], clients: dict[str, Client]
) -> None:
    a, b, daemon = clients["sensor-a"], clients["sensor-b"], clients["seqstream"]
    a.send("sensors/sensor-a/data", b"own")
    a.send("sensors/sensor-a/reset", b"own")
    denied(acl_broker, "sensor-a", "sensors/sensor-b/data", "sensors/sensor-b/reset")
    denied(acl_broker, "sensor-a", "sensors/other/data", "sensors/sensor-a/other")
    b.send("sensors/sensor-b/data", b"witness")
    seen = daemon.wait_for("sensors/sensor-b/data", b"witness")
    assert seen == ["sensors/sensor-a/data", "sensors/sensor-a/reset"]


def test_a_sensor_cannot_forge_predictions(
    acl_broker: tuple[Broker, Path], clients: dict[str, Client]
) -> None:
    daemon, consumer = clients["seqstream"], clients["consumer"]
    denied(acl_broker, "sensor-a", "predictions/sensor-b", "predictions/sensor-a")
    daemon.send("predictions/sensor-a", b"witness")  # the daemon's account may
    assert consumer.wait_for("predictions/sensor-a", b"witness") == []


def test_a_consumer_cannot_write_sensor_topics(
    acl_broker: tuple[Broker, Path], clients: dict[str, Client]
) -> None:
    a, daemon, consumer = clients["sensor-a"], clients["seqstream"], clients["consumer"]
    denied(acl_broker, "consumer", "sensors/sensor-a/data", "sensors/sensor-a/reset")
    denied(acl_broker, "consumer", "predictions/sensor-a")
    a.send("sensors/sensor-a/data", b"witness")
    assert daemon.wait_for("sensors/sensor-a/data", b"witness") == []
    daemon.send("predictions/sensor-a", b"witness")
    assert consumer.wait_for("predictions/sensor-a", b"witness") == []


@pytest.mark.parametrize(("user", "password"), [(None, None), ("sensor-a", "wrong")])
def test_anonymous_and_wrong_passwords_are_refused(
    acl_broker: tuple[Broker, Path], user: str | None, password: str | None
) -> None:
    broker, ca = acl_broker
    c = Client(broker.port, ca, user, password)
    try:
        assert c.refused is not None and not c.connected.is_set()
    finally:
        c.close()


def test_packets_beyond_the_daemons_payload_limit_disconnect_their_sender(
    clients: dict[str, Client],
) -> None:
    a, b, daemon = clients["sensor-a"], clients["sensor-b"], clients["seqstream"]
    limit = InputConfig().max_payload_bytes
    a.send("sensors/sensor-a/data", b"x" * limit)  # the largest payload the daemon takes
    mid = a.attempt("sensors/sensor-a/data", b"y" * (limit + 2048))
    assert a.dropped.is_set() and mid not in a.acked, "an oversized packet was accepted"
    b.send("sensors/sensor-b/data", b"witness")
    seen = daemon.wait_for("sensors/sensor-b/data", b"witness")
    assert seen == ["sensors/sensor-a/data"]
    assert len(daemon.got[0][1]) == limit
