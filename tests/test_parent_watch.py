"""``--exit-with-parent``: daemons whose launcher died outright stop by themselves.

A real launcher process starts a coordinator and a node daemon through ``LocalCluster`` (which
passes the flag), and the test SIGKILLs it: no ``finally`` of the launcher runs, so only the
daemons' own parent watch can stop them. Also the option as the command lines parse it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from coordinator import cli as coord_cli
from meshinfer.runtime.loop import watched_parent
from node import cli as node_cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

# The launcher: starts the daemons, prints their pids, then waits to be killed.
LAUNCHER = """
import sys
from pathlib import Path
from meshinfer.testing.cluster import LocalCluster

cluster = LocalCluster(Path(sys.argv[1]), fleet_id="orphans")
cluster.add_coordinator("coord")
cluster.add_node("veh-1")
coord, node = cluster.start_coordinator("coord"), cluster.start("veh-1")
print(coord.proc.pid, node.proc.pid, flush=True)
sys.stdin.read()
"""


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie not yet reaped by its new parent counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Poll until every pid has exited or ``timeout`` passed; the pids still running."""
    deadline = time.monotonic() + timeout
    while (running := [p for p in pids if not _gone(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running


def _launch(root: Path) -> tuple[subprocess.Popen[str], list[int]]:
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(root)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = launcher.stdout.readline()  # the daemons are READY (pytest-timeout bounds this)
    return launcher, [int(pid) for pid in line.split()]


def test_daemons_stop_gracefully_by_themselves_when_their_launcher_is_sigkilled(tmp_path):
    launcher, pids = _launch(tmp_path)
    try:
        assert len(pids) == 2, f"the launcher printed no pids (exit {launcher.poll()})"
        assert all(psutil.Process(pid).ppid() == launcher.pid for pid in pids)
        launcher.kill()  # SIGKILL: the launcher cleans nothing up
        launcher.wait(timeout=10)
        running = _wait_gone(pids, timeout=15)
        assert running == [], f"daemons {running} outlived their launcher"
    finally:
        launcher.kill()
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    for name in ("coord", "veh-1"):
        log = (tmp_path / f"{name}.log").read_text()
        assert f"parent process {launcher.pid} is gone" in log, log[-2000:]
        said = log[log.index("is gone") :]
        assert "stopping (parent gone)" in said, log[-2000:]
        assert said.rstrip().endswith("stopped cleanly"), log[-2000:]  # (no broken pipe after)
        assert "Traceback" not in log and " ERROR " not in log, log[-2000:]


@pytest.mark.parametrize("parser", [node_cli.build_parser, coord_cli.build_parser])
def test_the_option_watches_the_parent_at_start_or_the_pid_given(parser):
    command = "run" if parser is node_cli.build_parser else "serve"
    parse = parser().parse_args
    plain = parse([command, "--config", "x.toml"])
    bare = parse([command, "--exit-with-parent", "--config", "x.toml"])
    given = parse([command, "--config", "x.toml", "--exit-with-parent", "4242"])
    assert watched_parent(plain.exit_with_parent) is None
    assert watched_parent(bare.exit_with_parent) == os.getppid()
    assert watched_parent(given.exit_with_parent) == 4242


@pytest.mark.parametrize("value", ["0", "-3", "me"])
def test_a_pid_that_is_no_pid_is_refused(value, capsys):
    argv = ["run", "--config", "x.toml", "--exit-with-parent", value]
    assert node_cli.main(argv) == 2
    assert "expected a process id (a positive integer)" in capsys.readouterr().err
