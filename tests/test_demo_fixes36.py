"""``meshinfer demo`` (thirty-sixth session): latency percentiles by nearest rank, a JSON summary
whose shape is documented and names every node, a daemon that dies before the fleet assembles
reported as such (not as an mDNS problem, and not after 30 s), and the mDNS message's fix."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

import meshinfer.demo as demo_module
from meshinfer.cli import main
from meshinfer.demo import Demo, DemoError, DemoOptions, Progress
from meshinfer.testing.cluster import LocalCluster
from tests.test_demo_fixes34 import Cluster, NeverReady


def test_latency_percentiles_are_nearest_rank() -> None:
    # was numpy's linear interpolation: p50 5.5, p90 9.1, p99 9.91 (times no task took)
    assert demo_module._percentiles([i / 1000 for i in range(10, 0, -1)]) == pytest.approx(
        {"p50_ms": 5.0, "p90_ms": 9.0, "p99_ms": 10.0}
    )
    tasks = [i / 1000 for i in range(1, 46)]  # the demo's 45 tasks: p99 is the slowest
    assert demo_module._percentiles(tasks) == pytest.approx(
        {"p50_ms": 23.0, "p90_ms": 41.0, "p99_ms": 45.0}
    )
    assert demo_module._percentiles([0.002]) == pytest.approx(
        {"p50_ms": 2.0, "p90_ms": 2.0, "p99_ms": 2.0}
    )
    assert demo_module._percentiles([]) == {"p50_ms": None, "p90_ms": None, "p99_ms": None}


class Stats:
    """A coordinator's client after the demo: veh-2 completed nothing (absent from its counts)."""

    def stats(self) -> dict:
        return {
            "completed_by_node": {"rsu-1": 5, "veh-1": 3},
            "retries": 1,
            "redispatched_after_death": 1,
            "duplicates": 0,
        }


def _json_keys_documented() -> set[str]:
    doc = demo_module.__doc__
    section = doc[doc.index("``--json``") : doc.index("Ctrl-C, SIGTERM")]
    return set(re.findall(r"``([a-z0-9_]+)``", section))


def test_the_json_summary_names_every_node_and_each_of_its_keys_is_documented(tmp_path) -> None:
    demo = Demo(DemoOptions(nodes=3, quiet=True), tmp_path)
    demo.client = Stats()
    y = np.array([1, 2, 3, 4])
    progress = Progress(latencies=[0.01, 0.02], labels={0: [1, 2], 2: [3, 0]})
    ens = {"state": "succeeded", "result": {"labels": [1, 2, 3, 4]}}
    summary = demo_module._summary(demo, None, y, progress, 2.0, ens, 0.5)
    # was {"rsu-1": 5, "veh-1": 3}: a node that did nothing was missing from the JSON
    assert summary["items_by_node"] == {"rsu-1": 5, "veh-1": 3, "veh-2": 0}
    assert summary["items"] == 8
    assert summary["rows_per_s"] == 2.0 and summary["accuracy"] == 0.75
    documented = _json_keys_documented()
    assert set(summary) <= documented, set(summary) - documented
    assert set(summary["latency"]) <= documented


def test_the_json_option_says_where_its_keys_are_documented(capsys) -> None:
    assert main(["demo", "--help"]) == 0
    assert "pydoc meshinfer.demo" in " ".join(capsys.readouterr().out.split())


DIES_AFTER_READY = """\
import sys
print('READY {"pid": 1}', flush=True)
sys.stderr.write("veh-1: cannot load digits-mlp@1: the weights are corrupt\\n")
sys.exit(3)
"""


def test_a_daemon_that_dies_before_the_fleet_assembles_is_named_with_its_log(
    tmp_path, monkeypatch
) -> None:
    demo = Demo(DemoOptions(nodes=2, quiet=True), tmp_path)
    cluster = demo.cluster
    real_wait_for = LocalCluster.wait_for

    def wait_for(predicate, timeout=30.0, step=0.1):  # (the old code's 30 s: 3 s here)
        return real_wait_for(cluster, predicate, timeout=3.0, step=step)

    monkeypatch.setattr(cluster, "wait_for", wait_for)
    cluster.add_node("veh-1")
    with cluster:
        daemon = cluster.start(
            "veh-1", command=(sys.executable, "-c", DIES_AFTER_READY, "--config")
        )
        daemon.proc.wait(10)
        demo.daemons = [daemon]
        demo.client = NeverReady()
        with pytest.raises(DemoError) as caught:
            demo.wait_for_nodes()
    message = str(caught.value)
    # was, after 30 s: "... is multicast there blocked (a firewall on UDP port 5353)?"
    assert message.startswith("veh-1 exited (status 3) before the fleet assembled; log tail:")
    assert "cannot load digits-mlp@1: the weights are corrupt" in message
    assert "mDNS" not in message


def test_a_fleet_that_never_assembles_is_told_how_to_let_mdns_through(tmp_path) -> None:
    demo = Demo(DemoOptions(nodes=2, quiet=True), tmp_path)
    demo.cluster = Cluster(demo.names)
    demo.client = NeverReady()
    with pytest.raises(DemoError) as caught:
        demo.wait_for_nodes()
    message = str(caught.value)
    assert "(rsu-1 alive, 3 models, veh-1 not found)" in message
    assert "UDP port 5353" in message
    assert "`ip link set lo multicast on`" in message  # was: a question, and no fix


def test_a_missing_log_has_an_empty_tail(tmp_path) -> None:
    assert LocalCluster(tmp_path).log_tail("nobody") == ""
