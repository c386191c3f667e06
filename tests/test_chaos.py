"""Chaos: the whole product under a seeded random schedule of process faults.

A coordinator (``meshinfer-coord serve``: SQLite WAL journal, HTTP API) and three node daemons
(``meshinfer-node run``) run as real processes on loopback, found by mDNS. A thread submits a
stream of tasks over the HTTP API -- batch (sharded), single, parallel (the three digits models,
majority or all) and pipeline (digits-mlp feeding a synthetic head) -- while the test applies a
schedule drawn from ``random.Random(seed)``: SIGKILL a node, SIGTERM (drain) a node, SIGKILL or
SIGTERM the coordinator, restart what is down, with short random pauses, never taking the last
node down, SIGKILLing a node at least once while the coordinator runs. Before it signals a node
while the coordinator runs, the test waits (bounded) until the coordinator has items in flight
there, and after a SIGKILL until it moved them elsewhere: every seed's faults catch work in
flight. A submission that got no answer (the coordinator was down) is sent again, same task
id and spec, until the API acknowledges it. Then every process is restored and the promises are
checked end to end:

* every task the API acknowledged ends ``succeeded``, with the outputs the models give here,
  each item within ``max_attempts`` (plus one per coordinator restart: recovery runs again, as
  a new attempt, every item whose fate it cannot know);
* none is missing from the listing, the journal holds no live task or item, and every
  duplicate result a coordinator counted is in the journal's counters;
* a node SIGKILLed with items in flight has them moved elsewhere at once (fast failover);
* no attempt times out on a node that ran all along: a node answers every item it takes, or
  hands it back (the item timeout is for nodes that die silently);
* SIGTERM stops a daemon cleanly (exit 0) and the restarted nodes rejoin the mesh;
* no process logged a traceback, an ERROR or CRITICAL line, or a never-retrieved task exception.

The schedule and a summary are printed so that a failure can be replayed:
``MESHINFER_CHAOS_SEEDS=7,8 pytest tests/test_chaos.py -s`` (the interleaving of faults and
messages still varies between runs; the schedule and the task stream do not).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.client import ApiError, CoordinatorClient, array_from_json, tensor_json
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.testing.cluster import LocalCluster
from node.daemon import parse_model_ref
from tests.helpers import api_client, labels_reference, nodes_ready

pytestmark = pytest.mark.slow

SEEDS = tuple(int(s) for s in os.environ.get("MESHINFER_CHAOS_SEEDS", "7").split(","))
COORD = "coord"
NODES = ("veh-1", "veh-2", "veh-3")
DIGITS = "digits-mlp@1"
MODELS = (DIGITS, "digits-mlp-wide@1", "digits-mlp-deep@1")
HEAD = "synthetic-mlp@w10-d1"  # takes a digits model's 10 outputs: a two-stage pipeline
#: Nodes slow enough that every fault catches work in flight, as test_coordinator_restart's
#: SLOW_NODE: one item at a time, each batch held 60 ms (~16 items/s a node, about what the
#: stream submits): items queue, so a killed node always holds some, and the pipeline's head.
NODE_EXTRA = (
    "[executor]\nmax_concurrent = 1\n"
    "[inference]\nmax_queue_delay_ms = 60.0\ndispatch_when_idle = false\n"
    f"models = {json.dumps([*MODELS, HEAD])}\n"
)
#: Attempts may run out only through a bug: far more than the faults one item can meet.
MAX_ATTEMPTS = 8
#: Longer than any honest wait in a node's queue (every item in flight on one node, twice over
#: after a coordinator restart: ~200 x 60 ms), so an attempt that times out on a node that ran
#: all along lost its answer; shorter than the default 30 s, which would outlast the test.
ITEM_TIMEOUT_S = 20.0
COORD_SETTINGS = f"max_attempts = {MAX_ATTEMPTS}\nitem_timeout_s = {ITEM_TIMEOUT_S}\n"
STEPS = 10
MIN_TASKS = 20
PAUSE_S = (0.2, 1.5)
WAIT_S = 60.0
#: How long a fault on a node waits for the coordinator to have items in flight there (it
#: usually has some at once: the nodes are slow), and a SIGKILL for them to be moved elsewhere
#: (the session's loss and a failed re-dial: about ``redial_timeout_s``).
HOLD_WAIT_S = 5.0
MOVE_WAIT_S = 5.0
COUNTERS = ("dispatched", "retries", "duplicates", "redispatched_after_death",
            "redispatched_after_disconnect", "sessions_lost")  # fmt: skip
SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}
LIVE = ("pending", "dispatched", "running", "retrying")
#: The coordinator's log line for an attempt that timed out, and the node's for a work-sharing
#: hop (coordinator/service_outcomes.py ``_retry``, service_dispatch.py ``_on_timeout``;
#: node/work_sharing.py ``_offload``).
TIMED_OUT = re.compile(
    r"^(\S+ \S+),(\d+) INFO coordinator\.service: retrying (\S+) \(attempt (\d+) failed:"
    r" no answer from (\S+) in "
)
OFFLOADED = re.compile(r"node\.executor: offloaded (\S+) to ")
#: The coordinator's log line for an attempt a node refused (e.g. draining): not counted.
REFUSED = re.compile(r"coordinator\.service: retrying (\S+) \(attempt \d+ refused: ")
BAD_LOG_LINE = re.compile(r"Traceback|Task exception was never retrieved|CRITICAL| ERROR ")
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


# --- the fault schedule ----------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """After ``pause_s``, ``action`` ("sigkill", "sigterm" or "restart") on ``target``."""

    pause_s: float
    action: str
    target: str

    def __str__(self) -> str:
        return f"+{self.pause_s:.2f}s {self.action} {self.target}"


def draw_schedule(rng: random.Random, steps: int = STEPS) -> list[Fault]:
    """``steps`` faults and restarts, at least one SIGKILL of a node while the coordinator runs
    and one of the coordinator, at least one node always up; then the restarts that bring every
    process back."""
    down: set[str] = set()
    faults: list[Fault] = []

    def add(action: str, target: str) -> None:
        faults.append(Fault(rng.uniform(*PAUSE_S), action, target))
        (down.discard if action == "restart" else down.add)(target)

    for _ in range(steps):
        add(*rng.choice(_choices(down)))
    if not _kills_a_node_under_the_coordinator(faults):
        if COORD in down:
            add("restart", COORD)
        if len(NODES) - len(down - {COORD}) < 2:
            add("restart", rng.choice(sorted(down - {COORD})))
        add("sigkill", rng.choice([n for n in NODES if n not in down]))
    if not any(f.action == "sigkill" and f.target == COORD for f in faults):
        if COORD in down:
            add("restart", COORD)
        add("sigkill", COORD)
    return faults + [Fault(0.0, "restart", target) for target in sorted(down)]


def _kills_a_node_under_the_coordinator(faults: list[Fault]) -> bool:
    """Whether ``faults`` SIGKILL a node while the coordinator runs (it sees items move)."""
    coordinator_up = True
    for fault in faults:
        if fault.target == COORD:
            coordinator_up = fault.action == "restart"
        elif fault.action == "sigkill" and coordinator_up:
            return True
    return False


def _choices(down: set[str]) -> list[tuple[str, str]]:
    up = [n for n in NODES if n not in down]
    choices = [("restart", target) for target in sorted(down) for _ in range(2)]
    if COORD not in down:
        choices += [("sigkill", COORD), ("sigterm", COORD)]
    if len(up) > 1:
        choices += [(action, n) for n in up for action in SIGNALS]
    return choices


class FaultRunner:
    """Applies a schedule to a cluster; notes when (wall clock, as the logs), exit codes and
    the coordinator's counters. A signal to a node while the coordinator runs waits until the
    coordinator has items in flight on it (notes how many), and a SIGKILL then waits until
    they were moved elsewhere (notes whether they were)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.applied: list[tuple[float, float, Fault]] = []  # began, ended, fault
        self.exit_codes: list[tuple[Fault, int | None]] = []
        self.counters: Counter[str] = Counter()  # summed over the coordinator's lifetimes
        self.down: set[str] = set()
        #: signals to a node while the coordinator ran, with its items in flight there then
        self.held: list[tuple[Fault, int]] = []
        self.stuck: list[Fault] = []  # SIGKILLs whose victim's items were not moved in time

    def run(self, faults: list[Fault]) -> None:
        for fault in faults:
            time.sleep(fault.pause_s)  # the schedule's pause: nothing to wait for
            began = time.time()
            self.apply(fault)
            self.applied.append((began, time.time(), fault))

    def faulted(self, target: str, start: float, end: float) -> bool:
        """Whether ``target`` was signalled or restarted in ``start..end`` (wall clock)."""
        return any(
            f.target == target and began <= end and ended >= start
            for began, ended, f in self.applied
        )

    def apply(self, fault: Fault) -> None:
        if fault.action == "restart":
            start = self.cluster.start_coordinator if fault.target == COORD else self.cluster.start
            start(fault.target)
            self.down.discard(fault.target)
            return
        watched = fault.target != COORD and COORD not in self.down
        if fault.target == COORD:
            self.add_counters()
        elif watched:
            held = self.wait_in_flight(fault.target, HOLD_WAIT_S, above=0)
            self.held.append((fault, held or 0))
        self.cluster.kill(fault.target, SIGNALS[fault.action])
        self.down.add(fault.target)
        self.exit_codes.append((fault, self.cluster.processes[fault.target].proc.returncode))
        if watched and fault.action == "sigkill" and self.held[-1][1]:
            if self.wait_in_flight(fault.target, MOVE_WAIT_S, above=None) != 0:
                self.stuck.append(fault)

    def wait_in_flight(self, node: str, timeout: float, *, above: int | None) -> int | None:
        """Wait until the coordinator lists more than ``above`` items in flight on ``node``
        (None: none at all), at most ``timeout`` s; the number it lists then (None: it never
        answered)."""
        client = api_client(self.cluster)
        seen: list[int | None] = [None]

        def in_flight() -> bool:
            listed = {n["node_id"]: n["in_flight"] for n in client.nodes()["nodes"]}
            seen[0] = count = listed.get(node, 0)
            return count > above if above is not None else not count

        with contextlib.suppress(TimeoutError, ApiError):
            self.cluster.wait_for(in_flight, timeout=timeout, step=0.02)
        return seen[0]

    def add_counters(self) -> None:
        """Add the counters of the coordinator running now (they start again at each start)."""
        try:
            stats = api_client(self.cluster).stats()
        except ApiError:
            return
        for key in COUNTERS:
            self.counters[key] += stats[key]


