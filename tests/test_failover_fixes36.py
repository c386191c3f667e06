"""Adversarial review of the coordinator's fault tolerance and dispatch (session 36).

Real coordinator and node daemons in this process (``tests.test_coordinator_service.Mesh``,
real TCP on loopback, a real SQLite journal); each race is set up by calling the coordinator's
handlers in the order under test (no sleeps).
"""

from __future__ import annotations

import asyncio

from coordinator.service import CoordinatorConfig
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.tasks_wire import FailureKind, TaskFailed
from tests.helpers import until
from tests.test_coordinator_failover import FakePeers, FakeSession, fake_reachability
from tests.test_coordinator_service import Mesh, hold_inference, restarted_as_if_accepted_ago, spec

DEEP = ModelRef("digits-mlp-deep", "1")


async def test_a_recovered_retry_goes_to_another_node_than_the_failed_attempts(tmp_path):
    """An item's attempt fails on a node and the coordinator restarts during the retry's
    backoff: the recovered attempt goes to another node while one fits, as it would have
    without the restart (before: the recovered item had no nodes tried, and the policy, here
    ``model_affinity``'s rendezvous order, sent it straight back to the node it failed on)."""
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=30.0, retry_backoff_s=60.0, retry_backoff_max_s=60.0)
    async with Mesh(tmp_path, n=2, config=config) as mesh:
        gates = [hold_inference(d) for d in mesh.daemons.values()]
        try:
            c = mesh.coordinator
            task_id = await c.submit(spec("again", "single", x[:1], policy="model_affinity"))
            entry = c._items["again/0"][1]
            await until(lambda: entry.node is not None)
            failed_on = entry.node
            failed = TaskFailed("again/0", 1, FailureKind.INFERENCE_ERROR, "boom", True)
            c._on_failed(failed_on, failed)
            assert entry.attempt == 2 and entry.node is None  # in its (long) backoff
            await until(lambda: not len(c._steps))  # the failure of attempt 1 is journaled
            c = await restarted_as_if_accepted_ago(mesh, 0.0)
            recovered = c._items["again/0"][1]
            await until(lambda: recovered.node is not None)
            assert recovered.attempt == 2
            assert recovered.node != failed_on, "the retry went back to the node it failed on"
            assert (1, failed_on) in recovered.sent  # its late answer still counts
        finally:
            for gate in gates:
                gate.set()
        record = await c.wait(task_id, timeout=10)
        assert record.state.value == "succeeded"


def _pending_calls_of(callback) -> list[asyncio.TimerHandle]:
    """The loop's timers, not cancelled, that would call ``callback`` (the loop's own list:
    asyncio keeps no public one)."""
    scheduled = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
    return [h for h in scheduled if not h.cancelled() and h._callback == callback]


async def test_closing_during_a_retrys_backoff_leaves_no_timer(tmp_path):
    """The coordinator closes while an item waits out its retry's backoff: no timer of it is
    left on the loop (it would hold the closed coordinator, its runs and journal, for up to
    ``retry_backoff_max_s``, then queue the item into a dispatcher that is gone)."""
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=30.0, retry_backoff_s=60.0, retry_backoff_max_s=60.0)
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        gate = hold_inference(mesh.daemons["node-0"])
        try:
            c = mesh.coordinator
            await c.submit(spec("later", "single", x[:1]))
            entry = c._items["later/0"][1]
            await until(lambda: entry.node is not None)
            failed = TaskFailed("later/0", 1, FailureKind.INFERENCE_ERROR, "x", True)
            c._on_failed(entry.node, failed)
            await until(lambda: not len(c._steps))  # its backoff is under way
            assert _pending_calls_of(c._queue)
            await c.aclose()
            assert _pending_calls_of(c._queue) == []
        finally:
            gate.set()


