"""Multi-layer perceptron weights, their file format, and the forward pass shared by engines.

A model is a stack of dense layers ``h = relu(h @ W + b)`` with a softmax after the last one.
Weights live in an ``.npz`` file with arrays ``W0, b0, W1, b1, ...`` (float32). The writer here
produces byte-identical files for identical arrays (fixed zip timestamps), so a model's sha256
is a function of its weights alone.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshinfer.atomic_files import replace_file
from meshinfer.errors import (  # the batch errors: here too, where they were first
    BatchShapeError,
    InferenceError,
    NonFiniteInputError,
)

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
MAX_WEIGHTS_BYTES = 1 << 31
"""Most bytes of array data a weights file may hold (2 GiB). Checked against the archive's
directory and each array's header before anything is allocated, so no file, however it lies
about its sizes, makes a node allocate more."""
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
# What NumPy and zipfile raise on a damaged archive or member.
_MALFORMED = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    NotImplementedError,
    RuntimeError,
    zipfile.BadZipFile,
    zlib.error,
)


@dataclass(frozen=True, slots=True)
class DenseLayer:
    """One dense layer: ``weight`` is [fan_in, fan_out], ``bias`` is [fan_out], both float32."""

    weight: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True, slots=True)
class MLPWeights:
    """The layers of an MLP, input first. Hidden layers use ReLU; the last feeds a softmax."""

    layers: tuple[DenseLayer, ...]

    @property
    def input_dim(self) -> int:
        """Width of one input sample."""
        return int(self.layers[0].weight.shape[0])

    @property
    def output_dim(self) -> int:
        """Number of output classes."""
        return int(self.layers[-1].weight.shape[1])

    @property
    def macs_per_row(self) -> int:
        """Multiply-adds of a forward pass, per input row."""
        return sum(int(layer.weight.shape[0] * layer.weight.shape[1]) for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes taken by all weights and biases."""
        return sum(layer.weight.nbytes + layer.bias.nbytes for layer in self.layers)

    @classmethod
    def from_arrays(cls, arrays: Iterable[tuple[np.ndarray, np.ndarray]]) -> MLPWeights:
        """Build from (weight, bias) pairs, casting to contiguous float32 and checking shapes."""
        layers = tuple(
            DenseLayer(np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32))
            for w, b in arrays
        )
        _check_shapes(layers)
        return cls(layers)


