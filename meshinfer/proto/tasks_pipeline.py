"""Step-by-step planning of a pipeline task: which stages can run given the results so far.

A pipeline's stages form a DAG (validated by :func:`~meshinfer.proto.tasks.stage_order`). A
stage is *ready* when every stage in its ``after`` has a result; its input is the task input
(no dependencies), the one dependency's output, or the dependencies' outputs concatenated along
the last axis (in ``after`` order). The coordinator calls :meth:`PipelinePlan.ready_items` after
every result and dispatches what it returns; the task is done when every stage has a result
(:meth:`PipelinePlan.is_complete`) and its outputs are those of the sink stages.

Pure: results go in as a mapping ``item id -> output Tensor``; nothing is remembered between
calls, so a coordinator that restarted rebuilds the plan from the spec and its journaled results.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from meshinfer.errors import LocalProtocolError, RemoteProtocolError
from meshinfer.proto.tasks import Pattern, Stage, TaskSpec, WorkItem, stage_order
from meshinfer.proto.tasks_wire import MAX_TENSOR_BYTES, Tensor, pack_array

__all__ = ["PipelinePlan", "StageInputError"]


class StageInputError(RemoteProtocolError):
    """A stage's inputs (its dependencies' outputs) cannot be joined; ``feeds``: the item ids
    of the stages that produced them, for the caller to name their nodes."""

    def __init__(self, message: str, feeds: tuple[str, ...]) -> None:
        super().__init__(message)
        self.feeds = feeds


class PipelinePlan:
    """The DAG of one pipeline task (the spec is validated on construction)."""

    def __init__(self, spec: TaskSpec) -> None:
        if spec.pattern != Pattern.PIPELINE:
            raise LocalProtocolError(f"task {spec.task_id!r} is a {spec.pattern} task")
        spec.validate()
        self.spec = spec
        self.stages: tuple[Stage, ...] = stage_order(spec)
        self._by_item = {self.item_id(s.name): s for s in self.stages}
        feeding = {dep for s in self.stages for dep in s.after}
        #: Item ids of the stages no other stage reads: their outputs are the task's outputs.
        self.sinks: tuple[str, ...] = tuple(
            self.item_id(s.name) for s in self.stages if s.name not in feeding
        )

    def item_id(self, stage_name: str) -> str:
        """The work item id of a stage."""
        return f"{self.spec.task_id}/{stage_name}"

    @property
    def item_ids(self) -> tuple[str, ...]:
        """Every stage's item id, in topological order."""
        return tuple(self._by_item)

    def stage_of(self, item_id: str) -> Stage | None:
        """The stage an item id belongs to (None for an id not of this task)."""
        return self._by_item.get(item_id)

    def is_complete(self, results: Mapping[str, Tensor]) -> bool:
        """Whether every stage has a result."""
        return all(item_id in results for item_id in self._by_item)

    def ready_items(
        self, results: Mapping[str, Tensor], started: Collection[str] = ()
    ) -> list[WorkItem]:
        """Items whose dependencies all have results and that have neither a result nor are in
        ``started`` (already dispatched), in topological order.

        Raises RemoteProtocolError (:class:`StageInputError`) when the outputs feeding a stage
        cannot be concatenated (different dtypes or leading shapes: a node returned something
        unexpected), or would join to more than ``MAX_TENSOR_BYTES`` (refused before joining).
        """
        ready = []
        for index, stage in enumerate(self.stages):
            item_id = self.item_id(stage.name)
            if item_id in results or item_id in started:
                continue
            if all(self.item_id(dep) in results for dep in stage.after):
                ready.append(self._item(index, stage, self._input_of(stage, results)))
        return ready

    def _input_of(self, stage: Stage, results: Mapping[str, Tensor]) -> Tensor:
        if not stage.after:
            return self.spec.inputs
        feeds = [results[self.item_id(dep)] for dep in stage.after]
        if len(feeds) == 1:
            return feeds[0]
        problem = None
        joined = sum(len(f.data) for f in feeds)
        if len({f.dtype for f in feeds}) != 1:
            problem = "cannot join inputs of mixed dtypes"
        elif joined > MAX_TENSOR_BYTES:  # refused before NumPy allocates it (up to ~1 GiB)
            problem = f"cannot join inputs: {joined} bytes, over the cap of {MAX_TENSOR_BYTES}"
        else:
            try:
                return Tensor(*pack_array(np.concatenate([f.to_array() for f in feeds], axis=-1)))
            except (ValueError, LocalProtocolError) as exc:  # (the latter: joined, too large)
                problem = f"cannot join inputs: {exc}"
        inputs = ", ".join(
            f"{dep!r} {f.dtype}{list(f.shape)}" for dep, f in zip(stage.after, feeds, strict=True)
        )
        raise StageInputError(
            f"stage {stage.name!r}: {problem} (outputs of {inputs})",
            tuple(self.item_id(dep) for dep in stage.after),
        )

    def _item(self, index: int, stage: Stage, tensor: Tensor) -> WorkItem:
        spec = self.spec
        params = {**spec.params, **stage.params}
        return WorkItem(
            self.item_id(stage.name), spec.task_id, stage.model, tensor, params, spec.deadline_s,
            spec.priority, 1, stage.name, index,
        )  # fmt: skip
