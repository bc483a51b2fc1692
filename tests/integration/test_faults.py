"""Faults with real processes: broker and daemon stopped, killed and restarted mid-stream.

A real mosquitto configured like ``deploy/mosquitto.conf`` (persistence, autosave on
every change, no queue or in-flight caps), real ``seqstream run`` subprocesses, sensors
publishing QoS 1 readings with sequence numbers, all on loopback; every process is
stopped by its PID. For each fault the test proves, against the offline oracle
(:func:`pipeline.offline.evaluation.run_stepwise` on the same data):

* every step the broker accepted (PUBACK to the sensor) got a prediction;
* no step was processed twice: QoS 1 redeliveries are refused by ``seq`` (counted),
  and every prediction equals the uninterrupted offline run, so no stream lost state.

A SIGKILLed daemon cannot say what it had done: with ``checkpoint.ack_after_checkpoint``
nothing is lost, and the steps after the last checkpoint are predicted a second time,
with the same values (at-least-once output); with the default ack on receipt the loss
is bounded by the steps acknowledged since the last checkpoint, each affected stream is
reset once with reason ``seq_gap``. Both bounds are checked against the checkpoint file.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.model import StepModel
from pipeline.offline.evaluation import run_stepwise
from pipeline.sources import codecs
from tests.integration.broker import HOST, Broker, free_port, shipped_broker, wait_until
from tests.integration.conftest import daemon_config, exposition, write_toml

REPO = Path(__file__).resolve().parents[2]
RUN = [sys.executable, "-m", "pipeline.cli", "run", "--allow-root"]  # CI runs as root
ATOL = 1e-5
# Well below what a broker saving its store after every change takes on two busy cores
# (about 170 QoS 1 messages/s here, see deploy/mosquitto.conf).
STREAMS = 8
ROWS = 66  # per stream
RATE_HZ = 12.0  # rows per second per stream: 96 messages/s in all, for 5.5 s
WITNESS = "predictions/~witness"  # not a stream: see Predictions.settle


# -- the broker users would run --------------------------------------------------------


@pytest.fixture
def shipped(tmp_path: Path) -> Iterator[Broker]:
    broker = shipped_broker(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


# -- sensors and consumers ---------------------------------------------------------------


def paho_client(port: int, client_id: str, **kw: Any) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, **kw)
    c.reconnect_delay_set(1, 1)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    return c


class Sensors:
    """``len(data)`` streams publishing one row per message at ``rate`` Hz each, QoS 1.

    One paho client with a persistent session, as a store-and-forward sensor gateway
    that keeps each stream in order: readings wait in the gateway until everything it
    handed to paho before is acknowledged. (Handed over while paho still resends its
    backlog after a reconnect, a new message would overtake the older ones, and the
    daemon must refuse a stream's older ``seq`` as out of order.) A step counts as
    accepted once the broker acknowledged it.
    """

    def __init__(self, port: int, data: list[np.ndarray], rate: float) -> None:
        self.data = data
        self.rate = rate
        self.sent = 0  # rows read from every sensor so far
        self.backlog: deque[tuple[tuple[str, int], str, bytes]] = deque()
        self.mids: dict[tuple[str, int], int] = {}
        self.handed: dict[tuple[str, int], float] = {}  # step -> handed to paho
        self.acked: dict[int, float] = {}  # mid -> first PUBACK (paho resends with its mid)
        self.client = paho_client(port, f"sensors-{port}")
        self.client.on_publish = lambda c, u, mid, rc, p: self.acked.setdefault(
            mid, time.monotonic()
        )
        self.client.connect(HOST, port)
        self.client.loop_start()
        wait_until(self.client.is_connected, 5, "sensor connection")
        self._thread = threading.Thread(target=self._run, name="sensors")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        for t in range(len(self.data[0])):
            delay = started + t / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for i, rows in enumerate(self.data):
                encode = codecs.encode_binary if i % 2 else codecs.encode_json
                payload = encode(rows[t], t, 1e9 + t / self.rate)
                self.backlog.append(((f"s{i}", t), f"sensors/s{i}/data", payload))
            self.sent = t + 1
            self._forward()
        deadline = time.monotonic() + 60
        while self.backlog and time.monotonic() < deadline:
            time.sleep(0.01)
            self._forward()

    def _forward(self) -> None:
        if not self.client.is_connected() or not self.acked.keys() >= set(self.mids.values()):
            return
        while self.backlog:
            step, topic, payload = self.backlog.popleft()
            self.handed[step] = time.monotonic()
            self.mids[step] = self.client.publish(topic, payload, 1).mid

    def wait_sent(self, rows: int) -> None:
        wait_until(lambda: self.sent >= rows, 60, f"{rows} rows sent")

    def accepted(self, timeout: float = 30.0) -> set[tuple[str, int]]:
        """Every step, once the broker has acknowledged all of them (fails otherwise)."""
        self._thread.join(90)
        assert not self.backlog
        wait_until(lambda: self.acked.keys() >= set(self.mids.values()), timeout, "PUBACKs")
        return set(self.mids)

    def accepted_since(self, moment: float) -> set[tuple[str, int]]:
        return {step for step, mid in self.mids.items() if self.acked[mid] >= moment}

    def last_accepted_before(self, moment: float) -> set[tuple[str, int]]:
        """Each stream's last step the broker acknowledged before ``moment``."""
        last: dict[str, int] = {}
        for (stream, q), mid in self.mids.items():
            if self.acked.get(mid, math.inf) < moment:
                last[stream] = max(q, last.get(stream, -1))
        return set(last.items())

    def acked_before(self, moment: float) -> set[tuple[str, int]]:
        return {s for s, mid in self.mids.items() if self.acked.get(mid, math.inf) < moment}

    def in_flight_at(self, moment: float) -> set[tuple[str, int]]:
        """Steps handed over before ``moment`` and acknowledged after it."""
        return {
            step for step, mid in self.mids.items() if self.handed[step] < moment <= self.acked[mid]
        }

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Predictions:
    """Every prediction message, with its DUP flag (a broker's redelivery to us)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got: list[tuple[str, dict[str, Any], bool]] = []
        self.witnessed: set[bytes] = set()
        self._lock = threading.Lock()
        subscribed = threading.Event()
        c = paho_client(port, f"predictions-{port}")
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("predictions/#", 1)
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_message = self._on_message
        c.connect(HOST, port)
        c.loop_start()
        self.client = c
        assert subscribed.wait(5)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if msg.topic == WITNESS:
                self.witnessed.add(msg.payload)
                return
            self.got.append((msg.topic.rsplit("/", 1)[1], json.loads(msg.payload), msg.dup))

    def steps(self) -> set[tuple[str, int]]:
        with self._lock:
            return {(s, p["seq"]) for s, p, _ in self.got}

    def wait_for(self, steps: set[tuple[str, int]], timeout: float = 30.0) -> None:
        try:
            wait_until(lambda: steps <= self.steps(), timeout, "a prediction for every step")
        except AssertionError as exc:
            missing = sorted(steps - self.steps())
            raise AssertionError(f"{exc}; {len(missing)} missing: {missing[:20]}") from None

    def settle(self) -> None:
        """Everything the broker holds for us by now has arrived (a duplicate too).

        A witness message published now is queued for this subscriber after everything
        queued before it, and one subscriber gets its messages in that order: once the
        witness is here, so is the rest. Call it when the daemon has stopped (or died),
        so that nothing it publishes can still be on its way to the broker.
        """
        token = str(time.monotonic_ns()).encode()
        c = paho_client(self.port, f"witness-{self.port}-{token.decode()}")
        c.connect(HOST, self.port)
        c.loop_start()
        try:
            c.publish(WITNESS, token, 1).wait_for_publish(10)
            wait_until(lambda: token in self.witnessed, 30, "the witness message")
        finally:
            c.disconnect()
            c.loop_stop()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Status:
    """The daemon's retained status topic."""

    def __init__(self, port: int, client_id: str) -> None:
        self.got: list[bytes] = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"seqstream/{client_id}/status", 1)
        c.on_message = lambda cl, u, m: self.got.append(m.payload)
        c.reconnect_delay_set(1, 1)
        c.connect(HOST, port)
        c.loop_start()
        self.client = c

    def online(self) -> int:
        return self.got.count(b"online")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- the daemon as users run it ----------------------------------------------------------


