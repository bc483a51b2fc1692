"""One cluster member: leases, per-partition engines, checkpoints, replay (see package doc).

Everything runs on one asyncio loop (nats-py is asyncio): a control tick (heartbeat,
lease renewals, rebalancing, checkpoints) and one task per owned partition (fetch a
batch of its input, run it through the partition's own :class:`Engine`, publish the
predictions). A partition's batch is processed and published under its lock, so a
checkpoint taken under the same lock covers exactly the input whose predictions were
already handed to the client; the client is flushed before the checkpoint is written.

Fencing: a lease counts as held only until ``lease_ttl_s * (1 - LEASE_MARGIN)`` after
the last renewal *was sent*; the server expires the key no earlier than ``lease_ttl_s``
after it stored it, so an owner stops using a lease before anyone else can take it.
A partition is processed, published and checkpointed only while its lease is held, and
a checkpoint is written with compare-and-set on the checkpoint's revision, so a stale
owner's write fails instead of overwriting its successor's.

A lost connection to NATS may have swallowed predictions already handed to the client,
so no checkpoint is written after one; instead every partition is dropped and taken
again from its checkpoint, and the repeats are marked ``replayed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from pipeline.cluster import assign
from pipeline.cluster.metrics import (
    HANDOVER,
    LEAVE,
    LOST,
    REBALANCE,
    TAKEOVER,
    ClusterMetrics,
)
from pipeline.daemon.config import ClusterConfig, Settings
from pipeline.engine.engine import Engine, Rejected, Step
from pipeline.errors import CheckpointError, PayloadError
from pipeline.model import StepModel
from pipeline.sinks.encoder import PredictionEncoder
from pipeline.sinks.mqtt import NON_FINITE_OUTPUT, PublishPolicy
from pipeline.sources.codecs import Decoder
from pipeline.sources.mqtt import UNKNOWN_TOPIC
from pipeline.telemetry.metrics import Metrics
from pipeline.transport.topics import STREAM

log = logging.getLogger(__name__)

# The input: the MQTT gateway's own stream of QoS 1 publishes. The gateway acknowledges
# a sensor's QoS 1 PUBLISH only once this stream stored it (R3: ``stream_replicas`` in
# deploy/cluster/nats.conf); the plain NATS publish it also makes is fire-and-forget, and
# a stream capturing that one loses whatever arrives while it elects a leader (measured:
# 400 to 1,500 of 3,000 readings when the leader's node was SIGKILLed).
INPUT_STREAM = "$MQTT_msgs"  # the gateway's name (nats-server 2.9 to 2.15 alike)
INPUT_PREFIX = "$MQTT.msgs."  # + the mapped subject: part.<P>.sensors.<stream>.data
INPUT_SUBJECTS = INPUT_PREFIX + "part.*.sensors.*.data"
STREAM_TOKEN = INPUT_PREFIX.count(".") + 3  # $MQTT.msgs.part.<P>.sensors.<stream>.data
REPLICAS_MUST_MATCH = 10134  # JetStream error: consumer replicas must match the stream's
LEASE_MARGIN = 0.25  # stop using a lease this share of its TTL before it can expire
FETCH_WAIT_S = 2.0  # one long poll of an idle partition (a stop cancels it)
CONSUMER_CHECK_S = 4.0  # an idle partition checks that its consumer still exists
REPLAYED = b',"replayed":true}'
MEMBER_HEADER = "Seqstream-Member"
LEASE_HEADER = "Seqstream-Lease"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A partition's checkpoint: the engine's file, the input sequence it covers."""

    seq: int
    final: bool  # written by an owner that released the partition: nothing after seq ran
    state: bytes  # Engine.save's file; b"" for no streams
    revision: int  # of the key-value entry: the compare-and-set token for the next write
    # Input up to this sequence may already have been published by a dead owner: a
    # handover passes it on, so a replay that one owner began another finishes marking.
    replay_until: int = 0


def encode_checkpoint(
    seq: int, final: bool, member: str, lease: int, state: bytes, replay_until: int = 0
) -> bytes:
    head = {"seq": seq, "final": final, "member": member, "lease": lease}
    if replay_until > seq:
        head["replay"] = replay_until
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + state


