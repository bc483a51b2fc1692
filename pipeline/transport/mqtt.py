"""The daemon's one MQTT connection (paho-mqtt 2.x), shared by the source and the sinks.

:class:`Link` owns the paho client and everything about the connection: MQTT 3.1.1
or 5, TLS, username/password, a persistent session, reconnects with exponential backoff
(paho's own loop thread; no thread is created per reconnect), resubscription on every
connect, and availability: a retained ``online`` on the status topic at every connect,
``offline`` on a clean stop and the same ``offline`` as the Last Will.

Two things paho does not do by itself:

* ``TCP_NODELAY`` is set on every new socket: without it Nagle's algorithm holds small
  publishes back for up to 40 ms.
* Incoming messages are acknowledged by the source (``manual_ack``), so a message that
  arrives after intake stopped is left unacknowledged and the broker delivers it again
  to the next session instead of it being lost.

Sessions: with ``clean_session = false`` the broker queues QoS 1/2 messages while the
daemon is away. Mosquitto 2.0.11 (Debian 12) keeps MQTT 3.1.1 sessions across its own
restart but loses MQTT 5 sessions then; prefer 3.1.1 with that broker.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from pipeline.errors import BrokerError, ConfigError
from pipeline.transport.topics import CLIENT_ID

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"

Message = paho.MQTTMessage
MessageHandler = Callable[[Message], None]


PROTOCOLS: tuple[str, ...] = ("3.1.1", "5")


class Secret:
    """A string that never shows itself in ``repr``/``str`` (logs, tracebacks)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: Path | None = None  # None: the system's trust store
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "3.1.1"
    client_id: str = "seqstream"
    clean_session: bool = False
    session_expiry_s: int = 86_400  # MQTT 5 only: how long the broker keeps the session
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30
    max_inflight: int = 100
    max_queued_out: int = 100_000  # outgoing messages held while disconnected; 0: unbounded
    username: str | None = None
    password: Secret | None = None
    tls: TlsConfig | None = None
    status_topic: str = "seqstream/{client_id}/status"

    def status(self) -> str:
        return self.status_topic.replace(CLIENT_ID, self.client_id)


_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def host_problem(host: str) -> str | None:
    """Why ``host`` is not a host name or an IP address (``None`` when it is one).

    A URL or a ``host:port`` here would reach the network layer as a name that never
    resolves (``mqtt://127.0.0.1:1883`` became ``...:1883:1883`` in logs): say so at
    parse time, with the fix.
    """
    if not host:
        return "must not be empty"
    if "://" in host:
        url = urlsplit(host)
        try:
            port = f"port = {url.port}" if url.port else "port = N"
        except ValueError:
            port = "port = N"
        return (
            f"{host!r} is a URL; give the host alone, host = {url.hostname or '...'!r}, "
            f"and {port} (for mqtts://, add [mqtt.tls])"
        )
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if ":" in host:
        name, _, port = host.rpartition(":")
        return f"{host!r} includes a port; give host = {name!r} and port = {port}"
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        return f"{host!r} is not a host name or IP address"
    return None


class LinkObserver(Protocol):
    """Told about connection changes (metrics); called on paho's network thread."""

    def on_connected(self, first: bool) -> None: ...
    def on_disconnected(self) -> None: ...


