"""Done-callbacks that log how a background task ended (meshinfer.runtime.loop.log_failure)."""

import asyncio
import logging

from meshinfer.errors import RemoteProtocolError
from meshinfer.runtime.loop import Steps, log_failure
from tests.helpers import until

log = logging.getLogger("tests.background")


async def ended(coro) -> asyncio.Task:
    task = asyncio.create_task(coro)
    await asyncio.gather(task, return_exceptions=True)
    return task


async def test_a_failed_task_is_logged_by_who_is_at_fault_and_a_cancelled_one_not(caplog):
    async def fails(exc: BaseException) -> None:
        raise exc

    callback = log_failure(log, "the step")
    caplog.set_level(logging.DEBUG, logger="tests.background")
    callback(await ended(fails(RemoteProtocolError("peer sent junk"))))
    callback(await ended(fails(KeyError("bug"))))
    cancelled = asyncio.create_task(asyncio.Event().wait())
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    callback(cancelled)
    callback(await ended(asyncio.sleep(0)))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "the step failed: peer sent junk"),
        (logging.ERROR, "the step failed: 'bug'"),
    ]
    assert caplog.records[1].exc_info is not None  # our bug: with its traceback


async def test_steps_close_after_every_step_under_way_even_those_spawned_meanwhile(caplog):
    steps, ran, gate = Steps(logging.getLogger("steps-test"), "test step"), [], asyncio.Event()

    async def step(name, then=None):
        await gate.wait()
        ran.append(name)
        if then is not None:
            steps.spawn(then)  # spawned while closing: still waited for

    async def failing():
        raise ValueError("bug")

    steps.spawn(step("first", then=step("second")))
    steps.spawn(failing())
    closing = asyncio.create_task(steps.aclose())
    await until(lambda: len(steps) == 1)  # the failed one is gone, logged
    assert not closing.done()
    gate.set()
    await closing
    assert ran == ["first", "second"] and len(steps) == 0
    late = step("late")
    steps.spawn(late)  # after the close: dropped, never run
    assert late.cr_frame is None and len(steps) == 0
    assert "test step failed: bug" in caplog.text
