"""Coordinator and journal faults (session 26): a journal write lost with its group for another
call's fault is written again; recovery reads earlier attempts' nodes from the dispatch lines'
columns (schema version 4), not their text; a node lost while an answer about its item is
being handled still moves the item at once; items of a task whose end is decided are not
sent; a task journaled before the aggregation check can still be resubmitted.

Real coordinator and node daemons in this process (``tests.test_coordinator_service.Mesh``) on
real SQLite and loopback TCP; each race is set up by calling the coordinator's handlers, or
holding or failing a journal call, in the order under test (no sleeps).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest

from coordinator.api import CoordinatorApi, body_to_spec
from coordinator.journal import Journal, JournalError, UnknownTaskError
from coordinator.journal_schema import MIGRATIONS, schema_version
from coordinator.runs import TaskRun
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.tasks import InvalidTaskError, TaskState
from meshinfer.proto.tasks_wire import TaskResult, Tensor
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_coordinator_faults_hunt import fail_until
from tests.test_coordinator_service import Mesh, hold_inference, restarted_as_if_accepted_ago, spec

TOKEN = "fixes26-token-0123456789abcdef0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def losing_the_transaction(journal: Journal) -> tuple[sqlite3.Error, list[str]]:
    """A call that fails as SQLite does on a full disk or an I/O error: the whole transaction
    of its group is rolled back under it. Returns the error it raises and the list of its
    runs (appended on the journal's thread); the call is ``journal.lose``."""
    error, runs = sqlite3.OperationalError("database or disk is full (injected)"), []

    def lose() -> None:
        runs.append("lost")
        journal._db.execute("ROLLBACK")
        raise error

    journal.lose = lose
    return error, runs


def dispatch_columns(path) -> list[tuple[int | None, str | None]]:
    """The (attempt, node) columns of the journal's dispatch lines, oldest first (read on a
    connection of its own)."""
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT attempt, node FROM events WHERE kind = 'dispatched' ORDER BY seq"
        ).fetchall()
    db.close()
    return rows


# --- 1. a write lost with its group for another call's fault -----------------------------------


def test_a_group_rolled_back_under_its_calls_fails_them_as_transient(tmp_path):
    """A call during which SQLite rolled the group's transaction back (a full disk) fails
    every call of the group with a TransientJournalError (a JournalError), the cause chained;
    nothing of the group is journaled. A refusal (an unknown item) is not transient."""
    from coordinator.journal import TransientJournalError  # (new: the old code lacks it)

    x, _ = load_digits_holdout()
    with Journal(tmp_path / "j.db") as journal:
        journal.submit(spec("t", "single", x[:1]))
        error, runs = losing_the_transaction(journal)
        dispatch = partial(journal.mark_dispatched, "t/0", "node-0", 1)
        with pytest.raises(TransientJournalError) as caught:
            journal.commit_group([dispatch, journal.lose])
        assert isinstance(caught.value, JournalError) and caught.value.__cause__ is error
        assert runs == ["lost"]
        assert journal.get("t").items[0].state == TaskState.PENDING  # the dispatch is gone
        (refused,) = journal.commit_group([partial(journal.mark_dispatched, "no/0", "n", 1)])
        assert isinstance(refused.error, UnknownTaskError)
        assert not isinstance(refused.error, TransientJournalError)
        journal.commit_group([dispatch])  # made again, it passes
        assert journal.get("t").items[0].state == TaskState.DISPATCHED