class Link:
    """One broker connection; :meth:`subscribe` before :meth:`start`, then publish freely.

    ``publish`` and ``ack`` are thread-safe (paho's own locks); handlers run on the
    network thread and must not raise.
    """

    def __init__(
        self, cfg: MqttConfig, observer: LinkObserver | None = None, *, announce: bool = True
    ) -> None:
        """``announce=False`` for helper clients (replay): no status topic, no Will."""
        self.cfg = cfg
        self.status_topic = cfg.status() if announce else None
        self._observer = observer
        self._subs: list[tuple[str, int]] = []
        self._connected = threading.Event()
        self._first = threading.Event()  # the first CONNACK (or refusal) has arrived
        self._refused: str | None = None
        self._ever_connected = False
        # The last publish at each QoS that paho took (flush waits for all of them).
        self._last: dict[int, paho.MQTTMessageInfo] = {}
        self.generation = 0  # successful connections so far; message ids belong to one
        v5 = cfg.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=None if v5 else cfg.clean_session,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            manual_ack=True,
        )
        client.suppress_exceptions = True  # a handler bug must not end the network thread
        if cfg.username is not None:
            password = cfg.password.reveal() if cfg.password is not None else None
            client.username_pw_set(cfg.username, password)
        if cfg.tls is not None:
            try:
                client.tls_set(
                    ca_certs=_str(cfg.tls.ca_file),
                    certfile=_str(cfg.tls.cert_file),
                    keyfile=_str(cfg.tls.key_file),
                )
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError(f"mqtt.tls: cannot load certificates ({exc})") from None
        if self.status_topic is not None:
            client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(cfg.max_queued_out)
        client.on_socket_open = _no_delay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        self.client = client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic_filter: str, qos: int, handler: MessageHandler) -> None:
        """Route messages matching ``topic_filter`` to ``handler``; (re)subscribed at connect."""
        self._subs.append((topic_filter, qos))

        def callback(client: paho.Client, userdata: Any, msg: Message) -> None:
            handler(msg)

        self.client.message_callback_add(topic_filter, callback)

    def on_other(self, handler: MessageHandler) -> None:
        """Messages that match no subscribed filter (e.g. a stale session's subscriptions)."""

        def callback(client: paho.Client, userdata: Any, msg: Message) -> None:
            handler(msg)

        self.client.on_message = callback

    def start(self) -> None:
        """Connect and wait for the broker's answer; refusal or timeout is a BrokerError."""
        cfg = self.cfg
        where = f"mqtt: broker {cfg.host}:{cfg.port}"
        try:
            if cfg.protocol == "5":
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = cfg.session_expiry_s
                self.client.connect(
                    cfg.host,
                    cfg.port,
                    cfg.keepalive_s,
                    clean_start=cfg.clean_session,
                    properties=props,
                )
            else:
                self.client.connect(cfg.host, cfg.port, cfg.keepalive_s)
        except ssl.SSLError as exc:
            raise BrokerError(f"{where}: TLS handshake failed ({exc.reason or exc})") from None
        except OSError as exc:
            raise BrokerError(f"{where}: cannot connect ({exc.strerror or exc})") from None
        self.client.loop_start()
        if not self._first.wait(cfg.connect_timeout_s):
            self._abort()
            raise BrokerError(f"{where}: no answer within {cfg.connect_timeout_s:g} s")
        if self._refused is not None:
            self._abort()
            hint = ""
            if "authori" in self._refused.lower() or "password" in self._refused.lower():
                hint = " (check mqtt.username and the password)"
            raise BrokerError(f"{where} refused the connection: {self._refused}{hint}")

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool = False
    ) -> paho.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos, retain)
        rc = info.rc
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (qos and rc == MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._last[qos] = info  # QoS 1/2 while disconnected: paho sends it after reconnect
        return info

    def input_idle(self) -> bool:
        """Whether no further message waits to be read (none in the socket, nor in TLS's
        buffer): the message at hand is alone. False when that cannot be told."""
        sock = self.client.socket()
        if sock is None:
            return False
        try:
            pending = getattr(sock, "pending", None)
            if pending is not None and pending():
                return False
            return not select.select([sock], (), (), 0)[0]
        except (OSError, ValueError, TypeError):  # closed meanwhile, or not a socket
            return False

    def ack(self, mid: int, qos: int) -> None:
        if qos:
            self.client.ack(mid, qos)

    def flush(self, timeout: float) -> bool:
        """Wait until every publish so far has left (QoS 0) or been acknowledged (QoS 1, 2).

        Each QoS is tracked apart: a later QoS 0 message on the wire says nothing about
        the acknowledgement of an earlier QoS 1 one. False when that does not happen
        within ``timeout`` or the broker is away; never raises.
        """
        deadline = time.monotonic() + timeout
        for info in tuple(self._last.values()):
            while not _confirmed(info):
                left = deadline - time.monotonic()
                if not self.connected or left <= 0:
                    return False
                if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    info.wait_for_publish(min(left, 0.1))  # then look at the connection again
                else:  # queued while disconnected: paho's wait would raise
                    time.sleep(min(left, 0.005))
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` (retained), disconnect cleanly (no Will), stop the loop."""
        if self.connected and self.status_topic is not None:
            info = self.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            self.flush(timeout)
            if not _confirmed(info):
                log.warning("mqtt: 'offline' not confirmed by the broker within %g s", timeout)
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    def _abort(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho callbacks (network thread) -------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            if not self._first.is_set():
                self._refused = str(reason)
                self._first.set()
            else:
                log.warning("mqtt: broker refused the reconnection: %s", reason)
            return
        self.generation += 1
        if self._subs:
            client.subscribe(list(self._subs))
        if self.status_topic is not None:
            client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        first = not self._ever_connected
        self._ever_connected = True
        self._connected.set()
        self._first.set()
        if not first:
            log.info("mqtt: reconnected to %s:%d", self.cfg.host, self.cfg.port)
        else:
            log.info(
                "mqtt: connected to %s:%d (session present: %s); subscribed to %s",
                self.cfg.host,
                self.cfg.port,
                flags.session_present,
                ", ".join(f"{t!r} (QoS {q})" for t, q in self._subs) or "nothing",
            )
        if self._observer is not None:
            self._observer.on_connected(first)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not self._connected.is_set():
            return  # a failed connection attempt: nothing was up
        self._connected.clear()
        if reason.is_failure:
            log.warning("mqtt: connection lost (%s); reconnecting", reason)
        if self._observer is not None:
            self._observer.on_disconnected()

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: Sequence[ReasonCode],
        properties: Properties | None,
    ) -> None:
        for (topic, _), code in zip(self._subs, reasons, strict=False):
            if code.is_failure:
                log.error("mqtt: broker refused the subscription to %r (%s)", topic, code)


def _confirmed(info: paho.MQTTMessageInfo) -> bool:
    """Whether paho saw a message through (sent at QoS 0, acknowledged at QoS 1/2).

    ``is_published()`` raises for a message queued while disconnected (rc NO_CONN),
    even after paho sent it on reconnect and the broker acknowledged it; the flag it
    guards is the answer.
    """
    if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
        return bool(info._published)
    return info.is_published()


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not TCP (unix, websockets)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _str(path: object | None) -> str | None:
    return None if path is None else str(path)
