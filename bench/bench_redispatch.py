"""Kill-to-re-dispatch: how long a SIGKILLed node's work items wait before running elsewhere.

Each trial, on loopback with the ``lan`` membership preset: the coordinator in this process, two
node daemons as separate processes (:class:`~meshinfer.testing.cluster.LocalCluster`) serving
the tiny ``synthetic-mlp@w10-d1``, and a steady stream of single-row tasks (a closed loop of
``--in-flight`` outstanding tasks, spread over both nodes). After a second of stream, node X is
SIGKILLed; the trial measures the time until no work item is in flight on X any more (every
item X held was re-dispatched to the other node), and when membership declared X dead. Every
task must then succeed with its result accepted exactly once.

Two modes in the same run: ``membership only`` (``redial_timeout_s=0``: items move when SWIM
declares X dead, the baseline) and ``fast path`` (the default: X must answer a ping, over
another session or a re-dial, within 250 ms; else its items move at once). Prints median and
max per mode and the ratio.
Usage::

    python bench/bench_redispatch.py [--trials 5] [--quick]
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.identity_files import NodeDirectory
from meshinfer.inference.base import ModelRef
from meshinfer.proto.membership import MemberEvent, MemberEventKind, MembershipConfig
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.cluster import LocalCluster

TINY = ModelRef("synthetic-mlp", "w10-d1")
#: One item at a time, each waiting 20 ms in the batcher for company: a node does ~50 items/s,
#: far below what the coordinator can feed it, so it holds a queue of unfinished items (about
#: half of the stream) when it is killed.
NODE_EXTRA = (
    '[http]\nenabled = false\n[inference]\nmodels = ["synthetic-mlp@w10-d1"]\n'
    "max_queue_delay_ms = 20.0\ndispatch_when_idle = false\n"
    "[executor]\nmax_concurrent = 1\noffload_queue_depth = 100000\n"
)
VICTIM, SURVIVOR = "veh-x", "veh-y"


@dataclass
class Trial:
    held: int  # items in flight on the victim when it was killed
    redispatched_s: float  # kill -> no item in flight on the victim
    dead_s: float | None  # kill -> membership declared the victim dead (None: not within the trial)
    tasks: int
    duplicates: int
    fast: int  # items moved by the fast path


async def coordinator_for(cluster: LocalCluster, tmp: Path, redial: float):
    ident = NodeDirectory(cluster.enroll("coord", roles=("coordinator",))).load()
    revocations = NodeDirectory(cluster.root / "nodes" / "coord").revocations(ident.trust)
    opts = MeshNodeOptions(mdns=MdnsConfig.loopback(), membership=MembershipConfig.lan())
    mesh = MeshNode(ident, revocations, opts)
    await mesh.start()
    config = CoordinatorConfig(redial_timeout_s=redial, max_in_flight_per_node=64)
    coordinator = Coordinator(mesh, tmp / "journal.db", config)
    await coordinator.start()
    return mesh, coordinator


def serving(c: Coordinator) -> int:
    return sum(n["status"] == "alive" and bool(n["models"]) for n in c.nodes())


def in_flight_on(c: Coordinator, node: str) -> int:
    return next((n["in_flight"] for n in c.nodes() if n["node_id"] == node), 0)


async def until(predicate, timeout: float = 30.0, step: float = 0.002) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 (polling the coordinator's public view)
            await asyncio.sleep(step)


async def settled(predicate, hold: float, timeout: float = 30.0, step: float = 0.002) -> float:
    """The loop time from which ``predicate`` held for ``hold`` seconds without a break."""
    loop = asyncio.get_running_loop()
    since = None
    async with asyncio.timeout(timeout):
        while since is None or loop.time() - since < hold:
            now = loop.time()
            since = (since or now) if predicate() else None
            await asyncio.sleep(step)
    return since


class Stream:
    """A closed loop of ``width`` outstanding single-row tasks until :meth:`stop`."""

    def __init__(self, c: Coordinator, width: int) -> None:
        self.c, self.stopping, self.done, self.failed = c, False, 0, []
        x = np.random.default_rng(1).random((1, 10), dtype=np.float32)
        self.x = Tensor.from_array(x)
        self.workers = [asyncio.create_task(self._worker(w)) for w in range(width)]

    async def _worker(self, w: int) -> None:
        n = 0
        while not self.stopping:
            n += 1
            task_id = await self.c.submit(TaskSpec(f"s{w}-{n}", Pattern.SINGLE, self.x, (TINY,)))
            record = await self.c.wait(task_id, timeout=60)
            self.done += 1
            if record.state.value != "succeeded":
                self.failed.append((task_id, record.state.value))

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.gather(*self.workers)

    async def cancel(self) -> None:
        """Stop at once (a trial that failed): no worker is left behind the coordinator's close."""
        for worker in self.workers:
            worker.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)


