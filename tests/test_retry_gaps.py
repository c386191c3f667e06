"""Gaps around retries, restarts and a task's end: a late result superseding a retry in flight,
an earlier attempt answered after a restart by a node it never went to, a task's end the
journal failed to write, and a task recovered past its deadline.

Real coordinator and node daemons in this process (``tests.test_coordinator_service.Mesh``);
each race is set up by calling the coordinator's handlers, or failing a journal call, in the
order under test (no sleeps).
"""

from __future__ import annotations

import numpy as np

from coordinator.journal import Journal
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.tasks_wire import TaskAssign, TaskResult, Tensor
from tests.helpers import until
from tests.test_coordinator_service import (
    DIGITS,
    Mesh,
    hold_inference,
    restarted_as_if_accepted_ago,
    spec,
)

TWO_MODELS = (DIGITS, ModelRef("digits-mlp-deep", "1"))


def fail_calls(journal: Journal, name: str, times: int) -> list[str]:
    """Make the journal's method ``name`` raise ``OSError`` (as a busy or full disk would) the
    next ``times`` times it runs; returns the list of those failures, one entry each."""
    original, failed = getattr(journal, name), []

    def flaky(*args, **kwargs):
        if len(failed) < times:
            failed.append(name)
            raise OSError("disk I/O error (injected)")
        return original(*args, **kwargs)

    setattr(journal, name, flaky)
    return failed


async def test_a_late_result_accepted_during_a_retry_cancels_the_retry_on_its_node(tmp_path):
    """Attempt 1 timed out on one node and attempt 2 runs on the other when attempt 1's result
    comes in and is accepted: the node running attempt 2 is told to cancel it (it would finish
    wasted work, while the coordinator counts nothing on it)."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2) as mesh:
        c = mesh.coordinator
        gates = {name: hold_inference(daemon) for name, daemon in mesh.daemons.items()}
        try:
            task_id = await c.submit(spec("late", "single", x[:1]))
            entry = c._items["late/0"][1]
            await until(lambda: entry.node is not None)
            first = entry.node
            second = next(name for name in mesh.names if name != first)
            await until(lambda: mesh.daemons[first].executor.running == 1)
            c._on_timeout("late/0", 1)  # as if attempt 1 were overdue: retried elsewhere
            await until(lambda: entry.node == second and entry.attempt == 2)
            await until(lambda: mesh.daemons[second].executor.running == 1)
            gates[first].set()  # attempt 1's result comes in after all
            record = await c.wait(task_id, timeout=3)
            assert record.state.value == "succeeded", record.summary.error
            assert record.items[0].node == first
            executor = mesh.daemons[second].executor
            # before: nothing told node `second`; it ran attempt 2 to its end, uncounted here
            await until(lambda: executor.stats.cancelled == 1, timeout=2)
            await until(lambda: executor.running == 0, timeout=2)
            assert not c._busy and not c._items
        finally:
            for gate in gates.values():
                gate.set()


async def test_after_a_restart_an_earlier_attempt_counts_only_from_its_journaled_node(tmp_path):
    """The journal had attempt 1 dispatched to one node when the coordinator restarted
    (recovery sends the item again as attempt 2): a result of attempt 1 from another member,
    which was never sent it, is refused (counted in ``foreign_results``)."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2) as mesh:
        honest = await mesh.daemons["node-0"].engine.infer(DIGITS, x[:1])
        forged = np.zeros_like(honest)
        forged[0, (int(np.argmax(honest)) + 1) % forged.shape[1]] = 1.0
        gates = [hold_inference(daemon) for daemon in mesh.daemons.values()]
        try:
            c = mesh.coordinator
            task_id = await c.submit(spec("forged", "single", x[:1]))
            entry = c._items["forged/0"][1]
            await until(lambda: entry.journaled == 1)  # the journal knows where attempt 1 went
            runner = entry.node
            hostile = next(name for name in mesh.names if name != runner)
            c = await restarted_as_if_accepted_ago(mesh, 0)
            assert c._items["forged/0"][1].attempt == 2
            lie = TaskResult(
                "forged/0", 1, Tensor.from_array(forged), hostile, "numpy", "cpu", {"total_s": 0}
            )
            c._on_result(hostile, lie)  # as it comes over hostile's session (test_hostile_peers)
            await until(lambda: "forged/0" not in c._answered)  # judged (journaled, if taken)
            # before: recovery let any member answer attempt 1; the lie became the output
            assert c.stats_.foreign_results == 1
        finally:
            for gate in gates:
                gate.set()
        record = await c.wait(task_id, timeout=3)
        assert record.state.value == "succeeded", record.summary.error
        # (attempt 2 may have gone to `hostile`: its honest answer of that one may win)
        assert c.result_of(record)["labels"] == [int(np.argmax(honest))]
        assert c.stats_.foreign_results == 1


async def test_a_tasks_end_the_journal_failed_to_write_is_retried_until_durable(tmp_path):
    """The journal fails the write of a task's end (``_finish``: here a parallel task's
    aggregation) twice: it is written again, with a backoff, and the waiter gets the outcome
    once it is durable (before: the task stayed live, its waiter waited, until a restart)."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1) as mesh:
        c = mesh.coordinator
        failed = fail_calls(c.journal, "end_task", times=2)
        task = spec("flaky", "parallel", x[:2], models=TWO_MODELS, aggregation="all")
        record = await c.wait(await c.submit(task), timeout=3)
        assert failed == ["end_task", "end_task"]
        assert record.state.value == "succeeded", record.summary.error
        assert "flaky" not in c._runs and not c._items
        assert (await c.get("flaky")).state.value == "succeeded"


async def test_a_task_recovered_past_its_deadline_fails_without_sending_its_items(tmp_path):
    """A task whose deadline passed while the coordinator was down fails at recovery: its
    items are not sent again (before: they went out with a deadline of 0 just before the
    deadline's timer failed the task)."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        try:
            await c.submit(spec("expired", "single", x[:1], deadline_s=60))
            await until(lambda: daemon.executor.running == 1)
            sent = []
            send = mesh.mesh.peers.send
            mesh.mesh.peers.send = lambda node, msg, **kw: sent.append(msg) or send(node, msg, **kw)
            c = await restarted_as_if_accepted_ago(mesh, 120)
            record = await c.wait("expired", timeout=3)
            assert record.state.value == "failed"
            assert "deadline of 60 s passed" in record.summary.error, record.summary.error
            assert not [m for m in sent if isinstance(m, TaskAssign)]
            assert "expired" not in c._runs and not c._items
        finally:
            gate.set()
