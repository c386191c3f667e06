"""Requests/s through the DynamicBatcher versus one-at-a-time calls, same NumPy engine and model.

Both runs use the shipped ``digits-mlp@1`` on one :class:`NumpyEngine` (one worker thread) and
single-sample requests drawn from the held-out set:

* baseline -- one caller awaiting ``engine.infer`` for one sample after another;
* batched  -- ``--concurrency`` callers awaiting ``batcher.submit`` for one sample each, the
  batcher grouping them (``max_batch_size=64``, ``max_queue_delay_s=2 ms`` by default).

Usage: ``python bench/bench_batching.py [--requests 20000] [--concurrency 64] [--uvloop]``
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from meshinfer.inference.batching import BatcherConfig, DynamicBatcher
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import DIGITS_REF, load_digits_holdout


async def one_at_a_time(engine: NumpyEngine, samples: np.ndarray, requests: int) -> float:
    """Seconds for ``requests`` sequential single-sample ``engine.infer`` calls."""
    start = time.perf_counter()
    for i in range(requests):
        await engine.infer(DIGITS_REF, samples[i % len(samples)][np.newaxis])
    return time.perf_counter() - start


async def through_batcher(
    batcher: DynamicBatcher, samples: np.ndarray, requests: int, concurrency: int
) -> float:
    """Seconds for ``requests`` single-sample submits made by ``concurrency`` callers."""
    remaining = iter(range(requests))

    async def caller() -> None:
        for i in remaining:
            await batcher.submit(samples[i % len(samples)][np.newaxis])

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(caller())
    return time.perf_counter() - start


async def run(args: argparse.Namespace) -> None:
    samples, _ = load_digits_holdout()
    config = BatcherConfig(
        max_batch_size=args.max_batch_size, max_queue_delay_s=args.max_queue_delay_ms / 1000
    )
    async with NumpyEngine(max_workers=1) as engine:
        await engine.load(DIGITS_REF)
        async with DynamicBatcher(engine, DIGITS_REF, config) as batcher:
            await one_at_a_time(engine, samples, 200)  # warm-up
            await through_batcher(batcher, samples, 2000, args.concurrency)
            warm = batcher.stats()
            baseline_s = await one_at_a_time(engine, samples, args.requests)
            batched_s = await through_batcher(batcher, samples, args.requests, args.concurrency)
            stats = batcher.stats()
    baseline_rps, batched_rps = args.requests / baseline_s, args.requests / batched_s
    batches = stats.batches - warm.batches
    print(f"model {DIGITS_REF}, {args.requests} single-sample requests per run, NumPy engine")
    label = f"batcher, concurrency {args.concurrency}"
    print(f"{'one-at-a-time':<26}: {baseline_rps:10.0f} req/s")
    print(
        f"{label:<26}: {batched_rps:10.0f} req/s "
        f"({batches} batches, mean {args.requests / batches:.1f} samples, "
        f"recent p50 {stats.latency_p50_s * 1e3:.2f} ms, p99 {stats.latency_p99_s * 1e3:.2f} ms)"
    )
    print(f"{'ratio':<26}: {batched_rps / baseline_rps:10.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    if min(args.requests, args.concurrency, args.max_batch_size) < 1:
        parser.error("--requests, --concurrency and --max-batch-size must be at least 1")
    if args.max_queue_delay_ms < 0:
        parser.error("--max-queue-delay-ms must be >= 0")
    if args.uvloop:
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
