"""The CuPy engine: MLP inference on an NVIDIA GPU.

Weights are uploaded once on ``load`` and stay resident on the device. Each worker thread of
the engine's :class:`BoundedExecutor` owns a non-blocking CUDA stream and page-locked (pinned)
staging buffers; a batch goes host -> pinned -> device asynchronously on that stream, runs the
forward pass there (cuBLAS GEMMs, a fused bias+ReLU kernel per hidden layer and a fused
bias+softmax kernel at the end), and comes back device -> pinned -> host before the stream is
synchronised. Batches of up to ``graph_max_rows`` rows instead replay a CUDA graph captured
once per power-of-two bucket, copies included, which cuts the per-batch launch overhead to one
graph launch. Every CuPy call blocks its thread, so all of them run in the executor, never on
the event loop. TF32 is not used: results match the NumPy engine to float32 rounding.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshinfer.errors import InferenceError
from meshinfer.inference.base import ModelRef
from meshinfer.inference.executor import BoundedExecutor
from meshinfer.inference.mlp import MLPWeights
from meshinfer.inference.numpy_engine import LocalMLPEngine
from meshinfer.inference.registry import ModelRegistry

try:  # CuPy is optional: the engine refuses to start without it.
    import cupy
    import cupyx
except ImportError as _exc:  # pragma: no cover - depends on the host
    cupy = cupyx = None
    _IMPORT_ERROR: str = f"{type(_exc).__name__}: {_exc}"
else:
    _IMPORT_ERROR = ""

_log = logging.getLogger(__name__)

_BIAS_RELU_SRC = "T v = x + b; y = v > (T)0 ? v : (T)0;"
_BIAS_SOFTMAX_SRC = """
    const ptrdiff_t row = i * classes;
    T top = logits[row] + bias[0];
    for (int j = 1; j < classes; ++j) top = max(top, logits[row + j] + bias[j]);
    T total = 0;
    for (int j = 0; j < classes; ++j) {
        T e = exp(logits[row + j] + bias[j] - top);
        probs[row + j] = e;
        total += e;
    }
    for (int j = 0; j < classes; ++j) probs[row + j] /= total;
"""


def cupy_unavailable_reason(device: int = 0) -> str | None:
    """None if CuPy imports and sees GPU ``device``; else a short reason (for skips and logs)."""
    if cupy is None:
        return f"CuPy not importable ({_IMPORT_ERROR})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        return f"no NVIDIA GPU ({type(exc).__name__}: {exc})"
    if device >= count:
        return f"no NVIDIA GPU {device} (found {count})"
    return None


def graph_bucket(rows: int) -> int:
    """The padded batch size a CUDA graph is captured for: the next power of two."""
    return 1 << (rows - 1).bit_length()


@dataclass(frozen=True, slots=True, eq=False)
class DeviceMLP:
    """An MLP's weights resident on one GPU: ((weight, bias), ...) as cupy float32 arrays.

    ``graphs`` caches captured CUDA graphs by (worker thread id, bucket); ``None`` marks a
    bucket whose forward pass could not be captured (it then runs eagerly).
    """

    layers: tuple[tuple[Any, Any], ...]
    input_dim: int
    output_dim: int
    graphs: dict[tuple[int, int], GraphPlan | None] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Device bytes held by weights and biases."""
        return sum(w.nbytes + b.nbytes for w, b in self.layers)


