"""What a coordinator and a node do with work when a peer's session is cut off for a revoked
certificate: real node daemons in this process (TCP, Noise, mDNS, SQLite), plus a session opened
by the test under a node's old certificate, as a stolen copy of it (or a process left over from
before the node was re-enrolled) would hold.

A node id may then have two sessions: revoking the old certificate by serial cuts that one only.
The node stays schedulable over the other, and only work sent over the cut session moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from coordinator.service import CoordinatorConfig
from meshinfer.identity_files import NodeDirectory, enroll, replace_file
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.identity import NodeIdentity, RevocationList
from meshinfer.proto.messages import Message
from meshinfer.proto.tasks_wire import TaskAssign
from meshinfer.runtime.endpoint import dial
from meshinfer.runtime.node import MeshNode
from meshinfer.runtime.revocations import CutOff, RevocationSyncConfig
from meshinfer.runtime.session import Admission, Session, SessionConfig
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpTransport
from tests.helpers import dial_again, until
from tests.test_coordinator_service import Mesh, hold_inference, spec

QUICK = RevocationSyncConfig(check_interval_s=0.1, ask_timeout_s=0.5)
#: The coordinator's sessions. Adopting a stale session pings the node's older, good ones, and
#: abandons as lost one that neither answers nor sends anything within ``verify_timeout``: the
#: stale one then carries the node's messages, and what the tests assert of the cut (which
#: session carried, whether the node stays connected) no longer holds. At the default 1 s that
#: was a race with the loop: a stall that long, under load, failed them. No test here waits
#: for such a check to abandon a session.
PATIENT = SessionConfig(verify_timeout=60.0)
OFFLOADING = "[executor]\nmax_concurrent = 1\noffload_queue_depth = 1\n"


def reenroll(mesh: Mesh, node_id: str) -> NodeIdentity:
    """Give ``node_id`` a new certificate (same key) before its daemon starts; return its
    identity under the old one."""
    directory = NodeDirectory(mesh.cluster.root / "nodes" / node_id)
    old = directory.load()
    roles, now = frozenset({"vehicle"}), time.time() - 30
    enroll(mesh.cluster.fleet, directory, node_id, roles, now=now, lifetime_s=3600.0, force=True)
    return old


def revoke(mesh: Mesh, into: str, **which: object) -> None:
    """Revoke (``serial=`` or ``node_id=``) and copy the fleet's list where ``into`` (a node,
    or "coord") watches it, as the operator would."""
    mesh.cluster.fleet.revoke(now=time.time(), reason="test", **which)
    if into == "coord":
        target = mesh.options["revocations_file"]
    else:
        target = NodeDirectory(mesh.cluster.root / "nodes" / into).revocations_bin
    replace_file(target, mesh.cluster.fleet.revocations_bin.read_bytes())


def coordinator_options(tmp_path) -> dict:
    return {
        "revocations_file": tmp_path / "coord-revocations.bin",
        "revocations": QUICK,
        "session": PATIENT,
    }


def serials_of(node: MeshNode, peer: str) -> list[int]:
    """The certificate serials of ``node``'s open sessions with ``peer``, oldest first."""
    return [s.peer.serial for s in node.peers.open_sessions() if s.peer_id == peer]


