"""Fast failover: a node whose session is lost abruptly gets its items re-dispatched at once.

Real node daemons as processes with the ``lan`` membership preset (SWIM needs ~5 s to declare a
crashed node dead there): a SIGKILLed node's items move to the other node before membership
declares it dead, the task completes with every result accepted exactly once, and the node is
scheduled again once it is back. A stopped node (SIGSTOP) whose other session stays open but
silent has its items moved once it answers neither a ping there nor a new dial, and the silent
session closed. A SIGTERM (drain, leave, Close frames) moves nothing it finished. In-process
peers pin down the other branches: a graceful ``Close`` with the listener gone re-dispatches
nothing, a lost session whose node answers the re-dial keeps its items where they are, and so
does a node that went silent on every session left but answers a new dial (it roamed), or that
dials the coordinator itself from where it is now; either way its answers go over the new
session. Fakes pin down the bookkeeping: nothing is kept of nodes that came and went.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest

from coordinator.failover import Reachability
from coordinator.journal import TaskRecord
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.errors import TransportError
from meshinfer.identity_files import NodeDirectory
from meshinfer.inference.base import ModelRef
from meshinfer.inference.mlp import forward
from meshinfer.inference.synthetic import SyntheticSpec, make_weights
from meshinfer.proto.membership import MemberEvent, MemberEventKind, MembershipConfig
from meshinfer.proto.membership_wire import ModelInfo as GossipModel
from meshinfer.proto.messages import CloseCode
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import TaskAssign, TaskResult, Tensor
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.runtime.session import Session, SessionConfig
from meshinfer.testing.cluster import LocalCluster
from meshinfer.transport.base import Address
from tests.helpers import dial_again, until

pytestmark = pytest.mark.slow

TINY = SyntheticSpec(10, 1)
TINY_REF = ModelRef(TINY.ref.model_id, TINY.ref.version)
#: One item at a time, each waiting 20 ms in the batcher (even when idle): a node holds
#: unfinished items.
SLOW_NODE = (
    f'[http]\nenabled = false\n[inference]\nmodels = ["{TINY_REF.model_id}@{TINY_REF.version}"]\n'
    "max_queue_delay_ms = 20.0\ndispatch_when_idle = false\n"
    "[executor]\nmax_concurrent = 1\noffload_queue_depth = 100000\n"
)
X, Y = "veh-x", "veh-y"


def mesh_for(
    cluster: LocalCluster,
    name: str,
    roles=("coordinator",),
    session: SessionConfig | None = None,
) -> MeshNode:
    ident = NodeDirectory(cluster.enroll(name, roles=roles)).load()
    revocations = NodeDirectory(cluster.root / "nodes" / name).revocations(ident.trust)
    opts = MeshNodeOptions(mdns=MdnsConfig.loopback(), membership=MembershipConfig.lan())
    if session is not None:
        opts = dataclasses.replace(opts, session=session)
    return MeshNode(ident, revocations, opts)


async def coordinator_for(
    cluster: LocalCluster,
    tmp,
    redial_timeout_s: float = 0.25,
    session: SessionConfig | None = None,
) -> tuple[MeshNode, Coordinator]:
    mesh = mesh_for(cluster, "coord", session=session)
    await mesh.start()
    config = CoordinatorConfig(item_timeout_s=60, redial_timeout_s=redial_timeout_s)
    coordinator = Coordinator(mesh, tmp / "journal.db", config)
    await coordinator.start()
    return mesh, coordinator


def serving(c: Coordinator, names) -> bool:
    nodes = {n["node_id"]: n for n in c.nodes()}
    return all(nodes.get(n, {}).get("status") == "alive" and nodes[n]["models"] for n in names)


def in_flight_on(c: Coordinator, node: str) -> int:
    return next((n["in_flight"] for n in c.nodes() if n["node_id"] == node), 0)


def batch(task_id: str, rows: int, seed: int) -> tuple[TaskSpec, np.ndarray]:
    x = np.random.default_rng(seed).random((rows, TINY.width), dtype=np.float32)
    spec = TaskSpec(task_id, Pattern.BATCH, Tensor.from_array(x), (TINY_REF,), shard_size=1)
    return spec, x


async def assert_succeeded(c: Coordinator, task_id: str, x: np.ndarray) -> TaskRecord:
    """Succeeded, with the right outputs in order."""
    record = await c.wait(task_id, timeout=30)
    assert record.state.value == "succeeded", record.summary.error
    outputs = c.result_of(record)["outputs"][0]
    np.testing.assert_allclose(outputs, forward(make_weights(TINY), x), rtol=1e-5, atol=1e-6)
    return record


async def assert_latest_attempts(c: Coordinator, task_id: str, x: np.ndarray) -> None:
    """Succeeded; every item's result is of its latest attempt; outputs in order."""
    record = await assert_succeeded(c, task_id, x)
    assert all(item.result_attempt == item.attempt for item in record.items)


