"""The last published prediction of each stream, for ``/status`` and its page.

The prediction sink fills it on the engine's thread with objects that exist anyway (the
stream id, the encoded payload, the arrival time), so the hot path allocates nothing
for it; the daemon's status view (:mod:`pipeline.daemon.status`) reads it. It sits with
the sinks because the sink writes it and nothing below the daemon may import the daemon.
"""

from __future__ import annotations

from collections.abc import Callable


class LastPredictions:
    """The last published prediction of each stream, written on the engine's thread.

    Bounded: past ``limit`` entries the streams the engine no longer carries
    (``alive(stream)`` false) are dropped, so the maps follow the state store's size.
    """

    __slots__ = ("_alive", "limit", "payloads", "received")

    def __init__(self, alive: Callable[[str], bool], limit: int) -> None:
        self.payloads: dict[str, bytes] = {}
        self.received: dict[str, float] = {}
        self._alive = alive
        self.limit = max(1, limit)

    def record(self, stream: str, payload: bytes, received: float) -> None:
        payloads = self.payloads
        payloads[stream] = payload
        self.received[stream] = received
        if len(payloads) > self.limit:
            self.prune()

    def prune(self) -> None:
        """Forget streams the engine dropped (expired, evicted); on the engine's thread."""
        for stream in [s for s in self.payloads if not self._alive(s)]:
            del self.payloads[stream]
            del self.received[stream]
