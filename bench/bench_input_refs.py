"""Inputs by reference: the bytes a node receives per task, and tasks/s, with and without.

In one run, on loopback: the coordinator in this process, ONE node daemon as a separate process
(:class:`~meshinfer.testing.cluster.LocalCluster`) serving ``--models`` (1 to 4) models that
take 64 features: the three shipped digits classifiers and ``synthetic-mlp@w64-d2``. Each task
is a ``parallel`` task: one new frame (``--rows`` x 64 float32; 1,024 rows is 256 KiB) through
every model, aggregation ``all`` (with ``--models 1``, a ``single`` task: no input is ever sent
twice, so ``refs`` shows only the cost, hashing and keeping every frame); a closed loop keeps
``--in-flight`` tasks outstanding. Two cases,
alternated ``--rounds`` times so drift on a noisy machine hits both alike:

* ``bytes``: ``input_ref_min_bytes = 0``, every item carries the frame (the baseline);
* ``refs``: the default 64 KiB: the first item of a task carries the frame and asks the node to
  keep it, the others name it by sha256.

Prints tasks/s, p50/p99, the bytes the node process read per task (``read_chars`` of
``/proc/<pid>/io``: every socket read, gossip and pings included), CPU per task in each
process, and the ratios refs / bytes. The node runs with one BLAS thread
(``OPENBLAS_NUM_THREADS=1`` unless set): on a 2-core machine OpenBLAS's own threads otherwise
spin on the core the event loops need, and both cases mostly measure that. Linux only
(``read_chars``). Usage::

    python bench/bench_input_refs.py [--seconds 5] [--rounds 2] [--models 4] [--rows 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_tasks import Figures, cpu_between
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.identity_files import NodeDirectory
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import DIGITS_REFS
from meshinfer.proto.identity import NodeIdentity
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.cluster import LocalCluster

WIDTH = 64
MODELS = (*DIGITS_REFS, ModelRef("synthetic-mlp", "w64-d2"))
CASES = {"bytes": 0, "refs": CoordinatorConfig().input_ref_min_bytes}


def models(n: int) -> tuple[ModelRef, ...]:
    return MODELS[:n]


async def start_coordinator(cluster: LocalCluster, tmp: Path, case: str, args):
    name = f"coord-{case}-{time.monotonic_ns()}"
    ident = NodeIdentity.load(cluster.enroll(name, roles=("coordinator",)))
    revocations = NodeDirectory(cluster.root / "nodes" / name).revocations(ident.trust)
    opts = MeshNodeOptions(mdns=MdnsConfig.loopback(), membership=MembershipConfig.test())
    mesh = MeshNode(ident, revocations, opts)
    await mesh.start()
    config = CoordinatorConfig(
        input_ref_min_bytes=CASES[case],
        max_in_flight_per_node=args.in_flight * args.models,
        node_capacity=args.in_flight * args.models,
    )
    coordinator = Coordinator(mesh, tmp / f"{name}.db", config)
    await coordinator.start()
    async with asyncio.timeout(30):
        while not any(  # noqa: ASYNC110 (polling the public view)
            len(n["models"]) == args.models and n["status"] == "alive" for n in coordinator.nodes()
        ):
            await asyncio.sleep(0.05)
    return mesh, coordinator


async def run_case(cluster, tmp: Path, case: str, args, node: psutil.Process) -> dict:
    mesh, c = await start_coordinator(cluster, tmp, case, args)
    base = np.random.default_rng(0).random((args.rows, WIDTH), dtype=np.float32)
    refs, counter = models(args.models), iter(range(1 << 62))
    pattern = Pattern.PARALLEL if len(refs) > 1 else Pattern.SINGLE
    start = time.perf_counter() + args.warmup
    end = start + args.seconds
    latencies: list[float] = []

    async def worker(w: int) -> None:
        while time.perf_counter() < end:
            i = next(counter)
            frame = base.copy()
            frame[0, 0] = i  # a new frame every task: only a task's own items share it
            spec = TaskSpec(
                f"{case}-{i}", pattern, Tensor.from_array(frame), refs, aggregation="all"
            )
            t0 = time.perf_counter()
            record = await c.wait(await c.submit(spec))
            t1 = time.perf_counter()
            if record.state.value != "succeeded":
                raise RuntimeError(f"task {spec.task_id} ended {record.state.value}")
            if start <= t1 <= end:  # completed in the window (the counters' window too)
                latencies.append(t1 - t0)

    me = psutil.Process()
    try:
        workers = asyncio.gather(*(worker(w) for w in range(args.in_flight)))
        await asyncio.sleep(args.warmup)
        read0, cpu0, ncpu0 = node.io_counters().read_chars, me.cpu_times(), node.cpu_times()
        refs0 = c.stats_.inputs_by_reference
        await asyncio.sleep(args.seconds)
        read1, cpu1, ncpu1 = node.io_counters().read_chars, me.cpu_times(), node.cpu_times()
        refs1 = c.stats_.inputs_by_reference
        await workers
        misses = c.stats_.input_cache_misses
    finally:
        await c.aclose()
        await mesh.aclose()
    n = max(1, len(latencies))
    figures = Figures(latencies, args.seconds)
    return {
        "rate": figures.rate,
        "p50": figures.pct(0.5),
        "p99": figures.pct(0.99),
        "node_read": (read1 - read0) / n,
        "coord_cpu": cpu_between(cpu0, cpu1) / n,
        "node_cpu": cpu_between(ncpu0, ncpu1) / n,
        "refs_per_task": (refs1 - refs0) / n,
        "misses": misses,
        "tasks": len(latencies),
    }


async def run_all(args) -> list[tuple[str, dict]]:
    out = []
    extra = (
        "[http]\nenabled = false\n"
        f"[inference]\nmodels = [{', '.join(repr(str(m)) for m in models(args.models))}]\n"
        "max_queue_delay_ms = 0.0\n"
        "[executor]\nmax_concurrent = 256\noffload_queue_depth = 100000\n"
    )
    with tempfile.TemporaryDirectory() as tmpdir:
        async with LocalCluster(Path(tmpdir), fleet_id="bench-refs") as cluster:
            await run_cases(cluster, Path(tmpdir), extra, args, out)
    return out


async def run_cases(cluster: LocalCluster, tmp: Path, extra: str, args, out: list) -> None:
    cluster.add_node("worker", extra=extra)
    node = psutil.Process(cluster.start("worker").proc.pid)
    for _ in range(args.rounds):
        for case in (args.only,) if args.only else CASES:
            out.append((case, await run_case(cluster, tmp, case, args, node)))


def report(results: list[tuple[str, dict]], args) -> None:
    frame_kib = args.rows * WIDTH * 4 / 1024
    print(
        f"{args.models} models, a {frame_kib:,.0f} KiB frame per task, {args.in_flight} in flight"
    )
    print(f"{'case':<8}{'tasks/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'node read KiB/task':>20}"
          f"{'refs/task':>11}{'coord CPU ms':>14}{'node CPU ms':>13}{'tasks':>7}")  # fmt: skip
    for case, r in results:
        print(f"{case:<8}{r['rate']:>9,.1f}{r['p50'] * 1e3:>9.2f}{r['p99'] * 1e3:>9.2f}"
              f"{r['node_read'] / 1024:>20,.1f}{r['refs_per_task']:>11.2f}"
              f"{r['coord_cpu'] * 1e3:>14.2f}{r['node_cpu'] * 1e3:>13.2f}"
              f"{r['tasks']:>7}")  # fmt: skip
    by = {case: [r for c, r in results if c == case] for case in CASES}
    if not all(by.values()):
        return

    def ratio(key: str) -> str:
        refs, plain = (statistics.fmean(r[key] for r in by[c]) for c in ("refs", "bytes"))
        return f"{refs / plain:.2f}x"

    print(f"refs / bytes (means over {args.rounds} rounds): tasks/s {ratio('rate')}, "
          f"p50 {ratio('p50')}, bytes the node read per task {ratio('node_read')}, "
          f"node CPU per task {ratio('node_cpu')}, coordinator CPU per task "
          f"{ratio('coord_cpu')}; misses {sum(r['misses'] for r in by['refs'])}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring window per case")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up per case")
    ap.add_argument("--rounds", type=int, default=2, help="times each case runs, alternated")
    ap.add_argument("--in-flight", type=int, default=8, help="tasks kept outstanding")
    ap.add_argument(
        "--models", type=int, default=4, help="models per task (1..4; 1: single tasks, no reuse)"
    )
    ap.add_argument("--rows", type=int, default=1024, help="rows of 64 float32 per frame")
    ap.add_argument("--quick", action="store_true", help="short windows, one round (smoke run)")
    ap.add_argument("--only", choices=tuple(CASES), help="run one case (for profiling)")
    args = ap.parse_args()
    if not 1 <= args.models <= len(MODELS) or min(args.rows, args.in_flight, args.rounds) < 1:
        ap.error(f"--models in 1..{len(MODELS)}, and --rows, --in-flight and --rounds >= 1")
    if args.quick:
        args.seconds, args.warmup, args.rounds = 1.0, 0.5, 1
    logging.basicConfig(level=logging.ERROR)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")  # inherited by the node process (see the docstring)
    print(f"python {sys.version.split()[0]}, cpus={psutil.cpu_count()}, "
          f"window={args.seconds}s after {args.warmup}s warm-up, {args.rounds} rounds")  # fmt: skip
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        results = runner.run(run_all(args))
    report(results, args)


if __name__ == "__main__":
    main()