def _ignore_file_size_signal() -> None:
    """In the child: a write past RLIMIT_FSIZE fails with EFBIG, as on a full disk,
    instead of SIGXFSZ killing the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


class DaemonProcess:
    """``seqstream run`` in its own process; started, signalled and waited for by PID.

    Its output comes through a pipe (copied to ``log`` by this process), so a file-size
    limit put on the daemon to play a full disk does not also silence its log.
    """

    def __init__(self, config: Path, log: Path, metrics_port: int, status: Status) -> None:
        self.config = config
        self.log = log
        self.metrics_port = metrics_port
        self.status = status
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        online = self.status.online()
        self.proc = subprocess.Popen(
            [*RUN, "--config", str(self.config)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_ignore_file_size_signal,
        )
        threading.Thread(target=self._copy_log, args=(self.proc,), daemon=True).start()
        wait_until(
            lambda: self.status.online() > online or self.proc is None or self.exited(),
            60,
            "the daemon online",
        )
        assert not self.exited(), self.log.read_text()[-2000:]

    def _copy_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with open(self.log, "ab") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def metrics(self) -> dict[str, float]:
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return exposition(text)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.proc = None
        return code

    def kill_if_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def oracle_data(model_path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each stream's rows and the offline stepwise probabilities for them."""
    rng = np.random.default_rng(2024)
    data = [rng.normal(size=(ROWS, 6)).astype(np.float32) for _ in range(STREAMS)]
    model = StepModel.load(model_path)
    return data, [out["probs"] for out in run_stepwise(model, data)]


