"""The task model: what an operator submits, the work items it splits into, and their states.

A :class:`TaskSpec` names a model (or several), an input tensor, parameters, a time budget, a
priority and a *pattern*:

* ``single``   -- one model, one input: one work item;
* ``parallel`` -- the same input through several models: one item per model (their outputs
  are aggregated, see :mod:`meshinfer.proto.aggregation`);
* ``batch``    -- one model, many rows: the rows are sharded into chunks of ``shard_size``, one
  item per shard, sent to different nodes; the outputs are concatenated in shard order;
* ``pipeline`` -- stages forming a DAG, the output of one stage feeding the next
  (:class:`~meshinfer.proto.tasks_pipeline.PipelinePlan`).

:func:`plan` turns a single/parallel/batch spec into its :class:`WorkItem` s; :func:`outline`
lists the item ids of any spec (what the journal stores before anything ran). Item ids are
``"<task_id>/<index>"``, or ``"<task_id>/<stage>"`` for pipelines.

State machine of a work item (and of a task). Transitions are data (:data:`TRANSITIONS`);
:func:`transition` applies one and raises :class:`InvalidTransition` for anything else::

                 +-------------------- requeue -------------------+
                 v                                                 |
    pending --dispatch--> dispatched --accept--> running ----------+
       ^                   |      |                 |
       |                   |      +----retry--------+--> retrying --dispatch--> dispatched
       |                   +---------succeed--------+------------------------> succeeded
       |                   +---------fail-----------+------------------------> failed
       +--- (any live state) --cancel---------------------------------------> cancelled

``succeeded``, ``failed`` and ``cancelled`` are terminal. ``retry`` is a retryable failure (the
next dispatch carries attempt + 1, usually to another node); ``requeue`` voids a dispatch whose
outcome is unknown (the coordinator restarted) and puts the item back to ``pending``. A result
may overtake the node's accept (dispatched -> succeeded), and a late result of an earlier
attempt may arrive while the item waits again (pending/retrying -> succeeded); pending and
retrying items can also fail outright (no node can take them, attempts exhausted).
"""

from __future__ import annotations

import enum
import functools
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from meshinfer.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from meshinfer.proto.aggregation import Mode
from meshinfer.proto.models import ModelRef, models_named
from meshinfer.proto.scheduling import Policy
from meshinfer.proto.tasks_wire import (
    MAX_PARAMS,
    MAX_PARAMS_BYTES,
    MAX_PRIORITY,
    MAX_TENSOR_BYTES,
    MIN_PRIORITY,
    ParamValue,
    TaskAssign,
    Tensor,
    check_params,
    decode_params,
    encode_params,
    is_text,
    unpack_array,
)

__all__ = [
    "DEFAULT_SHARD_ROWS",
    "MAX_BATCH_INPUT_BYTES",
    "MAX_BATCH_ITEMS",
    "MAX_DEADLINE_S",
    "MAX_PRIORITY",
    "MAX_STAGES",
    "MIN_PRIORITY",
    "NAME_PATTERN",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "InvalidTaskError",
    "InvalidTransition",
    "ItemOutline",
    "Pattern",
    "Stage",
    "TaskEvent",
    "TaskSpec",
    "TaskState",
    "WorkItem",
    "check_aggregation_mode",
    "check_aggregation_used",
    "check_sendable",
    "models_named",
    "new_task_id",
    "outline",
    "plan",
    "stage_order",
    "transition",
    "with_aggregation_mode",
]

#: A batch task's whole input may be this large (each shard still fits one message).
MAX_BATCH_INPUT_BYTES = 256 * 1024 * 1024
#: At most this many stages in a pipeline, and this many models in a parallel task.
MAX_STAGES = 64
#: A new batch task splits into at most this many items (rows / shard size; checked at submit
#: by :func:`check_sendable`): each item costs the coordinator a journal row and ~1 KiB, so a
#: small input of one-byte rows in one-row shards would otherwise cost it gigabytes.
MAX_BATCH_ITEMS = 65536
#: A task's ``deadline_s`` and ``aggregation_timeout_s`` may be at most this (30 days), so the
#: coordinator's and nodes' timers and the task documents never take an absurd value (1e308).
#: A spec journaled before this bound with a longer one reads back with the bound
#: (:func:`~meshinfer.proto.tasks_codec.decode_spec`), so it still recovers.
MAX_DEADLINE_S = 30 * 24 * 3600.0
#: Rows per shard of a batch task when the spec gives no ``shard_size`` (less if rows are big).
DEFAULT_SHARD_ROWS = 256
#: A task id or a stage name is the whole of a string that this regular expression matches
#: (1-64 characters; unanchored: :func:`re.fullmatch` it, or anchor it as ``^...$``, as the
#: coordinator's OpenAPI document does).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
_NAME = re.compile(NAME_PATTERN)
_MAX_MODEL_LEN = 128