@dataclass(frozen=True, slots=True)
class GraphPlan:
    """A captured forward pass for ``bucket`` rows: pinned in -> device -> pinned out."""

    graph: Any
    stream: Any
    staged_in: np.ndarray
    staged_out: np.ndarray
    buffers: tuple[Any, ...]  # device arrays the graph reads and writes; kept alive here

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Replay the graph for ``batch`` (at most ``bucket`` rows). Blocking."""
        rows = batch.shape[0]
        np.copyto(self.staged_in[:rows], batch, casting="unsafe")
        self.graph.launch(self.stream)
        self.stream.synchronize()
        return self.staged_out[:rows].copy()


class _ThreadState(threading.local):
    """Per worker thread: its CUDA stream and pinned staging buffers by (role, cols)."""

    stream: Any = None
    pinned: dict[tuple[str, int], np.ndarray]

    def __init__(self) -> None:
        self.pinned = {}


class _AllocationCounter:
    """A CuPy memory hook counting pool allocations (a captured graph must make none)."""

    def __init__(self) -> None:
        self.count = 0
        self._hook = _make_hook(self)

    def __enter__(self) -> _AllocationCounter:
        self._hook.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hook.__exit__(*exc_info)


def _make_hook(counter: _AllocationCounter) -> Any:
    class Hook(cupy.cuda.MemoryHook):
        name = "meshinfer_allocation_counter"

        def malloc_preprocess(self, **kwargs: Any) -> None:
            counter.count += 1

    return Hook()


class CupyEngine(LocalMLPEngine):
    """Runs MLPs on NVIDIA GPU ``device`` with CuPy. Raises InferenceError if CuPy or the GPU is
    missing. ``max_workers`` threads (each with its own stream) run batches concurrently.

    Batches of up to ``graph_max_rows`` rows replay a CUDA graph captured per power-of-two
    bucket (one launch instead of a dozen; rows are padded, padding rows are ignored); larger
    batches, or all with ``graph_max_rows=0``, launch their kernels one by one.
    """

    name = "cupy"

    def __init__(
        self,
        registry: ModelRegistry | None = None,
        *,
        device: int = 0,
        max_workers: int = 1,
        max_batch_size: int = 1024,
        graph_max_rows: int = 256,
    ) -> None:
        reason = cupy_unavailable_reason(device)
        if reason is not None:
            raise InferenceError(f"CuPy engine unavailable: {reason}")
        self.device_id = device
        self.graph_max_rows = min(graph_max_rows, max_batch_size)
        self._device = cupy.cuda.Device(device)
        self._threads = _ThreadState()
        self._bias_relu = cupy.ElementwiseKernel(
            "T x, T b", "T y", _BIAS_RELU_SRC, "meshinfer_bias_relu"
        )
        self._bias_softmax = cupy.ElementwiseKernel(
            "raw T logits, raw T bias, int32 classes",
            "raw T probs",
            _BIAS_SOFTMAX_SRC,
            "meshinfer_bias_softmax",
        )
        executor = BoundedExecutor(max_workers, name="meshinfer-cupy", initializer=self._device.use)
        super().__init__(registry, executor, max_batch_size)

    def device_weights(self, ref: ModelRef) -> DeviceMLP:
        """The device-resident weights of loaded model ``ref`` (for inspection and tests)."""
        try:
            return self._loaded[ref][1]
        except KeyError:
            raise InferenceError(f"model {ref} is not loaded on {self.name}") from None

    def graph_buckets(self, ref: ModelRef) -> tuple[int, ...]:
        """Buckets (padded batch sizes) of ``ref`` that replay a captured CUDA graph."""
        graphs = self.device_weights(ref).graphs.copy()  # (a worker may add one meanwhile)
        return tuple(sorted({bucket for (_, bucket), plan in graphs.items() if plan}))

    # --- worker-thread hooks -----------------------------------------------------------------

    def _prepare(self, weights: MLPWeights) -> DeviceMLP:
        with self._device:
            stream = self._stream()
            with stream:
                layers = tuple(
                    (cupy.asarray(layer.weight), cupy.asarray(layer.bias))
                    for layer in weights.layers
                )
            stream.synchronize()
        return DeviceMLP(layers, weights.input_dim, weights.output_dim)

    def _forward(self, model: DeviceMLP, batch: np.ndarray) -> np.ndarray:
        with self._device:
            rows = batch.shape[0]
            if rows <= self.graph_max_rows:
                plan = self._graph_plan(model, graph_bucket(rows))
                if plan is not None:
                    return plan.run(batch)
            return self._eager_forward(model, batch)

    def _eager_forward(self, model: DeviceMLP, batch: np.ndarray) -> np.ndarray:
        stream = self._stream()
        rows = batch.shape[0]
        staged_in = self._pinned("in", model.input_dim)[:rows]
        staged_out = self._pinned("out", model.output_dim)[:rows]
        np.copyto(staged_in, batch, casting="unsafe")
        with stream:
            inputs = cupy.empty((rows, model.input_dim), dtype=cupy.float32)
            _to_device(inputs, staged_in, stream)
            h = inputs
            for weight, bias in model.layers[:-1]:
                h = cupy.matmul(h, weight)
                self._bias_relu(h, bias, h)
            logits = cupy.matmul(h, model.layers[-1][0])
            probs = cupy.empty_like(logits)
            self._softmax(model, logits, probs)
            _to_host(staged_out, probs, stream)
        stream.synchronize()
        return staged_out.copy()

    def _softmax(self, model: DeviceMLP, logits: Any, probs: Any) -> None:
        classes = np.int32(model.output_dim)
        self._bias_softmax(logits, model.layers[-1][1], classes, probs, size=logits.shape[0])

    def _graph_plan(self, model: DeviceMLP, bucket: int) -> GraphPlan | None:
        key = (threading.get_ident(), bucket)
        if key not in model.graphs:
            model.graphs[key] = self._capture(model, bucket)
        return model.graphs[key]

    def _capture(self, model: DeviceMLP, bucket: int) -> GraphPlan | None:
        """Capture the forward pass for ``bucket`` rows into preallocated buffers, or None."""
        stream = self._stream()
        staged_in = cupyx.zeros_pinned((bucket, model.input_dim), dtype=np.float32)
        staged_out = cupyx.zeros_pinned((bucket, model.output_dim), dtype=np.float32)
        widths = [weight.shape[1] for weight, _ in model.layers]
        inputs = cupy.zeros((bucket, model.input_dim), dtype=cupy.float32)
        hidden = [cupy.empty(bucket * max(widths[:-1], default=1), cupy.float32) for _ in "ab"]
        logits = cupy.empty((bucket, model.output_dim), dtype=cupy.float32)
        probs = cupy.empty_like(logits)
        buffers = (inputs, *hidden, logits, probs)

        gemm = _RawSgemm.for_stream(stream)
        if gemm is None:
            return None

        def forward_into_buffers() -> None:
            _to_device(inputs, staged_in, stream)
            h = inputs
            for i, (weight, bias) in enumerate(model.layers[:-1]):
                out = hidden[i % 2][: bucket * weight.shape[1]].reshape(bucket, weight.shape[1])
                gemm(h, weight, out)
                self._bias_relu(out, bias, out)
                h = out
            gemm(h, model.layers[-1][0], logits)
            self._softmax(model, logits, probs)
            _to_host(staged_out, probs, stream)

        with stream:
            with _AllocationCounter() as allocations:
                forward_into_buffers()  # warm-up: compiles kernels, sets up cuBLAS
            stream.synchronize()
            if allocations.count:
                _log.info("forward pass allocates; bucket %d runs without a CUDA graph", bucket)
                return None
            graph = _capture_graph(stream, forward_into_buffers)
        if graph is None:
            return None
        return GraphPlan(graph, stream, staged_in, staged_out, buffers)

    def _stream(self) -> Any:
        if self._threads.stream is None:
            self._threads.stream = cupy.cuda.Stream(non_blocking=True)
        return self._threads.stream

    def _pinned(self, role: str, cols: int) -> np.ndarray:
        """A pinned float32 [max_batch_size, cols] buffer of this thread, made on first use."""
        key = (role, cols)
        buffer = self._threads.pinned.get(key)
        if buffer is None:
            buffer = cupyx.empty_pinned((self.max_batch_size, cols), dtype=np.float32)
            self._threads.pinned[key] = buffer
        return buffer

    # --- loop-thread hooks -------------------------------------------------------------------

    def _device_name(self) -> str:
        return f"cuda:{self.device_id}"

    def _free_memory(self) -> int | None:
        """Free device memory plus what CuPy's pool holds unused (both usable for batches)."""
        with self._device:
            free, _total = cupy.cuda.runtime.memGetInfo()
            pooled = cupy.get_default_memory_pool().free_bytes()
        return int(free + pooled)

    async def _release(self) -> None:
        with self._device:
            cupy.get_default_memory_pool().free_all_blocks()


