"""The coordinator's fault handling: journal writes of an item's failure that fail (a busy or
full disk), results of attempts the coordinator cannot place after a restart, and aggregation
options that a task cannot use.

Real coordinator and node daemons in this process (``tests.test_coordinator_service.Mesh``) on
real SQLite and loopback TCP; each race is set up by calling the coordinator's handlers, or
failing a journal call, in the order under test (no sleeps).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest

from coordinator.api import CoordinatorApi
from coordinator.journal import Journal
from coordinator.runs import ItemRun, TaskRun
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.errors import ConfigError
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.aggregation import AggregationConfig, Aggregator
from meshinfer.proto.tasks import InvalidTaskError, Pattern, TaskSpec
from meshinfer.proto.tasks_wire import TaskResult, Tensor
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_coordinator_service import (
    DIGITS,
    Mesh,
    hold_inference,
    restarted_as_if_accepted_ago,
    spec,
)
from tests.test_retry_gaps import fail_calls

TOKEN = "faults-hunt-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def fail_until(journal: Journal, name: str, release: threading.Event) -> list[str]:
    """Make the journal's method ``name`` raise ``OSError`` until ``release`` is set; returns
    the list of those failures (appended on the journal's thread)."""
    original, failed = getattr(journal, name), []

    def flaky(*args, **kwargs):
        if not release.is_set():
            failed.append(name)
            raise OSError("database or disk is full (injected)")
        return original(*args, **kwargs)

    setattr(journal, name, flaky)
    return failed


def results_in(path) -> int:
    """How many results the journal at ``path`` has committed (read on a connection of its
    own)."""
    with sqlite3.connect(path) as db:
        count = db.execute("SELECT count(*) FROM results").fetchone()[0]
    db.close()
    return count


# --- an item's failure the journal failed to write ---------------------------------------------


async def test_an_items_failure_the_journal_failed_to_write_is_written_again(tmp_path):
    """The journal fails the write of an item's final failure once (``_fail_item``): it is
    written again, with a backoff, and the task fails with the item's reason (before: the item
    was already dropped, the step died, and the task stayed live until a restart)."""
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=5.0, max_attempts=1)
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        try:
            failed = fail_calls(c.journal, "record_failure", times=1)
            task_id = await c.submit(spec("lost-fail", "single", x[:1]))
            entry = c._items["lost-fail/0"][1]
            await until(lambda: entry.node is not None)
            c._on_timeout("lost-fail/0", 1)  # as if overdue: its one attempt is spent
            record = await c.wait(task_id, timeout=10)
            assert failed == ["record_failure"]
            assert record.state.value == "failed", record.state
            assert "gave up after 1 attempts" in record.summary.error
            assert "lost-fail" not in c._runs and not c._items
        finally:
            gate.set()


async def test_a_result_taken_while_an_items_failure_is_rewritten_completes_the_task(tmp_path):
    """While the write of an item's final failure is being tried again, the node's result of
    that attempt comes in and the journal takes it (the item was still in flight there): the
    failure, written after it, is ignored, and the task succeeds with that result, as the
    journal has it (before: the task stayed live until a restart)."""
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=5.0, max_attempts=1)
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        release = threading.Event()
        try:
            failed = fail_until(c.journal, "record_failure", release)
            task_id = await c.submit(spec("late-win", "single", x[:1]))
            entry = c._items["late-win/0"][1]
            await until(lambda: entry.node is not None)
            c._on_timeout("late-win/0", 1)
            await until(lambda: failed)  # the failure's first write failed
            gate.set()  # the node's answer comes in, and the journal takes it
            await until(lambda: daemon.executor.stats.completed == 1)
            await until(lambda: results_in(tmp_path / "journal.db") == 1)  # taken
            release.set()
            record = await c.wait(task_id, timeout=10)
            assert record.state.value == "succeeded", record.summary.error
            expected = np.argmax(await daemon.engine.infer(DIGITS, x[:1]), axis=1)
            assert c.result_of(record)["labels"] == expected.tolist()
            assert "late-win" not in c._runs and not c._items
        finally:
            release.set()
            gate.set()


# --- a retry's failure the journal failed to write ---------------------------------------------


