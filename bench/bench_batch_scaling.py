"""Large batch tasks: does the coordinator's work per item stay flat as a batch grows?

In one run, on loopback: the coordinator in this process (journal at ``synchronous=FULL``),
ONE node daemon as a separate process serving ``--model`` (the tiny synthetic model by
default), and batch tasks of ``N`` one-row shards (``shard_size=1``: N work items; N rows in
shards of ``--shard-size`` rows otherwise) for each N in ``--sizes``. Nodes take at most
``--slots`` items at a time, so most of a large batch waits for a free slot, and the node's
dynamic batcher joins what waits into forward passes of up to 64 rows (``[inference]
max_batch_size``). Prints, per N, the wall time from submit to the finished record, the
microseconds per item, the node process's CPU per item, and the ratio of the time per item to
the smallest N's (the
baseline measured in the same run): about 1 when the work per item is flat, about N / N0 when it
grows with the batch (as it did before the scheduler kept per-node counts and retried waiting
items only as slots freed).

``--cpu-threads`` sets the node's ``[inference] cpu_threads`` (its math libraries' threads per
pool; 0: their own default, one per core). Given several values, each of ``--rounds`` rounds
starts a fresh node per value, in turn, and the ratios of each value to the first are printed
(with a shipped digits model, e.g. ``--model digits-mlp@1``, batches of more than ~15 rows run
on the engine's worker thread with BLAS's own threads). Usage::

    python bench/bench_batch_scaling.py [--sizes 500 2000 8000] [--slots 32]
    python bench/bench_batch_scaling.py --model digits-mlp@1 --sizes 16000 --shard-size 8 \\
        --slots 64 --cpu-threads 0 1 2 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_tasks import TINY_REF, add_cpu_threads_option, cpu_between, serving
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.errors import ModelNotFoundError
from meshinfer.identity_files import NodeDirectory
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import default_registry
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.cluster import LocalCluster


def node_extra(model: ModelRef, cpu_threads: int) -> str:
    return (
        "[http]\nenabled = false\n"
        f'[inference]\nmodels = ["{model}"]\nmax_queue_delay_ms = 0.0\n'
        f"cpu_threads = {cpu_threads}\n"
        "[executor]\nmax_concurrent = 256\noffload_queue_depth = 100000\n"
    )


async def run(args) -> list[tuple[int, int, float, float]]:
    """(cpu_threads, N, seconds, node CPU seconds) per batch, in the order they ran."""
    out: list[tuple[int, int, float, float]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        with LocalCluster(tmp, fleet_id="bench-batch") as cluster:
            for r in range(args.rounds):
                for threads in args.cpu_threads:
                    name = f"worker-{r}-t{threads}"
                    cluster.add_node(name, extra=node_extra(args.model, threads))
                    node = psutil.Process(cluster.start(name).proc.pid)
                    try:
                        for n, seconds, cpu in await run_sizes(
                            cluster, tmp, f"{r}-{threads}", node, args
                        ):
                            out.append((threads, n, seconds, cpu))
                    finally:
                        await asyncio.to_thread(cluster.kill, name, signal.SIGKILL)
    return out


async def run_sizes(cluster, tmp: Path, tag: str, node: psutil.Process, args) -> list:
    """Every ``--sizes`` batch through a fresh coordinator: (N, seconds, node CPU seconds)."""
    ident = NodeDirectory(cluster.enroll(f"coord-{tag}", roles=("coordinator",))).load()
    revocations = NodeDirectory(cluster.root / "nodes" / f"coord-{tag}").revocations(ident.trust)
    opts = MeshNodeOptions(mdns=MdnsConfig.loopback(), membership=MembershipConfig.test())
    mesh = MeshNode(ident, revocations, opts)
    await mesh.start()
    config = CoordinatorConfig(max_in_flight_per_node=args.slots, item_timeout_s=600)
    c = Coordinator(mesh, tmp / f"journal-{tag}.db", config)
    await c.start()
    out = []
    try:
        async with asyncio.timeout(30):
            while not serving(c):  # noqa: ASYNC110 (polling the public view)
                await asyncio.sleep(0.05)
        rng = np.random.default_rng(0)
        for n in args.sizes:
            x = Tensor.from_array(rng.random((n, args.width), dtype=np.float32))
            spec = TaskSpec(
                f"batch-{tag}-{n}", Pattern.BATCH, x, (args.model,), shard_size=args.shard_size
            )
            cpu0, t0 = node.cpu_times(), time.perf_counter()
            record = await c.wait(await c.submit(spec), timeout=3600)
            seconds, cpu = time.perf_counter() - t0, cpu_between(cpu0, node.cpu_times())
            if record.state.value != "succeeded" or len(record.items) != items(n, args):
                raise RuntimeError(f"batch of {n} ended {record.state.value}")
            out.append((n, seconds, cpu))
    finally:
        await c.aclose()
        await mesh.aclose()
    return out


def items(rows: int, args) -> int:
    return -(-rows // args.shard_size)


def report(figures: list[tuple[int, int, float, float]], args) -> None:
    print(
        f"one node serving {args.model}, {args.slots} slots, shards of {args.shard_size} row(s),"
        " journal FULL, "
        f"{args.rounds} round(s)"
    )
    print(f"{'threads':>8}{'rows':>8}{'items':>8}{'seconds':>10}{'us/item':>10}"
          f"{'node CPU us/item':>18}{'vs N0':>8}")  # fmt: skip
    for threads, n, seconds, cpu in figures:
        first = args.sizes[0]
        base = next(s / items(m, args) for t, m, s, _ in figures if t == threads and m == first)
        k = items(n, args)
        per = seconds / k
        print(f"{threads:>8}{n:>8}{k:>8}{seconds:>10.2f}{per * 1e6:>10.0f}{cpu / k * 1e6:>18.0f}"
              f"{per / base:>8.2f}")  # fmt: skip
    first = args.cpu_threads[0]
    for threads in args.cpu_threads[1:]:
        for n in args.sizes:

            def mean(t: int, i: int, n: int = n) -> float:
                return statistics.fmean(f[i] for f in figures if f[0] == t and f[1] == n)

            print(f"cpu_threads {threads} / {first}, N={n} (means over {args.rounds} rounds): "
                  f"items/s {mean(first, 2) / mean(threads, 2):.2f}x, node CPU per item "
                  f"{mean(threads, 3) / mean(first, 3):.2f}x")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000])
    ap.add_argument("--slots", type=int, default=32, help="max_in_flight_per_node")
    ap.add_argument("--shard-size", type=int, default=1, help="rows per work item")
    ap.add_argument("--model", default=str(TINY_REF), help='the model served, "id@version"')
    add_cpu_threads_option(ap)
    ap.add_argument("--rounds", type=int, default=1, help="times each --cpu-threads value runs")
    args = ap.parse_args()
    model_id, _, version = args.model.partition("@")
    args.model = ModelRef(model_id, version or "1")
    try:
        args.width = default_registry().get(args.model).inputs[0].shape[1]
    except ModelNotFoundError as exc:
        ap.error(f"--model: {exc}")
    if min(args.cpu_threads) < 0 or min(args.rounds, args.shard_size) < 1:
        ap.error("--cpu-threads values must be >= 0, --rounds and --shard-size >= 1")
    if min(args.sizes) < 1 or args.slots < 1:
        ap.error("--sizes values and --slots must be at least 1")
    args.sizes = sorted(set(args.sizes))  # (a size given twice would submit one task id twice)
    figures = asyncio.run(run(args))
    report(figures, args)


if __name__ == "__main__":
    main()
