"""A daemon whose own certificate is revoked while it runs stops (session 37).

Before, a node or coordinator that learnt of its own revocation (copied into its identity
directory, or gossiped by a peer that had not cut it off yet) said so in a warning and served
on, cut off: every peer refuses its handshakes from then on, and its supervisor saw a healthy
process. Now it stops as on SIGTERM (``STOPPED``), exits 1, and a restart is refused until it
is enrolled again; and a peer that cuts it off tells it which entry revokes it (a
RevocationNotice), so a node whose own directory never got the list stops too.

Real parts: ``meshinfer-node run`` and ``meshinfer-coord serve`` subprocesses on loopback TCP
and mDNS, the fleet directory's signed revocation list.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from meshinfer.atomic_files import replace_file
from meshinfer.testing.cluster import LocalCluster

STOP_S = 45.0  # the list is looked at every 2 s; the drain and the leave are short when idle


def revoke(cluster: LocalCluster, node_id: str, reason: str) -> bytes:
    cluster.fleet.revoke(now=time.time(), node_id=node_id, reason=reason)
    return cluster.fleet.revocations_bin.read_bytes()


async def stopped(cluster: LocalCluster, node_id: str) -> int:
    proc = cluster.processes[node_id].proc
    try:
        return await asyncio.to_thread(proc.wait, STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{node_id} served on under a revoked certificate:\n{cluster.log_tail(node_id)}"
        )


async def test_a_node_given_a_list_revoking_it_stops_and_exits_1(tmp_path):
    async with LocalCluster(tmp_path, fleet_id=f"self-revoked-{time.monotonic_ns()}") as cluster:
        cluster.add_node("car-1")
        await asyncio.to_thread(cluster.start, "car-1")
        listed = revoke(cluster, "car-1", "stolen")
        replace_file(cluster.root / "nodes" / "car-1" / "revocations.bin", listed)
        assert await stopped(cluster, "car-1") == 1
        daemon = cluster.processes["car-1"]
        await asyncio.to_thread(daemon.reader.join, 5)
        assert "STOPPED car-1" in daemon.lines
        log = cluster.log_tail("car-1", 20000)
        assert "'car-1' (serial 1) is revoked (revocation entry 1, reason 'stolen')" in log
        # a restart under that certificate is refused (exit 2, one clear line)
        restart = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "node.cli", "run", "--config", str(cluster.configs["car-1"])],
            capture_output=True, text=True, timeout=60, cwd=cluster.root,
        )  # fmt: skip
        assert restart.returncode == 2 and restart.stdout == "", restart.stderr
        assert "is revoked by" in restart.stderr and "fleet enroll --force" in restart.stderr


async def test_a_coordinator_given_a_list_revoking_it_stops_and_exits_1(tmp_path):
    async with LocalCluster(tmp_path, fleet_id=f"self-revoked-{time.monotonic_ns()}") as cluster:
        cluster.add_coordinator("coord")
        await asyncio.to_thread(cluster.start_coordinator, "coord")
        listed = revoke(cluster, "coord", "")
        replace_file(cluster.root / "nodes" / "coord" / "revocations.bin", listed)
        assert await stopped(cluster, "coord") == 1
        daemon = cluster.processes["coord"]
        await asyncio.to_thread(daemon.reader.join, 5)
        assert "STOPPED coord" in daemon.lines
        assert "'coord' (serial 1) is revoked (revocation entry 1)" in cluster.log_tail(
            "coord", 20000
        )


async def test_a_node_cut_off_by_a_peer_holding_the_list_stops_too(tmp_path):
    """Only car-2's directory gets the list: car-2 cuts car-1 off at once, and tells it which
    entry revokes it (a RevocationNotice before the Close), so car-1 stops all the same."""
    async with LocalCluster(tmp_path, fleet_id=f"self-revoked-{time.monotonic_ns()}") as cluster:
        for name in ("car-1", "car-2"):
            cluster.add_node(name)
        await asyncio.to_thread(cluster.start, "car-1")
        await asyncio.to_thread(cluster.start, "car-2")
        await asyncio.to_thread(
            cluster.wait_for, lambda: cluster.members("car-1").get("car-2") == "alive"
        )
        listed = revoke(cluster, "car-1", "stolen")
        replace_file(cluster.root / "nodes" / "car-2" / "revocations.bin", listed)
        assert await stopped(cluster, "car-1") == 1
        assert "reason 'stolen'" in cluster.log_tail("car-1", 20000)
        assert cluster.processes["car-2"].alive()  # the node that holds the list serves on
