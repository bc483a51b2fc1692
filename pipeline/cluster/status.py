"""Cluster mode's /healthz, /readyz and /status, beside /metrics as in single-box mode.

The documents have the single-box shape (:mod:`pipeline.daemon.status`; its stream rows, its
JSON) plus what only a member has: its name, the members it sees, and each partition it
owns with the input sequence applied and checkpointed. The member's state lives on its
asyncio loop, so a request (on the HTTP server's thread) is answered from a snapshot
taken on that loop; if the loop does not answer within ``timeout_s`` the request says
so instead of waiting.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.daemon.status import (
    HTML,
    JSON,
    PAGE,
    STATUS_TIMEOUT_S,
    Route,
    _counts,
    _json,
    stream_rows,
)

if TYPE_CHECKING:
    from pipeline.cluster.member import Member


class ClusterStatus:
    """What a member's HTTP endpoints report."""

    def __init__(
        self,
        member: Member,
        max_streams: int,
        timeout_s: float = STATUS_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._member = member
        self.max_streams = max_streams
        self._timeout_s = timeout_s
        self._clock = clock
        self._started = clock()

    def health(self) -> dict[str, Any]:
        return {"alive": True, "pid": os.getpid(), "uptime_s": self._uptime()}

    def readiness(self) -> dict[str, Any]:
        """Ready: connected to NATS and serving (joined the group; partitions follow)."""
        m = self._member
        checks = {
            "nats_connected": m.connected,
            "model_loaded": m.model is not None,
            "member_serving": m.started and not m.should_exit.is_set(),
        }
        return {"ready": all(checks.values()), "checks": checks}

    def status(self) -> dict[str, Any]:
        m = self._member
        spec = m.model.spec
        ready = self.readiness()
        doc: dict[str, Any] = {
            "model": {
                "name": spec.name,
                "version": spec.version,
                "task": spec.task,
                "path": str(m.model.path),
                "provider": m.model.provider,
                "features": list(spec.features),
            },
            "ready": ready["ready"],
            "checks": ready["checks"],
            "uptime_s": self._uptime(),
            "rejections": _counts(m.metrics.rejected.collect(), "reason"),
        }
        loop = m.loop
        if loop is None:
            doc["cluster"] = {"member": m.me, "error": "not started"}
            return doc
        try:
            doc.update(
                asyncio.run_coroutine_threadsafe(self._snapshot(), loop).result(self._timeout_s)
            )
        except Exception:
            doc["cluster"] = {"member": m.me, "error": f"no answer within {self._timeout_s:g} s"}
        return doc

    async def _snapshot(self) -> dict[str, Any]:
        """On the member's loop: its partitions and their newest streams."""
        m = self._member
        owned = sorted(m.owned.values(), key=lambda o: o.partition)
        return {
            "cluster": {
                "member": m.me,
                "group": m.cfg.group,
                "partitions": m.cfg.partitions,
                "members": sorted(m.live_seen()),
                "owned": [
                    {
                        "partition": o.partition,
                        "lease_revision": o.lease_rev,
                        "applied_seq": o.applied,
                        "checkpoint_seq": o.ckpt_seq,
                        "streams": o.engine.streams,
                    }
                    for o in owned
                ],
            },
            "streams": stream_rows((o.engine for o in owned), self.max_streams, self._clock()),
        }

    def _uptime(self) -> float:
        return round(self._clock() - self._started, 1)

    def routes(self) -> dict[str, Route]:
        """Path -> handler, for :class:`pipeline.telemetry.metrics.Exporter` (the same paths
        as single-box)."""

        def healthz() -> tuple[int, str, bytes]:
            return 200, JSON, _json(self.health())

        def readyz() -> tuple[int, str, bytes]:
            doc = self.readiness()
            return (200 if doc["ready"] else 503), JSON, _json(doc)

        def status() -> tuple[int, str, bytes]:
            return 200, JSON, _json(self.status())

        def page() -> tuple[int, str, bytes]:
            return 200, HTML, PAGE

        return {"/healthz": healthz, "/readyz": readyz, "/status": status, "/": page}