async def assert_exactly_once(c: Coordinator, task_id: str, x: np.ndarray) -> None:
    """:func:`assert_latest_attempts`, and no result refused as a duplicate, of any task."""
    await assert_latest_attempts(c, task_id, x)
    stats = await c.stats()
    assert stats["duplicates"] == 0
    assert stats["journal_counters"].get("duplicate_results", 0) == 0


# --- real node processes -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_slow_nodes(tmp_path, fleet_id: str):
    """Node daemons X and Y (SLOW_NODE) as processes and an in-process coordinator that sees both
    serving: ``(cluster, mesh, coordinator)``."""
    async with LocalCluster(tmp_path, fleet_id=fleet_id, preset="lan") as cluster:
        for name in (X, Y):
            cluster.add_node(name, extra=SLOW_NODE)
            await asyncio.to_thread(cluster.start, name)
        mesh, c = await coordinator_for(cluster, tmp_path)
        try:
            await until(lambda: serving(c, (X, Y)))
            yield cluster, mesh, c
        finally:
            await c.aclose()
            await mesh.aclose()


async def assert_x_gets_work_again(
    mesh: MeshNode, c: Coordinator, task_id: str, seed: int, check=assert_exactly_once
):
    """Once X has a session with the coordinator again, it gets work again (``check``: how
    the task it takes part in must end)."""
    await until(lambda: mesh.peers.session(X) is not None)
    done_by_x = c.stats_.completed_by_node[X]
    spec, x = batch(task_id, 60, seed=seed)
    await c.submit(spec)
    await until(lambda: c.stats_.completed_by_node[X] > done_by_x)
    await check(c, task_id, x)


async def test_sigkilled_node_items_move_before_membership_declares_it_dead(tmp_path):
    async with two_slow_nodes(tmp_path, "failover-kill") as (cluster, mesh, c):
        spec, x = batch("killed", 160, seed=1)
        await c.submit(spec)
        await until(lambda: c.stats_.completed_by_node[X] >= 3 and in_flight_on(c, X) > 0)
        os.kill(cluster.processes[X].proc.pid, signal.SIGKILL)
        await until(lambda: c.stats_.redispatched_after_disconnect > 0 and not in_flight_on(c, X))
        # The real property: the items moved while membership still counts X as live.
        assert mesh.membership.core.member(X).is_live
        assert c.stats_.sessions_lost >= 1 and c.stats_.redials_ok == 0
        await assert_exactly_once(c, "killed", x)
        assert c.stats_.completed_by_node[Y] > 0
        # Nothing was sent to the dead X after that (it would have waited for its death).
        assert c.stats_.redispatched_after_death == c.stats_.redispatched_after_disconnect
        # X is back (same identity, new process)
        await asyncio.to_thread(cluster.start, X)
        await assert_x_gets_work_again(mesh, c, "after-restart", seed=2)


