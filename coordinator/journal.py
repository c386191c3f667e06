"""The coordinator's durable task journal: SQLite in WAL mode.

"A task is accepted once journaled": :meth:`Journal.submit` commits the task and all its planned
work items before it returns, so a task id the coordinator handed out survives a crash. Results
are accepted exactly once per work item: the ``results`` table has the item id as its primary
key, and the check-then-insert runs in one ``BEGIN IMMEDIATE`` transaction; a second delivery
(same or another attempt) returns False and is counted.

Durability trade-off: the journal runs ``journal_mode=WAL`` and, at ``synchronous="FULL"`` (the
default here), syncs the write-ahead log after every commit before anyone is answered (SQLite
itself runs at ``NORMAL``, which syncs before checkpoints; the commit's sync is
:meth:`Journal.sync`, an ``fdatasync`` of the ``-wal`` file, which a writer may run on another
thread while the next group's statements run -- see :mod:`coordinator.journal_writer`): an
acknowledged submit or result survives a process crash *and* a power loss or OS crash, at the
price of one fsync per write (tens of microseconds on NVMe, a few milliseconds on SD cards or
eMMC).
``synchronous="NORMAL"`` skips that fsync: still safe against a process crash (SIGKILL), but the
last commits may roll back on power loss -- acceptable for simulations, not for a fleet.

Item life follows :data:`meshinfer.proto.tasks.TRANSITIONS`. ``attempt`` of an item is the number
of its current dispatch (dispatched/running) or of its next one (pending/retrying): it starts at
1 and grows on a retryable failure and on recovery. A task is ``pending`` until an item is
dispatched, ``dispatched`` until a node accepts or answers, then ``running``; it ends through
:meth:`Journal.finish` (the coordinator decides, e.g. after aggregation) or :meth:`Journal.cancel`.

Group commit: :meth:`Journal.commit_group` runs several calls in ONE transaction (one fsync),
each as if inside its own ``SAVEPOINT``: a call that raises (:class:`TaskConflictError`,
:class:`UnknownTaskError`, an ``InvalidTransition``...) has only its own writes undone and gets
its exception back, while the others commit. Nothing of a group is durable before its
``COMMIT`` (and, at FULL, its sync) returns; if either fails, every call of the group fails
with that error. :class:`~coordinator.journal_writer.JournalWriter` is the one thread that feeds
it: it takes every call queued at that moment (at most ``max_group``), commits them as one
group, and its callers are answered only once that group is synced -- so "acknowledged" still
means "durable", at one fsync per group (or fewer) instead of per call.
Reads may share a group: they see the group's earlier writes, and their answer, like every
other, is handed out only after the commit (nobody reads a write that could still vanish).

Statements are what a group costs: each one releases the GIL and so hands it to the event loop
when that waits for it. A task's usual life (accepted, then the result that ends it) therefore
takes the hot path of :mod:`coordinator.journal_hot`: the journal keeps the live tasks it
accepted in memory, judges their results and reads them back from there, and writes their rows
in a few multi-row statements per group (one per table), just before the transaction needs them
(its ``COMMIT``, a savepoint, or any other call's statement). Everything else checks and writes
in as few statements as it can (a conditional ``UPDATE`` whose row count says whether it
applied; the slow path only works out why not), audit-log lines are written with the
transaction in one statement, and savepoints are taken only when a call failed after writing
(see :meth:`Journal.commit_group`).

Concurrency: the methods are synchronous and do blocking disk I/O. The coordinator service calls
them through a :class:`~coordinator.journal_writer.JournalWriter` so the event loop never blocks;
a lock makes each call (and each group) atomic should several threads share one journal anyway.
Wall-clock timestamps (``*_at``) are for people only; nothing schedules by them.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from coordinator.journal_files import check_readable, explained, lock_journal
from coordinator.journal_history import (
    JournalEvent,
    dispatch_detail,
    read_dispatches,
    read_history,
)
from coordinator.journal_hot import HOT_ITEMS, HotItem, HotTask, HotTasks, StagedRows
from coordinator.journal_schema import MIGRATIONS, check_is_journal, migrate
from meshinfer.errors import ConfigError, LocalProtocolError, MeshInferError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks import (
    TERMINAL_STATES,
    TRANSITIONS,
    InvalidTransition,
    ItemOutline,
    TaskEvent,
    TaskSpec,
    TaskState,
    outline,
    transition,
)
from meshinfer.proto.tasks_codec import decode_spec, encode_spec

__all__ = [
    "MIGRATIONS",
    "CallOutcome",
    "ItemRecord",
    "Journal",
    "JournalError",
    "JournalEvent",
    "JournalStats",
    "RecoveredTask",
    "TaskConflictError",
    "TaskEnd",
    "TaskEnding",
    "TaskPage",
    "TaskRecord",
    "TaskSummary",
    "TransientJournalError",
    "UnknownTaskError",
    "item_ended",
    "read_stats",
]

log = logging.getLogger(__name__)

MAX_PAGE = 1000
#: Tasks :meth:`Journal.prune` forgets per call (one group: keep it short for the calls behind).
PRUNE_BATCH = 200
#: Specs journaled lately are kept decoded (up to this many bytes of spec blobs, and this many
#: specs), so that reading a task back soon after (the coordinator's ``wait``) need not decode
#: its spec again. The count bounds the objects the garbage collector walks: 8 MiB of small
#: specs is ~80,000 of them, and every full collection walked them all.
SPEC_CACHE_BYTES = 8 << 20
SPEC_CACHE_COUNT = 4096
_LIVE = tuple(s.value for s in TaskState if s not in TERMINAL_STATES)
_ENDED = tuple(sorted(s.value for s in TERMINAL_STATES))
_IN_FLIGHT = (TaskState.DISPATCHED.value, TaskState.RUNNING.value)
_WAITING = (TaskState.PENDING.value, TaskState.RETRYING.value)
_FINISHED = (TaskState.SUCCEEDED, TaskState.FAILED)  # what finish() ends a task as
#: The states a dispatch moves on (read off the transition table), as SQL; all go to dispatched.
_DISPATCHABLE = tuple(sorted(s.value for s, e in TRANSITIONS if e == TaskEvent.DISPATCH))
assert {TRANSITIONS[TaskState(s), TaskEvent.DISPATCH] for s in _DISPATCHABLE} == {
    TaskState.DISPATCHED
}


class JournalError(MeshInferError):
    """The journal cannot do what was asked (its message says why)."""


class TransientJournalError(JournalError):
    """The call failed for no fault of its own: its group's transaction was rolled back under
    it (another call of the group hit an I/O error, a busy or full disk), so nothing of the
    group is journaled. Made again, it may pass. The error that lost the group is chained
    (``__cause__``). A refusal of the call itself (unknown task, wrong state) is never one."""


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
    #: attempts refused by their node or never sent (not counted against ``max_attempts``)
    refused: int = 0


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
class JournalStats:
    """Counts by state, counters (duplicate/late/unexpected deliveries...) and the audit lines
    stored (not those read back from the rows: see :mod:`coordinator.journal_history`)."""

    tasks: dict[str, int]
    items: dict[str, int]
    counters: dict[str, int]
    events: int


@dataclass(frozen=True, slots=True)
class TaskEnding:
    """How a task ends, decided by the coordinator: journaled with :meth:`Journal.end_task`
    (or together with the result that decides it, :meth:`Journal.take_result`)."""

    task_id: str
    state: TaskState  # succeeded or failed
    summary: bytes | None
    error: str | None
    read_back: bool  # someone waits: read the ended task back in the same call


#: What ending a task returns: the items still in flight (``(item id, node)``: tell their
#: nodes) and, if :attr:`TaskEnding.read_back`, the task as it ended.
TaskEnd = tuple[list[tuple[str, str]], "TaskRecord | None"]


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What one call of a group returned (``value``) or raised (``error``, its writes undone)."""

    value: object = None
    error: BaseException | None = None

    def unwrap(self) -> object:
        """The value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value


# --- the journal -----------------------------------------------------------------------------

_TASK_COLUMNS = """t.id, t.state, t.pattern, t.priority, t.policy, t.created_at, t.updated_at,
    t.error, (SELECT count(*) FROM items i WHERE i.task_id = t.id),
    (SELECT count(*) FROM results r JOIN items i ON r.item_id = i.id WHERE i.task_id = t.id)"""
_ITEM_COLUMNS = """i.id, i.task_id, i.position, i.model_id, i.model_version, i.stage, i.state,
    i.node, i.attempt, i.error, r.blob, r.attempt, i.refused"""
#: A task and its items in one query; the (possibly large) spec and summary blobs come with the
#: first row only.
_FIRST_ROW = """(i.position IS NULL
    OR i.position = (SELECT min(j.position) FROM items j WHERE j.task_id = t.id))"""
_RECORD = f"""SELECT t.id, t.state, t.pattern, t.priority, t.policy, t.created_at, t.updated_at,
    t.error, CASE WHEN {_FIRST_ROW} THEN t.spec END, CASE WHEN {_FIRST_ROW} THEN t.summary END,
    {_ITEM_COLUMNS}
    FROM tasks t LEFT JOIN items i ON i.task_id = t.id LEFT JOIN results r ON r.item_id = i.id
    WHERE t.id = ? ORDER BY i.position"""
_EVENT_COLUMNS = "INSERT INTO events (at, task_id, item_id, kind, detail, attempt, node)"
#: Events of item-only calls get their task id from the item (the mapping never changes).
_EVENTS_FROM_JSON = f"""{_EVENT_COLUMNS} SELECT json_extract(value, '$[0]'),
    coalesce(json_extract(value, '$[1]'),
             (SELECT i.task_id FROM items i WHERE i.id = json_extract(value, '$[2]'))),
    json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]'),
    json_extract(value, '$[5]'), json_extract(value, '$[6]')
    FROM json_each(?) ORDER BY key"""
_EVENT_ROW = f"""{_EVENT_COLUMNS} SELECT ?, coalesce(?, (SELECT task_id FROM items WHERE id = ?)),
    ?, ?, ?, ?, ?"""


class Journal:
    """The task journal in the SQLite file at ``path`` (created and migrated on open).

    One journal holds the file at a time: while it is open, another is refused (a file that
    cannot be a journal is refused too, naming it; see :mod:`coordinator.journal_files`).
    Use as a context manager or call :meth:`close`. ``wall_clock`` stamps rows for people.
    ``hot_items``: at most this many items of live tasks kept in memory (0: none; see
    :mod:`coordinator.journal_hot`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        wall_clock: Callable[[], float] = time.time,
        hot_items: int = HOT_ITEMS,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(f"journal.synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.path = Path(path)
        self._clock = wall_clock
        self._lock = threading.RLock()  # re-entered by the calls of a group (same thread)
        #: a group's or a lone write's transaction is open (its thread holds the lock): reads
        #: and writes inside join it
        self._in_transaction = False
        self._specs: dict[str, tuple[bytes, TaskSpec]] = {}  # task id -> (blob, spec), oldest 1st
        self._spec_bytes = 0
        #: audit lines not yet written: (at, task, item, kind, detail, attempt, node)
        self._events: list[tuple[float, str | None, str | None, str, str, int | None, str | None]]
        self._events = []
        self._hot = HotTasks(hot_items)  # live tasks known in memory (coordinator.journal_hot)
        self._staged = StagedRows()  # their rows, not yet written
        self._logged = 0  # audit lines logged so far (see _undo_free)
        self._flushes = 0  # flushes that wrote something
        self._flushed_changes = 0  # rows those flushes changed
        self.syncs = synchronous == "FULL"  # commits are durable only once sync() returned
        self._wal: int | None = None  # a descriptor of the write-ahead log, opened by sync()
        self._sync_lock = threading.Lock()
        #: held while open: one journal per file (see coordinator.journal_files)
        self._file_lock: int | None = lock_journal(self.path)
        try:
            self._db: sqlite3.Connection | None = self._open()
        except BaseException:
            self._release_file()
            raise

    def _open(self) -> sqlite3.Connection:
        """Connect, set the pragmas and migrate; a file that cannot be a journal is a
        :class:`~coordinator.journal_files.JournalFileError` (or ``SchemaError``) naming it."""
        with explained(self.path):
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                check_is_journal(db)  # before the switch to WAL, which would rewrite the file
                if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                    raise sqlite3.OperationalError("it cannot be switched to WAL mode")
                # FULL's sync of the write-ahead log at each commit is done by sync(), so that a
                # writer can run the next group while the last one syncs; SQLite itself still
                # syncs the log before every checkpoint (what NORMAL does).
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA foreign_keys=ON")
                db.execute("PRAGMA busy_timeout=5000")
                migrate(db)
                self._json_events = _has_json(db)
            except BaseException:
                db.close()
                raise
        return db

    def _release_file(self) -> None:
        if self._file_lock is not None:
            os.close(self._file_lock)
            self._file_lock = None

    def close(self) -> None:
        """Close the database; safe to call twice (not from a call of a group)."""
        with self._lock:
            if self._in_transaction:
                raise LocalProtocolError("cannot close the journal from inside a group commit")
            if self._db is not None:
                self._db.close()
                self._db = None
                self._hot.clear()
            with self._sync_lock:
                if self._wal is not None:
                    os.close(self._wal)
                    self._wal = None
            self._release_file()  # last: another journal may open the file from now on

    def sync(self) -> None:
        """Make every commit so far durable: ``fdatasync`` the write-ahead log (FULL; NORMAL:
        nothing). The log is appended to in commit order, so one sync covers every commit
        before it. Thread-safe; it runs beside the next group's statements on the connection.
        Raises ``OSError`` if the sync fails (those commits may then be lost)."""
        if not self.syncs:
            return
        with self._sync_lock:
            if self._db is None:
                return  # closed: closing the connection checkpointed and synced the log
            if self._wal is None:
                try:
                    self._wal = os.open(f"{self.path}-wal", os.O_RDONLY)
                except FileNotFoundError:  # nothing committed in WAL mode yet
                    return
            os.fdatasync(self._wal)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self, *, flush: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error); inside a
        group or another write, the open transaction stands in for it (so a call made of
        several writes, e.g. :meth:`take_result`, commits or rolls back whole), with its staged
        rows written first (``flush=False``: for a call that neither reads nor changes them)."""
        with self._lock:
            db = self._connection()
            if self._in_transaction:
                if flush:
                    self._flush(db)
                yield db
                return
            db.execute("BEGIN IMMEDIATE")
            self._in_transaction = True
            try:
                yield db
                self._flush(db)
                db.execute("COMMIT")
            except BaseException:
                self._roll_back(db)  # also when COMMIT itself failed (disk full, I/O error)
                raise
            finally:
                self._in_transaction = False
            self.sync()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent read snapshot (inside a group: the group's, with its earlier writes)."""
        with self._lock:
            db = self._connection()
            if self._in_transaction:
                self._flush(db)
                yield db
                return
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    def commit_group(
        self,
        calls: Sequence[Callable[[], object]],
        *,
        before_commit: Callable[[list[CallOutcome]], None] | None = None,
        sync: bool = True,
    ) -> list[CallOutcome]:
        """Run ``calls`` in order in one transaction, as if each were in its own savepoint;
        commit once. ``before_commit`` gets the outcomes once the calls ran, before the
        ``COMMIT`` (and its sync) starts: what is decided, not yet durable. ``sync=False``:
        return after the ``COMMIT`` without :meth:`sync`; the caller syncs before it treats
        the group as durable (a writer then runs the next group meanwhile).

        A call that raises an :class:`Exception` has its writes undone and the exception in its
        :class:`CallOutcome`; the others are unaffected. Returns only after the ``COMMIT``;
        raises (having rolled the whole group back) if the group cannot begin or commit, or
        :class:`TransientJournalError` if SQLite rolled it back during a call. The
        calls may be this journal's methods or functions calling several of them (one
        savepoint for all: they commit or roll back together). They must act on this journal
        only: a call may run twice (see below).

        Savepoints cost statements, and every statement hands the GIL to the event loop, so
        the group first runs without them. This journal's methods check before they write, so
        a call that raises has usually written nothing (``total_changes`` tells) and nothing
        needs undoing. Only if a call raised *after* writing is the group rolled back and run
        again with a real ``SAVEPOINT`` around each call.
        """
        with self._lock:
            db = self._connection()
            outcomes = self._run_group(db, calls, before_commit, savepoints=False)
            if outcomes is None:
                outcomes = self._run_group(db, calls, before_commit, savepoints=True)
        if sync:
            self.sync()
        return outcomes

    def _run_group(self, db, calls, before_commit, *, savepoints: bool) -> list[CallOutcome] | None:
        """One try at a group; None (rolled back) if, without savepoints, a call raised after
        writing."""
        db.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            run = self._in_savepoint if savepoints else self._undo_free
            outcomes = []
            for call in calls:
                outcome = run(db, call)
                if outcome is None:
                    self._roll_back(db)
                    return None
                if not db.in_transaction:  # SQLite rolled it all back (I/O error, disk full)
                    lost = f"the group's transaction was lost: {outcome.error}"
                    raise TransientJournalError(lost) from outcome.error
                outcomes.append(outcome)
            self._flush(db)
            if before_commit is not None:
                before_commit(outcomes)
            db.execute("COMMIT")
            return outcomes
        except BaseException:
            self._roll_back(db)
            raise
        finally:
            self._in_transaction = False
            self._events.clear()

    def _undo_free(self, db: sqlite3.Connection, call: Callable[[], object]) -> CallOutcome | None:
        """Run ``call`` with no savepoint; None if it raised after writing (undo needed). What
        a flush inside the call wrote of earlier calls' rows is not the call's own writing: a
        call that reads, finds nothing and raises is refused alone, the group runs once."""
        own = db.total_changes - self._flushed_changes
        logged, staged, flushes = self._logged, self._staged.serial, self._flushes
        try:
            return CallOutcome(call())
        except Exception as exc:
            lines = self._logged - logged  # its audit lines, unwritten unless a flush ran since
            if (
                db.total_changes - self._flushed_changes != own
                or self._staged.serial != staged
                or (lines and self._flushes != flushes)
            ):
                return None
            if lines:
                del self._events[-lines:]
            return CallOutcome(error=exc)

    def _in_savepoint(self, db: sqlite3.Connection, call: Callable[[], object]) -> CallOutcome:
        self._flush(db)  # the writes of earlier calls must not be undone with this one
        db.execute("SAVEPOINT call")
        try:
            value = call()
        except Exception as exc:
            self._forget_unwritten()
            if not db.in_transaction:  # a flush inside the call failed: the group fails
                return CallOutcome(error=exc)
            db.execute("ROLLBACK TO call")
            db.execute("RELEASE call")
            return CallOutcome(error=exc)
        db.execute("RELEASE call")
        return CallOutcome(value)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise LocalProtocolError("the journal is closed")
        return self._db

    def _log(
        self, kind: str, task_id: str | None, item_id=None, detail="", sent=(None, None)
    ) -> None:
        """Add a line to the audit log, written with the transaction (before its COMMIT);
        ``sent``: a dispatch line's (attempt, node), kept as columns (schema version 4)."""
        self._events.append((self._clock(), task_id, item_id, kind, detail, *sent))
        self._logged += 1

    def _flush(self, db: sqlite3.Connection) -> None:
        """Write what the transaction holds back: staged rows, then the logged events. If that
        fails, the whole transaction is rolled back (calls already answered wrote those rows:
        it must not commit without them) and the error raised."""
        if not (self._staged or self._events):
            return
        before = db.total_changes
        try:
            self._staged.flush(db)
            self._write_events(db)
        except BaseException:
            self._roll_back(db)
            raise
        finally:
            self._flushes += 1
            self._flushed_changes += db.total_changes - before

    def _roll_back(self, db: sqlite3.Connection) -> None:
        """Roll the open transaction back (if SQLite has not already), with what it held."""
        self._forget_unwritten()
        if db.in_transaction:
            db.execute("ROLLBACK")

    def _forget_unwritten(self) -> None:
        """The transaction (or savepoint) is rolled back: drop what it held back, and the hot
        tasks (their rows may be rolled back too; they take the ordinary path from now)."""
        self._staged.clear()
        self._events.clear()
        self._hot.clear()

    def _write_events(self, db: sqlite3.Connection) -> None:
        """Write the logged events: one statement for all of them (an SQLite without JSON
        functions gets one per event)."""
        if not self._events:
            return
        events, self._events = self._events, []
        if self._json_events:
            db.execute(_EVENTS_FROM_JSON, (json.dumps(events),))
        else:
            db.executemany(_EVENT_ROW, [(a, t, i, i, *rest) for a, t, i, *rest in events])

    def _count(self, db: sqlite3.Connection, name: str, by: int = 1) -> None:
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    # --- submission ---------------------------------------------------------------------------

    def submit(self, spec: TaskSpec) -> str:
        """Journal ``spec`` and its planned items, committed before returning its task id.

        Submitting the same spec again returns the id (an idempotent client retry); a different
        spec under a known id raises :class:`TaskConflictError`. Invalid specs raise
        :class:`~meshinfer.proto.tasks.InvalidTaskError`.
        """
        self.accept(spec)
        return spec.task_id

    def accept(self, spec: TaskSpec, items: tuple[ItemOutline, ...] | None = None) -> bool:
        """As :meth:`submit`, but True if this call journaled the task, False if the very same
        spec already was (an idempotent retry: nothing to run again). ``items``: the spec's
        :func:`~meshinfer.proto.tasks.outline` if the caller has it (the spec is then known
        to be valid and is not checked again)."""
        if items is None:
            items = outline(spec)
        blob = encode_spec(spec)
        with self._write(flush=False) as db:  # a task's row is never staged: nothing to read
            if not self._insert_task(db, spec, blob, items):
                self._check_same(db, spec, blob)
                return False
            self._remember(spec, blob)  # under the lock; harmless if rolled back (blob checked)
        return True

    def holds(self, spec: TaskSpec) -> bool:
        """Whether ``spec`` itself is journaled under its task id (an idempotent retry of it
        would run nothing), whatever the task's state; False for an unknown id or another
        spec. Writes nothing."""
        with self._read() as db:
            row = db.execute("SELECT spec FROM tasks WHERE id = ?", (spec.task_id,)).fetchone()
        return row is not None and _same_spec(bytes(row[0]), spec, encode_spec(spec))

    def _check_same(self, db, spec: TaskSpec, blob: bytes) -> None:
        """:class:`TaskConflictError` unless the task journaled under ``spec``'s id is ``spec``."""
        (known,) = db.execute("SELECT spec FROM tasks WHERE id = ?", (spec.task_id,)).fetchone()
        if not _same_spec(bytes(known), spec, blob):
            raise TaskConflictError(f"task {spec.task_id!r} exists with another spec")

    def _remember(self, spec: TaskSpec, blob: bytes) -> None:
        """Keep ``spec`` decoded (see :data:`SPEC_CACHE_BYTES`), dropping the oldest first."""
        self._forget_spec(spec.task_id)
        self._specs[spec.task_id] = (blob, spec)
        self._spec_bytes += len(blob)
        while self._spec_bytes > SPEC_CACHE_BYTES or len(self._specs) > SPEC_CACHE_COUNT:
            dropped, _ = self._specs.pop(next(iter(self._specs)))
            self._spec_bytes -= len(dropped)

    def _spec_of(self, task_id: str, blob: bytes) -> TaskSpec:
        """The spec stored as ``blob``: the one remembered if its blob is the same, or decoded."""
        known = self._specs.get(task_id)
        return known[1] if known is not None and known[0] == blob else decode_spec(blob)

    def _insert_task(self, db, spec: TaskSpec, blob: bytes, items) -> bool:
        """Insert the task and stage its items; False (nothing written) if the id is taken.
        The task is then kept hot (see :mod:`coordinator.journal_hot`)."""
        now = self._clock()
        task_id = spec.task_id
        inserted = db.execute(
            "INSERT INTO tasks (id, spec, state, pattern, priority, policy, created_at, updated_at)"
            " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (task_id, blob, str(spec.pattern), spec.priority, spec.policy, now, now),
        ).rowcount
        if not inserted:
            return False
        self._staged.items += [
            (o.item_id, task_id, o.index, o.model.model_id, o.model.version, o.stage, now)
            for o in items
        ]
        self._staged.serial += 1
        hot = {o.item_id: HotItem(o, TaskState.PENDING) for o in items}
        self._hot.add(task_id, HotTask(spec, now, now, TaskState.PENDING, hot))
        return True

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

        It may be journaled after the send (the coordinator does so only once the result is
        overdue, or before a failure of that attempt; a result can carry it instead: see
        ``sent_to`` in :meth:`record_result`): if the coordinator dies before it commits, the
        item is still pending and :meth:`recover` dispatches it again (an item whose fate is
        unknown always runs again). ``attempt`` must be the item's current
        attempt; the item must be pending or retrying (else
        :class:`~meshinfer.proto.tasks.InvalidTransition`).
        """
        with self._write() as db:
            now = self._clock()
            moved = db.execute(
                "UPDATE items SET state = ?, node = ?, updated_at = ? WHERE id = ? AND attempt = ?"
                f" AND state IN {_DISPATCHABLE}",
                (TaskState.DISPATCHED.value, node, now, item_id, attempt),
            ).rowcount
            if not moved:
                self._refuse_dispatch(db, item_id, attempt)
            self._hot.drop_item(item_id)
            db.execute(  # the task moves with its first dispatch
                "UPDATE tasks SET state = ?, updated_at = ? WHERE id = (SELECT task_id FROM items"
                f" WHERE id = ?) AND state IN {_DISPATCHABLE}",
                (TaskState.DISPATCHED.value, now, item_id),
            )
            detail = dispatch_detail(attempt, node)
            self._log("dispatched", None, item_id, detail, sent=(attempt, node))

    def _refuse_dispatch(self, db, item_id: str, attempt: int) -> NoReturn:
        """Why the item cannot be dispatched as ``attempt`` (unknown, wrong state or attempt)."""
        row = self._item_row(db, item_id)
        if row is None:
            raise UnknownTaskError(f"no work item {item_id!r}")
        transition(row[1], TaskEvent.DISPATCH)  # InvalidTransition unless pending or retrying
        raise LocalProtocolError(f"{item_id}: dispatch of attempt {attempt}, not {row[2]}")

    def mark_running(self, item_id: str, attempt: int) -> bool:
        """A node accepted the item (``TaskAccepted``); False (ignored) when stale or unknown."""
        with self._write() as db:
            row = self._item_row(db, item_id)
            if row is None or row[1] != TaskState.DISPATCHED or row[2] != attempt:
                return False
            self._hot.drop_item(item_id)
            task_id, state, _, task_state = row
            self._set_item(db, item_id, transition(state, TaskEvent.ACCEPT))
            self._advance_task(db, task_id, task_state, TaskEvent.ACCEPT)
            return True

    def record_result(
        self,
        item_id: str,
        attempt: int,
        blob: bytes,
        *,
        node: str | None = None,
        sent_to: str | None = None,
    ) -> bool:
        """Accept the item's result exactly once; True if this call recorded it.

        Returns False, counting it, for a duplicate (the item already has a result), a late
        result (the item failed or was cancelled), an unknown item, or an attempt that was
        never dispatched. The result of any dispatched attempt is accepted while the item lives.

        ``sent_to``: the caller vouches that attempt ``attempt`` went to that node although its
        :meth:`mark_dispatched` may not be journaled (the coordinator journals a dispatch only
        once its result is overdue): an item still waiting at that attempt is then taken as
        dispatched there, in this same call.
        """
        return self.take_result(item_id, attempt, blob, node=node, sent_to=sent_to)[0]

    def _record_result(self, item_id, attempt, blob, node, sent_to, *, advance: bool) -> bool:
        """:meth:`record_result`; ``advance=False`` leaves the task's row alone (the caller
        ends the task in the same transaction)."""
        with self._write() as db:
            row = self._item_row(db, item_id)
            verdict = _judge_result(row, attempt, vouched=sent_to is not None)
            if verdict is not None:
                self._count(db, verdict)
                return False
            self._hot.drop_item(item_id)
            task_id, state, current, task_state = row
            try:
                db.execute(
                    "INSERT INTO results (item_id, attempt, node, blob, received_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (item_id, attempt, node, blob, self._clock()),
                )
            except sqlite3.IntegrityError:  # belt and braces: the primary key says "once"
                self._count(db, "duplicate_results")
                return False
            if state.value in _WAITING and attempt == current and sent_to is not None:
                self._set_item(db, item_id, transition(state, TaskEvent.SUCCEED), node=sent_to)
                if task_state == TaskState.PENDING:  # as its dispatch would have moved it
                    task_state = TaskState.DISPATCHED
            else:
                self._set_item(db, item_id, transition(state, TaskEvent.SUCCEED))
            if advance:
                self._advance_task(db, task_id, task_state, TaskEvent.ACCEPT)
            return True

    def record_failure(
        self, item_id: str, attempt: int, error: str, *, retryable: bool, refused: bool = False
    ) -> bool:
        """The item's current attempt failed; True if that changed its state.

        Retryable: the item goes to ``retrying`` with attempt + 1 (dispatch it again, to another
        node). Not retryable: ``failed`` (the coordinator then decides the task's fate). Failures
        of an older attempt, or of an item that is done, are ignored and counted. ``refused``
        (retryable failures only): the node refused the attempt or never got it (the item's
        ``refused`` count grows; the audit line says ``refused``, not ``retry``).
        """
        event = TaskEvent.RETRY if retryable else TaskEvent.FAIL
        with self._write() as db:
            row = self._item_row(db, item_id)
            if row is None or row[2] != attempt or (row[1], event) not in TRANSITIONS:
                self._count(db, "ignored_failures")
                return False
            self._hot.drop_item(item_id)
            task_id, state, current, _ = row
            bump = 1 if retryable else 0
            self._set_item(
                db, item_id, transition(state, event), attempt=current + bump, error=error
            )
            if refused and retryable:
                db.execute("UPDATE items SET refused = refused + 1 WHERE id = ?", (item_id,))
            kind = ("refused" if refused else "retry") if retryable else "failed"
            self._log(kind, task_id, item_id, error[:500])
            return True

    # --- task outcome ---------------------------------------------------------------------------

    def cancel(self, task_id: str) -> list[tuple[str, str]] | None:
        """Cancel the task and its live items; returns ``(item id, node)`` of the items that
        were in flight (send them a ``TaskCancel``). A task that had ended is left alone (None:
        a caller that read it live tells whether the cancel, or its end, came first)."""
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
        return self._close_task(task_id, state, summary, error) or []

    def end_task(self, ending: TaskEnding) -> TaskEnd:
        """:meth:`finish` the task as ``ending`` says; also read it back if asked (one call:
        the record is handed out with the end, once durable)."""
        with self._write():  # one transaction, also when called outside a group
            in_flight = self.finish(
                ending.task_id, ending.state, summary=ending.summary, error=ending.error
            )
            return in_flight, self.get(ending.task_id) if ending.read_back else None

    def take_result(
        self,
        item_id: str,
        attempt: int,
        blob: bytes,
        *,
        node: str | None = None,
        sent_to: str | None = None,
        ending: TaskEnding | None = None,
    ) -> tuple[bool, TaskEnd | None]:
        """:meth:`record_result` and, if it was accepted and ``ending`` is given (this result
        decides the task), :meth:`end_task`, in one call (both commit or neither does).
        Returns whether the result was accepted, and what ending the task returned."""
        with self._lock:
            taken = self._take_hot(item_id, attempt, blob, node, sent_to, ending)
            if taken is not None:
                return taken
            with self._write():  # one transaction, also when called outside a group
                if not self._record_result(
                    item_id, attempt, blob, node, sent_to, advance=ending is None
                ):
                    return False, None
                return True, None if ending is None else self.end_task(ending)

    def _take_hot(
        self, item_id, attempt, blob, node, sent_to, ending
    ) -> tuple[bool, TaskEnd | None] | None:
        """:meth:`take_result` from memory, its rows staged (see :mod:`coordinator.journal_hot`),
        as :meth:`_record_result` and :meth:`end_task` would write them; None (nothing done)
        unless the item's task is hot, the result is accepted and the ending is for that task
        and valid. Called with the lock held."""
        found = self._hot.of_item(item_id)
        if found is None:
            return None
        task_id, task, item = found
        row = (task_id, item.state, item.attempt, task.state)
        if _judge_result(row, attempt, vouched=sent_to is not None) is not None:
            return None  # refused: the ordinary path counts it
        if ending is not None and (ending.task_id != task_id or ending.state not in _FINISHED):
            return None
        state = transition(item.state, TaskEvent.SUCCEED)
        with self._write(flush=False):
            now = self._clock()
            moved = task.state  # as the item's first dispatch, journaled here, would move it
            if item.state.value in _WAITING and attempt == item.attempt and sent_to is not None:
                item.node = sent_to
                if moved == TaskState.PENDING:
                    moved = TaskState.DISPATCHED
            item.state, item.result, item.result_attempt = state, blob, attempt
            staged = self._staged
            staged.results.append((item_id, attempt, node, blob, now))
            staged.item_states[item_id] = (state.value, item.node, None, now)
            staged.serial += 1
            if ending is None:
                new = TRANSITIONS.get((moved, TaskEvent.ACCEPT))
                if new is not None and new not in TERMINAL_STATES:
                    task.state, task.updated_at = new, now
                    staged.task_states[task_id] = (new.value, None, None, now)
            return True, None if ending is None else self._end_hot(task_id, task, ending, now)

    def _end_hot(self, task_id: str, task: HotTask, ending: TaskEnding, now: float) -> TaskEnd:
        """:meth:`end_task` of a hot task, from memory (as :meth:`_close_task` and :meth:`get`
        would write and read it); the task is then no longer hot."""
        in_flight = []
        for item_id, item in task.items.items():
            if item.state.value in _LIVE:
                if item.state.value in _IN_FLIGHT:
                    in_flight.append((item_id, item.node))
                item.state, item.error = TaskState.CANCELLED, _ended_unfinished(ending.state)
                self._staged.item_states[item_id] = (item.state.value, item.node, item.error, now)
        task.state, task.updated_at = ending.state, now
        self._staged.task_states[task_id] = (ending.state.value, ending.summary, ending.error, now)
        self._staged.serial += 1
        self._hot.drop(task_id)
        if not ending.read_back:
            return in_flight, None
        items = tuple(_hot_record(task_id, item) for item in task.items.values())
        spec = task.spec
        done = sum(item.result is not None for item in items)
        summary = TaskSummary(
            task_id, task.state, str(spec.pattern), spec.priority, spec.policy, task.created_at,
            now, ending.error, len(items), done,
        )  # fmt: skip
        return in_flight, TaskRecord(summary, spec, items, ending.summary)

    def _close_task(self, task_id, state, summary, error) -> list[tuple[str, str]] | None:
        with self._write() as db:
            self._hot.drop(task_id)
            now = self._clock()
            closed = db.execute(
                "UPDATE tasks SET state = ?, summary = ?, error = ?, updated_at = ? WHERE id = ?"
                f" AND state IN {_LIVE}",
                (state.value, summary, error, now, task_id),
            ).rowcount
            if not closed:  # over already, or unknown
                if db.execute("SELECT 1 FROM tasks WHERE id = ?", (task_id,)).fetchone() is None:
                    raise UnknownTaskError(f"no task {task_id!r}")
                return None
            live = db.execute(
                f"SELECT id, node, state FROM items WHERE task_id = ? AND state IN {_LIVE}"
                " ORDER BY position",
                (task_id,),
            ).fetchall()
            if live:
                db.execute(
                    "UPDATE items SET state = 'cancelled', error = ?, updated_at = ?"
                    f" WHERE task_id = ? AND state IN {_LIVE}",
                    (_ended_unfinished(state), now, task_id),
                )
            return [(item_id, node) for item_id, node, was in live if was in _IN_FLIGHT]

    # --- reading --------------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord:
        """The task with its spec and items; :class:`UnknownTaskError` if not journaled."""
        with self._read() as db:
            return self._record(db, task_id)

    def _record(self, db, task_id: str) -> TaskRecord:
        rows = db.execute(_RECORD, (task_id,)).fetchall()  # one query: one GIL hand-over less
        if not rows:
            raise UnknownTaskError(f"no task {task_id!r}")
        first = rows[0]
        items = tuple(_item(row[10:]) for row in rows if row[10] is not None)
        done = sum(item.result is not None for item in items)
        summary = _summary((*first[:8], len(items), done))
        result_summary = None if first[9] is None else bytes(first[9])
        return TaskRecord(summary, self._spec_of(task_id, bytes(first[8])), items, result_summary)

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
        """The audit log of one task, oldest first: the lines stored, and those its rows say
        (see :mod:`coordinator.journal_history`)."""
        with self._read() as db:
            return read_history(db, task_id)

    def dispatches(self, task_id: str) -> dict[str, set[tuple[int, str]]]:
        """Per item id of the task, the (attempt, node) of each journaled dispatch (those a
        result vouched for are on the result rows instead: see :meth:`take_result`)."""
        with self._read() as db:
            return read_dispatches(db, task_id)

    def recover(self) -> list[RecoveredTask]:
        """After a restart: every unfinished task, with the items that need a (re)dispatch.

        Items that were dispatched or running have an unknown fate: they go back to pending
        with attempt + 1 (a late result of the old attempt is still accepted). Items still
        pending or retrying are listed too, with their attempt: among them any item that was
        sent while its :meth:`mark_dispatched` had not committed yet, which therefore runs
        again (a result of that unjournaled send is refused unless the new dispatch is
        journaled, or the result is vouched for as sent, then accepted once, like any other).
        Call once, at
        startup, before dispatching anything. Pipeline items are all listed; dispatch only
        those :class:`~meshinfer.proto.tasks_pipeline.PipelinePlan` says are ready.
        """
        with self._write() as db:
            self._hot.clear()
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
            self._log("requeued", task_id, item_id, "coordinator restarted")

    # --- retention -----------------------------------------------------------------------------

    def prune(self, older_than_s: float, *, limit: int = PRUNE_BATCH) -> int:
        """Forget up to ``limit`` of the oldest tasks that ended more than ``older_than_s``
        seconds ago (by the journal's wall clock), with their items, results and audit
        events; and audit lines about no task that are as old. Returns how many tasks went
        (call again while it returns ``limit``). Live tasks are never touched. A pruned task is
        unknown afterwards: reading it raises :class:`UnknownTaskError`, and submitting its id
        again journals it as a new task.

        Tasks are walked in the order they were journaled, up to the first one created after
        the cutoff (no later task can have ended before it), so no index is kept for this on
        the hot path and a call reads little more than what it deletes (and the old tasks still
        live). Counted in the ``pruned_tasks`` counter. The file does not shrink: SQLite reuses
        the freed pages, so a journal with retention stays about as large as the tasks of one
        retention period.
        """
        if older_than_s < 0 or limit < 1:
            raise LocalProtocolError("prune() needs older_than_s >= 0 and limit >= 1")
        with self._write() as db:
            cutoff = self._clock() - older_than_s
            ids = self._expired(db, cutoff, limit)
            if ids:
                for task_id in ids:
                    self._hot.drop(task_id)  # (an ended task is not hot: belt and braces)
                params = [(task_id,) for task_id in ids]
                db.executemany("DELETE FROM events WHERE task_id = ?", params)
                db.executemany(
                    "DELETE FROM results WHERE item_id IN (SELECT id FROM items WHERE task_id = ?)",
                    params,
                )
                db.executemany("DELETE FROM items WHERE task_id = ?", params)
                db.executemany("DELETE FROM tasks WHERE id = ?", params)
                self._count(db, "pruned_tasks", len(ids))
            db.execute("DELETE FROM events WHERE task_id IS NULL AND at < ?", (cutoff,))
        for task_id in ids:
            self._forget_spec(task_id)
        return len(ids)

    @staticmethod
    def _expired(db: sqlite3.Connection, cutoff: float, limit: int) -> list[str]:
        """The ids of up to ``limit`` tasks that ended before ``cutoff``, oldest first."""
        ids: list[str] = []
        rows = db.execute("SELECT id, state, created_at, updated_at FROM tasks ORDER BY seq")
        for task_id, state, created_at, updated_at in rows:
            if created_at >= cutoff or len(ids) == limit:
                break
            if state in _ENDED and updated_at < cutoff:
                ids.append(task_id)
        return ids

    def _forget_spec(self, task_id: str) -> None:
        old = self._specs.pop(task_id, None)
        if old is not None:
            self._spec_bytes -= len(old[0])

    def stats(self) -> JournalStats:
        """Counts of tasks and items by state, the counters and the audit lines stored.

        These scan the tables (~0.1 s per million rows): a service should rather call
        :func:`read_stats` from a thread of its own than hold up the journal's writes."""
        with self._read() as db:
            return _stats_of(db)


def read_stats(path: str | Path) -> JournalStats:
    """:meth:`Journal.stats` of the journal file at ``path``, read on a read-only connection of
    its own: call it from any thread while a :class:`Journal` writes (in WAL mode readers and
    the writer do not wait for each other); it sees what was committed when it began.
    :class:`~coordinator.journal_files.JournalFileError` (or ``SchemaError``) naming the file
    and what is wrong if it cannot be read as a journal."""
    path = Path(path)
    check_readable(path)
    with explained(path):
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            db.execute("BEGIN")
            check_is_journal(db)
            return _stats_of(db)
        finally:
            db.close()


def _stats_of(db: sqlite3.Connection) -> JournalStats:
    tasks = dict(db.execute("SELECT state, count(*) FROM tasks GROUP BY state"))
    items = dict(db.execute("SELECT state, count(*) FROM items GROUP BY state"))
    counters = dict(db.execute("SELECT name, value FROM counters"))
    (events,) = db.execute("SELECT count(*) FROM events").fetchone()
    return JournalStats(tasks, items, counters, events)


def _has_json(db: sqlite3.Connection) -> bool:
    """Whether this SQLite has the JSON functions (built in since 3.38, usually before)."""
    try:
        db.execute("SELECT value FROM json_each('[1]')").fetchall()
    except sqlite3.OperationalError:
        return False
    return True


def _judge_result(
    row: tuple[str, TaskState, int, TaskState] | None, attempt: int, *, vouched: bool = False
) -> str | None:
    """The counter to bump when a result for the item (its ``_item_row``) must be refused, or
    None to accept it. ``vouched``: the caller knows the current attempt was sent."""
    if row is None:
        return "unknown_results"
    _, state, current, _ = row
    if state == TaskState.SUCCEEDED:
        return "duplicate_results"
    if state in TERMINAL_STATES:
        return "late_results"
    highest_sent = current if state.value in _IN_FLIGHT or vouched else current - 1
    return None if 1 <= attempt <= highest_sent else "unexpected_results"


def _same_spec(known: bytes, spec: TaskSpec, blob: bytes) -> bool:
    """Whether the spec journaled as ``known`` is ``spec`` (encoded as ``blob``)."""
    return known == blob or decode_spec(known) == spec  # dict order may differ


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
        ok = cursor.isascii() and cursor.isdigit() and len(cursor) <= 19  # not "²"
        if not ok or int(cursor) >= 1 << 63:  # (SQLite's integers are 64-bit)
            raise ConfigError(f"cursor {cursor!r} is not one this journal handed out")
        clauses.append("t.seq < ?")
        args.append(int(cursor))
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args


def item_ended(error: BaseException) -> bool:
    """Whether ``error`` is this journal refusing a step (a dispatch, a running mark) of an
    item that had already ended (succeeded, failed or cancelled): the expected end of a race
    when the step was told without waiting. The coordinator journals a dispatch that way (an
    overdue mark, or before a retry's failure) and hears of a task's end only once that end is
    durable, so a result or a cancel that ends the task can be queued just before the dispatch
    of one of its other items; nothing is lost. A step refused in any other state (e.g. a
    second dispatch of an item in flight) is a fault."""
    return isinstance(error, InvalidTransition) and error.state in TERMINAL_STATES


def _hot_record(task_id: str, item: HotItem) -> ItemRecord:
    """A hot item as :meth:`Journal.get` reads it (a hot item has no error but the one its
    task's end gives it, and no refusals: a failure drops it from memory first)."""
    where = item.outline
    return ItemRecord(
        where.item_id, task_id, where.index, where.model, where.stage, item.state, item.node,
        item.attempt, item.error, item.result, item.result_attempt,
    )  # fmt: skip


def _ended_unfinished(task_state: TaskState) -> str | None:
    """The error of an item its task's end cancelled: why it never finished (None when the task
    was cancelled: the item's state says it all)."""
    if task_state == TaskState.FAILED:
        return "not finished: the task failed"
    if task_state == TaskState.SUCCEEDED:
        return "not needed: the task succeeded without it"
    return None


def _summary(row) -> TaskSummary:
    return TaskSummary(row[0], TaskState(row[1]), *row[2:10])


def _item(row) -> ItemRecord:
    return ItemRecord(
        row[0], row[1], row[2], ModelRef(row[3], row[4]), row[5], TaskState(row[6]),
        row[7], row[8], row[9], None if row[10] is None else bytes(row[10]), row[11], row[12],
    )  # fmt: skip
