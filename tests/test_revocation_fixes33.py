"""Revocations at run time, session 33 review: answers with a gap in sequence numbers, lists
over the entry limit, entries a write-down finds in the file (MeshNodes on loopback)."""

from __future__ import annotations

import logging
from dataclasses import replace

from prometheus_client.parser import text_string_to_metric_families

from meshinfer.identity_files import replace_file
from meshinfer.proto.identity import (
    MAX_REVOCATION_ENTRIES,
    SIGNATURE_BYTES,
    RevocationEntry,
    RevocationList,
)
from meshinfer.proto.revocation_wire import RevocationsOffer, RevocationsWanted
from meshinfer.runtime.mesh_metrics import mesh_families
from meshinfer.runtime.metrics import render_family
from meshinfer.runtime.revocations import RevocationSyncConfig
from meshinfer.testing.fleet import make_fleet
from tests.helpers import until
from tests.test_mesh_node import nodes_for, options
from tests.test_revocation_sync import PATIENT, QUICK, Fleet


def _entries(fleet) -> list[RevocationEntry]:
    return sorted(fleet.revocations.entries, key=lambda e: e.sequence)


def test_up_to_gap_keeps_what_continues_the_list_in_order():
    from meshinfer.proto.revocation_sync import up_to_gap  # (new: the others run without)

    fleet = make_fleet(None, ["car-a"])
    for i in range(5):
        fleet.revoke(f"gone-{i}")
    one, two, three, _, five = _entries(fleet)
    assert up_to_gap(0, [three, one, two]) == ([one, two, three], False)
    assert up_to_gap(2, [five, three]) == ([three], True)
    assert up_to_gap(3, [five]) == ([], True)
    assert up_to_gap(4, [two, five]) == ([two, five], False)  # an older one fills in
    assert up_to_gap(0, []) == ([], False)


async def test_an_answer_that_skips_entries_is_refused_and_another_member_fills_them_in(tmp_path):
    async with Fleet(tmp_path) as f:
        a, b = f.nodes["car-a"], f.nodes["car-b"]
        for i in range(3):
            f.fleet.revoke(f"gone-{i}")
        newest = _entries(f.fleet)[-1]

        def answer_newest_only(peer, msg):  # a withholds entries 1 and 2
            a.peers.send(peer, RevocationsOffer((newest.to_bytes(),)))

        a.peers.on(RevocationsWanted, answer_newest_only)
        sync = b.revocation_sync
        a.membership.update_state(replace(a.membership.state, revocation_version=3))
        await until(lambda: sync.stats.gaps == 1)
        assert b.admission.revocations.version == 0  # not raised past entries it lacks
        page = "".join(render_family(fam) for fam in mesh_families(b))
        cut = {
            s.labels["reason"]: s.value
            for fam in text_string_to_metric_families(page)
            for s in fam.samples
            if s.name == "meshinfer_revocation_answers_cut_total"
        }
        assert cut == {"gap": 1, "over_limit": 0}
        replace_file(f.files["car-c"], f.fleet.revocations.to_bytes())  # c holds all three
        await until(lambda: b.admission.revocations.entries == f.fleet.revocations.entries)
        assert b.peers.session("car-a") is not None  # a gap is not a reason to hang up


async def test_a_list_over_the_entry_limit_is_a_counted_warning_not_an_error(tmp_path, caplog):
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        sync = f.nodes["car-a"].revocation_sync
        fleet_id = f.fleet.authority.fleet_id
        unsigned = bytes(SIGNATURE_BYTES)  # (the merge takes entries verified already)
        many = frozenset(
            RevocationEntry(fleet_id, n, 0.0, n, None, "", unsigned)
            for n in range(1, MAX_REVOCATION_ENTRIES + 2)
        )
        with caplog.at_level(logging.WARNING, logger="meshinfer.runtime.revocations"):
            assert not sync._merge(RevocationList(fleet_id, many), "peer car-b")
        assert sync.stats.over_limit == 1
        assert sync.version == 0
        assert "not merged" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_entries_a_write_down_finds_in_the_file_cut_the_sessions_they_revoke(tmp_path):
    names = ["car-a", "car-b"]
    slow = RevocationSyncConfig(check_interval_s=3600, ask_timeout_s=QUICK.ask_timeout_s)
    files = {n: tmp_path / f"{n}-revocations.bin" for n in names}
    fleet = make_fleet(None, names)
    opts = {n: options(revocations_file=files[n], revocations=slow, session=PATIENT) for n in names}
    a, b = nodes_for(fleet, names, opts.get)
    try:
        for node in (a, b):
            await node.start()
        await until(lambda: a.peers.session("car-b") is not None)
        sync = a.revocation_sync
        await until(lambda: sync.stats.checks >= 1)  # its first look; the next is an hour on
        fleet.revoke("car-b")
        replace_file(files["car-a"], fleet.revocations.to_bytes())  # copied in between looks
        await sync._write_down()  # (as a merge from a peer would, before the next look)
        assert sync.version == 1
        assert sync.stats.disconnected == 1  # b's session was cut, not left open
        assert a.peers.session("car-b") is None
    finally:
        for node in (a, b):
            await node.aclose()


def test_a_list_is_decoded_without_checking_again_the_entries_held_already(monkeypatch):
    """A push of a 16k-entry list the coordinator holds verified every entry again (~1.3 s of
    a JSON worker): entries whose bytes are those of a held one are taken from it now."""
    from meshinfer.proto.identity import FleetAuthority, RevocationEntry

    authority = FleetAuthority.create("fleet-a")
    trust = authority.trust
    held = RevocationList(trust.fleet_id)
    for i in range(5):
        held = authority.revoke(held, node_id=f"gone-{i}", now=1.0)
    pushed = authority.revoke(held, node_id="new", now=2.0)
    checked: list[int] = []
    real = RevocationEntry.verify

    def counting(entry, trust_):
        checked.append(entry.sequence)
        real(entry, trust_)

    monkeypatch.setattr(RevocationEntry, "verify", counting)
    assert RevocationList.from_bytes(pushed.to_bytes(), trust, held) == pushed
    assert checked == [6]  # the new one only
    checked.clear()
    assert RevocationList.from_bytes(pushed.to_bytes(), trust) == pushed
    assert sorted(checked) == [1, 2, 3, 4, 5, 6]  # with nothing held: every one