# --- the task stream -------------------------------------------------------------------------


@dataclass
class Submission:
    """One task of the stream: its pattern, models and the rows of the digits hold-out set."""

    task_id: str
    kind: str  # batch, single, majority, all (parallel tasks), pipeline
    models: tuple[str, ...]
    start: int
    rows: int
    shard_size: int = 1
    tries: int = 0

    def body(self, x: np.ndarray) -> dict[str, Any]:
        """The JSON document POSTed to /v1/tasks."""
        doc: dict[str, Any] = {
            "task_id": self.task_id,
            "inputs": tensor_json(x[self.start : self.start + self.rows]),
        }
        if self.kind in ("batch", "single"):
            doc.update(pattern=self.kind, model=self.models[0])
            if self.kind == "batch":
                doc["shard_size"] = self.shard_size
        elif self.kind == "pipeline":
            first, head = self.models
            doc.update(pattern="pipeline", stages=[
                {"name": "classify", "model": first},
                {"name": "head", "model": head, "after": ["classify"]},
            ])  # fmt: skip
        else:
            doc.update(pattern="parallel", models=list(self.models), aggregation=self.kind)
        return doc


def draw_submission(rng: random.Random, index: int, seed: int, total_rows: int) -> Submission:
    kind = rng.choice(("batch", "batch", "single", "majority", "all", "pipeline"))
    rows = rng.randint(2, 24) if kind == "batch" else rng.randint(1, 6)
    start = rng.randrange(total_rows - rows + 1)
    if kind in ("majority", "all"):
        models = tuple(rng.sample(MODELS, len(MODELS)))  # "all" outputs follow this order
    elif kind == "pipeline":
        models = (DIGITS, HEAD)
    else:
        models = (rng.choice(MODELS),)
    task_id = f"chaos-{seed}-{index:04d}"
    return Submission(task_id, kind, models, start, rows, shard_size=rng.randint(1, 4))


