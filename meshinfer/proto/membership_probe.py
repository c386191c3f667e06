"""Failure-detector bookkeeping: the probe round, relayed probes and the probe order.

One probe round per node at a time (SWIM)::

    start ──ping──▶ waiting-direct ──ack_deadline──▶ waiting-indirect ──round_deadline──▶ failed
              │               (ping-req to k relays + a 2nd ping)  │                    (suspect)
              └───────────── ack from target or a relay ──────────┴──▶ succeeded

An ack counts only from the probed node or from one of the relays asked for this round; any other
sender is an impersonation attempt. A relay answers a ping-req by pinging the target with a seq
of its own (a :class:`RelayedProbe`) and forwards the target's ack, or sends a nack once
``nack_fraction * probe_timeout`` passed without one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class ProbeRound:
    """The probe this node is running now."""

    seq: int
    target: str
    ack_deadline: float  # direct ack timeout: then ask relays
    round_deadline: float  # end of the round: then suspect the target
    relays: tuple[str, ...] = ()
    indirect_sent: bool = False
    nacks: set[str] = field(default_factory=set)

    def acknowledges(self, sender: str) -> bool:
        """Whether an ack for this round may come from ``sender``."""
        return sender == self.target or sender in self.relays

    def missed_nacks(self) -> int:
        """Lifeguard: relays that sent neither an ack nor a nack (1 if none were asked)."""
        return len(self.relays) - len(self.nacks) if self.relays else 1


@dataclass(slots=True, frozen=True)
class RelayedProbe:
    """A ping this node sent to ``target`` on behalf of ``requester``'s ping-req."""

    requester: str
    request_seq: int
    target: str
    nack_at: float


class ProbeOrder:
    """Shuffled round robin over the members: every member is probed once per pass."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._order: list[str] = []
        self._index = 0

    def add(self, node_id: str) -> None:
        """Insert a new member at a random place in the rest of this pass."""
        self._order.insert(self._rng.randint(self._index, len(self._order)), node_id)

    def next(
        self, is_probeable: Callable[[str], bool], members: Callable[[], list[str]]
    ) -> str | None:
        """The next probeable node id; starts a fresh shuffled pass over ``members()`` when this
        pass is used up. None when there is nobody to probe."""
        for _ in range(2):
            while self._index < len(self._order):
                node_id = self._order[self._index]
                self._index += 1
                if is_probeable(node_id):
                    return node_id
            self._order = members()
            self._rng.shuffle(self._order)
            self._index = 0
        return None
