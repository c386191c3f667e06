"""The sans-I/O membership core on its own: packets in by hand, packets and events out."""

from __future__ import annotations

import random
from dataclasses import replace

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.errors import LocalProtocolError
from meshinfer.proto.membership import MemberEventKind, Membership, MemberStatus
from meshinfer.proto.membership_auth import Ed25519RecordAuthenticator
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_table import LIVENESS
from meshinfer.proto.membership_wire import (
    Ack,
    AliveRecord,
    DeadRecord,
    Gossip,
    LeftRecord,
    MembershipProtocolError,
    Nack,
    NodeState,
    Ping,
    PingReq,
    PushPull,
    RecordKind,
    SuspectRecord,
    decode_packet,
    encode_packet,
    encode_record,
    signed_body,
)

CONFIG = MembershipConfig.test()
PEERS = ["b", "c", "d", "e", "f"]


def state(name: str) -> NodeState:
    return NodeState(host=f"{name}.local", port=7946, static_key=bytes(32), roles=("vehicle",))


def core(node_id: str = "a", peers=PEERS, **kwargs) -> Membership:
    known = [AliveRecord(p, 0, 1, state(p)) for p in peers]
    return Membership(
        node_id, state(node_id), CONFIG, random.Random(7), 0.0, known_members=known, **kwargs
    )


def gossip(*records) -> bytes:
    return encode_packet(Gossip(), [encode_record(r) for r in records])


def sent(m: Membership):
    """Decoded packets the core wants to send: [(to, Packet)]."""
    return [(out.to_node, decode_packet(out.data)) for out in m.drain_packets()]


def run_until_probe(m: Membership) -> tuple[str, int, float]:
    """Tick until the core pings someone; returns (target, seq, time)."""
    now = 0.0
    while True:
        now = m.next_deadline()
        m.tick(now)
        for to, packet in sent(m):
            if isinstance(packet.header, Ping):
                return to, packet.header.seq, now


def kinds(m: Membership) -> list[tuple[MemberEventKind, str]]:
    return [(e.kind, e.member.node_id) for e in m.drain_events()]


# --- the failure detector ----------------------------------------------------------------------


def test_ping_is_answered_with_an_ack_carrying_the_same_seq() -> None:
    m = core()
    m.handle_packet("b", encode_packet(Ping(41, "a")), 1.0)
    [(to, packet)] = sent(m)
    assert to == "b" and packet.header == Ack(41)


def test_ping_for_another_node_is_not_answered() -> None:
    m = core()
    m.handle_packet("b", encode_packet(Ping(41, "c")), 1.0)
    assert sent(m) == [] and m.counters.misdirected_pings == 1


def test_unanswered_probe_asks_relays_then_suspects_and_lowers_local_health() -> None:
    m = core()
    target, seq, start = run_until_probe(m)
    m.tick(start + CONFIG.probe_timeout)
    packets = [(to, p.header) for to, p in sent(m)]
    reqs = [(to, h) for to, h in packets if isinstance(h, PingReq)]
    assert len(reqs) == CONFIG.indirect_checks
    assert all(h == PingReq(seq, target) and to != target for to, h in reqs)
    assert (target, Ping(seq, target)) in packets  # and one more direct try
    m.tick(start + CONFIG.probe_interval)
    assert (MemberEventKind.SUSPECT, target) in kinds(m)
    assert m.member(target).status is MemberStatus.SUSPECT
    assert m.health_score == CONFIG.indirect_checks  # no relay sent a nack: we are the problem
    assert m.counters.probe_failures == 1


def test_nacks_from_relays_keep_local_health() -> None:
    m = core()
    target, seq, start = run_until_probe(m)
    m.tick(start + CONFIG.probe_timeout)
    relays = [to for to, p in sent(m) if isinstance(p.header, PingReq)]
    for relay in relays:
        m.handle_packet(relay, encode_packet(Nack(seq)), start + 0.4)
    m.tick(start + CONFIG.probe_interval)
    assert m.member(target).status is MemberStatus.SUSPECT
    assert m.health_score == 0


def test_ack_forwarded_by_a_relay_saves_the_target() -> None:
    m = core()
    target, seq, start = run_until_probe(m)
    m.tick(start + CONFIG.probe_timeout)
    relay = next(to for to, p in sent(m) if isinstance(p.header, PingReq))
    m.handle_packet(relay, encode_packet(Ack(seq)), start + 0.3)
    m.tick(start + CONFIG.probe_interval)
    assert m.member(target).status is MemberStatus.ALIVE
    assert kinds(m) == []


