"""Which member should own a partition: rendezvous (highest random weight) hashing.

Every member computes the same answer from the same member list, with no
coordination; adding or removing a member moves only the partitions it wins or held
(about 1/N of them), so a join or a leave never reshuffles the whole cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(member: str, partition: int) -> int:
    digest = hashlib.blake2b(f"{member}/{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(members: Iterable[str], partition: int) -> str | None:
    """The member that should own ``partition``; None when there is no member."""
    best: tuple[int, str] | None = None
    for m in members:
        w = (weight(m, partition), m)
        if best is None or w > best:
            best = w
    return None if best is None else best[1]


def share(members: Iterable[str], me: str, partitions: int) -> set[int]:
    """The partitions ``me`` should own among ``members`` (``me`` counted in)."""
    everyone = {*members, me}
    return {p for p in range(partitions) if owner(everyone, p) == me}
