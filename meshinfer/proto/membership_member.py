"""What the member table holds about one member: its status, its snapshot, the events and counters.

A member's status moves by the transition table :data:`LIVENESS`: the pair (the member's status,
the kind of a received claim) maps to the incarnation the claim needs (``>`` or ``>=`` than the
member's liveness incarnation) and the status it leads to. Pairs not in the table are ignored::

    ALIVE ──SUSPECT (>=)──▶ SUSPECT ──DEAD (>=)──▶ DEAD ──LEFT (>=)──▶ LEFT
    ALIVE ──DEAD (>=)──▶ DEAD         ALIVE or SUSPECT ──LEFT (>=)──▶ LEFT
    SUSPECT ──SUSPECT (>=)──▶ SUSPECT (a confirmation at the same incarnation)
    any status ──ALIVE (>)──▶ ALIVE (from ALIVE: only the incarnation rises)

Nothing but an ALIVE at a *higher* incarnation brings a suspect, dead or left member back, and
suspicion or death never overrides a departure. :class:`Member` is an immutable snapshot: each
change makes a new one, so the identity of a snapshot says whether what was derived from it
(an encoded digest entry) is still current. The rules that apply claims live in
:mod:`membership_table`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshinfer.proto.membership_wire import (
    AliveRecord,
    DeadRecord,
    DigestEntry,
    LeftRecord,
    NodeState,
    Record,
    RecordKind,
    SuspectRecord,
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
#: The kind of each record type, as :data:`LIVENESS` names it.
RECORD_KIND = {
    AliveRecord: RecordKind.ALIVE,
    SuspectRecord: RecordKind.SUSPECT,
    DeadRecord: RecordKind.DEAD,
    LeftRecord: RecordKind.LEFT,
}
#: The event a transition into each status reports.
EVENT_FOR = {
    MemberStatus.ALIVE: MemberEventKind.ALIVE,
    MemberStatus.SUSPECT: MemberEventKind.SUSPECT,
    MemberStatus.DEAD: MemberEventKind.DEAD,
    MemberStatus.LEFT: MemberEventKind.LEFT,
}
#: The statuses of live members (still probed, still counted in n).
LIVE = (MemberStatus.ALIVE, MemberStatus.SUSPECT)
#: The record kind a digest entry lists for each status.
STATUS_KIND = {
    MemberStatus.ALIVE: RecordKind.ALIVE,
    MemberStatus.SUSPECT: RecordKind.SUSPECT,
    MemberStatus.DEAD: RecordKind.DEAD,
    MemberStatus.LEFT: RecordKind.LEFT,
}
#: The digest entry kinds of live members.
LIVE_KINDS = (RecordKind.ALIVE, RecordKind.SUSPECT)


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
    #: When (the table's clock, the ``now`` it is given) the member's current position and
    #: velocity arrived here: a newer record that changes neither keeps it. A lower bound on
    #: the position's age, which the coordinator's contact-time estimate extrapolates from.
    #: None where not recorded (a snapshot made outside the table).
    position_at: float | None = None

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
        return self.status in LIVE


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


def with_status(
    member: Member,
    status: MemberStatus,
    incarnation: int,
    since: float,
    accuser: str = "",
    left_signature: bytes = b"",
) -> Member:
    """``member`` in ``status`` at liveness ``incarnation`` (its state record kept)."""
    return Member(
        member.node_id,
        status,
        incarnation,
        member.record,
        since,
        accuser,
        left_signature,
        member.position_at,
    )


def with_record(member: Member, record: AliveRecord, now: float) -> Member:
    """``member`` with a newer state ``record``, received at ``now`` (its status kept; its
    ``position_at`` too unless the record moves it: a new position or velocity)."""
    old, new = member.record.state, record.state
    same_place = old.position == new.position and old.velocity == new.velocity
    return Member(
        member.node_id,
        member.status,
        member.incarnation,
        record,
        member.since,
        member.accuser,
        member.left_signature,
        member.position_at if same_place else now,
    )


def entry_of(member: Member) -> DigestEntry:
    """What a digest lists for ``member``: its status, liveness incarnation and record key."""
    record = member.record
    return DigestEntry(
        member.node_id,
        STATUS_KIND[member.status],
        member.incarnation,
        record.incarnation,
        record.version,
    )


def status_record(member: Member) -> Record:
    """The SUSPECT, DEAD or LEFT record that states a member's status (not for the alive)."""
    if member.status is MemberStatus.SUSPECT:
        return SuspectRecord(member.node_id, member.incarnation, member.accuser)
    if member.status is MemberStatus.DEAD:
        return DeadRecord(member.node_id, member.incarnation, member.accuser)
    return LeftRecord(member.node_id, member.incarnation, member.left_signature)
