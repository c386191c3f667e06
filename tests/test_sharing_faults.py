"""Faults found in work sharing (node/work_sharing.py): what a node does with items a peer passed it
once that peer is gone or revoked, what it relays from a helper, and how soon it notices a
helper that went away without answering. Real peer tables and Noise sessions over the in-memory
transport (the :class:`~tests.test_executor_sharing.Net` of the work-sharing tests), a real
NumPy engine and batcher held by a gate, and a stand-in membership table."""

from __future__ import annotations

import asyncio
import random

import pytest

from meshinfer.errors import TransportError
from meshinfer.inference.synthetic import sample_inputs
from meshinfer.proto.membership import MemberEvent, MemberEventKind
from meshinfer.proto.messages import AppData
from meshinfer.proto.tasks_wire import FailureKind, TaskAccepted, TaskResult, Tensor
from meshinfer.runtime.revocations import CutOff
from node.executor import TaskExecutor
from tests.test_executor_sharing import (
    KEEPING,
    MODEL,
    REF,
    WAIT_S,
    Endpoint,
    Net,
    WorkerMesh,
    b_dials_again,
    passed_to_b,
    soon,
)


class Cuts:
    """Stands in for the node's ``RevocationSync``: the test tells the executor of a cut."""

    def __init__(self) -> None:
        self.listeners: list = []

    def on_cut_off(self, callback) -> None:
        self.listeners.append(callback)

    def cut(self, cut: CutOff) -> None:
        for listener in self.listeners:
            listener(cut)


def declare(net: Net, node: str, kind: MemberEventKind) -> None:
    """Tell ``w``'s executor that membership declared ``node`` dead or left."""
    event = MemberEvent(kind, net.members.member(node), at=0.0)
    for subscriber in net.members.subscribers:
        subscriber(event)


def output(item_id: str, node: str) -> TaskResult:
    return TaskResult(item_id, 1, Tensor.from_array(sample_inputs(MODEL, 1)), node, "", "", {})


def accepted(node: Endpoint, item_id: str) -> list[TaskAccepted]:
    return [m for _, m in node.got if isinstance(m, TaskAccepted) and m.item_id == item_id]


async def heard_after(net: Net, node: str) -> None:
    """Wait until ``node`` received a message ``w`` sends it now: behind whatever ``w`` sent it
    before, over the same session."""
    heard = asyncio.Event()
    net.nodes[node].peers.on(AppData, lambda _peer, _msg: heard.set())
    await net.w.request(node, AppData(topic="after", payload=b""))
    async with asyncio.timeout(WAIT_S):
        await heard.wait()


# --- items a peer passed here, once it is gone ---------------------------------------------------


async def test_items_a_dead_peer_passed_here_are_dropped_without_a_word():
    """v passed w two items (one runs, one waits) and is gone: its session was reset, then
    membership declares it dead. v handed them back to their coordinator already: w cancels
    them (their answer would go nowhere) and runs coord's item, sending v nothing."""
    async with Net() as net:
        net.members.set("v", models=())
        executor = net.worker(KEEPING)
        await net.assign("v", "from-v")
        await net.assign("v", "queued-from-v")
        await net.assign("coord", "mine")
        await soon(lambda: executor.backlog == 3)
        (session,) = net.nodes["v"].peers.open_sessions("w")
        await session.stream.aclose()  # reset, as w sees it
        await soon(lambda: net.w.session("v") is None)
        declare(net, "v", MemberEventKind.DEAD)
        await soon(lambda: executor.backlog == 1)
        assert executor.stats.dropped == 2
        net.gate.set()
        await soon(lambda: ("TaskResult", "mine", 1, "w") in net.nodes["coord"].answers())
        await heard_after(net, "v")  # (w dials v again for it)
        assert net.nodes["v"].answers() == [] and executor.stats.completed == 1


