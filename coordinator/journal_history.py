"""A task's audit log: the lines stored for it, and those its rows already say.

The plain course of a task -- submitted, each item's result (with the dispatch the result
vouched for, when the dispatch itself was not journaled), and its end -- is fully recorded by
its rows: the task row (created, its end state, when, why), the item rows (which node) and the
result rows (which attempt, from which node, when). Storing those lines as well (four rows a
task, in the ``events`` table and its index) was up to a quarter of the journal's work for a
task on the hot path, so they are not stored: :func:`read_history` reads them back from the
rows. What the rows do not keep is still stored as it happens: dispatches the
coordinator journaled, failures, retries, refusals, requeues after a restart. A dispatch line
also keeps its attempt and node as columns (schema version 4), which a restarted coordinator
reads (:func:`read_dispatches`) instead of the text meant for people.

Lines read back from the rows carry ``seq`` 0 (stored lines keep theirs, and their order); see
:func:`_merged` for where they go. A journal written before this (schema version 2 or older)
stored every line: a line stored is never read back a second time.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from meshinfer.proto.tasks import TERMINAL_STATES

__all__ = ["JournalEvent", "dispatch_detail", "read_dispatches", "read_history"]

_ENDINGS = frozenset(s.value for s in TERMINAL_STATES)


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
    results = db.execute(  # in the order they were accepted (a rowid only grows within a task)
        "SELECT r.item_id, r.attempt, r.node, r.received_at, i.node FROM results r"
        " JOIN items i ON i.id = r.item_id WHERE i.task_id = ? ORDER BY r.rowid",
        (task_id,),
    ).fetchall()
    return _merged(task_id, task, stored, results)


def _merged(task_id: str, task, stored: list[JournalEvent], results) -> list[JournalEvent]:
    """``stored`` (in their order) with the lines the rows say and no stored line does.

    The order leans on the wall clock only where nothing else tells: the submission comes
    first and the end last; each result (with the dispatch it vouched for) comes in the order
    the results were accepted, after the stored dispatch of its attempt, and among the other
    stored lines by time (before the first one stamped later). A clock that steps back can
    misplace a result among unrelated lines, never before its own dispatch."""
    created_at, state, updated_at, error, items = task
    own = {e.kind for e in stored if e.item_id is None}  # the task's own lines
    sent = {
        (e.item_id, _attempt(e.detail)): n for n, e in enumerate(stored) if e.kind == "dispatched"
    }
    answered = {e.item_id for e in stored if e.kind == "result"}
    lines: list[JournalEvent] = []
    if "submitted" not in own:
        lines.append(JournalEvent(0, created_at, task_id, None, "submitted", f"{items} items"))
    emitted = 0  # stored lines already in ``lines``
    for item_id, attempt, node, received_at, sent_to in results:
        dispatch = sent.get((item_id, str(attempt)))
        told = []
        if dispatch is None:  # vouched for by the result: the rows say where it went
            detail = dispatch_detail(attempt, sent_to)
            told.append(JournalEvent(0, received_at, task_id, item_id, "dispatched", detail))
        if item_id not in answered:
            detail = f"attempt {attempt}" + (f" from {node}" if node else "")
            told.append(JournalEvent(0, received_at, task_id, item_id, "result", detail))
        end = max(emitted, 0 if dispatch is None else dispatch + 1)
        while end < len(stored) and stored[end].at <= received_at:
            end += 1
        lines += stored[emitted:end]
        lines += told
        emitted = end
    lines += stored[emitted:]
    if state in _ENDINGS and state not in own:
        lines.append(JournalEvent(0, updated_at, task_id, None, state, (error or "")[:500]))
    return lines


def read_dispatches(db: sqlite3.Connection, task_id: str) -> dict[str, set[tuple[int, str]]]:
    """Per item id of one task, the (attempt, node) of each stored dispatch line: its columns
    (schema version 4), or for a line stored before them its detail text
    (:func:`dispatch_sent`)."""
    sends: dict[str, set[tuple[int, str]]] = {}
    rows = db.execute(
        "SELECT item_id, attempt, node, detail FROM events"
        " WHERE task_id = ? AND kind = 'dispatched' AND item_id IS NOT NULL",
        (task_id,),
    )
    for item_id, attempt, node, detail in rows:
        sent = (attempt, node) if attempt is not None else dispatch_sent(detail)
        if sent is not None and sent[1] is not None:
            sends.setdefault(item_id, set()).add(sent)
    return sends


def dispatch_detail(attempt: int, node: str | None) -> str:
    """A dispatch line's detail, stored or read back (:func:`_attempt` reads it)."""
    return f"attempt {attempt} to {node}"


def dispatch_sent(detail: str) -> tuple[int, str] | None:
    """The (attempt, node) a dispatch line's detail names (:func:`dispatch_detail`'s inverse),
    or None if it names none."""
    words = detail.split(" ", 3)  # "attempt 2 to node-1"
    if len(words) != 4 or words[0] != "attempt" or words[2] != "to":
        return None
    if not (words[1].isascii() and words[1].isdigit()):
        return None
    return int(words[1]), words[3]


def _attempt(detail: str) -> str:
    """The attempt a dispatch line names (``"attempt 2 to node-1"`` -> ``"2"``)."""
    words = detail.split(" ", 2)
    return words[1] if len(words) > 1 and words[0] == "attempt" else ""
