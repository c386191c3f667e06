"""Real node processes on loopback: mDNS discovery, Noise sessions, SWIM membership.

Three ``meshinfer-node run`` processes find each other through real mDNS and form a membership;
one is killed with SIGKILL and the others mark it dead; it restarts and rejoins as alive at a
higher incarnation.
"""

from __future__ import annotations

import signal

import pytest

from meshinfer.testing.cluster import LocalCluster

pytestmark = pytest.mark.slow
NAMES = ("veh-a", "veh-b", "veh-c")


def test_three_processes_join_detect_a_crash_and_rejoin(tmp_path):
    with LocalCluster(tmp_path, fleet_id="proc-fleet") as cluster:
        for name in NAMES:
            cluster.add_node(name)
        for name in NAMES:
            cluster.start(name)

        def everyone_alive():
            return all(cluster.members(n) == {o: "alive" for o in NAMES if o != n} for n in NAMES)

        cluster.wait_for(everyone_alive, timeout=30)
        old_incarnation = cluster.processes["veh-c"].get("/status")["incarnation"]

        cluster.kill("veh-c", signal.SIGKILL)
        cluster.wait_for(
            lambda: all(cluster.members(n).get("veh-c") == "dead" for n in NAMES[:2]),
            timeout=30,
        )

        cluster.start("veh-c")
        cluster.wait_for(everyone_alive, timeout=30)
        seen = [
            m
            for m in cluster.processes["veh-a"].get("/status")["members"]
            if m["node_id"] == "veh-c"
        ]
        assert seen[0]["incarnation"] > old_incarnation


def test_sigterm_leaves_gracefully(tmp_path):
    with LocalCluster(tmp_path, fleet_id="leave-fleet") as cluster:
        for name in NAMES[:2]:
            cluster.add_node(name)
            cluster.start(name)
        cluster.wait_for(lambda: cluster.members("veh-a").get("veh-b") == "alive", timeout=30)
        cluster.kill("veh-b", signal.SIGTERM)
        assert any(line.startswith("STOPPED") for line in cluster.processes["veh-b"].lines)
        cluster.wait_for(lambda: cluster.members("veh-a").get("veh-b") == "left", timeout=15)
