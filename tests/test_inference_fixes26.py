"""The batcher in front of a real engine: one bad request fails alone, whatever makes it bad.

Float64 inputs that overflow float32, huge finite inputs that overflow inside the model, wrong
shapes with no ``input_spec``, batches over the engine's own limit, large inputs (checked in the
batcher's worker thread, not on the loop) and requests cancelled once in a batch. The NumPy
engine, and a real Triton server (PyTriton on CPU, started once for the module's last tests).
"""

from __future__ import annotations

import asyncio
import platform
import sys
import threading

import numpy as np
import pytest

from meshinfer.errors import BatchShapeError, InferenceError, NonFiniteInputError
from meshinfer.inference.base import EngineCapacity, ModelRef, TensorSpec
from meshinfer.inference.batching import INLINE_MAX_BYTES, BatcherConfig, DynamicBatcher
from meshinfer.inference.mlp import forward
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import DIGITS_REF, ModelRegistry, synthetic_model
from meshinfer.inference.synthetic import SyntheticSpec, make_weights
from meshinfer.inference.triton_engine import TritonEngine
from meshinfer.testing.triton_server import TritonServerProcess
from node.config import ExecutorSection
from node.executor import TaskExecutor

SPEC = SyntheticSpec(8, 2)
REF = SPEC.ref
WIDE = SyntheticSpec(1024, 1)  # 4 KiB a float32 row: large requests in few rows
CONFIG = BatcherConfig(max_batch_size=8, max_queue_delay_s=0.05)


def engine_for(*specs: SyntheticSpec, **kwargs: object) -> NumpyEngine:
    registry = ModelRegistry(tuple(synthetic_model(s) for s in specs or (SPEC,)))
    return NumpyEngine(registry, **kwargs)  # type: ignore[arg-type]


def expected(batch: np.ndarray, spec: SyntheticSpec = SPEC) -> np.ndarray:
    return forward(make_weights(spec), np.ascontiguousarray(batch, np.float32))


async def submit_all(batcher: DynamicBatcher, *requests: np.ndarray) -> list[object]:
    async with asyncio.timeout(10):
        return await asyncio.gather(*map(batcher.submit, requests), return_exceptions=True)


async def test_float64_that_overflows_float32_fails_alone() -> None:
    good = np.linspace(0, 1, 16).reshape(2, 8)
    async with engine_for() as engine:
        await engine.load(REF)
        async with DynamicBatcher(engine, REF, CONFIG) as batcher:
            first, bad, last = await submit_all(batcher, good, np.full((1, 8), 1e300), good * 2)
            stats = batcher.stats()
    assert isinstance(bad, NonFiniteInputError)
    assert str(REF) in str(bad) and "float32" in str(bad)
    np.testing.assert_allclose(first, expected(good), rtol=1e-6)
    np.testing.assert_allclose(last, expected(good * 2), rtol=1e-6)
    assert (stats.submitted, stats.failed) == (2, 0)  # refused at submit: never queued


async def test_float32_overflow_is_checked_against_an_explicit_input_spec_too() -> None:
    spec = TensorSpec("features", "float32", (-1, 8))
    async with engine_for() as engine:
        await engine.load(REF)
        async with DynamicBatcher(engine, REF, CONFIG, input_spec=spec) as batcher:
            single, bad = await submit_all(batcher, np.ones(8), np.full(8, -1e39))
    assert isinstance(bad, NonFiniteInputError)
    np.testing.assert_allclose(single, expected(np.ones((1, 8)))[0], rtol=1e-6)


async def test_inputs_that_overflow_inside_the_model_fail_alone_with_a_reason() -> None:
    good = np.full((1, 8), 0.5, np.float32)
    huge = np.full((2, 8), 3e38, np.float32)  # finite, but the first matmul overflows
    async with engine_for() as engine:
        await engine.load(REF)
        async with DynamicBatcher(engine, REF, CONFIG) as batcher:
            with np.errstate(over="ignore", invalid="ignore"):
                first, bad, last = await submit_all(batcher, good, huge, good)
            stats = batcher.stats()
    assert isinstance(bad, InferenceError) and not isinstance(bad, BatchShapeError)
    assert "NaN or infinity" in str(bad) and "2 of the request's 2 rows" in str(bad)
    for result in (first, last):
        np.testing.assert_allclose(result, expected(good), rtol=1e-6)
    assert (stats.batches, stats.completed, stats.failed) == (1, 2, 1)


