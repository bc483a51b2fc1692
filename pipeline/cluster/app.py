"""Composition root of cluster mode: the member and its metrics endpoint from settings."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from pipeline.cluster.member import Member
from pipeline.cluster.metrics import ClusterMetrics
from pipeline.cluster.status import ClusterStatus
from pipeline.daemon import app
from pipeline.daemon.config import Settings
from pipeline.daemon.service import EXIT_RESULTS, RELOAD_RESULTS
from pipeline.engine.store.state import RESET_REASONS
from pipeline.telemetry.metrics import Exporter, Metrics

log = logging.getLogger(__name__)


def build(settings: Settings, registry: CollectorRegistry | None = None) -> Member:
    """A cluster member, built but not started (``settings.cluster`` must be set)."""
    if settings.cluster is None:
        raise ValueError("settings have no [cluster] section")
    model = app.load_model(settings)
    app.check_model(settings, model)
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(
        registry,
        reject_reasons=app.REJECT_REASONS,
        reset_reasons=RESET_REASONS,
        reload_results=RELOAD_RESULTS,
        exit_results=EXIT_RESULTS,
    )
    spec = model.spec
    metrics.set_model(
        name=spec.name, version=spec.version, provider=model.provider, opset=spec.opset
    )
    metrics.set_task(spec.task)
    metrics.set_labels(spec.labels if spec.task == "classify" else ())
    return Member(settings, model, metrics, ClusterMetrics(registry))


def run(settings: Settings) -> int:
    """``seqstream run`` with a ``[cluster]`` section: serve until SIGTERM/SIGINT."""
    member = build(settings)
    exporter = None
    if settings.metrics.enabled:
        view = ClusterStatus(member, settings.metrics.status_streams)
        exporter = Exporter(
            member.metrics.registry, settings.metrics.bind, settings.metrics.port, view.routes()
        )
    try:
        return member.run()
    finally:
        if exporter is not None:
            exporter.close()
