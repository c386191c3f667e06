"""meshinfer.runtime.loop: done-callbacks that log how a background task ended (log_failure),
Steps, and serve_until_signalled's stops (signals, the parent watch of ``--exit-with-parent``)."""

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys

from meshinfer.errors import RemoteProtocolError
from meshinfer.runtime.loop import Steps, log_failure, pid_alive, serve_until_signalled
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


class Started:
    """A stand-in daemon for serve_until_signalled: it only records its lifecycle."""

    node_id = "stand-in"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.drained = False
        self.closed = 0

    async def start(self) -> dict:
        self.started.set()
        return {"node_id": self.node_id}

    async def drain(self) -> None:
        self.drained = True
        await self.aclose()

    async def aclose(self) -> None:
        self.closed += 1


async def test_a_daemon_watching_its_parent_drains_once_it_is_re_parented(capsys, caplog):
    daemon, parent, looks, asked = Started(), [4242], [], []

    def current_parent() -> int:
        looks.append(parent[0])
        return parent[0]

    def alive(pid: int) -> bool:
        asked.append(pid)
        return False

    caplog.set_level(logging.INFO, logger="meshinfer.runtime.loop")
    serving = asyncio.create_task(
        serve_until_signalled(
            daemon, daemon.drain, 4242, current_parent=current_parent, pid_alive=alive
        )
    )
    await daemon.started.wait()
    await until(lambda: len(looks) >= 2)  # it looked again, and the same parent keeps it up
    assert not serving.done() and not daemon.drained
    parent[0] = 1  # the parent died: this process now belongs to init
    assert await asyncio.wait_for(serving, timeout=5) == 0
    assert daemon.drained and daemon.closed == 1
    assert capsys.readouterr().out.splitlines() == [
        'READY {"node_id": "stand-in"}',
        "STOPPED stand-in",
    ]
    assert "parent process 4242 is gone (re-parented to 1): stopping as on SIGTERM" in caplog.text
    assert asked == []  # its parent was the launcher: liveness is not what it watches
    # the signal handlers it set are gone with it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


async def test_a_parent_gone_before_the_start_ends_stops_the_daemon_right_after_it(capsys):
    daemon = Started()
    stopped = await asyncio.wait_for(
        serve_until_signalled(
            daemon, daemon.drain, 4242, current_parent=lambda: 1, pid_alive=lambda pid: False
        ),
        timeout=5,
    )
    assert stopped == 0 and daemon.drained
    assert capsys.readouterr().out.splitlines()[0].startswith("READY ")


async def test_a_daemon_started_through_a_wrapper_serves_while_its_launcher_lives(capsys, caplog):
    # (under timeout, sudo or sh -c: its parent is the wrapper, not the launcher's pid given)
    daemon, launcher_alive, asked = Started(), [True], []

    def alive(pid: int) -> bool:
        asked.append(pid)
        return launcher_alive[0]

    caplog.set_level(logging.INFO, logger="meshinfer.runtime.loop")
    serving = asyncio.create_task(
        serve_until_signalled(
            daemon, daemon.drain, 4242, current_parent=lambda: 777, pid_alive=alive
        )
    )
    await daemon.started.wait()
    await until(lambda: len(asked) >= 2)  # it looked again, and the live launcher keeps it up
    assert not serving.done() and not daemon.drained
    assert set(asked) == {4242}
    launcher_alive[0] = False
    assert await asyncio.wait_for(serving, timeout=5) == 0
    assert daemon.drained and daemon.closed == 1
    assert capsys.readouterr().out.splitlines()[-1] == "STOPPED stand-in"
    assert "parent process 4242 is gone (no longer running): stopping as on SIGTERM" in caplog.text


def test_a_pid_is_alive_while_its_process_runs_and_not_once_reaped():
    assert pid_alive(os.getpid())
    assert pid_alive(1)  # init: alive even where this process may not signal it
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)


