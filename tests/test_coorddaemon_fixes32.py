"""A failed sync of the coordinator's journal is fatal to its daemon (session 32).

Since a failed ``fdatasync`` fails every later sync of the journal (``test_journal_fixes32``),
a coordinator that goes on running acknowledges nothing and retries its writes for ever, and
no supervisor restarts it. Now the coordinator says so once (CRITICAL, naming the journal and
that a restart recovers), refuses further writes (:meth:`Coordinator.failed`), and the daemon
stops as on SIGTERM and exits 1 (``serve_until_signalled``'s ``fatal``).

Layers: ``serve_until_signalled`` with the stand-in daemons of ``test_runtime_loop``; a real
:class:`CoordinatorDaemon` in this process (real SQLite, TCP on loopback) whose ``fdatasync``
fails once armed; a real ``meshinfer-coord serve`` subprocess, started through a test-only
wrapper (``python -c``) that fails its ``fdatasync`` once a file exists.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator import config as coord_config
from coordinator.client import ApiError, CoordinatorClient, tensor_json
from coordinator.daemon import CoordinatorDaemon
from coordinator.journal import Journal, UnknownTaskError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime.loop import serve_until_signalled
from tests.helpers import until
from tests.test_coordinator_cli import serve_config
from tests.test_runtime_loop import Hanging, Started

REPO = Path(__file__).resolve().parents[1]
ROW = np.zeros((1, 64), np.float32)
ROWS = Tensor.from_array(ROW)


def single(task_id: str) -> TaskSpec:
    return TaskSpec(task_id, Pattern.SINGLE, ROWS, (ModelRef("digits-mlp", "1"),))


class Fatal:
    """A daemon's ``fatal``: returns its reason once :meth:`fire` was called."""

    def __init__(self) -> None:
        self.fired = asyncio.Event()
        self.awaited = 0
        self.cancelled = False

    def fire(self) -> None:
        self.fired.set()

    async def __call__(self) -> str:
        self.awaited += 1
        try:
            await self.fired.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return "the journal failed to sync (test)"


# --- serve_until_signalled's fatal ----------------------------------------------------------


async def test_a_fatal_fault_after_ready_drains_the_daemon_and_exits_1(capsys, caplog):
    daemon, fatal = Started(), Fatal()
    caplog.set_level(logging.INFO, logger="meshinfer.runtime.loop")
    serving = asyncio.create_task(serve_until_signalled(daemon, daemon.drain, fatal=fatal))
    await daemon.started.wait()
    await until(lambda: "READY" in capsys.readouterr().out)
    fatal.fire()
    assert await asyncio.wait_for(serving, timeout=5) == 1
    assert daemon.drained and daemon.closed == 1 and fatal.awaited == 1
    assert capsys.readouterr().out.splitlines() == ["STOPPED stand-in"]
    assert "stopping (fatal: the journal failed to sync (test))" in caplog.text
    assert "stopped cleanly" not in caplog.text


async def test_a_fatal_fault_during_the_start_cancels_it_and_exits_1(capsys, caplog):
    daemon, fatal = Hanging(), Fatal()
    caplog.set_level(logging.INFO, logger="meshinfer.runtime.loop")
    serving = asyncio.create_task(serve_until_signalled(daemon, daemon.drain, fatal=fatal))
    await daemon.started.wait()
    fatal.fire()
    assert await asyncio.wait_for(serving, timeout=5) == 1
    assert daemon.start_cancelled and daemon.closed == 1 and not daemon.drained
    assert capsys.readouterr().out.splitlines() == ["STOPPED stand-in"]
    assert "stopping during the start-up (fatal: the journal failed" in caplog.text


async def test_a_fatal_fault_during_a_drain_leaves_it_to_end_and_exits_1(capsys, caplog):
    """The parent is gone at once (a drain begins); the fault comes while it drains: the drain
    is not cut short (only a signal does that), and the exit code says the fault."""
    daemon, fatal, release = Started(), Fatal(), asyncio.Event()

    async def slow_drain() -> None:
        fatal.fire()
        await release.wait()
        await daemon.drain()

    caplog.set_level(logging.INFO, logger="meshinfer.runtime.loop")
    serving = asyncio.create_task(
        serve_until_signalled(
            daemon, slow_drain, 4242, current_parent=lambda: 1, pid_alive=lambda pid: False,
            fatal=fatal,
        )
    )  # fmt: skip
    await until(lambda: fatal.fired.is_set())
    await asyncio.sleep(0)  # (the fatal watch ends here; the drain goes on)
    assert not serving.done()
    release.set()
    assert await asyncio.wait_for(serving, timeout=5) == 1
    assert daemon.drained and daemon.closed == 1
    assert "closing at once" not in caplog.text and "stopped cleanly" not in caplog.text
    assert capsys.readouterr().out.splitlines()[-1] == "STOPPED stand-in"