async def test_a_task_end_lost_with_its_group_for_another_calls_fault_is_written_again(tmp_path):
    """The task's end (its deadline) shares a group with a call that loses the group's
    transaction: the end fails with the JournalError of a lost group. Before, that was not
    retried and the task stayed live until a restart; now it is written again and the task
    fails with its deadline's reason."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=CoordinatorConfig(item_timeout_s=30)) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        held, release = threading.Event(), threading.Event()
        try:
            task_id = await c.submit(spec("lost-end", "single", x[:1], deadline_s=60))
            run, entry = c._items["lost-end/0"]
            await until(lambda: entry.journaled == 1)  # its overdue dispatch mark, told
            _, lost = losing_the_transaction(c.journal)
            queued: list[object] = []
            run_call = c._db.run

            async def noted(fn, *args, **kwargs):
                queued.append(fn)  # (the original queues it before it first yields)
                return await run_call(fn, *args, **kwargs)

            c._db.run = noted

            def hold() -> None:  # the writer's thread waits: what is queued meanwhile is one group
                held.set()
                assert release.wait(10), "the test never released the writer"

            c._db.tell(hold)
            await until(held.is_set)
            c._on_deadline(run)  # as if its deadline passed: the end is decided, to be written
            await until(lambda: "end_task" in queued)
            c._db.tell("lose")  # in the end's group
            release.set()
            record = await c.wait(task_id, timeout=5)
            assert lost == ["lost"]
            assert record.state.value == "failed", record.state
            assert "deadline of 60 s passed" in record.summary.error
            assert queued.count("end_task") == 2  # lost with its group, then written again
            assert "lost-end" not in c._runs and not c._items
        finally:
            release.set()
            gate.set()


async def test_a_refused_write_is_raised_at_once_and_a_lost_one_is_written_again(tmp_path):
    """``_until_durable``: a refusal (an unknown task) would be refused again, so it is raised
    after one try; a write lost with its group is tried again until it passes."""
    from coordinator.journal import TransientJournalError

    x, _ = load_digits_holdout()
    mesh = SimpleNamespace(peers=None, membership=None, revocation_sync=None, node_id="coord")
    c = Coordinator(mesh, tmp_path / "journal.db", CoordinatorConfig())
    run = TaskRun(spec("t", "single", x[:1]), default_aggregation="all", now=0.0)
    c._runs["t"] = run
    tries: list[str] = []

    async def refused() -> None:
        tries.append("refused")
        raise UnknownTaskError("no task 't'")

    with pytest.raises(UnknownTaskError):
        await c._until_durable(run, "test write", refused)
    assert tries == ["refused"]

    async def lost_twice() -> str:
        tries.append("lost")
        if tries.count("lost") <= 2:
            raise TransientJournalError("the group's transaction was lost")
        return "written"

    assert await c._until_durable(run, "test write", lost_twice) == "written"
    assert tries.count("lost") == 3


# --- 2. earlier attempts' nodes as columns, not text -------------------------------------------


async def test_recovery_reads_earlier_attempts_nodes_from_the_dispatch_lines_columns(tmp_path):
    """Attempts 1 and 2 of an item went to two nodes, both dispatches journaled, when the
    coordinator restarts. The audit lines' text is for people (here worded otherwise, as a
    later release may): recovery reads the nodes from the lines' attempt and node columns, so
    the result of attempt 1 still counts from its node (before: parsed from the text)."""
    x, _ = load_digits_holdout()
    path = tmp_path / "journal.db"
    async with Mesh(tmp_path, n=2) as mesh:
        gates = {name: hold_inference(daemon) for name, daemon in mesh.daemons.items()}
        try:
            c = mesh.coordinator
            task_id = await c.submit(spec("cols", "single", x[:1]))
            entry = c._items["cols/0"][1]
            await until(lambda: entry.journaled == 1)
            first = entry.node
            c._on_timeout("cols/0", 1)
            await until(lambda: entry.journaled == 2)  # (the other node, unless it is suspect)
            second = entry.node
            await c.aclose()
            with sqlite3.connect(path) as db:
                db.execute("UPDATE events SET detail = 'sent, in other words' WHERE kind = ?",
                           ("dispatched",))  # fmt: skip
            db.close()
            c = await restarted_as_if_accepted_ago(mesh, 0)
            entry = c._items["cols/0"][1]
            assert entry.attempt == 3
            assert {(1, first), (2, second)} <= entry.sent
            assert dispatch_columns(path)[:2] == [(1, first), (2, second)]
            for gate in gates.values():
                gate.set()
            record = await c.wait(task_id, timeout=10)
        finally:
            for gate in gates.values():
                gate.set()
        assert record.state.value == "succeeded", record.summary.error
        assert c.stats_.foreign_results == 0


def as_version_3(path) -> None:
    """Make the journal at ``path`` what the previous release wrote: schema version 3, whose
    dispatch lines say their attempt and node in their text only."""
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE events DROP COLUMN node")
        db.execute("ALTER TABLE events DROP COLUMN attempt")
        db.execute("DELETE FROM schema_version WHERE version > 3")
        assert schema_version(db) == 3
    db.close()


def test_a_version_3_journal_gains_the_dispatch_columns_and_its_old_lines_still_count(tmp_path):
    """A journal of the previous schema opens (migrated to version 4); its dispatch lines,
    text only, are read from their text, and the lines written from then on from their
    columns."""
    x, _ = load_digits_holdout()
    path = tmp_path / "j.db"
    with Journal(path) as journal:
        journal.submit(spec("t", "single", x[:1]))
        journal.mark_dispatched("t/0", "veh-1", 1)
        journal.record_failure("t/0", 1, "no answer", retryable=True)
        journal.mark_dispatched("t/0", "veh 2", 2)  # a node id with a space
    as_version_3(path)
    with Journal(path) as journal:
        assert journal.dispatches("t") == {"t/0": {(1, "veh-1"), (2, "veh 2")}}
        (recovered,) = journal.recover()
        assert recovered.to_dispatch[0].attempt == 3
        journal.mark_dispatched("t/0", "veh-3", 3)
        assert journal.dispatches("t") == {"t/0": {(1, "veh-1"), (2, "veh 2"), (3, "veh-3")}}
        assert journal.dispatches("unknown") == {}
    with sqlite3.connect(path) as db:
        assert schema_version(db) == len(MIGRATIONS) == 4
    db.close()
    assert dispatch_columns(path) == [(None, None), (None, None), (3, "veh-3")]


async def test_a_coordinator_restarted_on_a_version_3_journal_reads_its_dispatch_text(tmp_path):
    """As above through a restart: attempts 1 and 2 journaled by the previous schema (text
    only); the restarted coordinator migrates the file and still knows their nodes."""
    x, _ = load_digits_holdout()
    path = tmp_path / "journal.db"
    async with Mesh(tmp_path, n=2) as mesh:
        gates = {name: hold_inference(daemon) for name, daemon in mesh.daemons.items()}
        try:
            c = mesh.coordinator
            task_id = await c.submit(spec("old", "single", x[:1]))
            entry = c._items["old/0"][1]
            await until(lambda: entry.journaled == 1)
            first = entry.node
            c._on_timeout("old/0", 1)
            await until(lambda: entry.journaled == 2)
            second = entry.node
            await c.aclose()
            as_version_3(path)
            c = await restarted_as_if_accepted_ago(mesh, 0)
            entry = c._items["old/0"][1]
            assert entry.attempt == 3 and {(1, first), (2, second)} <= entry.sent
            await until(lambda: len(dispatch_columns(path)) == 3)  # attempt 3, overdue
            assert dispatch_columns(path) == [(None, None), (None, None), (3, entry.node)]
            for gate in gates.values():
                gate.set()
            record = await c.wait(task_id, timeout=10)
        finally:
            for gate in gates.values():
                gate.set()
        assert record.state.value == "succeeded", record.summary.error


# --- 3. a node lost while an answer about its item is being handled -----------------------------


async def test_a_node_lost_while_an_answer_about_its_item_is_handled_moves_it_at_once(tmp_path):
    """An answer about the item comes in and the item's node is lost (no answer to a ping)
    before it is handled; the answer then ends nothing: a result from a node the attempt never
    went to (refused). Before, the loss skipped the item (its answer was being handled) and it
    waited on the lost node for its full timeout; now it goes to the other node at once. (The
    node's own result whose journal write failed is written again since session 28 and ends
    the item: tests/test_service_fixes28.py.)"""
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=30)
    async with Mesh(tmp_path, n=2, config=config) as mesh:
        c = mesh.coordinator
        gates = {name: hold_inference(daemon) for name, daemon in mesh.daemons.items()}
        try:
            task_id = await c.submit(spec("lost-node", "single", x[:1]))
            entry = c._items["lost-node/0"][1]
            await until(lambda: entry.node is not None)
            first = entry.node
            second = next(name for name in mesh.names if name != first)
            output = Tensor.from_array(np.eye(1, 10, dtype=np.float32))
            result = TaskResult("lost-node/0", 1, output, second, "numpy", "cpu", {"total_s": 0})
            c._on_result(second, result)
            c._lost(first, f"{first} did not answer a ping (test)")  # before it is handled
            # (to the other node, unless membership holds it suspect: then to the same one)
            await until(lambda: entry.attempt == 2 and entry.node is not None, timeout=5)
            assert not c._answered and not c._lost_while_answered
            assert c.stats_.foreign_results == 1
            for gate in gates.values():
                gate.set()
            record = await c.wait(task_id, timeout=10)
        finally:
            for gate in gates.values():
                gate.set()
        assert record.state.value == "succeeded", record.summary.error


async def test_a_result_taken_while_its_node_is_lost_sends_the_item_nowhere_else(tmp_path):
    """The other side of the race above: the node's result is taken, so the loss that came
    while it was being journaled moves nothing (the task succeeds with it)."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2, config=CoordinatorConfig(item_timeout_s=30)) as mesh:
        c = mesh.coordinator
        gates = {name: hold_inference(daemon) for name, daemon in mesh.daemons.items()}
        try:
            task_id = await c.submit(spec("taken", "single", x[:1]))
            entry = c._items["taken/0"][1]
            await until(lambda: entry.node is not None)
            first = entry.node
            output = Tensor.from_array(np.eye(1, 10, dtype=np.float32))
            c._on_result(first, TaskResult("taken/0", 1, output, first, "numpy", "cpu", {}))
            c._lost(first, f"{first} did not answer a ping (test)")
            record = await c.wait(task_id, timeout=10)
            assert record.state.value == "succeeded", record.summary.error
            assert record.items[0].node == first and record.items[0].result_attempt == 1
            assert c.stats_.dispatched == 1
        finally:
            for gate in gates.values():
                gate.set()