def test_ack_from_a_node_that_was_not_asked_is_refused_and_counted() -> None:
    m = core()
    target, seq, start = run_until_probe(m)
    impostor = next(p for p in PEERS if p != target)
    m.handle_packet(impostor, encode_packet(Ack(seq)), start + 0.01)
    assert m.counters.impersonations_refused == 1
    m.tick(start + CONFIG.probe_timeout)
    m.tick(start + CONFIG.probe_interval)
    assert m.member(target).status is MemberStatus.SUSPECT  # the forged ack did not count


def test_probe_acks_measure_a_smoothed_round_trip_to_the_target() -> None:
    m = core()
    target, seq, start = run_until_probe(m)
    assert m.rtt(target) is None  # nothing measured before the first ack
    m.handle_packet(target, encode_packet(Ack(seq)), start + 0.040)
    assert m.rtt(target) == pytest.approx(0.040)
    assert all(m.rtt(p) is None for p in PEERS if p != target)  # only the probed node
    # The next probe of the same node folds its sample in (an exponential moving average).
    while True:
        again, seq, start = run_until_probe(m)
        if again == target:
            break
        m.handle_packet(again, encode_packet(Ack(seq)), start + 0.001)
    m.handle_packet(target, encode_packet(Ack(seq)), start + 0.080)
    assert 0.040 < m.rtt(target) < 0.080


def test_an_ack_that_came_late_or_through_a_relay_counts_the_whole_wait() -> None:
    m = core()
    target, seq, start = run_until_probe(m)
    m.tick(start + CONFIG.probe_timeout)
    relay = next(to for to, p in sent(m) if isinstance(p.header, PingReq))
    m.handle_packet(relay, encode_packet(Ack(seq)), start + 0.3)
    assert m.rtt(target) == pytest.approx(0.3)  # slow to reach, never a stale fast figure
    assert m.rtt(relay) is None


def test_round_trips_of_a_member_that_is_no_longer_live_are_not_reported() -> None:
    m = core()
    target, seq, start = run_until_probe(m)
    m.handle_packet(target, encode_packet(Ack(seq)), start + 0.010)
    m.handle_packet("b", gossip(DeadRecord(target, 0, "b")), start + 0.02)
    assert m.member(target).status is MemberStatus.DEAD
    assert m.rtt(target) is None


def test_relay_pings_the_target_and_forwards_its_ack_or_sends_a_nack() -> None:
    m = core()
    m.handle_packet("b", encode_packet(PingReq(77, "c")), 1.0)
    [(to, packet)] = sent(m)
    assert to == "c" and isinstance(packet.header, Ping)
    m.handle_packet("d", encode_packet(Ack(packet.header.seq)), 1.01)  # not the target
    assert m.counters.impersonations_refused == 1 and sent(m) == []
    m.handle_packet("c", encode_packet(Ack(packet.header.seq)), 1.02)
    assert [(to, p.header) for to, p in sent(m)] == [("b", Ack(77))]
    m.handle_packet("b", encode_packet(PingReq(78, "e")), 2.0)
    headers = [(to, p.header) for to, p in sent(m)]
    while ("b", Nack(78)) not in headers and m.next_deadline() < 2.5:
        m.tick(m.next_deadline())
        headers = [(to, p.header) for to, p in sent(m)]
    assert ("b", Nack(78)) in headers


# --- refutation, incarnations ------------------------------------------------------------------


@pytest.mark.parametrize("claim", [SuspectRecord("a", 0, "b"), DeadRecord("a", 0, "b")])
def test_a_suspected_or_dead_node_refutes_with_a_higher_incarnation(claim) -> None:
    m = core()
    m.handle_packet("b", gossip(claim), 1.0)
    assert m.incarnation == 1 and m.counters.refutations == 1
    m.handle_packet("c", encode_packet(Ping(5, "a")), 1.1)
    [(_, ack)] = sent(m)
    assert AliveRecord("a", 1, 1, state("a")) in ack.records  # the refutation rides the ack


def test_stale_claims_about_self_are_ignored() -> None:
    m = core()
    m.handle_packet("b", gossip(SuspectRecord("a", 0, "b")), 1.0)
    m.handle_packet("c", gossip(SuspectRecord("a", 0, "c")), 1.1)
    assert m.incarnation == 1


