"""The member table: who is alive, suspect, dead or left, and the rules that change it.

Theory of operation
-------------------
Every member has a *liveness incarnation* ``i`` and the latest ALIVE record it signed (its state,
ordered by ``(incarnation, version)``). A received record about member Y is applied in two
independent steps:

1. *State* (ALIVE records only): a record with a larger ``(incarnation, version)`` replaces the
   stored one (UPDATED while Y is alive) and is re-broadcast; an older or equal one is dropped.
2. *Liveness*: the transition table :data:`LIVENESS` maps (Y's status, record kind) to the
   incarnation the claim needs (``>`` or ``>=`` than ``i``) and the resulting status. Pairs not
   in the table are ignored: nothing but an ALIVE with a *higher* incarnation brings a suspect,
   dead or left member back, and suspicion or death never overrides a departure.

Claims about this node itself never change the local record: a SUSPECT/DEAD (or a LEFT from an
earlier life) at ``j >= i`` is *refuted* by re-announcing ALIVE at ``j + 1``; an ALIVE record about
us newer than ours (we restarted and forgot) is outbid the same way. That is how a restarted
node, which starts at incarnation 0, learns its old incarnation from the others and bumps past it.

Impersonation rule. The sender of a packet is the node id its session authenticated. ALIVE and
LEFT records are self-claims: only the node they are about may author them. With a
:class:`~meshinfer.proto.membership_auth.RecordAuthenticator` each is signed by its subject and a
record whose signature does not verify for the claimed node id is refused and counted
(``impersonations_refused``), whoever relays it; an honest relay verifies before it re-gossips,
so a refused record marks its sender as the forger. The daemons' authenticator also refuses (and
counts the same way) an ALIVE record whose state announces a Noise static key other than the
one its author's certificate binds, and one proven by a certificate outside its validity window
(see :class:`~meshinfer.proto.membership_auth.CertifiedRecordAuthenticator`, whose ``refusals``
gives the reasons). Without an authenticator relays are trusted
(admission already limits the mesh to fleet members). SUSPECT and DEAD claims about others are
plain gossip and are accepted from anyone; they cannot raise an incarnation above the member's
own newest ALIVE record (a claim above it is applied at that incarnation and counted,
``claims_ahead``), so the worst a liar achieves is a refutation (or, for a real crash, an
earlier death). Nor does a node refute a claim about itself that only an incarnation above
``MAX_COUNTER`` would answer (no decoder takes that ALIVE record, nor any packet carrying it:
one such claim sent to a node would cut it out of the mesh for good). The accuser named in a
SUSPECT is not authenticated: a forged one can shrink a suspicion timeout to its minimum but
never below. Acks are checked by the probe round (see :mod:`membership_probe`).

Expired certificates. A record stays valid only while the certificate proving it does: a
member whose certificate expired (beyond the clock skew) can sign no record any node takes, so
its last one would otherwise stay in every table that held it, probed, relayed in push-pulls and
refused by each node that lacks it, for ever. :meth:`MemberTable.expire_certificates` (run every
``certificate_check_interval``) declares such live members dead, as a failed probe would: the
DEAD news spreads, the record is no longer relayed to tables that lack the member (the gone are
not learned), and the member is forgotten after ``dead_node_reclaim_time``. Its refutation,
signed under the same certificate, is refused; once re-enrolled, its ALIVE record under the new
certificate at a higher incarnation brings it back. The authenticator counts each as a refusal
``expired``.

Revoked certificates. A record is checked against the revocation list when it arrives; one
held from before its certificate was revoked would stay, as an expired one would. The table
learns of a newer list from the local state (``revocation_version``, which the runtime's
revocation sync raises once the merged list is in force): the next certificate check then
verifies every live member's newest record again (one signature check each, once per newer
list) and declares dead those that no longer verify, as above (refusals ``revoked``). Their
refutations under the same certificate are refused; a re-enrolled member comes back under its
new certificate. The check waits for the next period rather than the state update, so that the
runtime's cut of the revoked sessions, which names the revocation, comes first.

Stale-claim correction. A SUSPECT or DEAD claim at an incarnation the subject has already
refuted means its sender missed the refutation (an honest node drops a queued suspicion once the
refutation arrives). The receiver then sends the refuting ALIVE record straight back
(:attr:`MemberTable.corrections`), so one lost refutation does not turn into a false death when
the sender's suspicion times out. To make sure such a sender hears of it, a node echoes one
of the suspicions it holds on each probe it sends (:meth:`MemberTable.suspicion_notice`).

Anti-entropy (push-pull) merges are conservative: a remote DEAD is applied as SUSPECT (we check
for ourselves), and members that the remote side lists only as dead or left are not learned.

Digests. Periodic anti-entropy compares tables before it sends records. A digest lists one entry
per member, :func:`_entry_of`: its status (as a record kind), liveness incarnation and newest ALIVE
record's key (each kept encoded until the member changes: a ``Member`` is immutable, so the
cached snapshot's identity says whether it is current). Two tables with equal entries for a
member hold the same records about it, since a signed ALIVE record is fixed by its
``(incarnation, version)``. :meth:`MemberTable.reconcile`
answers a digest with the records the digest lacked or listed otherwise (not the gone it lacks,
which merge would skip) and the ids whose records this table wants: those listed otherwise (this
node's own included, so a claim about it is refuted) and live members it lacks while it has room.
The other side sends those (:meth:`MemberTable.records_for`) and both have merged what a
whole-table exchange would have given them. A digest cut short by the decoder (more entries than
``max_packet_records()``: a sender with a larger table, or a hostile one) says nothing of the
members past the cut, so the reply then carries records only about members it listed: it is
never the whole table for a digest the sender could not even fit.

Table cap. Without record signatures any member may invent node ids (node daemons sign, so there
each node id needs a fleet certificate; simulations may not), so the table holds at most
``config.max_members`` members (this node included, in any status): an ALIVE record about a
node id the full table does not know is refused and counted (``members_refused``) before any
signature check. Known members are never evicted for a newcomer; the dead and left free their
room when they are forgotten. An invented member that got in is probed like any other, suspected
and forgotten after ``dead_node_reclaim_time``.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshinfer.errors import LocalProtocolError
from meshinfer.proto.membership_auth import RecordAuthenticator
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_gossip import BroadcastQueue, UpdateFamily
from meshinfer.proto.membership_suspicion import LocalHealth, SuspicionTimer
from meshinfer.proto.membership_wire import (
    MAX_COUNTER,
    MAX_STATE_BYTES,
    AliveRecord,
    DeadRecord,
    DigestEntry,
    LeftRecord,
    NodeState,
    Record,
    RecordKind,
    SuspectRecord,
    encode_entry,
    encode_record,
    encode_state,
    signed_body,
)


class MemberStatus(enum.Enum):
    """Liveness of a member as this node sees it."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


