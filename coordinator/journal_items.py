"""Work items' progress: a part of :class:`~coordinator.journal.Journal` (the rules are in
:mod:`coordinator.journal`).

:class:`ItemProgress` is a mixin of ``Journal`` and works on its state (see
``Journal.__init__``) through its transactions (:mod:`coordinator.journal_transactions`). It
journals the steps of an item's life on the ordinary path -- a dispatch, a node's acceptance,
a result (exactly once: :func:`_judge_result`), a failure -- each as a conditional write whose
row count says whether it applied; only a refused step reads why. A step that touches an item
of a hot task first drops that task from memory (:mod:`coordinator.journal_hot`).
"""

from __future__ import annotations

import sqlite3
from typing import NoReturn

from coordinator.journal_history import dispatch_detail
from coordinator.journal_types import _DISPATCHABLE, _IN_FLIGHT, _WAITING, UnknownTaskError
from meshinfer.errors import LocalProtocolError
from meshinfer.proto.tasks import TERMINAL_STATES, TRANSITIONS, TaskEvent, TaskState, transition

__all__ = ["ItemProgress"]


class ItemProgress:
    """Work items' progress (a mixin of ``Journal``: see the module docstring)."""

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

    def _record_result(self, item_id, attempt, blob, node, sent_to, *, advance: bool) -> bool:
        """Journal the item's result the ordinary way, once (see ``Journal.record_result``,
        which :mod:`coordinator.journal_ends` builds on this); ``advance=False`` leaves the
        task's row alone (the caller ends the task in the same transaction)."""
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
            except sqlite3.IntegrityError as exc:  # belt and braces: the primary key says "once"
                if exc.sqlite_errorname != "SQLITE_CONSTRAINT_PRIMARYKEY":
                    raise  # not a second result (a blob of None): no duplicate to count
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