def test_restarted_node_learns_its_old_incarnation_and_bumps_past_it() -> None:
    m = core(peers=[])
    m.join(["b"], 0.0)
    [(to, packet)] = sent(m)
    assert to == "b" and packet.header == PushPull(join=True)
    old = [AliveRecord("a", 6, 9, state("a")), DeadRecord("a", 6, "c")]
    table = [encode_record(r) for r in [AliveRecord("b", 0, 1, state("b")), *old]]
    m.handle_packet("b", encode_packet(PushPull(join=True, response=True), table), 0.1)
    assert m.joined and m.incarnation == 7
    assert m.member("b").status is MemberStatus.ALIVE


def test_join_is_retried_until_a_seed_answers() -> None:
    m = core(peers=[])
    m.join(["b"], 0.0)
    sent(m)
    m.tick(CONFIG.join_retry_interval)
    assert any(p.header == PushPull(join=True) for _, p in sent(m))


def test_alive_with_higher_incarnation_revives_a_dead_member_but_equal_does_not() -> None:
    m = core()
    m.handle_packet("c", gossip(DeadRecord("b", 0, "c")), 1.0)
    assert m.member("b").status is MemberStatus.DEAD
    m.handle_packet("c", gossip(AliveRecord("b", 0, 2, state("b"))), 1.1)
    assert m.member("b").status is MemberStatus.DEAD and m.member("b").version == 2
    m.handle_packet("c", gossip(AliveRecord("b", 1, 2, state("b"))), 1.2)
    assert m.member("b").status is MemberStatus.ALIVE
    events = kinds(m)
    assert events[0] == (MemberEventKind.DEAD, "b") and events[-1] == (MemberEventKind.ALIVE, "b")


def test_push_pull_applies_remote_deaths_as_suspicion_only() -> None:
    m = core()
    table = [
        encode_record(r) for r in [AliveRecord("b", 0, 1, state("b")), DeadRecord("b", 0, "c")]
    ]
    m.handle_packet("c", encode_packet(PushPull(), table), 1.0)
    assert m.member("b").status is MemberStatus.SUSPECT
    assert any(isinstance(p.header, PushPull) and p.header.response for _, p in sent(m))


def test_push_pull_does_not_learn_members_it_only_hears_of_as_gone() -> None:
    m = core()
    gone = [AliveRecord("z", 0, 1, state("z")), LeftRecord("z", 1)]
    m.handle_packet("c", encode_packet(PushPull(), [encode_record(r) for r in gone]), 1.0)
    assert m.member("z") is None


def test_suspicion_shrinks_with_confirmations_then_declares_dead() -> None:
    m = core()  # n = 6: k = suspicion_mult - 2 = 1, min = 3 * 1 * 0.5 s, max = 4 * min
    m.handle_packet("b", gossip(SuspectRecord("f", 0, "b")), 0.0)
    assert m.table.next_suspicion_deadline() == pytest.approx(6.0)
    m.handle_packet("b", gossip(SuspectRecord("f", 0, "b")), 0.1)  # same accuser: no change
    assert m.table.next_suspicion_deadline() == pytest.approx(6.0)
    m.handle_packet("c", gossip(SuspectRecord("f", 0, "c")), 0.1)
    assert m.table.next_suspicion_deadline() == pytest.approx(1.5)
    m.tick(1.49)
    assert m.member("f").status is MemberStatus.SUSPECT
    m.tick(1.5)
    assert m.member("f").status is MemberStatus.DEAD
    assert m.counters.deaths_declared == 1


# --- state updates, leave ----------------------------------------------------------------------


def test_update_local_state_bumps_the_version_and_is_gossiped() -> None:
    m = core()
    m.update_local_state(replace(m.local_state, queue_depth=4), 0.0)
    assert m.local_member.version == 2
    m.tick(m.next_deadline())
    records = [r for _, p in sent(m) for r in p.records]
    assert AliveRecord("a", 0, 2, replace(state("a"), queue_depth=4)) in records


def test_oversized_state_is_a_local_error() -> None:
    m = core()
    with pytest.raises(LocalProtocolError):
        m.update_local_state(replace(m.local_state, roles=("r" * 32,) * 8, host="h" * 900), 0.0)


