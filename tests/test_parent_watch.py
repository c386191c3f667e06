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
import warnings
from pathlib import Path

import psutil
import pytest

from coordinator import cli as coord_cli
from meshinfer.runtime.loop import watched_parent
from meshinfer.testing.cluster import LocalCluster
from node import cli as node_cli
from tests.helpers import kill_all

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


def test_daemons_stop_gracefully_by_themselves_when_their_launcher_is_sigkilled(tmp_path):
    daemons: list[psutil.Process] = []
    with subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as launcher:
        try:
            line = launcher.stdout.readline()  # the daemons are READY (pytest-timeout bounds it)
            # taken while the launcher (their parent) lives: these pids are not reused yet
            daemons = [psutil.Process(int(pid)) for pid in line.split()]
            assert len(daemons) == 2, f"the launcher printed no pids (exit {launcher.poll()})"
            assert all(daemon.ppid() == launcher.pid for daemon in daemons)
            launcher.kill()  # SIGKILL: the launcher cleans nothing up
            launcher.wait(timeout=10)
            _, running = psutil.wait_procs(daemons, timeout=15)
            assert running == [], f"daemons {running} outlived their launcher"
        finally:
            launcher.kill()
            kill_all(daemons)
    for name in ("coord", "veh-1"):
        log = (tmp_path / f"{name}.log").read_text()
        assert f"parent process {launcher.pid} is gone" in log, log[-2000:]
        said = log[log.index("is gone") :]
        assert "stopping (parent gone)" in said, log[-2000:]
        assert said.rstrip().endswith("stopped cleanly"), log[-2000:]  # (no broken pipe after)
        assert "Traceback" not in log and " ERROR " not in log, log[-2000:]


class StartInterrupted(Exception):
    pass


def stand_in_cluster(tmp_path, name: str) -> LocalCluster:
    """A cluster whose daemon ``name`` is a stand-in script (its config is never read)."""
    cluster = LocalCluster(tmp_path)
    cluster.configs[name] = tmp_path / f"{name}.toml"
    return cluster


# A daemon that never gets READY: it names itself, then has its start interrupted (SIGUSR1).
NEVER_READY = (
    "import os, signal, sys, time;"
    " print(os.getpid(), file=sys.stderr, flush=True);"
    " os.kill(os.getppid(), signal.SIGUSR1);"
    " time.sleep(60)"
)


def test_a_daemon_whose_start_is_interrupted_is_killed_and_reaped(tmp_path):
    cluster = stand_in_cluster(tmp_path, "stuck")

    def interrupt(signum: int, frame: object) -> None:
        raise StartInterrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with pytest.raises(StartInterrupted):
            cluster.start("stuck", command=(sys.executable, "-c", NEVER_READY), timeout=30)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    pid = int((tmp_path / "stuck.log").read_text().split()[0])
    assert not psutil.pid_exists(pid)  # not even a zombie: it was waited for


READY_THEN_WAIT = (
    "import json, time;"
    " print('READY', json.dumps({'node_id': 'quick'}), flush=True);"
    " time.sleep(60)"
)


def test_starting_a_daemon_leaves_its_log_open_in_the_daemon_only(tmp_path):
    """The parent closes its copy of the log file at once (no unclosed-file warning)."""
    cluster = stand_in_cluster(tmp_path, "quick")
    log = str(tmp_path / "quick.log")
    with cluster, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        daemon = cluster.start("quick", command=(sys.executable, "-c", READY_THEN_WAIT))
        # (only warnings about this log: the collector may finalise another test's leak here)
        assert not [w for w in caught if log in str(w.message)]
        assert log in {f.path for f in psutil.Process(daemon.proc.pid).open_files()}
        assert log not in {f.path for f in psutil.Process().open_files()}


def test_a_daemons_stdout_pipe_is_closed_once_it_has_exited(tmp_path):
    """The reader closes its end of the pipe at EOF, so nothing is left to the collector
    (which would warn about it during some later test)."""
    cluster = stand_in_cluster(tmp_path, "quick")
    with cluster:
        daemon = cluster.start("quick", command=(sys.executable, "-c", READY_THEN_WAIT))
        assert not daemon.proc.stdout.closed
        cluster.kill("quick")  # (joins the reader)
        assert daemon.proc.stdout.closed
        assert daemon.lines[0].startswith("READY ")


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
