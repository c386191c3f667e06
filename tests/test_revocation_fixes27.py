"""A peer whose certificate is revoked while its session is open: from the moment the list in
force names it until the cut closes the session, nothing goes to it and nothing from it is
handled. Real TCP on loopback and real Noise sessions; peer tables alone, then MeshNodes whose
RevocationSync merges the list (and writes it down, and cuts).
"""

from __future__ import annotations

import asyncio
import random

import pytest

from meshinfer.errors import StreamClosed, TransportError
from meshinfer.proto.messages import AppData
from meshinfer.proto.tasks_wire import FailureKind
from meshinfer.runtime.endpoint import SessionListener
from meshinfer.runtime.peers import PeerTable
from meshinfer.runtime.revocations import CutOff
from meshinfer.runtime.session import Session
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpTransport
from node.executor import TaskExecutor
from tests.helpers import until
from tests.test_executor_sharing import REF, SHARING, Net, WorkerMesh, soon
from tests.test_revocation_sync import Fleet
from tests.test_sharing_faults import Cuts, output


class Tables:
    """Peer tables for ``alpha`` and ``bravo`` over TCP on loopback, each with one admission
    for its table and its sessions (as a MeshNode has); each keeps the AppData payloads it
    gets. ``revoke(on, peer)``: ``on``'s list in force now names ``peer`` (merged; not cut)."""

    def __init__(self) -> None:
        self.fleet = make_fleet(None, ["alpha", "bravo"])
        self.transport = TcpTransport()
        self.admissions = {n: self.fleet.admission(n) for n in ("alpha", "bravo")}
        self.alpha = PeerTable("alpha", self.transport, self.admissions["alpha"])
        self.bravo = PeerTable("bravo", self.transport, self.admissions["bravo"])
        self.listener = SessionListener(
            self.transport, self.admissions["bravo"], self.bravo.serve_inbound
        )
        self.got = {"alpha": keep_app_data(self.alpha), "bravo": keep_app_data(self.bravo)}

    async def __aenter__(self) -> Tables:
        bound = await self.listener.start(Address("127.0.0.1", 0))
        self.alpha.learn("bravo", bound, self.fleet.identities["bravo"].static_public)
        assert await self.alpha.send_tracked("bravo", AppData("t", b"before")) is None
        await until(lambda: self.got["bravo"] == [b"before"])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.alpha.aclose()
        await self.bravo.aclose()
        await self.listener.aclose()

    def revoke(self, on: str, peer: str) -> None:
        self.fleet.revoke(peer)
        self.admissions[on].revocations = self.fleet.revocations


def keep_app_data(peers: PeerTable) -> list[bytes]:
    got: list[bytes] = []
    peers.on(AppData, lambda _peer, msg: got.append(msg.payload))
    return got


def hold_next_write(session: Session) -> asyncio.Event:
    """The session's next write waits (holding its writer) until the returned event is set."""
    real_write, gate = session.stream.write, asyncio.Event()

    async def held(data: bytes) -> None:
        session.stream.write = real_write
        await gate.wait()
        await real_write(data)

    session.stream.write = held
    return gate


def on_send_many(session: Session) -> asyncio.Event:
    """Set once something calls the session's ``send_many``: by then the caller waits for
    the session's writer if another task holds it (nothing in between yields the loop)."""
    entered, send_many = asyncio.Event(), session.send_many

    async def spy(*args, **kwargs):
        entered.set()
        return await send_many(*args, **kwargs)

    session.send_many = spy
    return entered


def from_revoked(table: PeerTable, kind: str) -> int:
    """How many ``kind`` messages ``table`` dropped unread from revoked peers (0 where the
    table did not count them)."""
    return getattr(table.stats, "from_revoked", {}).get(kind, 0)


async def handled_all(table: PeerTable, peer: str) -> None:
    """Wait until ``table`` has handed on everything its sessions with ``peer`` received: a
    session is listed (``roles`` not empty) until its reader has read it to the end."""
    await until(lambda: not table.roles(peer))


async def test_what_waits_for_the_writer_while_the_peer_is_revoked_is_not_sent():
    """The outbox checked nothing at send time: messages queued before the revocation (the
    callers' check passed) were written once the session's writer was free, to the revoked
    holder. Here the writer is busy with a ping while they wait for it."""
    async with Tables() as t:
        session = t.alpha.session("bravo")
        gate, entered = hold_next_write(session), on_send_many(session)
        ping = asyncio.create_task(session.ping())  # session control holds the writer
        await until(session._write_lock.locked)
        queued = [t.alpha.send_tracked("bravo", AppData("t", b"q%d" % i)) for i in range(3)]
        await entered.wait()  # the outbox's batch waits for the writer
        t.revoke("alpha", "bravo")
        gate.set()
        await ping  # control still goes to a revoked peer: the cut and the probes need it
        outcomes = await asyncio.gather(*queued, return_exceptions=True)
        assert all(isinstance(o, TransportError) for o in outcomes), outcomes
        assert t.alpha.stats.dropped["revoked"] == 3
        assert t.alpha.carrier_revoked("bravo")
        await session.aclose()  # its Close comes after anything it wrote
        await handled_all(t.bravo, "alpha")
        assert t.got["bravo"] == [b"before"]