class TaskStream:
    """Submits tasks from a thread until :meth:`stop`; keeps the ones the API acknowledged.

    A submission that got no answer (coordinator down, connection cut) is sent again, same id
    and spec, to whichever coordinator runs now; an HTTP error is a refusal, noted and not sent
    again."""

    def __init__(self, cluster: LocalCluster, x: np.ndarray, seed: int) -> None:
        self.cluster = cluster
        self.x = x
        self.seed = seed
        self.rng = random.Random(seed * 7919 + 1)
        self.acknowledged: list[Submission] = []
        self.refused: list[tuple[Submission, ApiError]] = []
        self.unanswered: list[Submission] = []
        self.crashed: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-submitter")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the submitter did not stop"

    def _run(self) -> None:
        try:
            index = 0
            while not self._stop.is_set():
                self._submit(draw_submission(self.rng, index, self.seed, len(self.x)))
                index += 1
                self._stop.wait(self.rng.uniform(0.02, 0.12))
        except BaseException as exc:  # reported by the test
            self.crashed = exc

    def _submit(self, sub: Submission) -> None:
        body = sub.body(self.x)
        give_up_at = None
        while True:
            sub.tries += 1
            try:
                api_client(self.cluster).submit(body)
            except ApiError as exc:
                if exc.status is not None:
                    self.refused.append((sub, exc))
                    return
                if self._stop.is_set():  # every process is back: it answers soon
                    give_up_at = give_up_at or time.monotonic() + 30.0
                    if time.monotonic() > give_up_at:
                        self.unanswered.append(sub)
                        return
                time.sleep(0.05)  # polling for a coordinator that is being restarted
                continue
            self.acknowledged.append(sub)
            return


