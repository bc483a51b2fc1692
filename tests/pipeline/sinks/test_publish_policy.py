"""Which predictions the MQTT sink publishes: every k-th message, label changes, memory bound."""

from __future__ import annotations

from pipeline.sinks.mqtt import PublishPolicy


def admitted(policy: PublishPolicy, labels: list[int], resets: tuple[int, ...] = ()) -> list[int]:
    return [i for i, lb in enumerate(labels) if policy.admit("s", lb, i in resets)]


def test_every_k_publishes_the_kth_message_and_restarts_after_a_reset() -> None:
    p = PublishPolicy(every_k=3, on_change=False, max_streams=10)
    assert admitted(p, [0] * 10) == [2, 5, 8]
    p = PublishPolicy(every_k=3, on_change=False, max_streams=10)
    assert admitted(p, [0] * 10, resets=(4,)) == [2, 6, 9]


def test_on_change_publishes_the_first_and_every_change() -> None:
    p = PublishPolicy(every_k=1, on_change=True, max_streams=10)
    assert admitted(p, [1, 1, 2, 2, 2, 1, 1]) == [0, 2, 5]
    p = PublishPolicy(every_k=1, on_change=True, max_streams=10)
    assert admitted(p, [1, 1, 1, 1], resets=(2,)) == [0, 2]  # a reset publishes again


def test_on_change_with_every_k_adds_a_heartbeat() -> None:
    p = PublishPolicy(every_k=4, on_change=True, max_streams=10)
    assert admitted(p, [1, 1, 1, 1, 1, 2, 2, 2, 2]) == [0, 3, 5, 7]


def test_streams_are_independent_and_memory_is_bounded() -> None:
    p = PublishPolicy(every_k=2, on_change=False, max_streams=3)
    assert [p.admit(s, 0, False) for s in "abab"] == [False, False, True, True]
    for s in "cdefg":
        p.admit(s, 0, False)
    assert len(p._seen) == 3  # least recently seen streams forgotten
    assert p.admit("a", 0, False) is False  # "a" was forgotten: counting starts again
