"""Coordinator task lifecycle faults (session 36): a cancel whose caller is cancelled while the
journal writes it still calls the items back and forgets the task; a wait() pending when the
coordinator closes is answered (it hung for ever); a task end the journal refuses (not a cause
that may pass) fails the task saying why, instead of leaving it live with nothing to end it.

Real coordinator and node daemons in this process (``tests.test_coordinator_service.Mesh``) on
real SQLite and loopback TCP; a journal call is held or refused on the journal's thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from coordinator.service import CoordinatorConfig
from meshinfer.errors import LocalProtocolError
from meshinfer.inference.registry import ModelRef, load_digits_holdout
from meshinfer.proto.tasks import TaskState
from tests.helpers import until
from tests.test_coordinator_service import DIGITS, Mesh, hold_inference, spec

TOO_BIG = "string or blob too big (injected)"


def refuse_success(journal, name: str) -> list[str]:
    """Make the journal's ``name`` (``end_task`` or ``take_result``) raise SQLite's DataError,
    as for a blob over SQLite's length limit, whenever it would end a task as succeeded;
    returns the list of those refusals (appended on the journal's thread)."""
    original, refused = getattr(journal, name), []

    def refusing(*args, **kwargs):
        ending = args[0] if name == "end_task" else kwargs.get("ending")
        if ending is not None and ending.state == TaskState.SUCCEEDED:
            refused.append(name)
            raise sqlite3.DataError(TOO_BIG)
        return original(*args, **kwargs)

    setattr(journal, name, refusing)
    return refused


async def test_a_cancel_whose_caller_is_cancelled_still_calls_the_items_back(tmp_path):
    """The caller of cancel() is cancelled while the journal writes the cancel, which commits.
    Before, the task stayed live here (its item running on its node, waiters waiting) against
    a journal that has it cancelled; now the node is told and the task is forgotten."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=CoordinatorConfig(item_timeout_s=30)) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        entered, release = threading.Event(), threading.Event()
        try:
            task_id = await c.submit(spec("cx", "single", x[:1]))
            entry = c._items["cx/0"][1]
            await until(lambda: entry.node is not None and daemon.executor.stats.accepted)
            original = c.journal.cancel

            def held(task: str):
                entered.set()
                assert release.wait(10), "the test never released the journal"
                return original(task)

            c.journal.cancel = held
            caller = asyncio.create_task(c.cancel(task_id))
            await until(entered.is_set)
            caller.cancel()
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await caller
            await until(lambda: task_id not in c._runs, timeout=5)
            assert "cx/0" not in c._items
            await until(lambda: daemon.executor.stats.cancelled == 1, timeout=5)
            record = await c.wait(task_id, timeout=5)
            assert record.state == TaskState.CANCELLED
        finally:
            release.set()
            gate.set()


async def test_a_wait_pending_when_the_coordinator_closes_is_answered(tmp_path):
    """wait() with no timeout on a task still running when the coordinator closes: before,
    its future was never answered and the call hung for ever; now it raises, saying so (the
    task stays in flight in the journal, for the next start's recovery). A wait() after the
    close raises too, rather than waiting on a future nothing answers."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=CoordinatorConfig(item_timeout_s=30)) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        try:
            task_id = await c.submit(spec("waited", "single", x[:1]))
            waiter = asyncio.create_task(c.wait(task_id))
            await until(lambda: task_id in c._waiters)
            await c.aclose()
            done, _ = await asyncio.wait({waiter}, timeout=5)
            assert waiter in done, "wait() still hangs after the close"
            with pytest.raises(LocalProtocolError, match="closed before task 'waited' ended"):
                waiter.result()
            with pytest.raises(LocalProtocolError, match="closed before task 'waited' ended"):
                await asyncio.wait_for(c.wait(task_id), timeout=5)
        finally:
            gate.set()


async def test_an_aggregations_end_the_journal_refuses_fails_the_task_saying_why(tmp_path):
    """An "all" aggregation whose end (its outputs as the result summary) SQLite refuses (too
    big: not a cause that may pass). Before, the step died (an ERROR line) and the task stayed
    live with nothing left to end it (its waiters waited until their timeout); now it fails,
    its error naming the refusal."""
    x, _ = load_digits_holdout()
    models = (DIGITS, ModelRef("synthetic-mlp", "w64-d2"))
    extra = '[inference]\nmodels = ["digits-mlp@1", "synthetic-mlp@w64-d2"]\n'
    async with Mesh(tmp_path, n=1, extra=extra) as mesh:
        c = mesh.coordinator
        refused = refuse_success(c.journal, "end_task")
        task = spec("agg-big", "parallel", x[:4], models=models, aggregation="all")
        task_id = await c.submit(task)
        record = await c.wait(task_id, timeout=10)
        assert refused == ["end_task"]
        assert record.state == TaskState.FAILED, record.state
        error = record.summary.error or ""
        assert f"its result could not be journaled (DataError: {TOO_BIG})" in error, error
        assert task_id not in c._runs


async def test_a_result_whose_task_end_is_refused_is_taken_and_the_task_fails(tmp_path):
    """A single task's result decides it: it is journaled with the task's end, in one call,
    which SQLite refuses (its summary too big). Before, the result was not taken (the step
    died: an ERROR line), the item ran again on its timeout, to the same end, and the task
    stayed live until then; now the result is taken alone and the task fails, saying why."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=CoordinatorConfig(item_timeout_s=30)) as mesh:
        c = mesh.coordinator
        refused = refuse_success(c.journal, "take_result")
        refuse_success(c.journal, "end_task")
        task_id = await c.submit(spec("single-big", "single", x[:2]))
        record = await c.wait(task_id, timeout=10)
        assert refused == ["take_result"]
        assert record.state == TaskState.FAILED, record.state
        assert f"could not be journaled (DataError: {TOO_BIG})" in (record.summary.error or "")
        assert record.items[0].result is not None  # the result was taken
        assert c.stats_.dispatched == 1 and c.stats_.retries == 0
