"""The member store: the members a table holds, how they are read out, and digest anti-entropy.

:class:`MemberStore` keeps the members (this node's record apart), each member's ALIVE record
encoded once, and answers the queries of the failure detector (who is live, random picks) and
of anti-entropy (the whole table as records, a digest, the records a digest lacks). It changes
nothing by itself but through :meth:`MemberStore._store`, :meth:`MemberStore._replace`,
:meth:`MemberStore._remove` and :meth:`MemberStore._set_local`, which keep what is derived from
the members in step with them (the encoded records, the live count, the random-pick list); the
rules that decide those changes are :class:`~meshinfer.proto.membership_table.MemberTable`'s,
which reads the members through the queries (``get``, ``knows``, ``live_members``...) and
writes none of this state itself.

Digests. Periodic anti-entropy compares tables before it sends records. A digest lists one entry
per member, :func:`~meshinfer.proto.membership_member.entry_of`: its status (as a record kind),
liveness incarnation and newest ALIVE record's key (each kept encoded until the member changes:
a ``Member`` is immutable, so the cached snapshot's identity says whether it is current). Two
tables with equal entries for a member hold the same records about it, since a signed ALIVE
record is fixed by its ``(incarnation, version)``. :meth:`MemberStore.reconcile` answers a
digest with the records the digest lacked or listed otherwise (not the gone it lacks, which
merge would skip) and the ids whose records this table wants: those listed otherwise (this
node's own included, so a claim about it is refuted) and live members it lacks while it has
room. The other side sends those (:meth:`MemberStore.records_for`) and both have merged what a
whole-table exchange would have given them. A digest cut short by the decoder (more entries than
``max_packet_records()``: a sender with a larger table, or a hostile one) says nothing of the
members past the cut, so the reply then carries records only about members it listed: it is
never the whole table for a digest the sender could not even fit.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_member import (
    LIVE,
    LIVE_KINDS,
    Member,
    MemberStatus,
    entry_of,
    status_record,
)
from meshinfer.proto.membership_wire import (
    DigestEntry,
    LeftRecord,
    encode_entry,
    encode_record,
)


class MemberStore:
    """The members (this node apart), their encoded records and digest entries, and queries."""

    def __init__(self, config: MembershipConfig, rng: random.Random, local: Member) -> None:
        self.config = config
        self.rng = rng
        self._members: dict[str, Member] = {}
        self._ids: list[str] = []  # same keys as _members, for O(1) random picks
        self._encoded: dict[str, bytes] = {}  # each member's ALIVE record, encoded
        #: each member's digest entry, encoded, with the snapshot it was made from
        self._entries: dict[str, tuple[Member, DigestEntry, bytes]] = {}
        self._live = 1  # live members, this node included
        self._left_signature = b""  # this node's signature on its LEFT record, once it left
        self.local = local
        self.local_bytes = encode_record(local.record)

    # --- queries ---------------------------------------------------------------------------

    @property
    def local_id(self) -> str:
        """This node's id."""
        return self.local.node_id

    @property
    def has_left(self) -> bool:
        """Whether this node left the cluster."""
        return self.local.status is MemberStatus.LEFT

    def get(self, node_id: str) -> Member | None:
        """The member ``node_id`` (not this node), if known."""
        return self._members.get(node_id)

    def knows(self, node_id: str) -> bool:
        """Whether ``node_id`` is a held member (this node is none)."""
        return node_id in self._members

    def members(self) -> list[Member]:
        """All known members but this node, in any status."""
        return list(self._members.values())

    def live_members(self) -> list[Member]:
        """The alive and suspect members (this node excluded)."""
        return [m for m in self._members.values() if m.status in LIVE]

    def gone_members(self) -> list[Member]:
        """The dead and left members, not yet forgotten."""
        return [m for m in self._members.values() if m.status not in LIVE]

    def live_count(self) -> int:
        """n: alive and suspect members, this node included."""
        return self._live

    def is_probeable(self, node_id: str) -> bool:
        """Whether ``node_id`` is a live member (a probe target)."""
        member = self._members.get(node_id)
        return member is not None and member.status in LIVE

    def is_full(self) -> bool:
        """Whether the table holds ``max_members`` members (this node included)."""
        return len(self._members) + 1 >= self.config.max_members

    def live_ids(self) -> list[str]:
        """Ids of the live members (this node excluded)."""
        return [m.node_id for m in self.live_members()]

    def retransmit_limit(self) -> int:
        """How many times each queued update is sent, for the current n."""
        return self.config.retransmit_limit(self._live)

    def sample(self, k: int, eligible: Callable[[Member], bool]) -> list[str]:
        """Up to ``k`` distinct random members for which ``eligible`` holds."""
        ids, chosen = self._ids, []
        if len(ids) > 4 * k:
            for _ in range(8 * k):
                member = self._members[ids[self.rng.randrange(len(ids))]]
                if member.node_id not in chosen and eligible(member):
                    chosen.append(member.node_id)
                    if len(chosen) == k:
                        return chosen
        pool = [node_id for node_id in ids if eligible(self._members[node_id])]
        return self.rng.sample(pool, min(k, len(pool)))

    # --- records, for push-pull ------------------------------------------------------------

    def encoded_table(self) -> list[bytes]:
        """Every member (this node first) as encoded records, for push-pull."""
        out = self._local_records()
        for member in self._members.values():
            out += self._records_of(member)
        return out

    def records_for(self, node_ids: Iterable[str]) -> list[bytes]:
        """The encoded records about ``node_ids`` (this node's included), unknown ids skipped."""
        out: list[bytes] = []
        for node_id in dict.fromkeys(node_ids):
            if node_id == self.local_id:
                out += self._local_records()
            elif (member := self._members.get(node_id)) is not None:
                out += self._records_of(member)
        return out

    def _local_records(self) -> list[bytes]:
        if not self.has_left:
            return [self.local_bytes]
        left = LeftRecord(self.local_id, self.local.incarnation, self._left_signature)
        return [self.local_bytes, encode_record(left)]

    def _records_of(self, member: Member) -> list[bytes]:
        """A member's ALIVE record, and its status record when it is not alive."""
        data = self._alive_bytes(member)
        if member.status is MemberStatus.ALIVE:
            return [data]
        return [data, encode_record(status_record(member))]

    # --- anti-entropy by digest (see "Digests" in the module docstring) --------------------

    def digest(self) -> list[bytes]:
        """Every member (this node first) as an encoded digest entry."""
        return [self._entry(self.local)[1]] + [
            self._entry(member)[1] for member in self._members.values()
        ]

    def _entry(self, member: Member) -> tuple[DigestEntry, bytes]:
        """``member``'s digest entry and its encoding, made once per snapshot."""
        cached = self._entries.get(member.node_id)
        if cached is not None and cached[0] is member:
            return cached[1], cached[2]
        entry = entry_of(member)
        data = encode_entry(entry)
        self._entries[member.node_id] = (member, entry, data)
        return entry, data

    def reconcile(
        self, entries: Iterable[DigestEntry], *, truncated: bool = False
    ) -> tuple[list[bytes], list[str]]:
        """Compare a remote digest with this table: the encoded records to send back (members
        it lacks or lists otherwise) and the node ids whose records to ask for (members it
        lists otherwise, or that this table lacks and would learn). A ``truncated`` digest
        (cut by the decoder) may list past the cut any member it lacks here: only members it
        listed are answered then."""
        theirs: dict[str, DigestEntry] = {}
        for entry in entries:
            theirs.setdefault(entry.node_id, entry)
        send: list[bytes] = []
        wants: list[str] = []
        local = theirs.get(self.local_id)
        if local != self._entry(self.local)[0] and (local is not None or not truncated):
            send += self._local_records()
            if local is not None:  # what it holds about us may need refuting
                wants.append(self.local_id)
        for member in self._members.values():
            entry = theirs.get(member.node_id)
            if entry is None:
                if member.status in LIVE and not truncated:  # as merge: no learning the gone
                    send += self._records_of(member)
            elif entry != self._entry(member)[0]:
                send += self._records_of(member)
                wants.append(member.node_id)
        room = self.config.max_members - 1 - len(self._members)
        for node_id, entry in theirs.items():
            if room <= 0:
                break
            if entry.status in LIVE_KINDS and node_id not in self._members:
                if node_id != self.local_id:  # as merge: the gone are not learned
                    wants.append(node_id)
                    room -= 1
        return send, wants

    # --- changes (the table's rules decide them) -------------------------------------------

    def _held(self, node_id: str) -> Member:
        """A member the table's own bookkeeping names (a suspicion timer): KeyError otherwise."""
        return self._members[node_id]

    def _alive_bytes(self, member: Member) -> bytes:
        """A held member's ALIVE record, encoded (once per record: the one encoder path)."""
        data = self._encoded[member.node_id]
        if not data:
            data = self._encoded[member.node_id] = encode_record(member.record)
        return data

    def _store(self, member: Member) -> None:
        """Hold a new member (its ALIVE record is encoded on first use)."""
        self._members[member.node_id] = member
        self._encoded[member.node_id] = b""
        self._ids.append(member.node_id)
        self._live += member.status in LIVE

    def _replace(self, member: Member) -> None:
        """Hold ``member`` as the new snapshot of a held member: the live count follows its
        status, and its encoded ALIVE record is made anew if its record changed."""
        old = self._members[member.node_id]
        self._members[member.node_id] = member
        self._live += (member.status in LIVE) - (old.status in LIVE)
        if member.record is not old.record:
            self._encoded[member.node_id] = b""

    def _set_local(self, local: Member, left_signature: bytes = b"") -> None:
        """This node's new snapshot (its encoded record follows a new record), and its
        signature on its LEFT record once it left."""
        if local.record is not self.local.record:
            self.local_bytes = encode_record(local.record)
        self.local = local
        self._left_signature = left_signature

    def _remove(self, node_id: str) -> None:
        """Drop a member and all that was derived from it."""
        member = self._members.pop(node_id)
        del self._encoded[node_id]
        self._entries.pop(node_id, None)
        self._live -= member.status in LIVE
        index = self._ids.index(node_id)
        self._ids[index] = self._ids[-1]
        self._ids.pop()