async def test_a_retrys_failure_the_journal_failed_to_write_does_not_strand_the_retry(tmp_path):
    """The journal fails the write of attempt 1's retryable failure once (``_retry``): before,
    attempt 2 went out anyway, the journal still had attempt 1 in flight and refused attempt
    2's result as unexpected, so the item burned its attempts to item timeouts. Now attempt 2
    goes out once the failure is written (again), and its result is taken."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2) as mesh:
        c = mesh.coordinator
        gates = {name: hold_inference(daemon) for name, daemon in mesh.daemons.items()}
        try:
            failed = fail_calls(c.journal, "record_failure", times=1)
            task_id = await c.submit(spec("retry-w", "single", x[:1]))
            entry = c._items["retry-w/0"][1]
            await until(lambda: entry.node is not None)
            first = entry.node
            second = next(name for name in mesh.names if name != first)
            c._on_timeout("retry-w/0", 1)
            await until(lambda: entry.node == second and entry.attempt == 2)
            gates[second].set()  # attempt 2's answer; attempt 1 stays held
            record = await c.wait(task_id, timeout=10)
            assert failed == ["record_failure"]
            assert record.state.value == "succeeded", record.state
            assert record.items[0].node == second and record.items[0].result_attempt == 2
        finally:
            for gate in gates.values():
                gate.set()


async def test_a_retry_after_a_dispatch_mark_the_journal_lost_is_journaled(tmp_path):
    """The journal failed the (told) mark of attempt 1's dispatch, so it had the item pending
    when attempt 1 timed out: before, the retryable failure was ignored there (a pending item
    does not retry), attempt 2 went out and its result was refused as unexpected. Now the
    retry journals the dispatch with the failure, and attempt 2's result is taken."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2) as mesh:
        c = mesh.coordinator
        gates = {name: hold_inference(daemon) for name, daemon in mesh.daemons.items()}
        try:
            failed = fail_calls(c.journal, "mark_dispatched", times=1)
            task_id = await c.submit(spec("mark-lost", "single", x[:1]))
            entry = c._items["mark-lost/0"][1]
            await until(lambda: failed)  # the overdue mark of attempt 1 was told, and failed
            first = entry.node
            second = next(name for name in mesh.names if name != first)
            c._on_timeout("mark-lost/0", 1)
            await until(lambda: entry.node == second and entry.attempt == 2)
            gates[second].set()
            record = await c.wait(task_id, timeout=10)
            assert record.state.value == "succeeded", record.state
            assert record.items[0].node == second and record.items[0].result_attempt == 2
        finally:
            for gate in gates.values():
                gate.set()


# --- results of attempts the journal does not place ---------------------------------------------


