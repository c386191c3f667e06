"""The ``InferenceEngine`` delegate interface and the types around it.

An engine loads models by id and version and runs batches on its device. Implementations:
NumPy (CPU, the embedded default), CuPy (NVIDIA GPU), Triton (a Triton Inference Server through
tritonclient). A :class:`~meshinfer.inference.batching.DynamicBatcher` sits in front of each.

Concurrency rules: every coroutine here runs on the event loop and must never block it; engines
push NumPy/CuPy/network work to a bounded executor (or an asyncio client). ``infer`` may be
called concurrently for different batches; an engine bounds its own parallelism.

Optional: ``input_spec(ref) -> TensorSpec | None`` (cheap, on the loop), the input tensor of a
loaded model. A batcher given no spec of its own checks each request against it, so a request
that does not fit fails alone before it joins a batch. ``infer`` returns outputs as computed:
they may hold NaN or infinity when inputs overflow the model; the batcher fails such a request
(and only it) with a clear error.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from meshinfer.proto.models import ModelRef  # its home is the protocol layer; re-exported here

__all__ = [
    "CHECKED_BATCH",
    "EngineCapacity",
    "InferenceEngine",
    "ModelRef",
    "TensorSpec",
]

CHECKED_BATCH: ContextVar[np.ndarray | None] = ContextVar("meshinfer_checked_batch", default=None)
"""While a batcher's ``engine.infer`` call runs (in its task), the batch it hands the engine:
every request in it was found free of NaN and infinity as the model's dtype (the batch's, if
that is unknown) before it joined. An engine given that very array may skip its own check
(:class:`~meshinfer.inference.numpy_engine.NumpyEngine` does for float32); a direct caller of
``infer`` never sets it, so its batches are always checked. Set by
:class:`~meshinfer.inference.batching.DynamicBatcher`; part of the engine interface, so an
engine reads it from here without importing the batcher."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, dtype and shape of one input or output; ``-1`` in ``shape`` is the batch axis."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EngineCapacity:
    """What an engine can take on right now; gossiped in node state."""

    device: str  # "cpu", "cuda:0", "triton:<url>"
    max_batch_size: int
    free_memory_bytes: int | None
    loaded_models: tuple[ModelRef, ...] = field(default=())
    ready: bool = True


@runtime_checkable
class InferenceEngine(Protocol):
    """Runs batches of a loaded model. See the module docstring for concurrency rules."""

    name: str

    async def load(self, ref: ModelRef) -> None:
        """Make ``ref`` ready to run; idempotent. Raises ModelNotFoundError."""
        ...

    async def unload(self, ref: ModelRef) -> None:
        """Release a loaded model; idempotent."""
        ...

    async def infer(self, ref: ModelRef, batch: np.ndarray) -> np.ndarray:
        """Run one batch (first axis is the batch) and return the outputs as a NumPy array."""
        ...

    def capacity(self) -> EngineCapacity:
        """Describe capacity and readiness without blocking."""
        ...

    async def aclose(self) -> None:
        """Release the device and executor. Idempotent."""
        ...
