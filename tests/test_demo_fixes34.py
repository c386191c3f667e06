"""``meshinfer demo``: a relative ``--keep`` directory, a stream that ends once the demo is halted,
what the kill report measures, and what a fleet that never assembled is reported with. The demo's
pieces run on fakes of the coordinator and of :class:`LocalCluster` (no daemon); the tests at
the end are of :mod:`meshinfer.testing.cluster` (a relative or odd root, a shadowing folder)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import meshinfer.demo as demo_module
from coordinator.client import ApiError
from coordinator.config import load_config as load_coordinator_config
from meshinfer.demo import Demo, DemoError, DemoOptions, Interrupted, StopSignals
from meshinfer.testing.cluster import LocalCluster
from node.config import load_config as load_node_config


class Daemon:
    """A daemon process of :class:`Cluster`: it records the signals it is sent."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.proc = self

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)


class Cluster:
    """What the demo asks of LocalCluster, with no processes; ``kill`` takes ``kill_s`` of the
    demo's clock (it returns once the process is reaped)."""

    def __init__(self, names: list[str], clock: Clock | None = None, kill_s: float = 0.0) -> None:
        self.root = "/fleet"
        self.processes = {name: Daemon() for name in ["coord", *names]}
        self.clock, self.kill_s = clock, kill_s

    def kill(self, name: str, sig: int) -> None:
        self.processes[name].send_signal(sig)
        if self.clock is not None:
            self.clock.now += self.kill_s

    def wait_for(self, predicate, timeout: float = 30.0, step: float = 0.1) -> None:
        if not predicate():
            raise TimeoutError(f"condition not met within {timeout}s: {predicate}")


class Clock:
    """The demo's ``time`` module with a ``perf_counter`` that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


class Coordinator:
    """A coordinator's client: veh-1 has 2 items in flight until it is killed, then none, and
    membership suspects it; 2 items were re-dispatched after its death."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def _killed(self) -> bool:
        return signal.SIGKILL in self.cluster.processes["veh-1"].signals

    def nodes(self) -> dict:
        killed = self._killed()
        return {"nodes": [
            {"node_id": "rsu-1", "status": "alive", "in_flight": 0, "models": [1, 2, 3]},
            {"node_id": "veh-1", "status": "suspect" if killed else "alive",
             "in_flight": 0 if killed else 2, "models": [1, 2, 3]},
        ]}  # fmt: skip

    def stats(self) -> dict:
        return {"redispatched_after_death": 2 if self._killed() else 0}


def test_a_relative_keep_directory_gives_daemon_configs_that_name_its_directories(
    tmp_path, monkeypatch
):
    # was: "rel/nodes/veh-1" in rel/veh-1.toml, taken from that file's folder: rel/rel/nodes/veh-1,
    # and no daemon of ``meshinfer demo --keep rel`` came up
    monkeypatch.chdir(tmp_path)
    demo = Demo(DemoOptions(nodes=2, quiet=True), demo_module.Path("rel"))
    node = load_node_config(demo.cluster.add_node("veh-1")).node
    coord = load_coordinator_config(demo.cluster.add_coordinator("coord"))
    assert node.identity_dir == str(tmp_path / "rel" / "nodes" / "veh-1")
    assert node.data_dir == str(tmp_path / "rel" / "data" / "veh-1")
    assert coord.coordinator.identity_dir == str(tmp_path / "rel" / "nodes" / "coord")
    assert coord.api.token_file == str(tmp_path / "rel" / "fleet" / "api-token")


class GoneCoordinator:
    """A coordinator stopped while tasks were in flight: as the real client does, a wait asks it
    again for all of its ``timeout``, then fails. Records each wait's thread."""

    def __init__(self) -> None:
        self.submitted = 0
        self.waiting: list[threading.Thread] = []
        self.all_waiting = threading.Event()
        self.released = threading.Event()  # (the test's end: no thread left behind)

    def submit(self, doc: dict) -> dict:
        self.submitted += 1
        return {"task_id": f"t{self.submitted}"}

    def wait(self, task_id: str, timeout: float) -> dict:
        self.waiting.append(threading.current_thread())
        if len(self.waiting) == 2:
            self.all_waiting.set()
        self.released.wait(timeout)
        raise ApiError(None, "unreachable", "the coordinator went away")


