"""Pure helpers on a work item's values, for :mod:`node.executor`: its input as an array, its
output as a tensor the wire carries, its priority and deadline, and the failure an error
answers it with.

No asyncio, no clock: plain functions on arrays and errors, linear in the array at most (the
executor calls the tensor ones off the loop for big arrays).
"""

from __future__ import annotations

import numpy as np

from meshinfer.errors import (
    BatchShapeError,
    DeadlineExceededError,
    InferenceError,
    MeshInferError,
    ModelNotFoundError,
    OverloadedError,
    RemoteProtocolError,
)
from meshinfer.proto.tasks import MAX_DEADLINE_S
from meshinfer.proto.tasks_wire import DTYPES, FailureKind, Tensor


def input_array(tensor: Tensor) -> np.ndarray:
    """The item's input as it came (a read-only view of its bytes, no copy): its batcher
    converts it to the model's dtype, in its worker thread for a big one, never on the loop."""
    array = tensor.to_array()
    if array.ndim < 2:
        raise RemoteProtocolError(f"input must have a batch axis, got shape {array.shape}")
    return array


def wire_tensor(output: np.ndarray) -> Tensor:
    """An item's output as a tensor that travels: in the engine's own
    dtype where the wire carries it (:data:`~meshinfer.proto.tasks_wire.DTYPES`: integer labels
    stay labels, float16 stays half the bytes); a float dtype it lacks (float64) as float32, an
    integer one as int64. InferenceError for any other (complex, uint64: no dtype the wire
    carries holds its values), and for a float64 output with a finite value beyond float32's
    range (it would arrive as inf: :func:`as_float32`). Linear in the output: on the loop
    only for small ones."""
    dtype = output.dtype
    if dtype.name not in DTYPES:
        if dtype.kind == "f":
            output = as_float32(output)
        elif dtype.kind in "iu" and np.can_cast(dtype, np.int64):
            output = output.astype(np.int64)
        else:
            raise InferenceError(
                f"the engine's output dtype {dtype} cannot be sent: the wire carries "
                f"{', '.join(sorted(DTYPES))}"
            )
    return Tensor.from_array(output)


def as_float32(output: np.ndarray) -> np.ndarray:
    """``output`` (a float dtype the wire lacks) as float32: inf and NaN stay what they are;
    InferenceError if a finite value is beyond float32's range. The cast itself notices (the
    CPU's overflow flag, which an inf or NaN does not raise): no second pass over a big
    output, only over one that failed, for the message."""
    try:
        with np.errstate(over="raise", invalid="ignore"):
            return output.astype(np.float32)
    except FloatingPointError:
        pass
    limit = float(np.finfo(np.float32).max)
    with np.errstate(invalid="ignore"):
        beyond = np.isfinite(output) & (np.abs(output) > limit)
    where = np.unravel_index(int(np.argmax(beyond)), output.shape)
    raise InferenceError(
        f"the engine's {output.dtype} output cannot be sent: {int(beyond.sum())} value(s) overflow"
        f" float32 (beyond {limit:.4g}; the wire carries no {output.dtype}), the first"
        f" {float(output[where])!r} at index {tuple(int(i) for i in where)}"
    )


def clamp_priority(value: int) -> int:
    return max(0, min(3, value))


def clamp_deadline(value: float | None) -> float | None:
    """A peer's ``deadline_s`` (finite and >= 0: its decoder checks) at most
    :data:`~meshinfer.proto.tasks.MAX_DEADLINE_S` (30 days): a longer one (an older
    coordinator's, or 1e308) is taken as the bound, not refused, so no timer or loop deadline
    takes an absurd value."""
    return value if value is None or value <= MAX_DEADLINE_S else MAX_DEADLINE_S


def classify(exc: MeshInferError) -> tuple[FailureKind, bool]:
    if isinstance(exc, RemoteProtocolError | BatchShapeError):
        return FailureKind.BAD_INPUT, False
    if isinstance(exc, OverloadedError):
        return FailureKind.OVERLOADED, True
    if isinstance(exc, DeadlineExceededError):
        return FailureKind.DEADLINE_EXCEEDED, False
    if isinstance(exc, ModelNotFoundError):
        return FailureKind.MODEL_NOT_FOUND, True
    if isinstance(exc, InferenceError):
        return FailureKind.INFERENCE_ERROR, False
    return FailureKind.UNKNOWN, True
