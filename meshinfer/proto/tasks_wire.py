"""Tensors, task parameters and the task wire messages (type ids 32-36).

Tensors travel as raw little-endian bytes plus a dtype name and a shape (:class:`Tensor`); the
dtype comes from a whitelist (:data:`DTYPES`) and a decoder checks that the byte count matches
``prod(shape) * itemsize`` before any NumPy view is made (an empty tensor's other dimensions,
its zeros taken as 1, may span no more than the cap either: NumPy could not shape it); a bool
tensor's bytes are each 0 or 1 (NumPy would hold any other byte as a bool that is neither).

Task parameters (``requires_gpu``, ``expected_runtime_s``, ...) are a small flat map of
``str -> str | int | float | bool | None``; on the wire they ride as one msgpack blob
(:func:`encode_params` / :func:`decode_params`) because the message registry has no union types.

Wire messages (ONLY APPEND; ids from the tasks range 32-79 of :mod:`meshinfer.proto.messages`):

====  ================  ======================  ==============================================
id    message           direction               meaning
====  ================  ======================  ==============================================
32    TaskAssign        coordinator -> node     run this work item (one attempt)
33    TaskAccepted      node -> coordinator     the item is queued/running on the node
34    TaskResult        node -> coordinator     the item's output tensor, timings, engine
35    TaskFailed        node -> coordinator     the attempt failed: kind code, retryable flag
36    TaskCancel        coordinator -> node     stop working on the item (best effort)
====  ================  ======================  ==============================================

All five are ``extensible``: fields appended later must have defaults. A node sends
``TaskAccepted`` only for an item still queued or running some time after it arrived (the node's
``accepted_notice_ms``); a quick item is answered by its ``TaskResult`` alone.

Inputs by reference (the node's input cache, :mod:`meshinfer.inference.cache`): a node that
gossips an input cache (``NodeState.input_cache_mb``) keeps the input of a ``TaskAssign`` sent
with ``keep_input`` under its sha256. A later ``TaskAssign`` may then carry only an
``input_ref`` (:class:`TensorRef`: digest, dtype, shape) and an empty ``input``; a node that no
longer holds that digest answers ``TaskFailed`` with ``INPUT_NOT_CACHED`` (retryable), and the
sender sends the same attempt again with the bytes. A node never trusts a sender's digest: it
hashes what it keeps itself.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import msgpack
import numpy as np

from meshinfer.errors import LocalProtocolError, RemoteProtocolError
from meshinfer.proto.messages import MAX_MESSAGE_SIZE, embedded, is_plain_text, message

__all__ = [
    "DTYPES",
    "MAX_DIM",
    "MAX_NDIM",
    "MAX_PRIORITY",
    "MAX_TENSOR_BYTES",
    "MIN_PRIORITY",
    "NO_INPUT",
    "REFUSALS",
    "FailureKind",
    "ParamValue",
    "TaskAccepted",
    "TaskAssign",
    "TaskCancel",
    "TaskFailed",
    "TaskResult",
    "Tensor",
    "TensorRef",
    "by_reference",
    "canonical_bools",
    "check_params",
    "decode_params",
    "encode_params",
    "failure_kind",
    "is_text",
    "pack_array",
    "unpack_array",
]

#: A task's ``priority`` is a 32-bit signed integer: from this to :data:`MAX_PRIORITY`, inclusive
#: (:mod:`meshinfer.proto.tasks` re-exports both).
MIN_PRIORITY = -(2**31)
#: The largest ``priority`` (larger runs first).
MAX_PRIORITY = 2**31 - 1
#: The dtypes a tensor may have on the wire (NumPy names).
DTYPES = frozenset({"float32", "float16", "int64", "int32", "uint8", "bool"})
#: Each wire dtype as NumPy reads it (little-endian), and its item size.
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}
_ITEM_SIZES = {name: np.dtype(name).itemsize for name in DTYPES}
#: At most this many dimensions.
MAX_NDIM = 8
#: No dimension may be larger than this.
MAX_DIM = 2**31 - 1
#: The largest tensor payload in one message: 16 MiB less 64 KiB of room for the other fields.
MAX_TENSOR_BYTES = MAX_MESSAGE_SIZE - 64 * 1024

MAX_ID_LEN = 200
MAX_PARAMS = 64
MAX_PARAM_KEY_LEN = 64
MAX_PARAM_STR_LEN = 1024
MAX_PARAMS_BYTES = 16 * 1024
MAX_ERROR_LEN = 4096
MAX_TIMINGS = 16

#: A parameter value.
ParamValue = str | int | float | bool | None
_PARAM_TYPES = (str, int, float, bool, type(None))
_SMALL_CAP = 64 * 1024


def _refuse(owner: str, detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"invalid {owner}: {detail}")


# --- tensors ---------------------------------------------------------------------------------


def _layout_bytes(dtype: str, shape: tuple[int, ...], limit: int, what: str = "tensor") -> int:
    """The byte count ``dtype``/``shape`` describe; RemoteProtocolError unless the dtype is
    allowed, the dimensions bounded and the count within ``limit``."""
    itemsize = _ITEM_SIZES.get(dtype) if type(dtype) is str else None
    if itemsize is None:
        raise _refuse(what, f"dtype {dtype!r:.40} is not one of {sorted(DTYPES)}")
    if len(shape) > MAX_NDIM:
        raise _refuse(what, f"{len(shape)} dimensions, at most {MAX_NDIM} allowed")
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_DIM:
            raise _refuse(what, f"shape {shape} has a dimension outside 0..{MAX_DIM}")
    expected = math.prod(shape) * itemsize
    if expected > limit:
        raise _refuse(what, f"{expected} bytes, over the cap of {limit}")
    if not expected and _span_outside_zeros(shape, itemsize) > limit:
        # an empty tensor whose other dimensions span more than the cap: NumPy refuses to
        # shape one past its index range, and no slice of it could ever be sent
        raise _refuse(what, f"shape {shape} spans more than {limit} bytes outside its zeros")
    return expected


def _span_outside_zeros(shape: tuple[int, ...], itemsize: int) -> int:
    """The bytes a tensor of ``shape`` would hold with each zero dimension taken as 1."""
    return math.prod(d or 1 for d in shape) * itemsize


def _check_layout(dtype: str, shape: tuple[int, ...], data: bytes, limit: int) -> None:
    """Raise RemoteProtocolError unless dtype/shape are allowed and describe ``data`` (and a
    bool tensor's bytes are canonical)."""
    expected = _layout_bytes(dtype, shape, limit)
    if expected != len(data):
        raise _refuse("tensor", f"shape {shape} of {dtype} needs {expected} bytes, got {len(data)}")
    if dtype == "bool" and data.translate(None, _BOOL_BYTES):
        raise _refuse("tensor", "a bool tensor holds a byte other than 0 and 1")


#: The bytes a bool tensor may hold (NumPy's False and True).
_BOOL_BYTES = b"\x00\x01"


def canonical_bools(data: bytes) -> bytes:
    """``data`` (a bool tensor's bytes) with every byte other than 0 read as 1, as NumPy reads
    it: what a peer's decoder accepts."""
    if not data.translate(None, _BOOL_BYTES):
        return data
    return np.frombuffer(data, dtype=np.uint8).astype(bool).tobytes()


def pack_array(array: np.ndarray) -> tuple[bytes, str, tuple[int, ...]]:
    """``(little-endian bytes, dtype name, shape)`` of ``array``.

    Raises LocalProtocolError for a dtype outside :data:`DTYPES` (cast float64 to float32 first)
    or an array over :data:`MAX_TENSOR_BYTES`.
    """
    name = _dtype_name(array.dtype)
    if name not in DTYPES:
        raise LocalProtocolError(f"dtype {name} cannot be sent; use one of {sorted(DTYPES)}")
    if array.nbytes > MAX_TENSOR_BYTES or array.ndim > MAX_NDIM:
        raise LocalProtocolError(f"array of {array.nbytes} bytes, {array.ndim} dims is too big")
    if not array.nbytes and _span_outside_zeros(array.shape, array.itemsize) > MAX_TENSOR_BYTES:
        # as a peer's decoder would refuse it (_layout_bytes)
        raise LocalProtocolError(f"empty array of shape {array.shape} spans too many bytes")
    wire = np.ascontiguousarray(array, dtype=_WIRE_DTYPES[name])
    data = wire.tobytes() if name != "bool" else canonical_bools(wire.tobytes())
    return data, name, array.shape  # (a shape is a tuple of ints)


@functools.cache
def _dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, remembered (NumPy builds it in Python on every call: ~2 us)."""
    return dtype.name


def unpack_array(
    data: bytes, dtype: str, shape: tuple[int, ...], *, limit: int = MAX_TENSOR_BYTES
) -> np.ndarray:
    """The (read-only) array described by ``data``/``dtype``/``shape``.

    Raises RemoteProtocolError for an unknown dtype, too many or out-of-range dimensions, more
    than ``limit`` bytes, a byte count that does not match ``prod(shape) * itemsize``, or a
    bool tensor holding a byte other than 0 and 1.
    """
    if type(data) is not bytes or type(dtype) is not str or type(shape) is not tuple:
        raise _refuse("tensor", "data, dtype and shape must be bytes, str and tuple")
    _check_layout(dtype, shape, data, limit)
    return np.frombuffer(data, dtype=_WIRE_DTYPES[dtype]).reshape(shape)


@embedded()
@dataclass(frozen=True, slots=True)
class Tensor:
    """An n-dimensional array as it travels: little-endian bytes, a dtype name and a shape."""

    data: bytes
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def from_array(cls, array: np.ndarray) -> Tensor:
        """Pack ``array`` (see :func:`pack_array`)."""
        return cls(*pack_array(array))

    def to_array(self) -> np.ndarray:
        """The array (read-only view of ``data``); RemoteProtocolError if inconsistent."""
        return unpack_array(self.data, self.dtype, self.shape)

    @property
    def rows(self) -> int:
        """Length of the first (batch) axis; 1 for a scalar."""
        return self.shape[0] if self.shape else 1

    def validate(self) -> None:
        """Dtype whitelisted, dimensions bounded, byte count consistent, bools 0 or 1."""
        _check_layout(self.dtype, self.shape, self.data, MAX_TENSOR_BYTES)


#: An empty input: what a :class:`TaskAssign` carries in ``input`` when ``input_ref`` names it.
NO_INPUT = Tensor(b"", "uint8", (0,))
_HEX = frozenset("0123456789abcdef")


@embedded()
@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor named by the hex sha256 of its bytes, for a node that keeps it in its cache."""

    digest: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: Tensor, digest: str) -> TensorRef:
        """The reference to ``tensor``, whose bytes hash to ``digest``."""
        return cls(digest, tensor.dtype, tensor.shape)

    @property
    def nbytes(self) -> int:
        """The byte count of the tensor it names."""
        return math.prod(self.shape) * _ITEM_SIZES[self.dtype]

    def resolve(self, data: bytes) -> Tensor:
        """The tensor, given the cached bytes under :attr:`digest`; RemoteProtocolError if they
        do not fit the dtype and shape."""
        tensor = Tensor(data, self.dtype, self.shape)
        tensor.validate()
        return tensor

    def validate(self) -> None:
        """A 64-character lowercase hex digest; dtype and shape as for a tensor."""
        if len(self.digest) != 64 or not _HEX.issuperset(self.digest):
            raise _refuse("tensor ref", "digest must be 64 lowercase hex characters (sha256)")
        _layout_bytes(self.dtype, self.shape, MAX_TENSOR_BYTES, "tensor ref")