class Rig:
    """Broker + daemon + sensors + consumers for one fault test."""

    def __init__(
        self, broker: Broker, model_path: Path, tmp: Path, data: list[np.ndarray], **cfg: Any
    ) -> None:
        self.broker = broker
        self.tmp = tmp
        self.model_path = model_path
        self.client_id = f"faults-{broker.port}"
        self.metrics_port = free_port()
        cfg.setdefault("metrics", {})["port"] = self.metrics_port
        cfg.setdefault("checkpoint", {}).setdefault("interval_s", 1.0)
        doc = daemon_config(tmp, model_path, broker.port, self.client_id, **cfg)
        self.checkpoint = Path(doc["checkpoint"]["path"])
        self.status = Status(broker.port, self.client_id)
        self.predictions = Predictions(broker.port)
        self.daemon = DaemonProcess(
            write_toml(tmp / "daemon.toml", doc), tmp / "daemon.log", self.metrics_port, self.status
        )
        self.sensors = Sensors(broker.port, data, RATE_HZ)

    def close(self) -> None:
        self.daemon.kill_if_running()
        for part in (self.sensors, self.predictions, self.status):
            part.close()


@pytest.fixture
def rig(
    shipped: Broker,
    model_path: Path,
    tmp_path: Path,
    oracle_data: tuple[list[np.ndarray], list[np.ndarray]],
) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(**cfg: Any) -> Rig:
        r = Rig(shipped, model_path, tmp_path, oracle_data[0], **cfg)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


Deliveries = dict[tuple[str, int], list[tuple[dict[str, Any], bool]]]