class MemberEventKind(enum.Enum):
    """What happened to a member."""

    JOINED = "joined"  # first heard of (or heard of again after being forgotten)
    SUSPECT = "suspect"
    ALIVE = "alive"  # back from suspect, dead or left, at a higher incarnation
    DEAD = "dead"
    LEFT = "left"
    UPDATED = "updated"  # a live member's state changed
    FORGOTTEN = "forgotten"  # dropped from the table dead_node_reclaim_time after death


_GT, _GE = True, False
#: (status, claim) -> (claim must carry a strictly higher incarnation?, new status).
LIVENESS: dict[tuple[MemberStatus, RecordKind], tuple[bool, MemberStatus]] = {
    (MemberStatus.ALIVE, RecordKind.ALIVE): (_GT, MemberStatus.ALIVE),
    (MemberStatus.ALIVE, RecordKind.SUSPECT): (_GE, MemberStatus.SUSPECT),
    (MemberStatus.ALIVE, RecordKind.DEAD): (_GE, MemberStatus.DEAD),
    (MemberStatus.ALIVE, RecordKind.LEFT): (_GE, MemberStatus.LEFT),
    (MemberStatus.SUSPECT, RecordKind.ALIVE): (_GT, MemberStatus.ALIVE),
    (MemberStatus.SUSPECT, RecordKind.SUSPECT): (_GE, MemberStatus.SUSPECT),
    (MemberStatus.SUSPECT, RecordKind.DEAD): (_GE, MemberStatus.DEAD),
    (MemberStatus.SUSPECT, RecordKind.LEFT): (_GE, MemberStatus.LEFT),
    (MemberStatus.DEAD, RecordKind.ALIVE): (_GT, MemberStatus.ALIVE),
    (MemberStatus.DEAD, RecordKind.LEFT): (_GE, MemberStatus.LEFT),
    (MemberStatus.LEFT, RecordKind.ALIVE): (_GT, MemberStatus.ALIVE),
}
_KIND = {
    AliveRecord: RecordKind.ALIVE,
    SuspectRecord: RecordKind.SUSPECT,
    DeadRecord: RecordKind.DEAD,
    LeftRecord: RecordKind.LEFT,
}
_EVENT_FOR = {
    MemberStatus.ALIVE: MemberEventKind.ALIVE,
    MemberStatus.SUSPECT: MemberEventKind.SUSPECT,
    MemberStatus.DEAD: MemberEventKind.DEAD,
    MemberStatus.LEFT: MemberEventKind.LEFT,
}
_LIVE = (MemberStatus.ALIVE, MemberStatus.SUSPECT)


