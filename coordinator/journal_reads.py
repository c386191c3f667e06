"""Reading the journal: a part of :class:`~coordinator.journal.Journal` (the rules are in
:mod:`coordinator.journal`).

:class:`JournalReads` is a mixin of ``Journal`` and works on its state (see
``Journal.__init__``); each read is one snapshot (``_read``: inside a group, the group's, with
its earlier writes). It reads a task back (``get``: one query for the task and its items), lists
tasks a page at a time (keyset pagination on ``tasks.seq``), and reads a task's audit log
(:mod:`coordinator.journal_history`) and the journal's counts. :func:`read_stats` reads those
counts from any thread, on a read-only connection of its own.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

from coordinator.journal_files import check_readable, explained
from coordinator.journal_history import JournalEvent, read_dispatches, read_history
from coordinator.journal_schema import check_is_journal
from coordinator.journal_types import (
    ItemRecord,
    JournalStats,
    TaskPage,
    TaskRecord,
    TaskSummary,
    UnknownTaskError,
)
from meshinfer.errors import ConfigError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks import TaskState

__all__ = ["MAX_PAGE", "JournalReads", "read_stats"]

#: Tasks per page of :meth:`JournalReads.list` at most.
MAX_PAGE = 1000
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


class JournalReads:
    """Reading the journal (a mixin of ``Journal``: see the module docstring)."""

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
        if type(limit) is not int or not 1 <= limit <= MAX_PAGE:  # (2.5: an SQL error)
            raise ConfigError(f"limit {limit!r} is not a whole number in 1..{MAX_PAGE}")
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
        if isinstance(since, bool) or not isinstance(since, int | float):
            raise ConfigError(f"since {since!r} is not a time (seconds since the epoch)")
        try:
            since = float(since)
        except OverflowError:  # an int beyond any float (its repr may be refused too)
            raise ConfigError(f"since ({since.bit_length()} bits) is no time") from None
        if not math.isfinite(since):  # NaN would match nothing, silently
            raise ConfigError(f"since {since!r} is not a finite time")
        clauses.append("t.created_at >= ?")
        args.append(since)
    if cursor is not None:
        ok = cursor.isascii() and cursor.isdigit() and len(cursor) <= 19  # not "²"
        if not ok or int(cursor) >= 1 << 63:  # (SQLite's integers are 64-bit)
            raise ConfigError(f"cursor {cursor!r} is not one this journal handed out")
        clauses.append("t.seq < ?")
        args.append(int(cursor))
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args


def _summary(row) -> TaskSummary:
    return TaskSummary(row[0], TaskState(row[1]), *row[2:10])


def _item(row) -> ItemRecord:
    return ItemRecord(
        row[0], row[1], row[2], ModelRef(row[3], row[4]), row[5], TaskState(row[6]),
        row[7], row[8], row[9], None if row[10] is None else bytes(row[10]), row[11], row[12],
    )  # fmt: skip
