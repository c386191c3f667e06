"""Hunt in the researcher's simulation CLI and the demos: runs too large to finish, a demo that
cannot start (port taken, no temporary directory), two demos at once, and the wire demo stopped
by a signal or killed outright (its node process must not be left behind)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

import meshinfer.demo as demo_module
import meshinfer.testing.cluster as cluster_module
from meshinfer.demo import Demo, DemoOptions, run_demo
from meshinfer.demo_wire import run_demo as run_wire_demo
from meshinfer.errors import ConfigError
from simulations import cli as sim_cli
from simulations.membership import MAX_NODE_SECONDS, MembershipScenario

ROOT = Path(__file__).resolve().parents[1]


# --- meshinfer-sim: the size of one run ---------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("--nodes", "2000", "--duration", "86400"),  # one simulated day of the largest fleet
        ("--nodes", "200", "--joins", "500", "--duration", "20000"),
    ],
)
def test_sim_refuses_a_run_over_the_size_cap_before_running_it(monkeypatch, capsys, args):
    """Each argument alone is in range, but together they make a run of many CPU hours: it is
    refused at once, in one line naming the arguments and the cap, instead of running."""

    def ran(scenario):
        raise AssertionError(f"a run of {scenario} was started")

    monkeypatch.setattr(sim_cli, "run_membership", ran)
    assert sim_cli.main(["membership", *args]) == 2
    out = capsys.readouterr()
    (line,) = out.err.strip().splitlines()
    assert line.startswith("meshinfer-sim: error: arguments --nodes, --joins, --duration:")
    assert f"over the cap of {MAX_NODE_SECONDS:,}" in line
    assert out.out == ""


def test_sim_scenario_caps_its_size_and_the_help_documents_the_cap(capsys):
    with pytest.raises(ConfigError, match="scenario size must be at most 5,000,000"):
        MembershipScenario(nodes=2000, duration=86_400.0)
    MembershipScenario(nodes=50, duration=86_400.0)  # one day of a small fleet: 4.3 million
    assert sim_cli.main(["membership", "--help"]) == 0
    assert "at most 5,000,000 node-seconds" in " ".join(capsys.readouterr().out.split())


# --- meshinfer demo ------------------------------------------------------------------------------


def test_two_demos_started_in_the_same_second_get_fleets_of_their_own(monkeypatch, tmp_path):
    """Their nodes have the same names; with one fleet id they would share mDNS names too and
    dial each other's nodes (handshakes refused, items retried)."""
    monkeypatch.setattr(demo_module.time, "time", lambda: 1_800_000_000.0)
    first = Demo(DemoOptions(), tmp_path / "first")
    second = Demo(DemoOptions(), tmp_path / "second")
    assert first.cluster.fleet_id != second.cluster.fleet_id
    assert first.cluster.fleet_id.startswith("demo-1800000000")


def _daemons_under(root: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(str(root) in part for part in cmdline) and "--exit-with-parent" in cmdline:
            found.append(proc)
    return found


def test_a_daemon_that_cannot_start_is_reported_without_a_traceback(monkeypatch, capsys, tmp_path):
    """The coordinator exits at once, as it does when mDNS port 5353 is taken: one message with
    its log's tail, exit 1, and the nodes that did start are stopped."""
    refuses = "import sys; sys.exit('meshinfer-coord: error: [Errno 98] Address already in use')"

    def start_coordinator(self, node_id="coord", timeout=30.0):
        return self.start(node_id, command=(sys.executable, "-c", refuses, "--config"))

    monkeypatch.setattr(cluster_module.LocalCluster, "start_coordinator", start_coordinator)
    keep = tmp_path / "fleet"
    assert run_demo(DemoOptions(nodes=2, keep=keep, quiet=True)) == 1
    err = capsys.readouterr().err
    assert err.startswith("meshinfer demo: coord did not become ready; log tail:")
    assert "Address already in use" in err and "Traceback" not in err
    assert _daemons_under(keep) == []


def _can_unshare_the_network() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare_the_network(), reason="needs root and unshare -n")
def test_the_demo_with_the_mdns_port_taken_says_so_in_a_network_of_its_own(tmp_path):
    """The real case, in a network namespace of its own (the port is taken there only)."""
    script = tmp_path / "taken.py"
    script.write_text(
        "import socket, subprocess, sys\n"
        "taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "taken.bind(('0.0.0.0', 5353))\n"
        "demo = [sys.executable, '-m', 'meshinfer.cli', 'demo', '--nodes', '2', '--quiet']\n"
        "sys.exit(subprocess.run(demo).returncode)\n"
    )
    command = f"ip link set lo up && exec {sys.executable} {script}"
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.startswith("meshinfer demo: coord did not become ready")
    assert "Address already in use" in done.stderr and "Traceback" not in done.stderr


def test_a_demo_without_a_temporary_directory_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing" / "tmp"))
    assert run_demo(DemoOptions(quiet=True)) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("meshinfer demo: cannot make a temporary directory")
    assert "--keep" in line


def test_ctrl_c_before_the_demo_took_over_its_signals_exits_130_without_a_traceback():
    """A Ctrl-C while the demo still imports (its first fraction of a second)."""
    script = (
        "import meshinfer.inference.registry as registry\n"
        "def interrupted(): raise KeyboardInterrupt\n"
        "registry.load_digits_holdout = interrupted\n"
        "from meshinfer.cli import main\n"
        "raise SystemExit(main(['demo', '--quiet']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert done.stderr == "meshinfer demo: interrupted\n"


# --- meshinfer wire-demo -------------------------------------------------------------------------


def test_a_wire_demo_without_a_temporary_directory_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing" / "tmp"))
    assert run_wire_demo(messages=1, quiet=True) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("meshinfer wire-demo: ") and "No such file or directory" in line


def _wire_demo_in_session(tmp_path: Path) -> tuple[subprocess.Popen[str], psutil.Process]:
    """A long wire demo, once its first session is up: (the demo, its node process)."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "meshinfer.cli", "wire-demo", "--messages", "100000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr").open("w"),
        text=True,
        cwd=ROOT,
    )
    assert demo.stdout is not None
    for line in demo.stdout:
        if "XX session with rsu-1" in line:
            break
    else:
        raise AssertionError(f"no session: {(tmp_path / 'stderr').read_text()[-2000:]}")
    (node,) = [
        child
        for child in psutil.Process(demo.pid).children()
        if "serve" in child.cmdline() and "meshinfer.demo_wire" in child.cmdline()
    ]
    return demo, node


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_wire_demo_and_its_node_process_first(tmp_path, signum):
    demo, node = _wire_demo_in_session(tmp_path)
    try:
        demo.send_signal(signum)
        demo.communicate(timeout=60)  # (reads what it prints meanwhile)
        assert not node.is_running(), "the node process outlived the demo"
        assert demo.returncode == 128 + signum
        name = signal.Signals(signum).name
        assert (tmp_path / "stderr").read_text().splitlines()[-1] == (
            f"meshinfer wire-demo: stopped by {name}; its node process was stopped"
        )
    finally:
        if demo.poll() is None:
            demo.kill()
        if node.is_running():
            node.kill()


def test_a_wire_demo_killed_outright_leaves_no_node_process_behind(tmp_path):
    demo, node = _wire_demo_in_session(tmp_path)
    try:
        demo.kill()
        demo.communicate(timeout=60)
        node.wait(timeout=30)  # it stops by itself: its standard input, from the demo, closed
    finally:
        if node.is_running():
            node.kill()
