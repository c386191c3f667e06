"""The daemons' lifecycle plumbing at its edges: serve_until_signalled cancelled from outside or
failing while it sets up, close_in_order cancelled, a broken uvloop, MeshNode's start meeting a
close in a caller that swallowed a cancellation, and clear errors (wait_joined before the
start, a data_dir that is a dangling symbolic link). Real TCP on loopback, real subprocesses."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import subprocess
import sys
import textwrap

import pytest

from meshinfer.errors import ConfigError
from meshinfer.runtime.data_dir import DataDir
from meshinfer.runtime.loop import close_in_order, serve_until_signalled
from meshinfer.testing.fleet import make_fleet
from tests.test_meshnode_fixes33 import Outbound, node_for, refused


@pytest.fixture(scope="module")
def fleet():
    return make_fleet(None, ["car-a"])


class Daemon:
    """A stand-in daemon for serve_until_signalled that records its lifecycle; its drain waits
    until let go (``drain_go``)."""

    node_id = "stand-in"

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.draining = asyncio.Event()
        self.drain_go = asyncio.Event()
        self.drain_cancelled = False
        self.closed = 0

    async def start(self) -> dict:
        return {"node_id": self.node_id}

    def on_ready(self) -> None:
        self.ready.set()

    async def drain(self) -> None:
        self.draining.set()
        try:
            await self.drain_go.wait()
        except asyncio.CancelledError:
            self.drain_cancelled = True
            raise
        await self.aclose()

    async def aclose(self) -> None:
        self.closed += 1


def others() -> set[asyncio.Task]:
    return asyncio.all_tasks() - {asyncio.current_task()}


async def test_cancelled_from_outside_after_ready_the_daemon_is_closed(capsys):
    daemon = Daemon()
    serving = asyncio.create_task(
        serve_until_signalled(daemon, daemon.drain, on_ready=daemon.on_ready)
    )
    await daemon.ready.wait()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert daemon.closed == 1 and not daemon.draining.is_set()
    assert others() == set()  # its wait for a signal went with it
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


async def test_cancelled_from_outside_during_the_drain_the_drain_goes_and_the_daemon_closes():
    daemon = Daemon()
    # a parent gone at the first look: the drain begins right after READY
    serving = asyncio.create_task(
        serve_until_signalled(
            daemon, daemon.drain, 4242, current_parent=lambda: 1, pid_alive=lambda pid: False
        )
    )
    await daemon.draining.wait()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert daemon.drain_cancelled and daemon.closed == 1  # no drain left without an owner
    assert others() == set()


async def test_facts_that_cannot_be_announced_close_the_started_daemon(capsys):
    daemon = Daemon()

    async def start() -> dict:
        return {"node_id": daemon.node_id, "bad": object()}  # (a bug: not JSON)

    daemon.start = start  # type: ignore[method-assign]
    with pytest.raises(TypeError, match="not JSON serializable"):
        await serve_until_signalled(daemon, daemon.drain)
    assert daemon.closed == 1 and capsys.readouterr().out == ""
    assert others() == set()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


async def test_a_failure_while_setting_up_leaves_no_signal_handler_or_parent_watch():
    daemon, loop = Daemon(), asyncio.get_running_loop()
    try:
        with pytest.raises(TypeError):  # a fatal watch that is not awaitable
            await serve_until_signalled(
                daemon, daemon.drain, 4242, current_parent=lambda: 4242, fatal=lambda: None
            )
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert others() == set()  # the parent watch made before the failure is gone too
    finally:  # (so that a failure here leaves the next tests their handlers)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for task in others():
            task.cancel()


async def test_close_in_order_cancelled_closes_the_steps_it_did_not_run(caplog):
    entered = asyncio.Event()

    async def hangs() -> None:
        entered.set()
        await asyncio.Event().wait()

    async def later() -> None:
        raise AssertionError("never run")

    first, second, third = hangs(), later(), later()
    closing = asyncio.create_task(close_in_order([first, None, second, third], logging.getLogger()))
    await entered.wait()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    states = [inspect.getcoroutinestate(c) for c in (first, second, third)]
    assert states == [inspect.CORO_CLOSED] * 3  # none is left "never awaited"
    assert "error while closing" not in caplog.text


BROKEN_UVLOOP = {
    "import": "raise RuntimeError('uvloop built for another CPU')\n",
    "loop": "def new_event_loop():\n    raise OSError('uvloop cannot make a loop here')\n",
}

RUN_ON_THE_RUNNER = """
import asyncio
from meshinfer.runtime.loop import run_main

