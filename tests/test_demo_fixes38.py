"""``meshinfer demo`` and ``wire-demo`` (thirty-eighth session): the wire demo's wait for its node
process to listen has a limit and lets a stop signal in, the ensemble's wait watches the stop
flag, and the summary's node table says what each daemon's process really is."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

import meshinfer.demo as demo_module
import meshinfer.demo_wire as demo_wire
from meshinfer.demo import Demo, DemoOptions, Progress
from meshinfer.testing.cluster import DaemonProcess
from tests.test_demo_fixes35 import _Root


@pytest.fixture
def silent_node(tmp_path, monkeypatch):
    """The wire demo's node process replaced by one that never says LISTENING."""
    script = tmp_path / "silent-node"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))
    return tmp_path


def _children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()]


def _no_children_left(deadline_s: float = 10.0) -> list[psutil.Process]:
    deadline = time.monotonic() + deadline_s
    while (left := _children()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def test_a_node_process_that_never_listens_is_reported_killed_and_reaped(
    silent_node, monkeypatch
) -> None:
    # was: readline with no limit, on the event loop: the wire demo hung for good
    monkeypatch.setattr(demo_wire, "LISTEN_S", 0.3)
    with pytest.raises(demo_wire.WireDemoError, match=r"said nothing within 0\.3 s"):
        asyncio.run(demo_wire._start_node(silent_node / "rsu-1"))
    assert _no_children_left() == []


def test_a_stop_signal_while_the_node_process_starts_stops_it_and_the_demo(silent_node) -> None:
    # was: the event loop blocked in readline; the signal's handler ran only once it returned
    def terminate() -> None:
        deadline = time.monotonic() + 10
        while not _children() and time.monotonic() < deadline:
            time.sleep(0.01)
        if _children():  # (else the demo is not waiting for it: no signal to a bare pytest)
            os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=terminate)
    sender.start()
    try:
        status = asyncio.run(
            demo_wire._until_signalled(demo_wire._start_node(silent_node / "rsu-1"))
        )
    finally:
        sender.join()
    assert status == 128 + signal.SIGTERM
    assert _no_children_left() == []


class EnsembleCoordinator:
    """A coordinator whose ensemble task is still running when the demo is halted."""

    def __init__(self, demo: Demo) -> None:
        self.demo = demo
        self.waits: list[float | None] = []

    def submit(self, body: dict) -> dict:
        return {"task_id": "t-1"}

    def wait(self, task_id: str, timeout: float | None = 30.0, outputs: bool = True) -> dict:
        self.waits.append(timeout)
        self.demo.halted.set()  # (a signal whose Interrupted was lost: see StopSignals.check)
        return {"task_id": task_id, "state": "running"}


def test_the_ensembles_wait_gives_up_once_the_demo_is_halted(tmp_path) -> None:
    demo = Demo(DemoOptions(nodes=2, quiet=True), tmp_path)
    demo.client = client = EnsembleCoordinator(demo)
    doc, _ = demo.ensemble(np.zeros((4, 64), dtype=np.float32))
    # was one wait of 60 s: the demo, halted, went on for up to a minute
    assert client.waits == [demo_module.WAIT_SLICE_S]
    assert doc.get("state") != "succeeded"


class Stats:
    def stats(self) -> dict:
        done = {"rsu-1": 5, "veh-1": 3, "veh-2": 4}
        return {"completed_by_node": done, "retries": 1, "redispatched_after_death": 1,
                "duplicates": 0}  # fmt: skip


def _process(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", *argv], text=True)


def test_the_node_table_says_what_each_daemon_process_really_is(tmp_path, capsys) -> None:
    demo = Demo(DemoOptions(nodes=3, quiet=True), tmp_path)
    demo.client = Stats()
    running = _process("import time; time.sleep(30)")
    killed = _process("import time; time.sleep(30)")
    crashed = _process("raise SystemExit(3)")
    try:
        killed.kill()
        killed.wait(10)
        crashed.wait(10)
        for name, proc in (("rsu-1", running), ("veh-1", killed), ("veh-2", crashed)):
            demo.cluster.processes[name] = DaemonProcess(name, proc, {})
        demo.victim, demo.kill_report = "veh-1", {"node": "veh-1", "in_flight": 1}
        y = np.array([1, 2])
        ens = {"state": "succeeded", "result": {"labels": [1, 2]}}
        summary = demo_module._summary(demo, None, y, Progress(latencies=[0.01],
                                       labels={0: [1, 2]}), 1.0, ens, 0.1)  # fmt: skip
    finally:
        running.kill()
        running.wait(10)
    # was: every node but the killed one printed as alive, whatever its process had done
    assert summary["node_status"] == {
        "rsu-1": "alive", "veh-1": "killed", "veh-2": "exited (status 3)",
    }  # fmt: skip
    demo_module._print_summary(summary)
    table = capsys.readouterr().out.splitlines()
    assert table[-2].split() == ["veh-2", "4", "exited", "(status", "3)"]
    documented = demo_module.__doc__[demo_module.__doc__.index("``--json``") :]
    assert "``node_status``" in documented


def test_a_node_that_exited_by_itself_fails_the_demo(tmp_path, monkeypatch, capsys) -> None:
    summary = {
        "rows_classified": 10, "rows": 10, "tasks": 1, "accuracy": 1.0, "rows_per_s": 5.0,
        "latency": {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0}, "ensemble_state": "succeeded",
        "ensemble_accuracy": 1.0, "ensemble_s": 0.1, "killed": "veh-1", "retries": 0,
        "redispatched_after_death": 0, "duplicates_dropped": 0, "tasks_failed": [],
        "nodes": ["rsu-1", "veh-1"], "items_by_node": {"rsu-1": 10, "veh-1": 0},
        "kill_error": None, "node_status": {"rsu-1": "exited (status 1)", "veh-1": "killed"},
    }  # fmt: skip
    monkeypatch.setattr(demo_module, "_run", lambda *args: summary)
    roots = iter([tmp_path / "one", tmp_path / "two"])
    monkeypatch.setattr(demo_module, "_demo_root", lambda keep: _Root(next(roots)))
    assert demo_module.run_demo(DemoOptions(nodes=2)) == 1
    assert "some work failed" in capsys.readouterr().err
    summary["node_status"] = {"rsu-1": "alive", "veh-1": "killed"}
    assert demo_module.run_demo(DemoOptions(nodes=2)) == 0