def decode_checkpoint(data: bytes, revision: int) -> Checkpoint:
    head, sep, state = data.partition(b"\n")
    try:
        doc = json.loads(head) if sep else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("seq"), int):
        raise CheckpointError(f"partition checkpoint revision {revision}: malformed header")
    replay = doc.get("replay", 0)
    replay = replay if isinstance(replay, int) and not isinstance(replay, bool) else 0
    return Checkpoint(int(doc["seq"]), bool(doc.get("final")), state, revision, replay)


class Owned:
    """A partition this member holds: lease, engine, consumer and progress."""

    def __init__(self, partition: int, lease_rev: int, renewed_at: float, engine: Engine) -> None:
        self.partition = partition
        self.key = f"p.{partition}"
        self.lease_rev = lease_rev  # the fencing token: the lease entry's latest revision
        self.renewed_at = renewed_at  # when the renewal that gave lease_rev was sent
        self.engine = engine
        self.lock = asyncio.Lock()  # a batch's processing and publishing; a checkpoint
        self.ckpt_rev = 0
        self.ckpt_seq = 0  # input sequence covered by the last checkpoint written
        self.applied = 0  # last input sequence applied to the engine (and published)
        self.replay_until = 0  # input sequence up to which a dead owner may have published
        self.sub: JetStreamContext.PullSubscription | None = None
        # output.every_k / on_change, as in single-box mode; its counts are not in the
        # checkpoint, so a new owner counts from the handover on.
        self.policy: PublishPolicy | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        self.headers = {MEMBER_HEADER: "", LEASE_HEADER: str(lease_rev)}


