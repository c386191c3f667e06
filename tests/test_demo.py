"""The README's first command: ``meshinfer demo`` (and the wire-level ``meshinfer wire-demo``),
and how a signal stops it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref

import psutil
import pytest

import meshinfer.demo as demo_module
import meshinfer.testing.cluster as cluster_module
from coordinator.client import ApiError
from meshinfer.cli import main
from meshinfer.demo import Demo, DemoOptions, Interrupted, Progress, StopSignals, run_demo
from meshinfer.errors import IdentityError
from meshinfer.testing.cluster import DaemonProcess
from tests.helpers import kill_all, still_running

pytestmark = pytest.mark.slow


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshinfer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_classifies_the_holdout_across_processes_and_survives_a_kill():
    done = _run("demo", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rows_classified"] == summary["rows"] > 300
    assert summary["accuracy"] > 0.9
    assert summary["ensemble_state"] == "succeeded"
    assert summary["ensemble_accuracy"] > 0.9
    assert summary["tasks_failed"] == []
    assert summary["killed"] in summary["nodes"]
    survivors = [n for n in summary["nodes"] if n != summary["killed"]]
    assert all(summary["items_by_node"].get(n, 0) > 0 for n in survivors)
    # (what was in flight on the killed node ran again elsewhere: every task succeeded above;
    # the re-dispatch itself is asserted in test_coordinator_failover.py)
    assert summary["redispatched_after_death"] <= summary["retries"]
    if summary["killed_in_flight"]:  # moved for the node's death (not dropped unsent, refused)
        assert summary["killed_items_moved"] > 0
    assert summary["latency"]["p50_ms"] <= summary["latency"]["p99_ms"]


def test_a_sigterm_stops_the_demo_and_every_daemon_it_started_before_it_exits():
    # --in-flight 1: the slowest stream, so that the signal lands while it runs
    argv = ["demo", "--nodes", "2", "--no-kill", "--in-flight", "1"]
    demo = subprocess.Popen(
        [sys.executable, "-m", "meshinfer.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    daemons: list[psutil.Process] = []
    try:
        for line in demo.stdout:
            if "node processes (pids:" in line:  # every daemon is READY
                break
        daemons = psutil.Process(demo.pid).children(recursive=True)
        commands = sorted(d.cmdline()[2:4] + d.cmdline()[-2:] for d in daemons)
        demo.send_signal(signal.SIGTERM)
        out, err = demo.communicate(timeout=60)
        # gone when the demo exits: it stopped them (their own parent watch would be later)
        running = [d.pid for d in still_running(daemons)]
    finally:
        demo.kill()
        kill_all(daemons)
    watching = ["--exit-with-parent", str(demo.pid)]
    assert commands == [
        ["coordinator.cli", "serve", *watching],
        ["node.cli", "run", *watching],
        ["node.cli", "run", *watching],
    ]
    assert running == [], f"daemons {running} outlived the demo"
    assert demo.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "meshinfer demo: stopped by SIGTERM; its daemons were stopped" in err
    assert "Traceback" not in err and "summary" not in out


def test_the_first_stop_signal_raises_in_the_main_thread_and_a_second_forces_the_stop():
    assert threading.current_thread() is threading.main_thread()  # else no handler is set
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        with pytest.raises(Interrupted, match="SIGTERM"):
            signal.raise_signal(signal.SIGTERM)
        assert not signals.forced.is_set()
        signal.raise_signal(signal.SIGHUP)  # a second signal: recorded as forcing, not raised
        signal.raise_signal(signal.SIGINT)  # a later one: ignored
        assert signals.received == signal.SIGTERM and signals.stopping.is_set()
        assert signals.forced.is_set()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_landing_where_python_cannot_raise_is_raised_at_the_next_check(monkeypatch):
    class Referent:
        pass

    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    with StopSignals() as signals:
        referent = Referent()
        _ = weakref.ref(referent, lambda _: signal.raise_signal(signal.SIGHUP))
        del referent  # the handler runs in the weakref callback: its exception is dropped there
        assert signals.received == signal.SIGHUP and signals.stopping.is_set()
        with pytest.raises(Interrupted, match="SIGHUP"):
            signals.check()
        signals.hold()
        signals.check()  # held: the cleanup is under way
    assert ignored == []  # not printed as "Exception ignored"
    assert sys.unraisablehook == ignored.append


class FakeDaemon:
    """A daemon of :class:`FakeCluster`: it only records the signals it is sent."""

    def __init__(self, name: str, stubborn: bool = False) -> None:
        self.name = name
        self.signals: list[int] = []
        self.proc = self
        self.stubborn = stubborn  # does not exit on SIGTERM

    def wait(self, timeout: float | None = None) -> int:
        if self.stubborn and signal.SIGKILL not in self.signals:
            raise subprocess.TimeoutExpired("fake daemon", timeout)
        return 0

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def kill(self) -> None:
        self.signals.append(signal.SIGKILL)

    def alive(self) -> bool:
        return signal.SIGKILL not in self.signals


class FakeCluster:
    """What the demo asks of LocalCluster, with no processes."""

    def __init__(self, names: list[str]) -> None:
        self.processes = {name: FakeDaemon(name) for name in ["coord", *names]}

    def kill(self, name: str, sig: int) -> None:
        self.processes[name].send_signal(sig)

    def wait_for(self, predicate, timeout: float = 30.0, step: float = 0.1) -> None:
        assert predicate(), "the fake mesh is ready at once"

    def close(self) -> None:
        pass


class StallingCoordinator:
    """A coordinator client: veh-1 has work in flight. Its ``stall_at``-th ``nodes()`` stalls
    until the demo is halted, then fails as a coordinator being stopped would (``fail``) or
    answers."""

    def __init__(self, halted: threading.Event, stall_at: int = 0, fail: bool = False) -> None:
        self.halted, self.stall_at, self.fail = halted, stall_at, fail
        self.looks = 0
        self.stalled = threading.Event()

    def nodes(self) -> dict:
        self.looks += 1
        if self.looks == self.stall_at:
            self.stalled.set()
            assert self.halted.wait(10), "the demo was not halted"
            if self.fail:
                raise ApiError(None, "unreachable", "cannot reach the coordinator")
        return {"nodes": [
            {"node_id": "rsu-1", "status": "alive", "in_flight": 0, "models": [1, 2, 3]},
            {"node_id": "veh-1", "status": "alive", "in_flight": 2, "models": [1, 2, 3]},
            {"node_id": "veh-2", "status": "alive", "in_flight": 0, "models": [1, 2, 3]},
        ]}  # fmt: skip

    def stats(self) -> dict:
        return {"redispatched_after_death": 0}


def _fake_demo(tmp_path, stall_at: int = 0, fail: bool = False) -> Demo:
    demo = Demo(DemoOptions(nodes=3, quiet=True), tmp_path)
    demo.cluster = FakeCluster(demo.names)
    demo.client = StallingCoordinator(demo.halted, stall_at, fail)
    return demo


@pytest.mark.parametrize(
    ("stall_at", "fail", "victim_signals"),
    [
        # stopped while the killer looks for a victim: it freezes none after that
        (1, False, [signal.SIGTERM, signal.SIGCONT]),
        # stopped while the victim is frozen, and the coordinator gone: it lets it go on first
        (2, True, [signal.SIGSTOP, signal.SIGCONT, signal.SIGTERM, signal.SIGCONT]),
    ],
)
def test_stopping_the_demo_waits_for_the_node_killer_and_leaves_no_node_frozen(
    tmp_path, stall_at, fail, victim_signals
):
    demo = _fake_demo(tmp_path, stall_at, fail)
    demo.start_killer(Progress(), total=0)  # (half of nothing is done: it goes at once)
    assert demo.client.stalled.wait(10)
    demo.stop()  # halts the demo: the stalled look returns
    assert not demo.killer.is_alive()
    processes = demo.cluster.processes
    assert processes["veh-1"].signals == victim_signals
    assert (
        processes["veh-2"].signals
        == processes["coord"].signals
        == [
            signal.SIGTERM,
            signal.SIGCONT,
        ]
    )


def test_a_forced_stop_kills_every_daemon_without_a_sigterm(tmp_path, capsys):
    demo = _fake_demo(tmp_path)
    demo.forced.set()
    demo.stop()
    assert all(d.signals == [signal.SIGKILL] for d in demo.cluster.processes.values())
    assert "second stop signal: killing the daemons (SIGKILL)" in capsys.readouterr().err
    assert demo.killed == ["coord", *demo.names]


def test_the_demo_gives_its_daemons_the_time_their_drain_may_take():
    from node.daemon import STOP_S

    assert demo_module.DRAIN_S >= STOP_S + 5  # (closing the rest after the drain and leave)


def test_a_daemon_still_running_after_the_drain_time_is_killed_and_named(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(demo_module, "DRAIN_S", 0.2)
    demo = _fake_demo(tmp_path)
    demo.cluster.processes["veh-2"] = FakeDaemon("veh-2", stubborn=True)
    demo.stop()
    assert demo.cluster.processes["veh-2"].signals == [
        signal.SIGTERM,
        signal.SIGCONT,
        signal.SIGKILL,
    ]
    assert demo.cluster.processes["coord"].signals == [signal.SIGTERM, signal.SIGCONT]
    assert demo.killed == ["veh-2"]
    err = capsys.readouterr().err
    assert "veh-2 still running after 0.2 s: killing the daemons (SIGKILL)" in err


def test_a_stop_forced_before_the_daemons_were_told_to_stop_does_not_say_it_stops_them(
    tmp_path, monkeypatch, capsys
):
    demo = _fake_demo(tmp_path)
    demo.options.quiet = False

    def start() -> None:  # a second signal came while the demo started
        demo.forced.set()
        raise Interrupted("SIGINT")

    monkeypatch.setattr(demo, "start", start)
    with pytest.raises(Interrupted):
        demo_module._run(demo, None, None, StopSignals())
    out, err = capsys.readouterr()
    assert "stopping the daemons (SIGTERM)" not in out
    assert "second stop signal: killing the daemons (SIGKILL)" in err


STUBBORN_DAEMON = """\
import signal, time
signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM", flush=True))  # and goes on
print("up", flush=True)
time.sleep(120)
"""
"""A daemon that does not stop on SIGTERM (as one draining slowly), and says it got one."""


def test_a_second_stop_signal_kills_the_daemons_at_once_and_exits_as_stopped(monkeypatch, capsys):
    stubborn: list[subprocess.Popen[str]] = []
    heard: list[str] = []
    second_at: list[float] = []

    def interrupt_again() -> None:  # once the demo has sent every daemon SIGTERM: Ctrl-C again
        heard.extend(proc.stdout.readline() for proc in stubborn)
        if heard == ["SIGTERM\n"] * len(stubborn):  # (else the demo may be gone: no SIGINT)
            second_at.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

    second = threading.Thread(target=interrupt_again)

    def start(demo: Demo) -> None:  # (in place of Demo.start) the daemons are up; Ctrl-C
        for name in ["coord", *demo.names]:
            proc = subprocess.Popen(
                [sys.executable, "-c", STUBBORN_DAEMON],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            stubborn.append(proc)
            demo.cluster.processes[name] = DaemonProcess(name, proc, {})
            assert proc.stdout.readline() == "up\n"  # its SIGTERM handler is set
        second.start()
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Demo, "start", start)
    try:
        status = run_demo(DemoOptions(nodes=2, quiet=True))
        stopped_in = time.monotonic() - second_at[0] if second_at else None
        codes = [proc.returncode for proc in stubborn]  # (set once the demo reaped them)
        second.join(10)
    finally:
        for proc in stubborn:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    assert heard == ["SIGTERM\n"] * 3 and not second.is_alive()
    # killed, not waited for: they would be given DRAIN_S (20 s) to drain (and never would)
    assert stopped_in is not None and stopped_in < 10
    assert codes == [-signal.SIGKILL] * 3
    assert status == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "meshinfer demo: second stop signal: killing the daemons (SIGKILL)" in err
    assert "meshinfer demo: stopped by SIGINT; its daemons were killed" in err


def test_a_halted_demo_does_not_claim_the_nodes_are_up(tmp_path, capsys):
    demo = _fake_demo(tmp_path)
    demo.options.quiet = False
    demo.halted.set()
    demo.wait_for_nodes()
    assert "nodes alive" not in capsys.readouterr().out
    demo.halted.clear()
    demo.wait_for_nodes()
    assert "the coordinator sees 3 nodes alive" in capsys.readouterr().out


def test_wire_demo_passes_its_checks():
    done = _run("wire-demo", "--messages", "3", timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all checks passed" in done.stdout
    assert "refused" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--nodes", "1"], "--nodes must be between 2 and 8"),
        (["demo", "--in-flight", "0"], "--in-flight must be between 1 and 256"),
        (["wire-demo", "--messages", "0"], "--messages must be between 1 and 100000"),
        (["demo", "--keep", "{file}"], "not a directory"),
        (["demo", "--keep", "{file}/below"], "cannot use it"),
        (["demo", "--keep", "{full}"], "not empty"),
    ],
)
def test_bad_arguments_are_refused(args, message, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full" / "fleet").mkdir(parents=True)  # an earlier demo's
    args = [a.format(file=tmp_path / "file", full=tmp_path / "full") for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert (tmp_path / "file").read_text() == "x"


def test_a_demo_whose_fleet_cannot_be_made_says_why_in_one_line(monkeypatch, capsys, tmp_path):
    def refuse(*args, **kwargs):
        raise IdentityError("cannot create directory /nowhere: No such file or directory")

    monkeypatch.setattr(cluster_module, "LocalCluster", refuse)
    assert demo_module.run_demo(demo_module.DemoOptions(keep=tmp_path, quiet=True)) == 1
    err = capsys.readouterr().err
    assert err == "meshinfer demo: cannot create directory /nowhere: No such file or directory\n"