# --- 4. items of a task whose end is decided ----------------------------------------------------


async def test_items_of_a_task_whose_end_is_being_written_are_not_sent(tmp_path):
    """A batch task's deadline passed (its end is decided) while the journal fails to write
    that end (a full disk, written again until it passes); meanwhile its first item's result
    frees the only slot. Before, its parked second item went out then (wasted work, called
    back once the end was written); now it stays unsent."""
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=30, max_in_flight_per_node=1)
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        release = threading.Event()
        try:
            task = spec("decided", "batch", x[:2], shard_size=1, deadline_s=60)
            task_id = await c.submit(task)
            run, first = c._items["decided/0"]
            await until(lambda: first.node is not None and c._parked)
            failed = fail_until(c.journal, "end_task", release)
            c._on_deadline(run)
            await until(lambda: failed)
            gate.set()  # the first item's result comes in, and frees the node's one slot
            await until(lambda: "decided/0" not in c._items)
            await until(lambda: not c._parked and c._ready.empty())
            assert c.stats_.dispatched == 1
            assert c._items["decided/1"][1].node is None  # not sent
            release.set()
            record = await c.wait(task_id, timeout=10)
            assert record.state.value == "failed"
            assert "deadline of 60 s passed with 0 of 2 items done" in record.summary.error
            assert daemon.executor.stats.completed == 1
        finally:
            release.set()
            gate.set()