class InvalidTaskError(ConfigError):
    """A submitted task is invalid; the message names the task and the field or stage."""


# --- states ----------------------------------------------------------------------------------


class TaskState(enum.StrEnum):
    """Where a work item (or task) is in its life; see the module docstring."""

    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskEvent(enum.StrEnum):
    """What can happen to a work item."""

    DISPATCH = "dispatch"
    ACCEPT = "accept"
    SUCCEED = "succeed"
    FAIL = "fail"
    RETRY = "retry"
    CANCEL = "cancel"
    REQUEUE = "requeue"


_S, _E = TaskState, TaskEvent
#: ``(state, event) -> new state``; every pair not listed is an invalid transition.
TRANSITIONS: Mapping[tuple[TaskState, TaskEvent], TaskState] = {
    (_S.PENDING, _E.DISPATCH): _S.DISPATCHED,
    (_S.PENDING, _E.SUCCEED): _S.SUCCEEDED,  # a late result of an attempt before a requeue
    (_S.PENDING, _E.FAIL): _S.FAILED,
    (_S.PENDING, _E.CANCEL): _S.CANCELLED,
    (_S.DISPATCHED, _E.ACCEPT): _S.RUNNING,
    (_S.DISPATCHED, _E.SUCCEED): _S.SUCCEEDED,
    (_S.DISPATCHED, _E.FAIL): _S.FAILED,
    (_S.DISPATCHED, _E.RETRY): _S.RETRYING,
    (_S.DISPATCHED, _E.CANCEL): _S.CANCELLED,
    (_S.DISPATCHED, _E.REQUEUE): _S.PENDING,
    (_S.RUNNING, _E.SUCCEED): _S.SUCCEEDED,
    (_S.RUNNING, _E.FAIL): _S.FAILED,
    (_S.RUNNING, _E.RETRY): _S.RETRYING,
    (_S.RUNNING, _E.CANCEL): _S.CANCELLED,
    (_S.RUNNING, _E.REQUEUE): _S.PENDING,
    (_S.RETRYING, _E.DISPATCH): _S.DISPATCHED,
    (_S.RETRYING, _E.SUCCEED): _S.SUCCEEDED,  # a late result of the attempt that failed
    (_S.RETRYING, _E.FAIL): _S.FAILED,
    (_S.RETRYING, _E.CANCEL): _S.CANCELLED,
}
#: States with no way out.
TERMINAL_STATES = frozenset({_S.SUCCEEDED, _S.FAILED, _S.CANCELLED})


class InvalidTransition(LocalProtocolError):
    """``event`` is not allowed in ``state`` (the caller should have checked)."""

    def __init__(self, state: TaskState, event: TaskEvent) -> None:
        super().__init__(f"cannot {event.value} a task item that is {state.value}")
        self.state = state
        self.event = event


