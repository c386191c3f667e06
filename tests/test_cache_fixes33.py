"""Session 33 fixes to the node's input cache (meshinfer/inference/cache.py).

* The byte budget counted item data only, so tiny items (a peer keeping 8-byte inputs) made a
  cache hold ~30 times its budget in Python objects: a cache now holds at most one item per
  4 KiB of its budget (at least 1024 items), and a coordinator's mirror of it follows the same
  rule, so references still find what the mirror says.
* A member that is not a coordinator no longer fills a node's cache with ``keep_input``
  (node/executor.py keeps only a coordinator's).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace

from meshinfer.inference.cache import ContentCache, InputMirror, OrderedInputs, Send
from meshinfer.proto.tasks_wire import TaskFailed, TaskResult
from tests.test_executor_fixes28 import KEEPS
from tests.test_executor_sharing import Net, item, soon


def tiny(i: int) -> bytes:
    """A distinct 8-byte input (what a 1x2 float32 tensor carries)."""
    return i.to_bytes(8, "little")


def test_tiny_items_cannot_make_a_cache_hold_more_than_one_per_4_kib_of_its_budget():
    """64 MiB of budget hold at most 16384 items, however small: the least recently used go."""
    cache = ContentCache(64 << 20)
    digests = [cache.put(tiny(i)) for i in range(20_000)]
    assert len(cache) == 16384
    assert cache.stats.bytes == 16384 * 8 and cache.stats.evictions == 20_000 - 16384
    assert cache.digests() == tuple(digests[-16384:])  # the newest kept, in LRU order
    assert digests[0] not in cache


def test_a_small_cache_still_holds_1024_items_and_refreshed_ones_stay():
    cache = ContentCache(100 << 10)  # 25 slots by the rule: at least 1024
    first = cache.put(tiny(0))
    for i in range(1, 1024):
        cache.put(tiny(i))
        if i % 100 == 0:
            assert cache.get(first) == tiny(0)  # a hit keeps it recent
    assert len(cache) == 1024 and first in cache
    cache.put(tiny(5000))
    assert len(cache) == 1024 and first in cache
    assert hashlib.sha256(tiny(1)).hexdigest() not in cache  # the least recently used


def test_a_mirror_follows_the_item_bound_of_the_node_cache_it_mirrors():
    """A coordinator keeps 1500 tiny inputs on a node of 4 MiB (1024 items), then references
    the newest 50 again: each reference finds its bytes, and the node's cache ends holding
    exactly what the mirror holds, in the same LRU order."""

    async def run() -> None:
        budget = 4 << 20
        cache, mirror = ContentCache(budget), InputMirror(budget)
        ordered = OrderedInputs(cache)
        found: list[bool] = []
        inputs = [tiny(i) for i in range(1500)] + [tiny(i) for i in range(1450, 1500)]
        for data in inputs:
            digest = hashlib.sha256(data).hexdigest()
            if mirror.send(digest, len(data)) is Send.REF:
                ordered.fetch(digest, lambda got, d=data: found.append(got == d))
            else:
                ordered.keep(data)
        await ordered.settled()
        assert len(found) == 50 and all(found)
        assert len(cache) == len(mirror) == 1024
        assert cache.digests() == mirror.digests()
        await ordered.aclose()

    asyncio.run(run())


async def test_keep_input_from_a_member_that_is_not_a_coordinator_is_not_kept():
    async with Net() as net:
        net.gate.set()
        executor = net.worker(KEEPS)
        msg = replace(item("from-v"), keep_input=True)
        await net.nodes["v"].peers.request("w", msg)
        kinds = TaskResult | TaskFailed
        await soon(lambda: any(isinstance(m, kinds) for _, m in net.nodes["v"].got))
        await executor.input_order.settled()
        assert hashlib.sha256(msg.input.data).hexdigest() not in executor.inputs
