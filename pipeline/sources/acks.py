"""Sensor-message acknowledgements held back until a checkpoint covers their steps.

By default the source acknowledges a message as soon as its step is queued: the broker
forgets it, and a daemon killed (SIGKILL, power loss) before its next checkpoint loses
the steps still queued and the state the others built; each such stream is reset with
reason ``seq_gap`` when its next message arrives. With ``checkpoint.ack_after_checkpoint``
the source gives the acknowledgement to an :class:`AckLedger` instead, and the daemon
releases a :class:`Cut` of them only after, on the engine's thread between two batches,

1. every prediction published so far is confirmed by the broker, then
2. a checkpoint holding the state after those steps is on disk.

Whenever the daemon dies, the broker therefore still holds every message whose step the
last checkpoint does not cover. The next run restores that checkpoint and the broker
redelivers the messages: those the checkpoint covers are refused by ``seq``, the others
run from exactly the state they need. Nothing is lost; the steps run after the last
checkpoint are predicted a second time, with the same ``seq`` and values (the output is
at-least-once, as MQTT QoS 1 is).

The price: the broker must let that many messages wait for their acknowledgement
(mosquitto: ``max_inflight_messages 0``), and its packet ids cap that at 65535, so the
daemon also checkpoints once ``max_unacked`` messages wait (:attr:`AckLedger.due`), and
when checkpoints keep failing (a full disk) it acknowledges them anyway beyond twice that,
with an error logged: without a checkpoint there is no durability left to keep.

A message id means something only on the connection it came on: after a reconnect the
broker redelivers every unacknowledged message itself, so what was held from before is
dropped rather than acknowledged on the new connection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol


class Acker(Protocol):
    """The broker connection (:class:`pipeline.transport.mqtt.Link`)."""

    @property
    def generation(self) -> int: ...

    def ack(self, mid: int, qos: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Cut:
    """The acknowledgements held when a checkpoint began."""

    generation: int
    mids: list[int]


class AckLedger:
    """QoS 1 message ids in arrival order, waiting for a checkpoint; thread-safe."""

    def __init__(self, link: Acker, max_held: int) -> None:
        if max_held < 1:
            raise ValueError("max_held must be >= 1")
        self._link = link
        self.max_held = max_held
        self._lock = threading.Lock()
        self._held: list[int] = []
        self._generation = link.generation

    def hold(self, mid: int) -> None:
        """Keep ``mid`` until a checkpoint covers its step (call after queueing the step)."""
        generation = self._link.generation
        with self._lock:
            if generation != self._generation:
                self._held.clear()  # an older connection's: the broker redelivers those
                self._generation = generation
            self._held.append(mid)

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def due(self) -> bool:
        """Enough wait that a checkpoint should not wait for its interval."""
        return len(self._held) >= self.max_held

    def cut(self) -> Cut:
        """Everything held so far; take it before the checkpoint is queued on the engine."""
        with self._lock:
            held, self._held = self._held, []
            return Cut(self._generation, held)

    def release(self, cut: Cut) -> int:
        """Acknowledge ``cut`` (its steps are checkpointed); how many were acknowledged.

        None when the connection changed meanwhile: the broker redelivers those messages
        and their copies are held (and refused by ``seq``) in their turn.
        """
        if cut.generation != self._link.generation:
            return 0
        ack = self._link.ack
        for mid in cut.mids:
            ack(mid, 1)
        return len(cut.mids)

    def keep(self, cut: Cut) -> None:
        """The checkpoint failed: ``cut`` stays held, ahead of what came since."""
        with self._lock:
            if cut.generation == self._generation:
                self._held[:0] = cut.mids
