"""The broker connection's view of its own input, against a real mosquitto."""

from __future__ import annotations

import threading

from pipeline.transport.mqtt import Link, Message, MqttConfig
from tests.integration.broker import Broker, wait_until
from tests.integration.conftest import publisher


def test_input_idle_tells_whether_another_message_waits_in_the_socket(broker: Broker) -> None:
    """What lets a message run on the network thread (``Worker.submit``'s ``alone``):
    False while a second message waits behind the one being handled, True once none does."""
    link = Link(MqttConfig(port=broker.port, client_id="idle", clean_session=True))
    assert not link.input_idle()  # not connected: it cannot be told
    entered, release = threading.Event(), threading.Event()
    seen: list[bytes] = []

    def handle(msg: Message) -> None:
        seen.append(msg.payload)
        entered.set()
        release.wait(10)  # the network thread stays here: the socket is not read

    link.subscribe("idle/+", 0, handle)
    link.start()
    try:
        wait_until(lambda: link.input_idle(), 5, "an idle socket after the connection")
        with publisher(broker.port) as pub:
            pub.publish("idle/a", b"1", qos=0)
            assert entered.wait(5)
            pub.publish("idle/a", b"2", qos=0)
        wait_until(lambda: not link.input_idle(), 5, "the second message in the socket")
        release.set()
        wait_until(lambda: len(seen) == 2, 5, "the second message handled")
        wait_until(lambda: link.input_idle(), 5, "an idle socket again")
    finally:
        release.set()
        link.stop()