async def test_a_session_writes_no_application_message_once_its_peer_is_revoked():
    async with Tables() as t:
        session = t.alpha.session("bravo")
        t.revoke("alpha", "bravo")
        with pytest.raises(StreamClosed, match="revoked"):
            await session.send(AppData("t", b"direct"))
        assert session.is_open and session.peer_revoked
        await session.ping()  # session control does go
        await session.aclose()
        await handled_all(t.bravo, "alpha")
        assert t.got["bravo"] == [b"before"]


async def test_messages_from_a_peer_revoked_but_not_cut_yet_are_dropped_before_any_handler():
    async with Tables() as t:
        assert t.bravo.send("alpha", AppData("t", b"earlier"))
        await until(lambda: t.got["alpha"] == [b"earlier"])
        t.revoke("alpha", "bravo")  # alpha's list names bravo; bravo does not know
        for i in range(3):
            assert t.bravo.send("alpha", AppData("t", b"late-%d" % i))
        await until(lambda: len(t.got["alpha"]) > 1 or from_revoked(t.alpha, "AppData") == 3)
        assert t.got["alpha"] == [b"earlier"]
        assert from_revoked(t.alpha, "AppData") == 3


async def test_nothing_queued_when_the_list_comes_in_force_reaches_the_revoked_peer(tmp_path):
    """The whole way: car-a's RevocationSync merges a list naming car-b (the operator's push),
    writes it down (in a worker thread: the outbox ran meanwhile and wrote what was queued),
    then cuts the session."""
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        a, b = f.nodes["car-a"], f.nodes["car-b"]
        await until(lambda: a.peers.session("car-b") is not None)
        got = keep_app_data(b.peers)
        cuts: list[CutOff] = []
        a.revocation_sync.on_cut_off(cuts.append)
        f.fleet.revoke("car-b", "stolen")
        queued = [a.peers.send_tracked("car-b", AppData("t", b"q%d" % i)) for i in range(3)]
        assert await a.revocation_sync.merge_list(f.fleet.revocations, "test")
        await until(lambda: cuts)
        outcomes = await asyncio.gather(*queued, return_exceptions=True)
        assert all(isinstance(o, TransportError) for o in outcomes), outcomes
        await handled_all(b.peers, "car-a")
        assert got == []


async def test_a_revoked_helpers_answer_is_dropped_unread_and_the_cut_hands_the_item_back():
    """(tests/test_sharing_faults.py's just-revoked helper, as it goes now.) w passed p to b;
    b's certificate is revoked (w's list says so; the cut has not run yet) when b's result
    arrives: w's peer table drops it before the executor sees it, so nothing is relayed nor
    handed back on its account; the cut-off, which follows, hands p back."""
    async with Net() as net:
        cuts = Cuts()
        mesh = WorkerMesh("w", net.w, net.w.admission, net.members, cuts)
        executor = TaskExecutor(mesh, {REF: net.batcher}, SHARING, rng=random.Random(0))
        executor.start()
        net.executors.append(executor)
        net.members.set("b")
        await net.connect("w", "b")
        await net.fill(executor)
        await net.assign("coord", "p")
        await soon(lambda: net.nodes["b"].assigned() == ["p"])
        net.fleet.revoke("b")
        net.w.admission.revocations = net.fleet.revocations
        await net.nodes["b"].peers.request("w", output("p", "b"))
        coord = net.nodes["coord"]
        await soon(lambda: coord.answers() or from_revoked(net.w, "TaskResult"))
        assert coord.answers() == [] and executor.stats.relayed == 0
        serial = net.fleet.identities["b"].certificate.serial
        await net.w.disconnect("b", "certificate revoked")
        cuts.cut(CutOff("b", serial, still_connected=False, carried_sends=True))
        await soon(lambda: coord.answers())
        assert coord.answers() == [("TaskFailed", "p", 1, "w")]
        failed = coord.failure("p")
        assert (failed.code, failed.retryable) == (FailureKind.PEER_LOST, True)
        assert "revoked" in failed.message and executor.stats.handed_back == 1


def test_what_a_revocation_drops_is_on_the_nodes_metrics():
    from meshinfer.runtime.mesh_metrics import mesh_families
    from meshinfer.runtime.node import MeshNode, MeshNodeOptions
    from meshinfer.testing.fleet import make_fleet

    fleet = make_fleet(None, ["car-a"])
    node = MeshNode(fleet.identities["car-a"], fleet.revocations, MeshNodeOptions(mdns=None))
    node.peers.stats.dropped["revoked"] += 3
    node.peers.stats.from_revoked["TaskResult"] += 2
    found = {
        (family.name, sample.labels, sample.value)
        for family in mesh_families(node)
        for sample in family.samples
    }
    assert ("meshinfer_peer_messages_dropped_total", (("reason", "revoked"),), 3) in found
    assert ("meshinfer_messages_from_revoked_total", (("type", "TaskResult"),), 2) in found
