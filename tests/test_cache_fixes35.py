"""Session 35 fixes to inputs by reference (inference/cache.py, coordinator/input_refs.py).

* ``OrderedInputs.aclose`` woke the waiters of ``settled()`` only after the hash under way had
  ended, and never if it was cancelled meanwhile (a drain's ``settled()`` hung); it let its
  hashing thread go only at its very end, so an ``aclose`` cancelled while a hash ran left the
  thread alive for good. ``InputRefs.aclose`` (the coordinator's) left its thread so as well.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

import coordinator.input_refs
from meshinfer.inference import cache as cache_module
from meshinfer.inference.cache import ContentCache, OrderedInputs, content_digest
from tests.helpers import until
from tests.test_input_refs import _item_of, _large_frame, _Members, _refs


class _HeldHash:
    """``content_digest`` that, in a worker thread, waits for ``release`` before it hashes and
    notes the thread it ran in; on the loop's thread it hashes at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []

    def __call__(self, data: bytes) -> str:
        if threading.current_thread() is not threading.main_thread():
            self.threads.append(threading.current_thread())
            self.release.wait(10)
        return content_digest(data)


@pytest.fixture
def held():
    """A held hash, let go at the end of the test whatever its outcome."""
    hash_ = _HeldHash()
    yield hash_
    hash_.release.set()


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_settled_returns_when_closing_starts_not_when_the_hash_under_way_ends(
    monkeypatch, held
):
    monkeypatch.setattr(cache_module, "content_digest", held)
    inputs = OrderedInputs(ContentCache(1 << 20), off_loop_bytes=16)
    inputs.keep(b"x" * 100)  # hashed in the thread, held there
    await until(lambda: held.threads)
    settled = asyncio.create_task(inputs.settled())
    closing = asyncio.create_task(inputs.aclose())
    await until(settled.done, timeout=5)  # old code: only once the hash ended
    assert not closing.done() and not held.release.is_set()
    held.release.set()
    await closing
    assert inputs.cache.stats.items == 0  # dropped, not kept


async def test_a_cancelled_aclose_of_the_node_inputs_wakes_settled_and_lets_the_thread_go(
    monkeypatch, held
):
    monkeypatch.setattr(cache_module, "content_digest", held)
    inputs = OrderedInputs(ContentCache(1 << 20), off_loop_bytes=16)
    inputs.keep(b"x" * 100)
    await until(lambda: held.threads)
    settled = asyncio.create_task(inputs.settled())
    closing = asyncio.create_task(inputs.aclose())
    await asyncio.sleep(0)
    await _cancel(closing)  # e.g. a stop under a timeout
    held.release.set()
    await until(settled.done, timeout=5)
    await until(lambda: not held.threads[0].is_alive(), timeout=5)  # old code: idle for good
    inputs.keep(b"y" * 100)  # closed: neither kept nor hashed
    assert not inputs.busy and len(held.threads) == 1
    await inputs.aclose()  # idempotent after a cancelled one


async def test_a_cancelled_aclose_of_the_coordinator_inputs_lets_its_thread_go(monkeypatch, held):
    monkeypatch.setattr(coordinator.input_refs, "content_digest", held)
    refs, _stats = _refs(_Members(n=1))
    run, entry = _item_of(_large_frame())
    queued: list[int] = []
    refs.when_hashed(run, entry, queued.append, 1)
    await until(lambda: held.threads)
    closing = asyncio.create_task(refs.aclose())
    await asyncio.sleep(0)
    await _cancel(closing)
    held.release.set()
    await until(lambda: not held.threads[0].is_alive(), timeout=5)  # old code: idle for good
    for _ in range(3):  # the hash's end reaches the loop: nothing is queued once closed
        await asyncio.sleep(0)
    assert queued == []
    await refs.aclose()