def test_a_zombie_is_not_alive():
    """An exited launcher its own parent has not reaped yet is gone for the parent watch."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped
        assert not pid_alive(child.pid)
    finally:
        child.wait()


async def test_without_a_parent_pid_the_parent_is_not_looked_at(capsys):
    daemon, looks = Started(), []

    def current_parent() -> int:
        looks.append(1)
        return 1

    serving = asyncio.create_task(
        serve_until_signalled(daemon, daemon.drain, current_parent=current_parent)
    )
    # set before the serving task runs: should it set no handler, the SIGTERM below lands here
    # (and fails this test) instead of killing pytest
    stray: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _: stray.append(signum))
    try:
        await daemon.started.wait()
        await until(lambda: "READY" in capsys.readouterr().out)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop while serving
        await asyncio.wait({serving}, timeout=5)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stray == [], "the SIGTERM missed the loop's handler"
    assert serving.result() == 0
    assert daemon.drained and looks == []


class Hanging(Started):
    """A stand-in whose start never ends (a join or a model load that hangs)."""

    def __init__(self) -> None:
        super().__init__()
        self.start_cancelled = False

    async def start(self) -> dict:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.start_cancelled = True
            raise
        return {}


async def test_a_stop_during_a_start_that_hangs_cancels_it_and_closes_without_ready(capsys, caplog):
    daemon = Hanging()
    caplog.set_level(logging.INFO, logger="meshinfer.runtime.loop")
    serving = asyncio.create_task(serve_until_signalled(daemon, daemon.drain))
    stray: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _: stray.append(signum))
    try:
        await daemon.started.wait()
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop while starting
        await asyncio.wait({serving}, timeout=5)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stray == [] and serving.result() == 0
    assert daemon.start_cancelled and daemon.closed == 1 and not daemon.drained
    assert capsys.readouterr().out.splitlines() == ["STOPPED stand-in"]
    assert "stopping during the start-up (SIGTERM)" in caplog.text


async def test_a_start_that_fails_closes_what_started_and_raises_its_error(capsys):
    daemon = Started()

    async def broken_start() -> dict:
        raise RuntimeError("start bug")

    daemon.start = broken_start
    serving = asyncio.create_task(serve_until_signalled(daemon, daemon.drain))
    await asyncio.wait({serving}, timeout=5)
    assert isinstance(serving.exception(), RuntimeError) and daemon.closed == 1
    assert capsys.readouterr().out == ""
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


async def test_a_drain_that_raises_is_logged_and_the_daemon_closed_with_exit_code_1(caplog):
    daemon = Started()

    async def broken_drain() -> None:
        raise RuntimeError("drain bug")

    caplog.set_level(logging.INFO, logger="meshinfer.runtime.loop")
    code = await asyncio.wait_for(
        serve_until_signalled(
            daemon, broken_drain, 4242, current_parent=lambda: 1, pid_alive=lambda pid: False
        ),
        timeout=5,
    )
    assert code == 1 and daemon.closed == 1
    assert "the drain failed; closing at once" in caplog.text and "drain bug" in caplog.text
    assert "stopped cleanly" not in caplog.text


async def test_on_ready_runs_once_after_the_start_and_before_ready_is_printed(capsys):
    daemon, seen = Started(), []

    def on_ready() -> None:
        seen.append((daemon.started.is_set(), capsys.readouterr().out))

    code = await asyncio.wait_for(
        serve_until_signalled(
            daemon,
            daemon.drain,
            4242,
            current_parent=lambda: 1,
            pid_alive=lambda pid: False,
            on_ready=on_ready,
        ),
        timeout=5,
    )
    assert code == 0 and seen == [(True, "")]
    assert capsys.readouterr().out.startswith("READY ")


SETTLE = """
import gc, json
from meshinfer.runtime.heap import settle_heap
before = gc.get_threshold()
kept = [[] for _ in range(1000)]
settle_heap()
print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count(), gc.get_count()[0]]))
"""


def test_a_settled_heap_is_frozen_and_collected_less_often():
    """In a process of its own: the settings are process-wide."""
    from meshinfer.runtime.heap import FIRST_GENERATION_THRESHOLD

    out = subprocess.run(
        [sys.executable, "-c", SETTLE], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    before, after, frozen, young = json.loads(out)
    assert after == [FIRST_GENERATION_THRESHOLD, *before[1:]] and before[0] < after[0]
    assert frozen >= 1000  # the lists above, and the start-up heap around them
    assert young < 50  # collected just before the freeze
