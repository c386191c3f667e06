"""The bounded executor: caps jobs in flight, survives cancellation, never stalls the loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from meshinfer.errors import LocalProtocolError
from meshinfer.inference.executor import BoundedExecutor
from meshinfer.inference.mlp import forward
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import ModelRegistry, synthetic_model
from meshinfer.inference.synthetic import SyntheticSpec, make_weights, sample_inputs
from tests.loopguard import GUARD

TICK_S = 0.005
MAX_GAP_S = 0.100


class Ticker:
    """Wakes up every TICK_S on the loop and records the longest gap between wake-ups."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not self._stop.is_set():
            await asyncio.sleep(TICK_S)
            now = loop.time()
            self.max_gap = max(self.max_gap, now - last)
            last = now

    def stop(self) -> None:
        self._stop.set()


async def measure_max_gap(work) -> float:
    """Run coroutine function ``work`` while a ticker runs; return the ticker's max gap."""
    ticker = Ticker()
    async with asyncio.TaskGroup() as group:
        group.create_task(ticker.run())
        await asyncio.sleep(TICK_S * 2)  # let the ticker take its first timestamp
        try:
            await work()
        finally:
            ticker.stop()
    return ticker.max_gap


async def test_heavy_inference_through_engine_does_not_stall_the_loop() -> None:
    spec = SyntheticSpec(1024, 4)
    batch = sample_inputs(spec, 1024)
    weights = make_weights(spec)
    # Control: the same forward passes run directly on the loop block it for > MAX_GAP_S.
    rounds = 0

    async def on_the_loop() -> None:
        nonlocal rounds
        start = time.perf_counter()
        while time.perf_counter() - start < 3 * MAX_GAP_S:
            forward(weights, batch)
            rounds += 1

    with GUARD.sink.captured() as blocks:  # the control blocks the loop on purpose
        control_gap = await measure_max_gap(on_the_loop)
    assert control_gap > MAX_GAP_S
    assert all(b.cause == "on the CPU" and "test_heavy_inference" in b.callback for b in blocks)

    async with NumpyEngine(ModelRegistry((synthetic_model(spec),))) as engine:
        await engine.load(spec.ref)

        async def through_engine() -> None:
            for _ in range(rounds):
                probs = await engine.infer(spec.ref, batch)
                assert probs.shape == (1024, spec.classes)

        engine_gap = await measure_max_gap(through_engine)
    assert engine_gap < MAX_GAP_S, (
        f"loop stalled {engine_gap * 1000:.0f} ms "
        f"(control: {control_gap * 1000:.0f} ms over {rounds} rounds)"
    )


async def test_jobs_in_flight_never_exceed_the_bound() -> None:
    lock = threading.Lock()
    running = 0
    peak = 0

    def job(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)  # the job's own blocking work, not synchronisation
        with lock:
            running -= 1
        return i * i

    async with BoundedExecutor(max_workers=4, max_in_flight=2) as executor:
        results = await asyncio.gather(*(executor.run(job, i) for i in range(10)))
    assert results == [i * i for i in range(10)]
    assert peak == 2


async def test_cancelled_caller_keeps_its_slot_until_the_job_ends() -> None:
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    release = threading.Event()
    second_ran = threading.Event()

    def blocking_job() -> str:
        loop.call_soon_threadsafe(started.set)
        release.wait(timeout=10)
        return "first"

    async with BoundedExecutor(max_workers=2, max_in_flight=1) as executor:
        first = asyncio.create_task(executor.run(blocking_job))
        await started.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.create_task(executor.run(second_ran.set))
        for _ in range(20):
            await asyncio.sleep(0)
        assert executor.in_flight == 1
        assert not second_ran.is_set()  # the cancelled job still holds the only slot
        release.set()
        await second
        assert second_ran.is_set()


async def test_exceptions_from_the_job_reach_the_caller() -> None:
    def boom() -> None:
        raise RuntimeError("job failed")

    async with BoundedExecutor() as executor:
        with pytest.raises(RuntimeError, match="job failed"):
            await executor.run(boom)
        assert await executor.run(sum, [1, 2, 3]) == 6


async def test_aclose_waits_for_running_jobs_and_refuses_new_ones() -> None:
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    release = threading.Event()

    def job() -> str:
        loop.call_soon_threadsafe(started.set)
        release.wait(timeout=10)
        return "done"

    executor = BoundedExecutor()
    running = asyncio.create_task(executor.run(job))
    await started.wait()
    closing = asyncio.create_task(executor.aclose())
    await asyncio.sleep(0)
    assert not closing.done()
    release.set()
    await closing
    assert await running == "done"
    assert executor.closed
    with pytest.raises(LocalProtocolError):
        await executor.run(job)
    await executor.aclose()  # idempotent


async def test_queued_jobs_fail_cleanly_when_the_executor_closes() -> None:
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    release = threading.Event()
    ran: list[int] = []

    def job(i: int) -> int:
        loop.call_soon_threadsafe(started.set)
        release.wait(timeout=10)
        ran.append(i)
        return i

    executor = BoundedExecutor(max_workers=1, max_in_flight=3)
    tasks = [asyncio.create_task(executor.run(job, i)) for i in range(3)]
    await started.wait()
    closing = asyncio.create_task(executor.aclose())
    await asyncio.sleep(0)
    release.set()
    await closing
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert outcomes[0] == 0 and ran == [0]
    assert all(isinstance(o, LocalProtocolError) for o in outcomes[1:])


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError):
        BoundedExecutor(max_workers=0)
    with pytest.raises(ValueError):
        BoundedExecutor(max_workers=1, max_in_flight=0)
