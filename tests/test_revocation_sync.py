"""Revocations spread by gossip: MeshNodes in one process (real TCP, Noise, mDNS on loopback),
then node daemons as separate processes."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshinfer.errors import RemoteProtocolError
from meshinfer.identity_files import NodeDirectory, load_revocations, replace_file
from meshinfer.proto import messages
from meshinfer.proto.revocation_sync import PAGE_ENTRIES
from meshinfer.proto.revocation_wire import RevocationsOffer, RevocationsWanted
from meshinfer.runtime.endpoint import dial
from meshinfer.runtime.node import MeshNode
from meshinfer.runtime.revocations import CutOff, RevocationSyncConfig
from meshinfer.runtime.session import Admission, Session, SessionConfig
from meshinfer.testing.cluster import LocalCluster
from meshinfer.testing.fleet import DAY, make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpTransport
from tests.helpers import until
from tests.test_mesh_node import nodes_for, options

QUICK = RevocationSyncConfig(check_interval_s=0.1, ask_timeout_s=0.5)
#: A session dialled under an old certificate makes its node ping the older, good session
#: with that peer and abandon it as lost if nothing comes within ``verify_timeout``; the tests
#: assert the good one stays (still connected, carrying): at the default 1 s, a loop stall
#: under load could abandon it. No test here waits for such a check to abandon a session.
PATIENT = SessionConfig(verify_timeout=60.0)


def test_the_wire_ids_are_pinned_and_bad_fields_refused():
    assert messages.spec_of(RevocationsWanted).type_id == 17
    assert messages.spec_of(RevocationsOffer).type_id == 18
    wire = messages.encode(RevocationsOffer((b"x" * 10, b"y")))
    assert messages.decode(wire) == RevocationsOffer((b"x" * 10, b"y"))
    with pytest.raises(RemoteProtocolError, match="have"):
        messages.decode(messages.encode(RevocationsWanted(-1)))
    with pytest.raises(RemoteProtocolError, match="entry is over"):
        messages.decode(messages.encode(RevocationsOffer((b"x" * 5000,))))


class Fleet:
    """Three nodes of one fleet, each watching its own list file under ``tmp``."""

    def __init__(self, tmp, names=("car-a", "car-b", "car-c")):
        self.names = list(names)
        self.fleet = make_fleet(None, self.names)
        self.files = {n: tmp / f"{n}-revocations.bin" for n in self.names}
        opts = {
            n: options(revocations_file=self.files[n], revocations=QUICK, session=PATIENT)
            for n in self.names
        }
        self.nodes = dict(zip(self.names, nodes_for(self.fleet, self.names, opts.get), strict=True))

    async def __aenter__(self):
        for node in self.nodes.values():
            await node.start()
        count = len(self.names) - 1
        await until(lambda: all(len(n.live_members()) == count for n in self.nodes.values()))
        return self

    async def __aexit__(self, *exc):
        for node in self.nodes.values():
            await node.aclose()


async def test_a_revocation_copied_to_one_node_reaches_every_node_and_cuts_the_revoked_one_off(
    tmp_path,
):
    async with Fleet(tmp_path) as f:
        a, b, c = (f.nodes[n] for n in f.names)
        await until(lambda: b.peers.session("car-c") is not None)
        f.fleet.revoke("car-c", "stolen")
        replace_file(f.files["car-a"], f.fleet.revocations.to_bytes())  # the operator's copy

        await until(lambda: a.admission.revocations.version == 1)
        await until(lambda: b.admission.revocations.version == 1)  # from a, by gossip
        assert b.revocation_sync.stats.asked >= 1 and b.revocation_sync.stats.merged == 1
        assert b.membership.state.revocation_version == 1  # and gossiped on
        await until(f.files["car-b"].exists)  # written (whole) in a worker thread after the merge
        written = load_revocations(f.files["car-b"], b.identity.trust)  # kept for a restart
        assert written.entries == f.fleet.revocations.entries
        for node in (a, b):
            await until(lambda node=node: node.peers.session("car-c") is None)
        # c keeps trying (membership probes); its handshakes are refused now
        await until(lambda: b.metrics.handshake_failures["revoked"] >= 1, timeout=15)
        assert b.peers.session("car-c") is None
        # nobody answers c's questions any more, but a peer that cut it off said why (a
        # RevocationNotice of the entry revoking c): c holds that entry and knows
        await until(lambda: c.revocation_sync.own_revocation is not None)
        assert c.admission.revocations.entries == f.fleet.revocations.entries


def revoke_serial(fleet, serial: int) -> None:
    fleet.revocations = fleet.authority.revoke(
        fleet.revocations, now=time.time(), serial=serial, reason="old certificate"
    )


def sessions_of(node: MeshNode, peer: str) -> list[Session]:
    return [s for s in node.peers.open_sessions() if s.peer_id == peer]


async def dial_as(identity, fleet, node: MeshNode) -> Session:
    """A session with ``node`` under ``identity`` (nobody reads it on this side)."""
    return await dial(
        TcpTransport(),
        Address("127.0.0.1", node.address.port),
        Admission(identity, fleet.revocations),
        expected_static=node.identity.static_public,
        expected_node_id=node.node_id,
    )


async def test_revoking_an_old_serial_cuts_that_session_only_and_the_node_stays_connected(
    tmp_path,
):
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        a = f.nodes["car-a"]
        cuts: list[CutOff] = []
        a.revocation_sync.on_cut_off(cuts.append)
        await until(lambda: sessions_of(a, "car-b"))
        new_serial = f.fleet.identities["car-b"].certificate.serial
        earlier = time.time() - 3600  # car-b was enrolled before, under another certificate
        old = f.fleet.authority.enroll(
            "car-b", ("vehicle",), now=earlier, lifetime_s=DAY, serial=99
        )
        stale = await dial_as(old, f.fleet, a)
        try:
            await until(lambda: any(s.peer.serial == 99 for s in sessions_of(a, "car-b")))
            revoke_serial(f.fleet, 99)
            replace_file(f.files["car-a"], f.fleet.revocations.to_bytes())
            async with asyncio.timeout(10):
                await stale.wait_closed()
            await until(lambda: cuts)
            # a sent car-b's messages over the older session under the new certificate
            assert cuts == [CutOff("car-b", 99, still_connected=True, carried_sends=False)]
            assert not cuts[0].sends_lost
            assert sessions_of(a, "car-b") and all(
                s.peer.serial == new_serial for s in sessions_of(a, "car-b")
            )
            assert "car-b" in a.live_members()

            f.fleet.revoke("car-b")  # by node id: every certificate issued until now
            replace_file(f.files["car-a"], f.fleet.revocations.to_bytes())
            await until(lambda: a.peers.session("car-b") is None)
            await until(lambda: len(cuts) == a.revocation_sync.stats.disconnected)
            later = cuts[1:]
            assert later and all(c.serial == new_serial and not c.still_connected for c in later)
            assert later[0].carried_sends and all(c.sends_lost for c in later)
        finally:
            await stale.aclose()


async def test_a_session_two_merges_find_open_is_cut_once(tmp_path):
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        a = f.nodes["car-a"]
        cuts: list[CutOff] = []
        a.revocation_sync.on_cut_off(cuts.append)
        await until(lambda: sessions_of(a, "car-b"))
        earlier = time.time() - 3600
        old = f.fleet.authority.enroll(
            "car-b", ("vehicle",), now=earlier, lifetime_s=DAY, serial=99
        )
        stale = await dial_as(old, f.fleet, a)
        try:
            await until(lambda: any(s.peer.serial == 99 for s in sessions_of(a, "car-b")))
            (session,) = [s for s in sessions_of(a, "car-b") if s.peer.serial == 99]
            revoke_serial(f.fleet, 99)
            sync = a.revocation_sync
            assert sync._merge(f.fleet.revocations, "test")  # in force; nothing closed yet
            # two merges (the file and a peer's offer) each close what they find revoked, while
            # a send in progress holds the session's writer, so the Close frame waits
            async with session._write_lock:
                closes = [asyncio.create_task(sync._close_revoked([session])) for _ in "ab"]
                await until(lambda: sync.stats.disconnected >= 1)
                await until(closes[1].done)  # the second has looked at the session too
                assert session.is_open
            await asyncio.gather(*closes)
            assert cuts == [CutOff("car-b", 99, still_connected=True, carried_sends=False)]
            assert sync.stats.disconnected == 1
        finally:
            await stale.aclose()


async def test_forged_entries_from_a_peer_are_refused_and_counted(tmp_path):
    async with Fleet(tmp_path) as f:
        a, b, c = (f.nodes[n] for n in f.names)
        forger = make_fleet(None, ["car-a"])  # another authority, same fleet id
        forger.revoke("car-b", "forged")
        (forged,) = forger.revocations.entries
        f.fleet.revoke("car-x")
        (genuine,) = f.fleet.revocations.entries
        await until(lambda: c.peers.session("car-b") is not None)
        assert c.peers.send("car-b", RevocationsOffer((genuine.to_bytes(),)))  # nobody asked
        await until(lambda: b.revocation_sync.stats.unsolicited == 1)

        def answer_forged(peer, msg):
            a.peers.send(peer, RevocationsOffer((forged.to_bytes(), genuine.to_bytes())))

        a.peers.on(RevocationsWanted, answer_forged)
        sync = b.revocation_sync
        a.membership.update_state(replace(a.membership.state, revocation_version=5))  # a lies
        await until(lambda: sync.stats.bad_entries == 1)  # stopped at the forged entry
        loop, checks = asyncio.get_running_loop(), sync.stats.checks
        later = loop.time() + 2 * QUICK.ask_timeout_s  # when pacing alone would allow two more
        await until(lambda: sync.stats.checks >= checks + 10 and loop.time() >= later)
        assert sync.stats.asked == 1  # a fell short of its claim: not asked again
        a.membership.update_state(replace(a.membership.state, revocation_version=6))
        await until(lambda: sync.stats.bad_entries == 2)  # a new claim is worth a question
        assert b.admission.revocations.version == 0  # neither the forged nor the unasked entry
        assert b.peers.session("car-a") is not None  # a bad entry is not a reason to hang up
        assert not f.files["car-b"].exists()


async def test_a_bad_list_file_is_logged_and_a_good_one_later_is_used(tmp_path, caplog):
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        a = f.nodes["car-a"]
        with caplog.at_level(logging.WARNING, logger="meshinfer.runtime.revocations"):
            f.files["car-a"].write_bytes(b"not a revocation list")
            await until(lambda: "revocation list file not used" in caplog.text)
        assert a.admission.revocations.version == 0
        f.fleet.revoke("car-b")
        replace_file(f.files["car-a"], f.fleet.revocations.to_bytes())
        await until(lambda: a.admission.revocations.version == 1)
        await until(lambda: a.peers.session("car-b") is None)  # a revoked b itself


async def test_an_asked_member_that_never_answers_is_not_waited_for(tmp_path):
    async with Fleet(tmp_path) as f:
        a, b = f.nodes["car-a"], f.nodes["car-b"]
        f.fleet.revoke("car-x-never-enrolled")
        listed = f.fleet.revocations.to_bytes()
        a.peers.on(RevocationsWanted, lambda peer, msg: None)  # a hears requests, answers none
        replace_file(f.files["car-a"], listed)
        await until(lambda: b.revocation_sync.stats.asked == 1)  # b asked a, the only one ahead
        assert b.admission.revocations.version == 0
        replace_file(f.files["car-c"], listed)
        await until(lambda: b.admission.revocations.version == 1, timeout=10)
        assert b.revocation_sync.stats.answered == 1  # c answered; a never did


async def test_a_long_list_goes_in_pages_and_a_flood_of_questions_is_not_answered(tmp_path):
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        a, b = f.nodes["car-a"], f.nodes["car-b"]
        for i in range(PAGE_ENTRIES * 2 + 88):
            f.fleet.revoke(f"gone-{i}")
        replace_file(f.files["car-a"], f.fleet.revocations.to_bytes())
        await until(lambda: b.revocation_sync.version == PAGE_ENTRIES * 2 + 88, timeout=15)
        assert b.admission.revocations.entries == f.fleet.revocations.entries
        assert b.revocation_sync.stats.asked == 3  # two full pages, then the rest
        sent_before = a.revocation_sync.stats.answers_sent
        for _ in range(50):  # b floods a with questions in one go
            b.peers.send("car-a", RevocationsWanted(have=0))
        await until(lambda: a.revocation_sync.stats.requests_dropped >= 45)
        assert a.revocation_sync.stats.answers_sent - sent_before <= 5


def test_node_daemons_in_processes_spread_a_revocation_to_each_others_files(tmp_path):
    with LocalCluster(tmp_path) as cluster:
        names = ["node-0", "node-1"]
        for name in names:
            cluster.add_node(name)
        cluster.enroll("lost-car")
        for name in names:  # a long deadline: READY came late once on a loaded machine
            cluster.start(name, timeout=120)
        # generous deadlines (a loaded machine is slow to join and to sync; met early or not)
        cluster.wait_for(lambda: cluster.members("node-1") == {"node-0": "alive"}, timeout=120)
        cluster.fleet.revoke(node_id="lost-car", now=time.time(), reason="stolen")
        target = NodeDirectory(tmp_path / "nodes" / "node-0").revocations_bin
        shutil.copyfile(cluster.fleet.revocations_bin, target)  # the operator's copy
        written = NodeDirectory(tmp_path / "nodes" / "node-1").revocations_bin
        trust = cluster.fleet.trust()

        def synced() -> bool:  # node-1 wrote the list it had from node-0 (not there yet: no)
            return load_revocations(written, trust, missing_ok=True).version == 1

        cluster.wait_for(synced, timeout=120)
        metrics = cluster.processes["node-1"].http + "/metrics"
        with urllib.request.urlopen(metrics, timeout=30) as response:
            text = response.read().decode()
        gauges = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert gauges["meshinfer_revocation_list_version"] == 1
        assert gauges["meshinfer_revocation_answers_refused_total"] == 0