@pytest.mark.parametrize("kind", [MemberEventKind.DEAD, MemberEventKind.LEFT])
async def test_items_a_peer_declared_dead_passed_here_are_answered_if_its_session_stays(kind):
    """Membership declares v dead (or left) while its session with w is open: v may be alive
    after all, waiting for the answers. w drops its items and tells it (PEER_LOST, retryable),
    so v relays a retryable failure instead of waiting for its offload timer."""
    async with Net() as net:
        net.members.set("v", models=())
        executor = net.worker(KEEPING)
        await net.assign("v", "running")
        await net.assign("v", "waiting")
        await soon(lambda: executor.backlog == 2)
        declare(net, "v", kind)
        v = net.nodes["v"]
        await soon(lambda: len(v.answers()) == 2)
        for item_id in ("running", "waiting"):
            failed = v.failure(item_id)
            assert (failed.code, failed.retryable) == (FailureKind.PEER_LOST, True)
        assert executor.backlog == 0 and executor.stats.dropped == 2


async def test_an_item_a_dead_peer_passed_here_but_a_coordinator_reassigned_keeps_running():
    """v passed x to w; coord then assigned x to w itself (its retry): x's answer goes to
    coord now, so v's death does not stop it."""
    async with Net() as net:
        net.members.set("v", models=())
        executor = net.worker(KEEPING)
        await net.assign("v", "x")
        await net.assign("coord", "x", attempt=2)
        await net.assign("v", "y")
        await soon(lambda: executor.backlog == 2)
        declare(net, "v", MemberEventKind.DEAD)
        await soon(lambda: executor.backlog == 1)  # y dropped
        net.gate.set()
        await soon(lambda: ("TaskResult", "x", 2, "w") in net.nodes["coord"].answers())
        assert executor.stats.dropped == 1


async def test_items_a_revoked_peer_passed_here_are_dropped_and_it_is_sent_nothing():
    """v's certificate is revoked and its session with w cut (it keeps no good one): what v
    passed w is dropped unanswered (the answer would go to the revoked certificate's holder)."""
    async with Net() as net:
        cuts = Cuts()
        mesh = WorkerMesh("w", net.w, net.w.admission, net.members, cuts)
        executor = TaskExecutor(mesh, {REF: net.batcher}, KEEPING, rng=random.Random(0))
        executor.start()
        net.executors.append(executor)
        net.members.set("v", models=())
        await net.assign("v", "from-v")
        await net.assign("v", "queued-from-v")
        await net.assign("coord", "mine")
        await soon(lambda: executor.backlog == 3)
        serial = net.fleet.identities["v"].certificate.serial
        net.fleet.revoke("v")
        net.w.admission.revocations = net.fleet.revocations
        await net.w.disconnect("v", "certificate revoked")
        cuts.cut(CutOff("v", serial, still_connected=False, carried_sends=True))
        await soon(lambda: executor.backlog == 1)
        net.gate.set()
        await soon(lambda: ("TaskResult", "mine", 1, "w") in net.nodes["coord"].answers())
        assert executor.stats.dropped == 2 and executor.stats.completed == 1
        assert sum(executor.stats.failed.values()) == 0  # nothing was answered to v


# --- what is relayed from a helper ---------------------------------------------------------------


async def test_a_helpers_accepted_notice_is_relayed_so_the_item_shows_running():
    """b, which w passed p to, says it accepted p: the coordinator hears it from w (it marks
    the item running only then; before, an item passed on stayed "dispatched" to the end)."""
    async with Net() as net:
        await passed_to_b(net)
        await net.nodes["b"].peers.request("w", TaskAccepted("p", 1, "b", 4))
        coord = net.nodes["coord"]
        await soon(lambda: accepted(coord, "p"))
        assert accepted(coord, "p") == [TaskAccepted("p", 1, "b", 4)]


