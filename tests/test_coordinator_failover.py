"""Fast failover: a node whose session is lost abruptly gets its items re-dispatched at once.

Real node daemons as processes with the ``lan`` membership preset (SWIM needs ~5 s to declare a
crashed node dead there): a SIGKILLed node's items move to the other node before membership
declares it dead, the task completes with every result accepted exactly once, and the node is
scheduled again once it is back. A stopped node (SIGSTOP) whose other session stays open but
silent has its items moved as fast, and the silent session closed. A SIGTERM (drain, leave,
Close frames) moves nothing it finished. In-process peers pin down the two other branches: a
graceful ``Close`` with the listener gone re-dispatches nothing, and a lost session whose node
answers the re-dial keeps its items where they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal

import numpy as np
import pytest

from coordinator.journal import TaskRecord
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.identity_files import NodeDirectory
from meshinfer.inference.base import ModelRef
from meshinfer.inference.mlp import forward
from meshinfer.inference.synthetic import SyntheticSpec, make_weights
from meshinfer.proto.identity import NodeIdentity
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.membership_wire import ModelInfo as GossipModel
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import TaskAssign, Tensor
from meshinfer.runtime.endpoint import dial
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.runtime.session import Session
from meshinfer.testing.cluster import LocalCluster
from tests.helpers import until

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


def mesh_for(cluster: LocalCluster, name: str, roles=("coordinator",)) -> MeshNode:
    ident = NodeIdentity.load(cluster.enroll(name, roles=roles))
    revocations = NodeDirectory(cluster.root / "nodes" / name).revocations(ident.trust)
    opts = MeshNodeOptions(mdns=MdnsConfig.loopback(), membership=MembershipConfig.lan())
    return MeshNode(ident, revocations, opts)


async def coordinator_for(
    cluster: LocalCluster, tmp, redial_timeout_s: float = 0.25
) -> tuple[MeshNode, Coordinator]:
    mesh = mesh_for(cluster, "coord")
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


async def assert_exactly_once(c: Coordinator, task_id: str, x: np.ndarray) -> None:
    """Succeeded; every item has one result of its latest attempt; outputs in order."""
    record = await assert_succeeded(c, task_id, x)
    assert all(item.result_attempt == item.attempt for item in record.items)
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


async def assert_x_gets_work_again(mesh: MeshNode, c: Coordinator, task_id: str, seed: int):
    """Once X has a session with the coordinator again, it gets work again."""
    await until(lambda: mesh.peers.session(X) is not None)
    done_by_x = c.stats_.completed_by_node[X]
    spec, x = batch(task_id, 60, seed=seed)
    await c.submit(spec)
    await until(lambda: c.stats_.completed_by_node[X] > done_by_x)
    await assert_exactly_once(c, task_id, x)


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


async def second_session(mesh: MeshNode, node: str) -> Session:
    """Dial ``node`` once more: the coordinator then holds two sessions with it."""
    peer = mesh.peers.addresses[node]
    session = await dial(
        mesh.peers.transport, peer.address, mesh.peers.admission, config=mesh.peers.config,
        expected_static=peer.static_key, expected_node_id=node,
    )  # fmt: skip
    mesh.peers.adopt(session)
    return session


async def test_a_lost_session_is_not_replaced_by_one_the_node_does_not_answer_on(tmp_path):
    """A stopped node (SIGSTOP) keeps its second session open but answers nothing on it. When
    the first is lost, the coordinator pings over the second: no answer, so the node's items
    move at once (not re-sent over a session that carries nothing, to wait for their timeout)
    and the silent session is closed. Let go on, the node gets work over a new session."""
    async with two_slow_nodes(tmp_path, "failover-silent") as (cluster, mesh, c):
        first = mesh.peers.session(X)
        second = await second_session(mesh, X)
        spec, x = batch("silent", 160, seed=6)
        await c.submit(spec)
        await until(lambda: c.stats_.completed_by_node[X] >= 3 and in_flight_on(c, X) > 0)
        process = cluster.processes[X].proc
        process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(0.05)  # answers already on their way arrive
            assert in_flight_on(c, X) > 0
            await first.stream.aclose()  # lost: no Close frame
            await until(lambda: not in_flight_on(c, X) and not second.is_open)
            assert mesh.membership.core.member(X).is_live  # moved before membership acted
            assert c.stats_.sessions_lost >= 1 and c.stats_.redials_ok == 0
            assert c.stats_.resent_after_redial == 0
            assert c.stats_.redispatched_after_disconnect > 0
        finally:
            process.send_signal(signal.SIGCONT)
        # (the node, going on, may still answer a moved item first: accepted once)
        await assert_succeeded(c, "silent", x)
        await assert_x_gets_work_again(mesh, c, "after-silence", seed=7)


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

    def __init__(self, cluster: LocalCluster, name: str) -> None:
        self.mesh = mesh_for(cluster, name, roles=("vehicle",))
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


async def holding_setup(tmp_path, fleet_id: str):
    cluster = LocalCluster(tmp_path, fleet_id=fleet_id, preset="lan")
    node = HoldingNode(cluster, "holder")
    await node.start()
    # (the holder answers on this test's loop: time for a dial and a ping on a busy machine)
    mesh, c = await coordinator_for(cluster, tmp_path, redial_timeout_s=2.0)
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


def test_redial_timeout_must_not_be_negative():
    with pytest.raises(ValueError, match="redial_timeout_s"):
        CoordinatorConfig(redial_timeout_s=-1.0)
    assert CoordinatorConfig(redial_timeout_s=0.0).redial_timeout_s == 0.0  # 0: fast path off