def test_newer_state_replaces_older_and_older_is_ignored() -> None:
    m = core()
    m.handle_packet("b", gossip(AliveRecord("b", 0, 5, replace(state("b"), queue_depth=5))), 1.0)
    m.handle_packet("c", gossip(AliveRecord("b", 0, 3, replace(state("b"), queue_depth=3))), 1.1)
    assert m.member("b").state.queue_depth == 5
    assert kinds(m) == [(MemberEventKind.UPDATED, "b")]


def test_leave_announces_left_and_is_not_refuted_afterwards() -> None:
    m = core()
    m.leave(1.0)
    packets = sent(m)
    assert packets and all(LeftRecord("a", 1) in p.records for _, p in packets)
    m.handle_packet("b", gossip(DeadRecord("a", 1, "b")), 1.1)
    assert m.local_member.status is MemberStatus.LEFT and m.counters.refutations == 0
    with pytest.raises(LocalProtocolError):
        m.update_local_state(state("a"), 1.2)
    now = 1.0
    while not m.leave_announced:
        now = m.next_deadline()
        m.tick(now)
    assert now < 1.0 + 10 * CONFIG.gossip_interval


def test_a_node_with_no_live_member_has_announced_its_leave_at_once() -> None:
    """Nobody to tell: the leave is done (a lone daemon's SIGTERM does not wait out the leave
    timeout). One that knows only dead members is as alone."""
    alone = core(peers=())
    alone.leave(1.0)
    assert alone.leave_announced and alone.drain_packets() == []
    m = core(peers=("b",))
    m.handle_packet("c", gossip(DeadRecord("b", 1, "c")), 0.5)
    assert m.member("b").status is MemberStatus.DEAD and not m.live_members()
    m.leave(1.0)
    assert m.leave_announced


def test_receiver_marks_left_not_dead() -> None:
    m = core()
    m.handle_packet("b", gossip(LeftRecord("b", 1)), 1.0)
    assert m.member("b").status is MemberStatus.LEFT
    m.handle_packet("c", gossip(DeadRecord("b", 1, "c")), 1.1)
    assert m.member("b").status is MemberStatus.LEFT


def test_dead_members_are_forgotten_after_the_reclaim_time() -> None:
    m = core()
    m.handle_packet("c", gossip(DeadRecord("b", 0, "c")), 1.0)
    m.tick(1.0 + CONFIG.dead_node_reclaim_time)
    assert m.member("b") is None
    assert (MemberEventKind.FORGOTTEN, "b") in kinds(m)


def test_malformed_packet_raises_and_changes_nothing() -> None:
    m = core()
    with pytest.raises(MembershipProtocolError):
        m.handle_packet("b", gossip(SuspectRecord("a", 0, "b")) + b"\xc1", 1.0)
    assert m.incarnation == 0


def test_next_deadline_is_always_in_the_future_after_tick() -> None:
    m = core()
    now = 0.0
    for _ in range(200):
        now = m.next_deadline()
        m.tick(now)
        assert m.next_deadline() > now
        sent(m)


# --- impersonation with signed records ---------------------------------------------------------


class Fleet:
    """Ed25519 keys for a few nodes, and the public key lookup every node uses."""

    def __init__(self, names) -> None:
        self.keys = {n: nacl.signing.SigningKey.generate() for n in names}

    def public(self, node_id: str) -> bytes | None:
        key = self.keys.get(node_id)
        return None if key is None else bytes(key.verify_key)

    def auth(self, node_id: str) -> Ed25519RecordAuthenticator:
        return Ed25519RecordAuthenticator(self.keys[node_id], self.public)

    def signed(self, record, signer: str):
        return replace(record, signature=self.auth(signer).sign(signed_body(record)))


def test_signed_records_relayed_by_others_are_accepted() -> None:
    fleet = Fleet(["a", "b", "c"])
    m = Membership("a", state("a"), CONFIG, random.Random(1), 0.0, authenticator=fleet.auth("a"))
    alive_b = fleet.signed(AliveRecord("b", 0, 1, state("b")), "b")
    m.handle_packet("c", gossip(alive_b), 1.0)
    assert m.member("b").status is MemberStatus.ALIVE
    m.handle_packet("c", gossip(fleet.signed(LeftRecord("b", 1), "b")), 1.1)
    assert m.member("b").status is MemberStatus.LEFT
    assert m.counters.impersonations_refused == 0