# --- parameters ------------------------------------------------------------------------------


def is_text(value: str) -> bool:
    """Whether ``value`` can be written as UTF-8 (msgpack's strings, the journal's): False for
    one holding a lone surrogate (``"\\ud800"`` in a JSON body decodes to that), which no peer
    can send but a caller or an HTTP client can."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_param(key: Any, value: Any) -> str | None:
    """What is wrong with one parameter, or None."""
    if type(key) is not str or not 0 < len(key) <= MAX_PARAM_KEY_LEN:
        return f"key {key!r:.80} must be a string of 1..{MAX_PARAM_KEY_LEN} characters"
    if not is_text(key):
        return f"key {key!r} holds a lone surrogate, which is not text"
    if type(value) not in _PARAM_TYPES:
        return f"{key}: {type(value).__name__} is not str, int, float, bool or None"
    if type(value) is str and len(value) > MAX_PARAM_STR_LEN:
        return f"{key}: string longer than {MAX_PARAM_STR_LEN}"
    if type(value) is str and not is_text(value):
        return f"{key}: the string holds a lone surrogate, which is not text"
    if type(value) is int and not -(2**63) <= value < 2**64:
        return f"{key}: integer out of the 64-bit range"
    return None


def check_params(params: Any) -> str | None:
    """What is wrong with a parameter map, or None when it is fine."""
    if not isinstance(params, Mapping):
        return "params must be a map"
    if len(params) > MAX_PARAMS:
        return f"{len(params)} params, at most {MAX_PARAMS} allowed"
    for key, value in params.items():
        problem = _check_param(key, value)
        if problem is not None:
            return problem
    return None


def encode_params(params: Mapping[str, ParamValue]) -> bytes:
    """The msgpack blob of a parameter map (LocalProtocolError if it is not a valid one)."""
    problem = check_params(params)
    if problem is not None:
        raise LocalProtocolError(f"invalid params: {problem}")
    return msgpack.packb(dict(params), use_bin_type=True)


def decode_params(blob: bytes) -> dict[str, ParamValue]:
    """Parse a parameter blob from a peer; RemoteProtocolError if anything is off."""
    if len(blob) > MAX_PARAMS_BYTES:
        raise _refuse("params", f"{len(blob)} bytes, at most {MAX_PARAMS_BYTES}")
    try:
        params = msgpack.unpackb(
            blob, raw=False, strict_map_key=True, max_ext_len=0, max_array_len=0,
            max_map_len=MAX_PARAMS,
        )  # fmt: skip
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _refuse("params", f"malformed msgpack: {str(exc) or type(exc).__name__}") from None
    problem = check_params(params) if type(params) is dict else "params must be a map"
    if problem is not None:
        raise _refuse("params", problem)
    return params


# --- messages --------------------------------------------------------------------------------


class FailureKind(enum.IntEnum):
    """Why an attempt failed (:class:`TaskFailed` ``code``). ONLY APPEND."""

    UNKNOWN = 0
    MODEL_NOT_FOUND = 1
    OVERLOADED = 2
    DEADLINE_EXCEEDED = 3
    INFERENCE_ERROR = 4
    BAD_INPUT = 5
    CANCELLED = 6
    SHUTTING_DOWN = 7
    PEER_LOST = 8  # the node this item was offloaded to died, left or dropped its session
    INPUT_NOT_CACHED = 9  # input_ref names bytes the node does not hold: send them inline


#: Failures that say the node never ran the attempt (it refused it, or handed it back unstarted):
#: a coordinator retries them without counting them against ``max_attempts``, and a node that
#: passed such an item on runs it itself when it can.
REFUSALS = frozenset(
    {FailureKind.SHUTTING_DOWN, FailureKind.OVERLOADED, FailureKind.MODEL_NOT_FOUND}
)


def failure_kind(code: int) -> FailureKind:
    """The kind for a code; codes from a newer peer map to ``UNKNOWN``."""
    try:
        return FailureKind(code)
    except ValueError:
        return FailureKind.UNKNOWN


def _check_id(owner: str, field: str, value: str) -> None:
    if not 0 < len(value) <= MAX_ID_LEN:
        raise _refuse(owner, f"{field} must be 1..{MAX_ID_LEN} characters")
    if not is_plain_text(value):
        raise _refuse(owner, f"{field} holds a control character")


def _check_attempt(owner: str, attempt: int) -> None:
    if not 1 <= attempt < 2**32:
        raise _refuse(owner, f"attempt {attempt} outside 1..2**32-1")


@message(type_id=32, max_size=MAX_MESSAGE_SIZE, extensible=True)
@dataclass(frozen=True, slots=True)
class TaskAssign:
    """Coordinator -> node: run one work item (see :class:`~meshinfer.proto.tasks.WorkItem`).

    ``deadline_s`` is the time budget in seconds from receipt (clocks are not synchronised
    across vehicles, so it is relative); ``params`` is an :func:`encode_params` blob.
    ``input_ref`` (with ``input`` empty) names an input the node keeps in its cache;
    ``keep_input`` asks it to keep this one (see the module docstring).
    """

    item_id: str
    task_id: str
    model_id: str
    model_version: str
    input: Tensor
    params: bytes
    deadline_s: float | None
    priority: int
    attempt: int
    input_ref: TensorRef | None = None
    keep_input: bool = False

    def validate(self) -> None:
        """Ids present, attempt positive, deadline non-negative, params well formed; an input
        by reference comes with an empty ``input`` and is not also to be kept."""
        for field in ("item_id", "task_id", "model_id", "model_version"):
            _check_id("TaskAssign", field, getattr(self, field))
        _check_attempt("TaskAssign", self.attempt)
        if self.input_ref is not None and (self.input.data or self.keep_input):
            raise _refuse("TaskAssign", "an input_ref comes with an empty input, not kept")
        if self.deadline_s is not None and not 0 <= self.deadline_s < math.inf:
            raise _refuse("TaskAssign", f"deadline_s {self.deadline_s} is not a finite >= 0")
        if not MIN_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise _refuse("TaskAssign", "priority outside the 32-bit range")
        decode_params(self.params)


def by_reference(msg: TaskAssign, digest: str) -> TaskAssign:
    """``msg`` with its input replaced by a reference to it (its bytes hash to ``digest``)."""
    return replace(msg, input=NO_INPUT, input_ref=TensorRef.of(msg.input, digest), keep_input=False)


@message(type_id=33, max_size=_SMALL_CAP, extensible=True)
@dataclass(frozen=True, slots=True)
class TaskAccepted:
    """Node -> coordinator: the item is queued on the node (``queue_depth`` items ahead)."""

    item_id: str
    attempt: int
    node_id: str
    queue_depth: int = 0

    def validate(self) -> None:
        """Ids present, attempt positive, queue depth non-negative."""
        _check_id("TaskAccepted", "item_id", self.item_id)
        _check_id("TaskAccepted", "node_id", self.node_id)
        _check_attempt("TaskAccepted", self.attempt)
        if not 0 <= self.queue_depth < 2**32:
            raise _refuse("TaskAccepted", f"queue_depth {self.queue_depth} out of range")


@message(type_id=34, max_size=MAX_MESSAGE_SIZE, extensible=True)
@dataclass(frozen=True, slots=True)
class TaskResult:
    """Node -> coordinator: the output of one attempt.

    ``timings`` holds seconds by phase (``queue_s``, ``infer_s``, ``total_s``, ...); ``engine``
    and ``device`` say what ran it (``numpy``/``cpu``, ``cupy``/``cuda:0``, ...).
    """

    item_id: str
    attempt: int
    output: Tensor
    node_id: str
    engine: str
    device: str
    timings: dict[str, float]

    def validate(self) -> None:
        """Ids present, attempt positive, at most MAX_TIMINGS finite non-negative timings."""
        _check_id("TaskResult", "item_id", self.item_id)
        _check_id("TaskResult", "node_id", self.node_id)
        _check_attempt("TaskResult", self.attempt)
        if len(self.engine) > MAX_ID_LEN or len(self.device) > MAX_ID_LEN:
            raise _refuse("TaskResult", f"engine/device longer than {MAX_ID_LEN}")
        if not (is_plain_text(self.engine) and is_plain_text(self.device)):
            raise _refuse("TaskResult", "engine/device holds a control character")
        if len(self.timings) > MAX_TIMINGS:
            raise _refuse("TaskResult", f"more than {MAX_TIMINGS} timings")
        if any(
            not 0 <= v < math.inf or len(k) > 64 or not is_plain_text(k)
            for k, v in self.timings.items()
        ):
            raise _refuse("TaskResult", "timings must be finite, >= 0, with short plain names")


@message(type_id=35, max_size=_SMALL_CAP, extensible=True)
@dataclass(frozen=True, slots=True)
class TaskFailed:
    """Node -> coordinator: the attempt failed. ``code`` is usually a :class:`FailureKind`
    (unknown codes from a newer peer are kept as ints; see :func:`failure_kind`)."""

    item_id: str
    attempt: int
    code: int
    message: str
    retryable: bool

    def validate(self) -> None:
        """Ids present, attempt positive, code 16-bit, message bounded."""
        _check_id("TaskFailed", "item_id", self.item_id)
        _check_attempt("TaskFailed", self.attempt)
        if not 0 <= self.code <= 0xFFFF:
            raise _refuse("TaskFailed", f"code {self.code} out of range 0..65535")
        if len(self.message) > MAX_ERROR_LEN:
            raise _refuse("TaskFailed", f"message longer than {MAX_ERROR_LEN}")


@message(type_id=36, max_size=_SMALL_CAP, extensible=True)
@dataclass(frozen=True, slots=True)
class TaskCancel:
    """Coordinator -> node: stop working on ``item_id`` (best effort; a result may still come)."""

    item_id: str
    reason: str = ""

    def validate(self) -> None:
        """Item id present, reason bounded."""
        _check_id("TaskCancel", "item_id", self.item_id)
        if len(self.reason) > MAX_ERROR_LEN:
            raise _refuse("TaskCancel", f"reason longer than {MAX_ERROR_LEN}")
