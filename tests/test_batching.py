"""DynamicBatcher: grouping, bounds, priorities, deadlines, overload, errors and cancellation.

Timing-sensitive tests run on a tiny virtual-time event loop (timers fire at once, the clock
jumps to them), which also shows the batcher reads only ``loop.time()``.
"""

from __future__ import annotations

import asyncio
import selectors

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshinfer.errors import (
    ConfigError,
    DeadlineExceededError,
    InferenceError,
    LocalProtocolError,
    OverloadedError,
)
from meshinfer.inference.base import EngineCapacity, ModelRef, TensorSpec
from meshinfer.inference.batching import BatcherConfig, DynamicBatcher

REF = ModelRef("echo", "1")
SPEC = TensorSpec("x", "float32", (-1, 3))


class _JumpingSelector(selectors.DefaultSelector):
    """Polls I/O without waiting; when nothing is ready, jumps the loop's clock instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None):  # type: ignore[override]
        if timeout is None:
            return super().select(None)
        events = super().select(0)
        if not events and timeout > 0:
            self._loop.now += timeout
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is virtual and skips ahead to the next timer when idle."""

    def __init__(self) -> None:
        self.now = 1000.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


def run_virtual(coro):
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)


class EchoEngine:
    """A deterministic fake engine: output row = 2 * input row + 1; records every call.

    ``hold`` (when set) keeps each call waiting until released; ``delay`` makes each call take
    that long (loop time); ``poison`` fails any batch that contains that value.
    """

    name = "echo"

    def __init__(
        self, *, hold: bool = False, poison: float | None = None, delay: float = 0.0
    ) -> None:
        self.delay = delay
        self.calls: list[np.ndarray] = []
        self.call_times: list[float] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.poison = poison

    async def load(self, ref: ModelRef) -> None:
        pass

    async def unload(self, ref: ModelRef) -> None:
        pass

    async def infer(self, ref: ModelRef, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.copy())
        self.call_times.append(asyncio.get_running_loop().time())
        self.entered.set()
        await self.release.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.poison is not None and bool((batch == self.poison).any()):
            raise RuntimeError("poisoned batch")
        return batch * 2 + 1

    def capacity(self) -> EngineCapacity:
        return EngineCapacity("cpu", 64, None)

    async def aclose(self) -> None:
        pass

    def seen_values(self) -> set[float]:
        return {float(v) for call in self.calls for v in call[:, 0]}

    def batch_sizes(self) -> list[int]:
        return [len(call) for call in self.calls]


def rows(*values: float) -> np.ndarray:
    """One request: a row of three equal features per value."""
    return np.array([[v, v, v] for v in values], dtype=np.float32)


async def occupy(batcher: DynamicBatcher, engine: EchoEngine) -> asyncio.Task:
    """Submit a request that holds the engine (engine must be ``hold=True``)."""
    task = asyncio.ensure_future(batcher.submit(rows(-1.0)))
    await engine.entered.wait()
    return task


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_batch_size"):
        BatcherConfig(max_batch_size=0)
    with pytest.raises(ConfigError, match="max_queue_delay_s"):
        BatcherConfig(max_queue_delay_s=-1.0)
    assert BatcherConfig.throughput().max_batch_size > BatcherConfig.low_latency().max_batch_size


async def test_concurrent_requests_share_one_engine_call() -> None:
    engine = EchoEngine()
    async with DynamicBatcher(engine, REF, BatcherConfig(max_batch_size=64)) as batcher:
        results = await asyncio.gather(*(batcher.submit(rows(float(i))) for i in range(10)))
    assert engine.batch_sizes() == [10]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, rows(2.0 * i + 1))


def test_max_batch_size_is_respected() -> None:
    async def scenario() -> list[int]:
        engine = EchoEngine()
        config = BatcherConfig(max_batch_size=8, max_queue_delay_s=5.0)
        async with DynamicBatcher(engine, REF, config) as batcher:
            await asyncio.gather(*(batcher.submit(rows(float(i))) for i in range(20)))
        return engine.batch_sizes()

    assert run_virtual(scenario()) == [8, 8, 4]


