"""One live task in the coordinator: which items to run next, and when the task is done.

A :class:`TaskRun` is the in-memory side of a journaled task. It knows, per pattern, how results
combine:

``single``    the one item's output;
``batch``     the shards' outputs concatenated in shard order;
``parallel``  the models' outputs through an :class:`~meshinfer.proto.aggregation.Aggregator`
              (first, all, majority, weighted, ensemble with quorum and timeout), configured
              by the spec's aggregation options (:func:`aggregation_config`);
``pipeline``  stages dispatched as their inputs become available
              (:class:`~meshinfer.proto.tasks_pipeline.PipelinePlan`); the sinks' outputs.

An output that cannot be combined with the others fails the whole task, naming the item and
why, whatever order the outputs arrived in: a batch shard whose rows do not match its input's,
or whose trailing shape differs from another shard's; a parallel output the
aggregation cannot use (its shape differs from another model's, a non-numeric output for a
vote or an average); pipeline stage outputs that cannot be joined into a later stage's input.

No I/O and no clock reads: ``now`` is passed in. The service drives it.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field, replace

import msgpack
import numpy as np

from meshinfer.errors import RemoteProtocolError
from meshinfer.inference.cache import content_digest
from meshinfer.proto.aggregation import AggregateResult, AggregationConfig, Aggregator, Mode
from meshinfer.proto.tasks import (
    Pattern,
    TaskSpec,
    WorkItem,
    check_aggregation_mode,
    outline,
    plan,
)
from meshinfer.proto.tasks_pipeline import PipelinePlan, StageInputError
from meshinfer.proto.tasks_wire import Tensor


@dataclass
class ItemRun:
    """One work item's dispatch state."""

    item: WorkItem
    attempt: int = 1
    node: str | None = None
    tried: set[str] = field(default_factory=set)
    last: str | None = None  # the node of the latest dispatch
    refused: int = 0  # refusals not counted against max_attempts (Coordinator._retry)
    #: why the attempt before this one failed, while this one waits for its retry (its backoff
    #: and the journal's write of that failure); None once the dispatcher takes it up again
    retrying: str | None = None
    dispatched_at: float | None = None
    journaled: int = 0  # the attempt whose dispatch the journal has (0: none yet)
    digest: str = ""  # the input's sha256, once it was worth sending by reference
    by_reference: bool = False  # the current send named its input by digest only
    referenced: int = 0  # the attempt in which a send last named its input by digest only
    #: (attempt, node) of every send of the item by this coordinator (and of the dispatch the
    #: journal had at recovery): a result for one of those attempts counts only from its node
    sent: set[tuple[int, str]] = field(default_factory=set)

    @classmethod
    def at_attempt(cls, item: WorkItem, attempt: int, *, refused: int = 0) -> ItemRun:
        """A live item at ``attempt`` (the item sent carries that number)."""
        return cls(_with_attempt(item, attempt), attempt, refused=refused)

    def next_attempt(self) -> None:
        """Move on to the attempt after this one (the item sent carries its number)."""
        self.attempt += 1
        self.item = _with_attempt(self.item, self.attempt)

    def sent_to(self, attempt: int, node: str) -> bool:
        """Whether the item's current attempt is ``attempt`` and went to ``node``: only then does
        that node's answer about it count (relayed answers come from the node it was sent to)."""
        return self.attempt == attempt and self.node == node

    def may_answer(self, attempt: int, node: str) -> bool:
        """Whether ``node`` may answer ``attempt`` of the item: this coordinator sent it that
        attempt, or the journal has that attempt's dispatch to it (from before a restart). Any
        other member's result is forged or misrouted: it would become the task's output. (An
        attempt sent before a restart whose dispatch the journal lacks runs again: the answer to
        that send is the one that counts.)"""
        return (attempt, node) in self.sent

    def nodes_of(self, attempt: int) -> str:
        """The nodes ``attempt`` of the item was sent to, sorted, comma-separated ("" if none)."""
        return ", ".join(sorted(n for a, n in self.sent if a == attempt))


