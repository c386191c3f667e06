"""Session 34 fixes to the node's work sharing (:mod:`node.work_sharing`), on the paired peer
tables of :mod:`tests.test_executor_sharing` (real peer tables, memory transport)."""

from __future__ import annotations

from meshinfer.inference.synthetic import sample_inputs
from meshinfer.proto.tasks_wire import FailureKind, TaskCancel, TaskResult, Tensor
from tests.test_executor_sharing import MODEL, Net, passed_to_b, soon


async def test_a_cancel_the_outbox_cannot_take_answers_the_item_cancelled_at_once():
    """coord cancels the item w passed to b while w's outbox to b is full (the cancel is
    dropped at once): coord hears CANCELLED now, not when the item's answer timer (60 s with
    no deadline) runs out, and b's late answer is not relayed."""
    async with Net() as net:
        executor = await passed_to_b(net)
        net.w._outboxes["b"].limit = 0  # full, as far as a new message is concerned
        await net.nodes["coord"].peers.request("w", TaskCancel("p", "no longer wanted"))
        coord = net.nodes["coord"]
        await soon(lambda: coord.failure("p") is not None)
        failed = coord.failure("p")
        assert (failed.code, failed.retryable, failed.attempt) == (FailureKind.CANCELLED, False, 1)
        assert "not passed on" in failed.message
        assert net.nodes["b"].cancels() == [] and "p" not in executor._offloaded
        net.w._outboxes["b"].limit = 256
        output = Tensor.from_array(sample_inputs(MODEL, 1))
        await net.nodes["b"].peers.request("w", TaskResult("p", 1, output, "b", "", "", {}))
        await net.assign("coord", "after")  # a message after b's answer: it was handled
        await soon(lambda: executor.stats.offloaded == 2)
        assert [a for a in coord.answers() if a[1] == "p"] == [("TaskFailed", "p", 1, "w")]
        assert executor.stats.relayed == 0