def test_partial_batch_waits_exactly_the_queue_delay() -> None:
    async def scenario() -> tuple[float, float, list[int]]:
        loop = asyncio.get_running_loop()
        engine = EchoEngine()
        config = BatcherConfig(max_batch_size=8, max_queue_delay_s=0.25)
        async with DynamicBatcher(engine, REF, config) as batcher:
            start = loop.time()
            first = asyncio.ensure_future(batcher.submit(rows(1.0)))
            await asyncio.sleep(0.1)
            second = asyncio.ensure_future(batcher.submit(rows(2.0)))
            await asyncio.gather(first, second)
        return start, engine.call_times[0], engine.batch_sizes()

    start, called_at, sizes = run_virtual(scenario())
    assert called_at - start == pytest.approx(0.25)  # measured from the oldest request
    assert sizes == [2]


def test_an_idle_batcher_sends_at_once_and_batches_only_while_busy() -> None:
    async def scenario() -> tuple[list[float], list[int]]:
        loop = asyncio.get_running_loop()
        engine = EchoEngine(delay=0.1)
        config = BatcherConfig(max_batch_size=8, max_queue_delay_s=0.25, dispatch_when_idle=True)
        async with DynamicBatcher(engine, REF, config) as batcher:
            start = loop.time()
            first = asyncio.ensure_future(batcher.submit(rows(1.0)))  # idle: goes at once
            await asyncio.sleep(0.05)  # the engine is busy until 0.1
            later = [asyncio.ensure_future(batcher.submit(rows(2.0))) for _ in range(3)]
            await asyncio.gather(first, *later)
            await asyncio.sleep(1.0)  # idle again
            await batcher.submit(rows(3.0))
        return [t - start for t in engine.call_times], engine.batch_sizes()

    times, sizes = run_virtual(scenario())
    assert sizes == [1, 3, 1]  # the three that queued while busy went together
    assert times[0] == 0.0 and times[1] == pytest.approx(0.1)  # when the engine was free
    assert times[2] == pytest.approx(1.2)  # a lone request on an idle engine: no delay


def test_full_batch_goes_without_waiting() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        engine = EchoEngine()
        config = BatcherConfig(max_batch_size=4, max_queue_delay_s=60.0)
        async with DynamicBatcher(engine, REF, config) as batcher:
            start = loop.time()
            await batcher.submit(rows(1.0, 2.0, 3.0, 4.0))
        return engine.call_times[0] - start

    assert run_virtual(scenario()) == 0.0


async def test_higher_priority_first_fifo_within_priority() -> None:
    engine = EchoEngine(hold=True)
    config = BatcherConfig(max_batch_size=1, max_queue_delay_s=0.0)
    async with DynamicBatcher(engine, REF, config) as batcher:
        busy = await occupy(batcher, engine)
        plan = [(10.0, 0), (11.0, 0), (20.0, 2), (12.0, 0), (15.0, 1), (21.0, 2)]
        tasks = [asyncio.ensure_future(batcher.submit(rows(v), priority=p)) for v, p in plan]
        await asyncio.sleep(0)  # let every submit enqueue
        engine.release.set()
        await asyncio.gather(busy, *tasks)
    order = [float(call[0, 0]) for call in engine.calls]
    assert order == [-1.0, 20.0, 21.0, 15.0, 10.0, 11.0, 12.0]


async def test_priority_out_of_range_is_refused() -> None:
    async with DynamicBatcher(EchoEngine(), REF, BatcherConfig(priorities=2)) as batcher:
        with pytest.raises(LocalProtocolError, match="priority 2"):
            await batcher.submit(rows(1.0), priority=2)