class Member:
    """A daemon of the cluster; :meth:`run` serves until SIGTERM/SIGINT, then leaves."""

    def __init__(
        self,
        settings: Settings,
        model: StepModel,
        metrics: Metrics,
        cluster_metrics: ClusterMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.cluster is not None
        self.cfg: ClusterConfig = settings.cluster
        self.settings = settings
        self.model = model
        self.metrics = metrics
        self.cm = cluster_metrics
        self.clock = clock
        self.me = self.cfg.member
        group = self.cfg.group
        self.stream_name = INPUT_STREAM
        self.buckets = (f"{group}-leases", f"{group}-members", f"{group}-checkpoints")
        prefix, suffix = settings.output.topic.split(STREAM)
        self.out_prefix = prefix.replace("/", ".")
        self.out_suffix = suffix.replace("/", ".")
        self.encoder = PredictionEncoder(model.spec)
        self.decoder = Decoder(
            model.spec.n_features,
            max_payload_bytes=settings.input.max_payload_bytes,
            max_steps=settings.engine.max_chunk,
            features=model.spec.features,
        )
        self.owned: dict[int, Owned] = {}
        self.taking: dict[int, Owned] = {}  # lease held, checkpoint being restored
        self.should_exit = asyncio.Event()
        self.started = False
        self._lease_value = json.dumps({"member": self.me}).encode()
        self._scratch = Path(tempfile.mkdtemp(prefix="seqstream-cluster-"))
        self._nc: Nats | None = None
        self._js: JetStreamContext | None = None
        self._kv: dict[str, KeyValue] = {}
        self._seen: dict[str, float] = {}  # member -> when its heartbeat was last seen
        self._connection_lost = False  # since the last _replay_all
        self._watcher: Any = None
        self._watch_started = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None  # for /status (another thread)
        self._api = asyncio.Semaphore(8)  # JetStream API requests in flight at start
        self._input_replicas = self.cfg.replicas  # the input stream's, read at start
        self._reader_replicas = 1  # of a partition's reader, unless the server wants more

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def live_seen(self) -> set[str]:
        """Members whose heartbeat was seen within the TTL (this member's view)."""
        now, ttl = self.clock(), self.cfg.lease_ttl_s
        return {m for m, t in self._seen.items() if now - t < ttl}

    # -- life ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit code."""
        return asyncio.run(self.main(install_signals=True))

    async def main(self, *, install_signals: bool = False) -> int:
        loop = self.loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.should_exit.set)
        try:
            await self._connect()
            await self._ensure_retrying()
            self.started = True
            log.info("member %s running: %d partitions", self.me, self.cfg.partitions)
            keeper = asyncio.create_task(self._keep_leases(), name="leases")
            watch = asyncio.create_task(self._watch_members(), name="members")
            tick = self.cfg.lease_ttl_s / 6
            next_ckpt = self.clock() + self.cfg.checkpoint_interval_s
            while not self.should_exit.is_set():
                if self._connection_lost and self._nc is not None and self._nc.is_connected:
                    await self._replay_all()
                await self._rebalance()
                if self.clock() >= next_ckpt:
                    next_ckpt = self.clock() + self.cfg.checkpoint_interval_s
                    await self._checkpoint_all()
                self._observe()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.should_exit.wait(), tick)
            for task in (keeper, watch):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._leave()
            return 0
        finally:
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.close()
            shutil.rmtree(self._scratch, ignore_errors=True)

    async def _connect(self) -> None:
        metrics = self.metrics

        async def on_error(exc: Exception) -> None:
            log.warning("nats: %s", exc)

        async def on_disconnected() -> None:
            # Predictions written to the lost connection may never have left: no
            # checkpoint may cover them. Every partition restarts from its checkpoint.
            self._connection_lost = True
            metrics.broker_connected.set(0)
            log.warning("nats: disconnected")

        async def on_reconnected() -> None:
            metrics.broker_connected.set(1)
            metrics.reconnects.inc()
            log.info("nats: reconnected")

        self._nc = await nats.connect(
            servers=list(self.cfg.servers),
            name=f"seqstream-{self.me}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
        metrics.broker_connected.set(1)
        self._js = self._nc.jetstream(timeout=5.0)

    async def _ensure_retrying(self) -> None:
        """:meth:`_ensure` until it succeeds: a busy cluster answers some of its requests
        late, and a member that gives up at start serves nothing."""
        delay = 0.5
        while True:
            try:
                await self._ensure()
                return
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                if self.should_exit.is_set():
                    raise
                log.warning("stream, holders or buckets not ready (%r); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(5.0, 2 * delay)

    async def _ensure(self) -> None:
        """The input stream and the buckets, created by whichever member comes first
        (identical configs make creation idempotent; an existing one is used as is)."""
        js = self._js
        assert js is not None
        cfg = self.cfg
        try:
            info = await js.stream_info(self.stream_name)
        except nats.js.errors.NotFoundError:
            info = None  # no MQTT client connected yet: made as the gateway would make it
        if info is None:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # the gateway won
                await js.add_stream(
                    StreamConfig(
                        name=self.stream_name,
                        subjects=[INPUT_PREFIX + ">"],
                        retention=RetentionPolicy.INTEREST,
                        num_replicas=cfg.replicas,
                        max_age=cfg.input_max_age_s,
                        storage=StorageType.FILE,
                    )
                )
        else:
            self._input_replicas = info.config.num_replicas or 1
            if not info.config.max_age:  # the gateway's default keeps input forever
                info.config.max_age = cfg.input_max_age_s
                await js.update_stream(info.config)
        await asyncio.gather(*(self._hold(p) for p in range(cfg.partitions)))
        ttls = (cfg.lease_ttl_s, cfg.lease_ttl_s, None)
        for bucket, ttl in zip(self.buckets, ttls, strict=True):
            try:
                self._kv[bucket] = await js.create_key_value(
                    bucket=bucket, history=1, ttl=ttl, replicas=cfg.replicas
                )
            except nats.js.errors.BadRequestError:
                self._kv[bucket] = await js.key_value(bucket)

    @property
    def leases(self) -> KeyValue:
        return self._kv[self.buckets[0]]

    @property
    def members(self) -> KeyValue:
        return self._kv[self.buckets[1]]

    @property
    def checkpoints(self) -> KeyValue:
        return self._kv[self.buckets[2]]

    async def _leave(self) -> None:
        """Graceful leave: drop out of the member list first (so nobody wants to hand
        this member anything), then checkpoint and release every partition."""
        log.info("member %s leaving: releasing %d partitions", self.me, len(self.owned))
        with contextlib.suppress(Exception):
            await self.members.delete(self.me)
        await asyncio.gather(*(self._release(o, LEAVE) for o in list(self.owned.values())))
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=5)

    # -- control tick -------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Heartbeat and lease renewals on their own task, every third of the TTL, so
        a slow rebalance or checkpoint never delays them."""
        period = self.cfg.lease_ttl_s / 3
        while True:
            started = self.clock()
            await asyncio.gather(self._heartbeat(), self._renew())
            await asyncio.sleep(max(0.0, period - (self.clock() - started)))

    async def _heartbeat(self) -> None:
        try:
            await self.members.put(self.me, b"1")
        except Exception as exc:  # the servers are away: leases will lapse, then resume
            log.warning("heartbeat failed: %s", exc)

    async def _watch_members(self) -> None:
        """Keep :attr:`_seen` (member -> when its last heartbeat was seen) from one
        watcher of the members bucket; a leave's delete shows at once, an expiry when no
        heartbeat came for a TTL. A watcher that stopped delivering (its server died:
        this member's own heartbeats stop showing) is replaced."""
        while True:
            try:
                watcher = await self.members.watchall()
            except Exception as exc:
                log.warning("member watch not started: %s", exc)
                await asyncio.sleep(0.5)
                continue
            self._watcher = watcher
            self._watch_started = self.clock()
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.operation in ("DEL", "PURGE"):
                    self._seen.pop(entry.key, None)
                else:
                    self._seen[entry.key] = self.clock()
            self._watcher = None

    async def _live_members(self) -> set[str]:
        """Members whose heartbeat was seen within the TTL; empty when this member's
        own heartbeat is not seen (the view is stale: decide nothing on it)."""
        now, ttl = self.clock(), self.cfg.lease_ttl_s
        if now - self._seen.get(self.me, -ttl) >= ttl:
            w = self._watcher
            if w is not None and now - self._watch_started > 2 * ttl:
                log.warning("member watch stalled; restarting it")
                self._watcher = None
                await _quietly(w.stop())
            return set()
        live = self.live_seen()
        self.cm.members.set(len(live))
        return live

    async def _renew(self) -> None:
        # Partitions being taken too: a takeover slower than the lease's validity (a
        # restore and a consumer on a busy cluster) must not lose the lease meanwhile.
        owned = [*self.owned.values(), *self.taking.values()]
        await asyncio.gather(*(self._renew_one(o) for o in owned))

    async def _renew_one(self, o: Owned) -> None:
        if o.stopping:
            return
        sent = self.clock()
        try:
            rev = await self.leases.update(o.key, self._lease_value, last=o.lease_rev)
        except nats.js.errors.KeyWrongLastSequenceError:
            log.warning("partition %d: lease taken over; dropping it", o.partition)
            await self._lose(o)
            return
        except Exception as exc:  # server away: the lease runs out unless renewed later
            log.warning("partition %d: lease renewal failed: %s", o.partition, exc)
            if not self._valid(o):
                await self._lose(o)
            return
        # Recorded even while stopping: the release deletes the lease at this revision.
        o.lease_rev, o.renewed_at = rev, sent
        o.headers[LEASE_HEADER] = str(rev)
        self.cm.renewals.inc()

    async def _rebalance(self) -> None:
        members = await self._live_members()
        if not members:
            return  # cannot see the list (or it is empty before our first heartbeat)
        want = assign.share(members, self.me, self.cfg.partitions)
        expired = [o for o in self.owned.values() if not self._valid(o)]
        await asyncio.gather(*(self._lose(o) for o in expired))
        unwanted = [o for p, o in self.owned.items() if p not in want]
        await asyncio.gather(*(self._release(o, REBALANCE) for o in unwanted))
        if not self.should_exit.is_set():  # in parallel: one slow takeover delays no other
            await asyncio.gather(*(self._acquire(p) for p in sorted(want - self.owned.keys())))

    def _valid(self, o: Owned) -> bool:
        return self.clock() - o.renewed_at < self.cfg.lease_ttl_s * (1 - LEASE_MARGIN)

    def _observe(self) -> None:
        self.cm.owned.set(len(self.owned))
        for o in self.owned.values():
            self.cm.checkpoint_lag.labels(str(o.partition)).set(o.applied - o.ckpt_seq)

    # -- taking and giving up partitions ------------------------------------------------

    async def _acquire(self, p: int) -> None:
        sent = self.clock()
        try:
            rev = await self.leases.create(f"p.{p}", self._lease_value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # another member holds it: it releases it, or its lease expires
        except Exception as exc:
            log.warning("partition %d: lease not acquired: %s", p, exc)
            return
        o = Owned(p, rev, sent, Engine(self.model, self.settings.engine, observer=self.metrics))
        o.headers[MEMBER_HEADER] = self.me
        out = self.settings.output
        if out.every_k > 1 or out.on_change:
            o.policy = PublishPolicy(out.every_k, out.on_change, self.settings.engine.max_streams)
        self.taking[p] = o
        try:
            await self._take(o)
        except Exception as exc:
            log.error("partition %d: takeover failed, releasing it: %s", p, exc)
            if o.sub is not None:
                with contextlib.suppress(Exception):
                    await o.sub.unsubscribe()
            with contextlib.suppress(Exception):
                await self.leases.delete(o.key, last=o.lease_rev)
            return
        finally:
            self.taking.pop(p, None)
        self.owned[p] = o
        self.cm.partition_owned.labels(str(p)).set(1)
        o.task = asyncio.create_task(self._consume(o), name=f"partition-{p}")

    async def _take(self, o: Owned) -> None:
        """Restore the partition's checkpoint, claim it, open its input after it."""
        started = self.clock()
        ckpt: Checkpoint | None = None
        try:
            entry = await self.checkpoints.get(o.key)
        except nats.js.errors.KeyNotFoundError:
            entry = None
        if entry is not None and entry.value is not None and entry.revision is not None:
            ckpt = decode_checkpoint(entry.value, entry.revision)
        state = b""
        if ckpt is not None:
            o.ckpt_seq = o.applied = ckpt.seq
            state = ckpt.state
            if state:
                path = self._scratch / f"restore-{o.partition}.npz"
                path.write_bytes(state)
                try:
                    o.engine.restore(path)
                finally:
                    path.unlink(missing_ok=True)
        # The claim: the same checkpoint, not final, written with compare-and-set. A stale
        # owner's later write now fails; a later owner sees a takeover is needed.
        if ckpt is not None:
            o.replay_until = ckpt.replay_until
        blob = encode_checkpoint(o.applied, False, self.me, o.lease_rev, state, o.replay_until)
        o.ckpt_rev = await self.checkpoints.update(
            o.key, blob, last=0 if ckpt is None else ckpt.revision
        )
        await self._subscribe(o)
        reason = HANDOVER
        if ckpt is not None and not ckpt.final:
            assert o.sub is not None
            info = await o.sub.consumer_info()
            if info.num_pending:  # all input now stored may have been published already
                js = self._js
                assert js is not None
                stored = (await js.stream_info(self.stream_name)).state.last_seq
                o.replay_until = max(o.replay_until, int(stored or 0))
            reason = TAKEOVER
        if not self._valid(o):
            raise TimeoutError("the lease lapsed during the takeover")
        self.cm.handoffs.labels(reason).inc()
        log.info(
            "partition %d: %s by %s at input seq %d (%d streams, replays to seq %d) in %.3f s",
            o.partition, reason, self.me, o.applied, o.engine.streams, o.replay_until,
            self.clock() - started,
        )  # fmt: skip

    async def _subscribe(self, o: Owned) -> None:
        """An ephemeral pull consumer of the partition's input from ``applied + 1``."""
        js = self._js
        assert js is not None
        if o.sub is not None:
            with contextlib.suppress(Exception):
                await o.sub.unsubscribe()
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=o.applied + 1,
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            num_replicas=self._reader_replicas,
            inactive_threshold=max(10.0, 3 * self.cfg.lease_ttl_s),
        )
        try:
            o.sub = await js.pull_subscribe(
                self._input(o.partition), stream=self.stream_name, config=config
            )
        except nats.js.errors.BadRequestError as exc:
            # Newer servers (2.15.1, measured) refuse a consumer of an interest-retention
            # stream with fewer replicas than the stream; 2.9.10 takes R1 readers, which
            # are quicker to make (measured: R3 readers slowed takeovers under load).
            if exc.err_code != REPLICAS_MUST_MATCH or config.num_replicas != 1:
                raise  # (takeovers run in parallel: several may learn it at once)
            self._reader_replicas = self._input_replicas
            config.num_replicas = self._reader_replicas
            o.sub = await js.pull_subscribe(
                self._input(o.partition), stream=self.stream_name, config=config
            )

    async def _hold(self, partition: int) -> None:
        """The partition's holding consumer: durable, never read, never acknowledged.

        The gateway's stream keeps a message only while a consumer still needs it; a
        reader (no acks) frees what it was delivered unless another consumer holds it,
        and then a new owner's replay finds it gone. One holder per partition, because a
        purge moves the ack floor of every consumer whose filter covers the purged
        subject: one holder of all partitions would let partition P's purge free the
        unread input of every other partition (nats-server stream.purge)."""
        js = self._js
        assert js is not None
        config = ConsumerConfig(
            durable_name=f"{self.cfg.group}-hold-{partition}",
            filter_subject=self._input(partition),
            ack_policy=AckPolicy.ALL,
            num_replicas=self.cfg.replicas,
        )
        async with self._api:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # exists: keep it
                await js.add_consumer(self.stream_name, config)

    @staticmethod
    def _input(partition: int) -> str:
        return f"{INPUT_PREFIX}part.{partition}.sensors.*.data"

    async def _release(self, o: Owned, reason: str) -> None:
        """Give ``o`` up cleanly: finish its batch, final checkpoint, delete the lease."""
        await self._stop_task(o)
        if self._valid(o) and await self._checkpoint(o, final=True):
            with contextlib.suppress(Exception):
                await self.leases.delete(o.key, last=o.lease_rev)
        self._forget(o)
        self.cm.handoffs.labels(reason).inc()
        log.info("partition %d: released (%s) at input seq %d", o.partition, reason, o.applied)

    async def _replay_all(self) -> None:
        """After a lost connection: drop every partition without a checkpoint and free
        its lease, so that it is taken again (by this member, usually) from its last
        checkpoint and its input replayed; the repeats are marked ``replayed``."""
        self._connection_lost = False
        owned = list(self.owned.values())
        log.warning("connection was lost: %d partitions restart from checkpoints", len(owned))
        for o in owned:
            await self._lose(o)
            with contextlib.suppress(Exception):
                await self.leases.delete(o.key, last=o.lease_rev)

    async def _lose(self, o: Owned) -> None:
        """The lease is gone or unusable: drop everything, checkpoint nothing."""
        if o.partition not in self.owned:
            return
        await self._stop_task(o)
        self._forget(o)
        self.cm.losses.inc()
        self.cm.handoffs.labels(LOST).inc()
        log.warning("partition %d: lease lost at input seq %d", o.partition, o.applied)

    async def _stop_task(self, o: Owned) -> None:
        """Stop ``o``'s consumer task between two batches (cancelling a fetch loses
        nothing: what it would have returned is not applied, so the next owner reads it)."""
        o.stopping = True
        task = o.task
        if task is not None and task is not asyncio.current_task():
            async with o.lock:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _forget(self, o: Owned) -> None:
        self.owned.pop(o.partition, None)
        label = str(o.partition)
        self.cm.partition_owned.labels(label).set(0)
        with contextlib.suppress(KeyError):
            self.cm.checkpoint_lag.remove(label)
        if o.sub is not None:
            sub, o.sub = o.sub, None
            asyncio.get_running_loop().create_task(_quietly(sub.unsubscribe()))

    # -- checkpoints --------------------------------------------------------------------

    async def _checkpoint_all(self) -> None:
        for o in list(self.owned.values()):
            if not o.stopping and o.applied > o.ckpt_seq:
                await self._checkpoint(o, final=False)

    async def _checkpoint(self, o: Owned, *, final: bool) -> bool:
        """Write ``o``'s state and the input it covers; False when it could not."""
        nc = self._nc
        assert nc is not None
        async with o.lock:  # between two batches: state and applied agree
            seq = o.applied
            path = self._scratch / f"save-{o.partition}.npz"
            try:
                o.engine.save(path)
                state = path.read_bytes() if o.engine.streams else b""
            except (CheckpointError, OSError) as exc:
                self.cm.checkpoint_failures.inc()
                log.error("partition %d: checkpoint failed: %s", o.partition, exc)
                return False
            finally:
                path.unlink(missing_ok=True)
        try:
            await nc.flush(timeout=5)  # the predictions it covers are at the server
            if self._connection_lost:
                raise ConnectionError("the connection was lost since: replay instead")
            if not self._valid(o):
                raise TimeoutError("lease about to lapse")
            blob = encode_checkpoint(seq, final, self.me, o.lease_rev, state, o.replay_until)
            o.ckpt_rev = await self.checkpoints.update(o.key, blob, last=o.ckpt_rev)
        except nats.js.errors.KeyWrongLastSequenceError:
            self.cm.checkpoint_failures.inc()
            log.warning("partition %d: a newer owner's checkpoint exists; dropping", o.partition)
            if not final:
                await self._lose(o)
            return False
        except Exception as exc:
            self.cm.checkpoint_failures.inc()
            log.warning("partition %d: checkpoint not written: %s", o.partition, exc)
            return False
        o.ckpt_seq = seq
        self.cm.checkpoints.inc()
        await self._purge(o, seq)
        return True

    async def _purge(self, o: Owned, seq: int) -> None:
        """Input the checkpoint covers is no longer needed by anyone."""
        js = self._js
        assert js is not None
        try:
            await js.purge_stream(self.stream_name, subject=self._input(o.partition), seq=seq + 1)
        except Exception as exc:  # the stream's max_age removes it later anyway
            log.debug("partition %d: purge failed: %s", o.partition, exc)

    # -- a partition's input ------------------------------------------------------------

    async def _consume(self, o: Owned) -> None:
        idle_since = self.clock()
        while not o.stopping:
            sub = o.sub
            if sub is None:
                return
            try:
                msgs = await sub.fetch(self.cfg.fetch_batch, timeout=FETCH_WAIT_S)
            except (TimeoutError, nats.errors.TimeoutError):  # nothing new: fetch gives up
                if self.clock() - idle_since > CONSUMER_CHECK_S and not o.stopping:
                    idle_since = self.clock()
                    await self._check_consumer(o)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # consumer lost (its server died), connection trouble
                if o.stopping:
                    return
                log.warning("partition %d: fetch failed (%r); resubscribing", o.partition, exc)
                await asyncio.sleep(0.2)
                await self._check_consumer(o, force=True)
                continue
            idle_since = self.clock()
            if not self._valid(o):
                return  # the control tick drops it
            async with o.lock:
                await self._process(o, msgs)

    async def _check_consumer(self, o: Owned, *, force: bool = False) -> None:
        """Re-create the consumer from ``applied + 1`` when it is gone or stalled."""
        if not force and o.sub is not None:
            try:
                info = await o.sub.consumer_info()
                if not info.num_pending:
                    return  # idle because there is no input
                # Input waits, yet fetches came back empty: the consumer is stalled (its
                # placement lost quorum when a server died).
            except Exception:  # gone (its server died) or unreachable: make a new one
                pass
        try:
            await self._subscribe(o)
            log.info("partition %d: consumer re-created at %d", o.partition, o.applied + 1)
        except Exception as exc:
            log.warning("partition %d: consumer not re-created: %s", o.partition, exc)

    async def _process(self, o: Owned, msgs: list[Any]) -> None:
        """Decode, run and publish one fetched batch (under ``o.lock``)."""
        received = self.clock()
        decode = self.decoder.decode
        metrics = self.metrics
        steps: list[Step] = []
        replayed: list[bool] = []
        replay_until = o.replay_until
        last = o.applied
        n = 0
        for m in msgs:
            seq = m.metadata.sequence.stream
            if seq <= last:
                continue  # delivered twice (a re-created consumer)
            last = seq
            n += 1
            try:
                steps.append(decode(m.subject.split(".")[STREAM_TOKEN], m.data, received))
                replayed.append(seq <= replay_until)
            except (PayloadError, IndexError) as exc:
                metrics.on_reject(exc.reason if isinstance(exc, PayloadError) else UNKNOWN_TOPIC)
        if n == 0:
            return
        metrics.received.inc(n)
        again = sum(replayed)
        if again:
            self.cm.replayed.inc(again)
        results = o.engine.process(steps) if steps else []
        o.applied = last
        if not self._valid(o):  # fenced: publish nothing (the control tick drops it)
            return
        nc = self._nc
        assert nc is not None
        encode = self.encoder.encode
        prefix, suffix, headers = self.out_prefix, self.out_suffix, o.headers
        policy = o.policy
        published = 0
        for r, again in zip(results, replayed, strict=True):
            if isinstance(r, Rejected):
                continue  # counted by the engine's observer
            if policy is not None:
                label = self.encoder.label(r)
                if not policy.admit(r.step.stream, label, bool(r.resets)):
                    continue
            payload = encode(r)
            if payload is None:
                metrics.on_reject(NON_FINITE_OUTPUT)
                continue
            if again:
                payload = payload[:-1] + REPLAYED
            await nc.publish(prefix + r.step.stream + suffix, payload, headers=headers)
            published += 1
        if published:
            metrics.published.inc(published)


async def _quietly(aw: Any) -> None:
    with contextlib.suppress(Exception):
        await aw
