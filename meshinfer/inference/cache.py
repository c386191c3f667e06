"""A content-addressed, in-memory LRU cache for inputs and model blobs a node may see again.

Items are keyed by the hex sha256 of their bytes, so a key names exactly one content and a
peer can ask "do you have <digest>?" before sending the bytes. The cache holds at most
``budget_bytes`` of item data: adding an item evicts least-recently-used items until it fits;
an item larger than the whole budget is refused with :class:`CacheItemTooLargeError`.

``get`` and ``put`` of an existing item make it most recently used; ``in`` does not (it is a
cheap "have you got it" probe that should not keep items alive).

The byte budget counts item data only, and each item also costs ~250 bytes of Python objects
(its key, the bytes object, the LRU's links): tiny items (a peer keeping 8-byte inputs) would
make a budget take ~30 times its size. So a cache also holds at most :func:`item_slots` items
(one per :data:`BYTES_PER_SLOT` of its budget, at least :data:`MIN_SLOTS`), evicting the least
recently used one for a new item when full; an :class:`InputMirror` follows the same rule.

A node keeps the inputs a coordinator asks it to keep here (``TaskAssign.keep_input``), and a
coordinator then sends such an input again as a reference (``TaskAssign.input_ref``; see
:mod:`meshinfer.proto.tasks_wire`). The coordinator decides with an :class:`InputMirror` per
node: the same LRU run over digests and sizes alone, fed the same operations in the same order
(the session keeps them in order, and the node does them as each message arrives), so while one
coordinator feeds a node's cache, and its messages arrive, the mirror knows exactly what it
holds. When it does not (a second coordinator, a node restart) the node answers a reference it
lacks with ``INPUT_NOT_CACHED`` and gets the bytes again: a wrong guess costs one round trip.

The node feeds its cache through :class:`OrderedInputs`, which hashes a big input in a worker
thread and holds the operations that come after it until it is stored, so that the cache still
sees them in message order.

Concurrency: not thread-safe. Use it from the event loop only (every method is short and never
blocks, except hashing the bytes given to :meth:`ContentCache.put` without their digest, which
is linear in their size: :class:`OrderedInputs` does that in its thread for big ones).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from meshinfer.errors import ConfigError, LocalProtocolError

log = logging.getLogger(__name__)

#: Inputs a node keeps that are larger than this are hashed in a worker thread (sha256 takes the
#: loop ~145 us for 256 KiB and ~0.6 ms for 1 MiB; the hop to a thread and back ~30 us); the
#: coordinator hashes what it sends by reference from the same size
#: (``coordinator.input_refs.HASH_OFF_LOOP_BYTES``).
KEEP_OFF_LOOP_BYTES = 256 << 10

#: A cache holds at most one item per this many bytes of its budget (:func:`item_slots`): with
#: ~250 bytes of objects per item besides its data, the count bound keeps that to ~6% of the
#: budget, whatever the items' sizes.
BYTES_PER_SLOT = 4096
#: The fewest items any cache may hold (a small budget's objects cost ~250 KiB at most).
MIN_SLOTS = 1024


def item_slots(budget_bytes: int) -> int:
    """The most items a cache (or mirror) of ``budget_bytes`` holds at once."""
    return max(MIN_SLOTS, budget_bytes // BYTES_PER_SLOT)


class CacheItemTooLargeError(LocalProtocolError):
    """An item is larger than the cache's whole byte budget, so it can never be cached."""


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters since the cache was created, and its current fill."""

    hits: int
    misses: int
    evictions: int
    items: int
    bytes: int
    budget_bytes: int


def content_digest(data: bytes) -> str:
    """The cache key of ``data``: its hex sha256."""
    return hashlib.sha256(data).hexdigest()


class ContentCache:
    """LRU within a byte budget, keyed by content digest. Event-loop only (not thread-safe)."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ConfigError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.max_items = item_slots(budget_bytes)
        self._items: OrderedDict[str, bytes] = OrderedDict()  # oldest first
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` (evicting LRU items as needed) and return its digest. ``digest``: its
        :func:`content_digest`, when the caller computed it already (off the loop).

        Raises CacheItemTooLargeError if ``data`` alone exceeds the budget.
        """
        data = bytes(data)
        if len(data) > self.budget_bytes:
            raise CacheItemTooLargeError(
                f"item of {len(data)} bytes exceeds the cache budget of {self.budget_bytes} bytes"
            )
        digest = digest or content_digest(data)
        if digest in self._items:
            self._items.move_to_end(digest)
            return digest
        self._make_room(len(data))
        self._items[digest] = data
        self._bytes += len(data)
        return digest

    def get(self, digest: str) -> bytes | None:
        """The bytes stored under ``digest`` (now most recently used), or None."""
        data = self._items.get(digest)
        if data is None:
            self._misses += 1
            return None
        self._hits += 1
        self._items.move_to_end(digest)
        return data

    def peek(self, digest: str) -> bytes | None:
        """The bytes stored under ``digest``, or None: no effect on the LRU order or the
        counters (:meth:`OrderedInputs.fetch_cached` does the ``get`` in its turn)."""
        return self._items.get(digest)

    def discard(self, digest: str) -> bool:
        """Drop ``digest`` if present; return whether it was. Not counted as an eviction."""
        data = self._items.pop(digest, None)
        if data is None:
            return False
        self._bytes -= len(data)
        return True

    def digests(self) -> tuple[str, ...]:
        """Cached digests, least recently used first."""
        return tuple(self._items)

    @property
    def stats(self) -> CacheStats:
        """Hit/miss/eviction counters and the current fill."""
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            items=len(self._items),
            bytes=self._bytes,
            budget_bytes=self.budget_bytes,
        )

    def __contains__(self, digest: object) -> bool:
        return digest in self._items

    def __len__(self) -> int:
        return len(self._items)

    def _make_room(self, size: int) -> None:
        while self._bytes + size > self.budget_bytes or len(self._items) >= self.max_items:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted)
            self._evictions += 1


@dataclass(eq=False, slots=True)
class _Keep:
    """A ``put`` waiting in :class:`OrderedInputs`: its bytes, and their digest once hashed."""

    data: bytes
    work: Future[str]  # the thread's
    digest: asyncio.Future[str]  # the loop's


@dataclass(eq=False, slots=True)
class _Fetch:
    """A ``get`` waiting in :class:`OrderedInputs` behind a ``put``."""

    digest: str
    then: Callable[[bytes | None], None]


class OrderedInputs:
    """A node's :class:`ContentCache`, fed in the order its messages came, with big inputs
    hashed off the event loop.

    :meth:`keep` (a ``put``) and :meth:`fetch` (a ``get``) take effect on the cache in the order
    they are called, as the coordinator's :class:`InputMirror` of it assumes. While nothing
    waits, at once, on the loop (the usual case, and always for small inputs: no thread hop).
    An input larger than ``off_loop_bytes`` is hashed in one worker thread, and from then on
    every later call waits in a queue, done in order as soon as those before it are; so
    :meth:`fetch` hands the bytes to a callback: at once, or when the queue reaches it.
    :meth:`fetch_cached` gives bytes the cache holds already at once, its ``get`` still done
    in turn.

    Concurrency: on the event loop (callbacks are called on it); only hashing runs in the
    thread. Not thread-safe.
    """

    def __init__(self, cache: ContentCache, *, off_loop_bytes: int = KEEP_OFF_LOOP_BYTES) -> None:
        self.cache = cache
        self.off_loop_bytes = off_loop_bytes
        self._queue: deque[_Keep | _Fetch] = deque()
        self._hasher: ThreadPoolExecutor | None = None  # started at the first big input
        self._settled: list[asyncio.Future[None]] = []  # waiters for an empty queue
        self._closed = False

    @property
    def busy(self) -> bool:
        """Whether calls wait behind an input being hashed (a :meth:`fetch` would not call
        back at once)."""
        return bool(self._queue)

    def keep(self, data: bytes) -> None:
        """Put ``data`` into the cache, after what came before. Data larger than the cache's
        whole budget is not kept (nor hashed): it never fits."""
        if len(data) > self.cache.budget_bytes or self._closed:
            return
        big = len(data) > self.off_loop_bytes
        if not big and not self._queue:
            self.cache.put(data)
            return
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="meshinfer-input-hash")
        if big:
            work = self._hasher.submit(content_digest, data)
        else:  # small, but behind a big one: hashed here, stored in its turn
            work = Future()
            work.set_result(content_digest(data))
        digest = asyncio.wrap_future(work)
        digest.add_done_callback(self._advance)
        self._queue.append(_Keep(data, work, digest))

    def fetch(self, digest: str, then: Callable[[bytes | None], None]) -> None:
        """Call ``then`` with the cache's bytes under ``digest`` (or None), after what came
        before: at once if nothing waits, else once the queue reaches it. :meth:`aclose` drops
        the calls waiting then, uncalled; after it nothing waits, so a later call is called
        back at once (the node, stopping, answers that item as any other that comes then)."""
        if not self._queue:
            then(self.cache.get(digest))
        elif not self._closed:
            self._queue.append(_Fetch(digest, then))

    def fetch_cached(self, digest: str) -> bytes | None:
        """The cache's bytes under ``digest`` at once, without waiting behind an input being
        hashed, if it holds them now; else None, with nothing done (call :meth:`fetch`).

        Served so, the ``get`` still takes effect on the cache in its turn, after what came
        before (queued with nothing to call back), so the cache ends as the coordinator's
        mirror says. The bytes are those the ``get`` would give: content-addressed, they are
        the same whenever read. While one coordinator feeds the cache, it only names an input
        its mirror holds then, so the ``get`` in turn finds it too; should it not (a second
        coordinator's inputs evicted it, before this call's turn), the caller was given the
        bytes it named, where the ``get`` in turn misses: one round trip saved, the cache as
        it would be."""
        # The executor calls this only while busy, but the idle case stays: a get queued
        # behind nothing would never be taken (only a hash's end advances the queue), leaving
        # it busy, and every later fetch waiting, until some big input came.
        if not self._queue:
            return self.cache.get(digest) if digest in self.cache else None
        data = None if self._closed else self.cache.peek(digest)
        if data is not None:
            self._queue.append(_Fetch(digest, _ignore))
        return data

    async def settled(self) -> None:
        """Return once nothing waits (every call so far took effect)."""
        if self._queue:
            waiter = asyncio.get_running_loop().create_future()
            self._settled.append(waiter)
            await waiter

    def _advance(self, _hashed: object = None) -> None:
        """Do what waits at the head of the queue, in order, up to an input still hashed."""
        while self._queue and not self._closed:
            step = self._queue[0]
            if isinstance(step, _Keep):
                if not step.digest.done():
                    return
                self._queue.popleft()
                self._store(step)
            else:
                self._queue.popleft()
                try:
                    step.then(self.cache.get(step.digest))
                except Exception:
                    log.exception("a callback of the input cache failed")
        for waiter in self._settled:
            if not waiter.done():
                waiter.set_result(None)
        self._settled.clear()

    def _store(self, step: _Keep) -> None:
        failure = None if step.digest.cancelled() else step.digest.exception()
        if step.digest.cancelled() or failure is not None:
            log.error("hashing an input to keep failed: not kept", exc_info=failure)
            return
        self.cache.put(step.data, step.digest.result())

    async def aclose(self) -> None:
        """Take no more calls and call nothing back: drop the hashes not started, wait for the
        one under way (a thread cannot be stopped; it takes milliseconds). Idempotent; the
        waiters of :meth:`settled` return at once (nothing waits any more), and the thread is
        let go even if this is cancelled while it waits."""
        self._closed = True
        keeps = [step for step in self._queue if isinstance(step, _Keep)]
        self._queue.clear()
        self._advance()  # (wakes the waiters of settled())
        under_way = [step.digest for step in keeps if not step.work.cancel()]
        try:
            await asyncio.gather(*under_way, return_exceptions=True)
        finally:
            if self._hasher is not None:
                self._hasher.shutdown(wait=False)


def _ignore(_data: bytes | None) -> None:
    """The callback of a ``get`` whose bytes were given already (:meth:`fetch_cached`)."""


class Send(enum.Enum):
    """How to send an input to a node (:meth:`InputMirror.send`)."""

    REF = "ref"  # the node holds it: send the reference alone
    KEEP = "keep"  # send the bytes and ask the node to keep them
    INLINE = "inline"  # send the bytes (too large for the node's cache)


class InputMirror:
    """What one node's :class:`ContentCache` of ``budget_bytes`` holds of what we sent it.

    It runs the cache's LRU over digests and sizes: :meth:`send` does to the mirror what the
    node's cache will do with the message it answers (a ``get`` for a reference, a ``put`` for
    a kept input). Pure bookkeeping: no bytes, no clock.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ConfigError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.max_items = item_slots(budget_bytes)  # as the node's cache (ContentCache)
        self._sizes: OrderedDict[str, int] = OrderedDict()  # oldest first
        self._bytes = 0

    def send(self, digest: str, size: int) -> Send:
        """How to send an input of ``size`` bytes hashing to ``digest``; the mirror now holds
        what the node's cache will once it has the message."""
        if digest in self._sizes:
            self._sizes.move_to_end(digest)
            return Send.REF
        if size > self.budget_bytes:
            return Send.INLINE
        while self._bytes + size > self.budget_bytes or len(self._sizes) >= self.max_items:
            self._bytes -= self._sizes.popitem(last=False)[1]
        self._sizes[digest] = size
        self._bytes += size
        return Send.KEEP

    def forget(self, digest: str) -> None:
        """The node said it does not hold ``digest`` (evicted by others' inputs, restarted)."""
        size = self._sizes.pop(digest, None)
        if size is not None:
            self._bytes -= size

    def digests(self) -> tuple[str, ...]:
        """Digests the node is believed to hold, least recently used first."""
        return tuple(self._sizes)

    def __contains__(self, digest: object) -> bool:
        return digest in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)
