"""Faults found hunting in the node's task executor, work sharing and revocation sync: each test
reproduces one with real peer tables and Noise sessions over the in-memory transport (the
:class:`~tests.test_executor_sharing.Net` of the work-sharing tests), a real NumPy engine and
batcher held by a gate, and a stand-in membership table."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from meshinfer.identity_files import load_revocations, replace_file
from meshinfer.proto.membership_wire import ModelInfo
from meshinfer.proto.tasks_wire import FailureKind, TaskAssign, TaskCancel
from meshinfer.runtime.node import MeshNode
from meshinfer.testing.fleet import make_fleet
from node.config import ExecutorSection
from tests.helpers import until
from tests.test_executor_sharing import KEEPING, REF, WAIT_S, Net, confirm_result_late, item, soon
from tests.test_mesh_node import options
from tests.test_revocation_sync import QUICK

# --- cancelled or handed back before its task first ran ------------------------------------------


async def test_an_item_cancelled_in_the_message_burst_that_assigned_it_is_answered():
    """coord assigns x and cancels it at once: both arrive in one read, and w handles the
    cancel before x's task first ran. The coordinator still hears CANCELLED."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        coord = net.nodes["coord"].peers
        await net.connect("coord", "w")
        coord.send("w", item("x"))
        await coord.request("w", TaskCancel("x", "no longer wanted"))
        await soon(lambda: executor.stats.cancelled == 1)
        await soon(lambda: net.nodes["coord"].failure("x") is not None)
        assert net.nodes["coord"].failure("x").code == FailureKind.CANCELLED
        assert executor.backlog == 0


async def test_an_item_that_arrives_as_the_drain_starts_is_handed_back():
    """SIGTERM's drain starts in the loop iteration in which x arrives (its first step comes
    before x's task first ran): x is handed back, not dropped without a word."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        drains: list[asyncio.Task[None]] = []

        def drain_then_assign(peer, msg):  # the drain's first step is queued ahead of x's
            drains.append(asyncio.ensure_future(executor.drain(timeout=WAIT_S)))
            executor._on_assign(peer, msg)

        net.w.on(TaskAssign, drain_then_assign)
        await net.assign("coord", "x")
        await soon(lambda: drains and drains[0].done())
        await soon(lambda: net.nodes["coord"].failure("x") is not None)
        failed = net.nodes["coord"].failure("x")
        assert (failed.code, failed.retryable) == (FailureKind.SHUTTING_DOWN, True)


# --- waiting for a slot --------------------------------------------------------------------------


async def test_an_item_whose_deadline_passes_while_it_waits_for_a_slot_is_answered_then():
    """w runs one item at a time; "busy" holds the slot (the gate is shut). "short" (0.2 s
    deadline) waits behind it: once its deadline passes it is answered DEADLINE_EXCEEDED,
    not only when the slot frees, which may be long after the coordinator gave up on it."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        await net.assign("coord", "busy")
        await soon(lambda: executor.running == 1)
        await net.nodes["coord"].peers.request("w", replace(item("short"), deadline_s=0.2))
        await soon(lambda: net.nodes["coord"].failure("short") is not None)
        assert net.nodes["coord"].failure("short").code == FailureKind.DEADLINE_EXCEEDED
        assert executor.running == 1 and executor.backlog == 1  # busy, still held
        net.gate.set()  # the slot is not lost to the item that gave up waiting for it
        await net.assign("coord", "after")
        await soon(lambda: ("TaskResult", "after", 1, "w") in net.nodes["coord"].answers())
        await soon(lambda: executor.backlog == 0)
        assert executor.running == 0