def test_expired_request_never_reaches_the_engine() -> None:
    async def scenario() -> tuple[EchoEngine, int]:
        loop = asyncio.get_running_loop()
        engine = EchoEngine(hold=True)
        config = BatcherConfig(max_batch_size=1, max_queue_delay_s=0.0)
        async with DynamicBatcher(engine, REF, config) as batcher:
            busy = await occupy(batcher, engine)
            late = asyncio.ensure_future(batcher.submit(rows(7.0), deadline=loop.time() + 0.5))
            fine = asyncio.ensure_future(batcher.submit(rows(8.0)))
            with pytest.raises(DeadlineExceededError):
                await late  # expires while the engine is still busy
            engine.release.set()
            await asyncio.gather(busy, fine)
            expired = batcher.stats().expired
        return engine, expired

    engine, expired = run_virtual(scenario())
    assert 7.0 not in engine.seen_values()
    assert 8.0 in engine.seen_values()
    assert expired == 1


async def test_deadline_already_passed_is_refused_at_submit() -> None:
    engine = EchoEngine()
    async with DynamicBatcher(engine, REF) as batcher:
        now = asyncio.get_running_loop().time()
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(rows(1.0), deadline=now)
    assert engine.calls == []


async def test_full_queue_is_refused_at_once() -> None:
    engine = EchoEngine(hold=True)
    config = BatcherConfig(max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=2)
    async with DynamicBatcher(engine, REF, config) as batcher:
        busy = await occupy(batcher, engine)
        waiting = [asyncio.ensure_future(batcher.submit(rows(float(i)))) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError, match="full"):
            await batcher.submit(rows(9.0))
        assert batcher.stats().rejected == 1
        engine.release.set()
        await asyncio.gather(busy, *waiting)
    assert 9.0 not in engine.seen_values()


async def test_engine_error_fails_only_its_batch() -> None:
    engine = EchoEngine(hold=True, poison=13.0)
    config = BatcherConfig(max_batch_size=2, max_queue_delay_s=0.0)
    async with DynamicBatcher(engine, REF, config) as batcher:
        busy = await occupy(batcher, engine)
        doomed = [asyncio.ensure_future(batcher.submit(rows(v))) for v in (13.0, 14.0)]
        healthy = asyncio.ensure_future(batcher.submit(rows(15.0)))
        await asyncio.sleep(0)
        engine.release.set()
        outcomes = await asyncio.gather(*doomed, return_exceptions=True)
        result = await healthy
        await busy
        stats = batcher.stats()
    assert engine.batch_sizes() == [1, 2, 1]
    for outcome in outcomes:
        assert isinstance(outcome, InferenceError)
        assert "poisoned batch" in str(outcome)
    np.testing.assert_array_equal(result, rows(31.0))
    assert stats.failed == 2


async def test_cancelled_request_is_dropped_from_the_queue() -> None:
    engine = EchoEngine(hold=True)
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=0.0)
    async with DynamicBatcher(engine, REF, config) as batcher:
        busy = await occupy(batcher, engine)
        tasks = [asyncio.ensure_future(batcher.submit(rows(v))) for v in (1.0, 2.0, 3.0)]
        await asyncio.sleep(0)
        tasks[1].cancel()
        await asyncio.gather(tasks[1], return_exceptions=True)
        assert batcher.stats().queue_depth == 2
        engine.release.set()
        await asyncio.gather(busy, tasks[0], tasks[2])
        stats = batcher.stats()
    assert engine.batch_sizes() == [1, 2]
    assert 2.0 not in engine.seen_values()
    assert (stats.cancelled, stats.queue_depth) == (1, 0)


async def test_requests_of_different_shapes_are_not_mixed() -> None:
    engine = EchoEngine()
    async with DynamicBatcher(engine, REF, BatcherConfig(max_batch_size=8)) as batcher:
        wide = np.ones((1, 5), dtype=np.float32)
        results = await asyncio.gather(
            batcher.submit(rows(1.0)), batcher.submit(wide), batcher.submit(rows(2.0))
        )
    assert sorted(call.shape for call in engine.calls) == [(1, 5), (2, 3)]
    np.testing.assert_array_equal(results[1], wide * 2 + 1)


