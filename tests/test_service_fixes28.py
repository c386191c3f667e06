"""Session 28 fixes in the coordinator service: a result whose journal write fails is written
again (and its dispatch is not taken as journaled meanwhile), a node whose certificate is
revoked stays out of scheduling whatever membership remembers, a parallel task that timed out
while the coordinator was down says so, ``completed_by_node`` is bounded, and each node's
document has its contact time.

Real coordinator and node daemons in this process (``tests.test_coordinator_service.Mesh``:
TCP on loopback, Noise, SQLite); a journal call or its sync is failed in place to set up a race.
"""

from __future__ import annotations

import sqlite3
from collections import Counter, OrderedDict

import numpy as np

from coordinator.runs import ItemRun
from coordinator.service import GONE_NODES, CoordinatorConfig, fold_gone_nodes
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.membership import MemberEvent, MemberEventKind
from meshinfer.proto.tasks import WorkItem
from meshinfer.proto.tasks_wire import TaskResult, Tensor
from tests.helpers import until
from tests.test_contact_aware import LEAVING, STAYING, road
from tests.test_coordinator_service import Mesh, hold_inference, restarted_as_if_accepted_ago, spec
from tests.test_revocation_cut_off import coordinator_options, revoke

#: Neither a running mark nor a timeout acts while a test runs: a result carries its dispatch.
PATIENT = CoordinatorConfig(item_timeout_s=120.0, running_mark_delay_s=60.0)
TWO_MODELS = (ModelRef("digits-mlp", "1"), ModelRef("digits-mlp-deep", "1"))


def fail_take_result(journal, times: int) -> list[str]:
    """The journal's next ``times`` ``take_result`` calls fail as a busy or full disk would
    (nothing written); returns the list of those failures."""
    take, failed = journal.take_result, []

    def flaky(*args, **kwargs):
        if len(failed) < times:
            failed.append("take_result")
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return take(*args, **kwargs)

    journal.take_result = flaky
    return failed


# --- 1. a result whose write fails -------------------------------------------------------------


