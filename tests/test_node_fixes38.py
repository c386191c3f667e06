"""The node's task-side helpers (session 38 review): how many items may wait for a run slot
(node/slots.py), and what a node answers the one past that bound."""

from __future__ import annotations

import asyncio

import pytest

from meshinfer.errors import OverloadedError
from meshinfer.proto.tasks_wire import FailureKind, TaskCancel
from node.slots import MAX_WAITING, Slots
from tests.test_executor_sharing import KEEPING, Net, soon


async def test_no_more_than_max_waiting_items_wait_for_a_slot():
    """Every slot busy and ``max_waiting`` items waiting: one more is refused at once
    (OverloadedError, retryable: it runs elsewhere), not held with its input for as long as
    the slots stay busy. A waiter that leaves (cancelled) or is given a slot makes room."""
    slots = Slots(1, max_waiting=3)
    await slots.acquire(0)
    waiters = [asyncio.ensure_future(slots.acquire(p)) for p in (0, 1, 2)]
    await soon(lambda: slots.waiting == 3)
    with pytest.raises(OverloadedError, match="3 items wait for one of its 1 run slots"):
        await slots.acquire(3)
    waiters[0].cancel()
    await asyncio.gather(waiters[0], return_exceptions=True)
    assert slots.waiting == 2
    late = asyncio.ensure_future(slots.acquire(3))  # room again: it waits (and goes first)
    await soon(lambda: slots.waiting == 3)
    slots.release()
    await late
    assert slots.waiting == 2 and slots.free == 0
    for _ in range(3):
        slots.release()
    await asyncio.gather(*waiters[1:])
    assert slots.waiting == 0 and slots.free == 1 and slots._waiters == []


async def test_a_waiter_given_a_slot_then_cancelled_leaves_the_count_right():
    """Given a slot and cancelled before it ran: the slot goes on, and the waiter is counted
    out once (a count that drifted would refuse items with room left, or let more wait)."""
    slots = Slots(1, max_waiting=2)
    await slots.acquire(0)
    first = asyncio.ensure_future(slots.acquire(0))
    second = asyncio.ensure_future(slots.acquire(0))
    await soon(lambda: slots.waiting == 2)
    slots.release()  # to first, which is cancelled before it resumes
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await second  # the slot passed on
    assert slots.waiting == 0 and slots.free == 0
    slots.release()
    assert slots.free == 1


async def test_an_item_past_the_bound_is_answered_overloaded_and_the_rest_run():
    """A peer sends items faster than the one slot frees: MAX_WAITING wait, the next is
    answered OVERLOADED (retryable: the coordinator runs it elsewhere; a node that passed it
    here runs it itself) at once, and the ones held still run once the slot frees."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        coord = net.nodes["coord"]
        for i in range(MAX_WAITING + 1):  # one runs (held by the gate), the rest wait
            await net.assign("coord", f"q-{i}")
        await soon(lambda: executor.backlog == MAX_WAITING + 1)
        await net.assign("coord", "one-too-many")
        await soon(lambda: coord.failure("one-too-many") is not None)
        refusal = coord.failure("one-too-many")
        assert refusal.code == FailureKind.OVERLOADED and refusal.retryable
        assert "run slots" in refusal.message
        assert [a for a in coord.answers() if a[1] != "one-too-many"] == []
        for i in range(1, MAX_WAITING + 1):  # (make the end quick: cancel those waiting)
            await coord.peers.request("w", TaskCancel(f"q-{i}", "enough"))
        net.gate.set()
        await soon(lambda: ("TaskResult", "q-0", 1, "w") in coord.answers())
        await soon(lambda: executor.backlog == 0)
        await net.assign("coord", "after")
        await soon(lambda: ("TaskResult", "after", 1, "w") in coord.answers())