def test_impersonation_of_another_node_is_refused_and_counted() -> None:
    fleet = Fleet(["a", "b", "c"])
    m = Membership("a", state("a"), CONFIG, random.Random(1), 0.0, authenticator=fleet.auth("a"))
    m.handle_packet("b", gossip(fleet.signed(AliveRecord("b", 0, 1, state("b")), "b")), 1.0)
    hijack = AliveRecord("b", 5, 9, replace(state("b"), host="evil.example"))
    m.handle_packet("c", gossip(fleet.signed(hijack, "c")), 1.1)  # c signs a claim about b
    m.handle_packet("c", gossip(hijack), 1.2)  # or does not sign at all
    m.handle_packet("c", gossip(fleet.signed(LeftRecord("b", 3), "c")), 1.3)  # forged leave
    m.handle_packet("c", gossip(fleet.signed(AliveRecord("z", 0, 1, state("z")), "c")), 1.4)
    assert m.counters.impersonations_refused == 4
    member = m.member("b")
    assert member.status is MemberStatus.ALIVE and member.state.host == "b.local"
    assert member.incarnation == 0 and m.member("z") is None


def test_forged_claim_about_self_is_refused_not_refuted() -> None:
    fleet = Fleet(["a", "c"])
    m = Membership("a", state("a"), CONFIG, random.Random(1), 0.0, authenticator=fleet.auth("a"))
    forged = fleet.signed(AliveRecord("a", 4, 1, replace(state("a"), host="evil")), "c")
    m.handle_packet("c", gossip(forged), 1.0)
    assert m.counters.impersonations_refused == 1 and m.incarnation == 0


# --- the transition table and random sequences of claims ---------------------------------------


def test_liveness_table_never_revives_without_a_strictly_higher_incarnation() -> None:
    for (status, kind), (strictly_higher, new_status) in LIVENESS.items():
        if new_status is MemberStatus.ALIVE:
            assert kind is RecordKind.ALIVE and strictly_higher, (status, kind)
        if status in (MemberStatus.DEAD, MemberStatus.LEFT):
            assert new_status in (MemberStatus.ALIVE, MemberStatus.LEFT), (status, kind)
    assert (MemberStatus.LEFT, RecordKind.DEAD) not in LIVENESS
    assert (MemberStatus.LEFT, RecordKind.SUSPECT) not in LIVENESS


subjects = st.sampled_from(["a", "b", "c"])
incarnations = st.integers(0, 4)
accusers = st.sampled_from(["b", "c", "d"])
claims = st.one_of(
    st.builds(lambda n, i, v: AliveRecord(n, i, v, state(n)), subjects, incarnations, incarnations),
    st.builds(SuspectRecord, subjects, incarnations, accusers),
    st.builds(DeadRecord, subjects, incarnations, accusers),
    st.builds(LeftRecord, subjects, incarnations),
)
steps = st.lists(
    st.tuples(claims, st.booleans(), st.floats(0, 3)),  # (claim, via push-pull?, time gap)
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps)
def test_random_claims_respect_the_incarnation_rules(sequence) -> None:
    m = core(peers=["b"])
    now, last_seen = 0.0, {}
    for claim, via_push_pull, gap in sequence:
        now += gap
        header = PushPull(response=True) if via_push_pull else Gossip()
        before_local = m.incarnation
        m.handle_packet("d", encode_packet(header, [encode_record(claim)]), now)
        m.tick(now)
        for event in m.drain_events():
            member, previous = event.member, last_seen.get(event.member.node_id)
            if previous is not None and event.kind is not MemberEventKind.FORGOTTEN:
                assert member.incarnation >= previous.incarnation
                assert member.record.key >= previous.record.key
                if previous.status in (MemberStatus.DEAD, MemberStatus.LEFT) and member.is_live:
                    assert member.incarnation > previous.incarnation
            last_seen[member.node_id] = None if event.kind is MemberEventKind.FORGOTTEN else member
        local = m.local_member
        assert local.status is MemberStatus.ALIVE and m.incarnation >= before_local
        if claim.node_id == "a" and not isinstance(claim, AliveRecord):
            # a SUSPECT/DEAD is answered one above our own number, whatever it claims (a
            # liar's high number would spend our incarnations); our own LEFT is outbid
            answer = claim.incarnation + 1 if isinstance(claim, LeftRecord) else before_local + 1
            assert claim.incarnation < before_local or m.incarnation == answer
