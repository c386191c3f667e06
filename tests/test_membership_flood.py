"""A member that floods the membership table with made-up members.

Every member holds a fleet certificate, but ALIVE records are relayed self-claims: nothing
stops a hostile member from inventing node ids. One push-pull of ~130,000 made-up records used
to grow the table (and the probe order, the gossip queue, everything keyed by member) without
bound and hold the event loop for seconds. The table now holds at most
``MembershipConfig.max_members`` members (this node included) and a packet is read up to
``max_packet_records()`` records (a whole table of that size), so an honest node still joins a
full fleet in one push-pull. Times are not asserted: the structure is.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest

from meshinfer.errors import ConfigError
from meshinfer.proto.membership import MemberEventKind, Membership, MemberStatus
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_wire import (
    MAX_RECORDS,
    AliveRecord,
    DeadRecord,
    Gossip,
    NodeState,
    PushPull,
    SuspectRecord,
    decode_packet,
    encode_packet,
    encode_record,
)
from meshinfer.runtime.mesh_metrics import mesh_families

DEFAULT_MAX_MEMBERS = 4096  # written out, so the first test also fails on a core without a cap
HONEST = ["b", "c", "d"]


def _state(node_id: str) -> NodeState:
    return NodeState(host=f"{node_id}.local", port=7946, static_key=bytes(32))


def _core(config: MembershipConfig, peers: list[str] = HONEST) -> Membership:
    known = [AliveRecord(p, 0, 1, _state(p)) for p in peers]
    return Membership("a", _state("a"), config, random.Random(7), 0.0, known_members=known)


def _small(max_members: int) -> MembershipConfig:
    return replace(MembershipConfig.test(), max_members=max_members)


def _fakes(count: int, prefix: str = "fake") -> list[bytes]:
    """``count`` made-up members, as small as an ALIVE record gets (~25 bytes each)."""
    return [encode_record(AliveRecord(f"{prefix}{i}", 0, 1, NodeState())) for i in range(count)]


def _size(node: Membership) -> int:
    """Members in the table, this node included."""
    return len(node.members()) + 1


def test_a_hostile_push_pull_leaves_the_table_at_most_max_members() -> None:
    """500 made-up members past the default cap: the table stops at the cap, every refusal is
    counted, the known members keep their place, and the answer is an ordinary table."""
    node = _core(MembershipConfig.test())
    node.handle_packet("h", encode_packet(PushPull(), _fakes(DEFAULT_MAX_MEMBERS + 500)), 1.0)
    assert _size(node) == DEFAULT_MAX_MEMBERS
    assert node.config.max_members == DEFAULT_MAX_MEMBERS
    assert node.counters.members_refused == 500 + len(HONEST) + 1  # the known ones took room
    assert all(node.member(p).status is MemberStatus.ALIVE for p in HONEST)
    joined = [e for e in node.drain_events() if e.kind is MemberEventKind.JOINED]
    assert len(joined) == DEFAULT_MAX_MEMBERS - 1 - len(HONEST)
    (answer,) = node.drain_packets()
    assert len(decode_packet(answer.data).records) == DEFAULT_MAX_MEMBERS


def test_gossip_cannot_grow_a_full_table_either() -> None:
    """Made-up members in ordinary gossip packets are refused the same way, one by one."""
    node = _core(_small(8))
    for start in range(0, 20, 5):
        records = [encode_record(AliveRecord(f"g{start + i}", 0, 1, NodeState())) for i in range(5)]
        node.handle_packet("h", encode_packet(Gossip(), records), 1.0)
    assert _size(node) == 8 and node.counters.members_refused == 20 - (8 - 1 - len(HONEST))


def test_a_full_table_still_applies_news_about_known_members_and_refutes() -> None:
    """The cap only refuses node ids it does not know: known members are updated, suspected and
    revived as before, and this node still refutes a suspicion about itself."""
    node = _core(_small(8))
    node.handle_packet("h", encode_packet(PushPull(), _fakes(20)), 1.0)
    assert _size(node) == 8
    newer = AliveRecord("b", 0, 2, replace(_state("b"), queue_depth=5))
    node.handle_packet("c", encode_packet(Gossip(), [encode_record(newer)]), 2.0)
    assert node.member("b").state.queue_depth == 5
    node.handle_packet("c", encode_packet(Gossip(), [encode_record(DeadRecord("d", 0, "c"))]), 2.0)
    assert node.member("d").status is MemberStatus.DEAD
    revived = AliveRecord("d", 1, 1, _state("d"))
    node.handle_packet("d", encode_packet(Gossip(), [encode_record(revived)]), 2.1)
    assert node.member("d").status is MemberStatus.ALIVE
    node.handle_packet("h", encode_packet(Gossip(), [encode_record(SuspectRecord("a", 0, "h"))]), 3)
    assert node.incarnation == 1 and node.counters.refutations == 1


def test_reaping_dead_members_frees_room_for_new_ones() -> None:
    """Made-up members fill the table, are declared dead and forgotten after
    ``dead_node_reclaim_time``: then a real newcomer is learned."""
    config = _small(8)
    node = _core(config)
    fakes = _fakes(20)
    node.handle_packet("h", encode_packet(PushPull(), fakes), 1.0)
    newcomer = encode_packet(Gossip(), [encode_record(AliveRecord("e", 0, 1, _state("e")))])
    node.handle_packet("b", newcomer, 1.5)
    assert node.member("e") is None
    deaths = [
        encode_record(DeadRecord(m.node_id, 0, "b"))
        for m in node.members()
        if m.node_id.startswith("fake")
    ]
    node.handle_packet("b", encode_packet(Gossip(), deaths), 2.0)
    node.tick(2.0 + config.dead_node_reclaim_time)
    assert _size(node) == 1 + len(HONEST)
    node.handle_packet("b", newcomer, 200.0)
    assert node.member("e").status is MemberStatus.ALIVE


def test_an_honest_node_joins_a_fleet_of_max_members_in_one_push_pull() -> None:
    """A seed whose table is full (some members dead, so its push-pull carries their status
    records too) answers a join: the joiner learns every live member from that one answer."""
    config = MembershipConfig.test()
    others = [f"n{i}" for i in range(config.max_members - 1)]
    seed = Membership(
        "seed",
        _state("seed"),
        config,
        random.Random(1),
        0.0,
        known_members=[AliveRecord(p, 0, 1, _state(p)) for p in others],
    )
    dead = others[:100]
    seed.handle_packet(
        "n200",
        encode_packet(Gossip(), [encode_record(DeadRecord(p, 0, "n200")) for p in dead]),
        0.5,
    )
    assert _size(seed) == config.max_members
    joiner = Membership("joiner", _state("joiner"), config, random.Random(2), 0.0)
    joiner.join(["seed"], 1.0)
    (request,) = joiner.drain_packets()
    seed.handle_packet("joiner", request.data, 1.0)
    assert seed.member("joiner") is None  # the seed's table was full: it is refused, counted
    assert seed.counters.members_refused == 1
    (answer,) = seed.drain_packets()
    assert len(decode_packet(answer.data).records) == config.max_members + len(dead)
    joiner.handle_packet("seed", answer.data, 1.1)
    assert joiner.joined
    # the seed's whole table, but for the dead (not learned), and the joiner itself
    assert _size(joiner) == config.max_members - len(dead) + 1
    assert joiner.counters.members_refused == joiner.counters.packets_truncated == 0


def test_a_packet_with_more_records_than_a_whole_table_is_truncated_and_counted() -> None:
    """A node reads at most ``2 * max_members`` records of one packet (a whole table of that
    size, each member with a status record): the rest is neither decoded nor applied."""
    config = _small(8)
    assert config.max_packet_records() == 16
    harmless = [encode_record(SuspectRecord(f"x{i}", 0, "h")) for i in range(16)]
    late = encode_record(AliveRecord("late", 0, 1, _state("late")))
    data = encode_packet(PushPull(), [*harmless, late, b"\xc1"])  # 0xc1: never valid msgpack
    packet = decode_packet(data, max_records=16)
    assert packet.truncated and len(packet.records) == 16
    node = _core(config)
    node.handle_packet("h", data, 1.0)
    assert node.member("late") is None and node.counters.packets_truncated == 1
    exact = encode_packet(Gossip(), [*harmless[:15], late])
    assert not decode_packet(exact, max_records=16).truncated
    node.handle_packet("h", exact, 1.1)
    assert node.member("late") is not None and node.counters.packets_truncated == 1


def test_max_members_is_validated_against_the_decoders_record_cap() -> None:
    assert MembershipConfig.lan().max_members == MembershipConfig.v2v().max_members == 4096
    assert MembershipConfig(max_members=MAX_RECORDS // 2).max_packet_records() == MAX_RECORDS
    for bad in (1, MAX_RECORDS // 2 + 1):
        with pytest.raises(ConfigError, match="max_members"):
            MembershipConfig(max_members=bad)


def test_the_refusals_are_exported_as_metrics() -> None:
    node = _core(_small(8))  # room for 4 more members, 16 records a packet
    node.handle_packet("h", encode_packet(PushPull(), _fakes(16)), 1.0)
    node.handle_packet("h", encode_packet(Gossip(), _fakes(17, "y")), 1.0)
    stats = SimpleNamespace(verified=0, abandoned=0, dropped=Counter(), from_revoked=Counter())
    mesh = SimpleNamespace(
        metrics=SimpleNamespace(
            handshake_failures={},
            handshakes_ok=0,
            protocol_errors=0,
            messages_received=0,
            messages_sent=0,
            records_received=0,
            records_sent=0,
        ),
        peers=SimpleNamespace(connected=(), stats=stats),
        membership=SimpleNamespace(core=node),
        revocation_sync=None,
    )
    families = {f.name: f for f in mesh_families(mesh)}
    refused = families["meshinfer_members_refused_total"].samples
    truncated = families["meshinfer_membership_packets_truncated_total"].samples
    assert [s.value for s in refused] == [node.counters.members_refused] == [16 - 4 + 16]
    assert [s.value for s in truncated] == [node.counters.packets_truncated] == [1]
