"""Task path: coordinator -> encrypted session -> one node daemon -> back, versus Ray.

In one run, on loopback:

(a) meshinfer: the coordinator in this process, ONE node daemon as a separate process
    (:class:`~meshinfer.testing.cluster.LocalCluster`) serving the tiny synthetic model
    ``synthetic-mlp@w10-d1``; single-pattern tasks of one row, submitted through the public API
    (``submit`` then ``wait``), a closed loop keeping ``--in-flight`` (64) tasks outstanding.
    Measured with the journal's default ``synchronous=FULL``, with ``NORMAL`` (WAL + NORMAL
    survives a process crash but may lose the last commits on power loss) and with no journal at
    all (a stub that keeps nothing: the ceiling of the rest of the path, NOT durable), each with
    ``--in-flight`` tasks and with a single task in flight (the unloaded round trip).
(b) Ray: ``ray.init(num_cpus=2)``, a remote function doing the same tiny MLP forward pass, the
    same closed loop (``ray.wait`` keeps ``--in-flight`` outstanding), and with one in flight.

Prints tasks/s and submit->result p50/p99 per case, the ratios meshinfer / Ray, whether the
goals (>= 5x Ray's tasks/s, p50 under 1 ms) are met, and a per-task cost breakdown of the
meshinfer coordinator (journal time per call, CPU per task in this process and in the node
process, and each item's round trip from the coordinator's send to its result's arrival,
without the journal and the client: see :class:`WireTimes`). ``--profile`` adds a cProfile of
the coordinator's loop thread (sorted by ``PROFILE_SORT``, default tottime, ``PROFILE_LINES``
lines, default 25). Ray is a bench-only
dependency (``pip install ray``); without it meshinfer's figures are printed alone. Usage::

    python bench/bench_tasks.py [--seconds 5] [--in-flight 64] [--quick] [--no-ray] [--profile]
        [--rounds 3]

``--rounds N`` repeats the whole run N times (each round: meshinfer's cases, then Ray's) and
judges the goals on the median ratio and the median p50 as well as per round: on a noisy
machine both sides move by a quarter between runs minutes apart.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import math
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.identity_files import NodeDirectory
from meshinfer.inference.base import ModelRef
from meshinfer.inference.mlp import forward
from meshinfer.inference.synthetic import SyntheticSpec, make_weights
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.tasks import Pattern, TaskSpec, new_task_id
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime.heap import settle_heap
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.cluster import LocalCluster
from node.config import CPU_THREADS

TINY = SyntheticSpec(10, 1)
TINY_REF = ModelRef(TINY.ref.model_id, TINY.ref.version)
NODE_EXTRA = (
    f'[inference]\nmodels = ["{TINY_REF.model_id}@{TINY_REF.version}"]\n'
    "max_queue_delay_ms = 0.0\n"
    "[executor]\nmax_concurrent = 256\noffload_queue_depth = 100000\n"
)
#: The journal's ``synchronous`` settings measured; "none": no journal at all (the ceiling).
SYNC_MODES = ("FULL", "NORMAL", "none")
#: The journal calls the coordinator makes for a task (each one timed).
JOURNAL_CALLS = ("accept", "mark_dispatched", "mark_running", "take_result")


class Figures:
    """Latencies (seconds) of the tasks completed in the measuring window, and its length."""

    def __init__(self, latencies: list[float], seconds: float) -> None:
        self.latencies = sorted(latencies)
        self.seconds = seconds

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def pct(self, q: float) -> float:
        """Nearest-rank percentile (``q`` in 0..1): the smallest latency with at least ``q`` of
        them at or below it (of fewer than 100, p99 is the largest)."""
        s = self.latencies
        return s[max(0, math.ceil(q * len(s)) - 1)] if s else float("nan")


# --- the measuring loop shared by both systems ------------------------------------------------


class Window:
    """Warm-up, then a measuring window; the tasks that complete inside it are kept, whenever
    they were submitted (a closed loop has tasks in flight when the window opens: leaving them
    out would count ``in_flight`` fewer tasks than completed, more of a slower system's)."""

    def __init__(self, warmup: float, seconds: float) -> None:
        self.start = time.perf_counter() + warmup
        self.end = self.start + seconds
        self.latencies: list[float] = []

    def record(self, t0: float, t1: float) -> None:
        if self.start <= t1 <= self.end:
            self.latencies.append(t1 - t0)

    @property
    def over(self) -> bool:
        return time.perf_counter() >= self.end

    def figures(self) -> Figures:
        return Figures(self.latencies, self.end - self.start)


# --- (a) meshinfer ----------------------------------------------------------------------------


class TimedJournal:
    """Wraps a journal's methods to add up the time each takes (on the journal thread)."""

    def __init__(self, journal) -> None:
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        for name in JOURNAL_CALLS:
            if hasattr(journal, name):  # a stand-in may lack accept()
                setattr(journal, name, self._wrap(name, getattr(journal, name)))

    def _wrap(self, name: str, method: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


class WireTimes:
    """Each item's trip as the coordinator sees it, from handing its ``TaskAssign`` to the peer
    table to its ``TaskResult`` reaching the coordinator's handler: the session's writer,
    encryption, loopback TCP, the node daemon (decode, queue, forward pass, answer) and the way
    back, decryption and dispatch included; the journal, the client's ``submit`` and ``wait``
    not. The issue's "round trip from the coordinator through an encrypted session to one node
    and back", read narrowly. Hooks two of the coordinator's private methods (a bench only);
    install before :meth:`Coordinator.start`, which registers the result handler."""

    def __init__(self, c: Coordinator) -> None:
        self.latencies: list[float] = []
        self._sent: dict[tuple[str, int], float] = {}
        send, on_result = c._send_message, c._on_result

        def timed_send(run, entry, node):
            self._sent[entry.item.item_id, entry.attempt] = time.perf_counter()
            return send(run, entry, node)

        def timed_result(peer, msg):
            t0 = self._sent.pop((msg.item_id, msg.attempt), None)
            if t0 is not None:
                self.latencies.append(time.perf_counter() - t0)
            return on_result(peer, msg)

        c._send_message, c._on_result = timed_send, timed_result

    def reset(self) -> None:
        self.latencies.clear()

    def pct(self, q: float) -> float:
        return Figures(self.latencies, 1.0).pct(q)


class NullJournal:
    """Keeps nothing: the ceiling of the coordinator path without any journal work (NOT durable)."""

    def __init__(self) -> None:
        self.ended: set[str] = set()

    def accept(self, spec: TaskSpec, items: object = None) -> bool:
        return True

    def mark_dispatched(self, *args) -> None:
        pass

    def mark_running(self, *args) -> bool:
        return True

    def take_result(self, *args, ending=None, **kwargs) -> tuple[bool, tuple | None]:
        return True, None if ending is None else self.end_task(ending)

    def end_task(self, ending) -> tuple[list, SimpleNamespace | None]:
        self.ended.add(ending.task_id)
        return [], self.get(ending.task_id) if ending.read_back else None

    def get(self, task_id: str) -> SimpleNamespace:
        state = "succeeded" if task_id in self.ended else "running"
        return SimpleNamespace(state=SimpleNamespace(value=state))

    def close(self) -> None:
        pass


def serving(c: Coordinator) -> bool:
    return any(n["models"] and n["status"] == "alive" for n in c.nodes())


async def start_coordinator(cluster: LocalCluster, tmp: Path, synchronous: str, in_flight):
    """A fresh coordinator (own identity and journal); ``synchronous="none"`` swaps its journal
    for a :class:`NullJournal`."""
    name = f"coord-{synchronous}-{in_flight}-{time.monotonic_ns()}"
    ident = NodeDirectory(cluster.enroll(name, roles=("coordinator",))).load()
    revocations = NodeDirectory(cluster.root / "nodes" / name).revocations(ident.trust)
    journal = tmp / f"{name}.db"
    opts = MeshNodeOptions(mdns=MdnsConfig.loopback(), membership=MembershipConfig.test())
    mesh = MeshNode(ident, revocations, opts)
    await mesh.start()
    config = CoordinatorConfig(
        journal_synchronous="NORMAL" if synchronous == "none" else synchronous,
        max_in_flight_per_node=max(in_flight, 1),
        node_capacity=max(in_flight, 1),
    )
    coordinator = Coordinator(mesh, journal, config)
    coordinator.wire = WireTimes(coordinator)
    await coordinator.start()
    if synchronous == "none":
        coordinator.journal.close()
        coordinator.journal = NullJournal()
    async with asyncio.timeout(30):
        while not serving(coordinator):  # noqa: ASYNC110 (polling the public view)
            await asyncio.sleep(0.05)
    return mesh, coordinator


def task_ids(kind: str) -> Callable[[], str]:
    """Task ids as the HTTP API makes them (``ordered``: by creation time) or uniformly random
    (``random``: what a client choosing its own random ids sends; the journal's indexes then
    take each new task at a random place)."""
    rng = random.Random(0)
    if kind == "random":
        return lambda: f"{rng.getrandbits(128):032x}"
    return lambda: new_task_id(rng, time.time())


async def mesh_loop(c: Coordinator, window: Window, in_flight: int, ids: str) -> None:
    x = Tensor.from_array(np.random.default_rng(0).random((1, TINY.width), dtype=np.float32))
    new_id = task_ids(ids)

    async def worker(w: int) -> None:
        while not window.over:
            spec = TaskSpec(new_id(), Pattern.SINGLE, x, (TINY_REF,))
            t0 = time.perf_counter()
            task_id = await c.submit(spec)
            record = await c.wait(task_id)
            window.record(t0, time.perf_counter())
            if record.state.value != "succeeded":
                raise RuntimeError(f"task {task_id} ended {record.state.value}")

    await asyncio.gather(*(worker(w) for w in range(in_flight)))


async def mesh_case(cluster, tmp: Path, synchronous: str, in_flight: int, args, node_pid: int):
    mesh, c = await start_coordinator(cluster, tmp, synchronous, in_flight)
    if args.heap == "settled":
        settle_heap()  # as the coordinator daemon does once ready
    timed = TimedJournal(c.journal)
    me, node = psutil.Process(), psutil.Process(node_pid)
    profile = cProfile.Profile() if args.profile and in_flight > 1 else None
    try:
        window = Window(args.warmup, args.seconds)
        loop_task = asyncio.create_task(mesh_loop(c, window, in_flight, args.ids))
        await asyncio.sleep(args.warmup)
        timed.reset()
        c.wire.reset()
        groups0, calls0 = c._db.groups, c._db.calls
        wire0 = session_counts(mesh)
        cpu0, ncpu0 = me.cpu_times(), node.cpu_times()
        if profile:
            profile.enable()
        await loop_task
        if profile:
            profile.disable()
        cpu1, ncpu1 = me.cpu_times(), node.cpu_times()
        groups, calls = c._db.groups - groups0, c._db.calls - calls0
        wire = [b - a for a, b in zip(wire0, session_counts(mesh), strict=True)]
    finally:
        await c.aclose()
        await mesh.aclose()
    figures = window.figures()
    n = max(1, len(figures.latencies))
    breakdown = {
        "journal": {k: timed.seconds[k] / n for k in JOURNAL_CALLS if timed.calls[k]},
        "coordinator_cpu": cpu_between(cpu0, cpu1) / n,
        "node_cpu": cpu_between(ncpu0, ncpu1) / n,
        "coordinator_sys": (cpu1.system - cpu0.system) / n,
        "groups": groups / n,
        "group_size": calls / max(1, groups),
        # the coordinator's messages per Noise message (record), sent and received
        "packing": (wire[0] / max(1, wire[1]), wire[2] / max(1, wire[3])),
        # coordinator -> node -> coordinator, per item (seconds): p50, p99
        "wire_rtt": (c.wire.pct(0.5), c.wire.pct(0.99)),
    }
    return figures, breakdown, profile


def add_cpu_threads_option(ap: argparse.ArgumentParser) -> None:
    """``--cpu-threads N [N ...]``: the node's ``[inference] cpu_threads``, one node per value."""
    ap.add_argument(
        "--cpu-threads",
        type=int,
        nargs="+",
        default=[CPU_THREADS],
        help="the node's [inference] cpu_threads; several: a node per value, alternated",
    )


def session_counts(mesh: MeshNode) -> tuple[int, int, int, int]:
    """The coordinator's messages and records sent, then received, over all its sessions."""
    m = mesh.metrics
    return m.messages_sent, m.records_sent, m.messages_received, m.records_received


def cpu_between(t0, t1) -> float:
    return t1.user + t1.system - t0.user - t0.system


async def mesh_all(args) -> dict[str, tuple[Figures, dict, cProfile.Profile | None]]:
    out = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        with LocalCluster(tmp, fleet_id="bench-tasks") as cluster:
            await mesh_cases(cluster, tmp, args, out)
    return out


async def mesh_cases(cluster: LocalCluster, tmp: Path, args, out: dict) -> None:
    cluster.add_node("worker", extra="[http]\nenabled = false\n" + NODE_EXTRA)
    pid = cluster.start("worker").proc.pid
    for in_flight in dict.fromkeys((args.in_flight, 1)):  # (each once with --in-flight 1)
        for synchronous in SYNC_MODES:
            if args.only and f"{synchronous}/{in_flight}" not in args.only:
                continue
            out[f"{synchronous}/{in_flight}"] = await mesh_case(
                cluster, tmp, synchronous, in_flight, args, pid
            )


# --- (b) Ray ----------------------------------------------------------------------------------


def ray_case(in_flight: int, args) -> Figures:
    import ray

    weights = make_weights(TINY)

    @ray.remote
    def infer(w, batch):
        return forward(w, batch)

    w_ref = ray.put(weights)
    x = np.random.default_rng(0).random((1, TINY.width), dtype=np.float32)
    # Ray warm before the clock starts, as meshinfer's node is (started and serving before its
    # cases): its worker processes start on the first tasks, which can take longer than --warmup.
    ray.get([infer.remote(w_ref, x) for _ in range(max(in_flight, 2))])
    window = Window(args.warmup, args.seconds)
    started: dict = {}
    for _ in range(in_flight):
        started[infer.remote(w_ref, x)] = time.perf_counter()
    while not window.over:
        done, _ = ray.wait(list(started), num_returns=1)
        for ref in done:
            ray.get(ref)
            window.record(started.pop(ref), time.perf_counter())
            started[infer.remote(w_ref, x)] = time.perf_counter()
    ray.get(list(started))
    return window.figures()


def ray_all(args) -> tuple[str, dict[int, Figures]]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        figures = {args.in_flight: ray_case(args.in_flight, args), 1: ray_case(1, args)}
        return ray.__version__, figures
    finally:
        ray.shutdown()


# --- report -----------------------------------------------------------------------------------


def line(text: str, f: Figures) -> None:
    print(
        f"{text:<40}{f.rate:>10,.0f}{f.pct(0.5) * 1e3:>10.3f}{f.pct(0.99) * 1e3:>10.3f}"
        f"{len(f.latencies):>9}"
    )


def label(key: str) -> str:
    sync, n = key.split("/")
    journal = "no journal (ceiling)" if sync == "none" else f"sync={sync}"
    return f"meshinfer {n} in flight, {journal}"


def report(args, mesh, ray_version: str | None, ray_figs, ray_error: str | None) -> None:
    k = args.in_flight
    print(f"{'case':<40}{'tasks/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'tasks':>9}")
    for key, (figures, _, _) in mesh.items():
        line(label(key), figures)
    if ray_figs:
        for n in (k, 1):
            line(f"ray {ray_version} {n} in flight", ray_figs[n])
        print("\nratios meshinfer / ray (tasks/s: higher is better; p50: lower is better)")
        for sync in SYNC_MODES:
            m, r = mesh[f"{sync}/{k}"][0], ray_figs[k]
            m1, r1 = mesh[f"{sync}/1"][0], ray_figs[1]
            print(
                f"  {sync:<6} {k} in flight: tasks/s x{m.rate / r.rate:.2f}, "
                f"p50 x{m.pct(0.5) / r.pct(0.5):.2f};  1 in flight: tasks/s "
                f"x{m1.rate / r1.rate:.2f}, p50 x{m1.pct(0.5) / r1.pct(0.5):.2f}"
            )
        goals(mesh, ray_figs, k)
    else:
        print(f"\nray not measured: {ray_error}")
        print_ceiling_ratios(mesh)
    breakdown(mesh)


def ceiling_ratios(rates: dict[str, float]) -> list[str]:
    """Each journal case's tasks/s over the no-journal ceiling's at the same in-flight count
    (the baseline measured in the same run when Ray is not), for the cases whose ceiling ran."""
    out = []
    for key, rate in rates.items():
        sync, n = key.split("/")
        ceiling = rates.get(f"none/{n}")
        if sync != "none" and ceiling:
            out.append(f"{key} / none/{n} tasks/s x{rate / ceiling:.2f}")
    return out


def print_ceiling_ratios(mesh) -> None:
    ratios = ceiling_ratios({key: figures.rate for key, (figures, _, _) in mesh.items()})
    if ratios:
        print("ratios to the no-journal ceiling: " + ", ".join(ratios))


def goals(mesh, ray_figs, k: int) -> None:
    full, ray = mesh[f"FULL/{k}"][0], ray_figs[k]
    p50 = mesh["FULL/1"][0].pct(0.5)
    throughput = "met" if full.rate >= 5 * ray.rate else "missed"
    latency = "met" if p50 < 1e-3 else "missed"
    print(
        f"goals (default durability, sync=FULL): tasks/s >= 5x ray: {throughput} "
        f"(x{full.rate / ray.rate:.2f}); p50 < 1 ms with 1 in flight: {latency} "
        f"({p50 * 1e3:.2f} ms; with {k} in flight p50 is bounded below by "
        f"{k}/tasks_per_s = {k / full.rate * 1e3:.1f} ms, Little's law)"
    )
    wire = mesh["FULL/1"][1]["wire_rtt"][0]
    print(
        f"  (p50 is submit -> durable result, both journal syncs included; the item's round trip "
        f"coordinator -> node -> coordinator alone, 1 in flight: p50 {wire * 1e3:.2f} ms)"
    )


def breakdown(mesh) -> None:
    print("\nper-task cost, meshinfer (microseconds per completed task; journal = wall time of")
    print("each call on the journal thread, GIL waits included)")
    for key, (_, b, _) in mesh.items():
        journal = " ".join(f"{name}={t * 1e6:.0f}" for name, t in b["journal"].items())
        total = sum(b["journal"].values()) * 1e6
        print(f"  {key:<10} journal {total:.0f} ({journal})")
        print(
            f"  {'':<10} coordinator process CPU {b['coordinator_cpu'] * 1e6:.0f} "
            f"(system {b['coordinator_sys'] * 1e6:.0f}), "
            f"node process CPU {b['node_cpu'] * 1e6:.0f}"
        )
        print(
            f"  {'':<10} journal groups (transactions) per task {b['groups']:.2f}, "
            f"calls per group {b['group_size']:.1f}"
        )
        sent, received = b["packing"]
        print(
            f"  {'':<10} coordinator's messages per Noise message: sent {sent:.1f}, "
            f"received {received:.1f}"
        )
        p50, p99 = b["wire_rtt"]
        print(
            f"  {'':<10} item round trip coordinator -> node -> coordinator (no journal, "
            f"no client): p50 {p50 * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms"
        )
    order = os.environ.get("PROFILE_SORT", "tottime")
    lines = int(os.environ.get("PROFILE_LINES", 25))
    for key, (_, _, profile) in mesh.items():
        if profile is not None:
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats(order).print_stats(lines)
            print(f"\ncProfile of the coordinator process, {key} (event-loop thread only)")
            print(text.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring window per case")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up per case")
    ap.add_argument("--in-flight", type=int, default=64, help="tasks kept outstanding")
    ap.add_argument("--quick", action="store_true", help="short windows (smoke run)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray baseline")
    ap.add_argument("--profile", action="store_true", help="cProfile the loaded meshinfer cases")
    ap.add_argument(
        "--only", nargs="+", help="only these meshinfer cases, e.g. FULL/64 none/1 (no Ray)"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the whole run (meshinfer, then Ray) and judge the goals on the medians",
    )
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument(
        "--ids",
        choices=("ordered", "random"),
        default="ordered",
        help="task ids as the HTTP API makes them (by creation time) or uniformly random",
    )
    ap.add_argument(
        "--heap",
        choices=("settled", "default"),
        default="settled",
        help="the coordinator's garbage collector as the daemon sets it once ready, or"
        " CPython's defaults (the node daemon always settles its own)",
    )
    args = ap.parse_args()
    problem = bad_options(args)
    if problem:
        ap.error(problem)
    logging.basicConfig(level=logging.ERROR)  # the fast path logs a warning per kill
    if args.quick:
        args.seconds, args.warmup = 1.0, 0.5
    print(f"python {sys.version.split()[0]}, loop={args.loop}, cpus={psutil.cpu_count()}, "
          f"window={args.seconds}s after {args.warmup}s warm-up, {args.ids} task ids,"
          f" {args.heap} heap, {args.rounds} round(s)")  # fmt: skip
    compared = []
    for n in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"\n=== round {n} of {args.rounds} ===")
        mesh = run_mesh(args)
        if args.only:
            print(f"{'case':<40}{'tasks/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'tasks':>9}")
            for key, (figures, _, _) in mesh.items():
                line(label(key), figures)
            print_ceiling_ratios(mesh)
            breakdown(mesh)
            continue
        ray_version, ray_figs, ray_error = None, None, None
        if not args.no_ray:
            try:
                ray_version, ray_figs = ray_all(args)
            except ImportError as exc:
                ray_error = f"ray is not installed ({exc}); pip install ray"
        else:
            ray_error = "--no-ray"
        report(args, mesh, ray_version, ray_figs, ray_error)
        if ray_figs:
            compared.append((mesh, ray_figs))
    if len(compared) > 1:
        summary(compared, args.in_flight)


def bad_options(args) -> str | None:
    """What is wrong with the parsed options, or None: a window that could not measure, or an
    ``--only`` case this run would not have (it would run nothing and print nothing)."""
    if args.seconds <= 0 or args.warmup < 0:
        return "--seconds must be > 0 and --warmup >= 0"
    if args.in_flight < 1 or args.rounds < 1:
        return "--in-flight and --rounds must be at least 1"
    cases = [f"{s}/{n}" for n in dict.fromkeys((args.in_flight, 1)) for s in SYNC_MODES]
    unknown = [case for case in args.only or () if case not in cases]
    if unknown:
        known = " ".join(cases)
        return f"--only: no case {', '.join(unknown)} (with --in-flight {args.in_flight}: {known})"
    return None


def run_mesh(args) -> dict[str, tuple[Figures, dict, cProfile.Profile | None]]:
    if args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(mesh_all(args))
    return asyncio.run(mesh_all(args))


def summary(compared: list, k: int) -> None:
    """The goals judged on the median of the rounds (each round measures meshinfer, then Ray,
    so a slow or fast spell of the machine lands in one round rather than on one side)."""
    ratios = [mesh[f"FULL/{k}"][0].rate / ray[k].rate for mesh, ray in compared]
    p50s = [mesh["FULL/1"][0].pct(0.5) for mesh, _ in compared]
    ratio, p50 = statistics.median(ratios), statistics.median(p50s)
    print(f"\nacross {len(compared)} rounds (median; each round meshinfer then Ray):")
    each = ", ".join(f"x{r:.2f}" for r in ratios)
    print(f"  FULL/{k} tasks/s / ray: {each} -> median x{ratio:.2f}")
    each = ", ".join(f"{p * 1e3:.2f}" for p in p50s)
    print(f"  FULL/1 p50 ms: {each} -> median {p50 * 1e3:.2f}")
    print(
        f"goals on the medians: tasks/s >= 5x ray: {'met' if ratio >= 5 else 'missed'}"
        f" (x{ratio:.2f}); p50 < 1 ms with 1 in flight: {'met' if p50 < 1e-3 else 'missed'}"
        f" ({p50 * 1e3:.2f} ms)"
    )


if __name__ == "__main__":
    main()