async def test_a_lost_session_is_not_replaced_by_one_the_node_does_not_answer_on(tmp_path, caplog):
    """A stopped node (SIGSTOP) keeps its second session open but answers nothing on it. When
    the first is lost, the coordinator pings over the second: no answer, so it abandons that one
    and dials the node afresh; its kernel takes the connection, but the handshake gets no
    answer either. Only then, after both budgets, the node's items move (not re-sent over a
    session that carries nothing, to wait for their timeout). Let go on, the node gets work
    over a new session."""
    caplog.set_level(logging.WARNING, logger="coordinator.failover")
    loop = asyncio.get_running_loop()
    async with two_slow_nodes(tmp_path, "failover-silent") as (cluster, mesh, c):
        first = mesh.peers.session(X)
        second = await dial_again(mesh.peers, X)
        spec, x = batch("silent", 160, seed=6)
        await c.submit(spec)
        await until(lambda: c.stats_.completed_by_node[X] >= 3 and in_flight_on(c, X) > 0)
        process = cluster.processes[X].proc
        process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(0.05)  # answers already on their way arrive
            assert in_flight_on(c, X) > 0
            dials, lost_at = mesh.peers.stats.dials, loop.time()
            await first.stream.aclose()  # lost: no Close frame
            await until(lambda: not in_flight_on(c, X) and not second.is_open)
            assert mesh.membership.core.member(X).is_live  # moved before membership acted
            assert loop.time() - lost_at >= 2 * c.config.redial_timeout_s  # ping, then dial
            assert mesh.peers.stats.dials > dials and second.lost  # abandoned by the probe
            assert "neither answered a ping nor a new dial" in caplog.text
            assert c.stats_.sessions_lost >= 2 and c.stats_.redials_ok == 0
            assert c.stats_.resent_after_redial == 0
            assert c.stats_.redispatched_after_disconnect > 0
        finally:
            process.send_signal(signal.SIGCONT)
        # The node, going on, answers the items it held, moved or not: each result is accepted
        # once, and a moved item answered by both nodes has its second answer refused as a
        # duplicate (whether the other node got it first is timing: how much of the task was
        # left to it when the items moved), maybe only while the next task runs.
        await assert_succeeded(c, "silent", x)
        await assert_x_gets_work_again(mesh, c, "after-silence", 7, check=assert_latest_attempts)


async def test_sigterm_drain_moves_nothing_the_node_finished(tmp_path):
    async with two_slow_nodes(tmp_path, "failover-term") as (cluster, mesh, c):
        spec, x = batch("drained", 120, seed=3)
        await c.submit(spec)
        await until(lambda: c.stats_.completed_by_node[X] >= 3 and in_flight_on(c, X) > 0)
        process = cluster.processes[X].proc
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
        await assert_exactly_once(c, "drained", x)
        await until(lambda: mesh.peers.session(X) is None)
        assert c.stats_.sessions_closed >= 1
        assert c.stats_.sessions_lost == 0 and c.stats_.redispatched_after_disconnect == 0


# --- in-process peers ------------------------------------------------------------------------


class HoldingNode:
    """An in-process mesh node that gossips the tiny model and keeps every item it is sent."""

    def __init__(
        self, cluster: LocalCluster, name: str, session: SessionConfig | None = None
    ) -> None:
        self.mesh = mesh_for(cluster, name, roles=("vehicle",), session=session)
        self.held: list[TaskAssign] = []

    async def start(self) -> None:
        await self.mesh.start()
        self.mesh.peers.on(TaskAssign, lambda _peer, msg: self.held.append(msg))
        membership = self.mesh.membership
        models = (GossipModel(TINY_REF.model_id, TINY_REF.version),)
        membership.update_state(dataclasses.replace(membership.state, models=models))

    async def drop_sessions_abruptly(self, peer: str) -> None:
        """Close the sockets under every session with ``peer``, no Close frame (still listening).

        Sessions that open meanwhile (the peer re-dialling) are left alone."""
        fresh: set[int] = set()
        self.mesh.peers.on_session(lambda _peer, session: fresh.add(id(session)))
        while (session := self.mesh.peers.session(peer)) is not None and id(session) not in fresh:
            await session.stream.aclose()
            await session.wait_closed()


