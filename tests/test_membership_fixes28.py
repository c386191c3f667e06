"""One clock skew, members whose certificate expired, and digest anti-entropy's costs.

* Sessions and membership records judge certificates with one default clock skew
  (``identity.DEFAULT_CLOCK_SKEW_S``; records used 120 s, sessions 300 s).
* A live member whose newest record's certificate expired (beyond the skew) is declared dead at
  the next certificate check, no longer relayed to tables that lack it, and comes back only
  under a new certificate.
* Digest entries are encoded once per member snapshot; a digest cut short by the decoder is
  answered only about the members it listed, never with the whole table.

Real certificates from a fleet authority, the real SWIM core and wire codec.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace

import pytest

from meshinfer.errors import AdmissionError
from meshinfer.proto.identity import (
    DEFAULT_CLOCK_SKEW_S,
    FleetAuthority,
    NodeIdentity,
    RevocationList,
    admit,
)
from meshinfer.proto.membership import Membership, MembershipConfig, MemberStatus
from meshinfer.proto.membership_auth import CertifiedRecordAuthenticator
from meshinfer.proto.membership_member import entry_of
from meshinfer.proto.membership_table import MemberEventKind, MemberTable
from meshinfer.proto.membership_wire import (
    AliveRecord,
    Digest,
    DigestEntry,
    DigestReply,
    Gossip,
    NodeState,
    PushPull,
    RecordKind,
    decode_packet,
    encode_entry,
    encode_packet,
    encode_record,
    signed_body,
)
from meshinfer.runtime.session import SessionConfig

NOW = 1.8e9
LIFETIME = 3600.0


@pytest.fixture(scope="module")
def authority() -> FleetAuthority:
    return FleetAuthority.create("fixes28-fleet")


def enrolled(authority: FleetAuthority, node_id: str, serial: int, **kw) -> NodeIdentity:
    kw.setdefault("now", NOW)
    kw.setdefault("lifetime_s", LIFETIME)
    return authority.enroll(node_id, ["vehicle"], serial=serial, **kw)


def signer(identity: NodeIdentity, **kw) -> CertifiedRecordAuthenticator:
    return CertifiedRecordAuthenticator(
        identity.certificate, identity.static_private, identity.trust, random_bytes=os.urandom, **kw
    )


def state_of(identity: NodeIdentity) -> NodeState:
    return NodeState("127.0.0.1", 1, identity.static_public, roles=("vehicle",))


def alive(identity: NodeIdentity, incarnation: int = 0, version: int = 1) -> AliveRecord:
    record = AliveRecord(identity.node_id, incarnation, version, state_of(identity))
    proof = signer(identity).sign(signed_body(record))
    return AliveRecord(record.node_id, incarnation, version, record.state, proof)


def core(identity: NodeIdentity, clock: list[float], **kw) -> Membership:
    return Membership(
        identity.node_id,
        state_of(identity),
        MembershipConfig.test(),
        random.Random(1),
        0.0,
        authenticator=signer(identity, wallclock=lambda: clock[0], **kw),
    )


# --- one default clock skew --------------------------------------------------------------------


def test_records_and_handshakes_share_one_default_clock_skew(authority):
    alice, bob = enrolled(authority, "alice", 1), enrolled(authority, "bob", 2)
    skew = SessionConfig().clock_skew
    assert skew == DEFAULT_CLOCK_SKEW_S
    record = alive(alice)
    for late, ok in [(skew - 1, True), (skew + 1, False)]:
        at = NOW + LIFETIME + late
        checker = signer(bob, wallclock=lambda at=at: at)  # the default skew
        assert checker.verify("alice", signed_body(record), record.signature) is ok
        try:
            admit(
                alice.certificate.to_bytes(), proven_static=alice.static_public,
                trust=alice.trust, revocations=RevocationList(alice.trust.fleet_id), now=at,
                clock_skew=skew,
            )  # fmt: skip
            admitted = True
        except AdmissionError:
            admitted = False
        assert admitted is ok


# --- a member whose certificate expired ---------------------------------------------------------


def test_a_member_whose_certificate_expired_is_declared_dead_at_the_next_check(authority):
    a, b, c = (enrolled(authority, n, s) for s, n in enumerate(["a", "b", "c"], 10))
    check = MembershipConfig.test().certificate_check_interval
    late = enrolled(authority, "d", 13, lifetime_s=3 * LIFETIME)  # valid after b's expired
    clock = [NOW]
    node_a = core(a, clock)
    records = [encode_record(alive(b)), encode_record(alive(late))]
    node_a.handle_packet("c", encode_packet(PushPull(), records), 1.0)
    node_a.drain_events()
    assert node_a.next_deadline() <= check
    node_a.tick(check)  # still valid: nothing changes (probes of b and d go unanswered)
    assert node_a.member("b").is_live and node_a.table.authenticator.refusals == {}

    clock[0] = NOW + LIFETIME + DEFAULT_CLOCK_SKEW_S + 1
    node_a.tick(2 * check)
    assert node_a.member("b").status is MemberStatus.DEAD
    assert node_a.member("d").is_live
    events = node_a.drain_events()
    dead = [e.member.node_id for e in events if e.kind is MemberEventKind.DEAD]
    assert dead == ["b"]
    authenticator = node_a.table.authenticator
    assert authenticator.refusals == {"expired": 1}
    node_a.tick(3 * check)  # judged once: it is no longer live
    assert authenticator.refusals == {"expired": 1}

    # its refutation, under the same certificate, does not bring it back
    refute = encode_packet(Gossip(), [encode_record(alive(b, incarnation=1))])
    node_a.handle_packet("b", refute, 3 * check)
    assert node_a.member("b").status is MemberStatus.DEAD
    assert authenticator.refusals == {"expired": 2}

    # a table that lacks it is not sent its record any more
    node_a.drain_packets()
    digest = [encode_entry(entry_of(node_a.local_member)), encode_entry(entry_of_c(c))]
    node_a.handle_packet("c", encode_packet(Digest(), digest), 3 * check)
    (reply,) = node_a.drain_packets()
    sent = {r.node_id for r in decode_packet(reply.data).records}
    assert "b" not in sent and ("d" in sent) is node_a.member("d").is_live

    # re-enrolled, its record under the new certificate revives it
    again = enrolled(authority, "b", 14, now=NOW + LIFETIME)
    back = encode_packet(Gossip(), [encode_record(alive(again, incarnation=2))])
    node_a.handle_packet("b", back, 4 * check)
    assert node_a.member("b").status is MemberStatus.ALIVE


def entry_of_c(c: NodeIdentity) -> DigestEntry:
    return DigestEntry(c.node_id, RecordKind.ALIVE, 0, 0, 1)


def test_without_a_wall_clock_held_records_are_never_judged_expired(authority):
    a, b = enrolled(authority, "a", 20), enrolled(authority, "b", 21)
    assert not signer(a).expired(alive(b).signature)
    unclocked = Membership("a", state_of(a), MembershipConfig.test(), random.Random(1), 0.0,
                           authenticator=signer(a))  # fmt: skip
    assert not unclocked.table.checks_certificates  # (a simulation on a virtual clock)
    assert core(a, [NOW]).table.checks_certificates
    clock = [NOW + 10 * LIFETIME]
    assert signer(a, wallclock=lambda: clock[0]).expired(alive(b).signature)
    assert not signer(a, wallclock=lambda: clock[0]).expired(b"not a proof")


# --- digests --------------------------------------------------------------------------------


def table_of(n: int, **config) -> MemberTable:
    cfg = replace(MembershipConfig.test(), **config)
    local = AliveRecord("me", 0, 1, NodeState("127.0.0.1", 1))
    table = MemberTable(local, cfg, random.Random(2), 0.0)
    table.add_known([AliveRecord(f"n{i}", 0, 1, NodeState("127.0.0.1", 2)) for i in range(n)], 0.0)
    return table


def fresh_digest(table: MemberTable) -> list[bytes]:
    members = [table.local, *table.members()]
    return [encode_entry(entry_of(m)) for m in members]


def test_digest_entries_are_encoded_once_per_member_snapshot_and_stay_true():
    table = table_of(6)
    first = table.digest()
    again = table.digest()
    assert again == first == fresh_digest(table)
    assert all(x is y for x, y in zip(first, again, strict=True))  # not encoded again
    table.apply(AliveRecord("n1", 0, 2, NodeState("10.0.0.1", 3)), 1.0)
    table.suspect("n2", 1.0)
    table.update_local_state(NodeState("127.0.0.1", 9), 1.0)
    table.apply(AliveRecord("n3", 2, 1, NodeState("127.0.0.1", 2)), 1.0)
    after = table.digest()
    assert after == fresh_digest(table)
    changed = {i for i, (x, y) in enumerate(zip(first, after, strict=True)) if x != y}
    assert changed == {0, 2, 3, 4}  # this node, n1, n2 and n3
    table.leave(2.0)
    assert table.digest() == fresh_digest(table)


def test_a_truncated_digest_is_answered_only_about_the_members_it_listed():
    node = Membership("me", NodeState("127.0.0.1", 1), replace(
        MembershipConfig.test(), max_members=4), random.Random(3), 0.0)  # fmt: skip
    listed = [AliveRecord(f"n{i}", 0, 1, NodeState("127.0.0.1", 2)) for i in range(3)]
    node.handle_packet("n0", encode_packet(PushPull(), [encode_record(r) for r in listed]), 1.0)
    node.drain_packets()
    limit = node.config.max_packet_records()
    made_up = [DigestEntry(f"x{i}", RecordKind.ALIVE, 0, 0, 1) for i in range(limit)]
    # n1's entry differs and is read; n0 and n2 lie past the cut
    past = [
        DigestEntry("n0", RecordKind.ALIVE, 0, 0, 1),
        DigestEntry("n2", RecordKind.ALIVE, 0, 0, 1),
    ]
    entries = [DigestEntry("n1", RecordKind.ALIVE, 0, 0, 7), *made_up[: limit - 1], *past]
    node.handle_packet("n0", encode_packet(Digest(), [encode_entry(e) for e in entries]), 2.0)
    (reply,) = node.drain_packets()
    packet = decode_packet(reply.data)
    assert isinstance(packet.header, DigestReply)
    assert [r.node_id for r in packet.records] == ["n1"]
    assert node.counters.packets_truncated == 1
    # the same digest uncut (a table that fits) is still answered with what it lacked
    whole = [DigestEntry("n1", RecordKind.ALIVE, 0, 0, 7)]
    node.handle_packet("n0", encode_packet(Digest(), [encode_entry(e) for e in whole]), 3.0)
    (reply,) = node.drain_packets()
    assert {r.node_id for r in decode_packet(reply.data).records} == {"me", "n0", "n1", "n2"}
