"""What the store's tests share: a small LSTM layout, a reset counter, shortcuts."""

from __future__ import annotations

from pipeline.contract import recurrent_state
from pipeline.engine.store.state import (
    StateStore,
    StorePolicy,
    Stream,
)

LSTM = recurrent_state("lstm", 2, 4)  # h, c: [2, batch, 4]


class Resets:
    """Counts what the store reports, like the engine's observer does."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, reason: str, count: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count


def store_with(**policy: object) -> tuple[StateStore, Resets]:
    resets = Resets()
    return StateStore(LSTM, StorePolicy(**policy), resets), resets  # type: ignore[arg-type]


def admit(
    store: StateStore,
    key: str,
    seq: int | None = None,
    ts: float | None = None,
    n: int = 1,
    now: float = 0.0,
) -> int | str:
    store.begin()
    return store.admit(key, seq, ts, n, now)


def stream(store: StateStore, key: str) -> Stream:
    st = store.get(key)
    assert st is not None
    return st
