"""Failure-detector bookkeeping: the probe round, relayed probes and the probe order.

One probe round per node at a time (SWIM)::

    start ──ping──▶ waiting-direct ──ack_deadline──▶ waiting-indirect ──round_deadline──▶ failed
              │               (ping-req to k relays + a 2nd ping)  │                    (suspect)
              └───────────── ack from target or a relay ──────────┴──▶ succeeded

An ack counts only from the probed node or from one of the relays asked for this round; any other
sender is an impersonation attempt. A relay answers a ping-req by pinging the target with a seq
of its own (a :class:`RelayedProbe`) and forwards the target's ack, or sends a nack once
``nack_fraction * probe_timeout`` passed without one. The time from the first ping to the ack
that ends a round is the round trip this node measures to the target (:class:`RoundTrips`).
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
    sent_at: float  # when the first ping went out
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


class RoundTrips:
    """Smoothed round trips to the members this node probed (what the latency scheduling
    policy ranks nodes by).

    A sample is the time from a round's first ping to the ack that ends it. An ack that comes
    after the indirect probes went out (through a relay, or answering the second direct ping of
    the same seq) gives an upper bound: a node that stops answering quickly reads as slow, never
    keeps its old fast figure. Samples are folded in by an exponential moving average with weight
    ``smoothing`` (TCP's SRTT, RFC 6298, uses 1/8; probes are rarer than segments, so a larger
    weight keeps the figure current).
    """

    def __init__(self, smoothing: float = 0.25) -> None:
        self._smoothing = smoothing
        self._rtt: dict[str, float] = {}

    def observe(self, node_id: str, seconds: float) -> None:
        """Fold one measured round trip to ``node_id`` in (a negative one, from a clock that
        went back, is ignored)."""
        if not seconds >= 0:
            return
        old = self._rtt.get(node_id)
        self._rtt[node_id] = seconds if old is None else old + self._smoothing * (seconds - old)

    def get(self, node_id: str) -> float | None:
        """The smoothed round trip to ``node_id`` in seconds, None if never measured."""
        return self._rtt.get(node_id)

    def keep_only(self, node_ids: set[str]) -> None:
        """Forget the figures of every node not in ``node_ids`` (members forgotten for good)."""
        for node_id in [n for n in self._rtt if n not in node_ids]:
            del self._rtt[node_id]

    def __len__(self) -> int:
        return len(self._rtt)


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
