"""Retries and the ends of items and tasks: a part of :class:`~coordinator.service.Coordinator`
(the rules are in :mod:`coordinator.service`).

:class:`TaskOutcomes` is a mixin of ``Coordinator`` and works on its state (``_runs``,
``_items``, ``_task_timers``, ``_steps``: see ``Coordinator.__init__``). It holds

* retries: ``_retry`` counts a failed attempt (or a refusal), journals its failure
  (:func:`_journal_retry`, on the journal's thread) and queues the next attempt after its
  backoff once the journal has the failure; past ``max_attempts`` the item fails for good
  (``_fail_item``), unless the journal took a result of it first;
* ends: ``_advance`` queues what is ready or finishes the task, whose end is journaled before
  its waiters hear of it (``_finish``); a task's deadline and its aggregation's timeout are
  timers (``_arm_deadline``, ``_arm_aggregation_timeout``), and the error of a task out of
  time says what still waited;
* :func:`_retry_until_durable`: a journal write made again, with a backoff, while it fails for a
  cause that may pass and its task is live.

Every coroutine runs on the coordinator's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import TypeVar

from coordinator.journal import TaskEnd, UnknownTaskError
from coordinator.runs import ItemRun, Outcome, TaskRun
from coordinator.service_config import (
    _TRANSIENT,
    END_RETRY_FIRST_S,
    END_RETRY_MAX_S,
    Attempt,
)
from meshinfer.errors import LocalProtocolError, RemoteProtocolError
from meshinfer.runtime.loop import replace_timer

log = logging.getLogger("coordinator.service")  # the Coordinator's one logger, as before the split

T = TypeVar("T")


class TaskOutcomes:
    """Retries and the ends of items and tasks (a mixin of ``Coordinator``: see the module
    docstring)."""

    def _retry(
        self, run: TaskRun, entry: ItemRun, reason: str, *, backoff: bool = True, ran: bool = True
    ) -> bool:
        """Try the item again (on another node if one fits), or fail it once ``max_attempts``
        attempts failed. ``ran=False``, a *refusal*: the node refused or handed back this
        attempt (draining, overloaded, model not loaded: ``REFUSALS``) or never got it
        (dropped unsent, though a resend after a re-dial may have reached it). Refusals do not
        count, up to ``max_attempts`` of them per item, so a rolling restart of the nodes fails
        no task while an item every node refuses for ever still fails. The journal keeps the
        count (``items.refused``), so a restarted coordinator goes on from it. The backoff still
        grows with every attempt, refused or not. Nothing once the coordinator is closed (a
        node's hand-back may still come while the daemon leaves the mesh): the item stays in
        flight in the journal, and the next start's recovery runs it again. True if the item
        goes on to another attempt."""
        if self._closed:
            return False
        item_id, attempt = entry.item.item_id, entry.attempt
        self._cancel_timer(item_id)
        counted = ran or entry.refused >= self.config.max_attempts
        if not counted:
            entry.refused += 1
            self.stats_.refusals += 1
        if attempt - entry.refused >= self.config.max_attempts:
            # (refusals past the max_attempts that do not count are counted: the later
            # attempts may have been refused too, as the last reason may say)
            noun = "refusal" if entry.refused == 1 else "refusals"
            uncounted = f" ({entry.refused} {noun} not counted)" if entry.refused else ""
            tried = f"{attempt} attempts{uncounted}"
            self._steps.spawn(self._fail_item(run, entry, f"gave up after {tried}; last: {reason}"))
            return False
        self.stats_.retries += 1
        outcome = "failed" if counted else "refused"
        log.info("retrying %s (attempt %d %s: %s)", item_id, attempt, outcome, reason)
        self._journal_dispatch(entry)  # the failure needs it first (and journals it, if lost)
        failure = partial(_journal_retry, self, item_id, entry.node, attempt, reason, not counted)
        entry.next_attempt()
        entry.retrying = reason
        self._assign(entry, None)
        delay = 0.0
        if backoff:
            doubled = 2.0 ** min(attempt - 1, 64)  # (2 ** 1024 overflows a float)
            delay = min(self.config.retry_backoff_max_s, self.config.retry_backoff_s * doubled)
        due = self._loop.time() + delay
        written = self._db.call(failure)  # queued now: in order with what comes after it
        self._steps.spawn(self._queue_once_journaled(run, entry, failure, written, due))
        return True

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
        # the item's one timer: the close and the task's end cancel it (a bare call_at kept
        # a closed coordinator alive for up to the longest backoff)
        delay = max(0.0, due - self._loop.time())
        self._set_timer(item_id, delay, self._queue, item_id, run.spec.priority)

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
        if self._runs.get(run.task_id) is not run:  # ended (cancelled) as the write went: it
            return  # is forgotten here, and its timers with it (none to arm again)
        if not changed and await self._take_result_journaled_first(run, item_id):
            return  # taken while the failure's write was tried again (the item was dropped)
        if self._runs.get(run.task_id) is not run:  # (ended while the journal was read)
            return
        run.record_failure(item_id, reason, self._loop.time())
        await self._advance(run)

    async def _take_result_journaled_first(self, run: TaskRun, item_id: str) -> bool:
        """The journal ignored the item's failure (``_fail_item``): it took a result of the
        item first. Record that result, if the journal has one, as the item's outcome while
        ``run`` is live here; whether it had one. (Compare ``_take_result_whose_write_committed``:
        a result whose own write failed, decided while the item is live.)"""
        blob = await self._journaled_result(run, item_id)
        if blob is None or self._runs.get(run.task_id) is not run:
            return blob is not None
        await self._decide_with_journaled(run, item_id, blob)
        return True

    async def _journaled_result(self, run: TaskRun, item_id: str) -> bytes | None:
        """The item's result as the journal has it (None: it has none)."""
        record = await self._db.run("get", run.task_id)
        return next((i.result for i in record.items if i.item_id == item_id), None)

    async def _decide_with_journaled(self, run: TaskRun, item_id: str, blob: bytes) -> None:
        """Record ``blob``, the item's result as the journal has it, as its outcome (a failure
        if the output is unusable), and advance the task."""
        try:
            self._replay_result(run, item_id, blob, self._loop.time())
        except RemoteProtocolError as exc:  # a node returned an output we cannot use
            run.record_failure(item_id, f"bad output: {exc}", self._loop.time())
        await self._advance(run)

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
        COMMIT failed).

        An end the journal refuses (not a cause that may pass: e.g. SQLite's "string or blob
        too big" for an aggregation's outputs) is written once more as the task's failure,
        saying why, rather than leaving the task live here with nothing left to end it."""

        async def end() -> TaskEnd:  # read back if a waiter came meanwhile
            return await self._db.run("end_task", self._ending(run, run, outcome))

        what = f"ending task {run.task_id}"
        try:
            ended = await self._until_durable(run, what, end)
        except Exception as exc:  # refused (the transient causes were retried in there)
            said = "result" if outcome.succeeded else "end"
            error = f"its {said} could not be journaled ({type(exc).__name__}: {exc})"
            log.warning("journal: %s was refused, failing it instead: %s", what, exc)
            outcome = run.outcome = Outcome(
                False, error=f"{outcome.error}; {error}" if outcome.error else error
            )
            ended = await self._until_durable(run, what, end)
        if ended is not None:  # (None: ended meanwhile, e.g. cancelled: nothing left to write)
            self._ended(run.task_id, *ended)

    async def _until_durable(
        self, run: TaskRun, what: str, write: Callable[[], Awaitable[T]]
    ) -> T | None:
        """``await write()``, a journal write for ``run``, until it commits, while ``run`` is
        live here (see :func:`_retry_until_durable`)."""
        return await _retry_until_durable(
            write, what, live=lambda: self._runs.get(run.task_id) is run, closing=self._closing
        )

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
        error = run.deadline_error() + self._waited(run)
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

    def _set_task_timer(self, task_id: str, when: float, callback, *args: object) -> None:
        """The task's one timer (its deadline or its aggregation's timeout), replacing any
        before (re-armed as more items became ready); cancelled when the task is forgotten."""
        replace_timer(self._task_timers, task_id, self._loop.call_at(when, callback, *args))


def _journal_retry(
    coordinator: TaskOutcomes, item_id: str, node: str | None, attempt: int, reason: str,
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


async def _retry_until_durable(
    write: Callable[[], Awaitable[T]], what: str, *, live: Callable[[], bool],
    closing: asyncio.Event,
) -> T | None:  # fmt: skip
    """``await write()``, a journal write (``what``, for the log), until it commits: one that
    fails for a cause that may pass (``_TRANSIENT``: a busy or full disk, its group rolled back
    for another call's fault) is tried again after ``END_RETRY_FIRST_S``, doubling up to
    ``END_RETRY_MAX_S``; any other error (a refusal) is raised at once. Returns its value
    (never None), or None once ``live()`` is false (the task it writes for ended otherwise
    meanwhile: cancelled, or its submit's COMMIT failed), and None, with a warning, if it fails
    once ``closing`` is set (the coordinator closes: that was the last try; recovery redoes
    it): a step's failure would be logged at ERROR, for no fault of ours. Runs on the
    coordinator's event loop."""
    delay = END_RETRY_FIRST_S
    while True:
        try:
            return await write()
        except _TRANSIENT as exc:  # may pass (busy, full disk; or another call's fault)
            if closing.is_set() or not live():
                why = "the coordinator closes" if closing.is_set() else "its task ended"
                log.warning("journal: %s failed, not retried (%s): %s", what, why, exc)
                return None
            log.warning("journal: %s failed, retrying in %g s: %s", what, delay, exc)
        try:
            async with asyncio.timeout(delay):
                await closing.wait()
        except TimeoutError:
            pass
        if not live():
            return None
        delay = min(END_RETRY_MAX_S, 2 * delay)
