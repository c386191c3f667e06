"""Task semantics in the coordinator: how items' outputs combine into a task's outcome, and
that a task whose outputs cannot be combined fails with a reason instead of hanging, crashing
the coordinator's recovery, or answering something silently wrong.

Pure :class:`~coordinator.runs.TaskRun` checks first, then the same faults through a real
coordinator and node daemons (``tests.test_coordinator_service.Mesh``).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from coordinator.runs import ItemRun, TaskRun
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.tasks import Pattern, Stage, TaskSpec, WorkItem
from meshinfer.proto.tasks_wire import Tensor
from tests.helpers import until
from tests.test_coordinator_service import (
    DIGITS,
    Mesh,
    hold_inference,
    restarted_as_if_accepted_ago,
    spec,
)

M1, M2, M3 = ModelRef("m1", "1"), ModelRef("m2", "1"), ModelRef("m3", "1")
X = np.arange(12, dtype=np.float32).reshape(4, 3)


def tensor(array) -> Tensor:
    return Tensor.from_array(np.asarray(array))


def new_run(task: TaskSpec) -> TaskRun:
    return TaskRun(task, default_aggregation="all", now=0.0)


def diamond(task_id: str = "d") -> TaskSpec:
    stages = (
        Stage("src", M1),
        Stage("left", M2, after=("src",)),
        Stage("right", M3, after=("src",)),
        Stage("join", M1, after=("left", "right")),
    )
    return TaskSpec(task_id, Pattern.PIPELINE, tensor(X), stages=stages)


# --- pipelines ---------------------------------------------------------------------------------


def test_a_diamond_runs_each_stage_once_and_feeds_every_dependant():
    run = new_run(diamond())
    dispatched: list[WorkItem] = []

    def start_ready() -> list[str]:
        ready = run.ready()
        for item in ready:  # as the service does: each ready item goes out once
            dispatched.append(item)
            run.items[item.item_id] = ItemRun(item)
        return [item.stage for item in ready]

    assert start_ready() == ["src"]
    run.record_result("d/src", tensor(X * 2), "n", 1.0)
    assert start_ready() == ["left", "right"]
    for item in dispatched[1:]:  # both branches read src's output
        np.testing.assert_array_equal(item.input.to_array(), X * 2)
    run.record_result("d/left", tensor(X[:, :1]), "n", 1.0)
    assert start_ready() == []  # join still waits for right
    run.record_result("d/right", tensor(X[:, 1:]), "n", 1.0)
    assert start_ready() == ["join"]
    np.testing.assert_array_equal(dispatched[-1].input.to_array(), X)  # left, right: as after=
    run.record_result("d/join", tensor(X + 1), "n", 1.0)
    assert start_ready() == []
    assert [item.stage for item in dispatched] == ["src", "left", "right", "join"]
    assert run.outcome.succeeded and len(run.outcome.outputs) == 1
    np.testing.assert_array_equal(run.outcome.outputs[0], X + 1)


def test_a_pipeline_whose_branches_cannot_be_joined_fails_naming_the_stage():
    run = new_run(diamond())
    run.ready()
    run.record_result("d/src", tensor(X), "n", 1.0)
    run.ready()
    run.record_result("d/left", tensor(X), "n", 1.0)
    run.record_result("d/right", tensor(X[:3]), "n", 1.0)  # 3 rows, not 4
    assert run.ready() == []  # before: RemoteProtocolError out of ready(), the task hung
    assert run.done and not run.outcome.succeeded
    assert run.outcome.error.startswith("pipeline: stage 'join': cannot join inputs")


# --- batches -----------------------------------------------------------------------------------


def batch_run() -> TaskRun:
    run = new_run(TaskSpec("b", Pattern.BATCH, tensor(X), (M1,), shard_size=2))
    assert [i.item_id for i in run.ready()] == ["b/0", "b/1"]
    return run


def test_a_batch_shard_answered_with_too_few_rows_fails_the_task():
    run = batch_run()
    run.record_result("b/0", tensor(np.zeros((2, 5), np.float32)), "n1", 1.0)
    run.record_result("b/1", tensor(np.zeros((1, 5), np.float32)), "n2", 1.0)
    # before: the 3 rows were concatenated and the task "succeeded" with one row missing
    assert run.done and not run.outcome.succeeded
    assert run.outcome.error == (
        "item b/1: unusable output from n2: shape [1, 5] for a shard of 2 rows"
    )


def test_batch_shards_of_different_widths_fail_the_task_instead_of_raising():
    run = batch_run()
    run.record_result("b/1", tensor(np.zeros((2, 5), np.float32)), "n1", 1.0)
    run.record_result("b/0", tensor(np.zeros((2, 7), np.float32)), "n2", 1.0)  # before: raised
    assert run.done and not run.outcome.succeeded
    assert "shape [2, 7] does not join the other shards' [2, 5]" in run.outcome.error


# --- parallel aggregation ----------------------------------------------------------------------


@pytest.mark.parametrize("odd_first", [True, False], ids=["odd-first", "odd-last"])
@pytest.mark.parametrize("mode", ["weighted", "majority", "ensemble"])
def test_models_with_mismatched_outputs_fail_the_task_whatever_arrives_first(mode, odd_first):
    task = TaskSpec("p", Pattern.PARALLEL, tensor(X), (M1, M2, M3), aggregation=mode)
    run = new_run(task)
    run.ready()
    one = np.eye(4, 10, dtype=np.float32)
    other = np.roll(one, 1, axis=1)  # votes differ: a majority waits for the third model
    odd = np.eye(3, 10, dtype=np.float32)  # 3 rows where the others have 4
    order = [("p/2", odd), ("p/0", one), ("p/1", other)]
    if not odd_first:
        order = order[1:] + order[:1]
    for item_id, output in order:
        run.record_result(item_id, tensor(output), "n", 1.0)  # before: raised for one of them
    # before: whichever shape came first won, and the others were dropped as failures
    assert run.done and not run.outcome.succeeded
    assert "differs from" in run.outcome.error


def test_a_first_aggregation_whose_items_all_fail_says_why():
    task = TaskSpec("f", Pattern.PARALLEL, tensor(X), (M1, M2), aggregation="first")
    run = new_run(task)
    run.ready()
    run.record_failure("f/0", "n1: model exploded", 1.0)
    assert not run.done  # the other model may still answer
    run.record_failure("f/1", "n2: out of memory", 1.0)
    assert not run.outcome.succeeded
    assert run.outcome.error == (  # before: "aggregation first failed (exhausted)" alone
        "aggregation first failed (exhausted): 0 of 2 outputs; "
        "2 item(s) failed, f/0: n1: model exploded"
    )


def test_an_aggregation_timing_out_empty_names_the_deadline():
    task = TaskSpec("t", Pattern.PARALLEL, tensor(X), (M1, M2), aggregation="all", deadline_s=2)
    run = new_run(task)
    run.check_timeout(1.0)
    assert not run.done
    run.check_timeout(2.0)
    assert run.outcome.error == (
        "aggregation all failed (timeout): 0 of 2 outputs in by the deadline of 2 s"
    )


def test_a_duplicate_result_of_an_aggregated_item_counts_once():
    task = TaskSpec("w", Pattern.PARALLEL, tensor(X), (M1, M2), aggregation="weighted")
    run = new_run(task)
    run.ready()
    run.record_result("w/0", tensor(np.full((2,), 1.0, np.float32)), "n1", 1.0)
    run.record_result("w/0", tensor(np.full((2,), 9.0, np.float32)), "n2", 1.0)  # a retry's
    assert not run.done
    run.record_result("w/1", tensor(np.full((2,), 3.0, np.float32)), "n3", 1.0)
    np.testing.assert_array_equal(run.outcome.outputs[0], [2.0, 2.0])
    assert run.outcome.aggregation.duplicates == 1


# --- through a real coordinator ----------------------------------------------------------------


def answer_in_two_axes(daemon, model_id: str) -> None:
    """Make ``daemon``'s engine answer ``model_id`` with each row's scores as a 2 x 5 grid
    (a model with a multi-axis head), which a sibling's flat scores cannot be joined to."""
    original = daemon.engine.infer

    async def grid(ref, batch):
        out = await original(ref, batch)
        return out.reshape(len(out), 2, -1) if ref.model_id == model_id else out

    daemon.engine.infer = grid


