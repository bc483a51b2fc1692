"""Cluster mode against a real 3-node NATS cluster (JetStream + MQTT gateway) on loopback.

Sensors publish over MQTT to all three nodes; three (then four) ``seqstream run``
members share the partitions. Every stream's predictions, as an MQTT subscriber
receives them, must equal the offline stepwise run of its readings (1e-5: streams run
batched, as in test_daemon), across a SIGKILLed member, a joining and a leaving one,
a paused one, and a SIGKILLed NATS node (the one leading the input stream). Ownership
is checked from the owner headers every prediction carries on NATS: per stream, the
lease revision (the fencing token) of successive predictions never goes back, i.e. an
old owner never publishes after a new one started.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.model import StepModel
from pipeline.offline.evaluation import run_stepwise
from tests.integration.broker import wait_until
from tests.integration.cluster_rig import Member, Predictions, Sensors, wait_owned
from tests.integration.nats_cluster import NatsCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PARTITIONS = 32
STREAMS = 1000
ROWS = 6
ATOL = 1e-5
HANDOFFS = "seqstream_cluster_handoffs_total"


@pytest.fixture(scope="module")
def oracle(model_path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(17)
    data = [rng.normal(size=(ROWS, 6)).astype(np.float32) for _ in range(STREAMS)]
    model = StepModel.load(model_path)
    return data, [out["probs"] for out in run_stepwise(model, data)]


@pytest.fixture
def nats3(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "nats", PARTITIONS)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class Rig:
    def __init__(
        self,
        cluster: NatsCluster,
        model: Path,
        tmp: Path,
        output: dict[str, object] | None = None,
        **cl: object,
    ) -> None:
        self.cluster, self.model, self.tmp, self.cl = cluster, model, tmp, cl
        self.output = output
        self.members: list[Member] = []
        self.preds = Predictions(cluster)
        self.sensors = Sensors(cluster)

    def add(self, name: str) -> Member:
        m = Member(
            name, self.tmp, self.model, self.cluster, self.output, partitions=PARTITIONS, **self.cl
        )
        m.start()
        self.members.append(m)
        return m

    def live(self) -> list[Member]:
        return [m for m in self.members if m.running]

    def close(self) -> None:
        for m in self.members:
            m.kill_if_running()
        self.sensors.close()
        self.preds.close()

    def logs(self) -> str:
        return "\n".join(f"--- {m.name}\n{m.log.read_text()[-3000:]}" for m in self.members)


@pytest.fixture
def rig(nats3: NatsCluster, model_path: Path, tmp_path: Path) -> Iterator[type[Rig]]:
    made: list[Rig] = []

    class Made(Rig):
        def __init__(self, output: dict[str, object] | None = None, **cl: object) -> None:
            super().__init__(nats3, model_path, tmp_path, output, **cl)
            made.append(self)

    yield Made
    for r in made:
        r.close()


def check_predictions(
    rig: Rig, data: list[np.ndarray], expected: list[np.ndarray], *, replays: bool
) -> int:
    """Every stream's predictions (deduplicated by seq) equal the offline run; a repeat
    is marked ``replayed`` and equal to the first; the fencing token never goes back.
    Returns how many repeats there were."""
    repeats = 0
    with rig.preds.lock:
        mqtt = {k: list(v) for k, v in rig.preds.mqtt.items()}
        owners = {k: list(v) for k, v in rig.preds.owners.items()}
    for i in range(STREAMS):
        first: dict[int, dict[str, object]] = {}
        for p in mqtt.get(f"s{i}", []):
            assert "resets" not in p, p
            seq = p["seq"]
            assert isinstance(seq, int)
            if seq in first:
                repeats += 1
                assert p.get("replayed") is True, (i, p)
                assert p["probs"] == first[seq]["probs"]  # same state, same input
            else:
                first[seq] = p
        assert sorted(first) == list(range(ROWS)), (i, sorted(first))
        got = np.array([list(first[s]["probs"].values()) for s in range(ROWS)])  # type: ignore[union-attr]
        np.testing.assert_allclose(got, expected[i], atol=ATOL, rtol=0)
        leases = [lease for _seq, _who, lease in owners.get(f"s{i}", [])]
        assert leases and all(lease > 0 for lease in leases)
        assert leases == sorted(leases), (i, owners[f"s{i}"])
    if not replays:
        assert repeats == 0
    return repeats


def test_three_members_share_1000_streams_and_match_the_offline_run(
    rig: type[Rig], oracle: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    data, expected = oracle
    r = rig()
    for name in ("a", "b", "c"):
        r.add(name)
    wait_owned(r.members, PARTITIONS)
    shares = [m.owned() for m in r.members]
    assert all(shares), shares  # each member took a share
    # Hostile input on a real stream and on another: counted, harmless to every state.
    hostile = [b"not json", b'{"values": [1, 2]}', b'{"values": [[1,2,3,4,5,6]], "seq": -1}']
    for k, junk in enumerate(hostile):
        r.sensors.clients[k % 3].publish(f"sensors/s{k}/data", junk, qos=1)
        r.sensors.clients[k % 3].publish("sensors/intruder/data", junk, qos=1)
    r.sensors.send(data, range(ROWS))
    r.sensors.wait_sent()
    r.preds.wait_distinct(STREAMS * ROWS)
    check_predictions(r, data, expected, replays=False)
    assert "intruder" not in r.preds.mqtt
    assert sum(m.value("seqstream_cluster_replayed_steps_total") for m in r.members) == 0
    received = sum(m.value("seqstream_messages_received_total") for m in r.members)
    assert received >= STREAMS * ROWS + 2 * len(hostile)

    def rejected() -> float:
        prefix = "seqstream_messages_rejected_total"
        return sum(v for m in r.members for k, v in m.metrics().items() if k.startswith(prefix))

    assert rejected() == 2 * len(hostile)
    for m in r.members:
        assert m.stop(signal.SIGTERM) == 0, r.logs()


def test_sigkill_a_member_its_partitions_resume_and_nothing_is_lost_or_doubled(
    rig: type[Rig], oracle: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    data, expected = oracle
    # Checkpoints only when claimed: the killed member's partitions must be replayed.
    r = rig(checkpoint_interval_s=600.0)
    for name in ("a", "b", "c"):
        r.add(name)
    wait_owned(r.members, PARTITIONS)
    half = ROWS // 2
    r.sensors.send(data, range(half))
    r.sensors.wait_sent()
    r.preds.wait_distinct(STREAMS * half)
    victim = r.members[0]
    lost = victim.owned()
    assert lost
    victim.stop(signal.SIGKILL)
    killed = time.monotonic()
    r.sensors.send(data, range(half, ROWS))  # waits in JetStream for the orphaned partitions
    r.sensors.wait_sent()
    wait_owned(r.live(), PARTITIONS, timeout=30)
    resumed = time.monotonic() - killed
    r.preds.wait_distinct(STREAMS * ROWS)
    repeats = check_predictions(r, data, expected, replays=True)
    survivors = r.live()
    takeovers = sum(
        m.value('seqstream_cluster_handoffs_total{reason="takeover"}') for m in survivors
    )
    replayed = sum(m.value("seqstream_cluster_replayed_steps_total") for m in survivors)
    assert takeovers == len(lost), r.logs()
    assert replayed > 0 and repeats <= replayed
    print(f"partitions resumed {resumed:.2f} s after SIGKILL; {repeats} repeats marked replayed")
    for m in survivors:
        assert m.stop(signal.SIGTERM) == 0, r.logs()


def fnv1a(token: str) -> int:
    h = 2166136261
    for b in token.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def resets(members: list[Member]) -> float:
    return sum(
        v
        for m in members
        for k, v in m.metrics().items()
        if k.startswith("seqstream_state_resets_total")
    )


def test_a_joining_then_a_leaving_member_hand_partitions_over_without_loss_or_reset(
    rig: type[Rig], oracle: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    data, expected = oracle
    r = rig()
    for name in ("a", "b", "c"):
        r.add(name)
    wait_owned(r.members, PARTITIONS)
    r.sensors.send(data, range(2))
    r.sensors.wait_sent()
    r.preds.wait_distinct(STREAMS * 2)

    r.add("d")  # a fourth member joins: the others hand over its share
    wait_owned(r.members, PARTITIONS)
    r.sensors.send(data, range(2, 4))
    r.sensors.wait_sent()
    leaving = r.members[1]
    assert leaving.stop(signal.SIGTERM) == 0, r.logs()  # leaves: checkpoints, releases
    wait_owned(r.live(), PARTITIONS)
    r.sensors.send(data, range(4, ROWS))
    r.sensors.wait_sent()
    r.preds.wait_distinct(STREAMS * ROWS)
    live = r.live()
    assert sum(m.value(f'{HANDOFFS}{{reason="takeover"}}') for m in live) == 0
    assert sum(m.value(f'{HANDOFFS}{{reason="rebalance"}}') for m in live) > 0
    assert sum(m.value(f'{HANDOFFS}{{reason="lost"}}') for m in live) == 0
    assert resets(live) == 0

    check_predictions(r, data, expected, replays=False)  # zero lost, zero repeated
    for m in r.live():
        assert m.stop(signal.SIGTERM) == 0, r.logs()


def test_a_paused_member_is_fenced_off_and_publishes_nothing_for_partitions_it_lost(
    rig: type[Rig], oracle: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    """SIGSTOP a member past its lease TTL (a GC pause, a frozen VM), then SIGCONT it:
    the others took its partitions; it must drop them unpublished and unsaved (its
    lease lapsed locally), then rejoin and get its share back by a clean handover."""
    data, expected = oracle
    r = rig()
    for name in ("a", "b", "c"):
        r.add(name)
    wait_owned(r.members, PARTITIONS)
    r.sensors.send(data, range(2))
    r.sensors.wait_sent()
    r.preds.wait_distinct(STREAMS * 2)
    zombie, others = r.members[0], r.members[1:]
    assert zombie.proc is not None
    handovers = zombie.value(f'{HANDOFFS}{{reason="handover"}}')
    zombie.proc.send_signal(signal.SIGSTOP)
    wait_owned(others, PARTITIONS, timeout=30)  # its leases expired; the others took over
    r.sensors.send(data, range(2, 4))
    r.sensors.wait_sent()
    r.preds.wait_distinct(STREAMS * 4)
    zombie.proc.send_signal(signal.SIGCONT)
    r.sensors.send(data, range(4, ROWS))
    r.sensors.wait_sent()
    wait_owned(r.members, PARTITIONS)  # back, by handover from the others
    r.preds.wait_distinct(STREAMS * ROWS)
    check_predictions(r, data, expected, replays=True)  # the token never goes back
    assert zombie.value("seqstream_cluster_lease_losses_total") > 0
    assert zombie.value(f'{HANDOFFS}{{reason="handover"}}') > handovers  # its share back
    for m in r.members:
        assert m.stop(signal.SIGTERM) == 0, r.logs()


def test_sigkill_a_nats_node_mid_run_loses_nothing(
    rig: type[Rig], oracle: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    """One of three NATS nodes dies while sensors publish: the sensors on it publish
    again through another node what it did not acknowledge, members on it reconnect,
    the R3 input stream, leases and checkpoints survive; every step reaches every
    stream's state exactly once."""
    data, expected = oracle
    r = rig()
    for name in ("a", "b", "c"):
        r.add(name)
    wait_owned(r.members, PARTITIONS)
    half = ROWS // 2
    r.sensors.send(data, range(half))
    r.sensors.wait_sent()
    r.preds.wait_distinct(STREAMS * half)
    # The worst node to lose: the input stream's leader (an election follows); not the
    # node of the MQTT subscriber that checks the predictions.
    before = r.preds.leader_off("$MQTT_msgs", r.cluster.nodes[0].name)
    victim = [n.name for n in r.cluster.nodes].index(before.cluster.leader)
    sender = threading.Thread(target=r.sensors.send, args=(data, range(half, ROWS)))
    sender.start()
    wait_until(lambda: len(r.preds.inputs) >= STREAMS * (half + 1), 60, "a third more input")
    r.cluster.nodes[victim].stop(signal.SIGKILL)
    sender.join()
    r.sensors.fail_over(victim)
    r.sensors.wait_sent()
    try:
        r.preds.wait_distinct(STREAMS * ROWS, timeout=60)
    finally:
        after = r.preds.stream_info("$MQTT_msgs")
        with r.preds.lock:
            seen = len({x for x in r.preds.inputs if x[1] is not None})
        print(
            f"input leader before {before.cluster.leader if before.cluster else None}, after "
            f"{after.cluster.leader if after.cluster else None}; stored last_seq "
            f"{before.state.last_seq} -> {after.state.last_seq}; distinct inputs on core NATS "
            f"{seen}; republished {r.sensors.republished}; predictions {r.preds.distinct()}"
        )
        with r.preds.lock:
            got = {(k, p["seq"]) for k, v in r.preds.mqtt.items() for p in v}
        missing = [
            (f"s{i}", s) for i in range(STREAMS) for s in range(ROWS) if (f"s{i}", s) not in got
        ]
        parts: dict[int, list[tuple[str, int]]] = {}
        for k, s in missing:
            parts.setdefault(fnv1a(k) % PARTITIONS, []).append((k, s))
        print("missing by partition:", {p: (len(v), v[:4]) for p, v in sorted(parts.items())})
        for p, v in sorted(parts.items())[:3]:
            print(p, r.preds.probe(f"$MQTT.msgs.part.{p}.sensors.{v[0][0]}.data"))
    check_predictions(r, data, expected, replays=True)  # none lost, none applied twice
    assert resets(r.members) == 0
    for m in r.members:
        assert m.stop(signal.SIGTERM) == 0, r.logs()


