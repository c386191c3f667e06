"""The coordinator service: accept tasks durably, dispatch work items, collect results.

Flow of one work item (messages in :mod:`meshinfer.proto.tasks_wire`)::

    submit -> journal (committed) -> ready queue -> choose(policy, gossiped node views)
           -> journal mark_dispatched -> TaskAssign over the node's session
           <- TaskAccepted / TaskResult (journaled exactly once) / TaskFailed

Fault tolerance: an attempt that fails retryably, times out (``item_timeout_s``), or whose node
is declared dead or left by membership, is retried on a different node when one exists (the
failed nodes are excluded), with exponential backoff (none after a node death: the item is
re-dispatched at once), up to ``max_attempts``; then the task fails with the reason. A result
is accepted exactly once (the journal refuses duplicates and late results; they are counted).
Cancelling a task sends ``TaskCancel`` to every node running one of its items.

Durability: every journal call runs on one dedicated thread, in order, so the event loop never
blocks and a result can never be journaled before its dispatch. On start, :meth:`recover` puts
every acknowledged, unfinished task back in flight (items whose fate is unknown run again).

Concurrency: every coroutine runs on the coordinator's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.journal import Journal, TaskPage, TaskRecord, UnknownTaskError
from coordinator.runs import ItemRun, Outcome, TaskRun, decode_outcome, encode_outcome
from meshinfer.errors import MeshInferError, RemoteProtocolError
from meshinfer.inference.executor import BoundedExecutor
from meshinfer.proto import messages
from meshinfer.proto.membership import MemberEvent, MemberEventKind
from meshinfer.proto.scheduling import NodeView, Policy, SchedulerState, choose
from meshinfer.proto.tasks import TaskSpec, TaskState, WorkItem
from meshinfer.proto.tasks_wire import TaskAccepted, TaskCancel, TaskFailed, TaskResult
from meshinfer.runtime.node import MeshNode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoordinatorConfig:
    """Defaults and fault-tolerance knobs (see the module docstring)."""

    default_policy: str = "least_loaded"
    default_aggregation: str = "all"
    max_attempts: int = 4
    retry_backoff_s: float = 0.05
    retry_backoff_max_s: float = 2.0
    item_timeout_s: float = 30.0
    journal_synchronous: str = "FULL"
    node_capacity: int = 4
    max_in_flight_per_node: int = 32

    def __post_init__(self) -> None:
        Policy(self.default_policy)  # ValueError names an unknown policy
        if self.max_attempts < 1 or self.item_timeout_s <= 0 or self.retry_backoff_s < 0:
            raise ValueError("max_attempts >= 1, item_timeout_s > 0 and retry_backoff_s >= 0")


@dataclass
class CoordinatorStats:
    dispatched: int = 0
    retries: int = 0
    redispatched_after_death: int = 0
    duplicates: int = 0
    unexpected: int = 0
    completed_by_node: Counter[str] = field(default_factory=Counter)


class Coordinator:
    """See the module docstring. ``start`` / ``aclose``; every other coroutine needs ``start``."""

    def __init__(
        self,
        mesh: MeshNode,
        journal_path: Path,
        config: CoordinatorConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.mesh = mesh
        self.config = config or CoordinatorConfig()
        self.journal_path = Path(journal_path)
        self.rng = rng or random.Random()
        self.stats_ = CoordinatorStats()
        self.scheduler = SchedulerState()
        self.journal: Journal | None = None
        self._db = BoundedExecutor(1, name="journal")
        self._runs: dict[str, TaskRun] = {}
        self._items: dict[str, tuple[TaskRun, ItemRun]] = {}  # live item id -> run, item
        self._ready: asyncio.PriorityQueue[tuple[int, int, str]] = asyncio.PriorityQueue()
        self._parked: list[str] = []
        self._seq = itertools.count()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._wake_parked = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def node_id(self) -> str:
        return self.mesh.node_id

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (and recover) the journal, hook into the mesh, start dispatching."""
        self.journal = await self._db.run(
            lambda: Journal(self.journal_path, synchronous=self.config.journal_synchronous)
        )
        peers = self.mesh.peers
        peers.on(TaskAccepted, self._on_accepted)
        peers.on(TaskResult, self._on_result)
        peers.on(TaskFailed, self._on_failed)
        assert self.mesh.membership is not None, "start the MeshNode first"
        self.mesh.membership.subscribe(self._on_member)
        await self._recover()
        loop = self._loop
        self._tasks = [
            loop.create_task(self._dispatch_loop(), name="coordinator-dispatch"),
            loop.create_task(self._parked_loop(), name="coordinator-parked"),
        ]
        for task in self._tasks:
            task.add_done_callback(_log_death)

    async def aclose(self) -> None:
        """Stop dispatching and close the journal (in-flight items stay journaled). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for timer in self._timers.values():
            timer.cancel()
        if self.journal is not None:
            await self._db.run(self.journal.close)
        await self._db.aclose()

    async def _recover(self) -> None:
        assert self.journal is not None
        recovered = await self._db.run(self.journal.recover)
        now = self._loop.time()
        for rec in recovered:
            run = TaskRun(rec.task.spec, default_aggregation=self.config.default_aggregation,
                          now=now)  # fmt: skip
            self._runs[run.task_id] = run
            for item in rec.task.items:
                if item.result is not None:
                    self._replay_result(run, item.item_id, item.result, now)
            attempts = {i.item_id: i.attempt for i in rec.to_dispatch}
            self._schedule_ready(run, attempts)
            log.info("recovered task %s (%d items to dispatch)", run.task_id, len(attempts))

    def _replay_result(self, run: TaskRun, item_id: str, blob: bytes, now: float) -> None:
        msg = messages.decode(blob)
        if isinstance(msg, TaskResult):
            run.record_result(item_id, msg.output, msg.node_id, now)

    # --- the API ---------------------------------------------------------------------------

    async def submit(self, spec: TaskSpec) -> str:
        """Validate, journal (durably), and queue ``spec``; returns its task id.

        Raises :class:`~meshinfer.proto.tasks.InvalidTaskError` (a ConfigError) for a bad spec.
        """
        assert self.journal is not None
        run = TaskRun(
            spec, default_aggregation=self.config.default_aggregation, now=self._loop.time()
        )  # fmt: skip  (validates the spec)
        task_id = await self._db.run(self.journal.submit, spec)
        if task_id not in self._runs:
            self._runs[task_id] = run
            self._schedule_ready(run, {})
        return task_id

    async def get(self, task_id: str) -> TaskRecord:
        assert self.journal is not None
        return await self._db.run(self.journal.get, task_id)

    async def list_tasks(self, **filters: Any) -> TaskPage:
        assert self.journal is not None
        return await self._db.run(lambda: self.journal.list(**filters))

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """The task once it ended (or as it is at ``timeout``)."""
        record = await self.get(task_id)
        if record.state.value in ("succeeded", "failed", "cancelled") or task_id not in self._runs:
            return record
        fut = self._loop.create_future()
        self._waiters.setdefault(task_id, []).append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        return await self.get(task_id)

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task; the nodes running its items are told. False if it already ended."""
        assert self.journal is not None
        record = await self.get(task_id)  # UnknownTaskError for an unknown id
        if record.state.value in ("succeeded", "failed", "cancelled"):
            return False
        in_flight = await self._db.run(self.journal.cancel, task_id)
        for item_id, node in in_flight:
            if node:
                self.mesh.peers.send(node, TaskCancel(item_id, "task cancelled"))
        self._forget(task_id)
        return True

    def result_of(self, record: TaskRecord) -> dict[str, Any] | None:
        """The decoded result of a finished task (outputs as arrays; labels for classifiers)."""
        if record.result_summary is None:
            return None
        doc = decode_outcome(record.result_summary)
        first = doc["outputs"][0] if doc["outputs"] else None
        doc["labels"] = _labels(first)
        return doc

    def nodes(self) -> list[dict[str, Any]]:
        """Every member as the coordinator sees it, with the work it has in flight and done."""
        membership = self.mesh.membership
        if membership is None:
            return []
        in_flight = self._in_flight()
        out = []
        for m in sorted(membership.core.members(), key=lambda m: m.node_id):
            s = m.state
            out.append({
                "node_id": m.node_id, "status": m.status.value, "roles": list(s.roles),
                "models": [f"{x.model_id}@{x.version}" for x in s.models],
                "queue_depth": s.queue_depth, "address": f"{s.host}:{s.port}",
                "in_flight": in_flight[m.node_id],
                "done": self.stats_.completed_by_node[m.node_id],
            })  # fmt: skip
        return out

    async def stats(self) -> dict[str, Any]:
        assert self.journal is not None
        js = await self._db.run(self.journal.stats)
        s = self.stats_
        return {
            "tasks": js.tasks, "items": js.items, "journal_counters": js.counters,
            "dispatched": s.dispatched, "retries": s.retries,
            "redispatched_after_death": s.redispatched_after_death,
            "duplicates": s.duplicates, "completed_by_node": dict(s.completed_by_node),
            "live_tasks": len(self._runs), "parked_items": len(self._parked),
        }  # fmt: skip

    # --- dispatching -----------------------------------------------------------------------

    def _schedule_ready(self, run: TaskRun, attempts: dict[str, int]) -> None:
        for item in run.ready():
            attempt = attempts.get(item.item_id, 1)
            entry = ItemRun(_with_attempt(item, attempt), attempt)
            run.items[item.item_id] = entry
            self._items[item.item_id] = (run, entry)
            self._queue(item.item_id, run.spec.priority)
        self._arm_aggregation_timeout(run)

    def _queue(self, item_id: str, priority: int) -> None:
        self._ready.put_nowait((-priority, next(self._seq), item_id))

    async def _dispatch_loop(self) -> None:
        while True:
            _, _, item_id = await self._ready.get()
            pair = self._items.get(item_id)
            if pair is None:
                continue  # cancelled or finished meanwhile
            run, entry = pair
            node = self._choose(run, entry)
            if node is None:
                self._parked.append(item_id)
                continue
            await self._send(run, entry, node)

    def _choose(self, run: TaskRun, entry: ItemRun) -> str | None:
        policy = run.spec.policy or self.config.default_policy
        views = self._views()
        busy = self._in_flight()
        full = {n for n, k in busy.items() if k >= self.config.max_in_flight_per_node}
        kw = {"rng": self.rng, "state": self.scheduler}
        node = choose(policy, views, entry.item, exclude=frozenset(entry.tried | full), **kw)
        if node is None and entry.tried:  # every capable node failed it once: allow repeats
            node = choose(policy, views, entry.item, exclude=frozenset(full), **kw)
        return node

    def _in_flight(self) -> Counter[str]:
        return Counter(i.node for _, i in self._items.values() if i.node)

    def _views(self) -> list[NodeView]:
        membership = self.mesh.membership
        if membership is None:
            return []
        in_flight = self._in_flight()
        views = []
        for m in membership.core.live_members():
            s = m.state
            views.append(NodeView(
                node_id=m.node_id, alive=m.status.value == "alive",
                models=frozenset((x.model_id, x.version) for x in s.models),
                roles=frozenset(s.roles), has_gpu=s.gpu_free_mb > 0,
                free_gpu_memory=s.gpu_free_mb << 20 if s.gpu_free_mb else None,
                queue_depth=max(s.queue_depth, in_flight[m.node_id]),
                capacity=self.config.node_capacity, links=frozenset(s.links),
            ))  # fmt: skip
        return views

    async def _send(self, run: TaskRun, entry: ItemRun, node: str) -> None:
        assert self.journal is not None
        entry.node = node
        entry.tried.add(node)
        entry.dispatched_at = self._loop.time()
        item_id, attempt = entry.item.item_id, entry.attempt
        # Journaled before the message leaves; the single journal thread keeps the order.
        mark = self._loop.create_task(
            self._db.run(self.journal.mark_dispatched, item_id, node, attempt)
        )
        mark.add_done_callback(_log_failure)
        self.stats_.dispatched += 1
        if not self.mesh.peers.send(node, entry.item.to_message()):
            await mark
            self._retry(run, entry, f"could not send to {node}", backoff=True)
            return
        self._arm_timeout(item_id, attempt)

    def _arm_timeout(self, item_id: str, attempt: int) -> None:
        old = self._timers.pop(item_id, None)
        if old is not None:
            old.cancel()
        self._timers[item_id] = self._loop.call_later(
            self.config.item_timeout_s, self._on_timeout, item_id, attempt
        )

    def _on_timeout(self, item_id: str, attempt: int) -> None:
        pair = self._items.get(item_id)
        if pair is not None and pair[1].attempt == attempt:
            run, entry = pair
            self._retry(run, entry, f"no answer from {entry.node} in {self.config.item_timeout_s}s")

    async def _parked_loop(self) -> None:
        """Items no node could take wait here until membership changes (or 1 s passes)."""
        while True:
            self._wake_parked.clear()
            try:
                async with asyncio.timeout(1.0):
                    await self._wake_parked.wait()
            except TimeoutError:
                pass
            parked, self._parked = self._parked, []
            for item_id in parked:
                pair = self._items.get(item_id)
                if pair is not None:
                    self._queue(item_id, pair[0].spec.priority)

    # --- answers from nodes ----------------------------------------------------------------

    def _on_accepted(self, peer: str, msg: TaskAccepted) -> None:
        pair = self._items.get(msg.item_id)
        if pair is None or self.journal is None or pair[1].attempt != msg.attempt:
            return
        task = self._loop.create_task(
            self._db.run(self.journal.mark_running, msg.item_id, msg.attempt)
        )
        task.add_done_callback(_log_failure)

    def _on_result(self, peer: str, msg: TaskResult) -> None:
        self._loop.create_task(self._accept_result(peer, msg)).add_done_callback(_log_failure)

    async def _accept_result(self, peer: str, msg: TaskResult) -> None:
        assert self.journal is not None
        blob = messages.encode(msg)
        fresh = await self._db.run(
            lambda: self.journal.record_result(msg.item_id, msg.attempt, blob, node=msg.node_id)
        )
        if not fresh:
            self.stats_.duplicates += 1
            return
        pair = self._items.pop(msg.item_id, None)
        self._cancel_timer(msg.item_id)
        if pair is None:
            return
        run, entry = pair
        self._wake_parked.set()  # a slot on that node is free again
        self.stats_.completed_by_node[msg.node_id] += 1
        if entry.dispatched_at is not None:
            elapsed = self._loop.time() - entry.dispatched_at
            model = entry.item.model
            self.scheduler.observe_runtime((model.model_id, model.version), elapsed)
        try:
            run.record_result(msg.item_id, msg.output, msg.node_id, self._loop.time())
        except RemoteProtocolError as exc:  # a node returned an output we cannot use
            run.record_failure(msg.item_id, f"bad output from {peer}: {exc}", self._loop.time())
        await self._advance(run)

    def _on_failed(self, peer: str, msg: TaskFailed) -> None:
        pair = self._items.get(msg.item_id)
        if pair is None or pair[1].attempt != msg.attempt:
            return
        run, entry = pair
        reason = f"{peer}: {msg.message}"
        if msg.retryable:
            self._retry(run, entry, reason, backoff=True)
        else:
            self._loop.create_task(self._fail_item(run, entry, reason)).add_done_callback(
                _log_failure
            )

    def _on_member(self, event: MemberEvent) -> None:
        if event.kind in (MemberEventKind.DEAD, MemberEventKind.LEFT):
            node = event.member.node_id
            for run, entry in list(self._items.values()):
                if entry.node == node:
                    self.stats_.redispatched_after_death += 1
                    self._retry(run, entry, f"node {node} {event.kind.value}", backoff=False)
        if event.kind in (MemberEventKind.JOINED, MemberEventKind.ALIVE, MemberEventKind.UPDATED):
            self._wake_parked.set()

    # --- retries and outcomes --------------------------------------------------------------

    def _retry(self, run: TaskRun, entry: ItemRun, reason: str, *, backoff: bool = True) -> None:
        item_id, attempt = entry.item.item_id, entry.attempt
        self._cancel_timer(item_id)
        if attempt >= self.config.max_attempts:
            why = f"gave up after {attempt} attempts; last: {reason}"
            self._loop.create_task(self._fail_item(run, entry, why)).add_done_callback(_log_failure)
            return
        self.stats_.retries += 1
        log.info("retrying %s (attempt %d failed: %s)", item_id, attempt, reason)
        assert self.journal is not None
        journaled = self._loop.create_task(
            self._db.run(
                partial(self.journal.record_failure, retryable=True), item_id, attempt, reason
            )
        )
        journaled.add_done_callback(_log_failure)
        entry.attempt += 1
        entry.item = _with_attempt(entry.item, entry.attempt)
        entry.node = None
        delay = 0.0
        if backoff:
            delay = min(
                self.config.retry_backoff_max_s, self.config.retry_backoff_s * 2 ** (attempt - 1)
            )
        self._loop.call_later(delay, self._queue, item_id, run.spec.priority)

    async def _fail_item(self, run: TaskRun, entry: ItemRun, reason: str) -> None:
        assert self.journal is not None
        item_id = entry.item.item_id
        self._items.pop(item_id, None)
        self._cancel_timer(item_id)
        await self._db.run(
            partial(self.journal.record_failure, retryable=False), item_id, entry.attempt, reason
        )
        run.record_failure(item_id, reason, self._loop.time())
        await self._advance(run)

    async def _advance(self, run: TaskRun) -> None:
        if run.outcome is None:
            self._schedule_ready(run, {})
            return
        await self._finish(run, run.outcome)

    async def _finish(self, run: TaskRun, outcome: Outcome) -> None:
        assert self.journal is not None
        state = TaskState.SUCCEEDED if outcome.succeeded else TaskState.FAILED
        blob = encode_outcome(run, outcome)
        in_flight = await self._db.run(
            lambda: self.journal.finish(
                run.task_id, state, summary=blob, error=outcome.error or None
            )
        )
        for item_id, node in in_flight:  # e.g. an ensemble that reached its quorum early
            if node:
                self.mesh.peers.send(node, TaskCancel(item_id, "task finished"))
        self._forget(run.task_id)

    def _arm_aggregation_timeout(self, run: TaskRun) -> None:
        deadline = run.deadline()
        if deadline is None or run.done:
            return

        def check() -> None:
            if run.task_id in self._runs and not run.done:
                run.check_timeout(self._loop.time())
                if run.done:
                    self._loop.create_task(self._advance(run)).add_done_callback(_log_failure)

        self._loop.call_at(deadline + 1e-3, check)

    def _forget(self, task_id: str) -> None:
        run = self._runs.pop(task_id, None)
        if run is not None:
            for item_id in list(run.items):
                self._items.pop(item_id, None)
                self._cancel_timer(item_id)
        for fut in self._waiters.pop(task_id, []):
            if not fut.done():
                fut.set_result(None)

    def _cancel_timer(self, item_id: str) -> None:
        timer = self._timers.pop(item_id, None)
        if timer is not None:
            timer.cancel()


def _with_attempt(item: WorkItem, attempt: int) -> WorkItem:
    import dataclasses

    return item if item.attempt == attempt else dataclasses.replace(item, attempt=attempt)


def _labels(output: np.ndarray | None) -> list[int] | None:
    if output is None or output.ndim == 0:
        return None
    if output.dtype.kind in "iu" and output.ndim == 1:
        return [int(v) for v in output]
    if output.dtype.kind == "f" and output.ndim == 2:
        return [int(v) for v in np.argmax(output, axis=1)]
    return None


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        level = logging.WARNING if isinstance(exc, MeshInferError) else logging.ERROR
        log.log(level, "coordinator step failed: %s", exc, exc_info=exc)


def _log_death(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("coordinator task %s died", task.get_name(), exc_info=task.exception())


__all__ = ["Coordinator", "CoordinatorConfig", "UnknownTaskError"]
