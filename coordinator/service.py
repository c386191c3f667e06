"""The coordinator service: accept tasks durably, dispatch work items, collect results.

Flow of one work item (messages in :mod:`meshinfer.proto.tasks_wire`)::

    submit -> journal (decided) -> ready queue -> choose(policy, gossiped node views)
           -> TaskAssign over the node's session
           (the submit is acknowledged once the journal's COMMIT is durable)
           <- TaskAccepted / TaskResult (journaled exactly once) / TaskFailed

Fault tolerance: an attempt that fails retryably, times out (``item_timeout_s``), or whose node
is declared dead or left by membership, is retried on a different node when one exists (the
nodes it was on are excluded; once every capable node had it, any but the last one), with
exponential backoff (none after a node death: the item is re-dispatched at once), up to
``max_attempts``; then the task fails with the reason. A refusal does not count (see
:meth:`Coordinator._retry`). A result is accepted exactly once (the journal refuses duplicates
and late results; they are counted).
Cancelling a task sends ``TaskCancel`` to every node running one of its items; so does a late
result of an earlier attempt, taken while a retry runs elsewhere, to the node of the retry.

Inputs by reference (:mod:`coordinator.input_refs`): an input of at least
``input_ref_min_bytes`` goes to a node that gossips an input cache with ``keep_input``, and
again to that node as a reference to its sha256, while the node's mirror says it holds it (a
parallel task's models, a retry, the next task on the same frame). A node that does not hold it
answers ``INPUT_NOT_CACHED``: the same attempt goes again with the bytes, which is not a retry.

Deadlines: a task's ``deadline_s`` (or, for one naming none, ``default_deadline_s``, applied at
acceptance and journaled) is its budget from acceptance; each item goes out with what is left of
it, a parallel task's deadline is its aggregation's timeout (``aggregation_timeout_s`` when the
spec gives one: it may not exceed the deadline, the default one included), and a recovered task's
budget counts the time since it was accepted (one recovered past its deadline fails at once,
its items unsent).

Fast failover: a node whose session ends abruptly must answer a ping (over another session, or
a re-dial) and, if it does not, its in-flight items are re-dispatched at once, before membership
declares it dead (:mod:`coordinator.failover`).

Durability: every journal call runs on one dedicated thread (a
:class:`~coordinator.journal_writer.JournalWriter`), in the order it was queued, so the event
loop never blocks and a result can never be journaled before its dispatch. That thread commits
every call queued at that moment as one group (one fsync, run by a second thread while the next
group commits) and answers their callers only once it is synced, so a submit is acknowledged,
and a result acted upon, only once durable. A submitted task's
items are dispatched as soon as the journal has taken it, while its COMMIT syncs: the sync
overlaps the trip to the node, and the result, journaled by the same ordered thread, can only
commit after the task. If that COMMIT fails the submit is refused and the items are called back
(``TaskCancel``); a result of theirs is then refused as unknown. On start,
:meth:`recover` puts every acknowledged, unfinished task back in flight (items whose fate is
unknown run again; a result that comes in meanwhile is dropped: its item goes again, and its
node answers that). Journal writes per task are kept few:

* a dispatch is journaled only if the item's result is not in ``running_mark_delay_s`` after
  it went out (or before a failure or a running mark of that attempt is); the result of an
  attempt whose dispatch is not journaled carries it (``take_result(sent_to=...)``), in the
  same call. A crash meanwhile leaves the item pending: recovery dispatches it again (the same
  attempt), as it does every item whose fate is unknown; a result of the earlier send is
  accepted once if the new send went to the same node or its dispatch is journaled by then.
  Answers about an item count only from the node its current attempt went to. A result of
  an earlier attempt counts only from a node this coordinator sent it to or, for a recovered
  item, one the journal has that attempt's dispatch on (the item's row has the attempt just
  before its own, the dispatch lines' columns those further back); any other member's is
  refused (in ``foreign_results``), and so is every answer to a send the journal has no
  dispatch of (that attempt runs again). Cancels go to the nodes this coordinator sent the
  items to, journaled or not;
* an item is journaled as running only if its result has not arrived ``running_mark_delay_s``
  after the node accepted it (recovery treats dispatched and running alike);
* the result that completes a task (single, batch, pipeline) is journaled together with the
  task's end, in one call: both commit or neither does; any other end (an aggregation, a
  failure, a deadline) whose write fails is written again, with a backoff, until it commits
  (its waiters hear of it only then) or the coordinator closes (a write is tried again when
  it may pass: a busy or full disk, or its group commit rolled back for another call's fault;
  not when the journal refused it); so is an item's failure, a final one or a retry's (whose
  next attempt goes out only once the journal has it, else the journal would refuse that
  attempt's dispatch and result); so is a result, while its task is live here (its dispatch,
  which the result journals, counts as journaled only while a write of it is under way); one
  refused when written again, after a write whose sync failed (committed, not known to be
  durable), is taken as the journal has it;
* submitting a known task id with the same spec again is an idempotent retry: nothing runs
  again (until retention, ``retention_s`` after the task ended, deleted it from the journal).

Concurrency: every coroutine runs on the coordinator's event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import random
import sqlite3
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from coordinator.certificates import NodeCertificates
from coordinator.failover import Reachability
from coordinator.input_refs import InputRefs
from coordinator.journal import (
    PRUNE_BATCH,
    CallOutcome,
    Journal,
    RecoveredTask,
    TaskEnd,
    TaskEnding,
    TaskPage,
    TaskRecord,
    TransientJournalError,
    UnknownTaskError,
    item_ended,
    read_stats,
)
from coordinator.journal_writer import JournalWriter
from coordinator.runs import ItemRun, Outcome, TaskRun, decode_outcome, encode_outcome
from meshinfer.errors import ConfigError, LocalProtocolError, MeshInferError, RemoteProtocolError
from meshinfer.proto import messages
from meshinfer.proto.aggregation import Mode
from meshinfer.proto.contact import infrastructure_positions, node_contact_s
from meshinfer.proto.membership import MemberEvent, MemberEventKind
from meshinfer.proto.scheduling import (
    NodeView,
    Policy,
    SchedulerState,
    choose,
    requirements,
    unplaced_reason,
)
from meshinfer.proto.tasks import (
    InvalidTaskError,
    TaskSpec,
    TaskState,
    WorkItem,
    check_aggregation_used,
    with_aggregation_mode,
)
from meshinfer.proto.tasks_wire import (
    REFUSALS,
    FailureKind,
    TaskAccepted,
    TaskAssign,
    TaskCancel,
    TaskFailed,
    TaskResult,
)
from meshinfer.runtime.loop import Steps
from meshinfer.runtime.node import MeshNode
from meshinfer.transport.base import Address

log = logging.getLogger(__name__)

T = TypeVar("T")

#: An item's attempt as the journal has it at recovery: (attempt, refused, the (attempt, node)
#: of each journaled dispatch of an earlier attempt). An item waiting to be sent has only
#: dispatches of attempts before its own journaled (the journal moves an item on to attempt + 1
#: only from a journaled dispatch: a retry, a refusal, or recovery requeuing an item in
#: flight): the one just before it on the item's row, those further back in the journal's
#: dispatch lines (their attempt and node columns: :meth:`Journal.dispatches`).
Attempt = tuple[int, int, frozenset[tuple[int, str]]]

#: How many ended tasks' records, and how many of their bytes (inputs and results), wait for
#: the wait() that follows their submit() (a client that never waits, e.g. one polling get(),
#: leaves them here until newer ones push them out).
HANDED_RECORDS = 256
HANDED_BYTES = 32 << 20

#: A task's end the journal failed to write is written again after this long, doubling up to
#: the maximum (see Coordinator._finish).
END_RETRY_FIRST_S = 0.05
END_RETRY_MAX_S = 2.0
#: The journal write errors that may pass if the write is made again: a busy or full disk, or
#: a group commit rolled back for another call's fault. A refusal (an unknown task, an item in
#: the wrong state) would be refused again: it is raised at once.
_TRANSIENT = (sqlite3.OperationalError, OSError, TransientJournalError)

#: Said of a task that ran out of time while no coordinator ran it (found so at recovery).
_WHILE_DOWN = "(while the coordinator was down)"

#: ``completed_by_node`` keeps a series of its own for each member membership knows and for
#: this many other nodes (those credited most recently); the items of the rest are counted
#: under ``GONE_NODES``, which no node id can be (:func:`fold_gone_nodes`).
KEEP_GONE_NODES = 64
GONE_NODES = "(gone)"

_POLICIES = frozenset(p.value for p in Policy)
_AGGREGATIONS = frozenset(m.value for m in Mode)


class _KnownState(NamedTuple):
    """What :meth:`Coordinator._views` keeps of a member, as of its gossiped state object
    (``state``; a new object, gossiped anew, is read again): its models (id, version), roles
    and links as sets, and when (loop time) this coordinator first saw its position and
    velocity as they are (the age :func:`~meshinfer.proto.contact.node_contact_s` takes)."""

    state: Any
    models: frozenset[tuple[str, str]]
    roles: frozenset[str]
    links: frozenset[str]
    placed_at: float


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
    #: Fast failover: after a node's session is lost abruptly, the node must answer a ping (over
    #: another session, or a re-dial) within this many seconds, or its items are re-dispatched
    #: (0 disables the fast path: membership decides). On a slow link, set it above a round
    #: trip plus a retransmission.
    redial_timeout_s: float = 0.25
    #: Journal an item's dispatch, and its node's accept (running), only if its result is not
    #: in this long after it (a quick item costs the journal its result alone).
    running_mark_delay_s: float = 0.05
    #: Ended tasks are deleted from the journal (items, results, audit lines) this long after
    #: they ended, checked every ``prune_interval_s``; 0 keeps them forever.
    retention_s: float = 7 * 86400.0
    prune_interval_s: float = 60.0
    #: Inputs this large or larger are sent by reference to a node that keeps them already
    #: (see the module docstring); 0 always sends the bytes.
    input_ref_min_bytes: int = 64 * 1024
    #: The time budget (s) of a task that names no ``deadline_s``; 0: such a task has none.
    default_deadline_s: float = 0.0
    #: ``contact_aware``: radio range (m) of an infrastructure node (role ``rsu`` or link
    #: ``v2i``), from which a moving node's gossiped position and velocity give its contact time
    #: (:mod:`meshinfer.proto.contact`).
    radio_range_m: float = 300.0

    def __post_init__(self) -> None:
        if self.default_policy not in _POLICIES:
            raise ConfigError(f"default_policy: unknown policy {self.default_policy!r}")
        if self.default_aggregation not in _AGGREGATIONS:
            raise ConfigError(f"default_aggregation: unknown mode {self.default_aggregation!r}")
        if self.journal_synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(
                f'journal_synchronous: "FULL" or "NORMAL", not {self.journal_synchronous!r}'
            )
        for name in (
            "max_attempts",
            "item_timeout_s",
            "prune_interval_s",
            "retry_backoff_max_s",
            "node_capacity",
            "max_in_flight_per_node",
            "radio_range_m",
        ):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be > 0 and finite, got {getattr(self, name)!r}")
        for name in (
            "retry_backoff_s",
            "redial_timeout_s",
            "running_mark_delay_s",
            "retention_s",
            "input_ref_min_bytes",
            "default_deadline_s",
        ):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be >= 0 and finite, got {getattr(self, name)!r}")


@dataclass
class CoordinatorStats:
    dispatched: int = 0
    retries: int = 0
    refusals: int = 0  # retries not counted against max_attempts (Coordinator._retry)
    redispatched_after_death: int = 0  # after a death, a leave, or a lost session (below)
    redispatched_after_disconnect: int = 0  # by the fast path, before membership decided
    sessions_lost: int = 0  # node sessions that ended lost (no Close frame from it, or silent)
    sessions_closed: int = 0  # node sessions that ended otherwise (Close frame, local close)
    redials_ok: int = 0  # lost sessions whose node answered the ping (over another or a new one)
    resent_after_redial: int = 0  # items sent again to a node reachable after a lost session
    duplicates: int = 0
    foreign_results: int = 0  # results from a node their attempt was not sent to (refused)
    inputs_by_reference: int = 0  # items sent with an input_ref instead of their input's bytes
    input_bytes_saved: int = 0  # the bytes those references did not send
    input_cache_misses: int = 0  # references a node did not hold (the bytes went again)
    #: Items completed, by the node credited (one series per member membership knows, plus
    #: the ``KEEP_GONE_NODES`` others credited most recently; the rest are folded into the
    #: series ``GONE_NODES``: see :func:`fold_gone_nodes`).
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
        journal: Journal | None = None,
    ) -> None:
        """``journal``: the journal at ``journal_path`` already open (its lock held since a
        daemon checked it before joining the mesh); this coordinator closes it. None: ``start``
        opens it."""
        self.mesh = mesh
        self.config = config or CoordinatorConfig()
        self.journal_path = Path(journal_path)
        self.rng = rng or random.Random()
        self.stats_ = CoordinatorStats()
        self.scheduler = SchedulerState()
        self.journal: Journal | None = journal
        # One thread keeps journal calls in order and commits what is queued as one group.
        self._db = JournalWriter(lambda: self.journal, name="journal", stale=item_ended)
        self._started = False
        self._runs: dict[str, TaskRun] = {}
        self._items: dict[str, tuple[TaskRun, ItemRun]] = {}  # live item id -> run, item
        self._busy: Counter[str] = Counter()  # node -> live items sent to it (kept as they move)
        self._ready: asyncio.PriorityQueue[tuple[int, int, str]] = asyncio.PriorityQueue()
        #: Items no node took, per placement class (see _placement): heaps ordered as _ready.
        self._parked: dict[tuple, list[tuple[int, int, str]]] = {}
        self._seq = itertools.count()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._submitting: set[str] = set()  # submit() not answered yet, wait() to follow
        #: Tasks that ended while their submit() was still being answered: their record, read
        #: with the end, for the wait() that usually follows (oldest dropped beyond a bound).
        self._handed: OrderedDict[str, tuple[TaskRecord, int]] = OrderedDict()  # record, bytes
        self._handed_bytes = 0
        self._wake_parked = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: steps that journal, then act on what they wrote (a result, a failure, an end), each
        #: as a task of its own; aclose waits for them before it closes the journal, and one due
        #: after that is dropped (what it would have journaled is redone after a restart)
        self._steps = Steps(log, "coordinator step")
        #: per live task, the timer of its deadline or of its aggregation's timeout
        self._task_timers: dict[str, asyncio.TimerHandle] = {}
        #: each member's models, roles and links as sets, as of its gossiped state object, and
        #: when (loop time) this coordinator first saw its position and velocity as they are
        self._sets_of: dict[str, _KnownState] = {}
        self._inputs = InputRefs(mesh, self.config.input_ref_min_bytes, self.stats_)
        #: the nodes of completed_by_node's own series, the one credited last at the end
        self._credited_at: OrderedDict[str, None] = OrderedDict()
        #: the newest certificate of each node's sessions: one the list in force revokes keeps
        #: its node out of scheduling, whatever membership remembers (coordinator.certificates)
        self._certificates = NodeCertificates(mesh)
        self._reach = Reachability(
            mesh, self.stats_, redial_timeout_s=self.config.redial_timeout_s,
            on_lost=self._lost, on_back=self._wake_parked.set,
            on_session_lost=self._forget_mirror, on_resend=self._resend_to,
        )  # fmt: skip
        #: Items whose result is being journaled (how many of their results: two copies of
        #: one result may be in the journal's hands at once).
        self._answered: Counter[str] = Counter()
        #: Items of those whose node was lost meanwhile (died, left, unreachable): item id ->
        #: (node, attempt, why, fast). Re-dispatched once their answers are handled, unless
        #: one was taken (see _answer_handled).
        self._lost_while_answered: dict[str, tuple[str, int, str, bool]] = {}
        #: Items dropped for good whose failure is being journaled (see _fail_item): a result
        #: the journal may still take counts, as for a live item, only from the nodes sent it.
        self._failing: dict[str, ItemRun] = {}
        self._closed = False
        self._closing = asyncio.Event()  # set by aclose: wakes a step waiting to retry a write
        #: :meth:`_recover` is over: answers from nodes count from then on (see _on_result)
        self._recovered = False
        self._running_loop: asyncio.AbstractEventLoop | None = None

    @property
    def node_id(self) -> str:
        return self.mesh.node_id

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        return self._running_loop or asyncio.get_running_loop()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (and recover) the journal, hook into the mesh, start dispatching."""
        self._running_loop = asyncio.get_running_loop()
        if self.journal is None:
            self.journal = await self._db.run_alone(
                lambda: Journal(self.journal_path, synchronous=self.config.journal_synchronous)
            )
        self._started = True
        peers = self.mesh.peers
        peers.on(TaskAccepted, self._on_accepted)
        peers.on(TaskResult, self._on_result)
        peers.on(TaskFailed, self._on_failed)
        assert self.mesh.membership is not None, "start the MeshNode first"
        self.mesh.membership.subscribe(self._on_member)
        self._reach.start()
        self._certificates.start()
        await self._recover()
        self._recovered = True
        loop = self._loop
        self._tasks = [
            loop.create_task(self._dispatch_loop(), name="coordinator-dispatch"),
            loop.create_task(self._parked_loop(), name="coordinator-parked"),
        ]
        if self.config.retention_s > 0:
            self._tasks.append(loop.create_task(self._prune_loop(), name="coordinator-prune"))
        for task in self._tasks:
            task.add_done_callback(_log_death)

    async def aclose(self) -> None:
        """Stop dispatching and close the journal (in-flight items stay journaled). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, self._reach.aclose(), return_exceptions=True)
        await self._steps.aclose()  # results and failures being journaled: they land first
        await self._inputs.aclose()  # inputs being hashed: their items are not queued any more
        for timer in (*self._timers.values(), *self._task_timers.values()):
            timer.cancel()
        if self.journal is not None:
            await self._db.run_alone(self.journal.close)
        await self._db.aclose()

    def _check_started(self) -> None:
        if not self._started:
            raise LocalProtocolError("the coordinator is not started")

    async def _recover(self) -> None:
        recovered = await self._db.run("recover")
        now, wall = self._loop.time(), time.time()
        for rec in recovered:
            # accepted this long ago, by the journal's wall clock (the loop's did not survive)
            accepted_at = now - max(0.0, wall - rec.task.summary.created_at)
            run = self._new_run(rec.task.spec, accepted_at)
            self._runs[run.task_id] = run
            # journaled answers count as of the task's start: they came in while it was live
            # (an aggregation's timeout must not call them late), then the clock catches up
            for item in rec.task.items:
                if item.result is not None:
                    self._replay_result(run, item.item_id, item.result, accepted_at)
                elif item.state == TaskState.FAILED:
                    run.record_failure(item.item_id, item.error or "failed", accepted_at)
            settled = run.done
            run.check_timeout(now)  # an aggregation whose timeout passed meanwhile ends here
            if run.done and not settled and not run.outcome.succeeded:
                error = f"{run.outcome.error} {_WHILE_DOWN}"
                log.info("task %s failed: %s", run.task_id, error)
                run.outcome = replace(run.outcome, error=error)
            # past its deadline: it fails here, its items unsent (they would go with no time)
            expired = run.expires_at is not None and run.expires_at <= now
            if expired and run.aggregator is None and not run.done:
                error = f"{_deadline_passed(run)} {_WHILE_DOWN}"
                log.info("task %s failed: %s", run.task_id, error)
                run.outcome = Outcome(False, error=error)
            attempts = await self._attempts_of(rec)
            log.info("recovered task %s (%d items to dispatch)", run.task_id, len(attempts))
            # every result was in before the crash, or a pipeline's outputs misfit: it ends
            await self._advance(run, attempts)
            self._arm_deadline(run)  # (nothing once it ended)

    async def _attempts_of(self, rec: RecoveredTask) -> dict[str, Attempt]:
        """The recovered task's items to dispatch, each with its journaled :data:`Attempt`
        (only the nodes of its earlier attempts' dispatches may answer those): the node of the
        attempt just before its own is on its row; the journal's dispatch lines, read only if
        an item is further on, have those before (:meth:`Journal.dispatches`)."""
        far = any(i.attempt > 2 for i in rec.to_dispatch)
        logged = await self._db.run("dispatches", rec.task.task_id) if far else {}
        attempts: dict[str, Attempt] = {}
        for i in rec.to_dispatch:
            sent = {(a, node) for a, node in logged.get(i.item_id, ()) if a < i.attempt}
            if i.node and i.attempt > 1:
                sent.add((i.attempt - 1, i.node))
            attempts[i.item_id] = (i.attempt, i.refused, frozenset(sent))
        return attempts

    def _new_run(self, spec: TaskSpec, accepted_at: float) -> TaskRun:
        return TaskRun(spec, default_aggregation=self.config.default_aggregation, now=accepted_at)

    def _replay_result(self, run: TaskRun, item_id: str, blob: bytes, now: float) -> None:
        msg = messages.decode(blob)
        if isinstance(msg, TaskResult):
            run.record_result(item_id, msg.output, msg.node_id, now)

    # --- the API ---------------------------------------------------------------------------

    async def submit(self, spec: TaskSpec, *, will_wait: bool = True) -> str:
        """Validate, journal (durably), and queue ``spec``; returns its task id.

        ``will_wait``: the caller calls :meth:`wait` next, so a task that ends before this
        returns has its record read with its end and kept for that wait (no second journal
        read); False for callers that never wait (the HTTP API), whose records are not kept.

        The same spec under a known task id (an idempotent client retry) returns the id and
        runs nothing again, whether the task still runs or is over; another spec under a known
        id raises :class:`~coordinator.journal.TaskConflictError`. Raises
        :class:`~meshinfer.proto.tasks.InvalidTaskError` (a ConfigError) for a bad spec.

        A spec naming no ``deadline_s`` is accepted with ``default_deadline_s`` (if set), so
        the journal, recovery and the task's document all hold the budget it ran under (a
        retry of it after the default changed is a conflict). Likewise a parallel spec with a
        quorum or weights and no ``aggregation`` is accepted with ``default_aggregation``, and
        refused (InvalidTaskError) if that mode takes no quorum or weights. A spec of another
        pattern naming an ``aggregation`` is refused (it would be ignored), unless the very
        same spec is journaled under its id (accepted before that check: a retry of it gets
        its id, as any idempotent retry does).
        """
        self._check_started()
        if spec.deadline_s is None and self.config.default_deadline_s:
            spec = replace(spec, deadline_s=self.config.default_deadline_s)
        spec = with_aggregation_mode(spec, self.config.default_aggregation)
        run = self._new_run(spec, self._loop.time())  # validates the spec
        try:
            check_aggregation_used(spec)
        except InvalidTaskError:
            if not await self._db.run("holds", spec):  # a new task (or another spec): refused
                raise
            return spec.task_id  # a retry of a task journaled before the check: runs nothing
        durable = self._db.call("accept", spec, run.outline, on_decided=partial(self._decided, run))
        durable.add_done_callback(partial(self._undo_unless_durable, run))
        if not will_wait:
            await asyncio.shield(durable)  # a cancelled caller leaves the task to run
            return spec.task_id
        self._submitting.add(spec.task_id)
        try:
            await asyncio.shield(durable)
        finally:
            self._submitting.discard(spec.task_id)
        return spec.task_id

    def _decided(self, run: TaskRun, outcome: CallOutcome) -> None:
        """The journal took the task (its COMMIT is still syncing): dispatch its items now.
        Their results are journaled after the task, by the same ordered writer."""
        if outcome.value and outcome.error is None and not self._closed:
            self._runs[run.task_id] = run
            self._schedule_ready(run, {})
            self._arm_deadline(run)

    def _undo_unless_durable(self, run: TaskRun, durable: asyncio.Future[object]) -> None:
        """The task's COMMIT failed after its items may have gone out: call them back."""
        if durable.cancelled() or durable.exception() is None:
            return
        if self._runs.get(run.task_id) is run:
            self._call_back(run.task_id, [], "task not journaled")
            self._forget(run.task_id)

    async def get(self, task_id: str) -> TaskRecord:
        self._check_started()
        return await self._db.run("get", task_id)

    async def list_tasks(self, **filters: Any) -> TaskPage:
        self._check_started()
        return await self._db.run("list", **filters)

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """The task once it ended (or as it is at ``timeout``)."""
        if task_id not in self._runs:  # not running here: as the journal has it (or unknown)
            handed = self._handed.pop(task_id, None)
            if handed is None:
                return await self.get(task_id)
            self._handed_bytes -= handed[1]
            return handed[0]
        fut: asyncio.Future[TaskRecord | None] = self._loop.create_future()
        waiters = self._waiters.setdefault(task_id, [])
        waiters.append(fut)
        record = None
        try:
            async with asyncio.timeout(timeout):
                record = await fut  # read with the task's end, in the same journal call
        except TimeoutError:
            pass
        finally:
            if fut in waiters:
                waiters.remove(fut)
            if not waiters and self._waiters.get(task_id) is waiters:
                del self._waiters[task_id]
        return record if record is not None else await self.get(task_id)

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task; the nodes running its items are told. False if it already ended
        (also when it ended after this call read it live: the journal says which came first)."""
        record = await self.get(task_id)  # UnknownTaskError for an unknown id
        if record.state.value in ("succeeded", "failed", "cancelled"):
            return False
        in_flight = await self._db.run("cancel", task_id)
        if in_flight is None:
            return False
        self._call_back(task_id, in_flight, "task cancelled")
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

    def waiting(self, task_id: str) -> dict[str, str]:
        """Why each item of a task live here that is on no node is waiting (for people: a
        task's status), by item id: its retry (after a failed attempt, named), its large input
        being hashed, no node serves its model, none meets its requirements, all that could are
        full, a pipeline stage it needs is not done, or only its turn.
        Empty for a task that is not live here. Items of one placement class share a reason
        (their task's params are the same): a large batch costs one look per model."""
        run = self._runs.get(task_id)
        if run is None:
            return {}
        why: dict[str, str] = {}
        by_class: dict[tuple, str] = {}
        views: list[NodeView] | None = None
        full: frozenset[str] = frozenset()
        policy = run.spec.policy or self.config.default_policy
        for item_id, entry in run.items.items():
            if entry.node is not None or item_id not in self._items:
                continue
            if entry.retrying is not None:
                why[item_id] = f"retrying after {entry.retrying} (attempt {entry.attempt})"
                continue
            if self._inputs.is_hashing(entry):
                why[item_id] = "its input is being hashed (to be sent by reference)"
                continue
            if views is None:
                views, full = self._views(), self._full_nodes()
            key = self._placement(run, entry)
            if key not in by_class:
                by_class[key] = unplaced_reason(
                    policy, views, entry.item, full=full, state=self.scheduler
                )
            why[item_id] = by_class[key]
        for item_id in run.unstarted():
            why[item_id] = "waiting for the pipeline stages it takes its input from"
        return why

    def nodes(self) -> list[dict[str, Any]]:
        """Every member as the coordinator sees it, with the work it has in flight and done,
        the round trip its membership probes measured (``rtt_ms``) and the seconds until it is
        expected to leave the radio range of the roadside infrastructure (``contact_s``, as the
        ``contact_aware`` policy estimates it: :func:`~meshinfer.proto.contact.node_contact_s`;
        None: unknown, which counts as long enough). A member that died or left has no
        ``queue_depth``, ``rtt_ms`` nor ``contact_s`` (None): its last ones are stale."""
        membership = self.mesh.membership
        if membership is None:
            return []
        in_flight = self._busy
        infrastructure = infrastructure_positions(m.state for m in membership.core.live_members())
        now, radio_range_m = self._loop.time(), self.config.radio_range_m
        out = []
        for m in sorted(membership.core.members(), key=lambda m: m.node_id):
            s = m.state
            contact_s = None
            if m.is_live:
                age_s = now - self._known(m.node_id, s, now).placed_at
                contact_s = node_contact_s(s, infrastructure, radio_range_m, age_s=age_s)
            out.append({
                "node_id": m.node_id, "status": m.status.value, "roles": list(s.roles),
                "models": [f"{x.model_id}@{x.version}" for x in s.models],
                "queue_depth": s.queue_depth if m.is_live else None,
                "address": str(Address(s.host, s.port)),  # IPv6 in brackets
                "in_flight": in_flight[m.node_id],
                "done": self.stats_.completed_by_node[m.node_id],
                "rtt_ms": None if (rtt := membership.core.rtt(m.node_id)) is None
                else round(rtt * 1e3, 3),
                "contact_s": None if contact_s is None else round(contact_s, 3),
            })  # fmt: skip
        return out

    async def stats(self) -> dict[str, Any]:
        self._check_started()
        # off the journal's thread: its table scans must not hold up the writes behind them
        js = await asyncio.to_thread(read_stats, self.journal_path)
        s = self.stats_
        return {
            "tasks": js.tasks, "items": js.items, "journal_counters": js.counters,
            "dispatched": s.dispatched, "retries": s.retries, "refusals": s.refusals,
            "redispatched_after_death": s.redispatched_after_death,
            "redispatched_after_disconnect": s.redispatched_after_disconnect,
            "sessions_lost": s.sessions_lost, "redials_ok": s.redials_ok,
            "resent_after_redial": s.resent_after_redial,
            "duplicates": s.duplicates, "foreign_results": s.foreign_results,
            "completed_by_node": dict(s.completed_by_node),
            "inputs_by_reference": s.inputs_by_reference,
            "input_bytes_saved": s.input_bytes_saved,
            "input_cache_misses": s.input_cache_misses, "stale_tells": self._db.stale_tells,
            "live_tasks": len(self._runs), "parked_items": sum(map(len, self._parked.values())),
        }  # fmt: skip

    # --- dispatching -----------------------------------------------------------------------

    def _schedule_ready(self, run: TaskRun, attempts: Mapping[str, Attempt]) -> None:
        """Queue the task's items that are ready; ``attempts``: item id -> :data:`Attempt` as
        the journal has it (recovery), else a first attempt."""
        for item in run.ready():
            attempt, refused, sent = attempts.get(item.item_id, (1, 0, frozenset()))
            entry = ItemRun(_with_attempt(item, attempt), attempt, refused=refused)
            entry.sent.update(sent)  # earlier attempts went there: only their results count
            run.items[item.item_id] = entry
            self._items[item.item_id] = (run, entry)
            # a large input is hashed in a worker thread first (coordinator.input_refs)
            self._inputs.when_hashed(run, entry, self._queue, item.item_id, run.spec.priority)
        self._arm_aggregation_timeout(run)

    def _queue(self, item_id: str, priority: int) -> None:
        self._ready.put_nowait((-priority, next(self._seq), item_id))

    async def _dispatch_loop(self) -> None:
        while True:
            _, _, item_id = await self._ready.get()
            pair = self._items.get(item_id)
            if pair is None or pair[1].node is not None or pair[0].done:
                # cancelled or finished meanwhile, or out already: queued twice (a retry's
                # timer, or a hash's callback for a task id pruned and submitted again); or
                # its task's end is decided, being journaled: it would only be called back
                continue
            run, entry = pair
            entry.retrying = None  # (its backoff is over: now it waits for a node, if any)
            node = self._choose(run, entry)
            if node is None:
                heap = self._parked.setdefault(self._placement(run, entry), [])
                heapq.heappush(heap, (-run.spec.priority, next(self._seq), item_id))
                continue
            self._send(run, entry, node)

    def _choose(self, run: TaskRun, entry: ItemRun) -> str | None:
        policy = run.spec.policy or self.config.default_policy
        views, full = self._views(), self._full_nodes()
        kw = {"rng": self.rng, "state": self.scheduler}
        node = choose(policy, views, entry.item, exclude=frozenset(entry.tried) | full, **kw)
        if node is None and entry.tried:  # every capable node had it once: allow repeats, but
            if entry.last is not None:  # not the one it just came back from while another fits
                node = choose(policy, views, entry.item, exclude=full | {entry.last}, **kw)
            if node is None:
                node = choose(policy, views, entry.item, exclude=full, **kw)
        return node

    def _full_nodes(self) -> frozenset[str]:
        """The nodes with ``max_in_flight_per_node`` items of this coordinator on them."""
        limit = self.config.max_in_flight_per_node
        return frozenset(n for n, k in self._busy.items() if k >= limit)

    def _assign(self, entry: ItemRun, node: str | None) -> None:
        """Move a live item to ``node`` (None: to no node), keeping ``_busy`` in step."""
        if entry.node:
            self._busy[entry.node] -= 1
            if not self._busy[entry.node]:
                del self._busy[entry.node]
            self._wake_parked.set()  # a slot on that node is free again
        entry.node = node
        if node:
            self._busy[node] += 1

    def _drop(self, item_id: str) -> tuple[TaskRun, ItemRun] | None:
        """The item is no longer live here (answered, failed, or its task ended)."""
        pair = self._items.pop(item_id, None)
        if pair is not None:
            self._assign(pair[1], None)
        return pair

    def _views(self) -> list[NodeView]:
        """What the scheduling policies see of each reachable live member, with the items
        this coordinator has on each node (``_busy``). A member whose certificate is revoked
        is left out whatever membership says of it (:mod:`coordinator.certificates`)."""
        in_flight = self._busy
        membership = self.mesh.membership
        if membership is None:
            return []
        views, live = [], membership.core.live_members()
        infrastructure = infrastructure_positions(m.state for m in live)
        now = self._loop.time()
        for m in live:
            if not self._reach.reachable(m) or self._certificates.revoked(m.node_id):
                continue
            s = m.state
            known = self._known(m.node_id, s, now)
            views.append(NodeView(
                node_id=m.node_id, alive=m.status.value == "alive", models=known.models,
                roles=known.roles, has_gpu=s.gpu_free_mb > 0,
                free_gpu_memory=s.gpu_free_mb << 20 if s.gpu_free_mb else None,
                queue_depth=max(s.queue_depth, in_flight[m.node_id]),
                capacity=self.config.node_capacity, rtt_s=membership.core.rtt(m.node_id),
                links=known.links,
                contact_s=node_contact_s(
                    s, infrastructure, self.config.radio_range_m, age_s=now - known.placed_at
                ),
            ))  # fmt: skip
        if len(self._sets_of) > 2 * len(views) + 64:  # members gone for good: forget theirs
            self._sets_of = {v.node_id: self._sets_of[v.node_id] for v in views}
        return views

    def _known(self, node: str, state: Any, now: float) -> _KnownState:
        """What is kept of ``node`` as of its gossiped ``state`` (read again once that object
        is new; its position's age restarts only when its position or velocity changed)."""
        known = self._sets_of.get(node)
        if known is None or known.state is not state:
            same_place = known is not None and _motion(known.state) == _motion(state)
            known = self._sets_of[node] = _KnownState(
                state=state,
                models=frozenset((x.model_id, x.version) for x in state.models),
                roles=frozenset(state.roles),
                links=frozenset(state.links),
                placed_at=known.placed_at if same_place else now,  # (its age starts here)
            )
        return known

    def _send(self, run: TaskRun, entry: ItemRun, node: str) -> None:
        self._assign(entry, node)
        entry.tried.add(node)
        entry.sent.add((entry.attempt, node))
        entry.last = node
        entry.dispatched_at = self._loop.time()
        self.stats_.dispatched += 1
        if not self._send_message(run, entry, node):
            return
        # Journaled only if its result is overdue (see the module docstring).
        item_id, attempt = entry.item.item_id, entry.attempt
        delay = self.config.running_mark_delay_s
        if delay < self.config.item_timeout_s:
            self._set_timer(item_id, delay, self._dispatch_overdue, item_id, attempt)
        else:
            self._set_timer(item_id, self.config.item_timeout_s, self._on_timeout, item_id, attempt)

    def _message(self, run: TaskRun, entry: ItemRun, node: str) -> TaskAssign:
        """The item's TaskAssign for ``node``: what is left of the task's deadline, the input
        by reference or to be kept where ``node``'s input cache allows."""
        msg = entry.item.to_message()
        if run.expires_at is not None:  # what is left of the task's budget
            msg = replace(msg, deadline_s=max(0.0, run.expires_at - self._loop.time()))
        return self._inputs.message(run, entry, node, msg)

    def _forget_mirror(self, node: str) -> None:
        """What ``node`` keeps of ours is no longer known (a session with it ended without its
        Close frame, so what was queued on it may never have arrived; a send failed; it died,
        left or was given up on)."""
        self._inputs.forget_node(node)

    def _resend_input(self, run: TaskRun, entry: ItemRun, node: str) -> None:
        """``node`` does not hold the input this attempt named by reference: the same attempt
        goes again with the bytes (not a retry: the node ran nothing)."""
        self._inputs.missed(node, entry)
        self._send_message(run, entry, node)

    def _send_message(self, run: TaskRun, entry: ItemRun, node: str) -> bool:
        """Send the item's TaskAssign to ``node``; if it cannot even be queued, forget what the
        mirror now believes the node keeps and retry the item elsewhere (and the same, later,
        if it is dropped unwritten: :meth:`_unsent`)."""
        unsent = partial(self._unsent, entry.item.item_id, entry.attempt, node)
        if self.mesh.peers.send(node, self._message(run, entry, node), on_failure=unsent):
            self._inputs.queued(entry)
            return True
        self._never_got(run, entry, node, f"could not send to {node}")
        return False

    def _unsent(self, item_id: str, attempt: int, node: str, error: BaseException) -> None:
        """The TaskAssign of this attempt was queued for ``node`` but dropped before it was
        written (no session could be had: e.g. a restarted node not yet found at its new
        address): the node never saw it, so retry it now rather than after its timeout."""
        pair = self._items.get(item_id)
        if pair is None or self._closed:
            return
        run, entry = pair
        if entry.attempt == attempt and entry.node == node:
            self._never_got(run, entry, node, f"could not send to {node}: {error}")

    def _never_got(self, run: TaskRun, entry: ItemRun, node: str, reason: str) -> None:
        """``node`` never got this attempt: what the mirror believes it keeps is unknown now,
        and the item is retried as a refusal (see :meth:`_retry`)."""
        self._forget_mirror(node)
        self._retry(run, entry, reason, backoff=True, ran=False)

    def _dispatch_overdue(self, item_id: str, attempt: int) -> None:
        """The item's result is not in ``running_mark_delay_s`` after its dispatch: journal the
        dispatch, then watch for the item's timeout."""
        pair = self._items.get(item_id)
        if pair is None or pair[1].attempt != attempt or self._closed:
            return
        self._journal_dispatch(pair[1])
        remaining = self.config.item_timeout_s - self.config.running_mark_delay_s
        self._set_timer(item_id, remaining, self._on_timeout, item_id, attempt)

    def _journal_dispatch(self, entry: ItemRun) -> None:
        """Journal the item's current dispatch unless that is done or a vouched result of it is
        queued (``take_result(sent_to=...)`` records the dispatch). Told, not waited for: the
        journal's thread runs it before anything queued later (a failure, a result)."""
        item_id, attempt = entry.item.item_id, entry.attempt
        if entry.node is None or entry.journaled == attempt:
            return
        entry.journaled = attempt
        self._db.tell("mark_dispatched", item_id, entry.node, attempt)

    def _set_timer(self, item_id: str, delay: float, callback, *args: object) -> None:
        """The item's one timer (its dispatch mark or its timeout), replacing any before."""
        _replace_timer(self._timers, item_id, self._loop.call_later(delay, callback, *args))

    def _on_timeout(self, item_id: str, attempt: int) -> None:
        pair = self._items.get(item_id)
        if pair is not None and pair[1].attempt == attempt:
            run, entry = pair
            self._retry(run, entry, f"no answer from {entry.node} in {self.config.item_timeout_s}s")

    def _placement(self, run: TaskRun, entry: ItemRun) -> tuple:
        """Items of one class fit the same nodes: model, policy and requirements. If the first
        of a class fits nowhere, none of the class does (a node an item failed on is only
        avoided while another fits)."""
        model = entry.item.model
        policy = run.spec.policy or self.config.default_policy
        return (model.model_id, model.version, policy, *requirements(entry.item.params))

    async def _parked_loop(self) -> None:
        """Items no node could take wait here, per placement class, until a slot frees,
        membership or a node's reachability changes, or 1 s passes. Then as many of a class's
        items as the reachable nodes serving its model have free slots are tried again, highest
        priority first: a large batch waiting for slots is not re-scheduled whole on every
        result, and a class that fits nowhere holds back no other class."""
        loop = self._loop
        swept_at = loop.time()
        while True:
            self._wake_parked.clear()
            try:
                async with asyncio.timeout(1.0):
                    await self._wake_parked.wait()
            except TimeoutError:
                pass
            if not self._parked:
                continue
            # once a second, by the clock: a busy fleet's gossip and results wake this loop
            # more often than that, and a class no node takes would keep its ended items
            sweep = loop.time() - swept_at >= 1.0
            if sweep:
                swept_at = loop.time()
            free = self._free_slots()
            for key, heap in list(self._parked.items()):
                if sweep:  # drop the entries of items that ended or were cancelled meanwhile
                    heap[:] = [e for e in heap if e[2] in self._items]
                    heapq.heapify(heap)
                budget = free[key[:2]]
                while budget > 0 and heap:
                    _, _, item_id = heapq.heappop(heap)
                    pair = self._items.get(item_id)
                    if pair is not None:
                        self._queue(item_id, pair[0].spec.priority)
                        budget -= 1
                if not heap:
                    del self._parked[key]

    async def _prune_loop(self) -> None:
        """Retention: every ``prune_interval_s``, delete from the journal the tasks that ended
        more than ``retention_s`` ago, a bounded batch per journal group (the calls queued
        behind one wait for a short group only). A failed prune is logged and tried again at
        the next interval."""
        retention = self.config.retention_s
        while True:
            await asyncio.sleep(self.config.prune_interval_s)
            try:
                while await self._db.run("prune", retention, limit=PRUNE_BATCH) == PRUNE_BATCH:
                    pass
            except (MeshInferError, sqlite3.Error, OSError) as exc:  # e.g. disk I/O, locked
                log.warning("journal retention: prune failed, retrying later: %s", exc)

    def _free_slots(self) -> Counter[tuple[str, str]]:
        """Per model: the items the reachable nodes serving it could take now (per-node cap;
        a node serving several models counts for each)."""
        cap, free = self.config.max_in_flight_per_node, Counter()
        for view in self._views():
            room = cap - self._busy[view.node_id]
            if room > 0:
                for model in view.models:
                    free[model] += room
        return free

    # --- answers from nodes ----------------------------------------------------------------

    def _on_accepted(self, peer: str, msg: TaskAccepted) -> None:
        pair = self._items.get(msg.item_id)
        if pair is None or not self._started or not _sent_to(pair[1], msg.attempt, peer):
            return  # stale: e.g. a send before a restart (the same attempt is sent again)
        self._loop.call_later(
            self.config.running_mark_delay_s, self._mark_running, msg.item_id, msg.attempt
        )

    def _mark_running(self, item_id: str, attempt: int) -> None:
        """Journal the item as running unless its result (or a retry) came first."""
        pair = self._items.get(item_id)
        if pair is None or pair[1].attempt != attempt or not self._started or self._closed:
            return
        self._journal_dispatch(pair[1])  # first, if its own timer has not fired yet
        self._db.tell("mark_running", item_id, attempt)

    def _on_result(self, peer: str, msg: TaskResult) -> None:
        if not self._recovered:  # its item may not be live yet, to take a result the journal
            return  # takes: recovery sends it again, and its node answers that send
        self._answered[msg.item_id] += 1  # being journaled: not to be re-dispatched meanwhile
        self._steps.spawn(self._accept_result(peer, msg))

    async def _accept_result(self, peer: str, msg: TaskResult) -> None:
        try:
            pair = self._items.get(msg.item_id)
            known = pair[1] if pair is not None else self._failing.get(msg.item_id)
            if known is not None and not _may_answer(known, msg.attempt, peer):
                self.stats_.foreign_results += 1
                log.warning(
                    "refused a result of %s attempt %d from %s: that attempt went to %s",
                    msg.item_id, msg.attempt, peer, _nodes_of(known, msg.attempt) or "no node",
                )  # fmt: skip
                return
            msg = self._credited(peer, msg)
            taken = await self._take_result(pair, peer, msg)
        finally:
            self._answered[msg.item_id] -= 1
            if not self._answered[msg.item_id]:
                del self._answered[msg.item_id]
                if msg.item_id in self._lost_while_answered:
                    self._loop.call_soon(self._answer_handled, msg.item_id)
        if taken is None:  # never written: the item runs on here (or again after a restart)
            return
        (fresh, ended), ending, failed_before = taken
        if not fresh:
            if failed_before and await self._take_result_journaled(pair, msg):
                return
            self.stats_.duplicates += 1
            return
        self._call_back_superseded(peer, msg)
        live, pair = pair, self._drop(msg.item_id)
        if pair is None and live is not None and self._runs.get(live[0].task_id) is live[0]:
            pair = live  # given up on meanwhile (its timeout): the journal took this result first
        self._cancel_timer(msg.item_id)
        if pair is not None:
            self._count_result(pair[1], msg)
        if ending is not None:  # the journal ended the task together with this result
            self._ended(ending.task_id, *ended)
            return
        if pair is None:
            return
        run = pair[0]
        try:
            run.record_result(msg.item_id, msg.output, msg.node_id, self._loop.time())
        except RemoteProtocolError as exc:  # a node returned an output we cannot use
            run.record_failure(msg.item_id, f"bad output from {peer}: {exc}", self._loop.time())
        await self._advance(run)

    async def _take_result(
        self, pair: tuple[TaskRun, ItemRun] | None, peer: str, msg: TaskResult
    ) -> tuple[tuple[bool, TaskEnd | None], TaskEnding | None, bool] | None:
        """Journal ``msg`` (``take_result``, with the task's end when it decides it), written
        again while the write fails for a cause that may pass (see :meth:`_until_durable`) and
        the item's task is live here. Returns the journal's answer, the ending it was given,
        and whether a write failed first (it may have committed all the same: its sync
        failed); None if it was never written (the task ended meanwhile, or the coordinator
        closes: recovery sends the item again, and its node answers that).

        A result of the attempt now out, from the node it went to, vouches for its dispatch
        (``sent_to``): that dispatch counts as journaled while the write is under way (no
        ``mark_dispatched`` after it), and no longer once a write failed (a crash or a failure
        of the item then finds the journal's item as it was)."""
        sent = pair is not None and _sent_to(pair[1], msg.attempt, peer)
        blob, failures, ending = messages.encode(msg), 0, None

        async def write() -> tuple[bool, TaskEnd | None]:
            nonlocal failures, ending
            ending = self._ending_with(msg)  # (again: the run may have moved on meanwhile)
            entry = pair[1] if sent and _sent_to(pair[1], msg.attempt, peer) else None
            before = entry.journaled if entry is not None else 0
            if entry is not None:
                entry.journaled = msg.attempt
            try:
                return await self._db.run(
                    "take_result", msg.item_id, msg.attempt, blob, node=msg.node_id,
                    sent_to=peer if sent else None, ending=ending,
                )  # fmt: skip
            except _TRANSIENT:
                failures += 1
                if entry is not None and entry.journaled == msg.attempt:
                    entry.journaled = before
                raise

        try:
            if pair is None:  # not live here: the journal refuses it (one try)
                answer = await write()
            else:
                what = f"taking the result of {msg.item_id} from {peer}"
                answer = await self._until_durable(pair[0], what, write)
        except _TRANSIENT as exc:
            log.warning("journal: the result of %s from %s is not journaled: %s",
                        msg.item_id, peer, exc)  # fmt: skip
            return None
        return None if answer is None else (answer, ending, failures > 0)

    async def _take_result_journaled(
        self, pair: tuple[TaskRun, ItemRun] | None, msg: TaskResult
    ) -> bool:
        """``msg``'s write failed, then the journal refused it when it was written again: the
        failed write may have committed (its sync failed). If the item is still live here and
        the journal has a result of it, that is its outcome, taken as a fresh one would be;
        whether it was."""
        item_id = msg.item_id
        if pair is None or self._items.get(item_id) is not pair:
            return False
        run = pair[0]
        blob = await self._journaled_result(run, item_id)
        if blob is None or self._items.get(item_id) is not pair:
            return False
        self._drop(item_id)
        self._cancel_timer(item_id)
        self._count_result(pair[1], msg)
        self._record_journaled(run, item_id, blob)
        await self._advance(run)
        return True

    def _call_back_superseded(self, peer: str, msg: TaskResult) -> None:
        """The journal took ``msg``, a result of an earlier attempt than the one now out (a
        late answer after a retry): ``TaskCancel`` to the node running the later attempt, which
        would finish wasted work once the item is dropped here (and no longer counted on it)."""
        pair = self._items.get(msg.item_id)
        if pair is None or pair[1].node is None or _sent_to(pair[1], msg.attempt, peer):
            return
        node = pair[1].node
        log.info("%s answered by %s (attempt %d): cancelling attempt %d on %s",
                 msg.item_id, peer, msg.attempt, pair[1].attempt, node)  # fmt: skip
        self.mesh.peers.send(node, TaskCancel(msg.item_id, "answered by an earlier attempt"))

    def _credited(self, peer: str, msg: TaskResult) -> TaskResult:
        """``msg`` naming as the node that ran it one this coordinator can vouch for: the
        sender, or another member (one the sender passed the item to: work sharing). Any
        other ``node_id`` is the sender's say-so alone: the sender is credited (in the journal,
        the task document and ``completed_by_node``, whose series stay one per member)."""
        if msg.node_id == peer:
            return msg
        membership = self.mesh.membership
        if msg.node_id != self.mesh.node_id and membership is not None:
            if membership.core.member(msg.node_id) is not None:
                return msg
        log.info("result of %s from %s names %s, no member: credited to %s",
                 msg.item_id, peer, msg.node_id, peer)  # fmt: skip
        return replace(msg, node_id=peer)

    def _count_result(self, entry: ItemRun, msg: TaskResult) -> None:
        completed, node = self.stats_.completed_by_node, msg.node_id
        new = node not in completed
        completed[node] += 1
        self._credited_at[node] = None
        self._credited_at.move_to_end(node)
        if new:  # (only a new series can take the count past the bound)
            membership = self.mesh.membership
            known = {m.node_id for m in membership.core.members()} if membership else set()
            fold_gone_nodes(completed, self._credited_at, known, KEEP_GONE_NODES)
        if entry.dispatched_at is not None:
            elapsed = self._loop.time() - entry.dispatched_at
            model = entry.item.model
            self.scheduler.observe_runtime((model.model_id, model.version), elapsed)

    def _ending_with(self, msg: TaskResult) -> TaskEnding | None:
        """How the task ends if ``msg`` is accepted, when that alone decides it: the last
        missing result of a single, batch or pipeline task (aggregations are left to
        :meth:`_advance`: their outcome may depend on time). Tried on a copy of the run."""
        pair = self._items.get(msg.item_id)
        if pair is None:
            return None  # not live here: the journal will refuse it
        run = pair[0]
        ids = run.all_item_ids()
        if run.aggregator is not None or run.done or len(run.results) + 1 != len(ids):
            return None
        try:
            trial = object.__new__(TaskRun)  # a shallow copy whose result maps can change
            trial.__dict__.update(
                run.__dict__,
                results=dict(run.results),
                nodes=dict(run.nodes),
                failed=dict(run.failed),
            )
            trial.items = {}
            trial.record_result(msg.item_id, msg.output, msg.node_id, self._loop.time())
        except Exception:  # e.g. an output we cannot use: the ordinary way handles it
            return None
        outcome = trial.outcome
        if outcome is None:
            return None
        return self._ending(run, trial, outcome)

    def _ending(self, run: TaskRun, source: TaskRun, outcome: Outcome) -> TaskEnding:
        state = TaskState.SUCCEEDED if outcome.succeeded else TaskState.FAILED
        summary = encode_outcome(source, outcome)
        # read the record back with the end if someone waits, or soon will (see _handed)
        waited = run.task_id in self._waiters or run.task_id in self._submitting
        return TaskEnding(run.task_id, state, summary, outcome.error or None, waited)

    def _ended(
        self, task_id: str, in_flight: list[tuple[str, str]], record: TaskRecord | None
    ) -> None:
        """The journal ended the task: tell nodes still on its items (e.g. an ensemble that
        reached its quorum early), forget it here."""
        self._call_back(task_id, in_flight, "task finished")
        self._forget(task_id, record)

    def _call_back(self, task_id: str, in_flight: list[tuple[str, str]], reason: str) -> None:
        """``TaskCancel`` to every node on one of the task's items: those the journal had in
        flight, and those sent from here (a dispatch is journaled only once overdue)."""
        calls = {(item_id, node) for item_id, node in in_flight if node}
        run = self._runs.get(task_id)
        if run is not None:
            calls.update(
                (item_id, entry.node)
                for item_id, entry in run.items.items()
                if entry.node and item_id in self._items
            )
        for item_id, node in sorted(calls):
            self.mesh.peers.send(node, TaskCancel(item_id, reason))

    def _on_failed(self, peer: str, msg: TaskFailed) -> None:
        pair = self._items.get(msg.item_id)
        if pair is None or not _sent_to(pair[1], msg.attempt, peer):
            return  # stale (see _on_accepted); relayed failures come from the node sent to
        run, entry = pair
        if msg.code == FailureKind.INPUT_NOT_CACHED:
            if entry.by_reference:
                self._resend_input(run, entry, peer)
                return
            if entry.referenced == entry.attempt:  # the answer to a reference sent earlier in
                return  # this attempt: the bytes went after it (a resend after a re-dial)
            self._inputs.forget_input(peer, entry)  # sent with its bytes, yet not kept there
        reason = f"{peer}: {msg.message}"
        if msg.retryable:
            self._retry(run, entry, reason, backoff=True, ran=msg.code not in REFUSALS)
        else:
            self._steps.spawn(self._fail_item(run, entry, reason))

    def _on_member(self, event: MemberEvent) -> None:
        node = event.member.node_id
        if event.kind in (MemberEventKind.DEAD, MemberEventKind.LEFT):
            self._forget_mirror(node)  # if it comes back, its cache starts empty
            self._redispatch_from(node, f"node {node} {event.kind.value}")
        self._reach.on_member(event)
        if event.kind in (MemberEventKind.JOINED, MemberEventKind.ALIVE, MemberEventKind.UPDATED):
            self._wake_parked.set()

    def _lost(self, node: str, why: str) -> None:
        """``node``'s session ended abruptly and it answered no ping (over another session or a
        re-dial), or this node cut it off for a revoked certificate (``why`` says which)."""
        self._forget_mirror(node)
        self._redispatch_from(node, why, fast=True)

    def _resend_to(self, node: str) -> None:
        """A session with ``node`` was lost abruptly, and ``node`` is reachable again: what
        went over the lost session may never have arrived, an answer coming back on it is gone,
        and a node that restarted meanwhile holds nothing. Each item in flight there goes again
        under the same attempt (not a retry): a node still holding it keeps running it and
        answers once, one that does not runs it, and a second answer is dropped as a
        duplicate. (Not while the session they would go over is being cut for a revoked
        certificate: :class:`~coordinator.failover.Reachability` calls this once it is cut.)"""
        for run, entry in self._in_flight_on(node):
            if not run.done:
                self.stats_.resent_after_redial += 1
                self._send_message(run, entry, node)

    def _in_flight_on(self, node: str) -> list[tuple[TaskRun, ItemRun]]:
        """The items on ``node`` whose result is not being journaled (a copy: callers change
        ``_items``)."""
        return [
            (run, entry)
            for run, entry in self._items.values()
            if entry.node == node and entry.item.item_id not in self._answered
        ]

    def _redispatch_from(self, node: str, reason: str, *, fast: bool = False) -> None:
        """Retry at once every item in flight on ``node`` (it died, left or is unreachable);
        one whose result is being handled only once that is over, and only if it was not
        taken: refused here or by the journal, or not written (:meth:`_answer_handled`)."""
        for item_id in self._answered:
            pair = self._items.get(item_id)
            if pair is not None and pair[1].node == node:
                self._lost_while_answered[item_id] = (node, pair[1].attempt, reason, fast)
        for run, entry in self._in_flight_on(node):
            self.stats_.redispatched_after_death += 1
            self.stats_.redispatched_after_disconnect += fast
            self._retry(run, entry, reason, backoff=False)

    def _answer_handled(self, item_id: str) -> None:
        """The item's answers are handled (called soon after the last one's journal call: the
        step that took a result has dropped the item by then). If its node was lost meanwhile
        and it is still live there at that attempt (its result was refused, here or by the
        journal, or could not be written), it is retried now, as the loss would have done,
        rather than after its timeout."""
        if item_id in self._answered:  # another answer came meanwhile: once it is handled
            return
        lost = self._lost_while_answered.pop(item_id, None)
        pair = self._items.get(item_id)
        if lost is None or pair is None or self._closed:
            return
        node, attempt, reason, fast = lost
        run, entry = pair
        if entry.node == node and entry.attempt == attempt:
            self.stats_.redispatched_after_death += 1
            self.stats_.redispatched_after_disconnect += fast
            self._retry(run, entry, reason, backoff=False)

    # --- retries and outcomes --------------------------------------------------------------

    def _retry(
        self, run: TaskRun, entry: ItemRun, reason: str, *, backoff: bool = True, ran: bool = True
    ) -> None:
        """Try the item again (on another node if one fits), or fail it once ``max_attempts``
        attempts failed. ``ran=False``, a *refusal*: the node refused or handed back this
        attempt (draining, overloaded, model not loaded: ``REFUSALS``) or never got it
        (dropped unsent, though a resend after a re-dial may have reached it). Refusals do not
        count, up to ``max_attempts`` of them per item, so a rolling restart of the nodes fails
        no task while an item every node refuses for ever still fails. The journal keeps the
        count (``items.refused``), so a restarted coordinator goes on from it. The backoff still
        grows with every attempt, refused or not. Nothing once the coordinator is closed (a
        node's hand-back may still come while the daemon leaves the mesh): the item stays in
        flight in the journal, and the next start's recovery runs it again."""
        if self._closed:
            return
        item_id, attempt = entry.item.item_id, entry.attempt
        self._cancel_timer(item_id)
        counted = ran or entry.refused >= self.config.max_attempts
        if not counted:
            entry.refused += 1
            self.stats_.refusals += 1
        if attempt - entry.refused >= self.config.max_attempts:
            tried = f"{attempt} attempts" + (f" ({entry.refused} refused)" if entry.refused else "")
            self._steps.spawn(self._fail_item(run, entry, f"gave up after {tried}; last: {reason}"))
            return
        self.stats_.retries += 1
        outcome = "failed" if counted else "refused"
        log.info("retrying %s (attempt %d %s: %s)", item_id, attempt, outcome, reason)
        self._journal_dispatch(entry)  # the failure needs it first (and journals it, if lost)
        failure = partial(_journal_retry, self, item_id, entry.node, attempt, reason, not counted)
        entry.attempt += 1
        entry.item = _with_attempt(entry.item, entry.attempt)
        entry.retrying = reason
        self._assign(entry, None)
        delay = 0.0
        if backoff:
            doubled = 2.0 ** min(attempt - 1, 64)  # (2 ** 1024 overflows a float)
            delay = min(self.config.retry_backoff_max_s, self.config.retry_backoff_s * doubled)
        due = self._loop.time() + delay
        written = self._db.call(failure)  # queued now: in order with what comes after it
        self._steps.spawn(self._queue_once_journaled(run, entry, failure, written, due))

    async def _queue_once_journaled(
        self,
        run: TaskRun,
        entry: ItemRun,
        failure: Callable[[], bool],
        written: asyncio.Future[object],
        due: float,
    ) -> None:
        """Queue the item's next attempt at ``due`` (its backoff), but not before the journal
        has the failure of the attempt before it (``written``; written again while it fails:
        see :meth:`_until_durable`): a journal that still has that attempt in flight refuses
        the next one's dispatch and result. The wait is one group commit, within the backoff
        but for a retry after a node death. (A late result of the failed attempt may be taken
        meanwhile: the item is then done, and not queued.)"""
        item_id, attempt = entry.item.item_id, entry.attempt
        first: asyncio.Future[object] | None = written

        async def write() -> object:
            nonlocal first
            pending, first = first, None
            return await (pending if pending is not None else self._db.run(failure))

        if await self._until_durable(run, f"retrying item {item_id}", write) is None:
            return
        pair = self._items.get(item_id)
        if pair is None or pair[1] is not entry or entry.attempt != attempt or self._closed:
            return  # answered, failed or ended meanwhile
        self._loop.call_at(due, self._queue, item_id, run.spec.priority)

    async def _fail_item(self, run: TaskRun, entry: ItemRun, reason: str) -> None:
        """Fail the item for good: journal that (written again while the write fails, see
        :meth:`_until_durable`), then decide the task. A result of the item the journal took
        first is its outcome instead (the journal ignores the failure)."""
        item_id = entry.item.item_id
        self._journal_dispatch(entry)
        self._drop(item_id)
        self._cancel_timer(item_id)
        self._failing[item_id] = entry  # answers about it still count only from its nodes
        try:
            write = partial(
                self._db.run, "record_failure", item_id, entry.attempt, reason, retryable=False
            )
            changed = await self._until_durable(run, f"failing item {item_id}", write)
        finally:
            self._failing.pop(item_id, None)
        if changed is None or item_id in run.results:  # the task ended meanwhile, or a result
            return  # of the item was journaled while it was live: _accept_result recorded it
        if not changed and await self._take_journaled_result(run, item_id):
            return  # taken while the failure's write was tried again (the item was dropped)
        run.record_failure(item_id, reason, self._loop.time())
        await self._advance(run)

    async def _take_journaled_result(self, run: TaskRun, item_id: str) -> bool:
        """Record the item's result as the journal has it, if it has one, and advance the
        task; whether it had one."""
        blob = await self._journaled_result(run, item_id)
        if blob is None or self._runs.get(run.task_id) is not run:
            return blob is not None
        self._record_journaled(run, item_id, blob)
        await self._advance(run)
        return True

    async def _journaled_result(self, run: TaskRun, item_id: str) -> bytes | None:
        """The item's result as the journal has it (None: it has none)."""
        record = await self._db.run("get", run.task_id)
        return next((i.result for i in record.items if i.item_id == item_id), None)

    def _record_journaled(self, run: TaskRun, item_id: str, blob: bytes) -> None:
        try:
            self._replay_result(run, item_id, blob, self._loop.time())
        except RemoteProtocolError as exc:  # a node returned an output we cannot use
            run.record_failure(item_id, f"bad output: {exc}", self._loop.time())

    async def _advance(self, run: TaskRun, attempts: Mapping[str, Attempt] | None = None):
        """Queue what is ready (``attempts``: see :meth:`_schedule_ready`), or finish the run
        once it has an outcome (queuing may give it one: pipeline outputs that do not fit)."""
        if run.outcome is None:
            self._schedule_ready(run, attempts or {})
        if run.outcome is not None:
            await self._finish(run, run.outcome)

    async def _finish(self, run: TaskRun, outcome: Outcome) -> None:
        """Journal the task's end, then act on it (its waiters get the outcome once durable).
        A failed write (e.g. a busy or full disk) is tried again, with a backoff of up to
        ``END_RETRY_MAX_S``, until it commits, the coordinator closes (one last try; recovery
        redoes the end) or the task ended otherwise meanwhile (cancelled, or its submit's
        COMMIT failed)."""

        async def end() -> TaskEnd:  # read back if a waiter came meanwhile
            return await self._db.run("end_task", self._ending(run, run, outcome))

        ended = await self._until_durable(run, f"ending task {run.task_id}", end)
        if ended is not None:  # (None: ended meanwhile, e.g. cancelled: nothing left to write)
            self._ended(run.task_id, *ended)

    async def _until_durable(
        self, run: TaskRun, what: str, write: Callable[[], Awaitable[T]]
    ) -> T | None:
        """``await write()``, a journal write for ``run``, until it commits: one that fails
        for a cause that may pass (``_TRANSIENT``: a busy or full disk, its group rolled back
        for another call's fault) is tried again after ``END_RETRY_FIRST_S``, doubling up to
        ``END_RETRY_MAX_S``; any other error (a refusal) is raised at once. Returns its value
        (never None), or None once ``run`` ended otherwise meanwhile (cancelled, or its
        submit's COMMIT failed). Raises the write's error if it fails once ``run`` ended or
        the coordinator closes (one last try: recovery redoes it)."""
        delay = END_RETRY_FIRST_S
        while True:
            try:
                return await write()
            except _TRANSIENT as exc:  # may pass (busy, full disk; or another call's fault)
                if self._closed or self._runs.get(run.task_id) is not run:
                    raise
                log.warning("journal: %s failed, retrying in %g s: %s", what, delay, exc)
            try:
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            except TimeoutError:
                pass
            if self._runs.get(run.task_id) is not run:
                return None
            delay = min(END_RETRY_MAX_S, 2 * delay)

    def _arm_aggregation_timeout(self, run: TaskRun) -> None:
        deadline = run.deadline()
        if deadline is None or run.done:
            return

        def check() -> None:
            if run.task_id in self._runs and not run.done:
                run.check_timeout(self._loop.time())
                if run.done:
                    outcome = run.outcome
                    if outcome is not None and not outcome.succeeded:  # say what still waited
                        run.outcome = replace(outcome, error=outcome.error + self._waited(run))
                    self._steps.spawn(self._advance(run))

        self._set_task_timer(run.task_id, deadline + 1e-3, check)

    def _arm_deadline(self, run: TaskRun) -> None:
        """Fail the task when its ``deadline_s`` runs out, wherever its items are (queued,
        parked for want of a node, running). A parallel task's deadline is its aggregation's
        timeout instead (:meth:`_arm_aggregation_timeout`: it may end with partial results)."""
        if run.expires_at is None or run.aggregator is not None or run.done:
            return
        self._set_task_timer(run.task_id, run.expires_at, self._on_deadline, run)

    def _on_deadline(self, run: TaskRun) -> None:
        if self._runs.get(run.task_id) is not run or run.done:
            return
        error = _deadline_passed(run) + self._waited(run)
        log.info("task %s failed: %s", run.task_id, error)
        run.outcome = Outcome(False, error=error)
        self._steps.spawn(self._finish(run, run.outcome))

    def _waited(self, run: TaskRun) -> str:
        """For the error of a task that ran out of time: how many of its items were on no
        node, and the most common reason (said as it ends: once forgotten, nothing waits)."""
        reasons = Counter(self.waiting(run.task_id).values())
        if not reasons:
            return ""
        (why, count), total = reasons.most_common(1)[0], reasons.total()
        return f"; {count} of them waiting: {why}" + (
            f" ({total - count} more waiting for other reasons)" if total > count else ""
        )

    def _forget(self, task_id: str, record: TaskRecord | None = None) -> None:
        """Drop the task from memory; its waiters get ``record`` (None: they read it)."""
        run = self._runs.pop(task_id, None)
        if run is not None:
            _pop_timer(self._task_timers, task_id)
            for item_id in list(run.items):
                self._drop(item_id)
                self._cancel_timer(item_id)
        waiters = self._waiters.pop(task_id, [])
        for fut in waiters:
            if not fut.done():
                fut.set_result(record)
        if record is not None and not waiters:  # read back for a submit still being answered
            self._hand(task_id, record)

    def _hand(self, task_id: str, record: TaskRecord) -> None:
        """Keep ``record`` for the task's next wait() (see ``_handed``), within the bounds."""
        size = len(record.spec.inputs.data) + len(record.result_summary or b"")
        size += sum(len(item.result or b"") for item in record.items)
        old = self._handed.pop(task_id, None)
        self._handed_bytes += size - (old[1] if old else 0)
        self._handed[task_id] = (record, size)
        while len(self._handed) > HANDED_RECORDS or self._handed_bytes > HANDED_BYTES:
            _, (_, dropped) = self._handed.popitem(last=False)
            self._handed_bytes -= dropped

    def _set_task_timer(self, task_id: str, when: float, callback, *args: object) -> None:
        """The task's one timer (its deadline or its aggregation's timeout), replacing any
        before (re-armed as more items became ready); cancelled when the task is forgotten."""
        _replace_timer(self._task_timers, task_id, self._loop.call_at(when, callback, *args))

    def _cancel_timer(self, item_id: str) -> None:
        _pop_timer(self._timers, item_id)


def fold_gone_nodes(
    completed: Counter[str], credited_at: OrderedDict[str, None], known: set[str], keep: int
) -> None:
    """Bound ``completed`` (items completed by node): every node in ``known`` (the members
    membership knows) keeps its series, and so do the ``keep`` other nodes credited most
    recently (``credited_at``: its nodes, the one credited last at the end); the counts of the
    rest move to ``GONE_NODES`` and their series go (from both). The total stays the same:
    each completed item is counted once, under its node or under ``GONE_NODES``. So on a
    coordinator that meets vehicles by the thousand, ``/metrics`` has at most one series per
    member, ``keep`` more and ``GONE_NODES``."""
    gone = [node for node in credited_at if node not in known]
    for node in gone[: max(0, len(gone) - keep)]:
        del credited_at[node]
        completed[GONE_NODES] += completed.pop(node, 0)


def _motion(state: Any) -> tuple[object, object]:
    """A gossiped state's position and velocity (a change restarts the position's age)."""
    return state.position, state.velocity


def _pop_timer(timers: dict[str, asyncio.TimerHandle], key: str) -> None:
    """Cancel and forget ``key``'s timer, if it has one."""
    timer = timers.pop(key, None)
    if timer is not None:
        timer.cancel()


def _replace_timer(timers: dict[str, asyncio.TimerHandle], key: str, timer) -> None:
    _pop_timer(timers, key)
    timers[key] = timer


def _deadline_passed(run: TaskRun) -> str:
    """Why a task failed at its deadline (the start of it: what waited may be said after),
    with how many of its items were still running, and on which nodes (the busiest 3)."""
    done, total = len(run.results), len(run.all_item_ids())
    error = f"deadline of {run.spec.deadline_s:g} s passed with {done} of {total} items done"
    on = Counter(e.node for e in run.items.values() if e.node is not None)
    if not on:
        return error
    ranked = sorted(on.items(), key=lambda pair: (-pair[1], pair[0]))
    if len(ranked) == 1:
        return f"{error}; {on.total()} of them running on {ranked[0][0]}"
    named = ", ".join(f"{count} on {node}" for node, count in ranked[:3])
    if len(ranked) > 3:
        rest = ranked[3:]
        named += f" (and {sum(c for _, c in rest)} on {len(rest)} more nodes)"
    return f"{error}; {on.total()} of them running: {named}"


def _sent_to(entry: ItemRun, attempt: int, node: str) -> bool:
    """Whether the item's current attempt is ``attempt`` and went to ``node``: only then does
    that node's answer about it count (relayed answers come from the node it was sent to)."""
    return entry.attempt == attempt and entry.node == node


def _may_answer(entry: ItemRun, attempt: int, node: str) -> bool:
    """Whether ``node`` may answer ``attempt`` of the item: this coordinator sent it that
    attempt, or the journal has that attempt's dispatch to it (from before a restart). Any
    other member's result is forged or misrouted: it would become the task's output. (An
    attempt sent before a restart whose dispatch the journal lacks runs again: the answer to
    that send is the one that counts.)"""
    return (attempt, node) in entry.sent


def _journal_retry(
    coordinator: Coordinator, item_id: str, node: str | None, attempt: int, reason: str,
    refused: bool,
) -> bool:  # fmt: skip
    """On the journal's thread: ``attempt``'s retryable failure, its dispatch to ``node``
    journaled first unless it is (the dispatch mark is told, and may have failed: a journal
    that has the item pending would ignore the failure), in one call: both commit or neither
    does. Whether the failure changed the item (see :meth:`Journal.record_failure`)."""
    journal = coordinator.journal
    assert journal is not None
    if node is not None:
        try:
            journal.mark_dispatched(item_id, node, attempt)
        except (LocalProtocolError, UnknownTaskError):  # in flight (journaled), moved on, ended
            pass
    return journal.record_failure(item_id, attempt, reason, retryable=True, refused=refused)


def _nodes_of(entry: ItemRun, attempt: int) -> str:
    return ", ".join(sorted(n for a, n in entry.sent if a == attempt))


def _with_attempt(item: WorkItem, attempt: int) -> WorkItem:
    return item if item.attempt == attempt else replace(item, attempt=attempt)


def _labels(output: np.ndarray | None) -> list[int] | None:
    if output is None or output.ndim == 0:
        return None
    if output.dtype.kind in "iu" and output.ndim == 1:
        return [int(v) for v in output]
    if output.dtype.kind == "f" and output.ndim == 2:
        return [int(v) for v in np.argmax(output, axis=1)]
    return None


def _log_death(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("coordinator task %s died", task.get_name(), exc_info=task.exception())


__all__ = ["Coordinator", "CoordinatorConfig", "UnknownTaskError"]
