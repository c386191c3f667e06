"""The coordinator's durable task journal: SQLite in WAL mode.

"A task is accepted once journaled": :meth:`Journal.submit` commits the task and all its planned
work items before it returns, so a task id the coordinator handed out survives a crash. Results
are accepted exactly once per work item: the ``results`` table has the item id as its primary
key, and the check-then-insert runs in one ``BEGIN IMMEDIATE`` transaction; a second delivery
(same or another attempt) returns False and is counted.

Durability trade-off: the journal runs ``journal_mode=WAL`` with ``synchronous=FULL`` (the
default here), so every commit fsyncs the write-ahead log before returning: an acknowledged
submit or result survives a process crash *and* a power loss or OS crash, at the price of one
fsync per write (tens of microseconds on NVMe, a few milliseconds on SD cards or eMMC).
``synchronous="NORMAL"`` skips that fsync: still safe against a process crash (SIGKILL), but the
last commits may roll back on power loss -- acceptable for simulations, not for a fleet.

Item life follows :data:`meshinfer.proto.tasks.TRANSITIONS`. ``attempt`` of an item is the number
of its current dispatch (dispatched/running) or of its next one (pending/retrying): it starts at
1 and grows on a retryable failure and on recovery. A task is ``pending`` until an item is
dispatched, ``dispatched`` until a node accepts or answers, then ``running``; it ends through
:meth:`Journal.finish` (the coordinator decides, e.g. after aggregation) or :meth:`Journal.cancel`.

Concurrency: the methods are synchronous and do blocking disk I/O. The coordinator service calls
them through a single-thread executor so the event loop never blocks; a lock makes each call
atomic should several threads share one journal anyway. Wall-clock timestamps (``*_at``) are
for people only; nothing schedules by them.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coordinator.journal_schema import MIGRATIONS, migrate
from meshinfer.errors import ConfigError, LocalProtocolError, MeshInferError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks import (
    TERMINAL_STATES,
    TRANSITIONS,
    TaskEvent,
    TaskSpec,
    TaskState,
    outline,
    transition,
)
from meshinfer.proto.tasks_codec import decode_spec, encode_spec

__all__ = [
    "MIGRATIONS",
    "ItemRecord",
    "Journal",
    "JournalError",
    "JournalEvent",
    "JournalStats",
    "RecoveredTask",
    "TaskConflictError",
    "TaskPage",
    "TaskRecord",
    "TaskSummary",
    "UnknownTaskError",
]

MAX_PAGE = 1000
_LIVE = tuple(s.value for s in TaskState if s not in TERMINAL_STATES)
_IN_FLIGHT = (TaskState.DISPATCHED.value, TaskState.RUNNING.value)
_WAITING = (TaskState.PENDING.value, TaskState.RETRYING.value)


class JournalError(MeshInferError):
    """The journal cannot do what was asked (its message says why)."""


class UnknownTaskError(JournalError, LookupError):
    """No task (or work item) with that id is journaled."""


class TaskConflictError(JournalError):
    """A task with that id exists with a different spec."""


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """One journaled work item. ``result`` is the blob given to :meth:`Journal.record_result`."""

    item_id: str
    task_id: str
    position: int
    model: ModelRef
    stage: str
    state: TaskState
    node: str | None
    attempt: int
    error: str | None
    result: bytes | None
    result_attempt: int | None


@dataclass(frozen=True, slots=True)
class TaskSummary:
    """A task as listed (no spec, no items); ``items_done`` counts items with a result."""

    task_id: str
    state: TaskState
    pattern: str
    priority: int
    policy: str | None
    created_at: float
    updated_at: float
    error: str | None
    items_total: int
    items_done: int


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task with its spec, items and (once finished) result summary blob."""

    summary: TaskSummary
    spec: TaskSpec
    items: tuple[ItemRecord, ...]
    result_summary: bytes | None

    @property
    def task_id(self) -> str:
        """The task id."""
        return self.summary.task_id

    @property
    def state(self) -> TaskState:
        """The task state."""
        return self.summary.state


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of :meth:`Journal.list`; pass ``next_cursor`` back for the next (None: last)."""

    tasks: tuple[TaskSummary, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class RecoveredTask:
    """An unfinished task found at startup and the items that need a (re)dispatch."""

    task: TaskRecord
    to_dispatch: tuple[ItemRecord, ...]


@dataclass(frozen=True, slots=True)
class JournalEvent:
    """One line of the audit log."""

    seq: int
    at: float
    task_id: str | None
    item_id: str | None
    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Counts by state, counters (duplicate/late/unexpected deliveries...) and log length."""

    tasks: dict[str, int]
    items: dict[str, int]
    counters: dict[str, int]
    events: int


