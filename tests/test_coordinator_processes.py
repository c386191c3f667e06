"""The coordinator (in this process) with node daemons as real processes: faults and intruders.

Killing the coordinator process itself is covered in ``test_coordinator_restart.py``.
"""

from __future__ import annotations

import asyncio
import signal

import numpy as np
import pytest

from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.identity_files import NodeDirectory
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.cluster import LocalCluster
from tests.helpers import until

pytestmark = pytest.mark.slow
DIGITS = ModelRef("digits-mlp", "1")


async def coordinator_for(cluster: LocalCluster, tmp, config: CoordinatorConfig):
    ident = NodeDirectory(cluster.enroll("coord", roles=("coordinator",))).load()
    revocations = NodeDirectory(cluster.root / "nodes" / "coord").revocations(ident.trust)
    opts = MeshNodeOptions(mdns=MdnsConfig.loopback(), membership=MembershipConfig.test())
    mesh = MeshNode(ident, revocations, opts)
    await mesh.start()
    coordinator = Coordinator(mesh, tmp / "journal.db", config)
    await coordinator.start()
    return mesh, coordinator


def alive_with_model(coordinator, names):
    nodes = {n["node_id"]: n for n in coordinator.nodes()}
    return all(nodes.get(n, {}).get("status") == "alive" and nodes[n]["models"] for n in names)


async def test_node_killed_mid_task_its_items_run_elsewhere(tmp_path):
    x, y = load_digits_holdout()
    names = ["veh-1", "veh-2", "veh-3"]
    async with LocalCluster(tmp_path, fleet_id="kill-fleet") as cluster:
        for name in names:
            # veh-1 must still hold work when it is killed: no work sharing, and its batcher
            # holds items for 300 ms (else a fast node has answered everything in flight)
            extra = "[executor]\nmax_concurrent = 1\noffload_queue_depth = 100000\n"
            if name == "veh-1":
                extra += "[inference]\nmax_queue_delay_ms = 300.0\nmax_batch_size = 4096\n"
                extra += "dispatch_when_idle = false\n"
            cluster.add_node(name, extra=extra)
            await asyncio.to_thread(cluster.start, name)
        config = CoordinatorConfig(item_timeout_s=60, max_in_flight_per_node=8)
        mesh, c = await coordinator_for(cluster, tmp_path, config)
        try:
            await until(lambda: alive_with_model(c, names))
            spec = TaskSpec("big", Pattern.BATCH, Tensor.from_array(np.repeat(x, 3, axis=0)),
                            (DIGITS,), shard_size=2, policy="round_robin")  # fmt: skip
            task_id = await c.submit(spec)
            await until(lambda: c.stats_.completed_by_node["veh-1"] >= 3)
            assert c.nodes()[0]["node_id"] == "veh-1" and c.nodes()[0]["in_flight"] > 0
            await asyncio.to_thread(cluster.kill, "veh-1", signal.SIGKILL)
            record = await c.wait(task_id, timeout=60)
            assert record.state.value == "succeeded", record.summary.error
            labels = np.array(c.result_of(record)["labels"])
            assert (labels == np.repeat(y, 3)).mean() >= 0.95
            assert c.stats_.redispatched_after_death >= 1  # veh-1 held items when it died
            stats = await c.stats()
            assert stats["completed_by_node"].get("veh-2") and stats["completed_by_node"].get(
                "veh-3"
            )
        finally:
            await c.aclose()
            await mesh.aclose()


async def test_node_of_another_fleet_gets_no_tasks(tmp_path):
    x, _ = load_digits_holdout()
    async with (
        LocalCluster(tmp_path / "good", fleet_id="good-fleet") as good,
        LocalCluster(tmp_path / "evil", fleet_id="evil-fleet") as evil,
    ):
        good.add_node("worker")
        await asyncio.to_thread(good.start, "worker")
        evil.add_node("intruder")
        await asyncio.to_thread(evil.start, "intruder")
        mesh, c = await coordinator_for(good, tmp_path, CoordinatorConfig())
        try:
            await until(lambda: alive_with_model(c, ["worker"]))
            ids = [await c.submit(TaskSpec(f"t{i}", Pattern.SINGLE, Tensor.from_array(x[:1]),
                                           (DIGITS,))) for i in range(5)]  # fmt: skip
            for task_id in ids:
                record = await c.wait(task_id, timeout=15)
                assert record.state.value == "succeeded"
                assert record.items[0].node == "worker"
            assert "intruder" not in {n["node_id"] for n in c.nodes()}
            status = await asyncio.to_thread(evil.processes["intruder"].get, "/status")
            assert status["members"] == [] and status["executor"]["completed"] == 0
        finally:
            await c.aclose()
            await mesh.aclose()