# --- what the answers must be ----------------------------------------------------------------


def reference_outputs(x: np.ndarray) -> dict[str, np.ndarray]:
    """Every model's output on every row of ``x`` and the pipeline's (the head on digits-mlp's
    output), computed here with the NumPy engine; digits-mlp's labels checked against
    test_coordinator_restart's reference."""

    async def infer() -> dict[str, np.ndarray]:
        engine = NumpyEngine()
        try:
            for name in (*MODELS, HEAD):
                await engine.load(parse_model_ref(name))
            out = {name: await engine.infer(parse_model_ref(name), x) for name in MODELS}
            out["pipeline"] = await engine.infer(parse_model_ref(HEAD), out[DIGITS])
        finally:
            await engine.aclose()
        return out

    out = asyncio.run(infer())
    assert np.argmax(out[DIGITS], axis=1).tolist() == labels_reference(x)
    return out


def answer_problems(
    sub: Submission,
    doc: dict[str, Any],
    ref: dict[str, np.ndarray],
    max_attempt: int,
    refused: Counter[str],
) -> list:
    """What is wrong with the finished task ``doc`` of ``sub`` (empty: nothing); its items may
    have reached attempt ``max_attempt``, plus the attempts nodes refused (``refused``)."""
    where = f"{sub.task_id} ({sub.kind} {','.join(sub.models)} rows {sub.start}+{sub.rows})"
    if doc["state"] != "succeeded":
        return [f"{where}: {doc['state']}: {doc['error']}"]
    rows = slice(sub.start, sub.start + sub.rows)
    result = doc["result"]
    problems = []
    if sub.kind == "majority":
        votes = np.stack([np.argmax(ref[m][rows], axis=1) for m in sub.models])
        if result["labels"] != majority(votes).tolist():
            problems.append(f"{where}: labels {result['labels']} != votes {votes.tolist()}")
    else:
        want = expected_outputs(sub, ref)
        got = [array_from_json(o) for o in result["outputs"]]
        if len(got) != len(want) or not all(
            g.shape == w.shape and np.allclose(g, w, rtol=1e-4, atol=1e-5)
            for g, w in zip(got, want, strict=False)
        ):
            problems.append(f"{where}: outputs differ from the models' here")
        elif result["labels"] != np.argmax(got[0], axis=1).tolist():
            problems.append(f"{where}: labels {result['labels']} are not its outputs' argmax")
    problems += item_problems(where, sub, doc, max_attempt, refused)
    return problems