@dataclass(frozen=True, slots=True)
class Member:
    """One member as this node sees it (an immutable snapshot)."""

    node_id: str
    status: MemberStatus
    incarnation: int  # liveness incarnation: the highest accepted claim
    record: AliveRecord  # the newest state record the member signed
    since: float  # when the status last changed
    accuser: str = ""  # who suspected it / declared it dead
    left_signature: bytes = b""  # the member's signature on its LEFT record

    @property
    def state(self) -> NodeState:
        """The member's gossiped state (address, static key, models, load...)."""
        return self.record.state

    @property
    def version(self) -> int:
        """The member's own state counter."""
        return self.record.version

    @property
    def is_live(self) -> bool:
        """Alive or suspect (still probed, still counted in n)."""
        return self.status in _LIVE


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A change in membership, for the application (peer manager, scheduler)."""

    kind: MemberEventKind
    member: Member
    at: float


@dataclass(slots=True)
class MembershipCounters:
    """Monotonic counters for metrics and tests."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    probes: int = 0
    indirect_probes: int = 0
    probe_failures: int = 0
    suspicions: int = 0
    deaths_declared: int = 0
    refutations: int = 0
    impersonations_refused: int = 0
    #: SUSPECT/DEAD claims above the subject's own newest ALIVE incarnation (lowered to it),
    #: and claims about this node that only an incarnation over MAX_COUNTER could refute
    claims_ahead: int = 0
    misdirected_pings: int = 0
    late_acks: int = 0
    push_pulls: int = 0  # push-pull packets received (whole tables, or a digest's last step)
    digests: int = 0  # digests answered (the first step of digest anti-entropy)
    #: ALIVE records about node ids a full table (``max_members``) did not know
    members_refused: int = 0
    #: packets that carried more than ``max_packet_records()`` records (the rest was dropped)
    packets_truncated: int = 0


