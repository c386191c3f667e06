"""Membership state (session 35): the config refuses values of the wrong type, non-finite ones
and a packet budget over one Noise message; the member table's views stay consistent after any
sequence of claims, and replayed claims about one member converge whatever their order."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshinfer.errors import ConfigError
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_member import LIVE, MemberStatus, entry_of
from meshinfer.proto.membership_table import MemberTable
from meshinfer.proto.membership_wire import (
    MAX_PACKET_BYTES,
    AliveRecord,
    DeadRecord,
    Gossip,
    LeftRecord,
    MembershipProtocolError,
    NodeState,
    SuspectRecord,
    decode_packet,
    encode_header,
    encode_record,
)

# --- 1. config: types, finiteness, the packet budget -------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"probe_interval": math.nan},  # NaN passed every comparison the checks made
        {"probe_timeout": math.nan},
        {"nack_fraction": math.nan},
        {"dead_node_reclaim_time": math.inf},  # the dead would be kept for ever
        {"gossip_interval": math.inf},
        {"retransmit_mult": math.nan},
        {"suspicion_mult": 2.5},  # an int field
        {"max_members": 100.5},
        {"indirect_checks": True},  # a bool is no count
        {"push_pull_digests": 1},  # nor a count a bool
        {"probe_interval": "1"},  # was a TypeError from the comparison
    ],
)
def test_a_config_value_of_the_wrong_type_or_not_finite_is_refused(changes):
    name = next(iter(changes))
    with pytest.raises(ConfigError, match=f"membership[.]{name} must be"):
        MembershipConfig(**changes)


def test_ints_stay_good_floats_and_the_presets_stay_valid():
    assert MembershipConfig(probe_interval=2, probe_timeout=1).probe_interval == 2
    for preset in (MembershipConfig.lan, MembershipConfig.v2v, MembershipConfig.test):
        preset()


def test_a_packet_budget_over_one_noise_message_is_refused():
    MembershipConfig(packet_budget=MAX_PACKET_BYTES)
    with pytest.raises(ConfigError, match="packet_budget"):
        MembershipConfig(packet_budget=MAX_PACKET_BYTES + 1)
    # what such a budget would let a gossip packet reach is refused by every receiver
    record = encode_record(AliveRecord("y", 0, 0, NodeState()))
    packet = encode_header(Gossip()) + record * (MAX_PACKET_BYTES // len(record) + 1)
    with pytest.raises(MembershipProtocolError, match="larger than one Noise message"):
        decode_packet(packet)


# --- 2. the table's derived views after any sequence of claims ---------------------------------

CAPPED = replace(MembershipConfig.test(), max_members=4)
IDS = ["a", "x", "y", "z", "w"]  # "a" is the local node
RECORDS = st.one_of(
    st.builds(
        lambda node, inc, ver: AliveRecord(node, inc, ver, NodeState(queue_depth=ver)),
        st.sampled_from(IDS),
        st.integers(0, 4),
        st.integers(0, 2),
    ),
    st.builds(SuspectRecord, st.sampled_from(IDS), st.integers(0, 5), st.sampled_from("abcx")),
    st.builds(DeadRecord, st.sampled_from(IDS), st.integers(0, 5), st.sampled_from("abcx")),
    st.builds(LeftRecord, st.sampled_from(IDS), st.integers(0, 5)),
)
OPS = st.one_of(
    st.tuples(st.just("apply"), RECORDS),
    st.tuples(st.just("merge"), st.lists(RECORDS, max_size=4)),
    st.tuples(st.just("suspect"), st.sampled_from(IDS)),
    st.tuples(st.just("tick"), st.floats(0, 80)),
    st.tuples(st.just("state"), st.integers(0, 3)),
)


def _check_views(table: MemberTable) -> None:
    members = table._members
    assert sorted(table._ids) == sorted(members) and len(table._ids) == len(set(table._ids))
    assert set(table._encoded) == set(members)
    assert table.live_count() == 1 + sum(m.status in LIVE for m in members.values())
    assert len(members) < CAPPED.max_members
    suspects = {n for n, m in members.items() if m.status is MemberStatus.SUSPECT}
    assert set(table._suspicions) == suspects
    deadlines = [timer.deadline for timer in table._suspicions.values()]
    assert table.next_suspicion_deadline() == min(deadlines, default=math.inf)
    for member in members.values():
        assert table._alive_bytes(member) == encode_record(member.record)
        if member.status is MemberStatus.ALIVE:
            assert member.incarnation == member.record.incarnation
        elif member.is_live:  # a claim above the newest ALIVE record is lowered to it
            assert member.incarnation <= member.record.incarnation
        else:
            assert table.reap_at <= member.since + CAPPED.dead_node_reclaim_time
    for member in [table.local, *members.values()]:
        assert table._entry(member)[0] == entry_of(member)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(OPS, max_size=25))
def test_the_derived_views_follow_every_transition(ops):
    table = MemberTable(AliveRecord("a", 0, 0, NodeState()), CAPPED, random.Random(1), 0.0)
    now = 0.0
    for kind, arg in ops:
        if kind == "apply":
            table.apply(arg, now)
        elif kind == "merge":
            table.merge(arg, now)
        elif kind == "suspect":
            table.suspect(arg, now)
        elif kind == "state":
            if not table.has_left:
                table.update_local_state(NodeState(queue_depth=arg), now)
        else:
            now += arg
            table.expire_suspicions(now)
            table.reap(now)
        table.digest()
        _check_views(table)


# --- 3. claims about one member converge, whatever their order ---------------------------------


@st.composite
def _history(draw):
    """One member's honest life: its ALIVE records, claims at incarnations it announced (a
    suspicion names a record its accuser holds), perhaps its LEFT; two orders of them all."""
    incarnations = sorted(set(draw(st.lists(st.integers(0, 4), min_size=1, max_size=4))))
    records: list = [
        AliveRecord("y", inc, ver, NodeState(queue_depth=ver))
        for inc in incarnations
        for ver in range(draw(st.integers(1, 2)))
    ]
    first = records[0]
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from([SuspectRecord, DeadRecord]))
        records.append(kind("y", draw(st.sampled_from(incarnations)), draw(st.sampled_from("bcd"))))
    if draw(st.booleans()):
        records.append(LeftRecord("y", incarnations[-1] + 1))
    return first, draw(st.permutations(records)), draw(st.permutations(records))


def _view_after(first: AliveRecord, order: list, *, push_pull: bool) -> tuple:
    table = MemberTable(
        AliveRecord("a", 0, 0, NodeState()), MembershipConfig.test(), random.Random(1), 0.0
    )
    table.apply(first, 0.0)
    for _ in range(3):  # gossip retransmits: each record comes more than once
        for record in order:
            if push_pull:
                table.merge([record], 1.0)
            else:
                table.apply(record, 1.0)
    member = table.get("y")
    return member.status, member.incarnation, member.record.key


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(_history(), st.booleans())
def test_retransmitted_claims_converge_in_any_order(history, push_pull):
    first, one, other = history
    view = _view_after(first, one, push_pull=push_pull)
    assert view == _view_after(first, other, push_pull=push_pull)
    newest = max(r.key for r in one if isinstance(r, AliveRecord))
    assert view[2] == newest  # the newest state record wins everywhere


# --- 4. a node that left comes back after a restart --------------------------------------------


def test_a_restarted_node_rises_above_its_departure_and_is_taken_back():
    config = MembershipConfig.test()
    seed = MemberTable(AliveRecord("s", 0, 0, NodeState()), config, random.Random(1), 0.0)
    old = MemberTable(AliveRecord("y", 2, 5, NodeState()), config, random.Random(2), 0.0)
    seed.apply(old.local.record, 0.0)
    old.leave(1.0)
    seed.apply(LeftRecord("y", old.local.incarnation), 1.0)
    assert seed.get("y").status is MemberStatus.LEFT and seed.get("y").incarnation == 3
    # the restart starts at 0: the seed drops its record as older than the one it holds
    new = MemberTable(AliveRecord("y", 0, 0, NodeState()), config, random.Random(3), 2.0)
    seed.apply(new.local.record, 2.0)
    assert seed.get("y").status is MemberStatus.LEFT
    # the join's push-pull brings the old LEFT back to it: it outbids it, and is back
    new.merge([seed.local.record, seed.get("y").record, LeftRecord("y", 3)], 3.0)
    assert new.local.status is MemberStatus.ALIVE and new.local.incarnation == 4
    seed.apply(new.local.record, 4.0)
    assert seed.get("y").status is MemberStatus.ALIVE and seed.get("y").incarnation == 4