def transition(state: TaskState, event: TaskEvent) -> TaskState:
    """The state after ``event`` in ``state``; :class:`InvalidTransition` if not allowed."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(TaskState(state), TaskEvent(event)) from None


# --- specs -----------------------------------------------------------------------------------


class Pattern(enum.StrEnum):
    """How a task decomposes into work items (module docstring)."""

    SINGLE = "single"
    PARALLEL = "parallel"
    BATCH = "batch"
    PIPELINE = "pipeline"


@dataclass(frozen=True, slots=True)
class Stage:
    """One pipeline stage: ``model`` runs on the outputs of the stages named in ``after``.

    A stage with no ``after`` reads the task's input; with one, that stage's output; with
    several, their outputs concatenated along the last axis, in ``after`` order. ``params``
    are merged over the task's params for this stage's item.
    """

    name: str
    model: ModelRef
    after: tuple[str, ...] = ()
    params: Mapping[str, ParamValue] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A submitted job. Treat ``params`` as read-only.

    ``models``: exactly one for single and batch, one or more (distinct) for parallel, none for
    pipeline (its ``stages`` name theirs). ``deadline_s``: the time budget in seconds from
    acceptance, at most :data:`MAX_DEADLINE_S` (None: no deadline). ``priority``: larger runs
    first. ``policy`` and ``aggregation``: a :class:`~meshinfer.proto.scheduling.Policy` and
    :class:`~meshinfer.proto.aggregation.Mode` value, None for the coordinator's default.
    ``shard_size``: rows per item of a batch task (None: :data:`DEFAULT_SHARD_ROWS`, fewer when
    rows are large).

    Aggregation options, for a parallel task only (None / empty: the default):
    ``quorum`` (ensemble only) -- outputs that complete it, 1..len(models) (default: every
    model); ``min_responses`` -- outputs that still make a partial result when it times out or
    models fail, 1..len(models) (default 1); ``aggregation_timeout_s`` -- seconds from
    acceptance the aggregation waits, positive and at most ``deadline_s`` and
    :data:`MAX_DEADLINE_S` (default: the deadline); ``weights`` (weighted and ensemble only)
    -- a positive, finite weight per model of ``models`` (a model not named weighs 1). An
    ``aggregation`` of None takes the coordinator's default mode; a spec with a quorum or
    weights gets it written in at submit (:func:`with_aggregation_mode`) so the mode they need
    is checked before it is journaled.

    Call :meth:`validate` (``plan`` does) before trusting a spec from a user.
    """

    task_id: str
    pattern: Pattern
    inputs: Tensor
    models: tuple[ModelRef, ...] = ()
    stages: tuple[Stage, ...] = ()
    params: Mapping[str, ParamValue] = field(default_factory=dict, hash=False)
    deadline_s: float | None = None
    priority: int = 0
    policy: str | None = None
    aggregation: str | None = None
    shard_size: int | None = None
    quorum: int | None = None
    min_responses: int | None = None
    aggregation_timeout_s: float | None = None
    weights: Mapping[ModelRef, float] = field(default_factory=dict, hash=False)

    def validate(self) -> None:
        """Raise :class:`InvalidTaskError` naming the first invalid field or stage."""
        checks = (_check_header, _check_inputs, _check_models, _check_options, _check_aggregation)
        for check in checks:
            problem = check(self)
            if problem is not None:
                raise InvalidTaskError(f"task {self.task_id!r:.80}: {problem}")
        if self.pattern == Pattern.PIPELINE:
            stage_order(self)


#: Bits of a generated task id that carry its creation time (milliseconds since the epoch:
#: enough until the year 10889); the other 80 are drawn at random.
TIME_BITS = 48
RANDOM_BITS = 128 - TIME_BITS


def new_task_id(rng: random.Random, now: float) -> str:
    """A fresh 128-bit task id (32 hex digits), ordered by creation time: its first 48 bits
    are ``now`` (seconds since the epoch) in milliseconds, the other 80 are drawn from
    ``rng``, as in a version-7 UUID.

    Ordered ids keep the journal's indexes on task and item ids growing at one end: a commit
    of many new tasks then rewrites a few B-tree pages, where uniformly random ids rewrite
    about one page per task and index (docs/performance.md has the cost). Two ids of the same
    millisecond are still distinct with probability 1 - 2^-80; a clock that steps back only
    costs that ordering.
    """
    millis = min(max(int(now * 1000), 0), (1 << TIME_BITS) - 1)
    return f"{millis:012x}{rng.getrandbits(RANDOM_BITS):020x}"


def _is_value(value: object, choices: type[enum.StrEnum]) -> bool:
    return isinstance(value, str) and value in _values(choices)


@functools.cache
def _values(choices: type[enum.StrEnum]) -> frozenset[str]:
    return frozenset(c.value for c in choices)


def _check_name(what: str, name: object) -> str | None:
    if type(name) is not str or not _NAME.fullmatch(name):
        return f"{what} {name!r:.80} must match {_NAME.pattern}"
    return None