async def test_a_result_whose_journal_write_failed_is_written_again(tmp_path):
    """Before, the result was dropped (the step failed with the write's error) and the item
    waited for its timeout; its dispatch also stayed marked as journaled, so no running mark
    or dispatch mark wrote it while the journal still had the item pending."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=PATIENT) as mesh:
        c = mesh.coordinator
        gate = hold_inference(mesh.daemons["node-0"])
        task_id = await c.submit(spec("flaky", "batch", x[:4], shard_size=2))
        entries = [c._items[f"flaky/{i}"][1] for i in range(2)]
        await until(lambda: all(e.node == "node-0" for e in entries))
        failed = fail_take_result(c.journal, times=3)
        gate.set()
        # between the tries the dispatch counts as not journaled (it is not)
        await until(lambda: failed and any(e.journaled == 0 for e in entries), timeout=10)
        record = await c.wait(task_id, timeout=10)
        assert len(failed) == 3
        assert record.state.value == "succeeded", record.summary.error
        assert [i.node for i in record.items] == ["node-0", "node-0"]  # (the dispatches too)
        assert c.stats_.completed_by_node == Counter({"node-0": 2})
        assert c.stats_.duplicates == 0 and task_id not in c._runs and not c._items


async def test_a_result_committed_whose_sync_failed_is_taken_from_the_journal(tmp_path):
    """The write's COMMIT went through but the sync after it failed: the caller heard of a
    failure, the journal has the result (and the task's end). Written again, it is refused as
    a duplicate: the journal's result is the item's outcome, once (before: the result was
    dropped and the task stayed live here, its waiters waiting, until its item timed out)."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=PATIENT) as mesh:
        c, journal = mesh.coordinator, mesh.coordinator.journal
        take, sync, sync_fails = journal.take_result, journal.sync, []

        def taking(*args, **kwargs):
            sync_fails.append("armed")
            return take(*args, **kwargs)

        def failing_sync():
            if sync_fails == ["armed"]:
                sync_fails.append("failed")
                raise OSError("fdatasync: I/O error (injected)")
            return sync()

        gate = hold_inference(mesh.daemons["node-0"])
        task_id = await c.submit(spec("synced", "single", x[:1]))  # durable: synced
        journal.take_result, journal.sync = taking, failing_sync
        gate.set()
        record = await c.wait(task_id, timeout=10)
        assert "failed" in sync_fails
        assert record.state.value == "succeeded", record.summary.error
        assert task_id not in c._runs and not c._items
        assert c.stats_.completed_by_node == Counter({"node-0": 1})
        assert c.stats_.duplicates == 0


async def test_a_result_whose_write_failed_counts_though_its_node_was_lost_meanwhile(tmp_path):
    """The node's result comes in, its write fails (a full disk) and the node is lost before
    the write is tried again: the result is written again and taken (the task succeeds with
    it, nothing runs again). Before, the result was dropped and the item moved to the other
    node (``test_coordinator_fixes26``, ``unwritten``, expects that)."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2, config=CoordinatorConfig(item_timeout_s=30)) as mesh:
        c = mesh.coordinator
        gates = [hold_inference(daemon) for daemon in mesh.daemons.values()]
        try:
            task_id = await c.submit(spec("lost-node", "single", x[:1]))
            entry = c._items["lost-node/0"][1]
            await until(lambda: entry.node is not None)
            first = entry.node
            failed = fail_take_result(c.journal, times=1)
            output = Tensor.from_array(np.eye(1, 10, dtype=np.float32))
            result = TaskResult("lost-node/0", 1, output, first, "numpy", "cpu", {"total_s": 0})
            c._on_result(first, result)
            c._lost(first, f"{first} did not answer a ping (test)")  # before it is handled
            record = await c.wait(task_id, timeout=10)
        finally:
            for gate in gates:
                gate.set()
        assert failed == ["take_result"] and entry.attempt == 1
        assert record.state.value == "succeeded", record.summary.error
        assert c.result_of(record)["labels"] == [0]
        assert not c._answered and not c._lost_while_answered and not c._items


# --- 2. a revoked node, forgotten by membership, stays out of scheduling -------------------------


async def test_a_revoked_node_stays_unschedulable_once_membership_forgot_it(tmp_path):
    """node-1's certificate is revoked: the coordinator cuts its session and keeps it out of
    scheduling. Membership then forgets it and (a relayed record, a stale view) has it live
    again: the scheduler still refuses it (before: it was scheduled, and every item sent there
    was refused by the handshake and retried elsewhere)."""
    x, _ = load_digits_holdout()
    mesh = Mesh(tmp_path, n=2, config=PATIENT, options=coordinator_options(tmp_path))
    async with mesh:
        c, coord = mesh.coordinator, mesh.mesh
        core = coord.membership.core
        remembered = core.member("node-1")
        revoke(mesh, "coord", node_id="node-1")
        await until(lambda: coord.peers.session("node-1") is None, timeout=15)
        assert "node-1" not in {v.node_id for v in c._views()}
        c._on_member(MemberEvent(MemberEventKind.FORGOTTEN, remembered, at=0.0))
        live = core.live_members
        core.live_members = lambda: [
            *(m for m in live() if m.node_id != "node-1"),
            remembered,
        ]  # membership has it live again
        assert "node-1" not in {v.node_id for v in c._views()}
        task = spec("kept-off", "batch", x[:8], shard_size=2, policy="round_robin")
        record = await c.wait(await c.submit(task), timeout=15)
        assert record.state.value == "succeeded", record.summary.error
        assert {i.node for i in record.items} == {"node-0"}
        assert c.stats_.refusals == 0


# --- 3. a parallel task that timed out while the coordinator was down --------------------------


async def test_a_parallel_task_timed_out_while_down_says_so(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        try:
            task = spec("agg", "parallel", x[:1], models=TWO_MODELS, aggregation="all",
                        deadline_s=60)  # fmt: skip
            await c.submit(task)
            await until(lambda: daemon.executor.running >= 1)
            c = await restarted_as_if_accepted_ago(mesh, 120)
            record = await c.wait("agg", timeout=5)
            assert record.state.value == "failed"
            error = record.summary.error
            assert "timeout" in error and "(while the coordinator was down)" in error, error
        finally:
            gate.set()


# --- 5. completed_by_node is bounded -------------------------------------------------------------


def test_fold_gone_nodes_keeps_members_and_the_most_recent_others():
    completed = Counter({"a": 5, "old-1": 1, "old-2": 2, "recent": 3, "member": 4})
    credited = OrderedDict.fromkeys(["old-1", "member", "old-2", "a", "recent"])
    fold_gone_nodes(completed, credited, known={"member"}, keep=2)
    assert completed == Counter({"member": 4, "a": 5, "recent": 3, GONE_NODES: 3})
    assert list(credited) == ["member", "a", "recent"]
    fold_gone_nodes(completed, credited, known=set(), keep=0)  # every series folded, once
    assert completed == Counter({GONE_NODES: 15}) and not credited


async def test_completed_by_node_stays_bounded_as_vehicles_come_and_go(tmp_path):
    """Results credited to 300 vehicle ids membership no longer knows leave one series each
    for the last 64, one for node-0 (a member) and the rest under ``(gone)``: the count is
    the same (before: a series per vehicle ever seen, on /metrics for ever)."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1) as mesh:
        c = mesh.coordinator
        record = await c.wait(await c.submit(spec("real", "single", x[:1])), timeout=10)
        assert record.state.value == "succeeded"
        item = WorkItem("v/0", "v", ModelRef("digits-mlp", "1"), Tensor.from_array(x[:1]))
        for i in range(300):
            msg = TaskResult("v/0", 1, Tensor.from_array(x[:1]), f"veh-{i}", "numpy", "cpu", {})
            c._count_result(ItemRun(item, 1), msg)
        completed = (await c.stats())["completed_by_node"]
        assert isinstance(completed, dict) and sum(completed.values()) == 301
        assert completed["node-0"] == 1 and completed[GONE_NODES] == 300 - 64
        assert {f"veh-{i}" for i in range(236, 300)} <= set(completed)
        assert len(completed) == 1 + 64 + 1


# --- 6. contact time in the node documents -------------------------------------------------------


async def test_node_documents_have_the_contact_time(tmp_path):
    async with road(tmp_path, LEAVING, STAYING) as mesh:
        c = mesh.coordinator

        def contact() -> dict:
            return {n["node_id"]: n["contact_s"] for n in c.nodes()}

        await until(lambda: contact()["staying"] is not None and contact()["leaving"] is not None)
        listed = contact()
        assert 39.0 < listed["staying"] <= 40.0
        assert 0.0 <= listed["leaving"] <= 0.5
        assert listed["rsu"] is None  # an infrastructure node: unknown, long enough