async def test_after_a_restart_an_attempt_two_back_counts_only_from_its_journaled_node(tmp_path):
    """Attempt 1 went to one node and attempt 2, after a timeout, to the other; both
    dispatches are journaled when the coordinator restarts (recovery sends attempt 3). A
    result of attempt 1 from the node that ran attempt 2, which was never sent attempt 1, is
    refused (before: an attempt two back was judged by the journal alone, from any member,
    and the forged output became the task's); the honest late answer of attempt 1 counts."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2) as mesh:
        honest = await mesh.daemons["node-0"].engine.infer(DIGITS, x[:1])
        forged = np.zeros_like(honest)
        forged[0, (int(np.argmax(honest)) + 1) % forged.shape[1]] = 1.0
        gates = {name: hold_inference(daemon) for name, daemon in mesh.daemons.items()}
        try:
            c = mesh.coordinator
            task_id = await c.submit(spec("two-back", "single", x[:1]))
            entry = c._items["two-back/0"][1]
            await until(lambda: entry.journaled == 1)
            first = entry.node
            hostile = next(name for name in mesh.names if name != first)
            c._on_timeout("two-back/0", 1)
            await until(lambda: entry.node == hostile and entry.journaled == 2)
            c = await restarted_as_if_accepted_ago(mesh, 0)
            entry = c._items["two-back/0"][1]
            assert entry.attempt == 3
            assert {(1, first), (2, hostile)} <= entry.sent  # as the journal has them
            lie = TaskResult(
                "two-back/0", 1, Tensor.from_array(forged), hostile, "numpy", "cpu", {"total_s": 0}
            )
            c._on_result(hostile, lie)
            await until(lambda: "two-back/0" not in c._answered)
            assert c.stats_.foreign_results == 1
            assert "two-back" in c._runs  # the lie ended nothing
            gates[first].set()  # attempt 1's own node answers it (or attempt 3, if it has it)
            record = await c.wait(task_id, timeout=10)
        finally:
            for gate in gates.values():
                gate.set()
        assert record.state.value == "succeeded", record.summary.error
        assert c.result_of(record)["labels"] == [int(np.argmax(honest))]
        assert c.stats_.foreign_results == 1


# --- aggregation options a task cannot use ------------------------------------------------------


def test_an_aggregation_timeout_of_zero_is_refused_naming_the_field():
    """A timeout of 0 would time the aggregation out at its start (before: accepted)."""
    with pytest.raises(ConfigError, match="timeout_s"):
        AggregationConfig(timeout_s=0.0).check(2)
    with pytest.raises(ConfigError, match="timeout_s"):
        Aggregator(AggregationConfig(timeout_s=0.0), ["a", "b"], now=0.0)
    AggregationConfig(timeout_s=0.5).check(2)


@pytest.mark.parametrize("pattern", ["single", "batch"])
async def test_an_aggregation_mode_on_a_task_that_does_not_aggregate_is_refused(tmp_path, pattern):
    """``aggregation`` on a single or batch task was silently ignored (the task ran, accepted
    with a mode it never used); now the submit is refused naming the field, and the HTTP API
    answers 400 ``invalid_task`` with that message (the CLI prints it)."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1) as mesh:
        c = mesh.coordinator
        with pytest.raises(InvalidTaskError, match=f"aggregation: only a parallel .* {pattern}"):
            await c.submit(spec("bad-agg", pattern, x[:2], aggregation="first"))
        api = CoordinatorApi(c, Address("127.0.0.1", 0), TOKEN)
        body = {"model": "digits-mlp@1", "pattern": pattern, "aggregation": "majority"}
        body["inputs"] = {"values": x[:2].tolist()}
        async with api, aiohttp.ClientSession(base_url=api.url, headers=AUTH) as http:
            async with http.post("/v1/tasks", json=body) as response:
                status, doc = response.status, await response.json()
        assert status == 400, doc
        assert doc["error"]["code"] == "invalid_task"
        assert "aggregation: only a parallel task aggregates" in doc["error"]["message"]
        assert not c._runs
        assert (await c.list_tasks()).tasks == ()


# --- the backoff of a late attempt (test_failover_hunt's, with the journal a retry now waits for)


async def test_the_backoff_of_a_late_attempt_still_does_not_overflow(tmp_path):
    """The backoff of attempt 1,100 (2 ** 1099 would overflow a float) is capped: a retry
    waits for its failure to be journaled (a call it awaits), then queues the item after the
    longest backoff. (It replaces test_failover_hunt's version, whose stand-in journal writer
    took told calls only.)"""
    mesh = SimpleNamespace(peers=None, membership=None, revocation_sync=None, node_id="coord")
    c = Coordinator(mesh, tmp_path / "journal.db", CoordinatorConfig(max_attempts=5000))
    written: list[object] = []

    def call(fn, *args, **kwargs):
        written.append(fn)
        future = asyncio.get_running_loop().create_future()
        future.set_result(True)
        return future

    c._db = SimpleNamespace(tell=lambda *args, **kwargs: None, call=call)
    task = TaskSpec("t", Pattern.SINGLE, Tensor.from_array(np.zeros((1, 2), np.float32)),
                    (DIGITS,))  # fmt: skip
    run = TaskRun(task, default_aggregation="all", now=0.0)
    c._runs["t"] = run
    entry = ItemRun(run.ready()[0], attempt=1100)
    c._items[entry.item.item_id] = (run, entry)
    c._retry(run, entry, "no answer")
    assert entry.attempt == 1101 and len(written) == 1
    await until(lambda: c._ready.qsize() == 1)  # queued again, after the longest backoff