# --- 5. a resubmit of a task journaled before the aggregation check ----------------------------


async def test_a_task_journaled_before_the_aggregation_check_can_be_resubmitted(tmp_path):
    """A single task naming an ``aggregation``, journaled before such tasks were refused: an
    identical resubmit (a client's retry) gets the task, as any idempotent retry does, from
    the coordinator and over HTTP (200, not 400); a new task, or another spec under that id,
    is still refused."""
    x, _ = load_digits_holdout()
    body = {"task_id": "old-agg", "model": "digits-mlp@1", "pattern": "single",
            "aggregation": "majority", "inputs": {"values": x[:1].tolist()}}  # fmt: skip
    old = body_to_spec(body, lambda: "unused")
    with Journal(tmp_path / "journal.db") as journal:  # by a coordinator before the check
        journal.submit(old)
    async with Mesh(tmp_path, n=1) as mesh:
        c = mesh.coordinator
        assert await c.submit(old) == "old-agg"
        record = await c.wait("old-agg", timeout=10)
        assert record.state.value == "succeeded", record.summary.error
        api = CoordinatorApi(c, Address("127.0.0.1", 0), TOKEN)
        async with api, aiohttp.ClientSession(base_url=api.url, headers=AUTH) as http:
            async with http.post("/v1/tasks", json=body) as response:
                status, doc = response.status, await response.json()
            assert status == 200, doc
            assert doc["task_id"] == "old-agg" and doc["state"] == "succeeded"
            async with http.post("/v1/tasks", json={**body, "task_id": "new-agg"}) as response:
                status, doc = response.status, await response.json()
            assert status == 400 and doc["error"]["code"] == "invalid_task", doc
        with pytest.raises(InvalidTaskError, match="aggregation: only a parallel"):
            await c.submit(replace(old, priority=3))  # another spec under the known id
        with pytest.raises(InvalidTaskError, match="aggregation: only a parallel"):
            await c.submit(replace(old, task_id="new-agg"))
        assert [t.task_id for t in (await c.list_tasks()).tasks] == ["old-agg"]
        assert not c._runs


def test_the_journal_holds_only_the_very_same_spec(tmp_path):
    x, _ = load_digits_holdout()
    task = spec("t", "single", x[:1])
    with Journal(tmp_path / "j.db") as journal:
        assert not journal.holds(task)
        journal.submit(task)
        assert journal.holds(task)
        assert not journal.holds(replace(task, priority=1))
        assert not journal.holds(replace(task, task_id="u"))