class RowEngine:
    """A fake engine giving NaN for rows whose first value is negative (row ``i`` -> ``2x``)."""

    name = "rows"

    def __init__(self, max_batch_size: int = 64) -> None:
        self.max_batch_size = max_batch_size
        self.calls: list[np.ndarray] = []
        self.release = asyncio.Event()
        self.release.set()

    async def load(self, ref: ModelRef) -> None:
        pass

    async def unload(self, ref: ModelRef) -> None:
        pass

    async def infer(self, ref: ModelRef, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch)
        await self.release.wait()
        out = batch.astype(np.float32) * 2
        out[batch[:, 0] < 0] = np.nan
        return out

    def capacity(self) -> EngineCapacity:
        return EngineCapacity("cpu", self.max_batch_size, None)

    async def aclose(self) -> None:
        pass


async def test_a_nan_output_row_fails_its_request_only() -> None:
    ref = ModelRef("rows")
    requests = [np.array([[1.0, 2.0]]), np.array([[3.0, 4.0], [-1.0, 0.0]]), np.array([[5.0, 6.0]])]
    engine = RowEngine()
    async with DynamicBatcher(engine, ref, CONFIG) as batcher:
        first, bad, last = await submit_all(batcher, *requests)
    assert len(engine.calls) == 1
    assert isinstance(bad, InferenceError) and "first: [1]" in str(bad)
    np.testing.assert_array_equal(first, [[2.0, 4.0]])
    np.testing.assert_array_equal(last, [[10.0, 12.0]])


async def test_without_input_spec_a_wrong_shape_fails_alone_naming_its_own_shape() -> None:
    async with engine_for() as engine:
        await engine.load(REF)
        async with DynamicBatcher(engine, REF, CONFIG) as batcher:
            outcomes = await submit_all(
                batcher,
                np.ones((2, 9), np.float32),
                np.ones((1, 9), np.float32),
                np.ones((1, 8), np.complex64),
                np.ones((1, 8), np.float32),
            )
            stats = batcher.stats()
    wide2, wide1, complex_, good = outcomes
    assert isinstance(wide2, BatchShapeError) and "shape (2, 9) does not fit" in str(wide2)
    assert isinstance(wide1, BatchShapeError) and "shape (1, 9) does not fit" in str(wide1)
    assert isinstance(complex_, BatchShapeError) and "complex64" in str(complex_)
    np.testing.assert_allclose(good, expected(np.ones((1, 8))), rtol=1e-6)
    assert (stats.submitted, stats.batches) == (1, 1)  # the bad ones never reached the engine


async def test_float64_float32_and_integer_requests_share_one_batch() -> None:
    requests = [np.ones((1, 8)), np.ones((2, 8), np.float32), np.ones((1, 8), ">i8")]
    async with engine_for() as engine:
        await engine.load(REF)
        async with DynamicBatcher(engine, REF, CONFIG) as batcher:
            outcomes = await submit_all(batcher, *requests)
            stats = batcher.stats()
    for request, outcome in zip(requests, outcomes, strict=True):
        np.testing.assert_allclose(outcome, expected(request), rtol=1e-6)
    assert stats.batch_sizes == ((4, 1),)


async def test_batches_never_exceed_the_engines_own_limit() -> None:
    async with engine_for(max_batch_size=4) as engine:
        await engine.load(REF)
        async with DynamicBatcher(engine, REF, CONFIG) as batcher:
            pairs = [np.full((2, 8), i / 8, np.float32) for i in range(3)]
            outcomes = await submit_all(batcher, *pairs)
            for pair, outcome in zip(pairs, outcomes, strict=True):
                np.testing.assert_allclose(outcome, expected(pair), rtol=1e-6)
            with pytest.raises(BatchShapeError, match="more than the 4 a batch may hold"):
                await batcher.submit(np.ones((5, 8), np.float32))
            assert batcher.max_request_rows == 4
            stats = batcher.stats()
    assert max(size for size, _ in stats.batch_sizes) <= 4


