"""Digest anti-entropy: three packets carrying only what the two tables hold differently.

The digest exchange must leave both tables knowing what a whole-table push-pull would have
taught them (a Hypothesis property against the old exchange run on twin tables), cost a few
bytes per member when the tables agree, and keep the push-pull rules: the gone are not learned,
a full table asks for no newcomer, and a stale suspicion about either side is refuted.
"""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.proto.membership import Membership, MemberStatus
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_wire import (
    AliveRecord,
    DeadRecord,
    Digest,
    DigestReply,
    Gossip,
    LeftRecord,
    NodeState,
    PushPull,
    SuspectRecord,
    decode_packet,
    encode_packet,
    encode_record,
)
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.fleet import make_fleet
from tests.helpers import seed_of, until

CONFIG = MembershipConfig.test()
MEMBERS = ["m1", "m2", "m3", "m4"]


def state(name: str) -> NodeState:
    return NodeState(host=f"{name}.local", port=7946, static_key=bytes(32), roles=("vehicle",))


def core(node_id: str, known=("m1", "m2"), config: MembershipConfig = CONFIG) -> Membership:
    records = [AliveRecord(p, 0, 1, state(p)) for p in ("a", "b", *known) if p != node_id]
    return Membership(
        node_id, state(node_id), config, random.Random(11), 0.0, known_members=records
    )


def gossip(*records) -> bytes:
    return encode_packet(Gossip(), [encode_record(r) for r in records])


def exchange(a: Membership, b: Membership, first: bytes, now: float) -> list:
    """Deliver ``first`` (a's opening packet) to b, then every packet between the two until
    none is left; packets for other nodes are dropped. Returns the decoded packets in order."""
    a.drain_packets()
    b.drain_packets()
    nodes = {"a": a, "b": b}
    queue, seen = [("a", "b", first)], []
    while queue:
        sender, to, data = queue.pop(0)
        seen.append(decode_packet(data))
        nodes[to].handle_packet(sender, data, now)
        queue += [
            (to, out.to_node, out.data) for out in nodes[to].drain_packets() if out.to_node in nodes
        ]
    return seen


def entries(m: Membership) -> dict[str, tuple]:
    """What ``m``'s table says about each member (the digest's own summary, decoded)."""
    packet = decode_packet(encode_packet(Digest(), m.table.digest()))
    return {e.node_id: tuple(e) for e in packet.entries}


def record_about(draw_kind: str, node: str, inc: int, version: int, accuser: str):
    if draw_kind == "alive":
        return AliveRecord(node, inc, version, state(node))
    if draw_kind == "suspect":
        return SuspectRecord(node, inc, accuser)
    if draw_kind == "dead":
        return DeadRecord(node, inc, accuser)
    return LeftRecord(node, inc)


records = st.builds(
    record_about,
    st.sampled_from(["alive", "alive", "suspect", "dead", "left"]),
    st.sampled_from(["a", "b", *MEMBERS]),
    st.integers(0, 3),
    st.integers(1, 3),
    st.sampled_from(["c", "d"]),
)


def twins(history_a, history_b, digests: bool) -> tuple[Membership, Membership]:
    config = replace(CONFIG, push_pull_digests=digests)
    a, b = core("a", config=config), core("b", ("m2", "m3"), config=config)
    for m, history in ((a, history_a), (b, history_b)):
        for step, record in enumerate(history):
            m.handle_packet("z", gossip(record), 0.01 * step)
    return a, b


@settings(max_examples=300, deadline=None)
@given(st.lists(records, max_size=10), st.lists(records, max_size=10))
def test_a_digest_exchange_teaches_both_sides_what_a_whole_table_exchange_does(ha, hb) -> None:
    full_a, full_b = twins(ha, hb, digests=False)
    dig_a, dig_b = twins(ha, hb, digests=True)
    exchange(full_a, full_b, encode_packet(PushPull(), full_a.table.encoded_table()), 1.0)
    exchange(dig_a, dig_b, encode_packet(Digest(), dig_a.table.digest()), 1.0)
    for full, dig in ((full_a, dig_a), (full_b, dig_b)):
        got, want = entries(dig), entries(full)
        others = set(got) | set(want)
        others -= {"a", "b"}  # self-claims: see the refutation test
        assert {n: got.get(n) for n in others} == {n: want.get(n) for n in others}


def test_tables_that_agree_exchange_a_digest_and_an_empty_reply_only() -> None:
    known = [f"m{i}" for i in range(200)]
    a, b = core("a", known), core("b", known)
    digest = encode_packet(Digest(), a.table.digest())
    packets = exchange(a, b, digest, 1.0)
    assert [type(p.header) for p in packets] == [Digest, DigestReply]
    assert packets[1].header.wants == () and packets[1].records == ()
    whole = encode_packet(PushPull(), a.table.encoded_table())
    assert len(digest) * 4 < len(whole)  # ~20 bytes a member against a whole ALIVE record