def expected_outputs(sub: Submission, ref: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs ``sub`` must give: its model's, the pipeline's, or (``all``) each model's
    in the order the task listed them."""
    rows = slice(sub.start, sub.start + sub.rows)
    if sub.kind == "pipeline":
        return [ref["pipeline"][rows]]
    return [ref[m][rows] for m in (sub.models if sub.kind == "all" else sub.models[:1])]


def majority(votes: np.ndarray) -> np.ndarray:
    """Per column, the most frequent label; a tie goes to the smallest."""
    counts = np.stack([(votes == label).sum(axis=0) for label in range(10)])
    return np.argmax(counts, axis=0)


def item_problems(
    where: str, sub: Submission, doc: dict[str, Any], max_attempt: int, refused: Counter[str]
) -> list:
    """Items of a succeeded task: each answered once (a majority may drop the vote it no
    longer needs), within the attempts allowed (``max_attempt`` and the item's refusals)."""
    ok_states = {"succeeded", "cancelled"} if sub.kind == "majority" else {"succeeded"}
    problems = []
    for item in doc["items"]:
        allowed = max_attempt + refused[item["item_id"]]
        if item["state"] not in ok_states or item["attempt"] > allowed:
            problems.append(f"{where}: item {item}")
        elif item["state"] == "succeeded" and not item["has_result"]:
            problems.append(f"{where}: item {item['item_id']} succeeded without a result")
    if sub.kind != "majority" and doc["items_done"] != doc["items_total"]:
        problems.append(f"{where}: {doc['items_done']} of {doc['items_total']} items done")
    return problems


# --- the logs --------------------------------------------------------------------------------


def log_problems(root: Path) -> list[str]:
    """Every traceback, ERROR/CRITICAL record or never-retrieved task exception in the
    daemons' logs (stderr, appended across restarts), with the lines that belong to it."""
    found = []
    for path in sorted(root.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        i = 0
        while i < len(lines):
            if not BAD_LOG_LINE.search(lines[i]):
                i += 1
                continue
            end = i + 1
            while end < len(lines) and not LOG_RECORD.match(lines[end]):
                end += 1
            found.append(f"{path.name}:{i + 1}:\n  " + "\n  ".join(lines[i:end][:40]))
            i = end
    return found


def lost_answers(root: Path, runner: FaultRunner) -> list[str]:
    """Attempts that timed out on a node that ran without a fault for the whole item timeout
    before: the node (or the peer it passed the item on to) had it, and its answer was lost.
    A node's promise is to answer every item it takes, or hand it back when it cannot; a
    timeout is for nodes that die silently."""
    lost, hops = [], offload_hops(root)
    lines = (root / f"{COORD}.log").read_text(errors="replace").splitlines()
    if lines and not any(LOG_RECORD.match(line) for line in lines):
        lost.append(f"{COORD}.log has no line in the log format this test reads")
    for line in lines:
        if (m := TIMED_OUT.match(line)) is None:
            if "retrying" in line and "no answer from" in line:  # a wording this cannot read
                lost.append(f"a timeout line this test cannot read: {line}")
            continue
        when, ms, item, attempt, node = m.groups()
        at = time.mktime(time.strptime(when, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
        if not runner.faulted(node, at - ITEM_TIMEOUT_S - 1.0, at):
            lost.append(f"{item} attempt {attempt}: no answer from {node}, which ran all along"
                        f" ({hops[item]} work-sharing hops in the nodes' logs)")  # fmt: skip
    return lost


def refusals(root: Path) -> Counter[str]:
    """Per item id: the attempts nodes refused, as the coordinator logged them (all runs)."""
    return Counter(REFUSED.findall((root / f"{COORD}.log").read_text(errors="replace")))


def offload_hops(root: Path) -> Counter[str]:
    """Per item id: how often a node passed it on to a peer (work sharing), all attempts."""
    hops: Counter[str] = Counter()
    for path in root.glob("veh-*.log"):
        hops.update(m.group(1) for m in OFFLOADED.finditer(path.read_text(errors="replace")))
    return hops


# --- the test --------------------------------------------------------------------------------


def start_cluster(cluster: LocalCluster) -> None:
    cluster.add_coordinator(COORD, settings=COORD_SETTINGS)
    for name in NODES:
        cluster.add_node(name, extra=NODE_EXTRA)
        cluster.start(name)
    cluster.start_coordinator(COORD)
    cluster.wait_for(lambda: nodes_ready(api_client(cluster), NODES))


def wait_all(cluster, stream, runner, ref) -> tuple[list[str], list[dict[str, Any]]]:
    """Wait for every acknowledged task (one deadline for all); the problems and documents.
    Each coordinator restart may have given an item one attempt more (see the docstring),
    and each refusal of it by a node (not counted against ``max_attempts``) another."""
    max_attempt = MAX_ATTEMPTS + sum(f.target == COORD for _, _, f in runner.applied
                                     if f.action != "restart")  # fmt: skip
    client = api_client(cluster)
    deadline = time.monotonic() + WAIT_S
    problems, done = [], []
    for sub in stream.acknowledged:
        try:
            doc = client.wait(sub.task_id, timeout=max(0.5, deadline - time.monotonic()))
        except ApiError as exc:
            problems.append(f"{sub.task_id}: acknowledged, then {exc}")
            continue
        done.append((sub, doc))
    refused = refusals(cluster.root)  # once every task ended: all its refusals are logged
    for sub, doc in done:
        problems += answer_problems(sub, doc, ref, max_attempt, refused)
    return problems, [doc for _, doc in done]


def journal_problems(client: CoordinatorClient, stream: TaskStream) -> tuple[list[str], dict]:
    """The listing holds every acknowledged task and nothing else; nothing stays live; the
    journal has every acknowledged task succeeded."""
    listed = {t["task_id"] for t in client.iter_tasks(limit=500)}
    submitted = {s.task_id for s in stream.acknowledged + stream.unanswered}
    submitted |= {s.task_id for s, _ in stream.refused}
    problems = [f"{s.task_id}: acknowledged, not listed" for s in stream.acknowledged
                if s.task_id not in listed]  # fmt: skip
    problems += [f"{t}: listed, never submitted" for t in listed if t not in submitted]
    stats = client.stats()
    live_tasks = {s: stats["tasks"].get(s, 0) for s in LIVE if stats["tasks"].get(s)}
    live_items = {s: stats["items"].get(s, 0) for s in LIVE if stats["items"].get(s)}
    if live_tasks or live_items or stats["live_tasks"] or stats["parked_items"]:
        problems.append(f"journal still has live work: tasks {live_tasks}, items {live_items}")
    if stats["tasks"].get("succeeded", 0) < len(stream.acknowledged):
        problems.append(f"journal: {stats['tasks']} for {len(stream.acknowledged)} acknowledged")
    return problems, stats


def counter_problems(runner: FaultRunner, stats: dict[str, Any]) -> list[str]:
    """Every result the coordinators refused as a duplicate is counted in the journal too
    (``*_results`` counters: duplicate, late, unexpected, unknown)."""
    runner.add_counters()  # the coordinator running now
    refused = sum(v for k, v in stats["journal_counters"].items() if k.endswith("_results"))
    problems = []
    if runner.counters["duplicates"] > refused:
        problems.append(
            f"{runner.counters['duplicates']} duplicates counted, {refused} in the journal"
        )
    moved = (
        runner.counters["redispatched_after_death"]
        + runner.counters["redispatched_after_disconnect"]
    )
    caught = [f for f, held in runner.held if f.action == "sigkill" and held]
    if not caught:  # the schedule has one; its victim had no work for HOLD_WAIT_S
        problems.append(f"no node was SIGKILLed with items in flight: {runner.held}")
    elif not moved:
        problems.append(f"{len(caught)} nodes SIGKILLed with items in flight, none re-dispatched")
    problems += [f"{f}: its items were still on it {MOVE_WAIT_S}s later" for f in runner.stuck]
    return problems


def print_summary(seed, runner, stream, docs, stats, root: Path) -> None:
    coord_log = (root / f"{COORD}.log").read_text(errors="replace")
    kinds = Counter(s.kind for s in stream.acknowledged)
    t0 = runner.applied[0][0] - runner.applied[0][2].pause_s if runner.applied else 0.0
    applied = [f"{b - t0:.1f}-{e - t0:.1f} {f.action} {f.target}" for b, e, f in runner.applied]
    hops = offload_hops(root)
    attempts = Counter(item["attempt"] for doc in docs for item in doc["items"])
    lines = [
        f"chaos seed {seed} summary",
        f"applied (s since the schedule began, to when done): {', '.join(applied)}",
        f"exit codes: {[(f'{f.action} {f.target}', rc) for f, rc in runner.exit_codes]}",
        f"tasks acknowledged: {len(stream.acknowledged)} {dict(kinds)}; sent again after no"
        f" answer: {sum(s.tries > 1 for s in stream.acknowledged)}; refused:"
        f" {len(stream.refused)}; never answered: {len(stream.unanswered)}",
        f"items by attempt: {dict(sorted(attempts.items()))}",
        f"work sharing: {sum(hops.values())} hops of {len(hops)} items, at most"
        f" {max(hops.values(), default=0)} for one item",
        f"coordinator counters (all lifetimes): {dict(runner.counters)}",
        f"items in flight on a node as it was signalled: {[(str(f), n) for f, n in runner.held]}",
        f"coordinator log: {coord_log.count('retrying ')} retries,"
        f" {coord_log.count('recovered task')} tasks recovered after restarts",
        f"journal: tasks {stats['tasks']} items {stats['items']}"
        f" counters {stats['journal_counters']}",
    ]
    print("\n".join(lines))


def run_chaos(cluster: LocalCluster, x: np.ndarray, seed: int) -> tuple[TaskStream, FaultRunner]:
    """Start the cluster, then the task stream and the seed's fault schedule; return once the
    schedule is over (every process restored) and the stream stopped."""
    faults = draw_schedule(random.Random(seed))
    print("\n".join([f"chaos seed {seed}: schedule", *(f"  {f}" for f in faults)]))
    start_cluster(cluster)
    stream, runner = TaskStream(cluster, x, seed), FaultRunner(cluster)
    stream.start()
    try:
        runner.run(faults)
    finally:
        stream.stop()
    assert stream.crashed is None, f"the submitter failed: {stream.crashed!r}"
    return stream, runner


def cluster_problems(cluster, stream, runner, ref) -> tuple[list[str], list[dict], dict]:
    """Everything the API, the exit codes and the mesh say is wrong; the task documents and
    the coordinator's stats."""
    problems, docs = wait_all(cluster, stream, runner, ref)
    client = api_client(cluster)
    journal, stats = journal_problems(client, stream)
    problems += journal + counter_problems(runner, stats)
    problems += [f"refused: {s.task_id}: {exc}" for s, exc in stream.refused]
    problems += [f"never answered: {s.task_id}" for s in stream.unanswered]
    problems += [f"{f.action} {f.target} exited with {rc}" for f, rc in runner.exit_codes
                 if f.action == "sigterm" and rc != 0]  # fmt: skip
    try:
        cluster.wait_for(lambda: nodes_ready(client, NODES), timeout=20)
    except TimeoutError:
        problems.append(f"restarted nodes did not all rejoin: {client.nodes()['nodes']}")
    return problems, docs, stats


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", SEEDS)
def test_acknowledged_tasks_survive_a_random_schedule_of_process_faults(tmp_path, seed):
    x, _ = load_digits_holdout()
    ref = reference_outputs(x)
    with LocalCluster(tmp_path, fleet_id=f"chaos-{seed}") as cluster:
        stream, runner = run_chaos(cluster, x, seed)
        problems, docs, stats = cluster_problems(cluster, stream, runner, ref)
        print_summary(seed, runner, stream, docs, stats, tmp_path)
    problems += lost_answers(tmp_path, runner) + log_problems(tmp_path)
    assert len(stream.acknowledged) >= MIN_TASKS, "too few tasks to say anything"
    head = f"seed {seed}: {len(problems)} problems (logs in {tmp_path}):\n"
    assert not problems, head + "\n".join(problems[:60])
