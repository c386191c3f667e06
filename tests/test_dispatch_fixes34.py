"""Adversarial review of the coordinator's dispatch and failover path (session 34).

Real coordinator and node daemons in this process (``tests.test_coordinator_service.Mesh``);
each race is set up by calling the coordinator's handlers in the order under test, in one loop
turn where the race needs it (no sleeps).
"""

from __future__ import annotations

import asyncio
import logging
import threading

from coordinator.service import CoordinatorConfig
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.tasks_wire import FailureKind, TaskFailed
from tests.helpers import until
from tests.test_coordinator_service import DIGITS, Mesh, hold_inference, spec

TWO_MODELS = (DIGITS, ModelRef("digits-mlp-deep", "1"))


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_last_failure_and_the_nodes_death_in_one_turn_fail_the_item_once(tmp_path, caplog):
    """The node answers the item's last attempt with a retryable failure, and in the same loop
    turn (the session delivers up to 256 messages a turn; membership may declare it dead) the
    coordinator loses that node: the task fails with the node's reason, and nothing is logged
    at ERROR. (Pins an earlier review's "harmless": ``_fail_item`` starts twice, and the second
    finds the journal ignoring its failure and the task's end already written.)"""
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=5.0, max_attempts=1)
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        try:
            task_id = await c.submit(spec("twice", "single", x[:1]))
            entry = c._items["twice/0"][1]
            await until(lambda: entry.node is not None)
            node = entry.node
            failed = TaskFailed("twice/0", 1, FailureKind.INFERENCE_ERROR, "boom", True)
            c._on_failed(node, failed)
            c._redispatch_from(node, f"node {node} dead")
            c._on_failed(node, failed)
            record = await c.wait(task_id, timeout=5)
        finally:
            gate.set()
        assert record.state.value == "failed"
        assert "boom" in (record.summary.error or ""), record.summary.error
        await until(lambda: not len(c._steps))
        assert not c._items and not c._failing and task_id not in c._runs
    assert errors(caplog) == []


async def test_an_items_failure_journaled_as_its_task_is_cancelled_leaves_no_timer(tmp_path):
    """A node's final failure of a parallel task's item arrives while the task's cancel is
    being journaled: the failure's write comes after the cancel (the journal ignores it), and
    the task, forgotten by then, is not acted on again (before: its item's failure was
    recorded in the forgotten run and its aggregation's timer armed anew, kept until the
    deadline in ``_task_timers``)."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=CoordinatorConfig(item_timeout_s=30)) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        journal = c.journal
        cancelling, release = threading.Event(), threading.Event()
        original = journal.cancel

        def held_cancel(*args, **kwargs):
            cancelling.set()
            assert release.wait(10), "the test never released the cancel"
            return original(*args, **kwargs)

        journal.cancel = held_cancel
        try:
            task = spec("gone", "parallel", x[:1], models=TWO_MODELS, deadline_s=600)
            task_id = await c.submit(task)
            entry = c._items["gone/0"][1]
            await until(lambda: entry.node is not None)
            cancel = asyncio.create_task(c.cancel(task_id))
            await until(cancelling.is_set)  # the journal's thread is in the cancel
            failed = TaskFailed("gone/0", 1, FailureKind.BAD_INPUT, "bad input", False)
            c._on_failed(entry.node, failed)  # its write queued behind the cancel
            await until(lambda: "gone/0" in c._failing)
            release.set()
            assert await cancel is True
            await until(lambda: not len(c._steps))
        finally:
            release.set()
            gate.set()
        assert (await c.get(task_id)).state.value == "cancelled"
        assert task_id not in c._runs and not c._items and not c._failing
        assert task_id not in c._task_timers
