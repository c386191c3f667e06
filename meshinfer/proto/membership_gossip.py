"""Piggybacked dissemination: the transmit-limited broadcast queue.

Every update a node learns (or makes) is queued once and rides on outgoing pings, acks and gossip
packets until it has been sent ``retransmit_limit(n)`` times. Packing is greedy under a byte
budget, least-transmitted first and, among equals, newest first, so fresh news overtakes news
that most of the cluster already has.

A node has at most two queued updates: its ALIVE record (its state) and its liveness status
(SUSPECT/DEAD/LEFT). A newer update replaces the queued one of the same family, so the queue
never carries stale news about a node; a refuting ALIVE also removes the queued status.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: The smallest encoded record; below this much room no record can fit.
MIN_RECORD_BYTES = 8


class UpdateFamily(enum.IntEnum):
    """Which slot of a node an update occupies in the queue."""

    RECORD = 0  # ALIVE: the node's own state record
    STATUS = 1  # SUSPECT / DEAD / LEFT


@dataclass(slots=True)
class _Broadcast:
    data: bytes
    transmits: int
    order: int


class BroadcastQueue:
    """Encoded updates waiting to be piggybacked, at most one per (node, family)."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, UpdateFamily], _Broadcast] = {}
        self._counter = 0

    def __len__(self) -> int:
        return len(self._items)

    def enqueue(self, node_id: str, family: UpdateFamily, data: bytes) -> None:
        """Queue ``data`` (one encoded record), replacing the queued update of the same slot."""
        self._counter += 1
        self._items[(node_id, family)] = _Broadcast(data, 0, self._counter)

    def has(self, node_id: str, family: UpdateFamily) -> bool:
        """Whether an update for this slot is still queued."""
        return (node_id, family) in self._items

    def drop(self, node_id: str, family: UpdateFamily) -> None:
        """Forget the queued update of one slot, if any."""
        self._items.pop((node_id, family), None)

    def clear(self) -> None:
        """Forget everything queued."""
        self._items.clear()

    def take(self, budget: int, limit: int, *, packet_room: int | None = None) -> list[bytes]:
        """Pick updates fitting ``budget`` bytes, count one transmit each, retire those at
        ``limit`` transmits. Returns the encoded records. The first-ranked update goes even
        if it is larger than ``budget``, alone, when it is larger than ``packet_room`` too
        (the room of a packet that carries nothing else; default ``budget``): a record may be
        (a full state and a certificate: ~1.75 KB against the default budget of 1,400 B), and
        skipped on every packet it would spread only by push-pull (a packet travels over a
        session, up to 64 KiB, not in one network frame). One that some packet could fit
        waits for a packet with the room."""
        if not self._items or budget < MIN_RECORD_BYTES:
            return []
        room = budget if packet_room is None else packet_room
        chosen: list[bytes] = []
        ranked = sorted(self._items.items(), key=lambda kv: (kv[1].transmits, -kv[1].order))
        for slot, item in ranked:
            if len(item.data) > budget:
                if chosen or len(item.data) <= room:
                    continue
                budget = 0  # (alone: nothing else joins it)
            chosen.append(item.data)
            budget -= len(item.data)
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[slot]
            if budget < MIN_RECORD_BYTES:
                break
        return chosen