def _check_model(what: str, ref: object) -> str | None:
    if not isinstance(ref, ModelRef):
        return f"{what} must be a ModelRef"
    if not (0 < len(ref.model_id) <= _MAX_MODEL_LEN and 0 < len(ref.version) <= _MAX_MODEL_LEN):
        return f"{what} {ref!s:.80} must have an id and version of 1..{_MAX_MODEL_LEN} characters"
    if not (is_text(ref.model_id) and is_text(ref.version)):
        return f"{what} {ref!r:.80} holds a lone surrogate, which is not text"
    return None


def _check_header(spec: TaskSpec) -> str | None:
    if (problem := _check_name("task_id", spec.task_id)) is not None:
        return problem
    if not _is_value(spec.pattern, Pattern):
        return f"pattern {spec.pattern!r:.80} is not one of {[p.value for p in Pattern]}"
    if (problem := check_params(spec.params)) is not None:
        return f"params: {problem}"
    return None


def _check_inputs(spec: TaskSpec) -> str | None:
    tensor = spec.inputs
    if not isinstance(tensor, Tensor):
        return "inputs must be a Tensor"
    batch = spec.pattern == Pattern.BATCH
    limit = MAX_BATCH_INPUT_BYTES if batch else MAX_TENSOR_BYTES
    try:
        unpack_array(tensor.data, tensor.dtype, tensor.shape, limit=limit)
    except RemoteProtocolError as exc:
        return f"inputs: {exc}"
    if batch and (not tensor.shape or tensor.shape[0] == 0):
        return "inputs: a batch needs at least one row on the first axis"
    if 0 in tensor.shape:
        return f"inputs: an empty tensor (shape {list(tensor.shape)}) has nothing to infer"
    if batch and _row_bytes(tensor) > MAX_TENSOR_BYTES:  # no shard of it could be sent
        return f"inputs: a row of {_row_bytes(tensor)} bytes exceeds {MAX_TENSOR_BYTES} per item"
    return None


def _check_models(spec: TaskSpec) -> str | None:
    count = len(spec.models)
    wanted = {Pattern.SINGLE: (1, 1), Pattern.BATCH: (1, 1), Pattern.PIPELINE: (0, 0)}
    low, high = wanted.get(spec.pattern, (1, MAX_STAGES))
    if not low <= count <= high:
        return f"models: a {spec.pattern} task needs {low}..{high} models, got {count}"
    if len(set(spec.models)) != count:
        return "models: listed twice"
    for ref in spec.models:
        if (problem := _check_model("models: model", ref)) is not None:
            return problem
    if spec.pattern != Pattern.PIPELINE and spec.stages:
        return f"stages: only a pipeline has stages, not a {spec.pattern} task"
    return None


def _check_options(spec: TaskSpec) -> str | None:
    deadline = spec.deadline_s
    if deadline is not None and not (_positive_finite(deadline) and deadline <= MAX_DEADLINE_S):
        return (
            f"deadline_s {spec.deadline_s!r:.40} must be a positive number of seconds,"
            f" at most MAX_DEADLINE_S = {MAX_DEADLINE_S:.0f} (30 days)"
        )
    if type(spec.priority) is not int or not MIN_PRIORITY <= spec.priority <= MAX_PRIORITY:
        return f"priority {spec.priority!r} must be a 32-bit integer"
    if spec.policy is not None and not _is_value(spec.policy, Policy):
        return f"policy {spec.policy!r:.80} is not one of {[p.value for p in Policy]}"
    if spec.aggregation is not None and not _is_value(spec.aggregation, Mode):
        return f"aggregation {spec.aggregation!r:.80} is not one of {[m.value for m in Mode]}"
    return _check_shard_size(spec)


def _check_shard_size(spec: TaskSpec) -> str | None:
    if spec.shard_size is None:
        return None
    if spec.pattern != Pattern.BATCH:
        return "shard_size: only a batch task is sharded"
    if type(spec.shard_size) is not int or spec.shard_size < 1:
        return f"shard_size {spec.shard_size!r} must be a positive integer"
    if spec.shard_size * _row_bytes(spec.inputs) > MAX_TENSOR_BYTES:
        return f"shard_size: {spec.shard_size} rows exceed {MAX_TENSOR_BYTES} bytes per item"
    return None


# --- aggregation options --------------------------------------------------------------------

#: The spec's aggregation options (a parallel task's only), in the order they are checked.
_AGGREGATION_OPTIONS = ("quorum", "min_responses", "aggregation_timeout_s", "weights")
#: The modes that weigh their sources.
_WEIGHING = frozenset({Mode.WEIGHTED, Mode.ENSEMBLE})