async def test_a_fatal_that_never_comes_is_cancelled_at_a_clean_stop(capsys):
    daemon, fatal = Started(), Fatal()
    code = await asyncio.wait_for(
        serve_until_signalled(
            daemon, daemon.drain, 4242, current_parent=lambda: 1, pid_alive=lambda pid: False,
            fatal=fatal,
        ),
        timeout=5,
    )  # fmt: skip
    assert code == 0 and daemon.drained and fatal.cancelled


# --- the coordinator daemon in this process -------------------------------------------------


@pytest.fixture
def eio_once_armed(monkeypatch):
    """``os.fdatasync`` fails once with EIO once ``armed`` holds something, then succeeds
    again (as Linux reports a writeback error once); the list counts the failures."""
    armed: list[str] = []
    failures: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if armed and not failures:
            failures.append(fd)
            raise OSError(5, "Input/output error (injected)")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return armed, failures


async def test_a_failed_journal_sync_is_fatal_and_refuses_later_writes(
    tmp_path, eio_once_armed, caplog
):
    armed, failures = eio_once_armed
    data = tmp_path / "data"
    daemon = CoordinatorDaemon(coord_config.load_config(serve_config(tmp_path, data)))
    fatal = asyncio.create_task(daemon.fatal())
    try:
        await daemon.start()
        c = daemon.coordinator
        assert await c.submit(single("before")) == "before"
        assert not fatal.done() and c.failure is None
        armed.append("on")
        with pytest.raises(OSError, match="injected"):  # committed, not known to be durable
            await c.submit(single("a"))
        assert failures
        why = await asyncio.wait_for(fatal, timeout=5)
        assert str(daemon.journal_path) in why and "injected" in why
        assert c.failure is not None and c.failure.errno == 5
        with pytest.raises(OSError, match="acknowledges nothing more") as refused:
            await c.submit(single("b"))  # refused before it is written
        assert refused.value.errno == 5
        with pytest.raises(OSError, match="acknowledges nothing more"):
            await c.cancel("before")
        critical = [r for r in caplog.records if r.levelno >= logging.CRITICAL]
        assert len(critical) == 1, [r.getMessage() for r in critical]
        line = critical[0].getMessage()
        assert str(daemon.journal_path) in line and "injected" in line and "restart" in line
    finally:
        fatal.cancel()
        await asyncio.gather(fatal, return_exceptions=True)
        await daemon.stop()
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]  # (the close: none)
    with Journal(daemon.journal_path) as journal:  # as a restart finds it
        assert journal.get("before") and journal.get("a")  # (committed, its sync failed)
        with pytest.raises(UnknownTaskError):
            journal.get("b")


# --- meshinfer-coord serve, as a supervisor meets it ----------------------------------------

#: ``meshinfer-coord serve`` whose ``os.fdatasync`` fails (EIO) once the file named by
#: ``MI_TEST_EIO_ONCE`` exists: a test-only wrapper, nothing in the code under test.
WRAPPER = """
import os, sys
trigger, real, failed = os.environ["MI_TEST_EIO_ONCE"], os.fdatasync, []
def fdatasync(fd):
    if not failed and os.path.exists(trigger):
        failed.append(fd)
        raise OSError(5, "Input/output error (injected)")
    real(fd)
os.fdatasync = fdatasync
from coordinator.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_exits_1_once_its_journal_failed_to_sync(tmp_path):
    data, trigger = tmp_path / "data", tmp_path / "eio"
    config = serve_config(tmp_path, data)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MI_TEST_EIO_ONCE": str(trigger)}
    command = [sys.executable, "-c", WRAPPER, "serve", "--config", str(config)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        ready = proc.stdout.readline()
        assert ready.startswith("READY "), ready + proc.stderr.read()
        facts = json.loads(ready[len("READY ") :])
        token = Path(facts["token_file"]).read_text().strip()
        client = CoordinatorClient(facts["api"], token, timeout=10)
        trigger.touch()
        doc = {"pattern": "single", "model": "digits-mlp@1", "inputs": tensor_json(ROW)}
        with pytest.raises(ApiError):  # never acknowledged
            client.submit(doc)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert out.splitlines() == ["STOPPED coord"], out
    critical = [line for line in err.splitlines() if " CRITICAL " in line]
    assert len(critical) == 1, err
    assert str(data / "journal.db") in critical[0] and "restart" in critical[0]
    assert "never retrieved" not in err, err


async def test_a_submit_failed_by_the_fatal_sync_is_answered_503_shutting_down(
    tmp_path, eio_once_armed
):
    armed, _ = eio_once_armed
    daemon = CoordinatorDaemon(coord_config.load_config(serve_config(tmp_path, tmp_path / "d")))
    try:
        facts = await daemon.start()
        client = CoordinatorClient(facts["api"], daemon.token, timeout=10)
        armed.append("on")
        doc = {"pattern": "single", "model": "digits-mlp@1", "inputs": tensor_json(ROW)}
        with pytest.raises(ApiError) as refused:
            await asyncio.to_thread(client.submit, doc)
        assert (refused.value.status, refused.value.code) == (503, "shutting_down")
    finally:
        await daemon.stop()
