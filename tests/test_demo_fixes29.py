"""Session 29 fixes: the executor's answer when a result it kept cannot be written; why the
demo's stop waits (membership's leave, and MeshNode.leave's goodbyes)."""

from __future__ import annotations

import random
from dataclasses import replace

from meshinfer.discovery.static import StaticSeed
from meshinfer.proto.membership import Membership, MemberStatus
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_wire import AliveRecord, NodeState
from meshinfer.proto.tasks_wire import TaskFailed
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.runtime.session import SessionConfig
from meshinfer.testing.fleet import make_fleet
from tests.helpers import until
from tests.test_executor_sharing import KEEPING, Net, soon

# --- a result that could not be written -------------------------------------------------------


async def test_a_result_no_session_carries_is_kept_for_the_resend_not_failed():
    """The coordinator goes away while x runs: w can neither use the session x came over nor
    dial it, so the result is not written. w sends no TaskFailed (which would make the
    coordinator run x again, counted against its attempts): the coordinator, back, sends x
    again under the same attempt, as after a re-dial, and gets the kept result."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        await net.assign("coord", "x")
        await soon(lambda: executor.backlog == 1)  # held by the gate
        gone = net.nodes["coord"]
        await gone.listener.aclose()
        await gone.peers.aclose()
        net.gate.set()
        await soon(lambda: executor.backlog == 0)
        assert net.w.stats.dropped["dial-failed"] == 1  # the result, not written
        assert not executor.stats.failed and "x" in executor.replay
        assert net.w.stats.dropped["unreachable"] == 0  # (no failure queued after it)
        back = net.nodes["coord"] = await net.endpoint("coord", net.fleet.identities["coord"])
        net.teach(back.peers)
        await net.assign("coord", "x")
        await soon(lambda: back.answers() == [("TaskResult", "x", 1, "w")])
        assert executor.stats.accepted == 1 and executor.replay.stats.replayed == 1


async def test_a_result_too_large_for_the_session_is_answered_with_a_failure():
    """A result the session can never carry (over the peer's message cap: a local error, not a
    lost session) is no use kept: the coordinator hears at once, not at its attempt timeout."""
    async with Net(worker_sends=SessionConfig(max_message_size=2048)) as net:
        await net.connect("w", "coord")  # w dialled: its sends are capped at 2 KiB
        executor = net.worker(KEEPING)
        net.gate.set()
        await net.assign("coord", "big", rows=50)  # 1.6 KB in, 2 KB out
        coord = net.nodes["coord"]
        await soon(lambda: coord.failure("big") is not None)
        failed = coord.failure("big")
        assert isinstance(failed, TaskFailed) and failed.retryable and failed.attempt == 1
        assert coord.answers() == [("TaskFailed", "big", 1, "w")]
        assert net.w.stats.dropped["too-large"] == 1 and executor.stats.completed == 0


# --- the demo's stop: a fleet leaving at once ------------------------------------------------


def _core(node_id: str, peers: tuple[str, ...]) -> Membership:
    known = [AliveRecord(p, 0, 1, _state(p)) for p in peers]
    config = MembershipConfig.test()
    return Membership(node_id, _state(node_id), config, random.Random(7), 0.0, known_members=known)


def _state(name: str) -> NodeState:
    return NodeState(host=f"{name}.local", port=7946, static_key=bytes(32), roles=("vehicle",))


def _deliver(sender: Membership, cores: dict[str, Membership], now: float) -> None:
    for out in sender.drain_packets():
        cores[out.to_node].handle_packet(sender.node_id, out.data, now)


def test_the_first_of_two_members_leaving_at_once_hears_the_second_leave():
    cores = {"a": _core("a", ("b",)), "b": _core("b", ("a",))}
    a, b = cores["a"], cores["b"]
    a.leave(1.0)
    _deliver(a, cores, 1.0)  # b hears that a left
    assert b.member("a").status is MemberStatus.LEFT and not a.leave_announced
    b.leave(1.001)
    _deliver(b, cores, 1.001)
    assert a.leave_announced  # nobody left to tell: its daemon stops now


async def test_a_leaving_node_says_goodbye_on_discovery_while_membership_announces_it():
    fleet = make_fleet(None, ["rsu", "car"], roles=("vehicle", "rsu"))
    test = MeshNodeOptions(membership=MembershipConfig.test(), mdns=None)
    rsu = MeshNode(fleet.identities["rsu"], fleet.revocations, test)
    await rsu.start()
    seed = StaticSeed("rsu", "127.0.0.1", rsu.address.port, fleet.identities["rsu"].static_public,
                      "test-fleet")  # fmt: skip
    car = MeshNode(fleet.identities["car"], fleet.revocations, replace(test, seeds=[seed]))
    try:
        await car.start()
        await until(lambda: rsu.live_members() == ["car"] and car.live_members() == ["rsu"])
        (source,) = car.discovery
        closing: list[str] = []
        close, leave = source.aclose, car.membership.leave

        async def closed() -> None:
            closing.append("discovery")
            await close()

        async def left(timeout: float) -> bool:
            announced = await leave(timeout)  # rsu is live: this waits for gossip rounds
            closing.append("membership")
            return announced

        source.aclose, car.membership.leave = closed, left
        await car.leave()
        assert closing.index("discovery") < closing.index("membership")
    finally:
        await car.aclose()
        await rsu.aclose()
