"""The member table split into modules, and two faults found while splitting it.

* ``membership_table`` still exports every name importers took from it, as the same objects
  the new modules define; the new modules stay sans-I/O.
* A push-pull table that lists a member's SUSPECT/DEAD record before its ALIVE record is merged
  as if the ALIVE came first: the status used to be judged against the older record held here,
  lowered to it and counted as a claim ahead, and the newer ALIVE then revived the member.
* A newer state record of a dead or left member (not high enough to revive it) reports no
  UPDATED event: UPDATED means a live member's state changed.

The real table and wire records; no mocks.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.proto import membership_member, membership_store, membership_table
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_table import MemberEventKind, MemberStatus, MemberTable
from meshinfer.proto.membership_wire import (
    MAX_COUNTER,
    AliveRecord,
    DeadRecord,
    LeftRecord,
    NodeState,
    SuspectRecord,
)


def _table(known: dict[str, tuple[int, int]] | None = None) -> MemberTable:
    local = AliveRecord("local", 0, 1, NodeState(host="local", port=7946))
    table = MemberTable(local, MembershipConfig.test(), random.Random(1), 0.0)
    seeds = [AliveRecord(n, i, v, NodeState(port=v)) for n, (i, v) in (known or {}).items()]
    table.add_known(seeds, 0.0)
    return table


def _view(table: MemberTable) -> dict[str, tuple]:
    return {m.node_id: (m.status, m.incarnation, m.record.key, m.accuser) for m in table.members()}


# --- the split ---------------------------------------------------------------------------------


def test_every_name_taken_from_membership_table_is_still_there() -> None:
    """tests, bench, membership.py and the docs import these from membership_table."""
    for name in ("LIVENESS", "Member", "MemberEvent", "MemberEventKind", "MemberStatus"):
        assert getattr(membership_table, name) is getattr(membership_member, name)
    assert membership_table.MembershipCounters is membership_member.MembershipCounters
    assert issubclass(membership_table.MemberTable, membership_store.MemberStore)


def test_the_member_modules_stay_sans_io() -> None:
    """No asyncio, sockets, clock or global randomness in the split modules."""
    banned = {"asyncio", "socket", "time", "selectors", "threading", "os"}
    for name in ("membership_member", "membership_store", "membership_table"):
        module = importlib.import_module(f"meshinfer.proto.{name}")
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & banned, name
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in banned, name
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                # random.Random is a type; random.random()/choice() would read global state
                assert node.value.id != "random" or node.attr == "Random", (name, node.attr)


# --- merge precedence --------------------------------------------------------------------------


def test_a_status_listed_before_its_alive_record_is_judged_against_that_record() -> None:
    """b is known at incarnation 0; the remote table holds b's record at 2 and suspects it
    there, but lists the SUSPECT first. b must end SUSPECT at 2, as with ALIVE first."""
    alive = AliveRecord("b", 2, 1, NodeState(port=2))
    suspect = SuspectRecord("b", 2, "c")
    in_order, reversed_ = _table({"b": (0, 1)}), _table({"b": (0, 1)})
    in_order.merge([alive, suspect], 1.0)
    reversed_.merge([suspect, alive], 1.0)
    assert in_order.get("b").status is MemberStatus.SUSPECT
    assert _view(reversed_) == _view(in_order)
    assert reversed_.counters.claims_ahead == 0


@st.composite
def _remote_tables(draw):
    """A table an honest node could send: per member one ALIVE record and, unless alive, one
    status record at an incarnation its record allows (LEFT one above: leave() bumps)."""
    records, known = [], {}
    for index in range(draw(st.integers(1, 4))):
        node_id = f"n{index}"
        inc, version = draw(st.integers(0, 4)), draw(st.integers(1, 3))
        records.append(AliveRecord(node_id, inc, version, NodeState(port=version)))
        kind = draw(st.sampled_from(["alive", "suspect", "dead", "left"]))
        if kind == "left":
            records.append(LeftRecord(node_id, inc + 1))
        elif kind != "alive":
            at = draw(st.integers(0, inc))
            cls = SuspectRecord if kind == "suspect" else DeadRecord
            records.append(cls(node_id, at, "x"))
        if draw(st.booleans()):
            known[node_id] = (draw(st.integers(0, 4)), draw(st.integers(1, 3)))
    return known, records


@settings(max_examples=150, deadline=None)
@given(_remote_tables(), st.randoms(use_true_random=False))
def test_merge_does_not_depend_on_the_order_a_table_lists_its_records(table, rnd) -> None:
    known, records = table
    shuffled = list(records)
    rnd.shuffle(shuffled)
    expected, got = _table(known), _table(known)
    expected.merge(records, 1.0)  # each member's ALIVE first, as encoded_table lists them
    got.merge(shuffled, 1.0)
    assert _view(got) == _view(expected)
    assert got.counters.claims_ahead == expected.counters.claims_ahead


# --- events ------------------------------------------------------------------------------------


def test_a_dead_members_newer_state_reports_no_update() -> None:
    """b was declared dead at 0; its state record (0, 2) arrives (it updated its state before
    hearing of its death): the record is kept, but b is not reported as a live member."""
    table = _table({"b": (0, 1)})
    table.apply(DeadRecord("b", 0, "c"), 1.0)
    table.events.clear()
    table.apply(AliveRecord("b", 0, 2, NodeState(port=99)), 2.0)
    assert table.get("b").status is MemberStatus.DEAD and table.get("b").version == 2
    assert [e.kind for e in table.events] == []
    table.apply(AliveRecord("b", 1, 3, NodeState(port=98)), 3.0)  # its refutation
    assert [e.kind for e in table.events] == [MemberEventKind.ALIVE]


def test_a_suspect_members_newer_state_is_still_an_update() -> None:
    table = _table({"b": (0, 1)})
    table.apply(SuspectRecord("b", 0, "c"), 1.0)
    table.events.clear()
    table.apply(AliveRecord("b", 0, 2, NodeState(port=99)), 2.0)
    assert [e.kind for e in table.events] == [MemberEventKind.UPDATED]


# --- claims about this node at the top of the range: answered at our own number + 1 ---------


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 3),
    st.one_of(st.integers(0, 8), st.integers(MAX_COUNTER - 3, MAX_COUNTER)),
    st.sampled_from([SuspectRecord, DeadRecord]),
)
def test_a_claim_about_self_is_refuted_in_range_or_not_at_all(bumps, claim, kind) -> None:
    table = _table()
    for _ in range(bumps):
        table.refute(table.local.incarnation, 0.0)
    before = table.local.incarnation
    table.apply(kind("local", claim, "h"), 1.0)
    after = table.local.incarnation
    assert after <= MAX_COUNTER
    if before <= claim:  # answered one above our own number, never at the claim's
        assert after == before + 1
    else:
        assert after == before
