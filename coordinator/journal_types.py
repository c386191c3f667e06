"""The journal's vocabulary: its errors, the records it hands out, what a group call returns,
and the task states as the SQL of every part of :class:`~coordinator.journal.Journal` uses them.

Everything here is importable from :mod:`coordinator.journal` as well (the names it always had).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshinfer.errors import MeshInferError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks import (
    TERMINAL_STATES,
    TRANSITIONS,
    InvalidTransition,
    TaskEvent,
    TaskSpec,
    TaskState,
)

__all__ = [
    "CallOutcome",
    "ItemRecord",
    "JournalError",
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
]

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


def item_ended(error: BaseException) -> bool:
    """Whether ``error`` is this journal refusing a step (a dispatch, a running mark) of an
    item that had already ended (succeeded, failed or cancelled): the expected end of a race
    when the step was told without waiting. The coordinator journals a dispatch that way (an
    overdue mark, or before a retry's failure) and hears of a task's end only once that end is
    durable, so a result or a cancel that ends the task can be queued just before the dispatch
    of one of its other items; nothing is lost. A step refused in any other state (e.g. a
    second dispatch of an item in flight) is a fault."""
    return isinstance(error, InvalidTransition) and error.state in TERMINAL_STATES