class StaleSession:
    """A session with ``to`` under ``identity``: it keeps what it is sent and answers nothing."""

    def __init__(self, identity: NodeIdentity, to: MeshNode) -> None:
        self.identity = identity
        self.to = to
        self.received: list[Message] = []
        self.session: Session | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def serial(self) -> int:
        return self.identity.certificate.serial

    def assigned(self) -> list[TaskAssign]:
        return [m for m in self.received if isinstance(m, TaskAssign)]

    async def __aenter__(self) -> StaleSession:
        node_id = self.identity.node_id
        await until(lambda: serials_of(self.to, node_id))  # the stale one comes after these
        self.session = await dial(
            TcpTransport(),
            Address("127.0.0.1", self.to.address.port),
            Admission(self.identity, RevocationList(self.identity.trust.fleet_id)),
            expected_static=self.to.identity.static_public,
            expected_node_id=self.to.node_id,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await until(lambda: self.serial in serials_of(self.to, node_id))
        return self

    async def _read(self) -> None:
        async for msg in self.session:
            self.received.append(msg)

    async def __aexit__(self, *exc: object) -> None:
        await self.session.aclose()
        await asyncio.gather(self._reader, return_exceptions=True)


def cut_offs(node: MeshNode) -> list[CutOff]:
    cuts: list[CutOff] = []
    node.revocation_sync.on_cut_off(cuts.append)
    return cuts


def serving(c) -> set[str]:
    """The nodes alive with models, as the coordinator sees them."""
    return {n["node_id"] for n in c.nodes() if n["status"] == "alive" and n["models"]}


async def succeeded(c, task_id: str):
    record = await c.wait(task_id, timeout=15)
    assert record.state.value == "succeeded", record.summary.error
    return record


def with_reenrolled_node(tmp_path, n: int = 2) -> tuple[Mesh, NodeIdentity]:
    """A coordinator and ``n`` nodes, node-0 re-enrolled; returns its identity under the old
    certificate too."""
    config = CoordinatorConfig(item_timeout_s=120.0)  # neither a timeout nor a retry may act
    mesh = Mesh(tmp_path, n=n, config=config, options=coordinator_options(tmp_path))
    return mesh, reenroll(mesh, "node-0")


async def stale_carries(mesh: Mesh, stale: StaleSession) -> None:
    """node-0 dials again: its new session then comes after the stale one, which carries what
    the coordinator sends to node-0 from then on."""
    coord, new = mesh.mesh, mesh.daemons["node-0"].identity.certificate.serial
    for session in coord.peers.open_sessions("node-0"):
        if session.peer.serial == new:
            await session.aclose()
    await until(lambda: serials_of(coord, "node-0")[0] == stale.serial)
    await until(lambda: new in serials_of(coord, "node-0"))


def hold_cut(node: MeshNode) -> asyncio.Event:
    """Hold ``node``'s cut-offs (the list is in force, the session not yet closed) until the
    returned event is set."""
    cut, gate = node.revocation_sync._cut, asyncio.Event()

    async def held_cut(session: Session) -> None:
        await gate.wait()
        await cut(session)

    node.revocation_sync._cut = held_cut
    return gate


# --- the coordinator ---------------------------------------------------------------------------


async def test_revoking_a_nodes_old_certificate_leaves_it_working_over_its_new_one(tmp_path):
    x, _ = load_digits_holdout()
    mesh, old = with_reenrolled_node(tmp_path, n=1)
    async with mesh:
        c, coord = mesh.coordinator, mesh.mesh
        cuts = cut_offs(coord)
        gate = hold_inference(mesh.daemons["node-0"])
        try:
            running = await c.submit(spec("running", "single", x[:1]))
            await until(lambda: any(n["in_flight"] for n in c.nodes()))
            async with StaleSession(old, coord) as stale:  # opened after the node's own
                revoke(mesh, "coord", serial=old.certificate.serial)
                await until(lambda: cuts)
            new = mesh.daemons["node-0"].identity.certificate.serial
            assert cuts == [CutOff("node-0", old.certificate.serial, True, carried_sends=False)]
            assert set(serials_of(coord, "node-0")) == {new}
            gate.set()
            for task_id in (running, await c.submit(spec("after", "single", x[1:2]))):
                record = await succeeded(c, task_id)  # node-0 is the only node: not shunned
                assert [(i.node, i.attempt) for i in record.items] == [("node-0", 1)]
            assert c.stats_.redispatched_after_disconnect == 0  # nothing went the stale way
            assert stale.assigned() == []
        finally:
            gate.set()


async def test_items_sent_over_the_revoked_session_move_and_the_node_keeps_getting_work(tmp_path):
    x, _ = load_digits_holdout()
    mesh, old = with_reenrolled_node(tmp_path)
    async with mesh:
        c, coord = mesh.coordinator, mesh.mesh
        cuts = cut_offs(coord)
        async with StaleSession(old, coord) as stale:
            await stale_carries(mesh, stale)
            ids = [
                await c.submit(spec(f"r{i}", "single", x[i : i + 1], policy="round_robin"))
                for i in range(2)
            ]
            await until(lambda: stale.assigned())
            revoke(mesh, "coord", serial=old.certificate.serial)
            await until(lambda: cuts)
        assert cuts == [CutOff("node-0", old.certificate.serial, True, carried_sends=True)]
        (lost,) = stale.assigned()
        for task_id in ids:
            await succeeded(c, task_id)
        assert c.stats_.redispatched_after_disconnect == 1
        moved = await c.wait(lost.item_id.split("/")[0])  # "<task id>/<index>"
        assert [item.attempt for item in moved.items] == [2]  # ran again, over a good session
        await until(lambda: serving(c) == {"node-0", "node-1"})  # probes went the stale way, too
        later = [
            await c.submit(spec(f"a{i}", "single", x[i : i + 1], policy="round_robin"))
            for i in range(4)
        ]
        workers = {item.node for t in later for item in (await succeeded(c, t)).items}
        assert "node-0" in workers  # still schedulable: not shunned as revoked


async def test_no_work_goes_over_a_revoked_session_while_it_is_being_cut(tmp_path):
    """Between the list naming the certificate and its session's close (the list is written
    down first; the close waits for the session's writer), the node gets no new items: what
    went over that session would reach a revoked holder."""
    x, _ = load_digits_holdout()
    mesh, old = with_reenrolled_node(tmp_path)
    async with mesh:
        c, coord = mesh.coordinator, mesh.mesh
        cuts = cut_offs(coord)
        gate = hold_cut(coord)
        try:
            async with StaleSession(old, coord) as stale:
                await stale_carries(mesh, stale)
                revoke(mesh, "coord", serial=old.certificate.serial)
                await until(lambda: coord.admission.revocations.is_revoked(old.certificate))
                ids = [
                    await c.submit(spec(f"w{i}", "single", x[i : i + 1], policy="round_robin"))
                    for i in range(4)
                ]
                records = [await c.wait(task_id, timeout=10) for task_id in ids]
                assert stale.assigned() == []
                assert [r.state.value for r in records] == ["succeeded"] * 4
                assert {item.node for r in records for item in r.items} == {"node-1"}
                assert not cuts  # all that happened while the cut was held
                gate.set()
                await until(lambda: cuts)
        finally:
            gate.set()
        # it carried node-0's messages, but none of its items: nothing to re-dispatch
        assert cuts == [CutOff("node-0", old.certificate.serial, True, carried_sends=True)]
        assert c.stats_.redispatched_after_disconnect == 0
        later = [
            await c.submit(spec(f"a{i}", "single", x[i : i + 1], policy="round_robin"))
            for i in range(4)
        ]
        workers = {item.node for t in later for item in (await succeeded(c, t)).items}
        assert workers == {"node-0", "node-1"}  # node-0 again, over its good session


async def test_work_parked_while_a_session_was_being_cut_goes_out_once_it_is_closed(tmp_path):
    """node-0, the only node, is refused work while its carrying session is being cut: a task
    submitted meanwhile waits, parked. The cut closes that session and node-0 keeps its good
    one: the parked item is tried again then (not at the parked loop's next tick)."""
    x, _ = load_digits_holdout()
    mesh, old = with_reenrolled_node(tmp_path, n=1)
    async with mesh:
        c, coord = mesh.coordinator, mesh.mesh
        woken: list[bool] = []  # at each cut-off: was the parked loop woken by then?
        gate = hold_cut(coord)
        coord.revocation_sync.on_cut_off(lambda _: woken.append(c._wake_parked.is_set()))
        try:
            async with StaleSession(old, coord) as stale:
                await stale_carries(mesh, stale)
                revoke(mesh, "coord", serial=old.certificate.serial)
                await until(lambda: coord.admission.revocations.is_revoked(old.certificate))
                parked = await c.submit(spec("parked", "single", x[:1]))
                why = c.waiting(parked)
                assert why == {"parked/0": "no live, reachable node serves model digits-mlp@1"}
                gate.set()
                await until(lambda: woken)
            assert woken == [True]
            record = await succeeded(c, parked)
            assert [(i.node, i.attempt) for i in record.items] == [("node-0", 1)]
            assert stale.assigned() == []
        finally:
            gate.set()


async def test_items_are_not_sent_again_over_a_revoked_session_while_it_is_being_cut(tmp_path):
    """node-0's good session is lost while its stale one, under a revoked certificate, is
    being cut. The probe's ping goes over the stale one, which answers (session control), but
    the items node-0 holds are not sent again over it, to the revoked holder: the cut-off
    moves them."""
    x, _ = load_digits_holdout()
    mesh, old = with_reenrolled_node(tmp_path, n=1)
    async with mesh:
        c, coord = mesh.coordinator, mesh.mesh
        new = mesh.daemons["node-0"].identity.certificate.serial
        cuts = cut_offs(coord)
        gate, inference = hold_cut(coord), hold_inference(mesh.daemons["node-0"])
        try:
            held = await c.submit(spec("held", "single", x[:1]))
            await until(lambda: any(n["in_flight"] for n in c.nodes()))  # over the good one
            async with StaleSession(old, coord) as stale:
                revoke(mesh, "coord", serial=old.certificate.serial)
                await until(lambda: coord.admission.revocations.is_revoked(old.certificate))
                (good,) = [s for s in coord.peers.open_sessions("node-0") if s.peer.serial == new]
                await good.stream.aclose()  # lost: no Close frame; the stale one carries now
                await until(lambda: c.stats_.redials_ok)  # the node answered the probe
                assert stale.assigned() == [] and c.stats_.resent_after_redial == 0
                assert not cuts
                gate.set()
                await until(lambda: cuts)
            assert cuts[0].serial == old.certificate.serial and cuts[0].carried_sends
            assert c.stats_.redispatched_after_disconnect == 1  # moved by the cut-off
            inference.set()
            await succeeded(c, held)
        finally:
            gate.set()
            inference.set()


async def test_items_held_back_during_a_cut_are_sent_again_once_it_is_done(tmp_path):
    """node-0 has its good session, a stale one under a certificate about to be revoked, and a
    second good one it dialled. The stale one's cut begins while the first good one carries
    node-0's items (so the cut will not move them), and its close is held. Then the first good
    session is lost: node-0 answers the probe, but the stale session now carries its messages,
    so its items are not sent again yet; once the cut is done they go over the good session
    left (not left to wait for their timeout)."""
    x, _ = load_digits_holdout()
    mesh, old = with_reenrolled_node(tmp_path, n=1)
    async with mesh:
        c, coord, node = mesh.coordinator, mesh.mesh, mesh.daemons["node-0"]
        new, cuts = node.identity.certificate.serial, cut_offs(coord)
        inference = hold_inference(node)
        closing, closed = asyncio.Event(), asyncio.Event()
        try:
            held = await c.submit(spec("held", "single", x[:1]))
            await until(lambda: any(n["in_flight"] for n in c.nodes()))
            async with StaleSession(old, coord) as stale:
                await dial_again(node.mesh.peers, coord.node_id)
                await until(lambda: serials_of(coord, "node-0") == [new, stale.serial, new])
                good, cut, _ = coord.peers.open_sessions("node-0")
                close = cut.aclose

                async def held_close(*args, **kwargs) -> None:
                    closing.set()
                    await closed.wait()
                    await close(*args, **kwargs)

                cut.aclose = held_close
                revoke(mesh, "coord", serial=old.certificate.serial)
                await asyncio.wait_for(closing.wait(), 10)  # carried: no (the first carries)
                await good.stream.aclose()  # lost: no Close frame; the stale one carries now
                await until(lambda: c.stats_.redials_ok)  # node-0 answered the probe
                assert c.stats_.resent_after_redial == 0 and stale.assigned() == []
                closed.set()
                await until(lambda: cuts)
                await until(lambda: c.stats_.resent_after_redial == 1)
                assert stale.assigned() == []
            assert cuts == [CutOff("node-0", old.certificate.serial, True, carried_sends=False)]
            assert c.stats_.redispatched_after_disconnect == 0
            inference.set()
            record = await succeeded(c, held)
            assert [(i.node, i.attempt) for i in record.items] == [("node-0", 1)]
        finally:
            closed.set()
            inference.set()


# --- the node's executor -----------------------------------------------------------------------


async def offloading_mesh(tmp_path, stack: contextlib.AsyncExitStack, old_of: str | None = None):
    """Two daemons; node-0 runs one item at a time (held by the returned gate) and forwards the
    rest to node-1, which keeps them until the returned ``release`` is set."""
    config = CoordinatorConfig(item_timeout_s=120.0)  # the hand-back, not the timeout, must act
    mesh = Mesh(tmp_path, n=2, extra=OFFLOADING, config=config)
    old = reenroll(mesh, old_of) if old_of else None
    await stack.enter_async_context(mesh)
    busy, helper = mesh.daemons["node-0"], mesh.daemons["node-1"]
    gate, release = hold_inference(busy), hold_inference(helper)
    stack.callback(release.set)  # lets node-1's batcher finish so the daemon can close
    stack.callback(gate.set)
    x, _ = load_digits_holdout()
    ids = [
        await mesh.coordinator.submit(spec(f"h{i}", "single", x[i : i + 1], policy="round_robin"))
        for i in range(4)
    ]
    await until(lambda: busy.executor.stats.offloaded >= 1, timeout=10)
    return mesh, ids, gate, release, old


async def test_items_offloaded_to_a_peer_cut_off_for_revocation_are_handed_back(tmp_path):
    async with contextlib.AsyncExitStack() as stack:
        mesh, ids, gate, _, _ = await offloading_mesh(tmp_path, stack)
        busy = mesh.daemons["node-0"]
        revoke(mesh, "node-0", node_id="node-1")  # node-0 hears of it first
        await until(lambda: busy.executor.stats.handed_back >= 1)
        gate.set()
        records = [await succeeded(mesh.coordinator, task_id) for task_id in ids]
        errors = [item.error or "" for r in records for item in r.items]
        assert any("offloaded to node-1, which was lost (certificate" in e for e in errors)
        assert {item.node for r in records for item in r.items} == {"node-0"}


async def test_a_stale_session_cut_off_does_not_hand_back_what_went_over_the_good_one(tmp_path):
    async with contextlib.AsyncExitStack() as stack:
        mesh, ids, gate, release, old = await offloading_mesh(tmp_path, stack, old_of="node-1")
        busy = mesh.daemons["node-0"]
        cuts = cut_offs(busy.mesh)
        async with StaleSession(old, busy.mesh) as stale:  # node-0 sends over the older one
            revoke(mesh, "node-0", serial=old.certificate.serial)
            await until(lambda: cuts)
        assert cuts == [CutOff("node-1", old.certificate.serial, True, carried_sends=False)]
        assert stale.assigned() == []
        gate.set()
        release.set()
        for task_id in ids:
            await succeeded(mesh.coordinator, task_id)
        stats = busy.executor.stats
        assert stats.handed_back == 0 and stats.relayed == stats.offloaded >= 1