def test_each_side_learns_the_members_and_versions_only_the_other_had() -> None:
    a, b = core("a", ("m1", "m2")), core("b", ("m2", "m3"))
    a.handle_packet("z", gossip(AliveRecord("m2", 0, 5, state("m2"))), 0.5)
    packets = exchange(a, b, encode_packet(Digest(), a.table.digest()), 1.0)
    assert [type(p.header) for p in packets] == [Digest, DigestReply, PushPull]
    assert packets[2].header.response  # the last step asks for nothing back
    assert set(packets[1].header.wants) == {"m1", "m2"}
    assert {r.node_id for r in packets[1].records} == {"m2", "m3"}  # m2: b's own version
    for m in (a, b):
        assert {x.node_id for x in m.table.members()} >= {"m1", "m2", "m3"}
        assert m.member("m2").version == 5


def test_the_gone_are_not_learned_and_a_full_table_asks_for_no_newcomer() -> None:
    a, b = core("a", ("m1", "m2", "m4")), core("b", ())
    a.handle_packet("z", gossip(LeftRecord("m4", 1)), 0.5)
    small = replace(CONFIG, max_members=3)  # b, a and one more
    full_b = Membership(
        "b", state("b"), small, random.Random(1), 0.0,
        known_members=[AliveRecord("a", 0, 1, state("a")), AliveRecord("m9", 0, 1, state("m9"))],
    )  # fmt: skip
    for other, asked in ((b, {"m1", "m2"}), (full_b, set())):
        packets = exchange(a, other, encode_packet(Digest(), a.table.digest()), 1.0)
        assert set(packets[1].header.wants) == asked
        assert other.member("m4") is None


def test_a_stale_suspicion_about_either_side_is_refuted_in_the_same_exchange() -> None:
    a, b = core("a"), core("b")
    b.handle_packet("z", gossip(SuspectRecord("a", 0, "c")), 0.5)  # b suspects a
    a.handle_packet("z", gossip(SuspectRecord("b", 0, "c")), 0.5)  # a suspects b
    packets = exchange(a, b, encode_packet(Digest(), a.table.digest()), 1.0)
    assert [type(p.header) for p in packets] == [Digest, DigestReply, PushPull, Gossip]
    assert a.table.local.incarnation == 1 and b.table.local.incarnation == 1
    assert b.member("a").status is MemberStatus.ALIVE and b.member("a").incarnation == 1
    assert a.member("b").status is MemberStatus.ALIVE and a.member("b").incarnation == 1


def test_timers_send_digests_and_whole_tables_only_when_digests_are_off() -> None:
    for digests, opening in ((True, Digest), (False, PushPull)):
        config = replace(CONFIG, push_pull_digests=digests)
        m, kinds, now = core("a", config=config), set(), 0.0
        while now < 3 * config.push_pull_interval:
            now = m.next_deadline()
            m.tick(now)
            kinds |= {type(decode_packet(out.data).header) for out in m.drain_packets()}
        assert opening in kinds and ({Digest, PushPull} - {opening}).isdisjoint(kinds)


# --- real nodes over TCP and Noise -------------------------------------------------------------


async def test_daemons_reconcile_by_digest_over_noise_sessions_with_signed_records() -> None:
    # three signing nodes; car-2 learns car-1 from the hub's gossip, then every anti-entropy
    # round is a digest that the other side answers without a refused packet, and the three
    # tables agree
    fleet = make_fleet(None, ["hub", "car-1", "car-2"])
    config = replace(MembershipConfig.test(), push_pull_interval=0.3)
    hub = MeshNode(fleet.identities["hub"], fleet.revocations, mesh_options(config))
    await hub.start()
    cars = [
        MeshNode(fleet.identities[n], fleet.revocations, mesh_options(config, [seed_of(hub)]))
        for n in ("car-1", "car-2")
    ]
    nodes = [hub, *cars]
    try:
        for car in cars:
            await car.start()
        await until(lambda: all(len(n.live_members()) == 2 for n in nodes), timeout=20)
        start = {n.node_id: n.membership.core.counters.digests for n in nodes}
        await until(
            lambda: all(n.membership.core.counters.digests >= start[n.node_id] + 3 for n in nodes),
            timeout=20,
        )
        for node in nodes:
            assert node.membership.protocol_errors == 0
            assert node.membership.core.counters.impersonations_refused == 0
        views = [entries(n.membership.core) for n in nodes]
        assert views[0] == views[1] == views[2]
    finally:
        for node in nodes:
            await node.aclose()


def mesh_options(config: MembershipConfig, seeds=()) -> MeshNodeOptions:
    return MeshNodeOptions(membership=config, mdns=None, seeds=list(seeds))
