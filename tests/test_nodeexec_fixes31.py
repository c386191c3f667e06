"""Session 31's node executor fix: every result the node sends that nothing waits for (one
relayed from the peer an item was passed to, a kept one answering a resend) names the
assignment it answers, so one that can never be sent (too large for the coordinator's session)
is answered with the failure instead of being dropped in silence (the coordinator then waited
for its attempt timeout) and is not kept for a replay.

Real peer tables and Noise sessions over the in-memory transport (tests/test_executor_sharing's
:class:`Net`). ``w`` runs no model, so it passes each item to ``b``; ``w`` dials with a message
cap of :data:`CAP` bytes (each way; sessions dialled to it take the default): the item fits
under it, ``b``'s answer of twice :data:`ROWS` rows does not.
"""

from __future__ import annotations

import asyncio

from meshinfer.inference.synthetic import sample_inputs
from meshinfer.proto import messages
from meshinfer.proto.tasks_wire import FailureKind, TaskResult, Tensor
from meshinfer.runtime.session import SessionConfig
from tests.test_executor_sharing import MODEL, Net, item, soon
from tests.test_nodeexec_fixes30 import CAP, ROWS


def big_result(item_id: str) -> TaskResult:
    output = Tensor.from_array(sample_inputs(MODEL, 2 * ROWS))
    return TaskResult(item_id, 1, output, "b", "numpy", "cpu", {})


def test_the_sizes_straddle_the_cap():
    assert len(messages.encode(item("big"))) < CAP < len(messages.encode(big_result("big")))


async def relayed(net: Net, *, drain: bool) -> None:
    """``big`` goes coord -> w -> b; b answers with a result too large for w's session with
    coord (one w dialled: capped); with ``drain``, w is draining when the answer comes."""
    net.members.set("b")
    await net.connect("b", "w")  # b dialled: that session takes the default cap
    await net.connect("w", "coord")
    executor = net.worker(model=False)
    await net.assign("coord", "big")
    await soon(lambda: net.nodes["b"].assigned() == ["big"])
    draining = asyncio.create_task(executor.drain(timeout=3.0)) if drain else None
    await net.nodes["b"].peers.request("w", big_result("big"))
    coord = net.nodes["coord"]
    await soon(lambda: coord.failure("big") is not None)
    if draining is not None:
        await draining
    failed = coord.failure("big")
    assert (failed.code, failed.retryable, failed.attempt) == (FailureKind.UNKNOWN, True, 1)
    assert "not sent" in failed.message and "exceeds the session cap" in failed.message
    assert not any(kind == "TaskResult" for kind, *_ in coord.answers())
    assert "big" not in executor.replay and executor.stats.relayed == 1
    assert net.w.stats.dropped["too-large"] == 1


async def test_a_relayed_result_too_large_for_the_coordinators_session_is_answered_with_failure():
    async with Net(worker_sends=SessionConfig(max_message_size=CAP)) as net:
        await relayed(net, drain=False)


async def test_a_relayed_result_too_large_while_draining_is_answered_with_failure_in_time():
    """During a drain the answer is tracked (the drain waits for it to be written): its
    failure is tracked too, so it is written before the drain returns."""
    async with Net(worker_sends=SessionConfig(max_message_size=CAP)) as net:
        await relayed(net, drain=True)
