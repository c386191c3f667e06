"""Transactions and group commits: a part of :class:`~coordinator.journal.Journal` (the rules are
in :mod:`coordinator.journal`, "Group commit").

:class:`JournalTransactions` is a mixin of ``Journal`` and works on its state (``_db``, ``_lock``,
``_in_transaction``, ``_events``, ``_staged``, ``_hot`` and the flush counters: see
``Journal.__init__``). It holds

* one transaction for a lone call (``_write``, ``_read``), which a call inside a group or
  another write joins instead;
* :meth:`~JournalTransactions.commit_group`: several calls in one transaction, each as if in a
  savepoint, first without any (``_undo_free``), again with real ones (``_in_savepoint``) only
  if a call raised after writing;
* what a transaction holds back until it needs it: the staged rows of the hot path
  (:mod:`coordinator.journal_hot`) and the audit lines (``_log``), written by ``_flush``, and
  dropped when it rolls back (``_roll_back``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

from coordinator.journal_types import CallOutcome, TransientJournalError
from meshinfer.errors import LocalProtocolError

__all__ = ["JournalTransactions"]

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


class JournalTransactions:
    """Transactions and group commits (a mixin of ``Journal``: see the module docstring)."""

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
            except BaseException:
                if db.in_transaction:  # SQLite may have ended it already (the error's cause)
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise  # the read's own error, not one of ending its snapshot
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
        again with a real ``SAVEPOINT`` around each call -- or if SQLite refused a row held back
        for the group (too big, unbindable: see :meth:`_flush`), which fails its call alone.
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
        self._refused = None
        try:
            run = self._in_savepoint if savepoints else self._undo_free
            outcomes = []
            for call in calls:
                outcome = run(db, call)
                if outcome is None or self._refused is not None:  # (refused: see _flush)
                    self._roll_back(db)
                    return None
                if not db.in_transaction:  # SQLite rolled it all back (I/O error, disk full)
                    lost = f"the group's transaction was lost: {outcome.error}"
                    raise TransientJournalError(lost) from outcome.error
                outcomes.append(outcome)
            try:
                self._flush(db)
            except Exception:
                if self._refused is None or savepoints:
                    raise
                return None  # whose rows SQLite refused: the run with savepoints tells
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
        self._in_call = True
        try:
            value = call()
            self._flush(db)  # its staged rows, in its savepoint: refused, they go with it
            if self._refused is not None:  # refused in a flush whose error the call caught
                raise self._refused
        except Exception as exc:
            self._forget_unwritten()
            self._refused = None
            if not db.in_transaction:  # SQLite rolled the group back: the group fails
                return CallOutcome(error=exc)
            db.execute("ROLLBACK TO call")
            db.execute("RELEASE call")
            return CallOutcome(error=exc)
        finally:
            self._in_call = False
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
        it must not commit without them) and the error raised -- but inside a call's savepoint
        (``_in_savepoint``) only what the call held is dropped: the savepoint undoes its rows.

        A failure that left SQLite's transaction open (a row refused: "string or blob too
        big", a constraint; not an I/O error or a full disk, which end it) is kept in
        ``_refused``: a group then runs again with savepoints, in which each call's rows are
        written before its savepoint is released, so that only the call whose rows were
        refused fails (not every call of its group)."""
        if not (self._staged or self._events):
            return
        before = db.total_changes
        try:
            self._staged.flush(db)
            self._write_events(db)
        except BaseException as exc:
            if db.in_transaction and isinstance(exc, Exception):
                self._refused = exc
            if self._in_call and db.in_transaction:
                self._forget_unwritten()  # its rows: ROLLBACK TO undoes what of them went in
            else:
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


def _has_json(db: sqlite3.Connection) -> bool:
    """Whether this SQLite has the JSON functions (built in since 3.38, usually before)."""
    try:
        db.execute("SELECT value FROM json_each('[1]')").fetchall()
    except sqlite3.OperationalError:
        return False
    return True