async def test_a_helpers_accepted_notice_goes_to_the_latest_assignment():
    async with Net() as net:
        await passed_to_b(net)
        await net.assign("coord-2", "p", attempt=2)
        await net.assign("coord-2", "q")  # after the re-assignment: it was handled
        await soon(lambda: net.nodes["b"].assigned() == ["p", "q"])
        await net.nodes["b"].peers.request("w", TaskAccepted("p", 1, "b", 0))
        coord2 = net.nodes["coord-2"]
        await soon(lambda: accepted(coord2, "p"))
        assert accepted(coord2, "p") == [TaskAccepted("p", 2, "b", 0)]


async def test_an_answer_from_a_just_revoked_helper_is_not_relayed():
    """b's certificate is revoked (w's list says so; the cut has not run yet) when b's result
    for p arrives: it may come from the revoked certificate's holder, so w's peer table drops
    it before the executor (tests/test_revocation_fixes27.py: the cut then hands p back)."""
    async with Net() as net:
        executor = await passed_to_b(net)
        net.fleet.revoke("b")
        net.w.admission.revocations = net.fleet.revocations
        await net.nodes["b"].peers.request("w", output("p", "b"))
        await soon(lambda: net.w.stats.from_revoked["TaskResult"] == 1)
        assert net.nodes["coord"].answers() == [] and executor.stats.relayed == 0


# --- a helper that goes away without answering ---------------------------------------------------


async def test_an_item_passed_to_a_peer_that_closes_its_session_cleanly_is_handed_back_at_once():
    """b closes its only session with w (it is shutting down without a drain) while it holds
    p: nothing more comes from b, so w hands p back now, not a minute later at its offload
    timer (nor at b's death, which membership may never declare if b comes back at once)."""
    async with Net() as net:
        executor = await passed_to_b(net)
        await net.nodes["b"].peers.disconnect("w", "node shutting down")
        coord = net.nodes["coord"]
        await soon(lambda: coord.failure("p") is not None)
        failed = coord.failure("p")
        assert (failed.code, failed.retryable) == (FailureKind.PEER_LOST, True)
        assert "closed" in failed.message and executor.stats.handed_back == 1


async def test_items_are_not_sent_again_over_a_session_being_cut_for_revocation():
    """b dialled w again, then its certificate is revoked (the cut has not run yet); b's first
    session, which carried p, is lost: w does not send p again over the one left, being cut
    (the revoked certificate's holder would get the input): it hands p back."""
    async with Net() as net:
        executor = await passed_to_b(net)
        b = net.nodes["b"]
        stale = await net.endpoint("b", net.fleet.identities["b"], listen=False)
        net.nodes["b-stale"] = stale  # closed with the rest
        net.teach(stale.peers)
        await stale.peers.request("w", AppData(topic="hello", payload=b""))
        await soon(lambda: len(net.w.open_sessions("b")) == 2)
        net.fleet.revoke("b")  # (by node id: both sessions' certificate)
        net.w.admission.revocations = net.fleet.revocations
        (first,) = b.peers.open_sessions("w")
        await first.stream.aclose()  # lost, as w sees it; the stale session stays
        coord = net.nodes["coord"]
        await soon(lambda: coord.failure("p") is not None)
        assert coord.failure("p").code == FailureKind.PEER_LOST
        assert executor.stats.passed_again == 0
        with pytest.raises(TransportError, match="revoked"):  # the stale one carries nothing
            await net.w.request("b", AppData(topic="after", payload=b""))
        await net.w.disconnect("b", "certificate revoked")  # the cut; its Close comes last
        await soon(lambda: not stale.peers.roles("w"))  # stale read all it was sent
        assert stale.assigned() == []


async def test_a_lost_session_with_another_open_still_sends_items_again():
    """(Unchanged:) the one left is not revoked, so p goes again over it."""
    async with Net() as net:
        executor = await passed_to_b(net)
        first = await b_dials_again(net)
        await first.stream.aclose()
        await soon(lambda: net.nodes["b"].assigned() == ["p", "p"])
        assert executor.stats.passed_again == 1 and executor.stats.handed_back == 0
