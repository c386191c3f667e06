"""Throw-away fleets for tests, benchmarks, demos and simulations (in memory, no files)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from meshinfer.proto.identity import FleetAuthority, NodeIdentity, RevocationList
from meshinfer.runtime.session import Admission

DAY = 86400.0


@dataclass
class ThrowawayFleet:
    """A fleet authority plus enrolled identities; ``admission(node_id)`` gives session checks."""

    authority: FleetAuthority
    identities: dict[str, NodeIdentity] = field(default_factory=dict)
    revocations: RevocationList | None = None

    def __post_init__(self) -> None:
        if self.revocations is None:
            self.revocations = RevocationList(self.authority.fleet_id)

    def enroll(self, node_id: str, roles: Iterable[str] = ("vehicle",), **kw) -> NodeIdentity:
        now = kw.pop("now", time.time())
        lifetime = kw.pop("lifetime_s", DAY)
        ident = self.authority.enroll(
            node_id, roles, now=now, lifetime_s=lifetime, serial=len(self.identities) + 1, **kw
        )
        self.identities[node_id] = ident
        return ident

    def revoke(self, node_id: str, reason: str = "test") -> None:
        assert self.revocations is not None
        self.revocations = self.authority.revoke(
            self.revocations, now=time.time(), node_id=node_id, reason=reason
        )

    def admission(self, node_id: str) -> Admission:
        assert self.revocations is not None
        return Admission(self.identities[node_id], self.revocations)


def make_fleet(
    _unused_dir: Path | None = None,
    node_ids: Iterable[str] = ("alpha", "bravo"),
    *,
    fleet_id: str = "test-fleet",
    roles: Iterable[str] = ("vehicle",),
) -> ThrowawayFleet:
    """A new authority for ``fleet_id`` with every node in ``node_ids`` enrolled."""
    fleet = ThrowawayFleet(FleetAuthority.create(fleet_id))
    for node_id in node_ids:
        fleet.enroll(node_id, roles)
    return fleet
