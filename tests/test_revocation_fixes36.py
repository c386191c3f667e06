"""Revocations at run time, session 36 review: a list with a gap in sequence numbers (a file
put together by hand) gossips the version below the gap and is filled in from a member with the
whole list; a node told of its own revocation says so and tells its listeners (MeshNodes on
loopback, real Noise sessions)."""

from __future__ import annotations

import logging
import random

from meshinfer.identity_files import replace_file
from meshinfer.proto.identity import RevocationList
from meshinfer.proto.revocation_sync import RevocationExchange
from meshinfer.proto.revocation_wire import RevocationsWanted
from meshinfer.runtime.node import MeshNode
from meshinfer.testing.fleet import make_fleet
from tests.helpers import until
from tests.test_mesh_node import options
from tests.test_revocation_sync import PATIENT, QUICK, Fleet


def _gapped(fleet, missing: int) -> RevocationList:
    entries = frozenset(e for e in fleet.revocations.entries if e.sequence != missing)
    return RevocationList(fleet.authority.fleet_id, entries)


def _entry(fleet, sequence: int):
    (entry,) = (e for e in fleet.revocations.entries if e.sequence == sequence)
    return entry


def test_the_version_of_a_list_with_a_gap_is_the_one_below_the_gap():
    fleet = make_fleet(None, ["car-a"])
    for i in range(5):
        fleet.revoke(f"gone-{i}")
    exchange = RevocationExchange(_gapped(fleet, 3), patience=1.0, answer_interval=0.0)
    assert exchange.version == 2  # (it was 5: members with 3 were never asked for it)
    exchange.hold(fleet.revocations)
    assert exchange.version == 5
    exchange = RevocationExchange(_gapped(fleet, 1), patience=1.0, answer_interval=0.0)
    assert exchange.version == 0
    claims = {"car-b": 5}
    asking = exchange.question(claims, 0.0, random.Random(0))
    assert asking is not None and asking[1].have == 0


async def test_a_node_started_with_a_gap_in_its_list_gets_the_missing_entry_from_a_member(
    tmp_path,
):
    names = ["car-a", "car-b"]
    fleet = make_fleet(None, names)
    for i in range(4):
        fleet.revoke(f"gone-{i}")
    lists = {"car-a": _gapped(fleet, 3), "car-b": fleet.revocations}
    nodes = [
        MeshNode(
            fleet.identities[n],
            lists[n],
            options(revocations_file=tmp_path / f"{n}.bin", revocations=QUICK, session=PATIENT),
            rng=random.Random(i),
        )
        for i, n in enumerate(names)
    ]
    a = nodes[0]
    try:
        for node in nodes:
            await node.start()
        assert a.membership.state.revocation_version == 2  # not 4: it lacks entry 3
        await until(lambda: a.admission.revocations.entries == fleet.revocations.entries, 10)
        assert a.revocation_sync.version == 4
        assert a.membership.state.revocation_version == 4
        assert a.revocation_sync.stats.gaps == 0  # entry 4, held, continues the answer's 3
    finally:
        for node in nodes:
            await node.aclose()


async def test_an_answer_is_merged_past_a_gap_that_entries_held_fill(tmp_path):
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        a, b = f.nodes["car-a"], f.nodes["car-b"]
        for i in range(6):
            f.fleet.revoke(f"gone-{i}")
        held = _gapped(f.fleet, 3).entries - {_entry(f.fleet, 6)}
        replace_file(f.files["car-a"], RevocationList(f.fleet.authority.fleet_id, held).to_bytes())
        await until(lambda: a.admission.revocations.version == 5)  # a: 1 2 4 5, no 3
        replace_file(f.files["car-b"], f.fleet.revocations.to_bytes())
        await until(lambda: a.admission.revocations.entries == f.fleet.revocations.entries, 10)
        # b's answer (3 and 6, a holds 4 and 5) was taken whole; and what b may have asked a
        # for before its file came in was answered up to a's gap, not refused for a gap
        assert a.revocation_sync.stats.gaps == b.revocation_sync.stats.gaps == 0
        assert a.revocation_sync.version == b.revocation_sync.version == 6


def test_an_answer_stops_at_the_gap_of_the_list_held():
    fleet = make_fleet(None, ["car-a"])
    for i in range(4):
        fleet.revoke(f"gone-{i}")
    exchange = RevocationExchange(_gapped(fleet, 3), patience=1.0, answer_interval=0.0)
    offer = exchange.answer("car-b", RevocationsWanted(have=0), 0.0)
    assert offer.entries == tuple(_entry(fleet, n).to_bytes() for n in (1, 2))
    assert exchange.answer("car-c", RevocationsWanted(have=2), 0.0).entries == ()


async def test_a_node_whose_own_certificate_is_revoked_says_so_and_tells_its_listeners(
    tmp_path, caplog
):
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        a, b = f.nodes["car-a"], f.nodes["car-b"]
        told = []
        b.revocation_sync.on_self_revoked(told.append)
        assert b.revocation_sync.own_revocation is None
        f.fleet.revoke("gone")
        f.fleet.revoke("car-b", "stolen")
        with caplog.at_level(logging.WARNING, logger="meshinfer.runtime.revocations"):
            replace_file(f.files["car-b"], f.fleet.revocations.to_bytes())
            await until(lambda: told)
        (entry,) = told
        assert entry.node_id == "car-b" and entry.sequence == 2
        assert b.revocation_sync.own_revocation == entry
        assert "this node's own certificate" in caplog.text and "stolen" in caplog.text
        # b still answers questions for the list: a learns of it from b and cuts b off
        await until(lambda: a.revocation_sync.version == 2)
        await until(lambda: a.peers.session("car-b") is None)
        assert b.revocation_sync.stats.answers_sent >= 1
        f.fleet.revoke("gone-too")  # a later list tells nobody again
        replace_file(f.files["car-b"], f.fleet.revocations.to_bytes())
        await until(lambda: b.revocation_sync.version == 3)
        assert len(told) == 1