async def test_a_pipeline_join_that_does_not_fit_fails_the_task_with_a_reason(tmp_path):
    x, _ = load_digits_holdout()
    wide = ModelRef("digits-mlp-wide", "1")
    extra = '[inference]\nmodels = ["digits-mlp@1", "digits-mlp-wide@1", "synthetic-mlp@w20-d1"]\n'
    stages = (
        Stage("a", DIGITS),
        Stage("b", wide),
        Stage("head", ModelRef("synthetic-mlp", "w20-d1"), after=("a", "b")),
    )
    async with Mesh(tmp_path, n=1, extra=extra) as mesh:
        answer_in_two_axes(mesh.daemons["node-0"], "digits-mlp-wide")
        c = mesh.coordinator
        task = TaskSpec("misfit", Pattern.PIPELINE, Tensor.from_array(x[:8]), stages=stages)
        record = await c.wait(await c.submit(task), timeout=10)  # before: running for ever
        assert record.state.value == "failed"
        assert record.summary.error.startswith("pipeline: stage 'head': cannot join inputs")
        states = {item.stage: item.state.value for item in record.items}
        assert states == {"a": "succeeded", "b": "succeeded", "head": "cancelled"}


async def test_a_parallel_task_recovered_past_its_deadline_keeps_its_journaled_results(tmp_path):
    x, y = load_digits_holdout()
    models = (DIGITS, ModelRef("digits-mlp-wide", "1"))
    async with Mesh(tmp_path, n=1) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon, only="digits-mlp-wide")
        task = spec("vote", "parallel", x, models=models, aggregation="all", deadline_s=60)
        await c.submit(task)
        async with asyncio.timeout(10):  # the digits model's result is journaled
            while (await c.get("vote")).items[0].state.value != "succeeded":
                await asyncio.sleep(0.02)
        c = await restarted_as_if_accepted_ago(mesh, 120)
        record = await c.wait("vote", timeout=10)
        gate.set()
        # before: the journaled result was replayed as late, and the task failed empty
        assert record.state.value == "succeeded", record.summary.error
        result = c.result_of(record)
        assert result["aggregation"]["sources"] == ["vote/0"]
        assert result["aggregation"]["partial"] and result["aggregation"]["reason"] == "timeout"
        assert (np.argmax(result["outputs"][0], axis=-1) == y).mean() >= 0.9
        await until(lambda: daemon.executor.running == 0)
