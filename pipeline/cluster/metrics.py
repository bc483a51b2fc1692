"""The cluster member's own metrics, on the daemon's registry beside
:mod:`pipeline.telemetry.metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from pipeline.telemetry.metrics import NAMESPACE

# Why a partition changed hands, counted by the member that took or gave it up.
TAKEOVER = "takeover"  # taken after its owner died: replay from the last checkpoint
HANDOVER = "handover"  # taken from a final checkpoint (or a fresh partition): no replay
REBALANCE = "rebalance"  # given up to a member that joined
LEAVE = "leave"  # given up because this member stops
LOST = "lost"  # lease lost or fenced: dropped without a checkpoint
HANDOFF_REASONS: tuple[str, ...] = (TAKEOVER, HANDOVER, REBALANCE, LEAVE, LOST)


class ClusterMetrics:
    """Ownership, leases, handoffs, replay and checkpoint lag of one member."""

    def __init__(self, registry: CollectorRegistry) -> None:
        ns = NAMESPACE
        self.owned = Gauge(
            "cluster_partitions_owned", "Partitions this member owns.", namespace=ns,
            registry=registry,
        )  # fmt: skip
        self.partition_owned = Gauge(
            "cluster_partition_owned",
            "1 for each partition this member owns (its lease revision is the fencing token).",
            ("partition",),
            namespace=ns,
            registry=registry,
        )
        self.members = Gauge(
            "cluster_members", "Live members this member sees.", namespace=ns, registry=registry
        )
        self.renewals = Counter(
            "cluster_lease_renewals", "Lease renewals that succeeded.", namespace=ns,
            registry=registry,
        )  # fmt: skip
        self.losses = Counter(
            "cluster_lease_losses",
            "Leases lost (not renewed in time, or another owner's write seen).",
            namespace=ns,
            registry=registry,
        )
        self.handoffs = Counter(
            "cluster_handoffs", "Partitions taken or given up, by reason.", ("reason",),
            namespace=ns, registry=registry,
        )  # fmt: skip
        for reason in HANDOFF_REASONS:
            self.handoffs.labels(reason)
        self.replayed = Counter(
            "cluster_replayed_steps",
            "Input messages replayed after a takeover (their predictions carry replayed).",
            namespace=ns,
            registry=registry,
        )
        self.checkpoint_lag = Gauge(
            "cluster_checkpoint_lag_messages",
            "Input messages applied to a partition's state since its last checkpoint.",
            ("partition",),
            namespace=ns,
            registry=registry,
        )
        self.checkpoints = Counter(
            "cluster_checkpoints", "Partition checkpoints written.", namespace=ns,
            registry=registry,
        )  # fmt: skip
        self.checkpoint_failures = Counter(
            "cluster_checkpoint_failures", "Partition checkpoints that could not be written.",
            namespace=ns, registry=registry,
        )  # fmt: skip
