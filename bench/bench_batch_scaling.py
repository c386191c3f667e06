"""Large batch tasks: does the coordinator's work per item stay flat as a batch grows?

In one run, on loopback: the coordinator in this process (journal at ``synchronous=FULL``),
ONE node daemon as a separate process serving the tiny synthetic model, and batch tasks of
``N`` one-row shards (``shard_size=1``: N work items) for each N in ``--sizes``. Nodes take at
most ``--slots`` items at a time, so most of a large batch waits for a free slot. Prints, per N,
the wall time from submit to the finished record, the microseconds per item, and the ratio of
that to the smallest N's (the baseline measured in the same run): about 1 when the work per
item is flat, about N / N0 when it grows with the batch (as it did before the scheduler kept
per-node counts and retried waiting items only as slots freed). Usage::

    python bench/bench_batch_scaling.py [--sizes 500 2000 8000] [--slots 32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_tasks import NODE_EXTRA, TINY, TINY_REF, serving
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.identity_files import NodeDirectory
from meshinfer.proto.identity import NodeIdentity
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.cluster import LocalCluster


async def run(args) -> list[tuple[int, float]]:
    out = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        with LocalCluster(tmp, fleet_id="bench-batch") as cluster:
            cluster.add_node("worker", extra="[http]\nenabled = false\n" + NODE_EXTRA)
            cluster.start("worker")
            ident = NodeIdentity.load(cluster.enroll("coord", roles=("coordinator",)))
            revocations = NodeDirectory(cluster.root / "nodes" / "coord").revocations(ident.trust)
            opts = MeshNodeOptions(mdns=MdnsConfig.loopback(), membership=MembershipConfig.test())
            mesh = MeshNode(ident, revocations, opts)
            await mesh.start()
            config = CoordinatorConfig(max_in_flight_per_node=args.slots, item_timeout_s=600)
            c = Coordinator(mesh, tmp / "journal.db", config)
            await c.start()
            try:
                async with asyncio.timeout(30):
                    while not serving(c):  # noqa: ASYNC110 (polling the public view)
                        await asyncio.sleep(0.05)
                rng = np.random.default_rng(0)
                for n in args.sizes:
                    x = Tensor.from_array(rng.random((n, TINY.width), dtype=np.float32))
                    spec = TaskSpec(f"batch-{n}", Pattern.BATCH, x, (TINY_REF,), shard_size=1)
                    t0 = time.perf_counter()
                    record = await c.wait(await c.submit(spec), timeout=3600)
                    seconds = time.perf_counter() - t0
                    if record.state.value != "succeeded" or len(record.items) != n:
                        raise RuntimeError(f"batch of {n} ended {record.state.value}")
                    out.append((n, seconds))
            finally:
                await c.aclose()
                await mesh.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000])
    ap.add_argument("--slots", type=int, default=32, help="max_in_flight_per_node")
    args = ap.parse_args()
    args.sizes = sorted(args.sizes)
    figures = asyncio.run(run(args))
    base = figures[0][1] / figures[0][0]
    print(f"one node, {args.slots} slots, one-row shards, journal FULL")
    print(f"{'items':>8}{'seconds':>10}{'us/item':>10}{'vs N0':>8}")
    for n, seconds in figures:
        per = seconds / n
        print(f"{n:>8}{seconds:>10.2f}{per * 1e6:>10.0f}{per / base:>8.2f}")


if __name__ == "__main__":
    main()
