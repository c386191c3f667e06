"""``meshinfer demo | head``: a reader that stops reading ends the demos quietly, with the code a
shell shows for a process SIGPIPE killed, after they stopped what they started; the node table's
total; and ``meshinfer-sim`` saying how far a run came when Ctrl-C stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from meshinfer.demo import _print_summary
from meshinfer.fleetcli import EXIT_CLOSED_PIPE
from tests.helpers import kill_all, still_running


def _closed_after(argv: list[str], lines: int) -> tuple[int, str, list[psutil.Process]]:
    """Run ``meshinfer ARGV``, read ``lines`` lines of its stdout, close it (as ``head`` does);
    (exit code, stderr, the processes it had started by then)."""
    command = subprocess.Popen(
        [sys.executable, "-m", "meshinfer.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children: list[psutil.Process] = []
    try:
        for _ in range(lines):
            assert command.stdout.readline(), "the command ended before it printed its lines"
        children = psutil.Process(command.pid).children(recursive=True)
        command.stdout.close()
        _, err = command.communicate(timeout=90)
    finally:
        command.kill()
    return command.returncode, err, children


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "lines"),
    [
        (["demo", "--nodes", "2", "--in-flight", "1"], 2),  # daemons up, the stream to come
        (["wire-demo"], 2),  # its node process is listening
    ],
)
def test_a_demo_whose_reader_went_away_stops_what_it_started_and_ends_quietly(argv, lines):
    code, err, children = _closed_after(argv, lines)
    try:
        running = [child.pid for child in still_running(children)]
    finally:
        kill_all(children)
    # was exit 1 and "meshinfer demo: [Errno 32] Broken pipe" on stderr
    assert (code, err) == (EXIT_CLOSED_PIPE, "")
    assert children, "the demo had started no process yet: nothing was checked"
    assert running == [], f"processes {running} outlived the demo"


def test_version_into_a_closed_pipe_ends_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `meshinfer version | head -0`
    try:
        done = subprocess.run(
            [sys.executable, "-m", "meshinfer.cli", "version"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (EXIT_CLOSED_PIPE, "")  # was a traceback


def test_the_node_table_of_the_summary_ends_with_the_total(capsys):
    summary = {
        "latency": {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0},
        "rows_classified": 10, "rows": 10, "tasks": 2, "accuracy": 1.0, "rows_per_s": 5.0,
        "ensemble_state": "succeeded", "ensemble_accuracy": 1.0, "ensemble_s": 0.01,
        "killed": "veh-1", "retries": 1, "redispatched_after_death": 1, "duplicates_dropped": 0,
        "tasks_failed": [], "nodes": ["rsu-1", "veh-1", "veh-2"],
        "items_by_node": {"rsu-1": 4, "veh-1": 2, "veh-2": 5, "gone-node": 7}, "kill_error": None,
        "node_status": {"rsu-1": "alive", "veh-1": "killed", "veh-2": "alive"},
    }  # fmt: skip
    _print_summary(summary)
    table = capsys.readouterr().out.splitlines()
    assert table[-4:-1] == [
        "  rsu-1                4  alive",
        "  veh-1                2  killed",
        "  veh-2                5  alive",
    ]
    assert table[-1].split() == ["total", "11"]  # the demo's nodes (not a node of another run)


# --- meshinfer-sim: Ctrl-C says how far the run came -------------------------------------------


def test_ctrl_c_during_a_simulation_says_how_far_it_came(monkeypatch, capsys):
    from simulations.cli import main as sim_main
    from simulations.membership import MembershipRun

    join = MembershipRun.join

    def join_then_ctrl_c(self, index):
        if index == 1:
            raise KeyboardInterrupt
        return join(self, index)

    monkeypatch.setattr(MembershipRun, "join", join_then_ctrl_c)
    argv = ["membership", "--nodes", "5", "--joins", "3", "--duration", "1", "--preset", "test"]
    assert sim_main(argv) == 130
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("meshinfer-sim membership: interrupted in the join 2 of 3 phase, ")
    simulated = float(err.split("phase, ")[1].split()[0])
    assert simulated >= 2.0  # the settle and the first join were played (was: exit 130, silent)


@pytest.mark.slow
def test_sigint_to_a_running_simulation_process_reports_the_phase():
    argv = ["membership", "--nodes", "300", "--duration", "3000", "--preset", "test"]
    sim = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        process = psutil.Process(sim.pid)
        while sim.poll() is None and sum(process.cpu_times()[:2]) < 3.0:  # past its imports
            psutil.wait_procs([process], timeout=0.2)
        sim.send_signal(signal.SIGINT)
        out, err = sim.communicate(timeout=60)
    finally:
        sim.kill()
    assert sim.returncode == 130, err[-2000:]
    assert out == ""
    assert "meshinfer-sim membership: interrupted in the " in err
    assert "Traceback" not in err