async def test_single_sample_with_input_spec() -> None:
    engine = EchoEngine()
    async with DynamicBatcher(engine, REF, input_spec=SPEC) as batcher:
        one = await batcher.submit(np.array([1.0, 2.0, 3.0], dtype=np.float32))
        two = await batcher.submit(rows(1.0, 2.0))
        with pytest.raises(InferenceError, match="does not fit"):
            await batcher.submit(np.ones((2, 4), dtype=np.float32))
    np.testing.assert_array_equal(one, [3.0, 5.0, 7.0])
    assert two.shape == (2, 3)


async def test_oversized_and_empty_requests_are_refused() -> None:
    async with DynamicBatcher(EchoEngine(), REF, BatcherConfig(max_batch_size=2)) as batcher:
        with pytest.raises(InferenceError, match="split it"):
            await batcher.submit(rows(1.0, 2.0, 3.0))
        with pytest.raises(InferenceError, match="no samples"):
            await batcher.submit(np.zeros((0, 3), dtype=np.float32))


async def test_wrong_row_count_from_engine_is_an_inference_error() -> None:
    class ShortEngine(EchoEngine):
        async def infer(self, ref: ModelRef, batch: np.ndarray) -> np.ndarray:
            return batch[:-1]

    async with DynamicBatcher(ShortEngine(), REF) as batcher:
        with pytest.raises(InferenceError, match="for a batch of 2"):
            await batcher.submit(rows(1.0, 2.0))


async def test_lifecycle_close_fails_waiting_requests() -> None:
    engine = EchoEngine(hold=True)
    batcher = DynamicBatcher(engine, REF, BatcherConfig(max_batch_size=1, max_queue_delay_s=0.0))
    with pytest.raises(LocalProtocolError, match="start"):
        await batcher.submit(rows(1.0))
    await batcher.start()
    busy = await occupy(batcher, engine)
    waiting = asyncio.ensure_future(batcher.submit(rows(2.0)))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(batcher.aclose())
    with pytest.raises(InferenceError, match="closed before the request ran"):
        await waiting
    engine.release.set()  # the running batch is allowed to finish
    await closing
    np.testing.assert_array_equal(await busy, rows(-1.0))
    await batcher.aclose()  # idempotent
    with pytest.raises(InferenceError, match="closed"):
        await batcher.submit(rows(3.0))
    assert 2.0 not in engine.seen_values()


async def test_dispatcher_crash_is_not_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = EchoEngine()
    async with DynamicBatcher(engine, REF) as batcher:

        def broken() -> list:
            raise RuntimeError("dispatcher bug")

        monkeypatch.setattr(batcher, "_take_batch", broken)
        with pytest.raises(InferenceError, match="dispatcher bug"):
            await batcher.submit(rows(1.0))
        with pytest.raises(InferenceError, match="stopped"):
            await batcher.submit(rows(2.0))


async def test_stats_report_batches_and_latencies() -> None:
    engine = EchoEngine()
    async with DynamicBatcher(engine, REF, BatcherConfig(max_batch_size=4)) as batcher:
        await asyncio.gather(*(batcher.submit(rows(float(i))) for i in range(4)))
        await batcher.submit(rows(9.0, 9.0))
        stats = batcher.stats()
    assert stats.batch_sizes == ((2, 1), (4, 1))
    assert (stats.batches, stats.submitted, stats.completed) == (2, 5, 5)
    assert stats.mean_batch_size == 3.0
    assert stats.latency_count == 5 and stats.latency_p50_s is not None
    assert stats.latency_buckets[-1][1] == 5  # cumulative: every request is under the top bound


