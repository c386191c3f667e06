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
process, and the ratios refs / bytes. ``--cpu-threads`` sets the node's ``[inference]
cpu_threads`` (its math libraries' threads per pool; 0: their own default, one per core); given
several values, each round starts a fresh node per value, in turn, and the ratios of each value
to the first are printed too (on a 2-core machine OpenBLAS's default threads spin on the cores
the event loops need: 0 against 1 measures that). Linux only (``read_chars``). Usage::

    python bench/bench_input_refs.py [--seconds 5] [--rounds 2] [--models 4] [--rows 1024]
        [--cpu-threads 0 1] [--only refs]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_tasks import Figures, add_cpu_threads_option, cpu_between
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.identity_files import NodeDirectory
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import DIGITS_REFS
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.cluster import LocalCluster

WIDTH = 64
MODELS = (*DIGITS_REFS, ModelRef("synthetic-mlp", "w64-d2"))
CASES = {"bytes": 0, "refs": CoordinatorConfig().input_ref_min_bytes}
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def models(n: int) -> tuple[ModelRef, ...]:
    return MODELS[:n]


async def start_coordinator(cluster: LocalCluster, tmp: Path, case: str, args):
    name = f"coord-{case}-{time.monotonic_ns()}"
    ident = NodeDirectory(cluster.enroll(name, roles=("coordinator",))).load()
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


async def run_all(args) -> list[tuple[int, str, dict]]:
    out: list[tuple[int, str, dict]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        async with LocalCluster(Path(tmpdir), fleet_id="bench-refs") as cluster:
            await run_cases(cluster, Path(tmpdir), args, out)
    return out


def node_extra(args, cpu_threads: int) -> str:
    return (
        "[http]\nenabled = false\n"
        f"[inference]\nmodels = [{', '.join(repr(str(m)) for m in models(args.models))}]\n"
        f"max_queue_delay_ms = 0.0\ncpu_threads = {cpu_threads}\n"
        "[executor]\nmax_concurrent = 256\noffload_queue_depth = 100000\n"
    )


async def run_cases(cluster: LocalCluster, tmp: Path, args, out: list) -> None:
    """Each round: a fresh node per ``--cpu-threads`` value, in turn, running every case."""
    for r in range(args.rounds):
        for threads in args.cpu_threads:
            name = f"worker-{r}-t{threads}"
            cluster.add_node(name, extra=node_extra(args, threads))
            node = psutil.Process(cluster.start(name).proc.pid)
            try:
                for case in (args.only,) if args.only else CASES:
                    out.append((threads, case, await run_case(cluster, tmp, case, args, node)))
            finally:
                await asyncio.to_thread(cluster.kill, name, signal.SIGKILL)


def report(results: list[tuple[int, str, dict]], args) -> None:
    frame_kib = args.rows * WIDTH * 4 / 1024
    print(
        f"{args.models} models, a {frame_kib:,.0f} KiB frame per task, {args.in_flight} in flight"
    )
    print(f"{'threads':<8}{'case':<8}{'tasks/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'node read KiB/task':>20}{'refs/task':>11}{'coord CPU ms':>14}{'node CPU ms':>13}"
          f"{'tasks':>7}")  # fmt: skip
    for threads, case, r in results:
        print(f"{threads:<8}{case:<8}{r['rate']:>9,.1f}{r['p50'] * 1e3:>9.2f}"
              f"{r['p99'] * 1e3:>9.2f}{r['node_read'] / 1024:>20,.1f}{r['refs_per_task']:>11.2f}"
              f"{r['coord_cpu'] * 1e3:>14.2f}{r['node_cpu'] * 1e3:>13.2f}"
              f"{r['tasks']:>7}")  # fmt: skip
    for threads in args.cpu_threads:
        refs_ratios(results, threads, args.rounds)
    base = args.cpu_threads[0]
    for threads in args.cpu_threads[1:]:
        for case in (args.only,) if args.only else CASES:
            print(f"cpu_threads {threads} / {base}, {case} (means over {args.rounds} rounds): "
                  f"tasks/s {ratio(results, (threads, case), (base, case), 'rate')}, "
                  f"p50 {ratio(results, (threads, case), (base, case), 'p50')}, node CPU per "
                  f"task {ratio(results, (threads, case), (base, case), 'node_cpu')}")  # fmt: skip


def ratio(results: list, top: tuple[int, str], bottom: tuple[int, str], key: str) -> str:
    """Mean of ``key`` over the runs of ``top`` (threads, case) / its mean over ``bottom``'s."""
    a, b = (statistics.fmean(r[key] for t, c, r in results if (t, c) == k) for k in (top, bottom))
    return f"{a / b:.2f}x"


def refs_ratios(results: list, threads: int, rounds: int) -> None:
    if not all(c in {c for t, c, _ in results if t == threads} for c in CASES):
        return
    refs, plain = (threads, "refs"), (threads, "bytes")
    misses = sum(r["misses"] for t, c, r in results if (t, c) == refs)
    print(f"cpu_threads {threads}, refs / bytes (means over {rounds} rounds): tasks/s "
          f"{ratio(results, refs, plain, 'rate')}, p50 {ratio(results, refs, plain, 'p50')}, "
          f"bytes the node read per task {ratio(results, refs, plain, 'node_read')}, "
          f"node CPU per task {ratio(results, refs, plain, 'node_cpu')}, coordinator CPU per "
          f"task {ratio(results, refs, plain, 'coord_cpu')}; misses {misses}")  # fmt: skip


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
    add_cpu_threads_option(ap)
    args = ap.parse_args()
    if not 1 <= args.models <= len(MODELS) or min(args.rows, args.in_flight, args.rounds) < 1:
        ap.error(f"--models in 1..{len(MODELS)}, and --rows, --in-flight and --rounds >= 1")
    if min(args.cpu_threads) < 0:
        ap.error("--cpu-threads values must be >= 0")
    if not args.seconds > 0 or args.warmup < 0:
        ap.error("--seconds must be > 0 and --warmup >= 0")
    if args.quick:
        args.seconds, args.warmup, args.rounds = 1.0, 0.5, 1
    logging.basicConfig(level=logging.ERROR)
    print(f"python {sys.version.split()[0]}, cpus={psutil.cpu_count()}, "
          f"window={args.seconds}s after {args.warmup}s warm-up, {args.rounds} rounds, "
          f"node cpu_threads {args.cpu_threads}")  # fmt: skip
    inherited = {k: v for k, v in os.environ.items() if k in BLAS_ENV}
    if inherited:  # the node inherits them: they decide what cpu_threads 0 means
        print(f"note: the node inherits {inherited}")
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        results = runner.run(run_all(args))
    report(results, args)


if __name__ == "__main__":
    main()