class ThreadRecordingBatcher(DynamicBatcher):
    """Records the thread each request's conversion and check runs in."""

    threads: list[str]

    def _model_input(self, batch: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        return super()._model_input(batch, dtype)


async def test_large_inputs_are_checked_off_the_loop_and_still_fail_alone() -> None:
    rows = INLINE_MAX_BYTES // (WIDE.width * 8) + 1  # float64: just over the inline limit
    big = np.random.default_rng(3).random((rows, WIDE.width))
    bad = big.copy()
    bad[-1, -1] = 1e300
    config = BatcherConfig(max_batch_size=2 * rows + 1, max_queue_delay_s=0.05)
    async with engine_for(WIDE) as engine:
        await engine.load(WIDE.ref)
        async with ThreadRecordingBatcher(engine, WIDE.ref, config) as batcher:
            batcher.threads = []
            small = np.ones((1, WIDE.width), np.float32)
            first, refused, second = await submit_all(batcher, big, bad, small)
            stats = batcher.stats()
    assert isinstance(refused, NonFiniteInputError) and f"first: [{rows - 1}]" in str(refused)
    np.testing.assert_allclose(first, expected(big, WIDE), rtol=1e-5)
    np.testing.assert_allclose(second, expected(small, WIDE), rtol=1e-5)
    worker = "meshinfer-batcher_0"  # the two big ones; the small one on the loop
    assert sorted(batcher.threads) == ["MainThread", worker, worker]
    assert stats.submitted == 2


async def test_a_request_cancelled_in_a_running_batch_is_counted_cancelled() -> None:
    engine = RowEngine()
    engine.release.clear()
    async with DynamicBatcher(engine, ModelRef("rows"), CONFIG) as batcher:
        keep = asyncio.ensure_future(batcher.submit(np.ones((1, 2))))
        drop = asyncio.ensure_future(batcher.submit(np.ones((2, 2))))
        while not engine.calls:
            await asyncio.sleep(0)
        drop.cancel()
        await asyncio.gather(drop, return_exceptions=True)
        engine.release.set()
        np.testing.assert_array_equal(await keep, [[2.0, 2.0]])
        stats = batcher.stats()
    assert (stats.submitted, stats.completed, stats.cancelled, stats.failed) == (2, 1, 1, 0)


async def test_batcher_still_serves_after_an_engine_failure() -> None:
    """A batch the engine fails (here: the model unloaded under it) fails only its requests;
    the engine and the batcher go on serving once the model is back."""
    async with engine_for() as engine:
        await engine.load(REF)
        async with DynamicBatcher(engine, REF, CONFIG) as batcher:
            await engine.unload(REF)
            outcomes = await submit_all(batcher, np.ones((1, 8), np.float32))
            await engine.load(REF)
            again = await batcher.submit(np.ones((1, 8), np.float32))
    assert isinstance(outcomes[0], InferenceError) and "not loaded" in str(outcomes[0])
    np.testing.assert_allclose(again, expected(np.ones((1, 8))), rtol=1e-6)


# --- in front of a real Triton server (PyTriton, CPU) -------------------------------------------


@pytest.fixture(scope="module")
def triton_server():
    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("PyTriton ships Triton for Linux x86_64 only")
    server = TritonServerProcess()
    server.start(timeout_s=120)
    yield server
    server.kill()  # (the graceful stop takes ~4 s; test_inference_triton's fixture covers it)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_triton_refusing_a_malformed_batch_is_bad_input(triton_server, protocol) -> None:
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    async with TritonEngine(url, protocol=protocol) as engine:
        await engine.load(DIGITS_REF)
        for batch in (np.ones((1, 63), np.float32), np.ones((257, 64), np.float32)):
            with pytest.raises(BatchShapeError, match="refused by Triton server"):
                await engine.infer(DIGITS_REF, batch)
        assert (await engine.infer(DIGITS_REF, np.zeros((1, 64), np.float32))).shape == (1, 10)


async def test_bad_requests_fail_alone_in_front_of_triton(triton_server) -> None:
    good = np.full((2, 64), 0.5)
    bad = {
        "float64-overflows-float32": np.full((1, 64), 1e300),
        "overflows-in-the-model": np.full((1, 64), 3e38, np.float32),
        "wrong-width": np.ones((1, 63), np.float32),
        "over-the-models-max-batch-size": np.ones((257, 64), np.float32),
    }
    config = BatcherConfig(max_batch_size=512, max_queue_delay_s=0.05)
    async with TritonEngine(triton_server.http_url) as engine:
        await engine.load(DIGITS_REF)
        async with DynamicBatcher(engine, DIGITS_REF, config) as batcher:
            with np.errstate(over="ignore", invalid="ignore"):
                first, *outcomes = await submit_all(batcher, good, *bad.values())
    assert first.shape == (2, 10) and np.isfinite(first).all()  # type: ignore[union-attr]
    for name, outcome in zip(bad, outcomes, strict=True):
        assert isinstance(outcome, InferenceError), (name, outcome)
    non_finite, in_model, width, rows = outcomes
    assert isinstance(non_finite, NonFiniteInputError) and "NaN or infinity" in str(in_model)
    assert isinstance(width, BatchShapeError) and isinstance(rows, BatchShapeError)


# --- faults in files this change does not own ---------------------------------------------------


async def test_node_splits_items_by_what_the_batcher_accepts() -> None:
    async with engine_for(max_batch_size=4) as engine:
        await engine.load(REF)
        async with DynamicBatcher(engine, REF, CONFIG) as batcher:
            executor = TaskExecutor(None, {REF: batcher}, ExecutorSection())  # type: ignore[arg-type]
            item = np.random.default_rng(5).random((6, 8)).astype(np.float32)
            out = await executor._infer(REF, item, 0, None)
    np.testing.assert_allclose(out, expected(item), rtol=1e-6)