@dataclass
class Outcome:
    """What a consumer of the predictions saw, judged against the offline runs."""

    by_step: Deliveries
    holes: dict[str, list[int]]  # steps without any prediction, by stream
    resets: dict[str, int]  # where a stream restarted from zeros ("seq_gap")
    twice: set[tuple[str, int]]  # steps the daemon published more than once

    def counts(self) -> str:
        lost = sum(map(len, self.holes.values()))
        return f"{lost} steps lost, {len(self.resets)} streams reset, {len(self.twice)} twice"


def judge(
    got: list[tuple[str, dict[str, Any], bool]],
    oracle_data: tuple[list[np.ndarray], list[np.ndarray]],
    model_path: Path,
) -> Outcome:
    """Every prediction equals the uninterrupted offline run of its stream; after the one
    reset a stream may have (reason "seq_gap", at its first step after a lost one) it
    equals the offline run restarted from zeros there. Each fault states its own bound on
    the holes, resets and repeats this returns."""
    data, expected = oracle_data
    by_step: Deliveries = {}
    for stream, p, dup in got:
        by_step.setdefault((stream, p["seq"]), []).append((p, dup))
    resets: dict[str, int] = {}
    for (stream, q), deliveries in sorted(by_step.items()):
        for p, _ in deliveries:
            if "resets" in p:
                assert p["resets"] == ["seq_gap"], p
                assert resets.setdefault(stream, q) == q, (stream, resets, q)
    model = StepModel.load(model_path)
    restarted = {
        s: run_stepwise(model, [data[int(s[1:])][a:]])[0]["probs"] for s, a in resets.items()
    }
    for (stream, q), deliveries in by_step.items():
        a = resets.get(stream, ROWS)
        want = expected[int(stream[1:])][q] if q < a else restarted[stream][q - a]
        for p, _ in deliveries:
            probs = np.array(list(p["probs"].values()), dtype=np.float32)
            np.testing.assert_allclose(probs, want, atol=ATOL, rtol=0, err_msg=f"{stream} {q}")
    holes = {
        f"s{i}": missing
        for i in range(STREAMS)
        if (missing := [q for q in range(ROWS) if (f"s{i}", q) not in by_step])
    }
    # a broker's redelivery to the consumer carries DUP; a second publication does not
    twice = {step for step, d in by_step.items() if sum(not dup for _, dup in d) > 1}
    return Outcome(by_step, holes, resets, twice)


def run_until(rig: Rig, rows: int) -> None:
    rig.daemon.start()
    rig.sensors.start()
    rig.sensors.wait_sent(rows)


def finish(rig: Rig) -> tuple[set[tuple[str, int]], dict[str, float]]:
    """Wait for every accepted step's prediction; the last daemon's metrics; stop it."""
    accepted = rig.sensors.accepted()
    assert len(accepted) == STREAMS * ROWS
    rig.predictions.wait_for(accepted)
    metrics = rig.daemon.metrics()
    assert rig.daemon.stop() == 0
    rig.predictions.settle()
    return accepted, metrics


# -- the four faults ----------------------------------------------------------------------


