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
  durable), is taken as the journal has it. An end the journal refuses outright (e.g.
  SQLite's "string or blob too big" for its outputs) is written as the task's failure, saying
  why (a result that would end its task with it is then taken alone first);
* a failed sync of the journal's log is fatal (:meth:`Coordinator.failed`): the journal fails
  every later sync, so from then on nothing is acknowledged (submits and cancels are refused
  before they write), and the daemon closes the coordinator, which ends the retries, and exits
  for a restart to recover from the journal;
* submitting a known task id with the same spec again is an idempotent retry: nothing runs
  again (until retention, ``retention_s`` after the task ended, deleted it from the journal).

Concurrency: every coroutine runs on the coordinator's event loop.

Layout: this module holds :class:`Coordinator`'s state, its lifecycle, recovery and public API
(submit, wait, get, cancel, waiting, nodes, stats); the rest of it comes from mixins, one
module each, working on that state: :mod:`coordinator.service_dispatch` (queuing, placing and
sending items), :mod:`coordinator.service_answers` (answers from nodes, node losses),
:mod:`coordinator.service_outcomes` (retries, the ends of items and tasks, deadlines). The
config, stats and shared pure helpers are in :mod:`coordinator.service_config`; their public
names are importable from here as well.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import sqlite3
import time
from collections import Counter, OrderedDict
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.certificates import NodeCertificates
from coordinator.failover import Reachability
from coordinator.input_refs import InputRefs
from coordinator.journal import (
    PRUNE_BATCH,
    CallOutcome,
    Journal,
    RecoveredTask,
    TaskPage,
    TaskRecord,
    UnknownTaskError,
    item_ended,
    read_stats,
)
from coordinator.journal_writer import JournalWriter
from coordinator.runs import ItemRun, Outcome, TaskRun, decode_outcome
from coordinator.service_answers import NodeAnswers
from coordinator.service_config import (
    _WHILE_DOWN,
    GONE_NODES,
    Attempt,
    CoordinatorConfig,
    CoordinatorStats,
    fold_gone_nodes,
)
from coordinator.service_dispatch import Dispatch, _KnownState
from coordinator.service_outcomes import TaskOutcomes
from meshinfer.closing import OneClose
from meshinfer.errors import LocalProtocolError, MeshInferError
from meshinfer.proto import messages
from meshinfer.proto.contact import infrastructure_positions, node_contact_s
from meshinfer.proto.scheduling import NodeView, SchedulerState, unplaced_reason
from meshinfer.proto.tasks import (
    InvalidTaskError,
    TaskSpec,
    TaskState,
    check_aggregation_used,
    check_sendable,
    with_aggregation_mode,
)
from meshinfer.proto.tasks_codec import check_model_names
from meshinfer.proto.tasks_wire import TaskAccepted, TaskFailed, TaskResult
from meshinfer.runtime.loop import Steps, pop_timer
from meshinfer.runtime.node import MeshNode
from meshinfer.transport.base import Address

log = logging.getLogger(__name__)

#: How many ended tasks' records, and how many of their bytes (inputs and results), wait for
#: the wait() that follows their submit() (a client that never waits, e.g. one polling get(),
#: leaves them here until newer ones push them out).
HANDED_RECORDS = 256
HANDED_BYTES = 32 << 20


class Coordinator(Dispatch, NodeAnswers, TaskOutcomes):
    """See the module docstring. ``start`` / ``aclose``; every other coroutine needs ``start``.
    Its state is all set up here; the mixins it inherits work on it (see "Layout" above)."""

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
        self._db = JournalWriter(
            lambda: self.journal, name="journal", stale=item_ended,
            on_sync_failed=self._on_sync_failed,
        )  # fmt: skip
        #: the error of the journal's failed sync, once one failed: this coordinator then
        #: acknowledges nothing more (:meth:`failed`)
        self.failure: OSError | None = None
        self._failed = asyncio.Event()
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
        #: when (loop time) its position and velocity as they are arrived (membership's
        #: Member.position_at) (written by placement only: nodes() and waiting() read it,
        #: Dispatch._known)
        self._sets_of: dict[str, _KnownState] = {}
        #: the members' views as the dispatch loop read them for the items queued together
        #: (None once it waits for more: see Dispatch._view_bases)
        self._burst_views: list[NodeView] | None = None
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
        self._one_close = OneClose()
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

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called (what a request meets from then on is cut short
        by the shutdown: the API answers it 503 ``shutting_down``)."""
        return self._closed

    async def aclose(self) -> None:
        """Stop dispatching and close the journal (in-flight items stay journaled). Idempotent:
        every call waits until the one close has ended, which goes on when a caller is
        cancelled (a second call after a cancelled one returned at once, the journal open)."""
        self._closed = True
        await self._one_close.run(self._close, name="coordinator-close")

    async def _close(self) -> None:
        self._closing.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, self._reach.aclose(), return_exceptions=True)
        await self._steps.aclose()  # results and failures being journaled: they land first
        for waiters in self._waiters.values():  # tasks that did not end: wait() says so
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        await self._inputs.aclose()  # inputs being hashed: their items are not queued any more
        for timer in (*self._timers.values(), *self._task_timers.values()):
            timer.cancel()
        if self.journal is not None:
            try:
                await self._db.run_alone(self.journal.close)
            except OSError as exc:  # closed, but answered with the failed sync's error
                if self.failure is None:
                    raise
                log.info("journal closed (its log's sync had failed: %s)", exc)
        await self._db.aclose()

    def _check_started(self) -> None:
        if not self._started:
            raise LocalProtocolError("the coordinator is not started")

    async def failed(self) -> OSError:
        """Return once the journal failed to sync its log (its error): commits answered
        durable since the last sync may be lost, and the journal syncs nothing more (it fails
        every later sync), so this coordinator acknowledges nothing more (submits and cancels
        are refused; the writes it retries keep failing until :meth:`aclose` ends them) and
        must stop: a restart reopens the journal, whose recovery replays what it holds. The
        daemon exits on it (see :mod:`coordinator.daemon`); an embedding should close it."""
        await self._failed.wait()
        assert self.failure is not None
        return self.failure

    def _on_sync_failed(self, error: OSError) -> None:
        """On the loop, once (the journal writer's ``on_sync_failed``): see :meth:`failed`."""
        if self.failure is not None:
            return
        self.failure = error
        log.critical(
            "journal %s: a sync of its log failed (%s), so commits since the last sync may be"
            " lost: this coordinator acknowledges nothing more and stops; restart it (its"
            " recovery replays the journal)",
            self.journal_path, error,
        )  # fmt: skip
        self._failed.set()

    def _check_serving(self) -> None:
        """Refuse a write (a submit, a cancel) once the journal's sync failed (:meth:`failed`),
        before anything is written."""
        self._check_started()
        if self.failure is not None:
            raise OSError(
                self.failure.errno,
                f"journal {self.journal_path}: a sync of its log failed ({self.failure}):"
                " this coordinator acknowledges nothing more; restart it",
            )

    async def _recover(self) -> None:
        recovered = await self._db.run("recover", max_refused=self.config.max_attempts)
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
                error = f"{run.deadline_error()} {_WHILE_DOWN}"
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
        self._check_serving()
        check_model_names(spec)  # (a new task's only: recovery reads older ones as they are)
        if spec.deadline_s is None and self.config.default_deadline_s:
            spec = replace(spec, deadline_s=self.config.default_deadline_s)
        spec = with_aggregation_mode(spec, self.config.default_aggregation)
        run = self._new_run(spec, self._loop.time())  # validates the spec
        try:
            check_aggregation_used(spec)
            check_sendable(spec)  # (the HTTP path checked it before planning a huge batch)
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
        """The task once it ended (or as it is at ``timeout``). LocalProtocolError if the
        coordinator closes first (or has closed) while the task is live here."""
        if task_id not in self._runs:  # not running here: as the journal has it (or unknown)
            handed = self._handed.pop(task_id, None)
            if handed is None:
                return await self.get(task_id)
            self._handed_bytes -= handed[1]
            return handed[0]
        if self._closed:  # nothing would end it here: it runs again once this restarts
            raise LocalProtocolError(f"the coordinator closed before task {task_id!r} ended")
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
        if record is None and self._closed:  # (its journal may be closed: nothing to read)
            raise LocalProtocolError(f"the coordinator closed before task {task_id!r} ended")
        return record if record is not None else await self.get(task_id)

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task; the nodes running its items are told. False if it already ended
        (also when it ended after this call read it live: the journal says which came first)."""
        self._check_serving()
        record = await self.get(task_id)  # UnknownTaskError for an unknown id
        if record.state.value in ("succeeded", "failed", "cancelled"):
            return False
        done = self._db.call("cancel", task_id)
        done.add_done_callback(partial(self._cancelled, task_id))
        # a caller cancelled meanwhile leaves the cancel to act: the journal may have it
        return await asyncio.shield(done) is not None

    def _cancelled(self, task_id: str, done: asyncio.Future[object]) -> None:
        """The journal answered a cancel (its caller may have been cancelled meanwhile: the
        task is cancelled all the same): call its items back and forget it here."""
        if done.cancelled() or done.exception() is not None:
            return
        in_flight = done.result()
        if in_flight is not None:
            self._call_back(task_id, in_flight, "task cancelled")  # type: ignore[arg-type]
            self._forget(task_id)

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
                views, full = self._views(keep=False), self._full_nodes()
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
        None: unknown, which counts as long enough; its position aged from when membership
        received it, ``Member.position_at``). A member
        that died or left has no ``queue_depth``, ``rtt_ms`` nor ``contact_s`` (None): its last
        ones are stale."""
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
                age_s = now - self._known(m, now, keep=False).placed_at
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

    def _forget(self, task_id: str, record: TaskRecord | None = None) -> None:
        """Drop the task from memory; its waiters get ``record`` (None: they read it)."""
        run = self._runs.pop(task_id, None)
        if run is not None:
            pop_timer(self._task_timers, task_id)
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


#: Also importable from here, as before the split: the config, stats and the gone-nodes series
#: that live in :mod:`coordinator.service_config`.
__all__ = [
    "GONE_NODES",
    "HANDED_BYTES",
    "HANDED_RECORDS",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorStats",
    "UnknownTaskError",
    "fold_gone_nodes",
]
