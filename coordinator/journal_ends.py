"""Tasks' ends: a part of :class:`~coordinator.journal.Journal` (the rules are in
:mod:`coordinator.journal`).

:class:`TaskEnds` is a mixin of ``Journal`` and works on its state (see ``Journal.__init__``)
through its transactions (:mod:`coordinator.journal_transactions`). It journals how a task
ends: cancelled, or finished as the coordinator decided (``end_task``), possibly with the
result that decides it (``take_result``, one call; ``record_result`` is it without an end). A
result for a hot task is taken from memory and its rows staged (``_take_hot``, ``_end_hot``:
see :mod:`coordinator.journal_hot`); any other takes the ordinary path
(:mod:`coordinator.journal_items`' ``_record_result``, ``_close_task``). The dependency is one
way: this module builds on :mod:`coordinator.journal_items`, which never calls back here.
"""

from __future__ import annotations

from coordinator.journal_hot import HotItem, HotTask
from coordinator.journal_items import _judge_result
from coordinator.journal_types import (
    _FINISHED,
    _IN_FLIGHT,
    _LIVE,
    _WAITING,
    ItemRecord,
    TaskEnd,
    TaskEnding,
    TaskRecord,
    TaskSummary,
    UnknownTaskError,
)
from meshinfer.errors import LocalProtocolError
from meshinfer.proto.tasks import TERMINAL_STATES, TRANSITIONS, TaskEvent, TaskState, transition

__all__ = ["TaskEnds"]


class TaskEnds:
    """Tasks' ends (a mixin of ``Journal``: see the module docstring)."""

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
        if state not in _FINISHED:
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
        ``mark_dispatched`` may not be journaled (the coordinator journals a dispatch only
        once its result is overdue): an item still waiting at that attempt is then taken as
        dispatched there, in this same call.
        """
        return self.take_result(item_id, attempt, blob, node=node, sent_to=sent_to)[0]

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