async def holding_setup(tmp_path, fleet_id: str, session: SessionConfig | None = None):
    """A :class:`HoldingNode` ("holder") and a coordinator (both with ``session``, if given)
    that sent it the three items of task "held"."""
    cluster = LocalCluster(tmp_path, fleet_id=fleet_id, preset="lan")
    node = HoldingNode(cluster, "holder", session)
    await node.start()
    # (the holder answers on this test's loop: time for a dial and a ping on a busy machine)
    mesh, c = await coordinator_for(cluster, tmp_path, redial_timeout_s=2.0, session=session)
    await until(lambda: serving(c, ("holder",)))
    spec, _ = batch("held", 3, seed=4)
    await c.submit(spec)
    await until(lambda: len(node.held) == 3)
    return node, mesh, c


async def test_graceful_close_without_leave_moves_nothing(tmp_path):
    node, mesh, c = await holding_setup(tmp_path, "failover-close")
    try:
        await node.mesh.aclose()  # Close frames on every session; listener gone; no leave
        await until(lambda: mesh.peers.session("holder") is None and c.stats_.sessions_closed)
        assert c.stats_.sessions_lost == 0 and c.stats_.redispatched_after_disconnect == 0
        assert in_flight_on(c, "holder") == 3  # left to membership and the item timeout
    finally:
        await c.aclose()
        await mesh.aclose()
        await node.mesh.aclose()


async def test_lost_session_whose_node_answers_the_redial_keeps_its_items(tmp_path):
    """The items stay on the node, and go to it again under the same attempts: what went over
    the lost session (and any answer on its way back) may be gone, and a node that restarted
    quickly would hold nothing."""
    node, mesh, c = await holding_setup(tmp_path, "failover-redial")
    try:
        sent = sorted((m.item_id, m.attempt) for m in node.held)
        await node.drop_sessions_abruptly(c.node_id)
        await until(lambda: c.stats_.redials_ok >= 1 or c.stats_.resent_after_redial >= 3)
        assert c.stats_.sessions_lost >= 1 and c.stats_.redispatched_after_disconnect == 0
        assert in_flight_on(c, "holder") == 3 and mesh.peers.session("holder") is not None
        await until(lambda: len(node.held) == 6)
        assert sorted((m.item_id, m.attempt) for m in node.held[3:]) == sent
        assert c.stats_.resent_after_redial == 3 and c.stats_.retries == 0
        spec, _ = batch("still-scheduled", 2, seed=5)
        await c.submit(spec)
        await until(lambda: len(node.held) == 8)  # not excluded from scheduling
    finally:
        await c.aclose()
        await mesh.aclose()
        await node.mesh.aclose()


class SilentLink:
    """A TCP relay on loopback to ``target`` that forwards both ways until :meth:`go_silent`;
    from then on it neither forwards nor closes anything (a link that died without a reset, as
    a vehicle's old connections when it roamed away), until :meth:`aclose` ends every
    connection through it."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.silent = False
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()

    async def start(self) -> Address:
        """Listen; returns the address to dial through the link."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return Address("127.0.0.1", self._server.sockets[0].getsockname()[1])

    def go_silent(self) -> None:
        self.silent = True

    async def aclose(self) -> None:
        self._server.close()
        for task in self._relays:
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _relay(self, down: asyncio.StreamReader, back: asyncio.StreamWriter) -> None:
        self._relays.add(asyncio.current_task())
        up_reader, up = await asyncio.open_connection(self.target.host, self.target.port)
        async with asyncio.TaskGroup() as pumps:
            pumps.create_task(self._pump(down, up))
            pumps.create_task(self._pump(up_reader, back))

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while (data := await source.read(65536)) and not self.silent:
                sink.write(data)
                await sink.drain()
            if self.silent:  # what came is dropped; nothing more is read, nothing closed
                await asyncio.Event().wait()
        finally:
            sink.close()


def answer(node: HoldingNode, to: str, held: list[TaskAssign]) -> None:
    """``node`` sends the result of each of ``held`` to ``to``, as a node would."""
    weights = make_weights(TINY)
    for m in held:
        output = Tensor.from_array(forward(weights, m.input.to_array()))
        result = TaskResult(m.item_id, m.attempt, output, "holder", "numpy", "cpu", {})
        node.mesh.peers.send(to, result)


