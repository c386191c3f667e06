"""The journal's hot path: live tasks known in memory, and their rows written once per group.

A task's life on the hot path is two journal calls: ``accept`` and the result that ends it
(``take_result``). Done the ordinary way, the result alone costs six statements (read the item,
insert the result, update the item, close the task, look for live items, read the task back),
and every statement releases the GIL to the event loop and waits to get it back. So:

* :class:`HotTasks` keeps the tasks this journal accepted, while they are live and touched only
  by the hot path, as the rows hold them. A result for one of their items is judged, and the
  task read back, from memory. Any other write to a task (a dispatch, a failure, a cancel,
  recovery, a rolled-back call) first drops it from memory, so a task in memory is always what
  its rows say; a task not in memory takes the ordinary path, which reads the rows.
* :class:`StagedRows` holds the rows those calls write until the transaction needs them: before
  any other statement of the transaction reads or writes (so that it sees them), and before its
  ``COMMIT``. Then they go in a few multi-row statements (one per table and up to 128 rows), not
  one statement per row: a group of 64 results costs three statements, not 256.

Both are the journal's own state: it takes its lock around them, and clears them when a
transaction (or a savepoint) rolls back.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from functools import lru_cache

from meshinfer.proto.tasks import ItemOutline, TaskSpec, TaskState

__all__ = ["HOT_ITEMS", "HotItem", "HotTask", "HotTasks", "StagedRows"]

#: Items of live tasks kept in memory at most (a task whose items would not fit takes the
#: ordinary path); about 300 bytes each.
HOT_ITEMS = 65536
#: Rows per multi-row statement: a power of two whose parameters (up to 7 a row) stay within
#: the 999 that SQLite before 3.32 allows.
ROWS_PER_STATEMENT = 128
#: ``UPDATE ... FROM`` (SQLite 3.33): one statement updates many rows, each with its own values.
UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33)


@dataclass(slots=True)
class HotItem:
    """A work item as its row says (with its result, once taken)."""

    outline: ItemOutline
    state: TaskState
    attempt: int = 1
    node: str | None = None
    result: bytes | None = None
    result_attempt: int | None = None
    error: str | None = None  # set only as its task's end cancels it


@dataclass(slots=True)
class HotTask:
    """A live task as its row says; ``items`` in position order."""

    spec: TaskSpec
    created_at: float
    updated_at: float
    state: TaskState
    items: dict[str, HotItem]


class HotTasks:
    """Live tasks known in memory, by task id and by item id (at most ``limit`` items)."""

    def __init__(self, limit: int = HOT_ITEMS) -> None:
        self.limit = limit
        self._tasks: dict[str, HotTask] = {}
        self._task_of: dict[str, str] = {}  # item id -> task id

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, task_id: str, task: HotTask) -> None:
        """Keep ``task`` (just journaled) if its items fit."""
        if len(self._task_of) + len(task.items) > self.limit:
            return
        self._tasks[task_id] = task
        for item_id in task.items:
            self._task_of[item_id] = task_id

    def of_item(self, item_id: str) -> tuple[str, HotTask, HotItem] | None:
        """The task id, task and item of a hot item, or None."""
        task_id = self._task_of.get(item_id)
        if task_id is None:
            return None
        task = self._tasks[task_id]
        return task_id, task, task.items[item_id]

    def drop(self, task_id: str) -> None:
        """Forget the task (its rows are about to change another way, or it ended)."""
        task = self._tasks.pop(task_id, None)
        if task is not None:
            for item_id in task.items:
                del self._task_of[item_id]

    def drop_item(self, item_id: str) -> None:
        """Forget the task of the item, if it is kept."""
        task_id = self._task_of.get(item_id)
        if task_id is not None:
            self.drop(task_id)

    def clear(self) -> None:
        self._tasks.clear()
        self._task_of.clear()


class StagedRows:
    """Rows written by hot-path calls of the open transaction, not yet given to SQLite."""

    __slots__ = ("item_states", "items", "results", "serial", "task_states", "update_from")

    def __init__(self, *, update_from: bool = UPDATE_FROM) -> None:
        #: update many rows per statement (else one statement per row; SQLite < 3.33)
        self.update_from = update_from
        #: new items: (id, task id, position, model id, model version, stage, updated at)
        self.items: list[tuple[object, ...]] = []
        #: (item id, attempt, node, blob, received at)
        self.results: list[tuple[object, ...]] = []
        #: item id -> (state, node, error, updated at); the last one staged wins
        self.item_states: dict[str, tuple[object, ...]] = {}
        #: task id -> (state, summary, error, updated at); the last one staged wins
        self.task_states: dict[str, tuple[object, ...]] = {}
        #: grows with every row staged (so a caller can tell whether a call staged anything)
        self.serial = 0

    def __bool__(self) -> bool:
        return bool(self.items or self.results or self.item_states or self.task_states)

    def clear(self) -> None:
        self.items.clear()
        self.results.clear()
        self.item_states.clear()
        self.task_states.clear()

    def flush(self, db: sqlite3.Connection) -> None:
        """Write the staged rows (items before the results that refer to them)."""
        _in_chunks(db, _ITEMS, self.items)
        _in_chunks(db, _RESULTS, self.results)
        for table, staged in ((_ITEM_STATES, self.item_states), (_TASK_STATES, self.task_states)):
            rows = [(key, *values) for key, values in staged.items()]
            if self.update_from:
                _in_chunks(db, table, rows)
            else:
                db.executemany(table.single, rows)
        self.clear()  # (if a statement failed, the journal rolls back and clears them)


@dataclass(frozen=True, slots=True)
class _Table:
    head: str  # the statement up to its rows
    row: str  # one row's placeholders
    tail: str = ""  # after the rows
    single: str = ""  # an update of one row (without FROM)


_ITEMS = _Table(
    "INSERT INTO items (id, task_id, position, model_id, model_version, stage, state, attempt,"
    " updated_at) VALUES ",
    "(?, ?, ?, ?, ?, ?, 'pending', 1, ?)",
)
_RESULTS = _Table(
    "INSERT INTO results (item_id, attempt, node, blob, received_at) VALUES ",
    "(?, ?, ?, ?, ?)",
)
_ITEM_STATES = _Table(
    "UPDATE items SET state = v.column2, node = v.column3, error = v.column4,"
    " updated_at = v.column5 FROM (VALUES ",
    "(?, ?, ?, ?, ?)",
    ") AS v WHERE items.id = v.column1",
    "UPDATE items SET state = ?2, node = ?3, error = ?4, updated_at = ?5 WHERE id = ?1",
)
_TASK_STATES = _Table(
    "UPDATE tasks SET state = v.column2, summary = v.column3, error = v.column4,"
    " updated_at = v.column5 FROM (VALUES ",
    "(?, ?, ?, ?, ?)",
    ") AS v WHERE tasks.id = v.column1",
    "UPDATE tasks SET state = ?2, summary = ?3, error = ?4, updated_at = ?5 WHERE id = ?1",
)


@lru_cache(maxsize=64)
def _statement(table: _Table, rows: int) -> str:
    return table.head + ", ".join([table.row] * rows) + table.tail


def _chunks(rows: list[tuple[object, ...]]):
    """``rows`` in slices of power-of-two lengths (few distinct statements to prepare)."""
    start = 0
    while start < len(rows):
        size = min(ROWS_PER_STATEMENT, 1 << ((len(rows) - start).bit_length() - 1))
        yield rows[start : start + size]
        start += size


def _in_chunks(db: sqlite3.Connection, table: _Table, rows: list[tuple[object, ...]]) -> None:
    """Write ``rows`` with one multi-row statement per chunk."""
    for chunk in _chunks(rows):
        db.execute(_statement(table, len(chunk)), [value for row in chunk for value in row])