def _with_attempt(item: WorkItem, attempt: int) -> WorkItem:
    return item if item.attempt == attempt else replace(item, attempt=attempt)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a task ended: ``succeeded`` with outputs, or ``failed`` with an error."""

    succeeded: bool
    outputs: tuple[np.ndarray, ...] = ()
    error: str = ""
    aggregation: AggregateResult | None = None


class TaskRun:
    """Progress of one task; see the module docstring."""

    def __init__(self, spec: TaskSpec, *, default_aggregation: str, now: float) -> None:
        self.spec = spec
        self.results: dict[str, Tensor] = {}
        self.nodes: dict[str, str] = {}  # item id -> node that produced its result
        self.failed: dict[str, str] = {}
        self.items: dict[str, ItemRun] = {}
        self.outcome: Outcome | None = None
        #: when the task's ``deadline_s`` runs out, on the loop's clock (None: no deadline)
        self.expires_at = None if spec.deadline_s is None else now + spec.deadline_s
        #: the task's items (validates the spec), handed to the journal with the task
        self.outline = outline(spec)
        self.pipeline = PipelinePlan(spec) if spec.pattern == Pattern.PIPELINE else None
        self._planned = [] if self.pipeline else plan(spec, self.outline)
        self._ids = (
            self.pipeline.item_ids if self.pipeline else tuple(w.item_id for w in self._planned)
        )
        self._unstarted = 0  # every planned item before this index has started (never undone)
        self.aggregator: Aggregator | None = None
        #: id(input bytes) -> (those bytes, their sha256): items sharing one input hash it once
        self._digests: dict[int, tuple[bytes, str]] = {}
        if spec.pattern == Pattern.PARALLEL:
            cfg = aggregation_config(spec, self._planned, default_aggregation)
            self.aggregator = Aggregator(cfg, self._ids, now=now)  # checks cfg against them

    def digest_of(self, data: bytes) -> str:
        """The sha256 of an item's input, computed once for the items that share it (a
        parallel task's models). Computed here, on the caller's thread, unless known."""
        digest = self.known_digest(data)
        if digest is None:
            digest = content_digest(data)
            self.remember_digest(data, digest)
        return digest

    def known_digest(self, data: bytes) -> str | None:
        """The sha256 of an item's input if it was computed (None: not yet)."""
        known = self._digests.get(id(data))
        return known[1] if known is not None and known[0] is data else None

    def remember_digest(self, data: bytes, digest: str) -> None:
        """``digest`` is the sha256 of ``data``, an item's input (computed elsewhere: a worker
        thread, see :meth:`coordinator.input_refs.InputRefs.when_hashed`)."""
        self._digests[id(data)] = (data, digest)

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def all_item_ids(self) -> tuple[str, ...]:
        return self._ids

    def _started(self, item_id: str) -> bool:
        return item_id in self.items or item_id in self.results or item_id in self.failed

    def unstarted(self) -> list[str]:
        """The ids of a pipeline's items that wait for the stages they take input from (none
        for the other patterns: their items all start at once)."""
        if self.pipeline is None or self.done:
            return []
        return [i for i in self._ids if not self._started(i)]

    def ready(self) -> list[WorkItem]:
        """Items not yet started that can run now (all of them, except in pipelines).

        Amortized O(1) per item of a large batch once its items have started: the planned
        items before the first unstarted one are not looked at again."""
        if self.pipeline is not None:
            if self.done:
                return []
            started = set(self.items) | set(self.results) | set(self.failed)
            try:
                return self.pipeline.ready_items(self.results, started)
            except StageInputError as exc:  # the stages' outputs do not fit together
                nodes = ", ".join(f"{item} on {self.nodes.get(item, '?')}" for item in exc.feeds)
                self.outcome = Outcome(False, error=f"pipeline: {exc}; produced by {nodes}")
                return []
        planned = self._planned
        while self._unstarted < len(planned) and self._started(planned[self._unstarted].item_id):
            self._unstarted += 1
        return [w for w in planned[self._unstarted :] if not self._started(w.item_id)]

    def record_result(self, item_id: str, output: Tensor, node: str, now: float) -> None:
        """An item's output. One that cannot be combined with the others fails the task
        (module docstring); a pipeline whose next stage cannot be fed fails in :meth:`ready`."""
        self._finished(item_id)
        try:
            self._check_shard(item_id, output)
            if self.aggregator is not None:
                self.aggregator.add(item_id, output.to_array(), now)
        except RemoteProtocolError as exc:
            self.failed[item_id] = f"unusable output from {node}: {exc}"
            if self.outcome is None:
                self.outcome = Outcome(False, error=f"item {item_id}: {self.failed[item_id]}")
            return
        self.results[item_id] = output
        self.nodes[item_id] = node
        self._settle(now)

    def _check_shard(self, item_id: str, output: Tensor) -> None:
        """A batch shard's output must have its input's rows, and the trailing shape of the
        other shards' outputs (RemoteProtocolError otherwise): the rows must line up."""
        if self.spec.pattern != Pattern.BATCH:
            return
        rows = self._planned[int(item_id.rpartition("/")[2])].input.rows
        if not output.shape or output.shape[0] != rows:
            raise RemoteProtocolError(f"shape {list(output.shape)} for a shard of {rows} rows")
        known = next(iter(self.results.values()), None)
        if known is not None and known.shape[1:] != output.shape[1:]:
            raise RemoteProtocolError(
                f"shape {list(output.shape)} does not join the other shards' {list(known.shape)}"
            )

    def record_failure(self, item_id: str, error: str, now: float) -> None:
        """An item failed for good (no more retries)."""
        self.failed[item_id] = error
        self._finished(item_id)
        if self.aggregator is not None:
            self.aggregator.add_failure(item_id, now)
        self._settle(now)

    def _finished(self, item_id: str) -> None:
        """The item is live no more: its entry goes, and so does the digest of its input unless
        that is the task's own input (other items may share it). A pipeline stage's input, made
        from earlier stages' outputs, was kept (here alone) until the task ended."""
        entry = self.items.pop(item_id, None)
        if entry is None:
            return
        data = entry.item.input.data
        known = self._digests.get(id(data))
        if known is not None and known[0] is data and data is not self.spec.inputs.data:
            del self._digests[id(data)]

    def check_timeout(self, now: float) -> None:
        """For aggregations with a timeout: settle if the deadline passed."""
        self._settle(now)

    def deadline(self) -> float | None:
        return self.aggregator.deadline() if self.aggregator else None

    def deadline_error(self) -> str:
        """Why the task failed at its deadline (the start of it: what waited may be said after),
        with how many of its items were still running, and on which nodes (the busiest 3)."""
        done, total = len(self.results), len(self._ids)
        error = f"deadline of {self.spec.deadline_s:g} s passed with {done} of {total} items done"
        on = Counter(e.node for e in self.items.values() if e.node is not None)
        if not on:
            return error
        ranked = sorted(on.items(), key=lambda pair: (-pair[1], pair[0]))
        if len(ranked) == 1:
            return f"{error}; {on.total()} of them running on {ranked[0][0]}"
        named = ", ".join(f"{count} on {node}" for node, count in ranked[:3])
        if len(ranked) > 3:
            rest = ranked[3:]
            named += f" (and {sum(c for _, c in rest)} on {len(rest)} more nodes)"
        return f"{error}; {on.total()} of them running: {named}"

    def _settle(self, now: float) -> None:
        if self.outcome is not None:
            return
        if self.aggregator is not None:
            if self.aggregator.is_done(now):
                self.outcome = self._from_aggregate(self.aggregator.result())
            return
        if self.failed:
            item, error = next(iter(self.failed.items()))
            self.outcome = Outcome(False, error=f"item {item} failed: {error}")
            return
        ids = self._ids
        if len(self.results) >= len(ids) and all(i in self.results for i in ids):
            self.outcome = Outcome(True, self._outputs(ids))

    def _outputs(self, ids: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        if self.spec.pattern == Pattern.BATCH:
            return (np.concatenate([self.results[i].to_array() for i in ids]),)
        if self.pipeline is not None:
            return tuple(self.results[i].to_array() for i in self.pipeline.sinks)
        return (self.results[ids[0]].to_array(),)

    def _from_aggregate(self, result: AggregateResult) -> Outcome:
        if result.failed:
            return Outcome(False, error=self._aggregation_error(result), aggregation=result)
        value = result.value
        outputs = tuple(value) if isinstance(value, tuple) else (value,)
        return Outcome(True, tuple(np.asarray(v) for v in outputs), aggregation=result)

    def _aggregation_error(self, result: AggregateResult) -> str:
        """Why an aggregation failed: how many outputs it had, and the items' own errors."""
        got, total = len(result.sources), len(self._ids)
        error = f"aggregation {result.mode} failed ({result.reason}): {got} of {total} outputs"
        if result.reason == "timeout":  # only an aggregator with a timeout times out
            timeout = self.aggregator.config.timeout_s  # type: ignore[union-attr]
            what = "deadline" if timeout == self.spec.deadline_s else "aggregation timeout"
            error += f" in by the {what} of {timeout:g} s"
        if self.failed:
            item, why = next(iter(self.failed.items()))
            error += f"; {len(self.failed)} item(s) failed, {item}: {why}"
        return error


def aggregation_config(
    spec: TaskSpec, items: list[WorkItem], default_mode: str
) -> AggregationConfig:
    """A parallel task's aggregation: its mode (else ``default_mode``) and options, with the
    weights keyed by the items (sources) of the models they name. InvalidTaskError if the
    options do not suit the mode (the coordinator writes the mode in at submit, so a journaled
    task always has the mode its options were checked against)."""
    mode = Mode(spec.aggregation or default_mode)
    check_aggregation_mode(spec, mode)
    timeout = spec.aggregation_timeout_s
    return AggregationConfig(
        mode=mode,
        quorum=spec.quorum,
        min_responses=1 if spec.min_responses is None else spec.min_responses,
        timeout_s=spec.deadline_s if timeout is None else timeout,
        weights={w.item_id: spec.weights[w.model] for w in items if w.model in spec.weights},
    )


def encode_outcome(run: TaskRun, outcome: Outcome) -> bytes:
    """The result summary blob the journal keeps for a finished task."""
    outputs = [
        [np.ascontiguousarray(o).tobytes(), _dtype_name(o.dtype), list(o.shape)]
        for o in outcome.outputs
    ]
    agg = outcome.aggregation
    return msgpack.packb(
        {
            "outputs": outputs,
            "nodes": run.nodes,
            "aggregation": None if agg is None else {
                "mode": str(agg.mode), "sources": list(agg.sources), "partial": agg.partial,
                "reason": agg.reason, "tied": len(agg.tied), "abstained": len(agg.abstained),
            },
        }
    )  # fmt: skip


@functools.cache
def _dtype_name(dtype: np.dtype) -> str:
    """``str(dtype)``, remembered (numpy computes it in Python on every call)."""
    return str(dtype)


def decode_outcome(blob: bytes) -> dict:
    """Inverse of :func:`encode_outcome`, with arrays rebuilt (our own blob, trusted)."""
    doc = msgpack.unpackb(blob, raw=False)
    doc["outputs"] = [
        np.frombuffer(data, dtype=dtype).reshape(shape) for data, dtype, shape in doc["outputs"]
    ]
    return doc
