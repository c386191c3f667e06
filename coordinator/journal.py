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

import errno
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from coordinator.journal_ends import TaskEnds
from coordinator.journal_files import explained, lock_journal
from coordinator.journal_history import JournalEvent
from coordinator.journal_hot import HOT_ITEMS, HotItem, HotTask, HotTasks, StagedRows
from coordinator.journal_items import ItemProgress
from coordinator.journal_reads import MAX_PAGE, JournalReads, read_stats
from coordinator.journal_schema import MIGRATIONS, check_is_journal, migrate
from coordinator.journal_transactions import JournalTransactions, _has_json
from coordinator.journal_types import (
    CallOutcome,
    ItemRecord,
    JournalError,
    JournalStats,
    RecoveredTask,
    TaskConflictError,
    TaskEnd,
    TaskEnding,
    TaskPage,
    TaskRecord,
    TaskSummary,
    TransientJournalError,
    UnknownTaskError,
    item_ended,
)
from coordinator.journal_upkeep import PRUNE_BATCH, JournalUpkeep
from meshinfer.errors import ConfigError, LocalProtocolError
from meshinfer.proto.tasks import ItemOutline, TaskSpec, TaskState, outline
from meshinfer.proto.tasks_codec import decode_spec, encode_spec

__all__ = [
    "MAX_PAGE",
    "MIGRATIONS",
    "PRUNE_BATCH",
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

#: Specs journaled lately are kept decoded (up to this many bytes of spec blobs, and this many
#: specs), so that reading a task back soon after (the coordinator's ``wait``) need not decode
#: its spec again. The count bounds the objects the garbage collector walks: 8 MiB of small
#: specs is ~80,000 of them, and every full collection walked them all.
SPEC_CACHE_BYTES = 8 << 20
SPEC_CACHE_COUNT = 4096


class Journal(JournalTransactions, ItemProgress, TaskEnds, JournalReads, JournalUpkeep):
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
        #: the error of a flush SQLite refused with the transaction still open (see _flush)
        self._refused: Exception | None = None
        self._in_call = False  # a group's call runs in its savepoint (see _in_savepoint)
        self.syncs = synchronous == "FULL"  # commits are durable only once sync() returned
        self._wal: int | None = None  # a descriptor of the write-ahead log, opened by sync()
        #: the error of a failed fdatasync: every later sync fails too (see :meth:`sync`)
        self._sync_failed: OSError | None = None
        self._moved = False  # that error: the files were removed or replaced (_check_in_place)
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
                # the file as SQLite named it (absolute, a symbolic link followed): its log is
                # that name's "-wal" (not the path's, if that is a link), and a chdir later
                # changes neither
                self._where = db.execute("PRAGMA database_list").fetchone()[2] or os.path.abspath(
                    self.path
                )
                self._file_id = _file_id(os.stat(self._where))  # see _check_in_place
            except BaseException:
                db.close()
                raise
        return db

    def _release_file(self) -> None:
        if self._file_lock is not None:
            os.close(self._file_lock)
            self._file_lock = None

    def close(self) -> None:
        """Close the database; safe to call twice (not from a call of a group). After a failed
        sync the write-ahead log is left as it is (see :meth:`_close_without_checkpoint`)."""
        with self._lock:
            if self._in_transaction:
                raise LocalProtocolError("cannot close the journal from inside a group commit")
            if self._db is not None:
                if self._sync_failed is None or self._moved:  # (moved: see _check_in_place)
                    self._db.close()
                else:
                    self._close_without_checkpoint(self._db)
                self._db = None
                self._hot.clear()
            with self._sync_lock:
                if self._wal is not None:
                    os.close(self._wal)
                    self._wal = None
            self._release_file()  # last: another journal may open the file from now on

    def _close_without_checkpoint(self, db: sqlite3.Connection) -> None:
        """Close ``db`` leaving the write-ahead log as it is, after a failed sync.

        The last connection to close checkpoints the log into the database file and syncs that:
        after a failed ``fdatasync`` it would copy pages the kernel may have dropped into the
        database for good. A read-only connection that has read from the file is open while
        ``db`` closes (so ``db`` is not the last), and a read-only one does not checkpoint
        (``SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE`` is not reachable from Python 3.11's sqlite3).
        The next open recovers what of the log is whole."""
        try:
            reader = sqlite3.connect(
                f"{Path(self._where).as_uri()}?mode=ro", uri=True, isolation_level=None
            )
        except sqlite3.Error:
            db.close()  # no reader: the checkpoint cannot be avoided
            return
        try:
            reader.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error:
            pass  # it holds no read of the file: db's close checkpoints after all
        try:
            db.close()
        finally:
            reader.close()

    def sync(self) -> None:
        """Make every commit so far durable: ``fdatasync`` the write-ahead log (FULL; NORMAL:
        nothing). The log is appended to in commit order, so one sync covers every commit
        before it. Thread-safe; it runs beside the next group's statements on the connection.
        Raises ``OSError`` if the sync fails (those commits may then be lost), or the file or
        its log was found removed or replaced (:meth:`_check_in_place`), and from then on
        at every call: the kernel may drop the unwritten pages and report the error once, so a
        later sync that "succeeds" would not make the log durable (a lost frame ends SQLite's
        recovery of the log there, with every commit after it). Reopen the journal (restart)."""
        if not self.syncs:
            return
        with self._sync_lock:
            if self._sync_failed is not None:
                failed = self._sync_failed
                raise OSError(
                    failed.errno,
                    f"journal {self.path}: an earlier sync of its log failed ({failed}), so"
                    " commits since may be lost: restart the coordinator",
                )
            if self._db is None:
                return  # closed: closing the connection checkpointed and synced the log
            if self._wal is None:
                try:
                    self._wal = os.open(f"{self._where}-wal", os.O_RDONLY)  # (a chdir since)
                except FileNotFoundError:  # nothing committed in WAL mode yet
                    return
            try:
                os.fdatasync(self._wal)
                self._check_in_place()
            except OSError as exc:
                self._sync_failed = exc
                raise

    def _check_in_place(self) -> None:
        """``OSError`` if the database file or its write-ahead log was removed or replaced
        while open: SQLite goes on writing to the files it has open, and a sync of those makes
        nothing durable (the next open reads the files at the path; a removed log's commits
        are gone even after a mere process crash). Sticky, as a failed sync (see :meth:`sync`);
        but :meth:`close` then merges the log into the database file as usual: the log open
        here may be the only copy of its commits (a removed ``-wal``), and its pages are whole."""
        try:
            moved = os.fstat(self._wal).st_nlink == 0
            moved = moved or _file_id(os.stat(self._where)) != self._file_id
        except FileNotFoundError:
            moved = True
        if moved:
            self._moved = True
            raise OSError(
                errno.ENOENT, f"journal {self.path}: the file or its log was removed or replaced"
            )

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _forget_spec(self, task_id: str) -> None:
        old = self._specs.pop(task_id, None)
        if old is not None:
            self._spec_bytes -= len(old[0])


def _file_id(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _same_spec(known: bytes, spec: TaskSpec, blob: bytes) -> bool:
    """Whether the spec journaled as ``known`` is ``spec`` (encoded as ``blob``): the same
    bytes, or (the order of a params map's keys may differ) an equal spec whose params hold
    values of the same types too (``==`` takes ``True``, ``1`` and ``1.0`` for one value,
    which a model reading its params need not)."""
    if known == blob:
        return True
    journaled = decode_spec(known)
    return (
        journaled == spec
        and _same_types(journaled.params, spec.params)
        and all(
            _same_types(a.params, b.params)
            for a, b in zip(journaled.stages, spec.stages, strict=True)
        )
    )


def _same_types(a: Mapping[str, object], b: Mapping[str, object]) -> bool:
    """Whether the equal params ``a`` and ``b`` (flat: scalars only) hold values of the same
    types under each key."""
    return all(type(value) is type(b[key]) for key, value in a.items())
