"""Membership (session 37): the refutations a node sends back for stale claims, and the updates
piggybacked next to them, keep to the packet budget; a sender with many stale claims gets them
all in packets it can decode (one packet of them all could exceed one Noise message, which the
receiver refuses whole)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshinfer.proto.membership import Membership, MemberStatus
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_gossip import BroadcastQueue, UpdateFamily
from meshinfer.proto.membership_wire import (
    MAX_PACKET_BYTES,
    MAX_STATE_BYTES,
    AliveRecord,
    Gossip,
    ModelInfo,
    NodeState,
    SuspectRecord,
    decode_packet,
    encode_packet,
    encode_record,
    encode_state,
)


def small_state(name: str) -> NodeState:
    return NodeState(host=f"{name}.local", port=7946, static_key=bytes(32))


def big_state(name: str, size: int) -> NodeState:
    """A state whose encoding is just under ``size`` bytes (up to MAX_STATE_BYTES)."""
    best = NodeState()
    for count in range(11):
        models = tuple(
            ModelInfo(f"{name}-{i:02d}" + "m" * 50, "v1", b"d" * 32) for i in range(count)
        )
        for n in range(0, 254, 7):
            state = NodeState(host="h" * n, port=7946, static_key=bytes(32), models=models)
            if len(encode_state(best)) < len(encode_state(state)) <= size:
                best = state
    return best


def gossip(*records) -> bytes:
    return encode_packet(Gossip(), [encode_record(r) for r in records])


def core(config: MembershipConfig, known: list[AliveRecord]) -> Membership:
    return Membership("b", small_state("b"), config, random.Random(3), 0.0, known_members=known)


# --- 1. refutations of many stale claims -------------------------------------------------------


def test_refutations_of_many_stale_claims_reach_the_sender_in_packets_it_can_read() -> None:
    config = MembershipConfig.test()
    names = [f"m{i:03d}" for i in range(80)]
    # b holds every member refuted (ALIVE at incarnation 1), each with a near-full state
    known = [AliveRecord(n, 1, 1, big_state(n, MAX_STATE_BYTES - 60)) for n in names]
    known.append(AliveRecord("a", 0, 1, small_state("a")))
    b = core(config, known)
    # a missed every refutation: its gossip (within the budget) still suspects them all
    claims = [SuspectRecord(n, 0, "a") for n in names]
    packet = gossip(*claims)
    assert len(packet) <= config.packet_budget
    b.handle_packet("a", packet, 1.0)

    # a, which suspects them all at incarnation 0, reads every packet and drops every suspicion
    stale = [AliveRecord(n, 0, 1, r.state) for n, r in zip(names, known, strict=False)]
    a = Membership("a", small_state("a"), config, random.Random(4), 0.0, known_members=stale)
    for claim in claims:
        a.table.apply(SuspectRecord(claim.node_id, 0, "x"), 1.0)
    assert all(m.status is MemberStatus.SUSPECT for m in a.members())
    packets = b.drain_packets()
    for out in packets:
        assert out.to_node == "a"
        assert len(out.data) <= MAX_PACKET_BYTES  # was one packet of ~80 KB: refused whole
        records = decode_packet(out.data).records
        assert len(out.data) <= config.packet_budget or len(records) == 1
        a.handle_packet("b", out.data, 1.5)
    assert all(m.status is MemberStatus.ALIVE and m.incarnation == 1 for m in a.members())


def test_a_correction_does_not_carry_a_queued_record_past_the_budget() -> None:
    config = MembershipConfig(packet_budget=600)
    c = AliveRecord("c", 1, 1, small_state("c"))
    b = core(config, [c, AliveRecord("a", 0, 1, small_state("a"))])
    # a record that fits a packet of its own (600 bytes) but not next to a correction
    big = AliveRecord("big", 0, 1, big_state("big", 560))
    assert 540 < len(encode_record(big)) <= config.packet_budget - 3
    b.handle_packet("c", gossip(big), 1.0)
    b.drain_packets()
    b.handle_packet("a", gossip(SuspectRecord("c", 0, "a")), 1.0)  # stale: c refuted
    packets = b.drain_packets()
    assert packets, "the refutation goes back"
    for out in packets:
        assert len(out.data) <= config.packet_budget  # was 3 + c's record + the big one
    records = [r for out in packets for r in decode_packet(out.data).records]
    assert encode_record(c) in [encode_record(r) for r in records]
    # the big record was not dropped: the next packet with room carries it
    assert b.table.broadcasts.has("big", UpdateFamily.RECORD)


# --- 2. the queue: what no packet could fit goes alone, what one could waits ------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(8, 700), min_size=1, max_size=8),
    st.integers(8, 600),
    st.integers(0, 200),
)
def test_take_keeps_to_the_budget_unless_one_record_fits_no_packet(sizes, room, used) -> None:
    queue = BroadcastQueue()
    for i, size in enumerate(sizes):
        queue.enqueue(f"n{i}", UpdateFamily.RECORD, bytes([i]) * size)
    left = room - used
    chosen = queue.take(left, limit=5, packet_room=room)
    total = sum(map(len, chosen))
    if total > max(left, 0):
        # only a record larger than any packet's room goes over, and alone
        assert len(chosen) == 1 and len(chosen[0]) > room
    if left >= 8 and any(s <= left for s in sizes):
        assert chosen  # something that fits is always sent
