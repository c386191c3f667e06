"""The NumPy engine: the embedded CPU default, and the shared frame of the local MLP engines.

:class:`LocalMLPEngine` holds what every in-process engine does the same way: resolving refs in
a :class:`ModelRegistry`, loading weights off the loop, checking batches against the model's
schema, and running the forward pass in a :class:`BoundedExecutor`. Subclasses say how weights
are prepared for their device (``_prepare``) and how a batch runs there (``_forward``); both are
called in a worker thread, never on the event loop -- except a forward pass small enough
(``_runs_inline``) that handing it to a thread and back would cost more than it does: the NumPy
engine runs those on the loop (see :data:`INLINE_MAX_MACS`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import psutil

from meshinfer.closing import OneClose
from meshinfer.errors import LocalProtocolError, ModelNotFoundError
from meshinfer.inference.base import CHECKED_BATCH, EngineCapacity, ModelRef, TensorSpec
from meshinfer.inference.executor import BoundedExecutor
from meshinfer.inference.mlp import MLPWeights, as_float32, check_batch, finite_float32, forward
from meshinfer.inference.registry import ModelInfo, ModelRegistry, default_registry

INLINE_MAX_MACS = 1 << 18
"""Largest forward pass (multiply-adds: rows x the model's weights) the NumPy engine runs on the
event loop itself: ~20 us on one core, less than a round trip through a worker thread (~50-100 us
on loopback benchmarks). Bigger batches go to the worker threads, where BLAS releases the GIL."""


class LocalMLPEngine:
    """Common frame of the NumPy and CuPy engines (see the module docstring)."""

    name = "local"

    def __init__(
        self,
        registry: ModelRegistry | None,
        executor: BoundedExecutor,
        max_batch_size: int,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.registry = registry if registry is not None else default_registry()
        self.max_batch_size = max_batch_size
        self._executor = executor
        self._loaded: dict[ModelRef, tuple[ModelInfo, Any]] = {}
        self._closed = False
        self._one_close = OneClose()

    @property
    def loaded_models(self) -> tuple[ModelInfo, ...]:
        """The loaded models with their hashes, e.g. for gossip ``(id, version, sha256)``."""
        return tuple(info for info, _ in self._loaded.values())

    def is_loaded(self, ref: ModelRef) -> bool:
        """True if ``ref`` is loaded and ready to run."""
        return ref in self._loaded

    def input_spec(self, ref: ModelRef) -> TensorSpec | None:
        """The input tensor of loaded model ``ref`` (None if not loaded); cheap, on the loop.
        A batcher built without a spec checks requests against it."""
        loaded = self._loaded.get(ref)
        return None if loaded is None else loaded[0].inputs[0]

    async def load(self, ref: ModelRef) -> None:
        """Load ``ref`` from the registry (off the loop); idempotent. Raises ModelNotFoundError."""
        self._check_open()
        if ref in self._loaded:
            return
        info = self.registry.get(ref)
        prepared = await self._executor.run(self._load_and_prepare, info)
        if self._closed:
            return
        self._loaded.setdefault(ref, (info, prepared))

    def _load_and_prepare(self, info: ModelInfo) -> Any:
        return self._prepare(info.load_weights())

    async def unload(self, ref: ModelRef) -> None:
        """Forget a loaded model; idempotent. A batch already running finishes."""
        self._loaded.pop(ref, None)

    async def infer(self, ref: ModelRef, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 [batch, classes]. Raises ModelNotFoundError if not loaded,
        BatchShapeError if ``batch`` does not fit the model's input, NonFiniteInputError (one)
        if it holds NaN or infinity as float32 -- unless ``batch`` is the float32 array a
        :class:`~meshinfer.inference.batching.DynamicBatcher` hands it as already checked
        (:data:`~meshinfer.inference.base.CHECKED_BATCH`): each of its requests was, before
        it joined the batch, so that a bad one fails alone; it is not checked twice."""
        self._check_open()
        try:
            info, prepared = self._loaded[ref]
        except KeyError:
            raise ModelNotFoundError(f"model {ref} is not loaded on {self.name}") from None
        check_batch(batch, info.inputs[0].shape[1], self.max_batch_size)
        checked = batch.dtype == np.float32 and batch is CHECKED_BATCH.get()
        if self._runs_inline(prepared, len(batch)):
            return self._checked_forward(prepared, batch, checked)
        return await self._executor.run(self._checked_forward, prepared, batch, checked)

    def _checked_forward(self, prepared: Any, batch: np.ndarray, checked: bool) -> np.ndarray:
        return self._forward(prepared, as_float32(batch) if checked else finite_float32(batch))

    def capacity(self) -> EngineCapacity:
        """Device, batch limit, free memory and loaded models, without blocking."""
        return EngineCapacity(
            device=self._device_name(),
            max_batch_size=self.max_batch_size,
            free_memory_bytes=None if self._closed else self._free_memory(),
            loaded_models=tuple(self._loaded),
            ready=not self._closed,
        )

    async def aclose(self) -> None:
        """Wait for running batches, drop the models and the executor. Idempotent: the close
        runs once, in a task of its own, which a cancelled caller leaves running and every
        later call waits for."""
        self._closed = True
        await self._one_close.run(self._close)

    async def _close(self) -> None:
        await self._executor.aclose()
        self._loaded.clear()
        await self._release()

    async def __aenter__(self) -> LocalMLPEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError(f"{self.name} engine is closed")

    # --- device hooks (worker thread, except _device_name/_free_memory/_release) -------------

    def _prepare(self, weights: MLPWeights) -> Any:
        raise NotImplementedError

    def _forward(self, prepared: Any, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _runs_inline(self, prepared: Any, rows: int) -> bool:
        """On the loop: whether a batch of ``rows`` is cheap enough to run right here."""
        return False

    def _device_name(self) -> str:
        raise NotImplementedError

    def _free_memory(self) -> int | None:
        raise NotImplementedError

    async def _release(self) -> None:
        return None


class NumpyEngine(LocalMLPEngine):
    """Runs MLPs on the CPU with NumPy (float32, BLAS-backed matmul).

    ``max_workers`` threads run batches in parallel (NumPy's BLAS releases the GIL). A batch of
    at most ``inline_max_macs`` multiply-adds runs on the event loop instead (0: never).
    """

    name = "numpy"

    def __init__(
        self,
        registry: ModelRegistry | None = None,
        *,
        max_workers: int = 1,
        max_batch_size: int = 1024,
        inline_max_macs: int = INLINE_MAX_MACS,
    ) -> None:
        if inline_max_macs < 0:
            raise ValueError("inline_max_macs must be >= 0")
        executor = BoundedExecutor(max_workers, name="meshinfer-numpy")
        super().__init__(registry, executor, max_batch_size)
        self.inline_max_macs = inline_max_macs

    def _prepare(self, weights: MLPWeights) -> MLPWeights:
        return weights

    def _runs_inline(self, prepared: MLPWeights, rows: int) -> bool:
        return rows * prepared.macs_per_row <= self.inline_max_macs

    def _forward(self, prepared: MLPWeights, batch: np.ndarray) -> np.ndarray:
        return forward(prepared, as_float32(batch))

    def _device_name(self) -> str:
        return "cpu"

    def _free_memory(self) -> int | None:
        return int(psutil.virtual_memory().available)