async def main():
    print(type(asyncio.get_running_loop()).__module__)
    return 0

raise SystemExit(run_main(main(), "INFO"))
"""


@pytest.mark.parametrize("fault", sorted(BROKEN_UVLOOP))
def test_a_broken_uvloop_is_a_warning_and_the_daemon_runs_on_asyncio(tmp_path, fault):
    (tmp_path / "uvloop").mkdir()
    (tmp_path / "uvloop" / "__init__.py").write_text(BROKEN_UVLOOP[fault])
    path = [str(tmp_path), *sys.path]
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RUN_ON_THE_RUNNER)],
        env={"PYTHONPATH": ":".join(p for p in path if p), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith("asyncio")
    assert "WARNING" in run.stderr and "running on asyncio's loop" in run.stderr
    assert "ERROR" not in run.stderr and "Traceback" not in run.stderr


async def test_closing_membership_whose_caller_is_cancelled_raises_the_cancellation(fleet):
    node = node_for(fleet)
    await node.start()
    try:
        assert node.membership is not None
        closing = asyncio.create_task(node.membership.aclose())
        await asyncio.sleep(0)  # it waits for the timer task to end
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
    finally:
        await node.aclose()


async def test_wait_joined_before_the_start_is_a_clear_error(fleet):
    node = node_for(fleet)
    with pytest.raises(RuntimeError, match="has not started its membership: await start"):
        await node.wait_joined()
    await node.aclose()


async def test_a_close_during_the_start_of_a_caller_that_swallowed_a_cancel_is_still_a_close(
    fleet,
):
    """The caller had been cancelled once and went on (cancelling() stays 1): a close that
    stops its start is still told apart from its own cancellation."""
    outbound = Outbound()
    node = node_for(fleet, outbound, host="0.0.0.0")

    async def starts_after_a_swallowed_cancel() -> None:
        asyncio.current_task().cancel()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            pass  # (no uncancel: as some libraries do)
        await node.start()

    start = asyncio.create_task(starts_after_a_swallowed_cancel())
    await asyncio.to_thread(outbound.asked.wait, 10)
    address = node.address
    await node.aclose()
    outbound.go.set()
    with pytest.raises(RuntimeError, match="closed during its start"):
        await start
    assert await refused(address)


async def test_a_start_under_a_timeout_that_fires_closes_the_node_and_raises_timeout(fleet):
    outbound, timeouts = Outbound(), []
    node = node_for(fleet, outbound, host="0.0.0.0")

    async def start_within() -> None:
        async with asyncio.timeout(None) as deadline:
            timeouts.append(deadline)
            await node.start()

    start = asyncio.create_task(start_within())
    await asyncio.to_thread(outbound.asked.wait, 10)
    address = node.address
    timeouts[0].reschedule(asyncio.get_running_loop().time())  # the deadline passes now
    with pytest.raises(TimeoutError):
        await start
    outbound.go.set()
    assert await refused(address) and node.membership is None


@pytest.mark.parametrize("under", ["", "sub"])
def test_a_data_dir_that_is_a_dangling_symlink_says_so(tmp_path, under):
    link = tmp_path / "data"
    link.symlink_to(tmp_path / "gone")
    path = link / under if under else link
    with pytest.raises(ConfigError, match=r"is a symbolic link to .*gone, which points nowhere"):
        DataDir(str(path), "[node] data_dir", "meshinfer-node-").make()


def test_a_data_dir_that_is_a_file_still_says_it_is_no_directory(tmp_path):
    (tmp_path / "data").write_text("x")
    with pytest.raises(ConfigError, match="data: exists and is not a directory"):
        DataDir(str(tmp_path / "data"), "[node] data_dir", "meshinfer-node-").make()