async def test_a_node_silent_on_its_sessions_that_answers_a_new_dial_keeps_its_items(tmp_path):
    """A vehicle that roamed: its connections with the coordinator dead but not reset, a dial
    to where it is now works. One of its sessions is lost, the one left stays silent: the
    coordinator closes that one and dials the node afresh. The node keeps its items: they go
    to it again over the new session, under the same attempts. Its own end of the silent
    session still looks open, but it answers over the new one: the coordinator's dial made it
    check the older session, which did not answer. The task completes exactly once, with
    nothing re-dispatched."""
    node, mesh, c = await holding_setup(tmp_path, "failover-roamed")
    link = SilentLink(mesh.peers.addresses["holder"].address)
    try:
        sent = sorted((m.item_id, m.attempt) for m in node.held)
        silent = await dial_again(mesh.peers, "holder", via=await link.start())
        held = node.mesh.peers
        await until(lambda: len(held.open_sessions(c.node_id)) >= 2)  # the holder has it too
        link.go_silent()
        for session in mesh.peers.open_sessions("holder"):
            if session is not silent:
                await session.stream.aclose()  # lost: no Close frame
        await until(lambda: c.stats_.redials_ok or c.stats_.redispatched_after_disconnect)
        # both lost: the one the test closed, and the silent one, which the probe abandoned
        # (reset, no Close frame to wait behind the stuck link)
        assert c.stats_.sessions_lost >= 2 and c.stats_.redials_ok == 1
        assert c.stats_.redispatched_after_disconnect == c.stats_.redispatched_after_death == 0
        assert not silent.is_open and silent.lost
        assert silent.close_reason == "no answer to a ping"
        assert in_flight_on(c, "holder") == 3 and mesh.peers.session("holder") is not None
        await until(lambda: len(node.held) == 6)
        assert sorted((m.item_id, m.attempt) for m in node.held[3:]) == sent
        answer(node, c.node_id, node.held[3:])  # the link still swallows what goes into it
        await assert_exactly_once(c, "held", batch("held", 3, seed=4)[1])
        assert c.stats_.retries == 0 and c.stats_.redispatched_after_death == 0
        assert held.stats.abandoned >= 1 and len(held.open_sessions(c.node_id)) == 1
    finally:
        await link.aclose()
        await c.aclose()
        await mesh.aclose()
        await node.mesh.aclose()


async def only_over(link: SilentLink, mesh: MeshNode, node: HoldingNode) -> Session:
    """The coordinator's (``mesh``) only session with the holder, through ``link``; the
    holder's other sessions with it ended gracefully."""
    via_link = await dial_again(mesh.peers, "holder", via=await link.start())
    await until(lambda: len(node.mesh.peers.open_sessions(mesh.node_id)) == 2)
    for session in mesh.peers.open_sessions("holder"):
        if session is not via_link:
            await session.aclose()
    await until(lambda: len(node.mesh.peers.open_sessions(mesh.node_id)) == 1)
    return via_link


async def resent_over_a_new_session(c: Coordinator, node: HoldingNode, sent: list) -> None:
    """The holder got ``sent`` (item, attempt) again; its answers complete the tasks "held"
    and "roamed" exactly once, with nothing re-dispatched."""
    await until(lambda: len(node.held) == 2 * len(sent))
    assert sorted((m.item_id, m.attempt) for m in node.held[len(sent) :]) == sent
    assert c.stats_.redials_ok == 1 and c.stats_.resent_after_redial == len(sent)
    assert c.stats_.redispatched_after_disconnect == 0
    answer(node, c.node_id, node.held[len(sent) :])
    await assert_exactly_once(c, "held", batch("held", 3, seed=4)[1])
    await assert_exactly_once(c, "roamed", batch("roamed", 3, seed=8)[1])
    assert c.stats_.retries == 0 and c.stats_.redispatched_after_death == 0