request_mix = st.lists(
    st.tuples(st.integers(1, 5), st.integers(0, 2), st.booleans()), min_size=1, max_size=40
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mix=request_mix, max_batch=st.integers(1, 8), delay=st.sampled_from([0.0, 0.001, 0.05]))
def test_every_caller_gets_exactly_its_own_rows(
    mix: list[tuple[int, int, bool]], max_batch: int, delay: float
) -> None:
    """Random sizes, priorities and cancellations: results always map back to the right caller."""

    async def scenario() -> None:
        engine = EchoEngine()
        config = BatcherConfig(max_batch_size=max(max_batch, 5), max_queue_delay_s=delay)
        counter = iter(range(10_000))
        async with DynamicBatcher(engine, REF, config) as batcher:
            inputs = [rows(*(float(next(counter)) for _ in range(n))) for n, _, _ in mix]
            tasks = [
                asyncio.ensure_future(batcher.submit(x, priority=p))
                for x, (_, p, _) in zip(inputs, mix, strict=True)
            ]
            await asyncio.sleep(0)
            for task, (_, _, cancel) in zip(tasks, mix, strict=True):
                if cancel:
                    task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for x, outcome, (_, _, cancel) in zip(inputs, outcomes, mix, strict=True):
            if cancel:
                assert isinstance(outcome, asyncio.CancelledError)
                assert not set(x[:, 0].tolist()) & engine.seen_values()
            else:
                np.testing.assert_array_equal(outcome, x * 2 + 1)
        assert all(size <= config.max_batch_size for size in engine.batch_sizes())

    run_virtual(scenario())


def test_latency_histogram_is_cumulative_on_the_loop_clock() -> None:
    async def scenario():
        engine = EchoEngine()
        config = BatcherConfig(max_batch_size=8, max_queue_delay_s=0.03)
        async with DynamicBatcher(engine, REF, config) as batcher:
            await batcher.submit(rows(1.0))  # waits the full 30 ms of virtual time
            return batcher.stats()

    stats = run_virtual(scenario())
    buckets = dict(stats.latency_buckets)
    assert (buckets[0.025], buckets[0.05], buckets[5.0]) == (0, 1, 1)
    assert stats.latency_sum_s == pytest.approx(0.03)
    assert stats.latency_p50_s == pytest.approx(0.03)


@pytest.mark.parametrize("release_first", [False, True])
async def test_mass_cancellation_loses_no_surviving_request(release_first: bool) -> None:
    """Enough cancellations to compact the queue; every survivor still gets its own answer."""
    engine = EchoEngine(hold=True)
    config = BatcherConfig(max_batch_size=16, max_queue_delay_s=0.0)
    async with DynamicBatcher(engine, REF, config) as batcher:
        busy = await occupy(batcher, engine)
        tasks = [asyncio.ensure_future(batcher.submit(rows(float(i)))) for i in range(300)]
        await asyncio.sleep(0)
        if release_first:
            engine.release.set()
        for i, task in enumerate(tasks):
            if i % 4:
                task.cancel()
        engine.release.set()
        outcomes = await asyncio.gather(busy, *tasks, return_exceptions=True)
        stats = batcher.stats()
    for i, outcome in enumerate(outcomes[1:]):
        if i % 4:
            assert isinstance(outcome, asyncio.CancelledError)
        else:
            np.testing.assert_array_equal(outcome, rows(2.0 * i + 1))
    assert (stats.cancelled, stats.completed, stats.queue_depth) == (225, 76, 0)
    assert not {float(i) for i in range(300) if i % 4} & engine.seen_values()


async def test_close_abandons_a_batch_the_engine_never_finishes() -> None:
    engine = EchoEngine(hold=True)  # never released
    batcher = DynamicBatcher(engine, REF, BatcherConfig(max_batch_size=1, max_queue_delay_s=0.0))
    await batcher.start()
    busy = await occupy(batcher, engine)
    async with asyncio.timeout(5):
        await batcher.aclose(grace=0.05)
    with pytest.raises(InferenceError, match="aborted"):
        await busy