@pytest.mark.parametrize("ack", ["receipt", "checkpoint"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_broker_stopped_or_killed_mid_stream(
    rig: Callable[..., Rig],
    oracle_data: tuple[list[np.ndarray], list[np.ndarray]],
    sig: int,
    ack: str,
) -> None:
    """SIGTERM: nothing lost, nothing run twice. SIGKILL: mosquitto acknowledges a QoS 1
    message before its next store write, so it can lose what it acknowledged in its last
    instant (neither on disk nor yet written to a subscriber), in either direction: a
    reading (the daemon never sees it), or a prediction of a reading that was in flight
    at the kill (the gateway resends that reading, and the daemon refuses it as a
    duplicate: it ran once already). The bound: only steps acknowledged in the broker's
    last instant or in flight at the kill, at most one per stream here (the gateway sends
    a stream's next reading once the last is acknowledged); a lost reading resets its
    stream ("seq_gap") at the next one, a lost prediction leaves the state exact.
    With acks held for checkpoints the broker also redelivers what it had sent since the
    last checkpoint: the daemon refuses those by seq."""
    r = rig(checkpoint={"ack_after_checkpoint": ack == "checkpoint"})
    run_until(r, ROWS // 3)
    killed = time.monotonic()
    r.broker.stop(sig)
    # both sides have seen the broker go: the readings wait in the gateway meanwhile
    wait_until(
        lambda: (
            not r.sensors.client.is_connected()
            and r.daemon.metrics()["seqstream_broker_connected"] == 0
        ),
        30,
        "the gateway and the daemon disconnected",
    )
    r.broker.start()
    accepted = r.sensors.accepted()
    # The bound in steps: per stream, its last step the broker acknowledged before the
    # kill, and any step in flight at the kill; at most one of them lost per stream.
    last_moment = r.sensors.last_accepted_before(killed) | r.sensors.in_flight_at(killed)
    if sig == signal.SIGTERM:
        last_moment = set()
    r.predictions.wait_for(accepted - last_moment)
    metrics = r.daemon.metrics()
    assert r.daemon.stop() == 0
    r.predictions.settle()
    out = judge(r.predictions.got, oracle_data, r.model_path)
    holes = {(s, q) for s, qs in out.holes.items() for q in qs}
    assert holes <= last_moment and all(len(qs) == 1 for qs in out.holes.values())
    assert len(holes) <= STREAMS
    assert all(out.holes.get(s) == [q - 1] for s, q in out.resets.items())
    assert not out.twice
    # one daemon process throughout: its counters say what it did
    assert metrics["seqstream_predictions_published_total"] == len(accepted) - len(out.resets)
    assert metrics['seqstream_state_resets_total{reason="seq_gap"}'] == len(out.resets)
    assert metrics["seqstream_broker_reconnects_total"] >= 1
    refused = sum(
        metrics[f'seqstream_messages_rejected_total{{reason="{why}"}}']
        for why in ("duplicate", "out_of_order")
    )
    received = len(accepted) - len(out.resets) + refused
    assert metrics["seqstream_messages_received_total"] == received
    print(f"\nbroker {signal.Signals(sig).name}, ack on {ack}: {out.counts()}, {refused:g} refused")


@pytest.mark.parametrize("ack", ["receipt", "checkpoint"])
def test_daemon_stopped_mid_stream_continues_exactly(
    rig: Callable[..., Rig],
    oracle_data: tuple[list[np.ndarray], list[np.ndarray]],
    ack: str,
) -> None:
    """SIGTERM: drain, checkpoint, exit 0; the restart continues every stream exactly,
    every step predicted once."""
    r = rig(checkpoint={"ack_after_checkpoint": ack == "checkpoint"})
    run_until(r, ROWS // 3)
    assert r.daemon.stop(signal.SIGTERM) == 0
    r.daemon.start()  # the broker queued what came meanwhile
    finish(r)
    out = judge(r.predictions.got, oracle_data, r.model_path)
    assert not out.holes and not out.resets and not out.twice
    assert f"restored {STREAMS} streams" in r.daemon.log.read_text()
    print(f"\ndaemon SIGTERM, ack on {ack}: {out.counts()}")


def checkpointed(path: Path) -> dict[str, int]:
    """Each stream's next sequence number in a checkpoint (its documented ``header``)."""
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(str(data["header"][()]))
    return {key: next_seq for key, next_seq, *_ in header["streams"]}


def kill_after_a_checkpoint(r: Rig) -> tuple[dict[str, int], float]:
    """SIGKILL mid-stream, once a periodic checkpoint exists; what that checkpoint covers,
    and when the kill happened."""
    run_until(r, ROWS // 3)
    wait_until(r.checkpoint.is_file, 10, "a periodic checkpoint")
    r.sensors.wait_sent(ROWS // 2)
    killed = time.monotonic()
    assert r.daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    return checkpointed(r.checkpoint), killed


def test_daemon_killed_with_acks_after_checkpoint_loses_nothing(
    rig: Callable[..., Rig], oracle_data: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    """Lossless: the broker redelivers what the last checkpoint does not cover. The bound:
    only steps after that checkpoint that were predicted before the kill are predicted
    a second time, with the same values."""
    r = rig(checkpoint={"ack_after_checkpoint": True})
    covered, _ = kill_after_a_checkpoint(r)
    r.predictions.settle()  # predictions the broker took from the dead daemon arrive
    before = r.predictions.steps()
    r.daemon.start()
    accepted, metrics = finish(r)
    out = judge(r.predictions.got, oracle_data, r.model_path)
    assert not out.holes and not out.resets  # nothing lost, no state lost
    assert out.twice <= {(s, q) for s, q in before if q >= covered.get(s, 0)}
    assert all(sum(not dup for _, dup in d) <= 2 for d in out.by_step.values())
    # the redelivered messages the checkpoint covers were refused, the rest run again
    refused = sum(
        metrics[f'seqstream_messages_rejected_total{{reason="{why}"}}']
        for why in ("duplicate", "out_of_order")
    )
    run_again = metrics["seqstream_predictions_published_total"]
    assert metrics["seqstream_messages_received_total"] == run_again + refused
    assert run_again == len(accepted) - sum(covered.values())
    print(f"\ndaemon SIGKILL, ack after checkpoint: {out.counts()}, {refused:g} refused")


def test_daemon_killed_with_acks_on_receipt_loses_one_run_of_steps_per_stream(
    rig: Callable[..., Rig], oracle_data: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    """The default, acknowledged on receipt. The bound: per stream, the predictions lost
    are one run of consecutive steps, those whose prediction the broker had not confirmed
    or whose step had not run when the daemon died, none before the last checkpoint's
    coverage is resumed; a stream whose state had moved past that checkpoint is reset
    once ("seq_gap", counted) where the broker resumes; nothing is predicted twice."""
    r = rig()
    covered, killed = kill_after_a_checkpoint(r)
    r.daemon.start()
    accepted = r.sensors.accepted()
    before_kill = r.sensors.acked_before(killed)
    last = {(f"s{i}", ROWS - 1) for i in range(STREAMS)}
    wait_until(lambda: last <= r.predictions.steps(), 30, "every stream's last prediction")
    metrics = r.daemon.metrics()
    assert r.daemon.stop() == 0
    r.predictions.settle()
    assert len(accepted) == STREAMS * ROWS
    out = judge(r.predictions.got, oracle_data, r.model_path)
    assert not out.twice
    for stream, gap in out.holes.items():
        assert gap == list(range(gap[0], gap[-1] + 1)), (stream, gap)  # one run
        assert gap[-1] + 1 >= covered.get(stream, 0)  # resumed no earlier than covered
        # tied to the kill: only steps the dead daemon had taken from the broker (the
        # broker keeps the rest for the next run)
        assert {(stream, q) for q in gap} <= before_kill, (stream, gap)
    for stream, start in out.resets.items():
        assert start > covered.get(stream, 0)  # the state had moved past the checkpoint
        assert stream not in out.holes or out.holes[stream][-1] + 1 == start
    assert metrics['seqstream_state_resets_total{reason="seq_gap"}'] == len(out.resets)
    print(f"\ndaemon SIGKILL, ack on receipt: {out.counts()}")


def test_a_full_disk_fails_checkpoints_keeps_the_last_good_one_and_loses_nothing(
    rig: Callable[..., Rig], oracle_data: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    """The disk fills up under a running daemon (played by RLIMIT_FSIZE: writes fail with
    EFBIG where a full disk gives ENOSPC; both are the same OSError to the daemon)."""
    r = rig(checkpoint={"ack_after_checkpoint": True})
    run_until(r, ROWS // 4)
    wait_until(
        lambda: r.checkpoint.is_file() and len(checkpointed(r.checkpoint)) == STREAMS,
        10,
        "a checkpoint of every stream",
    )
    good = r.checkpoint.read_bytes()
    resource.prlimit(r.daemon.pid, resource.RLIMIT_FSIZE, (256, 256))  # the disk is full
    wait_until(
        lambda: r.daemon.metrics()["seqstream_checkpoint_failures_total"] >= 2, 10, "failures"
    )
    served = r.daemon.metrics()["seqstream_predictions_published_total"]
    r.sensors.wait_sent(ROWS * 2 // 3)
    # still serving: a prediction after the disk filled (an event, not a snapshot: the
    # daemon may have answered every row sent so far when ``served`` was read)
    wait_until(
        lambda: r.daemon.metrics()["seqstream_predictions_published_total"] > served,
        30,
        "a prediction after the disk filled",
    )
    assert r.checkpoint.read_bytes() == good
    assert [p.name for p in r.checkpoint.parent.iterdir() if p.suffix == ".tmp"] == []
    assert r.daemon.stop() == 1  # the last checkpoint failed too, and says so
    assert r.checkpoint.read_bytes() == good
    assert "File too large" in r.daemon.log.read_text()
    r.daemon.start()  # room again: the broker redelivers all the good checkpoint lacks
    finish(r)
    out = judge(r.predictions.got, oracle_data, r.model_path)
    assert not out.holes and not out.resets
    print(f"\nfull disk, ack after checkpoint: {out.counts()}")


def test_a_disk_outage_beyond_twice_max_unacked_acknowledges_and_counts_the_uncovered(
    rig: Callable[..., Rig],
) -> None:
    """ack_after_checkpoint's documented limit: checkpoints failing while more than
    2 x max_unacked messages wait, the daemon acknowledges them anyway (the broker's
    packet ids would run out) and counts them; a crash then loses the state those steps
    built, as with ack on receipt: the next run resumes past them and restarts those
    streams from zeros ("seq_gap"), never before the last good checkpoint's coverage."""
    max_unacked = 20
    r = rig(checkpoint={"ack_after_checkpoint": True, "max_unacked": max_unacked})
    run_until(r, ROWS // 4)
    wait_until(
        lambda: r.checkpoint.is_file() and len(checkpointed(r.checkpoint)) == STREAMS,
        10,
        "a checkpoint of every stream",
    )
    covered = checkpointed(r.checkpoint)
    resource.prlimit(r.daemon.pid, resource.RLIMIT_FSIZE, (256, 256))  # the disk is full
    # Two forced acknowledgements: the first one's PUBACKs have left the daemon (paho's
    # network thread writes them) by the time the second is counted.
    wait_until(
        lambda: r.daemon.metrics()["seqstream_acks_uncovered_total"] >= 4 * max_unacked,
        30,
        "messages acknowledged with no checkpoint, twice",
    )
    assert r.daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    assert "none covers" in r.daemon.log.read_text()
    assert checkpointed(r.checkpoint) == covered  # the last good one stayed
    r.daemon.start()
    accepted = r.sensors.accepted()
    last = {(f"s{i}", ROWS - 1) for i in range(STREAMS)}
    wait_until(lambda: last <= r.predictions.steps(), 30, "every stream's last prediction")
    metrics = r.daemon.metrics()
    assert r.daemon.stop() == 0
    r.predictions.settle()
    assert len(accepted) == STREAMS * ROWS
    # the steps acknowledged uncovered never came back: their streams lost state
    assert metrics['seqstream_state_resets_total{reason="seq_gap"}'] >= 1
    second_run = [(s, p) for s, p, _ in r.predictions.got if "resets" in p]
    assert second_run and all(p["resets"] == ["seq_gap"] for _, p in second_run)
    assert all(p["seq"] > covered[s] for s, p in second_run)
    print(f"\ndisk outage beyond 2 x max_unacked: {len(second_run)} streams restarted from zeros")
