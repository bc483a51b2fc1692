"""One topic per channel: readings of single features assembled into steps by ``seq``.

Sensors that publish each quantity on its own topic (``sensors/{stream}/{channel}``,
``{"seq": 17, "value": 21.5}``) are joined here into the model's steps: the channel
level names one of the model's features, and the readings of one stream that carry
the same ``seq`` make one step, emitted as soon as every feature has arrived.

Policy for a missing channel (a lost message, a dead sensor): steps leave in ``seq``
order. A complete step waits behind an older incomplete one, since channels published
by separate sensors arrive interleaved; once more than ``max_pending`` steps of a
stream wait, the oldest is dropped and the complete ones behind it leave. A dropped
step's readings are counted ``incomplete_step``; the stream then has a gap in its
``seq``, which the engine treats as for any lost message (a ``seq_gap`` reset beyond
``engine.seq_gap_tolerance``). Nothing is filled in: a made-up value would be a
prediction on data that never existed. So one lost reading delays its stream by
``max_pending`` steps, and a dead channel stops its stream's predictions, every step
counted, until it comes back.

Order within a channel is assumed (MQTT keeps each publisher's order): a step whose
every channel arrived before any reading of an older step leaves first, and the older
step's readings are then ``duplicate``, as they would be after it was dropped.

A reading for a step already emitted (or dropped), or the same channel twice for one
step, is a ``duplicate``; one more than ``max_seq_jump`` ahead of the stream's last
step is a ``seq_jump``, refused without touching the stream (as the engine does), so a
forged far-ahead reading cannot make the real sender's readings duplicates. A sensor
that restarts its ``seq`` at 0 sends a reset first, as for whole-step messages.

Runs on the MQTT network thread only (no locks). Memory is bounded: ``max_pending``
steps for each of at most ``max_streams`` streams, the least recently heard stream's
waiting steps dropped (counted) for a new one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.engine.engine import Step
from pipeline.engine.store.state import REJECT_SEQ_JUMP

INCOMPLETE_STEP = "incomplete_step"
UNKNOWN_CHANNEL = "unknown_channel"
DUPLICATE = "duplicate"  # the engine's word for a repeated seq
REASONS: tuple[str, ...] = (INCOMPLETE_STEP, UNKNOWN_CHANNEL)


@dataclass(slots=True)
class _Pending:
    """A step waiting for channels: its row and which features have arrived."""

    values: np.ndarray
    have: int = 0  # bit j: feature j arrived (an int, not a list: ~80 bytes less a step)
    count: int = 0
    ts: float | None = None
    received: float = 0.0


@dataclass(slots=True)
class _Stream:
    pending: dict[int, _Pending] = field(default_factory=dict)
    done: int = -1  # the highest seq emitted or dropped: older readings are duplicates


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one reading did: ``steps`` to submit, oldest first, and the readings
    dropped with the reason ``dropped_as`` (an older step's, or this one)."""

    steps: tuple[Step, ...] = ()
    dropped: int = 0
    dropped_as: str = INCOMPLETE_STEP


NOTHING = Outcome()


class Assembler:
    """Joins per-channel readings of each stream into steps (see module doc)."""

    def __init__(
        self,
        features: Sequence[str],
        *,
        max_pending: int,
        max_streams: int,
        max_seq_jump: int | None = None,
    ) -> None:
        """``max_seq_jump``: ``engine.max_seq_jump`` (None: off)."""
        self._index = {name: i for i, name in enumerate(features)}
        self._max_jump = max_seq_jump
        self._n = len(features)
        self._max_pending = max_pending
        self._max_streams = max_streams
        self._streams: OrderedDict[str, _Stream] = OrderedDict()

    def channel_index(self, channel: str) -> int | None:
        """The feature a channel level names, or None (``unknown_channel``)."""
        return self._index.get(channel)

    def add(
        self, stream: str, feature: int, seq: int, ts: float | None, value: float, received: float
    ) -> Outcome:
        """Take one reading; the step it completes, if any, and what was dropped."""
        state = self._streams.get(stream)
        dropped = 0
        if state is None:
            state = self._streams[stream] = _Stream()
            if len(self._streams) > self._max_streams:
                _, evicted = self._streams.popitem(last=False)
                dropped += sum(p.count for p in evicted.pending.values())
        else:
            self._streams.move_to_end(stream)
        if seq <= state.done:  # never for a new stream (done is -1, seq >= 0)
            return Outcome(dropped=1, dropped_as=DUPLICATE)
        if self._max_jump is not None and state.done >= 0 and seq > state.done + self._max_jump:
            return Outcome(dropped=1, dropped_as=REJECT_SEQ_JUMP)
        step = state.pending.get(seq)
        if step is None:
            step = state.pending[seq] = _Pending(
                np.zeros((1, self._n), np.float32), received=received
            )
            if len(state.pending) > self._max_pending:
                oldest = min(state.pending)
                dropped += state.pending.pop(oldest).count
                state.done = max(state.done, oldest)
                if oldest == seq:  # older than every waiting step: it could never leave
                    return Outcome(dropped=dropped + 1)
        elif step.have >> feature & 1:
            return Outcome(dropped=1, dropped_as=DUPLICATE)
        step.values[0, feature] = value
        step.have |= 1 << feature
        step.count += 1
        if step.ts is None:
            step.ts = ts
        if step.count < self._n and not dropped:
            return NOTHING
        return Outcome(steps=self._release(stream, state), dropped=dropped)

    def _release(self, stream: str, state: _Stream) -> tuple[Step, ...]:
        """The complete steps at the head of the stream's queue, oldest first."""
        out: list[Step] = []
        pending = state.pending
        while pending:
            head = min(pending)
            step = pending[head]
            if step.count < self._n:
                break
            del pending[head]
            state.done = head
            out.append(Step(stream, step.values, head, step.ts, step.received))
        return tuple(out)

    @property
    def waiting(self) -> int:
        """Readings held for steps not yet complete (neither queued nor rejected yet)."""
        return sum(p.count for st in self._streams.values() for p in st.pending.values())

    def reset(self, stream: str) -> int:
        """Forget a stream (its reset topic): the readings dropped with its waiting steps."""
        state = self._streams.pop(stream, None)
        return 0 if state is None else sum(p.count for p in state.pending.values())