def _positive_finite(value: object) -> bool:
    """A real number (not a bool) in (0, inf), an int past the float range excluded."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return 0 < float(value) < math.inf
    except OverflowError:
        return False


def _check_aggregation(spec: TaskSpec) -> str | None:
    given = next((k for k in _AGGREGATION_OPTIONS if getattr(spec, k) not in (None, {})), None)
    if given is not None and spec.pattern != Pattern.PARALLEL:
        return f"{given}: only a parallel task aggregates, not a {spec.pattern} task"
    count = len(spec.models)
    for key in ("quorum", "min_responses"):
        value = getattr(spec, key)
        if value is not None and (type(value) is not int or not 1 <= value <= count):
            return f"{key} {value!r} must be an integer in 1..{count} (the task's models)"
    timeout = spec.aggregation_timeout_s
    if timeout is not None and not (_positive_finite(timeout) and timeout <= MAX_DEADLINE_S):
        return (
            f"aggregation_timeout_s {timeout!r:.40} must be a positive number of seconds,"
            f" at most MAX_DEADLINE_S = {MAX_DEADLINE_S:.0f} (30 days)"
        )
    if timeout is not None and spec.deadline_s is not None and timeout > spec.deadline_s:
        return f"aggregation_timeout_s {timeout:g} exceeds deadline_s {spec.deadline_s:g}"
    if (problem := _check_weights(spec)) is not None:
        return problem
    return None if spec.aggregation is None else _mode_problem(spec, Mode(spec.aggregation))


def _check_weights(spec: TaskSpec) -> str | None:
    if not isinstance(spec.weights, Mapping):
        return "weights must map models of the task to weights"
    for ref, weight in spec.weights.items():
        if not isinstance(ref, ModelRef) or ref not in spec.models:
            return f"weights: {ref!s:.140} is not one of the task's models"
        if not _positive_finite(weight):
            return f"weights: {ref} has weight {weight!r}, not a positive, finite number"
        if models_named(str(ref), spec.models) != (ref,):  # it could not be written down
            return f"weights: {ref} cannot be named apart from the task's other models"
    return None


def _mode_problem(spec: TaskSpec, mode: Mode) -> str | None:
    if spec.quorum is not None and mode != Mode.ENSEMBLE:
        return f"quorum: only an ensemble aggregation has a quorum, not {mode}"
    if spec.weights and mode not in _WEIGHING:
        return f"weights: only weighted and ensemble aggregations weigh models, not {mode}"
    return None


def check_aggregation_mode(spec: TaskSpec, mode: str) -> None:
    """Raise :class:`InvalidTaskError` if the spec's aggregation options do not suit ``mode``
    (a quorum outside ensemble, weights outside weighted and ensemble)."""
    if (problem := _mode_problem(spec, Mode(mode))) is not None:
        raise InvalidTaskError(f"task {spec.task_id!r:.80}: {problem}")


def check_aggregation_used(spec: TaskSpec) -> None:
    """Raise :class:`InvalidTaskError` if the spec names an ``aggregation`` mode but is not a
    parallel task: nothing would aggregate, and the mode would be silently ignored. Checked at
    submit, not by :meth:`TaskSpec.validate`: journals may hold such specs, accepted before
    this check, and must still read and recover them (a submit of one again is refused)."""
    if spec.aggregation is not None and spec.pattern != Pattern.PARALLEL:
        raise InvalidTaskError(
            f"task {spec.task_id!r}: aggregation: only a parallel task aggregates,"
            f" not a {spec.pattern} task"
        )


def check_sendable(spec: TaskSpec) -> None:
    """Raise :class:`InvalidTaskError` if a valid ``spec`` could not be run as submitted: an
    item would carry more than ``MAX_PARAMS`` params or more than ``MAX_PARAMS_BYTES`` of them
    encoded (a pipeline stage's item carries the task's params merged with its own), which a
    node refuses; or a batch splits into more than :data:`MAX_BATCH_ITEMS` items. Checked at
    submit, not by :meth:`TaskSpec.validate`: journals may hold such specs and must still read
    them (as for :func:`check_aggregation_used`)."""
    carried = [("params", spec.params)]
    carried += [(f"stage {s.name!r}: params", {**spec.params, **s.params}) for s in spec.stages]
    for what, params in carried:
        if len(params) > MAX_PARAMS:
            problem = f"{what}: an item would carry {len(params)} params, at most {MAX_PARAMS}"
        elif (size := len(encode_params(params))) > MAX_PARAMS_BYTES:
            problem = f"{what}: {size} bytes encoded, at most {MAX_PARAMS_BYTES} per item"
        else:
            continue
        raise InvalidTaskError(f"task {spec.task_id!r:.80}: {problem}")
    if spec.pattern == Pattern.BATCH:
        rows, size = spec.inputs.rows, _shard_rows(spec)
        if (count := math.ceil(rows / size)) > MAX_BATCH_ITEMS:
            raise InvalidTaskError(
                f"task {spec.task_id!r}: shard_size: {rows} rows in shards of {size} make"
                f" {count} items, at most {MAX_BATCH_ITEMS}: give a shard_size of at least"
                f" {math.ceil(rows / MAX_BATCH_ITEMS)}"
            )


def with_aggregation_mode(spec: TaskSpec, default: str) -> TaskSpec:
    """``spec`` with ``default`` (the coordinator's mode) as its ``aggregation`` when it names
    none but has options that only some modes take (a quorum, weights): checked together at
    submit and journaled together, the mode cannot change under them on a later restart."""
    if spec.aggregation is not None or spec.pattern != Pattern.PARALLEL:
        return spec
    if spec.quorum is None and not spec.weights:
        return spec
    return replace(spec, aggregation=default)


# --- pipeline DAG --------------------------------------------------------------------------


def _check_stage(stage: object, names: set[str]) -> str | None:
    if not isinstance(stage, Stage):
        return "stages: every stage must be a Stage"
    if (problem := _check_name("stage name", stage.name)) is not None:
        return problem
    if stage.name in names:
        return f"stage {stage.name!r:.80}: duplicate stage name"
    if (problem := _check_model(f"stage {stage.name!r}: model", stage.model)) is not None:
        return problem
    if len(set(stage.after)) != len(stage.after):
        return f"stage {stage.name!r}: lists a dependency twice in after={stage.after!s:.200}"
    if (problem := check_params(stage.params)) is not None:
        return f"stage {stage.name!r}: params: {problem}"
    return None


def _find_cycle(waiting: dict[str, set[str]]) -> list[str]:
    """A dependency cycle among stages that never became ready (each waits on another)."""
    path, name = [], min(waiting)
    while name not in path:
        path.append(name)
        name = min(waiting[name])
    return [*path[path.index(name) :], name]


def stage_order(spec: TaskSpec) -> tuple[Stage, ...]:
    """The pipeline's stages in a topological order (declaration order among ready stages).

    Raises :class:`InvalidTaskError` naming the stage for duplicate names, unknown or repeated
    dependencies, and cycles (the message spells the cycle out).
    """
    problem = _check_stages(spec.stages)
    order = _topological(spec.stages) if problem is None else ()
    if isinstance(order, str):
        problem = order
    if problem is not None:
        raise InvalidTaskError(f"task {spec.task_id!r:.80}: {problem}")
    return order


def _check_stages(stages: tuple[Stage, ...]) -> str | None:
    if not 0 < len(stages) <= MAX_STAGES:
        return f"stages: a pipeline needs 1..{MAX_STAGES} stages, got {len(stages)}"
    names: set[str] = set()
    for stage in stages:
        if (problem := _check_stage(stage, names)) is not None:
            return problem
        names.add(stage.name)
    for stage in stages:
        unknown = [dep for dep in stage.after if dep not in names]
        if unknown:
            return f"stage {stage.name!r:.80} depends on unknown stage {unknown[0]!r:.80}"
    return None


def _topological(stages: tuple[Stage, ...]) -> tuple[Stage, ...] | str:
    """Kahn's algorithm; a string describing a cycle when there is one."""
    waiting = {s.name: set(s.after) for s in stages}
    order: list[Stage] = []
    while waiting:
        ready = [s for s in stages if s.name in waiting and not waiting[s.name]]
        if not ready:
            cycle = _find_cycle(waiting)
            return f"stage {cycle[0]!r} is in a dependency cycle: {' -> '.join(cycle)}"
        for stage in ready:
            del waiting[stage.name]
            order.append(stage)
        for deps in waiting.values():
            deps.difference_update(s.name for s in ready)
    return tuple(order)


# --- work items ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ItemOutline:
    """What the journal knows about a planned item before it runs."""

    item_id: str
    model: ModelRef
    stage: str = ""  # pipeline stage name
    index: int = 0  # position: model (parallel), shard (batch), topological order (pipeline)


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One unit of work sent to one node: a model run on one input tensor.

    ``deadline_s`` is the remaining time budget (seconds) when sent; ``attempt`` counts from 1
    and grows by one for every re-dispatch. Treat ``params`` as read-only.
    """

    item_id: str
    task_id: str
    model: ModelRef
    input: Tensor
    params: Mapping[str, ParamValue] = field(default_factory=dict, hash=False)
    deadline_s: float | None = None
    priority: int = 0
    attempt: int = 1
    stage: str = ""
    index: int = 0

    def to_message(self) -> TaskAssign:
        """The :class:`TaskAssign` that carries this item to a node."""
        ref = self.model
        return TaskAssign(
            self.item_id, self.task_id, ref.model_id, ref.version, self.input,
            encode_params(self.params), self.deadline_s, self.priority, self.attempt,
        )  # fmt: skip

    @classmethod
    def from_message(cls, msg: TaskAssign) -> WorkItem:
        """The item a node received (RemoteProtocolError if its params are malformed)."""
        return cls(
            msg.item_id, msg.task_id, ModelRef(msg.model_id, msg.model_version), msg.input,
            decode_params(msg.params), msg.deadline_s, msg.priority, msg.attempt,
        )  # fmt: skip


def _row_bytes(tensor: Tensor) -> int:
    return len(tensor.data) // tensor.rows if tensor.rows else 0


def _shard_rows(spec: TaskSpec) -> int:
    if spec.shard_size is not None:
        return spec.shard_size
    return max(1, min(DEFAULT_SHARD_ROWS, MAX_TENSOR_BYTES // max(1, _row_bytes(spec.inputs))))


def outline(spec: TaskSpec) -> tuple[ItemOutline, ...]:
    """The items ``spec`` splits into (ids, models, stages), for any pattern. Validates."""
    spec.validate()
    tid = spec.task_id
    if spec.pattern == Pattern.PIPELINE:
        stages = stage_order(spec)
        return tuple(
            ItemOutline(f"{tid}/{s.name}", s.model, s.name, i) for i, s in enumerate(stages)
        )
    if spec.pattern == Pattern.BATCH:
        count = math.ceil(spec.inputs.rows / _shard_rows(spec))
        return tuple(ItemOutline(f"{tid}/{i}", spec.models[0], "", i) for i in range(count))
    return tuple(ItemOutline(f"{tid}/{i}", ref, "", i) for i, ref in enumerate(spec.models))


def _shard(tensor: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of a tensor, sliced from its bytes."""
    row = _row_bytes(tensor)
    stop = min(stop, tensor.rows)
    return Tensor(
        tensor.data[start * row : stop * row], tensor.dtype, (stop - start, *tensor.shape[1:])
    )


def _item(spec: TaskSpec, where: ItemOutline, tensor: Tensor) -> WorkItem:
    return WorkItem(
        where.item_id, spec.task_id, where.model, tensor, spec.params, spec.deadline_s,
        spec.priority, 1, where.stage, where.index,
    )  # fmt: skip


def plan(spec: TaskSpec, outlines: tuple[ItemOutline, ...] | None = None) -> list[WorkItem]:
    """The work items of a single, parallel or batch task (validates ``spec`` first, unless
    its ``outlines``, from :func:`outline`, are given).

    Pipelines are planned step by step with
    :class:`~meshinfer.proto.tasks_pipeline.PipelinePlan`; passing one raises LocalProtocolError.
    """
    if spec.pattern == Pattern.PIPELINE:
        raise LocalProtocolError("plan a pipeline task with PipelinePlan(spec).ready_items()")
    if outlines is None:
        outlines = outline(spec)
    if spec.pattern != Pattern.BATCH:
        return [_item(spec, where, spec.inputs) for where in outlines]
    rows = _shard_rows(spec)
    shards = (_shard(spec.inputs, o.index * rows, (o.index + 1) * rows) for o in outlines)
    return [_item(spec, where, shard) for where, shard in zip(outlines, shards, strict=True)]
