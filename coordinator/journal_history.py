"""A task's audit log: the lines stored for it, and those its rows already say.

The plain course of a task -- submitted, each item's result (with the dispatch the result
vouched for, when the dispatch itself was not journaled), and its end -- is fully recorded by
its rows: the task row (created, its end state, when, why), the item rows (which node) and the
result rows (which attempt, from which node, when). Storing those lines as well (four rows a
task, in the ``events`` table and its index) was up to a quarter of the journal's work for a
task on the hot path, so they are not stored: :func:`read_history` reads them
back from the rows. What the rows do not keep is still stored as it happens: dispatches the
coordinator journaled, failures, retries, refusals, requeues after a restart.

Lines read back from the rows carry ``seq`` 0 (stored lines keep theirs) and are placed among
the stored ones by time (the same wall clock stamps both); the stored lines keep their order. A
journal written before this stored every line: a line stored is never read back a second time.
"""

from __future__ import annotations

import heapq
import sqlite3
from dataclasses import dataclass

from meshinfer.proto.tasks import TERMINAL_STATES

__all__ = ["JournalEvent", "read_history"]

_ENDINGS = frozenset(s.value for s in TERMINAL_STATES)
#: Among lines stamped alike: submitted, stored lines, a dispatch, its result, the end.
_SUBMITTED, _STORED, _DISPATCHED, _RESULT, _END = range(5)


@dataclass(frozen=True, slots=True)
class JournalEvent:
    """One line of the audit log (``seq`` 0: read back from the task's rows, not stored)."""

    seq: int
    at: float
    task_id: str | None
    item_id: str | None
    kind: str
    detail: str


def read_history(db: sqlite3.Connection, task_id: str) -> list[JournalEvent]:
    """The audit log of one task, oldest first (empty for an unknown task)."""
    task = db.execute(
        "SELECT created_at, state, updated_at, error,"
        " (SELECT count(*) FROM items WHERE task_id = ?1) FROM tasks WHERE id = ?1",
        (task_id,),
    ).fetchone()
    stored = [
        JournalEvent(*row)
        for row in db.execute(
            "SELECT seq, at, task_id, item_id, kind, detail FROM events WHERE task_id = ?"
            " ORDER BY seq",
            (task_id,),
        )
    ]
    if task is None:
        return stored
    results = db.execute(
        "SELECT r.item_id, r.attempt, r.node, r.received_at, i.node FROM results r"
        " JOIN items i ON i.id = r.item_id WHERE i.task_id = ? ORDER BY r.received_at",
        (task_id,),
    ).fetchall()
    derived = _from_rows(task_id, task, results, stored)
    keyed = heapq.merge(
        ((e.at, _STORED, e) for e in stored),
        derived,
        key=lambda line: line[:2],
    )
    return [line[2] for line in keyed]


def _from_rows(task_id: str, task, results, stored: list[JournalEvent]):
    """The lines the rows say and no stored line does, as ``(at, rank, line)`` in order."""
    created_at, state, updated_at, error, items = task
    kinds = {e.kind for e in stored if e.item_id is None}  # the task's own lines
    dispatched = {(e.item_id, _attempt(e.detail)) for e in stored if e.kind == "dispatched"}
    answered = {e.item_id for e in stored if e.kind == "result"}
    lines = []
    if "submitted" not in kinds:
        line = JournalEvent(0, created_at, task_id, None, "submitted", f"{items} items")
        lines.append((created_at, _SUBMITTED, line))
    for item_id, attempt, node, received_at, sent_to in results:
        if (item_id, str(attempt)) not in dispatched:  # vouched for by the result
            detail = f"attempt {attempt} to {sent_to}"
            line = JournalEvent(0, received_at, task_id, item_id, "dispatched", detail)
            lines.append((received_at, _DISPATCHED, line))
        if item_id not in answered:
            detail = f"attempt {attempt}" + (f" from {node}" if node else "")
            line = JournalEvent(0, received_at, task_id, item_id, "result", detail)
            lines.append((received_at, _RESULT, line))
    if state in _ENDINGS and state not in kinds:
        line = JournalEvent(0, updated_at, task_id, None, state, (error or "")[:500])
        lines.append((updated_at, _END, line))
    lines.sort(key=lambda line: line[:2])
    return lines


def _attempt(detail: str) -> str:
    """The attempt a dispatch line names (``"attempt 2 to node-1"`` -> ``"2"``)."""
    words = detail.split(" ", 2)
    return words[1] if len(words) > 1 and words[0] == "attempt" else ""
