"""Session 32's node executor fixes, with real peer tables and Noise sessions over the in-memory
transport (tests/test_executor_sharing's :class:`Net`), a real NumPy engine and batcher.

- A peer's ``deadline_s`` is bounded by ``MAX_DEADLINE_S`` (30 days) where the node turns it
  into a loop deadline and where it passes the item on: a longer one (an older coordinator's,
  or 1e308) is clamped, never refused.
- A message about an item that arrives after the item's task ended but before its end was
  settled (its done-callback runs in the next loop iteration) is dealt with after it: a
  re-assignment then was stored as "answer this one too" and forgotten by the settling, so the
  coordinator's retry went unanswered.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace

import numpy as np
import pytest

from meshinfer.inference.synthetic import sample_inputs
from meshinfer.proto.tasks import MAX_DEADLINE_S
from meshinfer.proto.tasks_wire import FailureKind, TaskAssign, TaskCancel, Tensor
from node.config import ExecutorSection
from tests.test_executor_sharing import KEEPING, MODEL, Net, item, soon

HUGE = (1e308, sys.float_info.max, MAX_DEADLINE_S * 10)
#: Nothing kept for a replay: an item sent again after its answer runs again.
FORGETFUL = replace(KEEPING, result_replay_mib=0)


def test_clamp_deadline_bounds_only_what_is_over():
    from node.item_values import clamp_deadline  # (new: imported here, the others run without)

    assert clamp_deadline(None) is None
    assert clamp_deadline(0.0) == 0.0
    assert clamp_deadline(MAX_DEADLINE_S) == MAX_DEADLINE_S
    assert all(clamp_deadline(huge) == MAX_DEADLINE_S for huge in HUGE)


# --- a peer's deadline past MAX_DEADLINE_S -----------------------------------------------------


@pytest.mark.parametrize("huge", HUGE)
async def test_a_huge_deadline_from_a_peer_runs_here_under_the_bound(huge):
    """coord sends an item with a deadline far past 30 days: it is run (not refused) with a
    loop deadline of 30 days from now at most, and answered."""
    async with Net() as net:
        executor = net.worker(ExecutorSection(max_concurrent=1, input_cache_mib=1))
        net.gate.set()
        deadlines: list[float] = []
        infer = executor._infer

        async def noted(ref, batch, priority, deadline):
            deadlines.append(deadline - asyncio.get_running_loop().time())
            return await infer(ref, batch, priority, deadline)

        executor._infer = noted
        await net.nodes["coord"].peers.request("w", replace(item("h"), deadline_s=huge))
        await soon(lambda: ("TaskResult", "h", 1, "w") in net.nodes["coord"].answers())
        assert MAX_DEADLINE_S - 60 < deadlines[0] <= MAX_DEADLINE_S


@pytest.mark.parametrize("huge", HUGE)
async def test_a_huge_deadline_is_bounded_where_the_item_is_passed_on(huge):
    """w lacks the model and passes the item to b: b is sent the bound, and w's own count of
    what is left of it (for a resend or a run here after a refusal) starts from the bound."""
    async with Net() as net:
        net.members.set("b")
        await net.connect("w", "b")
        executor = net.worker(model=False)
        await net.nodes["coord"].peers.request("w", replace(item("p"), deadline_s=huge))
        b = net.nodes["b"]
        await soon(lambda: b.assigned() == ["p"])
        (sent,) = [m for _, m in b.got if isinstance(m, TaskAssign)]
        assert sent.deadline_s == MAX_DEADLINE_S
        left = executor._time_left(executor._offloaded["p"][1]).deadline_s
        assert MAX_DEADLINE_S - 60 < left <= MAX_DEADLINE_S


# --- messages between an item's end and its settling ---------------------------------------------


def after_the_end(net: Net, executor, item_id: str, count: int, late: list) -> None:
    """Hold the next ``count`` messages about ``item_id`` (held by the gate) that reach
    ``w``; once all came, let the item run (open the gate) and give them to ``w``'s handlers
    in the loop iteration in which its task is done, before its done-callback ran (``late``
    says whether it had not: True)."""
    handlers = {TaskAssign: executor._on_assign, TaskCancel: executor._on_cancel}
    held: list = []

    def deliver() -> None:
        task = executor._items.get(item_id)
        if task is not None and not task.done():
            asyncio.get_running_loop().call_soon(deliver)  # (until the step that ends it)
            return
        late.append(task is not None)  # (its done-callback forgets it: not run yet)
        for peer, msg in held:
            handlers[type(msg)](peer, msg)

    def hold(peer, msg) -> None:
        if msg.item_id != item_id or late or item_id not in executor._items:
            handlers[type(msg)](peer, msg)
            return
        held.append((peer, msg))
        if len(held) == count:
            net.gate.set()
            asyncio.get_running_loop().call_soon(deliver)

    for kind in handlers:
        net.w.on(kind, hold)


async def test_a_retry_that_comes_as_the_item_ends_is_answered():
    """coord's attempt 2 of x comes in the loop iteration in which x's run ended (its result
    sent, nothing kept for a replay): it runs again and is answered, not recorded as a later
    assignment of the running item, which its settling then forgot."""
    async with Net() as net:
        executor = net.worker(FORGETFUL)
        late: list = []
        after_the_end(net, executor, "x", 1, late)
        await net.assign("coord", "x")
        await soon(lambda: executor.backlog == 1)
        await net.assign("coord", "x", attempt=2)
        await soon(lambda: late)
        assert late == [True]
        coord = net.nodes["coord"]
        await soon(lambda: ("TaskResult", "x", 2, "w") in coord.answers())
        assert ("TaskResult", "x", 1, "w") in coord.answers()
        assert executor.stats.completed == 2


async def test_a_cancel_after_such_a_retry_cancels_it():
    """As above, with coord's cancel of x right after its attempt 2: the cancel is taken after
    the retry it followed (not dropped as coming for an item over already), so attempt 2 is
    answered CANCELLED instead of running."""
    async with Net() as net:
        executor = net.worker(FORGETFUL)
        late: list = []
        after_the_end(net, executor, "x", 2, late)
        await net.assign("coord", "x")
        await soon(lambda: executor.backlog == 1)
        coord = net.nodes["coord"]
        coord.peers.send("w", item("x", attempt=2))
        await coord.peers.request("w", TaskCancel("x", "no longer wanted"))
        await soon(lambda: late)
        assert late == [True]
        await soon(lambda: ("TaskFailed", "x", 2, "w") in coord.answers())
        assert coord.failure("x").code == FailureKind.CANCELLED
        assert executor.stats.cancelled == 1 and executor.backlog == 0


# --- an item in several pieces, one of them refused ----------------------------------------------


async def test_the_pieces_of_an_item_are_cancelled_when_one_fails():
    """An item of twice the batcher's rows per request, with NaN in its second half: that piece
    is refused (BAD_INPUT answers the item, its slot is given up), and the first piece, in the
    batcher (held by the gate), is cancelled with it instead of going on to take the
    engine's time (a queued piece) or to be answered to nobody (one in a batch)."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        rows = 2 * net.batcher.max_request_rows
        x = sample_inputs(MODEL, rows).astype(np.float32)
        x[rows - 1, 0] = np.nan
        msg = replace(item("nan"), input=Tensor.from_array(x))
        await net.nodes["coord"].peers.request("w", msg)
        coord = net.nodes["coord"]
        await soon(lambda: coord.failure("nan") is not None)
        assert coord.failure("nan").code == FailureKind.BAD_INPUT
        await soon(lambda: net.batcher.stats().cancelled == 1)
        assert executor.running == 0 and executor.backlog == 0


# --- an answer the peer table drops at once ----------------------------------------------------


async def test_an_answer_the_peer_table_drops_at_once_is_logged(caplog):
    """A failure for a peer the table does not know is dropped by ``send`` at once: it was
    dropped in silence (the coordinator's timeout covers it, but nothing said so)."""
    async with Net() as net:
        executor = net.worker(ExecutorSection(max_concurrent=1, input_cache_mib=1))
        caplog.set_level("INFO", logger="node.executor")
        executor._fail("nobody", item("gone"), FailureKind.CANCELLED, "x", retryable=False)
        assert "failure of gone to nobody dropped unsent" in caplog.text
