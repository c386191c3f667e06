"""Pipelines and batches under failures, retries and coordinator restarts: a stage's output is
fed on exactly once, a result the journal took is never lost from the live task, and a task
either finishes or fails with a reason.

Real coordinator and node daemons in this process (``tests.test_coordinator_service.Mesh``);
a race is set up by calling the coordinator's handlers in the order under test.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from coordinator.journal import Journal
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto import messages
from meshinfer.proto.tasks import Pattern, Stage, TaskSpec, TaskState
from meshinfer.proto.tasks_wire import TaskResult, Tensor
from tests.helpers import until
from tests.test_coordinator_service import DIGITS, Mesh, hold_inference, spec

TAIL = ModelRef("synthetic-mlp", "w10-d1")  # reads the digits model's 10 scores
TWO_MODELS = '[inference]\nmodels = ["digits-mlp@1", "synthetic-mlp@w10-d1"]\n'


def chain(task_id: str = "p", rows: int = 8, **kw) -> TaskSpec:
    """A two-stage pipeline: the digits model, then a small MLP on its scores."""
    x, _ = load_digits_holdout()
    stages = (Stage("a", DIGITS), Stage("b", TAIL, after=("a",)))
    return TaskSpec(task_id, Pattern.PIPELINE, Tensor.from_array(x[:rows]), stages=stages, **kw)


async def test_a_stage_result_journaled_as_its_timeout_gives_up_still_feeds_the_next_stage(
    tmp_path,
):
    config = CoordinatorConfig(item_timeout_s=30, max_attempts=1, running_mark_delay_s=60.0)
    async with Mesh(tmp_path, n=1, extra=TWO_MODELS, config=config) as mesh:
        c = mesh.coordinator
        accept, fired = c._accept_result, []

        async def racing(peer, msg):  # the first stage's timer falls due in its result's turn
            if not fired:
                fired.append(msg.item_id)
                c._on_timeout(msg.item_id, msg.attempt)  # no attempt left: the item fails
            await accept(peer, msg)

        c._accept_result = racing
        record = await c.wait(await c.submit(chain()), timeout=10)
        assert fired == ["p/a"]
        # before: the journal took p/a's result (its failure came second and was ignored),
        # yet the task failed "p/a: gave up after 1 attempts" and p/b never ran
        assert record.state.value == "succeeded", record.summary.error
        assert [(i.stage, i.state.value) for i in record.items] == [
            ("a", "succeeded"),
            ("b", "succeeded"),
        ]
        assert not c._items and not c._runs


async def test_a_result_arriving_while_the_coordinator_recovers_is_not_lost(tmp_path):
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=30)  # a lost result is only retried after 30 s
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        # "a-ends": no node serves its model; it gets a result offline below, so recovery ends it
        await c.submit(spec("a-ends", "single", x[:1], models=(ModelRef("nowhere", "1"),)))
        gate = hold_inference(daemon)
        await c.submit(spec("b-held", "single", x[:1]))

        async def journaled_running() -> bool:  # recovered after a-ends (running as well)
            return (await c.get("b-held")).state == TaskState.RUNNING

        async with asyncio.timeout(10):
            while not await journaled_running():
                await asyncio.sleep(0.01)
        await c.aclose()  # a crash, as far as the journal is concerned
        answers: list[tuple[str, TaskResult]] = []
        mesh.mesh.peers.on(TaskResult, lambda peer, msg: answers.append((peer, msg)))
        gate.set()
        await until(lambda: answers)
        with Journal(tmp_path / "journal.db") as journal:
            blob = messages.encode(replace(answers[0][1], item_id="a-ends/0"))
            journal.record_result("a-ends/0", 1, blob, node="node-0", sent_to="node-0")

        c = mesh.coordinator = Coordinator(mesh.mesh, tmp_path / "journal.db", config)
        run = c._db.run

        async def answered_during_recovery(fn, *args, **kw):
            value = await run(fn, *args, **kw)
            if fn == "recover":  # b-held's answer comes in before recovery queued its item
                assert [r.task.task_id for r in value] == ["a-ends", "b-held"]
                c._on_result(*answers[0])
                await asyncio.sleep(0)  # its journaling is queued before a-ends is ended
            return value

        c._db.run = answered_during_recovery
        await c.start()
        record = await c.wait("b-held", timeout=3)
        # before: the journal took the answer while no item was live to record it; recovery
        # then sent the item again, its replayed answer was a duplicate, and the task hung
        assert record.state == TaskState.SUCCEEDED, record.summary
        assert (await c.get("a-ends")).state == TaskState.SUCCEEDED
        assert not c._items and not c._runs