def test_every_k_and_the_http_endpoints_work_as_in_single_box_mode(
    rig: type[Rig], oracle: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    """``[output] every_k`` goes through the single-box publish policy per partition; the
    single-box HTTP endpoints answer, /status with the partitions and streams owned."""
    data, expected = oracle
    r = rig(output={"every_k": 2})
    for name in ("a", "b", "c"):
        r.add(name)
    wait_owned(r.members, PARTITIONS)
    r.sensors.send(data, range(ROWS))
    r.sensors.wait_sent()
    kept = list(range(1, ROWS, 2))  # the 2nd, 4th, 6th message of each stream
    r.preds.wait_distinct(STREAMS * len(kept))
    # The HTTP endpoints of single-box mode, the status listing partitions and streams.
    for m in r.members:
        assert m.http("/healthz")[0] == 200
        code, ready = m.http("/readyz")
        assert code == 200 and ready["ready"], ready
        code, doc = m.http("/status")
        assert code == 200 and doc["ready"], doc
        owned = doc["cluster"]["owned"]
        assert {o["partition"] for o in owned} == m.owned(), doc["cluster"]
        assert sorted(doc["cluster"]["members"]) == ["a", "b", "c"]
        assert doc["streams"]["active"] == sum(o["streams"] for o in owned) > 0
        row = doc["streams"]["items"][0]
        assert row["stream"].startswith("s") and row["last_seq"] == ROWS - 1, row
    for m in r.members:
        assert m.stop(signal.SIGTERM) == 0, r.logs()
    with r.preds.lock:
        mqtt = {k: list(v) for k, v in r.preds.mqtt.items()}
    for i in range(STREAMS):
        got = mqtt[f"s{i}"]
        assert [p["seq"] for p in got] == kept, (i, got)
        probs = np.array([list(p["probs"].values()) for p in got])
        np.testing.assert_allclose(probs, expected[i][kept], atol=ATOL, rtol=0)