async def test_a_node_that_roamed_and_dialled_the_coordinator_gets_its_items_again(tmp_path):
    """The other way round: the node dials the coordinator from where it is now, while the
    coordinator's session with it (the one its items went over) looks open but is dead. The
    coordinator checks that older session, abandons it as lost when it does not answer, and
    sends the node's items again over the new session, under the same attempts."""
    node, mesh, c = await holding_setup(tmp_path, "failover-dialled-in")
    link = SilentLink(mesh.peers.addresses["holder"].address)
    try:
        via_link = await only_over(link, mesh, node)
        await c.submit(batch("roamed", 3, seed=8)[0])
        await until(lambda: len(node.held) == 6)  # over the link
        sent = sorted((m.item_id, m.attempt) for m in node.held)
        link.go_silent()
        await dial_again(node.mesh.peers, c.node_id)  # the node, from where it is now
        await resent_over_a_new_session(c, node, sent)
        assert not via_link.is_open and via_link.lost and mesh.peers.stats.abandoned >= 1
    finally:
        await link.aclose()
        await c.aclose()
        await mesh.aclose()
        await node.mesh.aclose()


async def test_a_session_silent_for_the_idle_timeout_is_lost_and_its_node_probed(tmp_path):
    """Nobody dials: the coordinator's only session with the node goes silent (a vehicle that
    roamed, its connections dead but not reset). The idle timeout ends it as lost, not as a
    graceful close, so the coordinator probes the node at once: a dial to where it is now
    works, and its items go to it again, rather than waiting for their item timeout."""
    quick = SessionConfig(idle_timeout=3.0, keepalive_interval=0.5)
    node, mesh, c = await holding_setup(tmp_path, "failover-idle", session=quick)
    link = SilentLink(mesh.peers.addresses["holder"].address)
    try:
        via_link = await only_over(link, mesh, node)
        await c.submit(batch("roamed", 3, seed=8)[0])
        await until(lambda: len(node.held) == 6)
        sent = sorted((m.item_id, m.attempt) for m in node.held)
        link.go_silent()
        await resent_over_a_new_session(c, node, sent)
        assert via_link.lost and via_link.close_code == CloseCode.IDLE_TIMEOUT
        assert c.stats_.sessions_lost >= 1
    finally:
        await link.aclose()
        await c.aclose()
        await mesh.aclose()
        await node.mesh.aclose()


# --- the bookkeeping, with fakes ---------------------------------------------------------------