def test_a_halted_stream_ends_without_waiting_out_its_tasks(tmp_path):
    # was: each thread of the stream waited 60 s for a coordinator the demo had stopped, and the
    # demo's process, stopped by Ctrl-C, exited only then
    client = GoneCoordinator()
    x = np.zeros((4, 64), dtype=np.float32)
    options = DemoOptions(nodes=2, quiet=True, kill=False, rows_per_task=2, in_flight=2)

    def interrupt() -> None:
        if client.all_waiting.wait(10):
            os.kill(os.getpid(), signal.SIGINT)

    try:
        with StopSignals() as signals:
            demo = Demo(options, tmp_path, signals.stopping, signals.forced)
            demo.client = client
            threading.Thread(target=interrupt).start()
            with pytest.raises(Interrupted, match="SIGINT"):
                demo.classify(x)
        for thread in client.waiting:
            thread.join(10)
        running = [thread.name for thread in client.waiting if thread.is_alive()]
    finally:
        client.released.set()
    assert len(client.waiting) >= 2
    assert running == []


def test_the_kill_report_counts_from_the_kill_not_from_the_reaped_process(
    tmp_path, monkeypatch, capsys
):
    clock = Clock()
    monkeypatch.setattr(demo_module, "time", clock)
    demo = Demo(DemoOptions(nodes=2), tmp_path)
    demo.cluster = Cluster(demo.names, clock, kill_s=0.5)
    demo.client = Coordinator(demo.cluster)
    demo.start_killer(demo_module.Progress(), total=0)
    demo.killer.join(10)
    assert demo.cluster.processes["veh-1"].signals == [signal.SIGSTOP, signal.SIGKILL]
    # was 0: the time from the kill until the process was reaped was left out
    assert demo.kill_report["settled_s"] == demo.kill_report["detected_s"] == 0.5
    assert demo.kill_report["moved"] == 2
    out = capsys.readouterr().out
    assert "500 ms after the kill nothing was left on veh-1" in out
    assert "got no answer to a ping" not in out  # (a killed node's sessions end: re-dialled)


class NeverReady:
    """A coordinator that found rsu-1 and never veh-1 (no mDNS between them)."""

    def nodes(self) -> dict:
        return {"nodes": [{"node_id": "rsu-1", "status": "alive", "models": [1, 2, 3]}]}


@pytest.mark.parametrize("keep", [False, True])
def test_a_fleet_that_never_assembles_says_what_was_seen_and_where_the_logs_are(tmp_path, keep):
    demo = Demo(DemoOptions(nodes=2, quiet=True, keep=tmp_path if keep else None), tmp_path)
    demo.cluster = Cluster(demo.names)
    demo.client = NeverReady()
    with pytest.raises(DemoError) as caught:
        demo.wait_for_nodes()
    message = str(caught.value)
    assert "(rsu-1 alive, 3 models, veh-1 not found)" in message
    assert "mDNS" in message
    if keep:
        assert "The daemons' logs are in /fleet." in message
    else:
        assert "--keep DIR" in message


# --- meshinfer/testing/cluster.py (not this file's owner's) ----------------------------------


def test_a_cluster_on_a_relative_root_writes_configs_that_name_its_directories(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cluster = LocalCluster(demo_module.Path("rel"))
    node = load_node_config(cluster.add_node("veh-1")).node
    assert node.identity_dir == str(tmp_path / "rel" / "nodes" / "veh-1")


def test_a_cluster_root_with_a_quote_or_backslash_gives_readable_configs(tmp_path):
    root = tmp_path / 'my "demo" \\ fleet'
    cluster = LocalCluster(root)
    node = load_node_config(cluster.add_node("veh-1")).node
    assert node.identity_dir == str(root / "nodes" / "veh-1")


def test_a_daemon_starts_whatever_the_working_directory_holds(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "node.py").write_text("raise SystemExit('the node.py of the working directory')\n")
    monkeypatch.chdir(work)
    cluster = LocalCluster(tmp_path / "fleet")
    cluster.add_node("veh-1")
    with cluster:
        daemon = cluster.start("veh-1", timeout=30)
        assert daemon.facts["pid"] == daemon.proc.pid
