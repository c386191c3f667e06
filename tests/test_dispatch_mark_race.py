"""A dispatch journaled after its task's end was queued: an expected race, quiet and counted.

The coordinator tells the journal of an item's dispatch without waiting (once its result is
overdue, before a running mark, or before a retry's failure) and hears of its task's end only
once that end is durable. So the end (another item's result deciding the task, an aggregation
done, a cancel) can be queued just before that dispatch: the journal rightly refuses the
dispatch of an item it has just ended. That refusal is no fault: the writer counts it
(``stale_tells``) and logs nothing above debug level, while any other refused told call stays
loud. The orderings are made here by holding the journal's writer, not by timing.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest

from coordinator.journal import Journal, TaskEnding, item_ended
from coordinator.journal_writer import JournalWriter
from coordinator.service import CoordinatorConfig
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.tasks import Pattern, TaskSpec, TaskState
from meshinfer.proto.tasks_wire import Tensor
from tests.test_coordinator_service import Mesh, hold_inference, spec

WRITER_LOG = "coordinator.journal_writer"
_INPUT = Tensor.from_array(np.arange(8, dtype=np.float32).reshape(4, 2))
_MODELS = (ModelRef("a"), ModelRef("b"), ModelRef("c"))


def loud_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the journal writer logged at WARNING or above."""
    return [r for r in caplog.records if r.name == WRITER_LOG and r.levelno >= logging.WARNING]


def three_models(task_id: str) -> TaskSpec:
    """A parallel task over three models (items ``/0``, ``/1``, ``/2``), majority vote."""
    return TaskSpec(task_id, Pattern.PARALLEL, _INPUT, _MODELS, aggregation="majority")


def end_by_cancel(task_id: str) -> tuple:
    return ("cancel", task_id), {}


def end_by_deciding_result(task_id: str) -> tuple:
    """Item ``/1``'s result, journaled with the task's end (the vote it decides)."""
    ending = TaskEnding(task_id, TaskState.SUCCEEDED, b"summary", None, False)
    return ("take_result", f"{task_id}/1", 1, b"out"), {"node": "veh-1", "ending": ending}


def end_by_finish(task_id: str) -> tuple:
    ending = TaskEnding(task_id, TaskState.FAILED, None, "gave up", False)
    return ("end_task", ending), {}


@pytest.mark.parametrize("end", [end_by_cancel, end_by_deciding_result, end_by_finish])
async def test_a_dispatch_queued_behind_its_tasks_end_is_counted_not_logged(tmp_path, caplog, end):
    journal = Journal(tmp_path / "j.db", synchronous="NORMAL")
    writer = JournalWriter(lambda: journal, stale=item_ended)
    await writer.run("submit", three_models("t"))
    writer.tell("mark_dispatched", "t/1", "veh-1", 1)
    args, kwargs = end("t")
    ended = writer.call(*args, **kwargs)  # queued first: the service has not heard of it yet
    writer.tell("mark_dispatched", "t/2", "veh-2", 1)  # the overdue mark of another item
    writer.tell("mark_running", "t/2", 1)
    await ended
    record = await writer.run("get", "t")  # answered after every call queued before it
    assert record.state in (TaskState.CANCELLED, TaskState.SUCCEEDED, TaskState.FAILED)
    assert {i.item_id: i.state for i in record.items}["t/2"] == TaskState.CANCELLED
    assert loud_records(caplog) == []
    assert writer.stale_tells == 1
    await writer.run_alone(journal.close)
    await writer.aclose()


async def test_the_writer_itself_knows_no_expected_refusal(tmp_path, caplog):
    """The rule is the journal's (``item_ended``), handed to the writer by its owner: a writer
    given none logs the same refusal as any other failed told call."""
    journal = Journal(tmp_path / "j.db", synchronous="NORMAL")
    writer = JournalWriter(lambda: journal)
    await writer.run("submit", three_models("t"))
    args, kwargs = end_by_cancel("t")
    ended = writer.call(*args, **kwargs)
    writer.tell("mark_dispatched", "t/2", "veh-2", 1)
    await ended
    await writer.run("get", "t")
    assert [r.levelno for r in loud_records(caplog)] == [logging.WARNING]
    assert writer.stale_tells == 0
    await writer.run_alone(journal.close)
    await writer.aclose()


async def test_any_other_refused_told_call_stays_loud(tmp_path, caplog):
    journal = Journal(tmp_path / "j.db", synchronous="NORMAL")
    writer = JournalWriter(lambda: journal, stale=item_ended)
    await writer.run("submit", three_models("t"))
    writer.tell("mark_dispatched", "t/0", "veh-1", 2)  # not its attempt
    writer.tell("mark_dispatched", "t/1", "veh-1", 1)
    writer.tell("mark_dispatched", "t/1", "veh-2", 1)  # a second dispatch of an item in flight
    writer.tell("mark_dispatched", "nope/0", "veh-1", 1)  # an unknown item
    await writer.run("get", "t")
    loud = loud_records(caplog)
    assert [r.levelno for r in loud] == [logging.WARNING] * 3
    assert all(r.exc_info is not None for r in loud)  # with the traceback, as before
    assert writer.stale_tells == 0
    await writer.run_alone(journal.close)
    await writer.aclose()


# --- the same race, driven through the coordinator --------------------------------------------


def hold_task_ends(journal: Journal) -> tuple[threading.Event, threading.Event]:
    """Make ``journal.end_task`` wait, on the writer's thread, until the second event is set;
    the first is set once it is waiting (the end is queued and the writer is held there)."""
    waiting, release = threading.Event(), threading.Event()
    original = journal.end_task

    def held(ending: TaskEnding):
        waiting.set()
        assert release.wait(10), "the test never released the task's end"
        return original(ending)

    journal.end_task = held
    return waiting, release


#: The coordinator's callbacks that journal an item's dispatch, as their timers call them.
TRIGGERS = {
    "overdue-mark": lambda c, item_id: c._dispatch_overdue(item_id, 1),
    "running-mark": lambda c, item_id: c._mark_running(item_id, 1),
    "retry-on-timeout": lambda c, item_id: c._on_timeout(item_id, 1),
}


@pytest.mark.parametrize("trigger", sorted(TRIGGERS))
async def test_a_dispatch_mark_after_another_items_result_ended_the_task(tmp_path, caplog, trigger):
    x, _ = load_digits_holdout()
    models = (ModelRef("digits-mlp", "1"), ModelRef("digits-mlp-deep", "1"))
    # no mark or timeout fires by itself here: the test fires the one it names
    config = CoordinatorConfig(item_timeout_s=120.0, running_mark_delay_s=60.0)
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon, only="digits-mlp-deep")  # item race/1 runs on
        waiting, release = hold_task_ends(c.journal)
        try:
            await c.submit(spec("race", "parallel", x[:2], models=models, aggregation="first"))
            # race/0's result decided the task: its end is queued, the writer held on it
            assert await asyncio.to_thread(waiting.wait, 10)
            assert "race/1" in c._items  # the coordinator has not heard of the end yet
            TRIGGERS[trigger](c, "race/1")
            assert c._items["race/1"][1].journaled == 1  # the dispatch mark is queued
        finally:
            release.set()
        record = await c.wait("race", timeout=10)
        await c._db.run("get", "race")  # every call queued before it is settled
        gate.set()
    assert record.state.value == "succeeded"
    assert {i.item_id: i.state.value for i in record.items}["race/1"] == "cancelled"
    assert loud_records(caplog) == []
    assert c._db.stale_tells == 1
    assert (await c.stats())["stale_tells"] == 1
