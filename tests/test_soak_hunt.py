"""Soak checks: state kept per node, session, task or item is released once that thing is gone.

A node daemon runs for weeks while vehicles come and go, sessions open and close and tasks pass
through; every collection keyed by one of those must return to its size at rest. Each test
drives many cycles in one process (a virtual clock where timers matter) and asserts on the
structures themselves, never on timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.discovery.static import StaticSeed
from meshinfer.inference.base import ModelRef
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.fleet import ThrowawayFleet, make_fleet
from meshinfer.testing.virtual_clock import VirtualClockLoop
from meshinfer.transport.base import Address
from meshinfer.transport.memory import MemoryNetwork, MemoryTransport
from tests.helpers import until

#: How long a peer's sender task waits for the next message before it ends (PeerTable._sender).
OUTBOX_IDLE_S = 30.0


def on_virtual_clock(scenario: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(scenario)


async def holds_within(predicate: Callable[[], object], seconds: float) -> bool:
    """Whether ``predicate`` holds within ``seconds`` (of the loop's clock)."""
    with contextlib.suppress(TimeoutError):
        await until(predicate, timeout=seconds)
    return bool(predicate())


class Roadside:
    """A node ``hub`` on an in-memory network, and vehicles that seed to it, join and go."""

    def __init__(self, vehicles: int) -> None:
        self.names = [f"car-{i}" for i in range(vehicles)]
        self.fleet: ThrowawayFleet = make_fleet(None, ["hub", *self.names])
        self.network = MemoryNetwork()
        self.hub = self.node("hub")

    def node(self, name: str, seeds: tuple[StaticSeed, ...] = ()) -> MeshNode:
        opts = MeshNodeOptions(
            listen=Address(name, 0), mdns=None, seeds=seeds, membership=MembershipConfig.test()
        )
        transport = MemoryTransport(self.network, host=name)
        identity = self.fleet.identities[name]
        return MeshNode(identity, self.fleet.revocations, opts, transport=transport,
                        rng=random.Random(name))  # fmt: skip

    def seed(self) -> StaticSeed:
        at, ident = self.hub.address, self.fleet.identities["hub"]
        return StaticSeed(
            "hub", at.host, at.port, ident.static_public, self.fleet.authority.fleet_id
        )

    async def visit(self, name: str, *, graceful: bool) -> None:
        """``name`` joins through the hub, is seen live there, then leaves or dies."""
        car = self.node(name, (self.seed(),))
        await car.start()
        await car.wait_joined()
        await until(lambda: name in self.hub.live_members())
        await (car.leave() if graceful else car.aclose())


def test_vehicles_that_passed_by_leave_nothing_in_the_hubs_peer_table() -> None:
    """Fifty vehicles join a roadside node and die or leave: once membership forgot them, the
    peer table holds no address, outbox, session or task for any of them, and a vehicle that
    comes back after that still joins."""

    async def scenario() -> None:
        road = Roadside(50)
        hub = road.hub
        await hub.start()
        tasks_at_rest = len(asyncio.all_tasks())
        try:
            for i, name in enumerate(road.names):
                await road.visit(name, graceful=i % 2 == 1)
            assert await holds_within(lambda: not hub.membership.core.members(), 600)
            peers = hub.peers
            assert await holds_within(lambda: not peers._outboxes, OUTBOX_IDLE_S + 5)
            assert sorted(peers.addresses) == []
            assert peers.open_sessions() == [] and not peers._sessions
            assert road.network.stream_count == 0
            assert len(asyncio.all_tasks()) == tasks_at_rest
            await road.visit(road.names[0], graceful=True)  # back again: learnt anew
        finally:
            await hub.aclose()

    on_virtual_clock(scenario())


async def gossip_changes(node: MeshNode, every_s: float) -> None:
    """What a busy node's telemetry loop does: a new queue depth gossiped every ``every_s``."""
    assert node.membership is not None
    for depth in range(1, 1 << 30):
        node.membership.update_state(replace(node.membership.state, queue_depth=depth % 7))
        await asyncio.sleep(every_s)


def test_parked_items_of_ended_tasks_are_dropped_while_gossip_keeps_waking_the_coordinator(
    tmp_path: Path,
) -> None:
    """Items no node can take wait in the coordinator's parked heaps. Tasks of a model nobody
    serves fail at their deadline; their parked entries must go even while a member's gossiped
    state changes more often than once a second (every busy node's does), each change waking
    the parked loop before its once-a-second sweep would have come."""

    async def scenario() -> None:
        road = Roadside(1)
        hub = road.hub
        await hub.start()
        car = road.node(road.names[0], (road.seed(),))
        await car.start()
        await car.wait_joined()
        coordinator = Coordinator(hub, tmp_path / "journal.db", CoordinatorConfig())
        await coordinator.start()
        busy = asyncio.get_running_loop().create_task(gossip_changes(car, 0.3))
        parked = lambda: sum(map(len, coordinator._parked.values()))  # noqa: E731
        try:
            x = Tensor.from_array(np.zeros((1, 4), dtype=np.float32))
            ghost = (ModelRef("ghost", "1"),)
            ids = [
                await coordinator.submit(
                    TaskSpec(f"ghost-{i}", Pattern.SINGLE, x, ghost, deadline_s=30.0),
                    will_wait=False,
                )
                for i in range(40)
            ]
            await until(lambda: parked() == len(ids))  # the premise: every item waits there
            for task_id in ids:
                assert (await coordinator.wait(task_id)).state.value == "failed"
            assert await holds_within(lambda: parked() == 0, 10.0), parked()
        finally:
            busy.cancel()
            await coordinator.aclose()
            await car.aclose()
            await hub.aclose()

    on_virtual_clock(scenario())
