"""Local inference, session 36: a close whose caller is cancelled still finishes, and a later
close waits for it (the batcher, the bounded executor, the NumPy engine)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from meshinfer.inference.base import EngineCapacity, ModelRef
from meshinfer.inference.batching import BatcherConfig, DynamicBatcher
from meshinfer.inference.executor import BoundedExecutor
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import DEFAULT_SYNTHETIC

REF = ModelRef("held", "1")


class HeldEngine:
    """An engine whose batches wait until :attr:`go` is set (doubling their inputs)."""

    name = "held"

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.started = asyncio.Event()

    async def infer(self, ref: ModelRef, batch: np.ndarray) -> np.ndarray:
        self.started.set()
        await self.go.wait()
        return batch * 2

    def capacity(self) -> EngineCapacity:
        return EngineCapacity("cpu", 64, None)


async def _cancelled_close(close: asyncio.Future[None]) -> None:
    """Let ``close`` start waiting, then cancel it (its caller gave up)."""
    for _ in range(5):
        await asyncio.sleep(0)
    assert not close.done()
    close.cancel()
    try:
        await close
    except asyncio.CancelledError:
        pass


async def test_a_batcher_close_after_a_cancelled_one_waits_for_the_running_batch() -> None:
    engine = HeldEngine()
    batcher = DynamicBatcher(engine, REF, BatcherConfig(dispatch_when_idle=True))
    await batcher.start()
    request = asyncio.ensure_future(batcher.submit(np.ones((2, 3), np.float32)))
    await engine.started.wait()
    await _cancelled_close(asyncio.ensure_future(batcher.aclose(grace=60.0)))
    assert batcher.closed
    again = asyncio.ensure_future(batcher.aclose())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not again.done(), "a second close returned while the batch still ran"
    engine.go.set()
    await asyncio.wait_for(again, 5.0)
    np.testing.assert_array_equal(request.result(), np.full((2, 3), 2, np.float32))
    assert batcher.stats().in_flight_batches == 0
    await batcher.aclose()  # and once more: done at once


async def test_an_executor_close_after_a_cancelled_one_waits_for_the_running_job() -> None:
    release = threading.Event()
    running = threading.Event()

    def job() -> str:
        running.set()
        release.wait(10.0)
        return "done"

    executor = BoundedExecutor(1)
    try:
        run = asyncio.ensure_future(executor.run(job))
        while not running.is_set():
            await asyncio.sleep(0.001)
        await _cancelled_close(asyncio.ensure_future(executor.aclose()))
        assert executor.in_flight == 1
        again = asyncio.ensure_future(executor.aclose())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not again.done(), "a second close returned while a job still ran"
        release.set()
        await asyncio.wait_for(again, 5.0)
        assert executor.in_flight == 0
        assert await run == "done"
    finally:
        release.set()
        await executor.aclose()


class HeldNumpyEngine(NumpyEngine):
    """A NumPy engine whose forward passes (in its worker thread) wait for :attr:`release`."""

    def __init__(self) -> None:
        super().__init__(inline_max_macs=0)
        self.release = threading.Event()
        self.running = threading.Event()

    def _forward(self, prepared, batch):  # type: ignore[no-untyped-def]
        self.running.set()
        self.release.wait(10.0)
        return super()._forward(prepared, batch)


async def test_an_engine_close_after_a_cancelled_one_waits_and_drops_the_models() -> None:
    engine = HeldNumpyEngine()
    spec = DEFAULT_SYNTHETIC[3]  # 10 features
    try:
        await engine.load(spec.ref)
        width = engine.input_spec(spec.ref).shape[1]
        infer = asyncio.ensure_future(engine.infer(spec.ref, np.ones((1, width), np.float32)))
        while not engine.running.is_set():
            await asyncio.sleep(0.001)
        await _cancelled_close(asyncio.ensure_future(engine.aclose()))
        again = asyncio.ensure_future(engine.aclose())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not again.done(), "a second close returned while a batch still ran"
        engine.release.set()
        await asyncio.wait_for(again, 5.0)
        assert engine.loaded_models == ()
        assert (await infer).shape[0] == 1
    finally:
        engine.release.set()
        await engine.aclose()
