"""Real components for the daemon's integration tests: mosquitto, MQTT clients, daemons.

* ``mosquitto``/``broker``/``tls_broker`` -- private brokers (:mod:`tests.integration.broker`);
  tests may stop and restart them.
* :class:`Collector` / :func:`publisher` -- plain paho clients, independent of the code
  under test, that record what the daemon publishes and play the sensors.
* :func:`running_daemon` -- the daemon built by :mod:`pipeline.daemon.app`, in a thread, with a
  private Prometheus registry.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry

from pipeline.daemon import app, config
from pipeline.daemon.lifecycle import Daemon
from pipeline.daemon.service import ServiceEnv
from tests.integration.broker import HOST, Broker, free_port, make_tls, wait_until


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = Broker(tmp_path_factory.mktemp("mosquitto"), extra="allow_anonymous true")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def broker(mosquitto: Broker) -> Iterator[Broker]:
    """The shared broker; running again after the test even if the test stopped it."""
    if not mosquitto.running:
        mosquitto.start()
    yield mosquitto
    if not mosquitto.running:
        mosquitto.start()


TLS_USER, TLS_PASSWORD = "sensor-gw", "correct horse battery"


@pytest.fixture(scope="session")
def tls_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Broker, dict[str, Path]]]:
    """A broker that only speaks TLS and requires ``TLS_USER``/``TLS_PASSWORD``."""
    d = tmp_path_factory.mktemp("mosquitto-tls")
    files = make_tls(d / "pki")
    passwd = d / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(passwd), TLS_USER, TLS_PASSWORD],
        check=True,
        capture_output=True,
    )
    broker = Broker(
        d / "broker",
        listener="\n".join(
            [
                f"cafile {files['ca']}",
                f"certfile {files['cert']}",
                f"keyfile {files['key']}",
                "allow_anonymous false",
                f"password_file {passwd}",
            ]
        ),
    )
    broker.start()
    yield broker, files
    broker.stop()


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 6-feature LSTM classifier (BasicMotions' shape); exported once."""
    from models.export import export_random

    path = tmp_path_factory.mktemp("model") / "model.onnx"
    export_random(path, cell="lstm", task="classify", n_features=6, hidden=16, layers=2)
    return path


# -- MQTT clients playing sensors and consumers -------------------------------------------


def client(port: int, client_id: str = "", **kw: Any) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, **kw)
    c.connect(HOST, port)
    c.loop_start()
    return c


class Publisher:
    """A sensor gateway: publishes, and on close waits until the broker has every message."""

    def __init__(self, port: int) -> None:
        self.client = client(port)
        wait_until(self.client.is_connected, 5, "publisher connection")
        self._sent: list[mqtt.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self._sent.append(self.client.publish(topic, payload, qos))

    def close(self) -> None:
        for info in self._sent:
            info.wait_for_publish(10)
        self._sent.clear()
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def publisher(port: int) -> Iterator[Publisher]:
    pub = Publisher(port)
    try:
        yield pub
    finally:
        pub.close()


class Collector:
    """Subscribes ``topic`` (QoS 1, persistent session, resubscribed on reconnect)."""

    def __init__(self, port: int, topic: str, client_id: str = "") -> None:
        self.topic = topic
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.all: list[tuple[str, bytes, bool]] = []
        self._subscribed = threading.Event()
        cid = client_id or f"collector-{free_port()}"
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, 1)
        c.on_subscribe = lambda cl, u, mid, rc, p: self._subscribed.set()
        c.on_message = lambda cl, u, m: self.messages.put((m.topic, m.payload, m.retain))
        c.reconnect_delay_set(1, 1)
        c.connect(HOST, port)
        c.loop_start()
        self.client = c
        assert self._subscribed.wait(5), f"no SUBACK for {topic}"

    def take(self, n: int, timeout: float = 20.0) -> list[tuple[str, bytes, bool]]:
        """The next ``n`` messages (fails the test when they do not come in time)."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            try:
                out.append(self.messages.get(timeout=max(0.0, left)))
            except queue.Empty:
                raise AssertionError(f"got {len(out)} of {n} messages on {self.topic}") from None
        self.all.extend(out)
        return out

    def quiet(self, seconds: float = 0.3) -> list[tuple[str, bytes, bool]]:
        """Whatever arrives within ``seconds`` (to prove that nothing more comes)."""
        time.sleep(seconds)
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def predictions_by_stream(
    messages: list[tuple[str, bytes, bool]],
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for topic, payload, _retain in messages:
        out.setdefault(topic.rsplit("/", 1)[-1], []).append(json.loads(payload))
    return out


# -- metrics of a single-model daemon (its one route is named "default") ---------------


def exposition(text: str) -> dict[str, float]:
    """A /metrics text as ``{sample line key: value}``, without the ``model="default"``
    label of a single-model daemon, so keys read ``name{reason="x"}``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            key = key.replace('{model="default"}', "").replace('model="default",', "")
            out[key] = float(value)
    return out


def sample_value(registry: Any, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of a single-model daemon's registry, with or without a ``model`` label."""
    labels = labels or {}
    value = registry.get_sample_value(name, labels)
    if value is None and "model" not in labels:
        value = registry.get_sample_value(name, {"model": "default", **labels})
    return 0.0 if value is None else float(value)


# -- the daemon ---------------------------------------------------------------------------


def daemon_config(
    tmp: Path, model: Path, port: int, client_id: str, **sections: dict[str, Any]
) -> dict[str, Any]:
    """A config document for a test daemon: its own client id, no fixed metrics port."""
    doc: dict[str, Any] = {
        "model": {"path": str(model)},
        "mqtt": {"port": port, "client_id": client_id, "reconnect_max_s": 1},
        "metrics": {"port": 0},
        "checkpoint": {"path": str(tmp / f"{client_id}.ckpt")},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return doc


def write_toml(path: Path, doc: dict[str, Any]) -> Path:
    """A tiny TOML writer for the flat values a daemon config uses."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(v)

    lines: list[str] = []

    def table(name: str, d: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        subs = {k: v for k, v in d.items() if isinstance(v, dict)}
        lines.extend(f"{k} = {value(v)}" for k, v in d.items() if k not in subs)
        for k, v in subs.items():
            table(f"{name}.{k}", v)

    for name, d in doc.items():
        if isinstance(d, list):  # an array of tables: [[route]]
            for item in d:
                lines.append(f"[[{name}]]")
                subs = {k: v for k, v in item.items() if isinstance(v, dict)}
                lines.extend(f"{k} = {value(v)}" for k, v in item.items() if k not in subs)
                for k, v in subs.items():
                    table(f"{name}.{k}", v)
        else:
            table(name, d)
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def running_daemon(
    doc: dict[str, Any], tmp: Path, env: ServiceEnv | None = None
) -> Iterator[Daemon]:
    """The daemon of ``doc``, started in a thread; stopped (and checked) on exit.

    ``env``: what systemd would pass (e.g. a watchdog interval); none by default."""
    settings = config.parse(doc, base=tmp, source=tmp / "test.toml")
    daemon = app.build(settings, registry=CollectorRegistry(), env=env)
    codes: list[int] = []
    errors: list[BaseException] = []

    def main() -> None:
        try:
            codes.append(daemon.run(install_signals=False))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=main, name="test-daemon")
    thread.start()
    try:
        wait_until(lambda: daemon.started.is_set() or bool(errors), 20, "daemon start")
        if errors:
            raise errors[0]
        yield daemon
    finally:
        daemon.should_exit.set()
        thread.join(60)
        assert not thread.is_alive(), "daemon did not stop"
    if errors:
        raise errors[0]
    assert codes == [0]