async def test_items_waiting_for_a_slot_run_highest_priority_first():
    """w runs one item at a time; behind "busy" wait two items of priority 0, then one of
    priority 3: once the slot frees, the priority-3 item runs first (the module docstring's
    "the rest wait in order of priority"; the coordinator's "larger runs first")."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        coord = net.nodes["coord"]
        await net.assign("coord", "busy")
        await soon(lambda: executor.running == 1)
        for item_id, priority in (("low-0", 0), ("low-1", 0), ("high", 3)):
            await coord.peers.request("w", replace(item(item_id), priority=priority))
        await soon(lambda: executor.backlog == 4)
        net.gate.set()
        await soon(lambda: len(coord.answers()) == 4)
        assert [a[1] for a in coord.answers()] == ["busy", "high", "low-0", "low-1"]


# --- work sharing --------------------------------------------------------------------------------


async def test_an_item_is_passed_only_to_a_peer_that_gossips_its_model_version():
    """b is idle but gossips version 2 of the model; c gossips version 1 (the item's) and is
    busier: the item goes to c."""
    async with Net() as net:
        net.members.set("b", models=(ModelInfo(REF.model_id, "2"),))
        net.members.set("c", depth=2)
        executor = await net.loaded_worker("b", "c")
        await net.assign("coord", "v1")
        await soon(lambda: net.nodes["c"].assigned() == ["v1"])
        assert net.nodes["b"].assigned() == [] and executor.stats.offloaded == 1


# --- whom a held item answers --------------------------------------------------------------------


async def test_an_item_re_assigned_while_its_result_is_written_answers_the_re_assignment():
    """x's result is queued for coord (its write not yet confirmed) when coord-2 re-assigns x
    (attempt 2: the coordinator's retry from elsewhere). The result kept for replay answers
    coord only (the asker is part of its key), and x is still held: coord-2 must hear x's
    result too, not nothing until its attempt times out. The same without a replay budget."""
    for config in (KEEPING, replace(KEEPING, result_replay_mib=0)):
        await re_assigned_while_written(config)


async def re_assigned_while_written(config: ExecutorSection) -> None:
    async with Net() as net:
        executor = net.worker(config)
        queued, written = confirm_result_late(net, "x")
        await net.assign("coord", "x")
        net.gate.set()
        await soon(queued.is_set)
        await net.assign("coord-2", "x", attempt=2)
        await net.assign("coord-2", "y")  # after the re-assignment: it was handled
        await soon(lambda: executor.stats.accepted == 2)
        written.set()
        await soon(lambda: ("TaskResult", "x", 2, "w") in net.nodes["coord-2"].answers())
        assert ("TaskResult", "x", 1, "w") in net.nodes["coord"].answers()


# --- draining ------------------------------------------------------------------------------------


async def test_an_item_still_running_when_the_drain_times_out_is_handed_back():
    """x runs (held by the gate) past the drain's timeout. The node closes its peer table
    right after the drain (dropping what is still queued), so x's hand-back must be written
    by then: else coord hears nothing of x until the node's LEAVE, or x's attempt timeout."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        await net.assign("coord", "x")
        await soon(lambda: executor.running == 1)
        await executor.drain(timeout=0.05)
        await net.w.aclose()
        await executor.aclose()
        coord = net.nodes["coord"]
        await soon(lambda: coord.failure("x") is not None)
        failed = coord.failure("x")
        assert (failed.code, failed.retryable) == (FailureKind.SHUTTING_DOWN, True)


# --- the revocation list file --------------------------------------------------------------------


async def test_an_older_list_copied_over_the_file_is_written_over_with_the_list_in_force(tmp_path):
    """The node holds entries 1 and 2 (and its file too); the operator then copies an older
    fleet list (entry 1 only) into the identity directory. The node keeps both in force, and
    its file must say so again: a restart reads the file, and would admit the peer that
    entry 2 revokes until gossip taught it again."""
    fleet = make_fleet(None, ("car-a", "car-b", "car-c"))
    store = tmp_path / "revocations.bin"
    node = MeshNode(
        fleet.identities["car-a"], fleet.revocations,
        options(mdns=None, revocations_file=store, revocations=QUICK),
    )  # fmt: skip
    async with node:
        fleet.revoke("car-b")
        older = fleet.revocations
        fleet.revoke("car-c")
        replace_file(store, fleet.revocations.to_bytes())
        await until(lambda: node.admission.revocations.version == 2, timeout=WAIT_S)
        replace_file(store, older.to_bytes())  # the operator's mistake
        checks = node.revocation_sync.stats.checks
        await until(lambda: node.revocation_sync.stats.checks > checks + 1, timeout=WAIT_S)
        assert node.admission.revocations.version == 2
        await until(lambda: load_revocations(store, fleet.authority.trust).version == 2, WAIT_S)
