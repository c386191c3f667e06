"""Claims about this node above its incarnation are refuted at its own incarnation + 1.

* A SUSPECT/DEAD about this node at ``j > i`` used to be refuted at ``j + 1``: a fleet member
  lying twice (a claim at ``MAX_COUNTER - 1`` sent to the node, then one at ``MAX_COUNTER``
  gossiped) left the node at ``MAX_COUNTER``, unable to refute, and every table declared it
  dead for good. Now it is counted (``claims_ahead``) and refuted at ``i + 1``.
* A restarted node (incarnation 0) rises above its old life only on evidence: its own signed
  ALIVE record from that life, outbid at that record's incarnation + 1. The join brings it from
  the seed; a claim that arrives by gossip alone makes the node ask the claim's sender (an
  anti-entropy exchange, once per claimed incarnation), whose answer brings it.

Real tables and cores, on the virtual-time network where several nodes take part; no mocks.
"""

from __future__ import annotations

import random
from dataclasses import replace

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.proto.membership import Membership, MemberStatus
from meshinfer.proto.membership_auth import Ed25519RecordAuthenticator
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_table import MemberTable
from meshinfer.proto.membership_wire import (
    MAX_COUNTER,
    AliveRecord,
    DeadRecord,
    Digest,
    Gossip,
    LeftRecord,
    NodeState,
    PushPull,
    SuspectRecord,
    decode_packet,
    encode_packet,
    encode_record,
    signed_body,
)
from meshinfer.testing.virtual_network import MembershipCluster

CONFIG = MembershipConfig.test()


def _state(name: str) -> NodeState:
    return NodeState(host=f"{name}.local", port=7946, static_key=bytes(32))


def _table(authenticator=None) -> MemberTable:
    local = AliveRecord("a", 0, 1, _state("a"))
    return MemberTable(local, CONFIG, random.Random(1), 0.0, authenticator)


def _gossip(*records) -> bytes:
    return encode_packet(Gossip(), [encode_record(r) for r in records])


def _keys(n: int) -> dict[str, nacl.signing.SigningKey]:
    return {f"n{i:04d}": nacl.signing.SigningKey(bytes([i + 1]) * 32) for i in range(n)}


def _signed_cluster(n: int, config: MembershipConfig, seed: int) -> MembershipCluster:
    keys = _keys(n)
    public = {node: bytes(key.verify_key) for node, key in keys.items()}
    return MembershipCluster(
        config,
        seed=seed,
        authenticator_for=lambda node: Ed25519RecordAuthenticator(keys[node], public.get),
    )


def _everyone_sees(cluster: MembershipCluster, subject: str, incarnation: int) -> bool:
    for observer in cluster.up():
        if observer == subject:
            continue
        member = cluster.membership(observer).member(subject)
        if member is None or member.status is not MemberStatus.ALIVE:
            return False
        if member.incarnation != incarnation:
            return False
    return True


def _deaths(cluster: MembershipCluster, subject: str, since: float) -> list:
    return [e for e in cluster.log if e.subject == subject and e.kind == "dead" and e.at > since]


# --- the subject caps the jump ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 3),
    st.one_of(st.integers(0, 8), st.integers(MAX_COUNTER - 3, MAX_COUNTER)),
    st.sampled_from([SuspectRecord, DeadRecord]),
)
def test_a_claim_about_self_is_refuted_at_own_incarnation_plus_one(bumps, claim, kind) -> None:
    table = _table()
    for _ in range(bumps):
        table.refute(table.local.incarnation, 0.0)
    before, ahead = table.local.incarnation, table.counters.claims_ahead
    table.apply(kind("a", claim, "h"), 1.0)
    after = table.local.incarnation
    if claim < before:  # stale: corrected, not refuted
        assert after == before and table.corrections
    else:
        assert after == before + 1 and table.local.status is MemberStatus.ALIVE
    assert table.counters.claims_ahead == ahead + (claim > before)
    assert table.ask_evidence is (claim > before)


def test_evidence_is_asked_once_per_claimed_incarnation() -> None:
    table = _table()
    table.apply(SuspectRecord("a", 5, "b"), 1.0)
    assert table.ask_evidence and table.local.incarnation == 1
    table.ask_evidence = False
    table.apply(SuspectRecord("a", 5, "c"), 1.1)
    table.apply(DeadRecord("a", 5, "c"), 1.2)
    assert not table.ask_evidence and table.local.incarnation == 3
    table.apply(SuspectRecord("a", 9, "c"), 1.3)
    assert table.ask_evidence and table.counters.claims_ahead == 4


def test_own_records_from_an_earlier_life_are_outbid_at_their_incarnation_plus_one() -> None:
    table = _table()  # unsigned (simulations): the relays are trusted
    table.apply(AliveRecord("a", 5, 3, _state("a")), 1.0)
    assert table.local.incarnation == 6 and table.counters.claims_ahead == 0
    table.apply(LeftRecord("a", 8), 1.1)  # a LEFT this node signed in an earlier life
    assert table.local.incarnation == 9 and table.local.status is MemberStatus.ALIVE


def test_signed_own_record_is_evidence_and_a_forged_one_is_not() -> None:
    key, other = nacl.signing.SigningKey(b"\x01" * 32), nacl.signing.SigningKey(b"\x02" * 32)
    public = {"a": bytes(key.verify_key)}.get
    table = _table(Ed25519RecordAuthenticator(key, public))
    forger = Ed25519RecordAuthenticator(other, public)
    old = AliveRecord("a", 5, 3, _state("a"))
    forged = replace(old, signature=forger.sign(signed_body(old)))
    table.apply(forged, 1.0)
    assert table.local.incarnation == 0 and table.counters.impersonations_refused == 1
    genuine = replace(old, signature=Ed25519RecordAuthenticator(key, public).sign(signed_body(old)))
    table.apply(genuine, 1.1)
    assert table.local.incarnation == 6


