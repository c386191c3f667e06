"""A content-addressed, in-memory LRU cache for inputs and model blobs a node may see again.

Items are keyed by the hex sha256 of their bytes, so a key names exactly one content and a
peer can ask "do you have <digest>?" before sending the bytes. The cache holds at most
``budget_bytes`` of item data: adding an item evicts least-recently-used items until it fits;
an item larger than the whole budget is refused with :class:`CacheItemTooLargeError`.

``get`` and ``put`` of an existing item make it most recently used; ``in`` does not (it is a
cheap "have you got it" probe that should not keep items alive).

A node keeps the inputs a coordinator asks it to keep here (``TaskAssign.keep_input``), and a
coordinator then sends such an input again as a reference (``TaskAssign.input_ref``; see
:mod:`meshinfer.proto.tasks_wire`). The coordinator decides with an :class:`InputMirror` per
node: the same LRU run over digests and sizes alone, fed the same operations in the same order
(the session keeps them in order, and the node does them as each message arrives), so while one
coordinator feeds a node's cache, and its messages arrive, the mirror knows exactly what it
holds. When it does not (a second coordinator, a node restart) the node answers a reference it
lacks with ``INPUT_NOT_CACHED`` and gets the bytes again: a wrong guess costs one round trip.

Concurrency: not thread-safe. Use it from the event loop only (every method is short and never
blocks, except hashing the bytes given to :meth:`put`, which is linear in their size).
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from meshinfer.errors import ConfigError, LocalProtocolError


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
        self._items: OrderedDict[str, bytes] = OrderedDict()  # oldest first
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def put(self, data: bytes) -> str:
        """Store ``data`` (evicting LRU items as needed) and return its digest.

        Raises CacheItemTooLargeError if ``data`` alone exceeds the budget.
        """
        data = bytes(data)
        if len(data) > self.budget_bytes:
            raise CacheItemTooLargeError(
                f"item of {len(data)} bytes exceeds the cache budget of {self.budget_bytes} bytes"
            )
        digest = content_digest(data)
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
        while self._bytes + size > self.budget_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted)
            self._evictions += 1


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
        while self._bytes + size > self.budget_bytes:
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