async def trial(tmp: Path, redial: float, width: int) -> Trial:
    loop = asyncio.get_running_loop()
    with LocalCluster(tmp, fleet_id=f"redispatch-{tmp.name}", preset="lan") as cluster:
        for name in (VICTIM, SURVIVOR):
            cluster.add_node(name, extra=NODE_EXTRA)
            cluster.start(name)
        mesh, c = await coordinator_for(cluster, tmp, redial)
        deaths: dict[str, float] = {}

        def on_member(event: MemberEvent) -> None:
            if event.kind == MemberEventKind.DEAD:
                deaths.setdefault(event.member.node_id, loop.time())

        mesh.membership.subscribe(on_member)
        stream = None
        try:
            await until(lambda: serving(c) == 2, step=0.05)
            stream = Stream(c, width)
            await until(lambda: c.stats_.completed_by_node[VICTIM] > 20, step=0.01)
            # a queue on X when it dies (about half the stream waits there: see NODE_EXTRA)
            await until(lambda: in_flight_on(c, VICTIM) > min(10, width // 4))
            held = in_flight_on(c, VICTIM)
            killed = loop.time()
            os.kill(cluster.processes[VICTIM].proc.pid, signal.SIGKILL)
            # Items reach X until it is excluded, and X's last results still arrive: the time
            # that counts is when X's in-flight count dropped to zero for good.
            moved = await settled(lambda: in_flight_on(c, VICTIM) == 0, hold=1.0)
            await stream.stop()
            if stream.failed:
                raise RuntimeError(f"tasks failed: {stream.failed[:3]}")
            stats = await c.stats()
            dead = deaths.get(VICTIM)
            return Trial(
                held,
                moved - killed,
                None if dead is None else dead - killed,
                stream.done,
                stats["duplicates"] + stats["journal_counters"].get("duplicate_results", 0),
                stats["redispatched_after_disconnect"],
            )
        finally:
            if stream is not None:
                await stream.cancel()
            await c.aclose()
            await mesh.aclose()


def summary(label: str, trials: list[Trial]) -> float:
    moved = [t.redispatched_s for t in trials]
    dead = [t.dead_s for t in trials if t.dead_s is not None]
    med = statistics.median(moved)
    dead_text = f"{statistics.median(dead):.3f} s" if dead else "later than the re-dispatch"
    print(
        f"{label:<18} kill->re-dispatched median {med:.3f} s, max {max(moved):.3f} s;"
        f" kill->declared dead median {dead_text}"
    )
    for t in trials:
        dead_s = "-" if t.dead_s is None else f"{t.dead_s:.3f}"
        print(
            f"    held {t.held:>3} items, re-dispatched after {t.redispatched_s:.3f} s "
            f"(fast path moved {t.fast}), dead after {dead_s} s, {t.tasks} tasks, "
            f"{t.duplicates} duplicate results"
        )
    return med


async def main_async(args) -> None:
    results: dict[str, list[Trial]] = {"membership only": [], "fast path": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        for i in range(args.trials):
            for label, redial in (("membership only", 0.0), ("fast path", 0.25)):
                tmp = Path(tmpdir) / f"{'fast' if redial else 'swim'}-{i}"
                tmp.mkdir()
                results[label].append(await trial(tmp, redial, args.in_flight))
    print(f"{args.trials} trials per mode, lan preset, {args.in_flight} tasks in flight")
    base = summary("membership only", results["membership only"])
    fast = summary("fast path", results["fast path"])
    print(f"ratio membership-only / fast path (median): {base / fast:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5, help="trials per mode")
    ap.add_argument("--in-flight", type=int, default=64, help="tasks kept outstanding")
    ap.add_argument("--quick", action="store_true", help="2 trials per mode")
    args = ap.parse_args()
    if args.trials < 1 or args.in_flight < 2:
        ap.error("--trials must be at least 1 and --in-flight at least 2 (two nodes)")
    logging.basicConfig(level=logging.ERROR)  # the fast path logs a warning per kill
    if args.quick:
        args.trials = 2
    started = time.perf_counter()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main_async(args))
    print(f"(run took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