# --- the journal -----------------------------------------------------------------------------

_TASK_COLUMNS = """t.id, t.state, t.pattern, t.priority, t.policy, t.created_at, t.updated_at,
    t.error, (SELECT count(*) FROM items i WHERE i.task_id = t.id),
    (SELECT count(*) FROM results r JOIN items i ON r.item_id = i.id WHERE i.task_id = t.id)"""
_ITEM_COLUMNS = """i.id, i.task_id, i.position, i.model_id, i.model_version, i.stage, i.state,
    i.node, i.attempt, i.error, r.blob, r.attempt"""


class Journal:
    """The task journal in the SQLite file at ``path`` (created and migrated on open).

    Use as a context manager or call :meth:`close`. ``wall_clock`` stamps rows for people.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(f"journal.synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.path = Path(path)
        self._clock = wall_clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        migrate(self._db)

    def close(self) -> None:
        """Close the database; safe to call twice."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error)."""
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                    db.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent read snapshot."""
        with self._lock:
            db = self._connection()
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise LocalProtocolError("the journal is closed")
        return self._db

    def _log(self, db: sqlite3.Connection, kind: str, task_id: str | None, item_id=None, detail=""):
        db.execute(
            "INSERT INTO events (at, task_id, item_id, kind, detail) VALUES (?, ?, ?, ?, ?)",
            (self._clock(), task_id, item_id, kind, detail),
        )

    def _count(self, db: sqlite3.Connection, name: str) -> None:
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, 1) "
            "ON CONFLICT(name) DO UPDATE SET value = value + 1",
            (name,),
        )

    # --- submission ---------------------------------------------------------------------------

    def submit(self, spec: TaskSpec) -> str:
        """Journal ``spec`` and its planned items, committed before returning its task id.

        Submitting the same spec again returns the id (an idempotent client retry); a different
        spec under a known id raises :class:`TaskConflictError`. Invalid specs raise
        :class:`~meshinfer.proto.tasks.InvalidTaskError`.
        """
        items = outline(spec)
        blob = encode_spec(spec)
        with self._write() as db:
            row = db.execute("SELECT spec FROM tasks WHERE id = ?", (spec.task_id,)).fetchone()
            if row is not None:
                if decode_spec(bytes(row[0])) != spec:  # compare specs: dict order may differ
                    raise TaskConflictError(f"task {spec.task_id!r} exists with another spec")
                return spec.task_id
            self._insert_task(db, spec, blob, items)
        return spec.task_id

    def _insert_task(self, db, spec: TaskSpec, blob: bytes, items) -> None:
        now = self._clock()
        db.execute(
            "INSERT INTO tasks (id, spec, state, pattern, priority, policy, created_at, updated_at)"
            " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?)",
            (spec.task_id, blob, str(spec.pattern), spec.priority, spec.policy, now, now),
        )
        db.executemany(
            "INSERT INTO items (id, task_id, position, model_id, model_version, stage, state,"
            " attempt, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', 1, ?)",
            [
                (o.item_id, spec.task_id, o.index, o.model.model_id, o.model.version, o.stage, now)
                for o in items
            ],
        )
        self._log(db, "submitted", spec.task_id, detail=f"{len(items)} items")

    # --- item progress --------------------------------------------------------------------------

    def _item_row(self, db, item_id: str) -> tuple[str, TaskState, int, TaskState] | None:
        row = db.execute(
            "SELECT i.task_id, i.state, i.attempt, t.state FROM items i JOIN tasks t"
            " ON t.id = i.task_id WHERE i.id = ?",
            (item_id,),
        ).fetchone()
        return None if row is None else (row[0], TaskState(row[1]), row[2], TaskState(row[3]))

    def _set_item(self, db, item_id: str, state: TaskState, **columns: object) -> None:
        sets = "".join(f", {name} = ?" for name in columns)
        db.execute(
            f"UPDATE items SET state = ?, updated_at = ?{sets} WHERE id = ?",
            (state.value, self._clock(), *columns.values(), item_id),
        )

    def _advance_task(self, db, task_id: str, state: TaskState, event: TaskEvent) -> None:
        """Move the task along with its items (pending -> dispatched -> running) where allowed."""
        new = TRANSITIONS.get((state, event))
        if new is not None and new not in TERMINAL_STATES:
            db.execute(
                "UPDATE tasks SET state = ?, updated_at = ? WHERE id = ?",
                (new.value, self._clock(), task_id),
            )

    def mark_dispatched(self, item_id: str, node: str, attempt: int) -> None:
        """Record that attempt ``attempt`` of the item was sent to ``node``.

        Call it *before* sending. ``attempt`` must be the item's current attempt; the item must
        be pending or retrying (else :class:`~meshinfer.proto.tasks.InvalidTransition`).
        """
        with self._write() as db:
            row = self._item_row(db, item_id)
            if row is None:
                raise UnknownTaskError(f"no work item {item_id!r}")
            task_id, state, current, task_state = row
            new = transition(state, TaskEvent.DISPATCH)
            if attempt != current:
                raise LocalProtocolError(f"{item_id}: dispatch of attempt {attempt}, not {current}")
            self._set_item(db, item_id, new, node=node)
            self._advance_task(db, task_id, task_state, TaskEvent.DISPATCH)
            self._log(db, "dispatched", task_id, item_id, f"attempt {attempt} to {node}")

    def mark_running(self, item_id: str, attempt: int) -> bool:
        """A node accepted the item (``TaskAccepted``); False (ignored) when stale or unknown."""
        with self._write() as db:
            row = self._item_row(db, item_id)
            if row is None or row[1] != TaskState.DISPATCHED or row[2] != attempt:
                return False
            task_id, state, _, task_state = row
            self._set_item(db, item_id, transition(state, TaskEvent.ACCEPT))
            self._advance_task(db, task_id, task_state, TaskEvent.ACCEPT)
            return True

    def record_result(
        self, item_id: str, attempt: int, blob: bytes, *, node: str | None = None
    ) -> bool:
        """Accept the item's result exactly once; True if this call recorded it.

        Returns False, counting it, for a duplicate (the item already has a result), a late
        result (the item failed or was cancelled), an unknown item, or an attempt that was
        never dispatched. The result of any dispatched attempt is accepted while the item lives.
        """
        with self._write() as db:
            verdict = self._judge_result(db, item_id, attempt)
            if verdict is not None:
                self._count(db, verdict)
                return False
            task_id, state, _, task_state = self._item_row(db, item_id)
            try:
                db.execute(
                    "INSERT INTO results (item_id, attempt, node, blob, received_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (item_id, attempt, node, blob, self._clock()),
                )
            except sqlite3.IntegrityError:  # belt and braces: the primary key says "once"
                self._count(db, "duplicate_results")
                return False
            self._set_item(db, item_id, transition(state, TaskEvent.SUCCEED))
            self._advance_task(db, task_id, task_state, TaskEvent.ACCEPT)
            source = f" from {node}" if node else ""
            self._log(db, "result", task_id, item_id, f"attempt {attempt}{source}")
            return True

    def _judge_result(self, db, item_id: str, attempt: int) -> str | None:
        """The counter to bump when a result must be refused, or None to accept it."""
        row = self._item_row(db, item_id)
        if row is None:
            return "unknown_results"
        _, state, current, _ = row
        if state == TaskState.SUCCEEDED:
            return "duplicate_results"
        if state in TERMINAL_STATES:
            return "late_results"
        highest_sent = current if state.value in _IN_FLIGHT else current - 1
        return None if 1 <= attempt <= highest_sent else "unexpected_results"

    def record_failure(self, item_id: str, attempt: int, error: str, *, retryable: bool) -> bool:
        """The item's current attempt failed; True if that changed its state.

        Retryable: the item goes to ``retrying`` with attempt + 1 (dispatch it again, to another
        node). Not retryable: ``failed`` (the coordinator then decides the task's fate). Failures
        of an older attempt, or of an item that is done, are ignored and counted.
        """
        event = TaskEvent.RETRY if retryable else TaskEvent.FAIL
        with self._write() as db:
            row = self._item_row(db, item_id)
            if row is None or row[2] != attempt or (row[1], event) not in TRANSITIONS:
                self._count(db, "ignored_failures")
                return False
            task_id, state, current, _ = row
            bump = 1 if retryable else 0
            self._set_item(
                db, item_id, transition(state, event), attempt=current + bump, error=error
            )
            self._log(db, "retry" if retryable else "failed", task_id, item_id, error[:500])
            return True

    # --- task outcome ---------------------------------------------------------------------------

    def cancel(self, task_id: str) -> list[tuple[str, str]]:
        """Cancel the task and its live items; returns ``(item id, node)`` of the items that
        were in flight (send them a ``TaskCancel``). A finished task is left alone ([])."""
        return self._close_task(task_id, TaskState.CANCELLED, None, None)

    def finish(
        self,
        task_id: str,
        state: TaskState,
        *,
        summary: bytes | None = None,
        error: str | None = None,
    ) -> list[tuple[str, str]]:
        """End the task as ``succeeded`` or ``failed`` with a result summary blob or an error.

        Items still live are cancelled; returns those that were in flight, as :meth:`cancel`.
        A task that already ended is left alone ([]).
        """
        if state not in (TaskState.SUCCEEDED, TaskState.FAILED):
            raise LocalProtocolError(f"finish() takes succeeded or failed, not {state}")
        return self._close_task(task_id, state, summary, error)

    def _close_task(self, task_id, state, summary, error) -> list[tuple[str, str]]:
        with self._write() as db:
            row = db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise UnknownTaskError(f"no task {task_id!r}")
            if TaskState(row[0]) in TERMINAL_STATES:
                return []
            in_flight = db.execute(
                f"SELECT id, node FROM items WHERE task_id = ? AND state IN {_IN_FLIGHT}"
                " ORDER BY position",
                (task_id,),
            ).fetchall()
            db.execute(
                f"UPDATE items SET state = 'cancelled', updated_at = ? WHERE task_id = ?"
                f" AND state IN {_LIVE}",
                (self._clock(), task_id),
            )
            db.execute(
                "UPDATE tasks SET state = ?, summary = ?, error = ?, updated_at = ? WHERE id = ?",
                (state.value, summary, error, self._clock(), task_id),
            )
            self._log(db, str(state), task_id, detail=(error or "")[:500])
            return [(item_id, node) for item_id, node in in_flight]

    # --- reading --------------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord:
        """The task with its spec and items; :class:`UnknownTaskError` if not journaled."""
        with self._read() as db:
            return self._record(db, task_id)

    def _record(self, db, task_id: str) -> TaskRecord:
        row = db.execute(
            f"SELECT {_TASK_COLUMNS}, t.spec, t.summary FROM tasks t WHERE t.id = ?", (task_id,)
        ).fetchone()
        if row is None:
            raise UnknownTaskError(f"no task {task_id!r}")
        items = db.execute(
            f"SELECT {_ITEM_COLUMNS} FROM items i LEFT JOIN results r ON r.item_id = i.id"
            " WHERE i.task_id = ? ORDER BY i.position",
            (task_id,),
        ).fetchall()
        summary_blob = None if row[11] is None else bytes(row[11])
        return TaskRecord(
            _summary(row[:10]), decode_spec(bytes(row[10])), tuple(map(_item, items)), summary_blob
        )

    def list(
        self,
        *,
        state: TaskState | str | None = None,
        model: str | None = None,
        since: float | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        """Tasks newest first, filtered by state, model id (any item's) and creation time
        (wall clock, ``created_at >= since``). Keyset pagination: a page never repeats or skips
        a task that existed when the listing began, however many are submitted meanwhile."""
        if not 1 <= limit <= MAX_PAGE:
            raise ConfigError(f"limit {limit} outside 1..{MAX_PAGE}")
        where, args = _filters(state, model, since, cursor)
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_TASK_COLUMNS}, t.seq FROM tasks t {where} ORDER BY t.seq DESC LIMIT ?",
                (*args, limit + 1),
            ).fetchall()
        page = tuple(_summary(row[:10]) for row in rows[:limit])
        more = len(rows) > limit
        return TaskPage(page, str(rows[limit - 1][10]) if more else None)

    def history(self, task_id: str) -> list[JournalEvent]:
        """The audit log of one task, oldest first."""
        with self._read() as db:
            rows = db.execute(
                "SELECT seq, at, task_id, item_id, kind, detail FROM events WHERE task_id = ?"
                " ORDER BY seq",
                (task_id,),
            ).fetchall()
        return [JournalEvent(*row) for row in rows]

    def recover(self) -> list[RecoveredTask]:
        """After a restart: every unfinished task, with the items that need a (re)dispatch.

        Items that were dispatched or running have an unknown fate: they go back to pending
        with attempt + 1 (a late result of the old attempt is still accepted). Call once, at
        startup, before dispatching anything. Pipeline items are all listed; dispatch only
        those :class:`~meshinfer.proto.tasks_pipeline.PipelinePlan` says are ready.
        """
        with self._write() as db:
            ids = [r[0] for r in db.execute(f"SELECT id FROM tasks WHERE state IN {_LIVE}")]
            for task_id in ids:
                self._requeue(db, task_id)
            records = [self._record(db, task_id) for task_id in ids]
        return [
            RecoveredTask(r, tuple(i for i in r.items if i.state.value in _WAITING))
            for r in records
        ]

    def _requeue(self, db, task_id: str) -> None:
        stuck = db.execute(
            f"SELECT id FROM items WHERE task_id = ? AND state IN {_IN_FLIGHT}", (task_id,)
        ).fetchall()
        for (item_id,) in stuck:
            db.execute(
                "UPDATE items SET state = 'pending', attempt = attempt + 1, updated_at = ?"
                " WHERE id = ?",
                (self._clock(), item_id),
            )
            self._log(db, "requeued", task_id, item_id, "coordinator restarted")

    def stats(self) -> JournalStats:
        """Counts of tasks and items by state, the counters and the audit log length."""
        with self._read() as db:
            tasks = dict(db.execute("SELECT state, count(*) FROM tasks GROUP BY state"))
            items = dict(db.execute("SELECT state, count(*) FROM items GROUP BY state"))
            counters = dict(db.execute("SELECT name, value FROM counters"))
            (events,) = db.execute("SELECT count(*) FROM events").fetchone()
        return JournalStats(tasks, items, counters, events)


def _filters(state, model, since, cursor) -> tuple[str, list[object]]:
    clauses, args = [], []
    if state is not None:
        if state not in {s.value for s in TaskState}:
            raise ConfigError(f"state {state!r} is not one of {[s.value for s in TaskState]}")
        clauses.append("t.state = ?")
        args.append(str(state))
    if model is not None:
        clauses.append("EXISTS (SELECT 1 FROM items i WHERE i.task_id = t.id AND i.model_id = ?)")
        args.append(model)
    if since is not None:
        clauses.append("t.created_at >= ?")
        args.append(float(since))
    if cursor is not None:
        if not cursor.isdigit() or len(cursor) > 19:
            raise ConfigError(f"cursor {cursor!r} is not one this journal handed out")
        clauses.append("t.seq < ?")
        args.append(int(cursor))
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args


def _summary(row) -> TaskSummary:
    return TaskSummary(row[0], TaskState(row[1]), *row[2:10])


def _item(row) -> ItemRecord:
    return ItemRecord(
        row[0], row[1], row[2], ModelRef(row[3], row[4]), row[5], TaskState(row[6]),
        row[7], row[8], row[9], None if row[10] is None else bytes(row[10]), row[11],
    )  # fmt: skip
