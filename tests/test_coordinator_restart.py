"""Durability: the coordinator process is SIGKILLed mid-run and restarted; no accepted task is lost.

Everything is a real process: ``meshinfer-coord serve`` (SQLite WAL journal, HTTP API) and two
``meshinfer-node run`` daemons, found by mDNS on loopback. Tasks are submitted over the API;
every one the API acknowledged (202) must finish after the restart, with the right answer.
"""

from __future__ import annotations

import signal
import threading

import pytest

from coordinator.client import ApiError, tensor_json
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.testing.cluster import LocalCluster
from tests.helpers import api_client, labels_reference, nodes_ready

pytestmark = pytest.mark.slow
NODES = ("veh-1", "veh-2")
#: Nodes that hold every batch 20 ms: the kill must catch tasks unfinished, however fast the
#: machine (a digits forward pass takes microseconds).
SLOW_NODE = (
    "[executor]\nmax_concurrent = 1\n"
    "[inference]\nmax_queue_delay_ms = 20.0\ndispatch_when_idle = false\n"
)


def _submit_until_killed(client, x, acknowledged, stop) -> None:
    """Submit batch tasks of 16 rows until the coordinator dies; record every 202."""
    i = 0
    while not stop.is_set():
        rows = x[(i * 16) % len(x) :][:16]
        try:
            doc = client.submit({
                "pattern": "batch", "model": "digits-mlp@1", "inputs": tensor_json(rows),
                "shard_size": 1,
            })  # fmt: skip
        except ApiError:
            return  # the coordinator is gone: this one was never acknowledged
        acknowledged.append((doc["task_id"], (i * 16) % len(x), len(rows)))
        i += 1


def test_every_acknowledged_task_finishes_after_a_coordinator_crash(tmp_path):
    x, _ = load_digits_holdout()
    with LocalCluster(tmp_path, fleet_id="restart-fleet") as cluster:
        cluster.add_coordinator("coord")
        for name in NODES:
            cluster.add_node(name, extra=SLOW_NODE)
            cluster.start(name)
        cluster.start_coordinator("coord")
        client = api_client(cluster)
        cluster.wait_for(lambda: nodes_ready(client, NODES))

        acknowledged: list[tuple[str, int, int]] = []
        stop = threading.Event()
        submitter = threading.Thread(
            target=_submit_until_killed, args=(client, x, acknowledged, stop)
        )
        submitter.start()
        cluster.wait_for(lambda: len(acknowledged) >= 40, timeout=30, step=0.01)
        cluster.kill("coord", signal.SIGKILL)
        stop.set()
        submitter.join(timeout=30)
        log = tmp_path / "coord.log"
        before = log.read_text().count("recovered task")

        cluster.start_coordinator("coord")
        recovered = log.read_text().count("recovered task") - before
        assert recovered > 0, "the kill should have caught tasks unfinished"
        client = api_client(cluster)
        states = {}
        for task_id, start, n in acknowledged:
            doc = client.wait(task_id, timeout=60)
            states[task_id] = doc["state"]
            assert doc["state"] == "succeeded", doc
            labels = doc["result"]["labels"]
            assert len(labels) == n
            reference = labels_reference(x[start : start + n])
            assert labels == reference
        assert len(states) == len(acknowledged) >= 40
        listed = {t["task_id"] for t in client.iter_tasks()}
        assert {task_id for task_id, _, _ in acknowledged} <= listed