async def test_a_retry_waits_for_a_full_node_it_was_not_on_rather_than_go_back(tmp_path):
    """An item failed on node A (a broken node: as the least loaded, it draws the work) while
    node B, which it was not on, is full: the retry waits for a slot on B, as any item waits
    for a slot, rather than go straight back to A (before: "every capable node had it once"
    was taken for granted, the retry went back to A and, at ``max_attempts`` 2, the task
    failed though a healthy node would have run it a moment later)."""
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(
        item_timeout_s=30.0, max_attempts=2, max_in_flight_per_node=1, retry_backoff_s=0.0
    )
    async with Mesh(tmp_path, n=2, config=config) as mesh:
        c = mesh.coordinator
        busy_gate, a_gate = asyncio.Event(), asyncio.Event()
        for daemon in mesh.daemons.values():
            hold_inference(daemon, busy_gate, only=DEEP.model_id)
        try:
            await c.submit(spec("busy", "single", x[:1], models=(DEEP,)))
            busy = c._items["busy/0"][1]
            await until(lambda: busy.node is not None)
            b = busy.node
            a = next(n for n in mesh.daemons if n != b)
            hold_inference(mesh.daemons[a], a_gate)  # attempt 1 stays on A until it fails
            task_id = await c.submit(spec("black-hole", "single", x[:1]))
            entry = c._items["black-hole/0"][1]
            await until(lambda: entry.node is not None)
            assert entry.node == a  # B is full
            broken = TaskFailed("black-hole/0", 1, FailureKind.INFERENCE_ERROR, "broken", True)
            c._on_failed(a, broken)

            def parked() -> bool:
                return any(e[2] == "black-hole/0" for heap in c._parked.values() for e in heap)

            await until(lambda: entry.node is not None or parked())
            assert entry.node is None, "the retry went back to the node it failed on"
            busy_gate.set()  # B's slot frees: the retry goes there
            record = await c.wait(task_id, timeout=10)
        finally:
            busy_gate.set()
            a_gate.set()
        assert record.state.value == "succeeded", record.summary.error
        assert record.items[0].node == b and record.items[0].attempt == 2


class AnsweringSession(FakeSession):
    """A session that answers every ping (and counts them)."""

    pings = 0

    async def ping(self, timeout: float) -> float:
        self.pings += 1
        return 0.001


class HangingSession(FakeSession):
    """A session whose pings go unanswered until the test lets them time out (``gate``);
    abandoning it ends it lost."""

    def __init__(self, peer_id: str) -> None:
        super().__init__(peer_id)
        self.gate = asyncio.Event()

    async def ping(self, timeout: float) -> float:
        await self.gate.wait()
        raise TimeoutError

    async def abandon(self, reason: str) -> None:
        self.end(lost=True)


async def test_an_answer_over_a_session_lost_during_the_probe_does_not_count():
    """A node loses a session; of its two others, one answers the probe's ping and is then
    lost too (the node under probe: that loss starts no probe of its own), the other stays
    silent and is abandoned. No session is left that answered: the re-dial decides, and it
    fails, so the node's items move (before: the stale answer counted, the items were sent
    again into a dial that fails, and the node stayed schedulable until membership said it
    was dead)."""
    peers = FakePeers()
    peers.dialled.set()  # dials fail at once
    reach, counts, lost, resent = fake_reachability(peers, redial_timeout_s=5.0)
    try:
        answering = peers.open("veh-a", AnsweringSession)
        hanging = peers.open("veh-a", HangingSession)
        peers.open("veh-a").end(lost=True)
        await until(lambda: answering.pings == 1)
        answering.end(lost=True)  # lost after its answer, while the probe waits on the other
        await until(lambda: counts.sessions_lost == 2)
        hanging.gate.set()  # its ping times out: abandoned
        await until(lambda: bool(lost or resent))
        assert (lost, resent) == (["veh-a"], [])
        assert peers.dials == 1 and counts.redials_ok == 0
    finally:
        await reach.aclose()


async def test_an_answer_over_a_session_still_open_keeps_the_nodes_items():
    """The same probe, the answering session still open once the silent one is abandoned:
    the node answered, keeps its items (sent again over that session), and nothing is
    dialled."""
    peers = FakePeers()
    reach, counts, lost, resent = fake_reachability(peers, redial_timeout_s=5.0)
    try:
        answering = peers.open("veh-a", AnsweringSession)
        hanging = peers.open("veh-a", HangingSession)
        peers.open("veh-a").end(lost=True)
        await until(lambda: answering.pings == 1)
        hanging.gate.set()
        await until(lambda: bool(lost or resent))
        assert (lost, resent) == ([], ["veh-a"])
        assert peers.dials == 0 and counts.redials_ok == 1 and answering.is_open
    finally:
        await reach.aclose()