# --- the core asks the claim's sender ---------------------------------------------------------


def _core(node_id: str = "a") -> Membership:
    known = [AliveRecord(p, 0, 1, _state(p)) for p in ("b", "c")]
    return Membership(node_id, _state(node_id), CONFIG, random.Random(3), 0.0, known_members=known)


def _digests_to(m: Membership) -> list[str]:
    return [
        o.to_node for o in m.drain_packets() if isinstance(decode_packet(o.data).header, Digest)
    ]


def test_a_gossiped_claim_ahead_starts_one_exchange_with_its_sender() -> None:
    m = _core()
    m.handle_packet("b", _gossip(SuspectRecord("a", 5, "b")), 1.0)
    assert _digests_to(m) == ["b"] and m.incarnation == 1
    m.handle_packet("c", _gossip(SuspectRecord("a", 5, "c"), DeadRecord("a", 5, "c")), 1.1)
    assert _digests_to(m) == []  # once per claimed incarnation
    m.handle_packet("c", _gossip(SuspectRecord("a", 2, "c")), 1.2)  # at our incarnation
    assert _digests_to(m) == []


def test_a_push_pull_carrying_a_claim_ahead_asks_nothing_more() -> None:
    m = _core()
    table = [encode_record(SuspectRecord("a", 5, "b"))]
    m.handle_packet("b", encode_packet(PushPull(), table), 1.0)
    assert _digests_to(m) == [] and not m.table.ask_evidence and m.incarnation == 1


# --- in a fleet -------------------------------------------------------------------------------


def test_two_lies_leave_the_node_refuting_and_alive_everywhere() -> None:
    cluster = MembershipCluster(CONFIG, seed=11)
    ids = cluster.warm_start(4)
    subject, liar = ids[0], ids[3]
    cluster.run_for(1.0)
    start = cluster.now
    cluster.network.inject(liar, subject, _gossip(SuspectRecord(subject, MAX_COUNTER - 1, liar)))
    cluster.run_for(0.1)
    lie = _gossip(SuspectRecord(subject, MAX_COUNTER, liar))
    for observer in ids[:3]:
        cluster.network.inject(liar, observer, lie)
    core = cluster.membership(subject)
    cluster.run_for(2 * CONFIG.suspicion_max_timeout(4))  # past any suspicion the lies started
    assert core.incarnation <= 2 and core.counters.claims_ahead >= 1
    assert _everyone_sees(cluster, subject, core.incarnation)
    assert not [
        e for e in cluster.log if e.subject == subject and e.kind == "dead" and e.at > start
    ]
    # still able to refute: an honest suspicion at its incarnation is answered above it
    before = core.incarnation
    cluster.network.call(ids[1], lambda c, now: c.table.suspect(subject, now))
    assert cluster.run_until(lambda: core.incarnation == before + 1, timeout=5)
    assert cluster.run_until(lambda: _everyone_sees(cluster, subject, before + 1), timeout=10)


def _fleet_holding_old_life(seed: int, old: int = 5) -> tuple[MembershipCluster, list[str]]:
    """A signed fleet of 5 whose tables all hold n0000's signed ALIVE record at ``old``."""
    config = replace(CONFIG, push_pull_interval=600.0)  # no periodic exchange brings it
    cluster = _signed_cluster(5, config, seed)
    ids = cluster.warm_start(5)

    def bump(core: Membership, now: float) -> None:
        for _ in range(old):
            core.table.refute(core.incarnation, now)

    cluster.network.call(ids[0], bump)
    assert cluster.run_until(lambda: _everyone_sees(cluster, ids[0], old), timeout=10)
    return cluster, ids


@pytest.mark.parametrize("old", [5, 40])
def test_restarted_node_gets_its_old_record_from_a_gossiped_claims_sender(old) -> None:
    # at 40, the copies of the claim alone (each refuted at i + 1) could not climb past it
    cluster, ids = _fleet_holding_old_life(seed=12, old=old)
    subject, accuser = ids[0], ids[1]
    peer = cluster.membership(accuser)
    known = [m.record for m in peer.members() if m.node_id != subject] + [peer.local_member.record]
    cluster.crash(subject)
    restarted = cluster.start_node(subject, known=known)  # no join: nothing brings the record
    start = cluster.now
    assert restarted.incarnation == 0
    cluster.network.call(accuser, lambda c, now: c.table.suspect(subject, now))  # SUSPECT(old)
    assert cluster.run_until(
        lambda: (
            restarted.incarnation > old and _everyone_sees(cluster, subject, restarted.incarnation)
        ),
        timeout=CONFIG.suspicion_min_timeout(5),
    )
    assert restarted.incarnation <= old + 2 and restarted.counters.claims_ahead >= 1
    cluster.run_for(2 * CONFIG.suspicion_max_timeout(5))
    assert _everyone_sees(cluster, subject, restarted.incarnation)
    assert not [
        e for e in cluster.log if e.subject == subject and e.kind == "dead" and e.at > start
    ]


def test_restarted_nodes_join_brings_its_old_signed_record() -> None:
    cluster, ids = _fleet_holding_old_life(seed=13)
    subject = ids[0]
    restarted = cluster.restart(subject, seeds=[ids[2]])
    assert cluster.run_until(lambda: restarted.joined, timeout=5)
    assert restarted.incarnation == 6 and restarted.counters.claims_ahead == 0
    assert cluster.run_until(lambda: _everyone_sees(cluster, subject, 6), timeout=10)
