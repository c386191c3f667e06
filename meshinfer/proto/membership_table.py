"""The member table: who is alive, suspect, dead or left, and the rules that change it.

Theory of operation
-------------------
Every member has a *liveness incarnation* ``i`` and the latest ALIVE record it signed (its state,
ordered by ``(incarnation, version)``). A received record about member Y is applied in two
independent steps:

1. *State* (ALIVE records only): a record with a larger ``(incarnation, version)`` replaces the
   stored one (UPDATED while Y is alive) and is re-broadcast; an older or equal one is dropped.
2. *Liveness*: the transition table :data:`LIVENESS` (:mod:`membership_member`) maps (Y's
   status, record kind) to the incarnation the claim needs (``>`` or ``>=`` than ``i``) and the
   resulting status. Pairs not in the table are ignored: nothing but an ALIVE with a *higher*
   incarnation brings a suspect, dead or left member back, and suspicion or death never
   overrides a departure.

Claims about this node itself never change the local record: a SUSPECT/DEAD at ``j >= i`` is
*refuted* by re-announcing ALIVE at ``i + 1``, and a record this node signed (a LEFT, or an ALIVE
record newer than ours) at ``j >= i`` is outbid at ``j + 1``.

Claims above this node's incarnation. A SUSPECT/DEAD at ``j > i`` names an incarnation this node
never announced in this life: it is counted (``claims_ahead``) and refuted at ``i + 1`` as one at
``i``, never at ``j + 1`` (others lower such a claim to the newest ALIVE record they hold, so
``i + 1`` refutes it wherever they hold ours; taking ``j`` at face value would let one member's
claim at ``MAX_COUNTER`` leave this node unable to refute ever again). A restarted node, which
starts at incarnation 0, rises above its old life only on evidence: its own signed ALIVE (or LEFT)
record from that life, outbid at its incarnation + 1. The join's whole-table push-pull brings it
from the seed, as does any anti-entropy exchange (a digest lists this node's entry; the answer
carries the records the other side holds about it). A claim above ``i`` that arrives by gossip
alone sets :attr:`MemberTable.ask_evidence`: the driver then starts an anti-entropy exchange with
the claim's sender, whose answer brings the evidence well within the suspicion timeout. It is set
at once for a claimed incarnation higher than any asked for, and otherwise again at most once per
``probe_interval`` while such claims keep coming: an exchange that never came back, or a liar's
claim at a higher incarnation, delays the evidence by a probe interval, not until the next
periodic push-pull (by then the suspicion may have run out).

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
``claims_ahead``; the subject itself refutes it at its own incarnation + 1, see above), so the
worst a liar achieves is a refutation (or, for a real crash, an earlier death). Nor does a node
refute a claim about itself that only an incarnation above ``MAX_COUNTER`` would answer (no
decoder takes that ALIVE record, nor any packet carrying it). The accuser named in a
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

Digests. Anti-entropy by digest (compare tables, then send only the records that differ) is
:class:`~meshinfer.proto.membership_store.MemberStore`'s, the base that holds the members and
reads them out; see "Digests" in :mod:`membership_store`.

Table cap. Without record signatures any member may invent node ids (node daemons sign, so there
each node id needs a fleet certificate; simulations may not), so the table holds at most
``config.max_members`` members (this node included, in any status): an ALIVE record about a
node id the full table does not know is refused and counted (``members_refused``) before any
signature check. Known members are never evicted for a newcomer; the dead and left free their
room when they are forgotten. An invented member that got in is probed like any other, suspected
and forgotten after ``dead_node_reclaim_time``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from meshinfer.errors import LocalProtocolError
from meshinfer.proto.membership_auth import RecordAuthenticator
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_gossip import BroadcastQueue, UpdateFamily
from meshinfer.proto.membership_member import (
    EVENT_FOR,
    LIVENESS,
    RECORD_KIND,
    Member,
    MemberEvent,
    MemberEventKind,
    MembershipCounters,
    MemberStatus,
    status_record,
    with_record,
    with_status,
)
from meshinfer.proto.membership_store import MemberStore
from meshinfer.proto.membership_suspicion import LocalHealth, SuspicionTimer
from meshinfer.proto.membership_wire import (
    MAX_COUNTER,
    MAX_STATE_BYTES,
    AliveRecord,
    DeadRecord,
    LeftRecord,
    NodeState,
    Record,
    SuspectRecord,
    encode_record,
    encode_state,
    signed_body,
)

# The member types were defined here before the split; importers may take them from here.
__all__ = [
    "LIVENESS",
    "Member",
    "MemberEvent",
    "MemberEventKind",
    "MemberStatus",
    "MemberTable",
    "MembershipCounters",
]


class MemberTable(MemberStore):
    """The rules that change the members (see the module docstring), with the suspicion
    timers, the broadcast queue and the events they produce."""

    def __init__(
        self,
        local: AliveRecord,
        config: MembershipConfig,
        rng: random.Random,
        now: float,
        authenticator: RecordAuthenticator | None = None,
        counters: MembershipCounters | None = None,
    ) -> None:
        self.authenticator = authenticator
        signed = Member(
            local.node_id, MemberStatus.ALIVE, local.incarnation, self._sign(local), now
        )
        super().__init__(config, rng, signed)
        self.counters = counters or MembershipCounters()
        self.health = LocalHealth(config.awareness_max_multiplier)
        self.broadcasts = BroadcastQueue()
        self.events: list[MemberEvent] = []
        #: Encoded ALIVE records that refute stale claims just received (for the sender).
        self.corrections: list[bytes] = []
        #: A claim about this node above its incarnation arrived without evidence: ask its
        #: sender for its records about this node (the driver reads and clears it).
        self.ask_evidence = False
        self._evidence_asked = -1  # the highest claimed incarnation evidence was asked for
        self._evidence_at = float("-inf")  # when evidence was last asked for
        self.on_new_member: Callable[[str], None] = lambda node_id: None
        self._suspicions: dict[str, SuspicionTimer] = {}
        self._suspicion_deadline: float | None = None  # cached min of the deadlines
        self._revocations_grew = False  # the local state announced a newer list: judge again
        self.reap_at = float("inf")  # when reap() has work next

    # --- queries ---------------------------------------------------------------------------

    def suspicion_notice(self, node_id: str) -> list[bytes]:
        """What a probe of ``node_id`` carries first: if it is suspect, its suspicion (Lifeguard
        buddy system: it learns of it and refutes in its ack); otherwise one random suspicion
        we hold (an echo: a receiver that saw the refutation corrects us)."""
        member = self.get(node_id)
        if member is None or member.status is not MemberStatus.SUSPECT:
            if not self._suspicions:
                return []
            member = self._held(self.rng.choice(list(self._suspicions)))
        return [encode_record(status_record(member))]

    # --- local changes ---------------------------------------------------------------------

    def add_known(self, records: Iterable[AliveRecord], now: float) -> None:
        """Seed the table with trusted records (warm start): no events, no broadcasts; those
        past ``max_members`` are refused like received ones."""
        for record in records:
            if record.node_id != self.local_id and not self.knows(record.node_id):
                if self.is_full():
                    self.counters.members_refused += 1
                    continue
                member = _arrived(record, now)
                self._store(member)  # probed from the next pass on

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
        signature = self._signature(LeftRecord(self.local_id, incarnation))
        local = Member(self.local_id, MemberStatus.LEFT, incarnation, self.local.record, now)
        self._set_local(local, signature)
        self.broadcasts.drop(self.local_id, UpdateFamily.RECORD)
        left = LeftRecord(self.local_id, incarnation, signature)
        self.broadcasts.enqueue(self.local_id, UpdateFamily.STATUS, encode_record(left))

    def leave_announced(self) -> bool:
        """Whether the LEFT announcement was sent its full number of times."""
        return self.has_left and not self.broadcasts.has(self.local_id, UpdateFamily.STATUS)

    def suspect(self, node_id: str, now: float) -> None:
        """Our own probe of ``node_id`` failed: suspect it at its current incarnation."""
        member = self.get(node_id)
        if member is not None:
            self.apply(SuspectRecord(node_id, member.incarnation, self.local_id), now)

    def expire_suspicions(self, now: float) -> None:
        """Declare dead every suspect whose Lifeguard timeout ran out."""
        if self.next_suspicion_deadline() > now:
            return
        expired = [n for n, timer in self._suspicions.items() if timer.deadline <= now]
        for node_id in expired:
            member = self._held(node_id)
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
        for member in [m for m in self.live_members() if expired(m.record.signature)]:
            self._declare_unproven(member, now)

    def _expire_revoked(self, now: float) -> None:
        """Declare dead every live member whose newest record no longer verifies (its
        certificate revoked since); the authenticator counts each by its refusal's reason."""
        verify = self.authenticator.verify  # type: ignore[union-attr]
        for member in self.live_members():
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
        for member in self.gone_members():
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
        member = self.get(record.node_id)
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
        check per member, however many versions a hostile table lists), before the member's
        status records, wherever the table lists it: a status is judged against the record
        that table holds (a SUSPECT listed first would be lowered to an older record)."""
        records = list(records)
        gone = {r.node_id for r in records if isinstance(r, DeadRecord | LeftRecord)}
        newest: dict[str, AliveRecord] = {}
        for record in records:
            if isinstance(record, AliveRecord):
                seen = newest.get(record.node_id)
                if seen is None or record.key > seen.key:
                    newest[record.node_id] = record
        for record in records:
            alive = newest.pop(record.node_id, None)  # at the member's first record
            if alive is not None:
                unknown = not self.knows(alive.node_id) and alive.node_id != self.local_id
                if not (unknown and alive.node_id in gone):
                    self.apply(alive, now, push_pull=True)
            if not isinstance(record, AliveRecord):
                self.apply(record, now, push_pull=True)

    def _correct_stale(self, member: Member, claim: SuspectRecord | DeadRecord) -> None:
        """The sender still suspects a member we know refuted: send it the refutation."""
        if member.status is MemberStatus.ALIVE and member.record.incarnation > claim.incarnation:
            self.corrections.append(self._alive_bytes(member))

    def _learn(self, record: AliveRecord, now: float) -> None:
        if self.is_full():  # see "Table cap" in the module docstring
            self.counters.members_refused += 1
            return
        if not self._authentic(record):
            return
        member = _arrived(record, now)
        self._store(member)
        self.on_new_member(record.node_id)
        self.events.append(MemberEvent(MemberEventKind.JOINED, member, now))
        self.broadcasts.enqueue(record.node_id, UpdateFamily.RECORD, self._alive_bytes(member))

    def _new_record(self, member: Member, record: AliveRecord, now: float) -> Member:
        changed = record.state != member.record.state
        updated = with_record(member, record, now)
        self._replace(updated)
        self.broadcasts.enqueue(record.node_id, UpdateFamily.RECORD, self._alive_bytes(updated))
        # A record that also revives the member is reported by the ALIVE event instead.
        revives = (
            member.status is not MemberStatus.ALIVE and record.incarnation > member.incarnation
        )
        if changed and not revives and updated.is_live:  # UPDATED only while it is live
            self.events.append(MemberEvent(MemberEventKind.UPDATED, updated, now))
        return updated

    def _liveness(self, member: Member, record: Record, now: float) -> None:
        rule = LIVENESS.get((member.status, RECORD_KIND[type(record)]))
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
            self._replace(with_status(member, status, record.incarnation, member.since))
        else:
            self._transition(member, record, status, now)

    def _transition(self, member: Member, record: Record, status: MemberStatus, now: float) -> None:
        accuser = getattr(record, "accuser", "")
        signature = record.signature if isinstance(record, LeftRecord) else b""
        updated = with_status(member, status, record.incarnation, now, accuser, signature)
        self._replace(updated)
        self._suspicions.pop(member.node_id, None)
        self._suspicion_deadline = None
        if status is MemberStatus.SUSPECT:
            self._start_suspicion(member.node_id, accuser, now)
        if status is MemberStatus.ALIVE:
            self.broadcasts.drop(member.node_id, UpdateFamily.STATUS)
        else:
            self.reap_at = min(self.reap_at, now + self.config.dead_node_reclaim_time)
            self.broadcasts.enqueue(member.node_id, UpdateFamily.STATUS, encode_record(record))
        self.events.append(MemberEvent(EVENT_FOR[status], updated, now))

    def _start_suspicion(self, node_id: str, accuser: str, now: float) -> None:
        self.counters.suspicions += 1
        n, config = self.live_count(), self.config
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
        claimed = record.incarnation
        if isinstance(record, SuspectRecord | DeadRecord) and claimed > incarnation:
            self._claim_ahead(claimed, now)
            claimed = incarnation  # see "Claims above this node's incarnation"
        if claimed >= MAX_COUNTER:
            self.counters.claims_ahead += 1  # a refutation would be undecodable
            return
        self.refute(claimed, now)
        if not isinstance(record, AliveRecord):
            self.health.apply(1)

    def _claim_ahead(self, claimed: int, now: float) -> None:
        """A SUSPECT/DEAD about this node above its incarnation: count it, and ask for
        evidence (our own older record) at once for a higher claimed incarnation than any
        asked for, else again at most once per ``probe_interval`` (the last exchange was lost,
        or a liar's claim took the higher incarnation)."""
        self.counters.claims_ahead += 1
        if claimed > self._evidence_asked or now >= self._evidence_at + self.config.probe_interval:
            self._evidence_asked = max(self._evidence_asked, claimed)
            self._evidence_at = now
            self.ask_evidence = True

    def refute(self, claimed_incarnation: int, now: float) -> None:
        """Re-announce this node ALIVE above ``claimed_incarnation``."""
        self.counters.refutations += 1
        record = self.local.record
        incarnation = max(claimed_incarnation, self.local.incarnation) + 1
        self._publish(incarnation, record.version, record.state, now)

    def _publish(self, incarnation: int, version: int, state: NodeState, now: float) -> None:
        record = self._sign(AliveRecord(self.local_id, incarnation, version, state))
        self._set_local(Member(self.local_id, MemberStatus.ALIVE, incarnation, record, now))
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

    def _remove(self, node_id: str) -> None:
        super()._remove(node_id)
        self._suspicions.pop(node_id, None)
        self._suspicion_deadline = None
        self.broadcasts.drop(node_id, UpdateFamily.RECORD)
        self.broadcasts.drop(node_id, UpdateFamily.STATUS)


def _arrived(record: AliveRecord, now: float) -> Member:
    """A member first held here at ``now``, alive by its ``record`` (its position too: see
    :attr:`~meshinfer.proto.membership_member.Member.position_at`)."""
    return Member(
        record.node_id, MemberStatus.ALIVE, record.incarnation, record, now, position_at=now
    )