def _check_shapes(layers: tuple[DenseLayer, ...]) -> None:
    if not layers:
        raise InferenceError("an MLP needs at least one layer")
    width = layers[0].weight.shape[0]
    for i, layer in enumerate(layers):
        if layer.weight.ndim != 2 or layer.weight.shape[0] != width:
            raise InferenceError(f"layer {i}: weight shape {layer.weight.shape} does not chain")
        if layer.weight.size == 0:
            raise InferenceError(f"layer {i}: weight shape {layer.weight.shape} is empty")
        if layer.bias.shape != (layer.weight.shape[1],):
            raise InferenceError(f"layer {i}: bias shape {layer.bias.shape} does not match")
        width = layer.weight.shape[1]


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise named arrays to a reproducible ``.npz`` (same arrays -> same bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def weights_to_bytes(weights: MLPWeights) -> bytes:
    """Serialise to a reproducible ``.npz`` with arrays ``W0, b0, W1, b1, ...``."""
    arrays: dict[str, np.ndarray] = {}
    for i, layer in enumerate(weights.layers):
        arrays[f"W{i}"] = layer.weight
        arrays[f"b{i}"] = layer.bias
    return npz_bytes(arrays)


def weights_from_bytes(data: bytes, *, max_bytes: int = MAX_WEIGHTS_BYTES) -> MLPWeights:
    """Parse an ``.npz`` written by :func:`weights_to_bytes`. Raises InferenceError if malformed.

    The archive must hold exactly the arrays ``W0, b0, ..., W<n-1>, b<n-1>``, of real numbers,
    finite, and at most ``max_bytes`` in all. Nothing is unpickled, and every array's size is
    checked against its header and its member before any memory is allocated for it.
    """
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise InferenceError("malformed weights file: not an .npz archive")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            arrays = _read_members(archive, max_bytes)
        weights = MLPWeights.from_arrays(_layer_pairs(arrays))
    except _MALFORMED as exc:
        raise InferenceError(f"malformed weights file: {exc!r}") from exc
    for i, layer in enumerate(weights.layers):
        if not (np.isfinite(layer.weight).all() and np.isfinite(layer.bias).all()):
            raise InferenceError(f"malformed weights file: layer {i} holds NaN or infinity")
    return weights


def _read_members(archive: zipfile.ZipFile, max_bytes: int) -> dict[str, np.ndarray]:
    members = archive.infolist()
    names = [member.filename.removesuffix(".npy") for member in members]
    if len(set(names)) != len(names):
        raise InferenceError("malformed weights file: an array name repeats")
    total = sum(member.file_size for member in members)
    if total > max_bytes:
        raise InferenceError(f"weights file holds {total} bytes, more than {max_bytes}")
    return {name: _read_npy(archive, member) for name, member in zip(names, members, strict=True)}


def _read_npy(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` member, its header checked before its data is read (never unpickles)."""
    name = member.filename
    with archive.open(member) as stream:
        version = np.lib.format.read_magic(stream)
        if version not in _NPY_HEADER_READERS:
            raise InferenceError(f"malformed weights file: {name}: .npy format {version}")
        shape, fortran_order, dtype = _NPY_HEADER_READERS[version](stream)
        if dtype.kind not in "fiu":
            raise InferenceError(f"malformed weights file: {name}: dtype {dtype} is not real")
        size = math.prod(shape) * dtype.itemsize
        if member.file_size - stream.tell() != size:
            raise InferenceError(
                f"malformed weights file: {name}: header says {shape} {dtype} ({size} bytes), "
                f"the member holds {member.file_size - stream.tell()}"
            )
        raw = stream.read(size)
    array = np.frombuffer(raw, dtype=dtype)  # raises if the member was shorter than it said
    return array.reshape(shape, order="F" if fortran_order else "C")


def _layer_pairs(arrays: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    count = (len(arrays) + 1) // 2
    expected = {f"{kind}{i}" for i in range(count) for kind in "Wb"}
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays))[:4], sorted(set(arrays) - expected)[:4]
        raise InferenceError(
            f"malformed weights file: {len(arrays)} arrays are not W0, b0, ..., W<n-1>, b<n-1> "
            f"(missing {missing}, unexpected {extra})"
        )
    return [(arrays[f"W{i}"], arrays[f"b{i}"]) for i in range(count)]


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def save_weights(weights: MLPWeights, path: Path) -> str:
    """Write ``weights`` to ``path`` (atomically: a reader never sees half a file); return the
    file's sha256."""
    data = weights_to_bytes(weights)
    replace_file(Path(path), data)
    return sha256_hex(data)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in place; returns ``logits``."""
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def forward(weights: MLPWeights, batch: np.ndarray) -> np.ndarray:
    """Class probabilities (float32, [batch, classes]) for a float32 [batch, input_dim] array.

    A row whose finite values are too large for the model (its sums overflow float32) comes out
    NaN, without a RuntimeWarning: the caller fails that row's request (the dynamic batcher
    checks outputs), and the other rows are exact."""
    h = batch
    last = len(weights.layers) - 1
    with np.errstate(over="ignore", invalid="ignore"):
        for i, layer in enumerate(weights.layers):
            h = h @ layer.weight
            h += layer.bias
            if i < last:
                np.maximum(h, 0.0, out=h)
        return softmax_rows(h)


def check_batch(batch: object, input_dim: int, max_batch_size: int) -> np.ndarray:
    """Check a batch's shape and dtype kind (cheap: no copy); raises BatchShapeError."""
    if not isinstance(batch, np.ndarray):
        raise BatchShapeError(f"a batch must be a NumPy array, not {type(batch).__name__}")
    if batch.ndim != 2 or batch.shape[1] != input_dim:
        raise BatchShapeError(f"batch shape {batch.shape} does not match [-1, {input_dim}]")
    if not 1 <= batch.shape[0] <= max_batch_size:
        raise BatchShapeError(f"batch of {batch.shape[0]} is outside 1..{max_batch_size}")
    if batch.dtype.kind not in "fiub":
        raise BatchShapeError(f"batch dtype {batch.dtype} is not numeric")
    return batch


def as_float32(batch: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 view or copy of ``batch`` (may copy: call off the loop)."""
    return np.ascontiguousarray(batch, dtype=np.float32)


def finite_float32(batch: np.ndarray) -> np.ndarray:
    """:func:`as_float32` of ``batch``; raises NonFiniteInputError if it holds NaN or infinity
    (a float64 too large for float32 included). Linear in the batch: call off the loop."""
    with np.errstate(over="ignore", invalid="ignore"):
        array = as_float32(batch)
    check_finite(array)
    return array


def check_finite(batch: np.ndarray) -> None:
    """Raise NonFiniteInputError naming the rows (first axis) of ``batch`` with NaN or infinity.

    Arrays of other than floating or complex numbers always pass."""
    if batch.dtype.kind not in "fc" or batch.size == 0 or np.isfinite(batch).all():
        return
    finite = np.isfinite(batch.reshape(len(batch), -1)).all(axis=1)
    bad = np.flatnonzero(~finite)
    raise NonFiniteInputError(
        f"{len(bad)} of {len(batch)} rows hold NaN or infinity (first: {bad[:4].tolist()})"
    )