class MemberTable:
    """The members, the local record, the suspicion timers and the broadcast queue."""

    def __init__(
        self,
        local: AliveRecord,
        config: MembershipConfig,
        rng: random.Random,
        now: float,
        authenticator: RecordAuthenticator | None = None,
        counters: MembershipCounters | None = None,
    ) -> None:
        self.config = config
        self.rng = rng
        self.authenticator = authenticator
        self.counters = counters or MembershipCounters()
        self.health = LocalHealth(config.awareness_max_multiplier)
        self.broadcasts = BroadcastQueue()
        self.events: list[MemberEvent] = []
        #: Encoded ALIVE records that refute stale claims just received (for the sender).
        self.corrections: list[bytes] = []
        self.on_new_member: Callable[[str], None] = lambda node_id: None
        self._members: dict[str, Member] = {}
        self._ids: list[str] = []  # same keys as _members, for O(1) random picks
        self._encoded: dict[str, bytes] = {}  # each member's ALIVE record, encoded
        #: each member's digest entry, encoded, with the snapshot it was made from
        self._entries: dict[str, tuple[Member, DigestEntry, bytes]] = {}
        self._suspicions: dict[str, SuspicionTimer] = {}
        self._suspicion_deadline: float | None = None  # cached min of the deadlines
        self._live = 1  # live members, this node included
        self._left_signature = b""
        self._revocations_grew = False  # the local state announced a newer list: judge again
        self.reap_at = float("inf")  # when reap() has work next
        self.local = Member(
            local.node_id, MemberStatus.ALIVE, local.incarnation, self._sign(local), now
        )
        self.local_bytes = encode_record(self.local.record)

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

    def members(self) -> list[Member]:
        """All known members but this node, in any status."""
        return list(self._members.values())

    def live_count(self) -> int:
        """n: alive and suspect members, this node included."""
        return self._live

    def is_probeable(self, node_id: str) -> bool:
        """Whether ``node_id`` is a live member (a probe target)."""
        member = self._members.get(node_id)
        return member is not None and member.status in _LIVE

    def is_full(self) -> bool:
        """Whether the table holds ``max_members`` members (this node included)."""
        return len(self._members) + 1 >= self.config.max_members

    def live_ids(self) -> list[str]:
        """Ids of the live members (this node excluded)."""
        return [m.node_id for m in self._members.values() if m.status in _LIVE]

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

    def suspicion_notice(self, node_id: str) -> list[bytes]:
        """What a probe of ``node_id`` carries first: if it is suspect, its suspicion (Lifeguard
        buddy system: it learns of it and refutes in its ack); otherwise one random suspicion
        we hold (an echo: a receiver that saw the refutation corrects us)."""
        member = self._members.get(node_id)
        if member is None or member.status is not MemberStatus.SUSPECT:
            if not self._suspicions:
                return []
            member = self._members[self.rng.choice(list(self._suspicions))]
        return [encode_record(_status_record(member))]

    def encoded_table(self) -> list[bytes]:
        """Every member (this node first) as encoded records, for push-pull."""
        out = self._local_records()
        for member in self._members.values():
            out += self._records_of(member)
        return out

    def _local_records(self) -> list[bytes]:
        if not self.has_left:
            return [self.local_bytes]
        left = LeftRecord(self.local_id, self.local.incarnation, self._left_signature)
        return [self.local_bytes, encode_record(left)]

    def _records_of(self, member: Member) -> list[bytes]:
        """A member's ALIVE record, and its status record when it is not alive."""
        data = self._encoded[member.node_id]
        if not data:
            data = self._encoded[member.node_id] = encode_record(member.record)
        if member.status is MemberStatus.ALIVE:
            return [data]
        return [data, encode_record(_status_record(member))]

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
        entry = _entry_of(member)
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
                if member.status in _LIVE and not truncated:  # as merge: no learning the gone
                    send += self._records_of(member)
            elif entry != self._entry(member)[0]:
                send += self._records_of(member)
                wants.append(member.node_id)
        room = self.config.max_members - 1 - len(self._members)
        for node_id, entry in theirs.items():
            if room <= 0:
                break
            if entry.status in _LIVE_KINDS and node_id not in self._members:
                if node_id != self.local_id:  # as merge: the gone are not learned
                    wants.append(node_id)
                    room -= 1
        return send, wants

    def records_for(self, node_ids: Iterable[str]) -> list[bytes]:
        """The encoded records about ``node_ids`` (this node's included), unknown ids skipped."""
        out: list[bytes] = []
        for node_id in dict.fromkeys(node_ids):
            if node_id == self.local_id:
                out += self._local_records()
            elif (member := self._members.get(node_id)) is not None:
                out += self._records_of(member)
        return out

    # --- local changes ---------------------------------------------------------------------

    def add_known(self, records: Iterable[AliveRecord], now: float) -> None:
        """Seed the table with trusted records (warm start): no events, no broadcasts; those
        past ``max_members`` are refused like received ones."""
        members, local_id = self._members, self.local_id
        for record in records:
            if record.node_id != local_id and record.node_id not in members:
                if self.is_full():
                    self.counters.members_refused += 1
                    continue
                member = Member(record.node_id, MemberStatus.ALIVE, record.incarnation, record, now)
                self._store(member, b"")  # encoded on first use; probed from the next pass on

    def update_local_state(self, state: NodeState, now: float) -> None:
        """Publish a new local state with the next version."""
        if self.has_left:
            raise LocalProtocolError("membership: cannot update state after leaving")
        if len(encode_state(state)) > MAX_STATE_BYTES:
            raise LocalProtocolError(f"membership: node state over {MAX_STATE_BYTES} bytes")
        record = self.local.record
        if state.revocation_version != record.state.revocation_version:
            self._revocations_grew = True  # judged at the next certificate check
        self._publish(record.incarnation, record.version + 1, state, now)

    def leave(self, now: float) -> None:
        """Mark this node LEFT at the next incarnation and queue the announcement."""
        incarnation = min(self.local.incarnation + 1, MAX_COUNTER)  # LEFT wins at >=
        left = LeftRecord(self.local_id, incarnation)
        self._left_signature = self._signature(left)
        self.local = Member(self.local_id, MemberStatus.LEFT, incarnation, self.local.record, now)
        self.broadcasts.drop(self.local_id, UpdateFamily.RECORD)
        left = LeftRecord(self.local_id, incarnation, self._left_signature)
        self.broadcasts.enqueue(self.local_id, UpdateFamily.STATUS, encode_record(left))

    def leave_announced(self) -> bool:
        """Whether the LEFT announcement was sent its full number of times."""
        return self.has_left and not self.broadcasts.has(self.local_id, UpdateFamily.STATUS)

    def suspect(self, node_id: str, now: float) -> None:
        """Our own probe of ``node_id`` failed: suspect it at its current incarnation."""
        member = self._members.get(node_id)
        if member is not None:
            self.apply(SuspectRecord(node_id, member.incarnation, self.local_id), now)

    def expire_suspicions(self, now: float) -> None:
        """Declare dead every suspect whose Lifeguard timeout ran out."""
        if self.next_suspicion_deadline() > now:
            return
        expired = [n for n, timer in self._suspicions.items() if timer.deadline <= now]
        for node_id in expired:
            member = self._members[node_id]
            self.counters.deaths_declared += 1
            self.apply(DeadRecord(node_id, member.incarnation, self.local_id), now)

    def expire_certificates(self, now: float) -> None:
        """Declare dead every live member whose newest record's certificate has expired, or
        was revoked since the record was accepted when the local state announced a newer
        revocation list since the last check (see "Expired certificates" and "Revoked
        certificates" in the module docstring); a no-op unless :attr:`checks_certificates`."""
        if not self.checks_certificates:
            return
        if self._revocations_grew:
            self._revocations_grew = False
            self._expire_revoked(now)
        expired = self.authenticator.expired  # type: ignore[union-attr]
        live = [m for m in self._members.values() if m.status in _LIVE]
        for member in [m for m in live if expired(m.record.signature)]:
            self._declare_unproven(member, now)

    def _expire_revoked(self, now: float) -> None:
        """Declare dead every live member whose newest record no longer verifies (its
        certificate revoked since); the authenticator counts each by its refusal's reason."""
        verify = self.authenticator.verify  # type: ignore[union-attr]
        live = [m for m in self._members.values() if m.status in _LIVE]
        for member in live:
            record = member.record
            if not verify(member.node_id, signed_body(record), record.signature):
                self._declare_unproven(member, now)

    def _declare_unproven(self, member: Member, now: float) -> None:
        """``member``'s record is no longer proven (expired or revoked certificate): declare
        it dead, as a failed probe would, and relay the record no further."""
        self.broadcasts.drop(member.node_id, UpdateFamily.RECORD)
        self.apply(DeadRecord(member.node_id, member.incarnation, self.local_id), now)

    @property
    def checks_certificates(self) -> bool:
        """Whether :meth:`expire_certificates` has anything to do: the authenticator judges
        certificates against a wall clock (``judges_validity``) and held records (``expired``)."""
        return self.authenticator is not None and self.authenticator.judges_validity

    def next_suspicion_deadline(self) -> float:
        """The earliest suspicion deadline (inf when nobody is suspected)."""
        if self._suspicion_deadline is None:
            timers = self._suspicions.values()
            self._suspicion_deadline = min((t.deadline for t in timers), default=float("inf"))
        return self._suspicion_deadline

    def reap(self, now: float) -> None:
        """Forget members dead or left for ``dead_node_reclaim_time`` (sets ``reap_at``)."""
        keep = self.config.dead_node_reclaim_time
        next_at = float("inf")
        for member in [m for m in self._members.values() if m.status not in _LIVE]:
            if member.since + keep <= now:
                self._remove(member.node_id)
                self.events.append(MemberEvent(MemberEventKind.FORGOTTEN, member, now))
            else:
                next_at = min(next_at, member.since + keep)
        self.reap_at = next_at

    # --- received records ------------------------------------------------------------------

    def apply(self, record: Record, now: float, *, push_pull: bool = False) -> None:
        """Apply one record (received, or made here) by the rules in the module docstring."""
        if record.node_id == self.local_id:
            self._about_local(record, now)
            return
        if isinstance(record, DeadRecord) and push_pull:
            record = SuspectRecord(record.node_id, record.incarnation, record.accuser)
        member = self._members.get(record.node_id)
        if isinstance(record, SuspectRecord | DeadRecord) and member is not None:
            if record.incarnation > member.record.incarnation:  # the member never reached it
                self.counters.claims_ahead += 1
                record = type(record)(record.node_id, member.record.incarnation, record.accuser)
            self._correct_stale(member, record)
        if isinstance(record, AliveRecord):
            if member is None:
                self._learn(record, now)
                return
            if record.key <= member.record.key or not self._authentic(record):
                return
            member = self._new_record(member, record, now)
        elif member is None:
            return
        self._liveness(member, record, now)

    def merge(self, records: Iterable[Record], now: float) -> None:
        """Apply a remote member table (push-pull): members listed only as gone are skipped, and
        of several ALIVE records about one member only the newest is applied (one signature
        check per member, however many versions a hostile table lists)."""
        records = list(records)
        gone = {r.node_id for r in records if isinstance(r, DeadRecord | LeftRecord)}
        newest: dict[str, AliveRecord] = {}
        for record in records:
            if isinstance(record, AliveRecord):
                seen = newest.get(record.node_id)
                if seen is None or record.key > seen.key:
                    newest[record.node_id] = record
        for record in records:
            if isinstance(record, AliveRecord):
                if newest[record.node_id] is not record:
                    continue
                unknown = record.node_id not in self._members and record.node_id != self.local_id
                if unknown and record.node_id in gone:
                    continue
            self.apply(record, now, push_pull=True)

    def _correct_stale(self, member: Member, claim: SuspectRecord | DeadRecord) -> None:
        """The sender still suspects a member we know refuted: send it the refutation."""
        if member.status is MemberStatus.ALIVE and member.record.incarnation > claim.incarnation:
            data = self._encoded[member.node_id] or encode_record(member.record)
            self.corrections.append(data)

    def _learn(self, record: AliveRecord, now: float) -> None:
        if self.is_full():  # see "Table cap" in the module docstring
            self.counters.members_refused += 1
            return
        if not self._authentic(record):
            return
        member = Member(record.node_id, MemberStatus.ALIVE, record.incarnation, record, now)
        data = encode_record(record)
        self._store(member, data)
        self.on_new_member(record.node_id)
        self.events.append(MemberEvent(MemberEventKind.JOINED, member, now))
        self.broadcasts.enqueue(record.node_id, UpdateFamily.RECORD, data)

    def _new_record(self, member: Member, record: AliveRecord, now: float) -> Member:
        changed = record.state != member.record.state
        updated = Member(
            member.node_id,
            member.status,
            member.incarnation,
            record,
            member.since,
            member.accuser,
            member.left_signature,
        )
        self._members[member.node_id] = updated
        data = self._encoded[member.node_id] = encode_record(record)
        self.broadcasts.enqueue(record.node_id, UpdateFamily.RECORD, data)
        # A record that also revives the member is reported by the ALIVE event instead.
        revives = (
            member.status is not MemberStatus.ALIVE and record.incarnation > member.incarnation
        )
        if changed and not revives:
            self.events.append(MemberEvent(MemberEventKind.UPDATED, updated, now))
        return updated

    def _liveness(self, member: Member, record: Record, now: float) -> None:
        rule = LIVENESS.get((member.status, _KIND[type(record)]))
        if rule is None:
            return
        strictly_higher, status = rule
        if record.incarnation < member.incarnation or (
            strictly_higher and record.incarnation == member.incarnation
        ):
            return
        if isinstance(record, LeftRecord) and not self._authentic(record):
            return
        same_suspicion = record.incarnation == member.incarnation
        if (
            member.status is MemberStatus.SUSPECT
            and status is MemberStatus.SUSPECT
            and same_suspicion
        ):
            self._confirm(member, record, now)
        elif member.status is MemberStatus.ALIVE and status is MemberStatus.ALIVE:
            self._members[member.node_id] = _with(member, status, record.incarnation, member.since)
        else:
            self._transition(member, record, status, now)

    def _transition(self, member: Member, record: Record, status: MemberStatus, now: float) -> None:
        accuser = getattr(record, "accuser", "")
        signature = record.signature if isinstance(record, LeftRecord) else b""
        updated = _with(member, status, record.incarnation, now, accuser, signature)
        self._members[member.node_id] = updated
        self._live += (status in _LIVE) - (member.status in _LIVE)
        self._suspicions.pop(member.node_id, None)
        self._suspicion_deadline = None
        if status is MemberStatus.SUSPECT:
            self._start_suspicion(member.node_id, accuser, now)
        if status is MemberStatus.ALIVE:
            self.broadcasts.drop(member.node_id, UpdateFamily.STATUS)
        else:
            self.reap_at = min(self.reap_at, now + self.config.dead_node_reclaim_time)
            self.broadcasts.enqueue(member.node_id, UpdateFamily.STATUS, encode_record(record))
        self.events.append(MemberEvent(_EVENT_FOR[status], updated, now))

    def _start_suspicion(self, node_id: str, accuser: str, now: float) -> None:
        self.counters.suspicions += 1
        n, config = self._live, self.config
        self._suspicion_deadline = None
        self._suspicions[node_id] = SuspicionTimer(
            now,
            config.suspicion_min_timeout(n),
            config.suspicion_max_timeout(n),
            config.suspicion_confirmations(n),
            {accuser},
        )

    def _confirm(self, member: Member, record: Record, now: float) -> None:
        timer = self._suspicions.get(member.node_id)
        if timer is not None and timer.confirm(record.accuser):
            self._suspicion_deadline = None
            self.broadcasts.enqueue(member.node_id, UpdateFamily.STATUS, encode_record(record))

    # --- claims about this node ------------------------------------------------------------

    def _about_local(self, record: Record, now: float) -> None:
        if self.has_left:
            return
        incarnation = self.local.incarnation
        if isinstance(record, AliveRecord):
            if record.key <= self.local.record.key or not self._authentic(record):
                return
        elif record.incarnation < incarnation:
            if not isinstance(record, LeftRecord):
                self.corrections.append(self.local_bytes)  # the sender missed our refutation
            return
        elif isinstance(record, LeftRecord) and not self._authentic(record):
            return
        if record.incarnation >= MAX_COUNTER:
            self.counters.claims_ahead += 1  # a refutation would be undecodable
            return
        self.refute(record.incarnation, now)
        if not isinstance(record, AliveRecord):
            self.health.apply(1)

    def refute(self, claimed_incarnation: int, now: float) -> None:
        """Re-announce this node ALIVE above ``claimed_incarnation``."""
        self.counters.refutations += 1
        record = self.local.record
        incarnation = max(claimed_incarnation, self.local.incarnation) + 1
        self._publish(incarnation, record.version, record.state, now)

    def _publish(self, incarnation: int, version: int, state: NodeState, now: float) -> None:
        record = self._sign(AliveRecord(self.local_id, incarnation, version, state))
        self.local = Member(self.local_id, MemberStatus.ALIVE, incarnation, record, now)
        self.local_bytes = encode_record(record)
        self.broadcasts.drop(self.local_id, UpdateFamily.STATUS)
        self.broadcasts.enqueue(self.local_id, UpdateFamily.RECORD, self.local_bytes)

    # --- helpers ---------------------------------------------------------------------------

    def _authentic(self, record: AliveRecord | LeftRecord) -> bool:
        if self.authenticator is None:
            return True
        if self.authenticator.verify(record.node_id, signed_body(record), record.signature):
            return True
        self.counters.impersonations_refused += 1
        return False

    def _signature(self, record: AliveRecord | LeftRecord) -> bytes:
        return b"" if self.authenticator is None else self.authenticator.sign(signed_body(record))

    def _sign(self, record: AliveRecord) -> AliveRecord:
        signature = self._signature(record)
        return AliveRecord(
            record.node_id, record.incarnation, record.version, record.state, signature
        )

    def _store(self, member: Member, encoded: bytes) -> None:
        self._members[member.node_id] = member
        self._encoded[member.node_id] = encoded
        self._ids.append(member.node_id)
        self._live += member.status in _LIVE

    def _remove(self, node_id: str) -> None:
        member = self._members.pop(node_id)
        del self._encoded[node_id]
        self._entries.pop(node_id, None)
        self._live -= member.status in _LIVE
        index = self._ids.index(node_id)
        self._ids[index] = self._ids[-1]
        self._ids.pop()
        self._suspicions.pop(node_id, None)
        self._suspicion_deadline = None
        self.broadcasts.drop(node_id, UpdateFamily.RECORD)
        self.broadcasts.drop(node_id, UpdateFamily.STATUS)


def _with(
    member: Member,
    status: MemberStatus,
    incarnation: int,
    since: float,
    accuser: str = "",
    left_signature: bytes = b"",
) -> Member:
    return Member(
        member.node_id, status, incarnation, member.record, since, accuser, left_signature
    )


def _entry_of(member: Member) -> DigestEntry:
    record = member.record
    return DigestEntry(
        member.node_id,
        _STATUS_KIND[member.status],
        member.incarnation,
        record.incarnation,
        record.version,
    )


_STATUS_KIND = {
    MemberStatus.ALIVE: RecordKind.ALIVE,
    MemberStatus.SUSPECT: RecordKind.SUSPECT,
    MemberStatus.DEAD: RecordKind.DEAD,
    MemberStatus.LEFT: RecordKind.LEFT,
}
_LIVE_KINDS = (RecordKind.ALIVE, RecordKind.SUSPECT)


def _status_record(member: Member) -> Record:
    if member.status is MemberStatus.SUSPECT:
        return SuspectRecord(member.node_id, member.incarnation, member.accuser)
    if member.status is MemberStatus.DEAD:
        return DeadRecord(member.node_id, member.incarnation, member.accuser)
    return LeftRecord(member.node_id, member.incarnation, member.left_signature)