class FakeSession:
    """What :class:`Reachability` reads of a session: whose it is, whether open, how it ended."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.lost = False
        self._ended = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return not self._ended.is_set()

    async def wait_closed(self) -> None:
        await self._ended.wait()

    def end(self, *, lost: bool) -> None:
        self.lost = lost
        self._ended.set()


class SilentSession(FakeSession):
    """A session that never answers a ping, and whose close is already under way: abandoning
    it does nothing; it ends when the test ends it."""

    def __init__(self, peer_id: str) -> None:
        super().__init__(peer_id)
        self.abandoned: list[str] = []

    async def ping(self, timeout: float) -> None:
        await asyncio.sleep(timeout)
        raise TimeoutError

    async def abandon(self, reason: str) -> None:
        self.abandoned.append(reason)


class FakePeers:
    """A peer table whose sessions the test opens and ends, and whose dials wait for
    ``dialled`` (forever unless set) and then fail."""

    def __init__(self) -> None:
        self.dialled = asyncio.Event()
        self.dials = 0
        self._callbacks = []
        self._sessions: list[FakeSession] = []

    def on_session(self, callback) -> None:
        self._callbacks.append(callback)

    def open(self, node: str, kind: type[FakeSession] = FakeSession) -> FakeSession:
        session = kind(node)
        self._sessions.append(session)
        for callback in self._callbacks:
            callback(node, session)
        return session

    def open_sessions(self, node_id: str | None = None) -> list[FakeSession]:
        return [s for s in self._sessions if s.is_open and node_id in (None, s.peer_id)]

    async def request(self, node: str, _msg) -> None:
        self.dials += 1
        await self.dialled.wait()
        raise TransportError(f"could not dial {node}")

    def carrier_revoked(self, _node: str) -> bool:
        return False


def fake_reachability(peers: FakePeers, redial_timeout_s: float = 5.0):
    """A started :class:`Reachability` over ``peers``: ``(reach, counts, lost, resent)``."""
    counts = SimpleNamespace(sessions_lost=0, sessions_closed=0, redials_ok=0)
    lost: list[str] = []
    resent: list[str] = []
    mesh = SimpleNamespace(peers=peers, revocation_sync=None, membership=None)
    reach = Reachability(
        mesh, counts, redial_timeout_s=redial_timeout_s,
        on_lost=lambda node, _why: lost.append(node), on_back=lambda: None, on_resend=resent.append,
    )  # fmt: skip
    reach.start()
    return reach, counts, lost, resent


def node_ids_kept(reach: Reachability) -> set[str]:
    """The node ids among the keys and members of every container ``reach`` holds."""
    kept: set[str] = set()
    for value in vars(reach).values():
        if isinstance(value, dict | set | list):
            kept |= {k for k in value if isinstance(k, str) and k.startswith("veh-")}
    return kept


async def test_nothing_is_kept_of_nodes_that_came_and_went():
    """Per-node state is bounded by the nodes under probe or given up on, not by every node
    ever seen: sessions that ended gracefully leave nothing, a node given up on is kept until
    membership forgets it."""
    peers = FakePeers()
    peers.dialled.set()  # dials fail at once
    reach, counts, lost, _ = fake_reachability(peers)
    try:
        for i in range(50):
            peers.open(f"veh-{i}").end(lost=False)
        peers.open("veh-gone").end(lost=True)
        await until(lambda: counts.sessions_closed == 50 and lost == ["veh-gone"])
        assert node_ids_kept(reach) == {"veh-gone"}  # (given up on: kept out of scheduling)
        forgotten = SimpleNamespace(node_id="veh-gone", incarnation=1)
        reach.on_member(MemberEvent(MemberEventKind.FORGOTTEN, forgotten, at=0.0))
        assert node_ids_kept(reach) == set()
    finally:
        await reach.aclose()


async def test_every_session_open_before_the_start_is_watched():
    peers = FakePeers()
    peers.dialled.set()
    oldest, newer = peers.open("veh-a"), peers.open("veh-a")  # before anyone watches
    reach, counts, lost, _ = fake_reachability(peers)
    try:
        oldest.end(lost=False)
        newer.end(lost=True)  # (not the one messages went over: all the same, a suspect)
        await until(lambda: counts.sessions_closed == 1 and lost == ["veh-a"])
        assert counts.sessions_lost == 1
    finally:
        await reach.aclose()


async def test_a_silent_session_already_closing_is_waited_for_before_the_dial():
    """The probe abandons a session that did not answer its ping; one whose close was already
    under way (abandoning it does nothing then) is waited for: until it is closed, the peer
    table would still send over it, the dial's Ping included."""
    peers = FakePeers()
    peers.dialled.set()  # dials fail at once
    reach, counts, lost, _ = fake_reachability(peers, redial_timeout_s=0.05)
    try:
        closing = peers.open("veh-a", SilentSession)
        peers.open("veh-a").end(lost=True)
        await until(lambda: closing.abandoned == ["no answer to a ping"])
        for _ in range(20):  # loop turns, not time: a dial would have come (and failed) by now
            await asyncio.sleep(0)
        assert peers.dials == 0 and lost == []
        closing.end(lost=False)  # its close is done
        await until(lambda: lost == ["veh-a"])
        assert peers.dials == 1 and counts.sessions_lost == 1
    finally:
        await reach.aclose()


async def test_a_session_that_opens_during_a_probe_is_an_answer():
    """While a node is probed (its re-dial hanging), a session with it opens: it is up, so it
    keeps its items (sent again), although the re-dial itself failed."""
    peers = FakePeers()
    reach, counts, lost, resent = fake_reachability(peers, redial_timeout_s=5.0)
    try:
        peers.open("veh-a").end(lost=True)
        await until(lambda: counts.sessions_lost == 1)
        peers.open("veh-a")
        peers.dialled.set()
        await until(lambda: counts.redials_ok == 1)
        assert resent == ["veh-a"] and lost == []
    finally:
        await reach.aclose()


def test_redial_timeout_must_not_be_negative():
    with pytest.raises(ValueError, match="redial_timeout_s"):
        CoordinatorConfig(redial_timeout_s=-1.0)
    assert CoordinatorConfig(redial_timeout_s=0.0).redial_timeout_s == 0.0  # 0: fast path off