class _RawSgemm:
    """Row-major float32 ``out = a @ b`` through cuBLAS called directly (via ctypes).

    CuPy's own cuBLAS wrappers re-bind the stream on every call and refuse to do that while a
    stream is being captured, so a captured forward pass calls ``cublasSgemm_v2`` itself on
    CuPy's per-thread handle, bound to ``stream`` once before capture. Host pointer mode and
    default math mode (no TF32), as CuPy sets them.
    """

    _library: Any = None

    def __init__(self, handle: int) -> None:
        self._handle = ctypes.c_void_p(handle)
        self._one = ctypes.c_float(1.0)
        self._zero = ctypes.c_float(0.0)

    @classmethod
    def for_stream(cls, stream: Any) -> _RawSgemm | None:
        """A GEMM bound to ``stream`` on this thread's cuBLAS handle; None if unavailable."""
        from cupy_backends.cuda.libs import cublas

        handle = cupy.cuda.device.get_cublas_handle()  # loads libcublas if not yet loaded
        if cls._load() is None:
            return None
        cublas.setStream(handle, stream.ptr)
        return cls(handle)

    @classmethod
    def _load(cls) -> Any:
        if cls._library is None:
            path = _loaded_library_path("libcublas.so")
            if path is None:
                _log.warning("libcublas is not loaded; CUDA graphs disabled")
                cls._library = False
                return None
            library = ctypes.CDLL(path)
            library.cublasSgemm_v2.restype = ctypes.c_int
            library.cublasSgemm_v2.argtypes = [ctypes.c_void_p, *[ctypes.c_int] * 5]
            library.cublasSgemm_v2.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            library.cublasSgemm_v2.argtypes += [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
            library.cublasSgemm_v2.argtypes += [ctypes.c_void_p, ctypes.c_int]
            cls._library = library
        return cls._library or None

    def __call__(self, a: Any, b: Any, out: Any) -> None:
        # Row-major C[m,n] = A[m,k] B[k,n] is column-major C^T = B^T A^T: swap the operands.
        rows, inner = a.shape
        cols = b.shape[1]
        status = self._library.cublasSgemm_v2(
            self._handle, 0, 0, cols, rows, inner, ctypes.byref(self._one), b.data.ptr, cols,
            a.data.ptr, inner, ctypes.byref(self._zero), out.data.ptr, cols,
        )  # fmt: skip
        if status != 0:
            raise InferenceError(f"cublasSgemm_v2 failed with status {status}")


def _loaded_library_path(stem: str) -> str | None:
    """Path of the shared library ``stem*`` already mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith(stem):
                    return path
    except OSError:
        return None
    return None


def _capture_graph(stream: Any, body: Callable[[], None]) -> Any:
    """Capture ``body``'s work on ``stream`` into a CUDA graph; None if capture fails."""
    try:
        stream.begin_capture()
    except Exception as exc:
        _log.warning("CUDA graph capture unavailable: %s", exc)
        return None
    try:
        body()
    except Exception as exc:
        _log.warning("CUDA graph capture failed: %s", exc)
        with contextlib.suppress(Exception):
            stream.end_capture()
        return None
    try:
        return stream.end_capture()
    except Exception as exc:  # (the capture was invalidated): the bucket runs eagerly, rather
        _log.warning("CUDA graph capture failed: %s", exc)  # than fail every batch of it
        return None


def _to_device(dst: Any, src: np.ndarray, stream: Any) -> None:
    """Asynchronous copy from pinned host ``src`` into device ``dst`` (same byte size)."""
    cupy.cuda.runtime.memcpyAsync(
        dst.data.ptr, src.ctypes.data, src.nbytes, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr
    )


def _to_host(dst: np.ndarray, src: Any, stream: Any) -> None:
    """Asynchronous copy from device ``src`` into pinned host ``dst`` (same byte size)."""
    cupy.cuda.runtime.memcpyAsync(
        dst.ctypes.data, src.data.ptr, dst.nbytes, cupy.cuda.runtime.memcpyDeviceToHost, stream.ptr
    )
