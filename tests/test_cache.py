"""ContentCache: content addressing, LRU eviction within a byte budget, and stats; InputMirror:
a coordinator's exact picture of what one node's cache holds of its inputs."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from meshinfer.errors import ConfigError
from meshinfer.inference.cache import (
    CacheItemTooLargeError,
    ContentCache,
    InputMirror,
    Send,
    content_digest,
)

BUDGET = 64


def test_put_returns_sha256_and_get_returns_the_bytes() -> None:
    cache = ContentCache(100)
    digest = cache.put(b"frame-1")
    assert digest == hashlib.sha256(b"frame-1").hexdigest()
    assert digest in cache
    assert cache.get(digest) == b"frame-1"
    assert cache.get(content_digest(b"other")) is None
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.items, stats.bytes) == (1, 1, 1, 7)


def test_same_content_is_stored_once() -> None:
    cache = ContentCache(100)
    assert cache.put(b"abc") == cache.put(bytearray(b"abc"))
    assert (len(cache), cache.stats.bytes) == (1, 3)


def test_least_recently_used_item_is_evicted_first() -> None:
    cache = ContentCache(10)
    a, b = cache.put(b"aaaa"), cache.put(b"bbbb")
    cache.get(a)  # a is now the most recently used
    c = cache.put(b"cccc")
    assert b not in cache
    assert a in cache and c in cache
    assert cache.stats.evictions == 1
    assert cache.digests() == (a, c)


def test_contains_does_not_refresh_an_item() -> None:
    cache = ContentCache(8)
    a = cache.put(b"aaaa")
    cache.put(b"bbbb")
    assert a in cache
    cache.put(b"cccc")
    assert a not in cache


def test_item_larger_than_budget_is_refused_and_cache_untouched() -> None:
    cache = ContentCache(4)
    kept = cache.put(b"keep")
    with pytest.raises(CacheItemTooLargeError, match="5 bytes exceeds the cache budget of 4"):
        cache.put(b"12345")
    assert cache.get(kept) == b"keep"


def test_discard_and_bad_budget() -> None:
    cache = ContentCache(10)
    digest = cache.put(b"x")
    assert cache.discard(digest) is True
    assert cache.discard(digest) is False
    assert cache.stats.bytes == 0
    with pytest.raises(ConfigError):
        ContentCache(-1)


class CacheAgainstModel(RuleBasedStateMachine):
    """The cache behaves like a plain list in LRU order, trimmed from the front to the budget."""

    stored = Bundle("stored")

    def __init__(self) -> None:
        super().__init__()
        self.cache = ContentCache(BUDGET)
        self.model: list[tuple[str, bytes]] = []  # least recently used first
        self.hits = self.misses = 0

    def _touch(self, digest: str) -> bytes | None:
        for i, (key, data) in enumerate(self.model):
            if key == digest:
                self.model.append(self.model.pop(i))
                return data
        return None

    @rule(target=stored, data=st.binary(max_size=BUDGET))
    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if self._touch(digest) is None:
            self.model.append((digest, data))
            while sum(len(d) for _, d in self.model) > BUDGET:
                self.model.pop(0)
        assert self.cache.put(data) == digest
        return digest

    @rule(data=st.binary(min_size=BUDGET + 1, max_size=BUDGET + 8))
    def put_too_large(self, data: bytes) -> None:
        with pytest.raises(CacheItemTooLargeError):
            self.cache.put(data)

    @rule(digest=stored)
    def get(self, digest: str) -> None:
        expected = self._touch(digest)
        self.hits += expected is not None
        self.misses += expected is None
        assert self.cache.get(digest) == expected

    @rule(digest=stored)
    def discard(self, digest: str) -> None:
        expected = any(key == digest for key, _ in self.model)
        self.model = [(key, data) for key, data in self.model if key != digest]
        assert self.cache.discard(digest) is expected

    @invariant()
    def matches_model(self) -> None:
        assert self.cache.digests() == tuple(key for key, _ in self.model)
        assert self.cache.stats.bytes == sum(len(data) for _, data in self.model)
        assert self.cache.stats.bytes <= BUDGET
        assert (self.cache.stats.hits, self.cache.stats.misses) == (self.hits, self.misses)


TestCacheAgainstModel = CacheAgainstModel.TestCase
TestCacheAgainstModel.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)


def test_mirror_sends_bytes_once_then_references() -> None:
    mirror = InputMirror(10)
    a, b = content_digest(b"a"), content_digest(b"b")
    assert mirror.send(a, 6) is Send.KEEP
    assert mirror.send(a, 6) is Send.REF
    assert mirror.send(b, 6) is Send.KEEP  # evicts a, as the node's cache will
    assert a not in mirror and b in mirror
    assert mirror.send(content_digest(b"c"), 11) is Send.INLINE  # larger than the node's cache
    mirror.forget(b)
    assert mirror.send(b, 6) is Send.KEEP
    with pytest.raises(ConfigError):
        InputMirror(-1)


class MirrorAgainstNodeCache(RuleBasedStateMachine):
    """A coordinator's mirror fed the messages it sends, and the node's real cache fed the same
    messages in order: a reference is sent only for bytes the node holds. Other senders' inputs
    (a second coordinator) may evict ours behind the mirror's back; then the node reports a miss,
    the mirror forgets that input, and it goes with its bytes again. A restarted coordinator
    starts from an empty mirror while the node keeps its cache: what the node held then (ours
    or others') is older than all we send next, so it is evicted first, and the mirror stays
    exact about the newer part."""

    def __init__(self) -> None:
        super().__init__()
        self.node = ContentCache(BUDGET)
        self.mirror = InputMirror(BUDGET)
        self.shared = False  # another sender used the node's cache since the mirror was exact
        self.before_restart: set[str] = set()  # what the node held as the coordinator restarted

    @rule(data=st.sampled_from([bytes([i]) * n for i in range(4) for n in (8, 20, 40, 70)]))
    def send(self, data: bytes) -> None:
        digest = content_digest(data)
        how = self.mirror.send(digest, len(data))
        if how is Send.REF:
            if self.node.get(digest) is None:  # the node answers INPUT_NOT_CACHED
                assert self.shared, "a reference to bytes the node lacks, with no other sender"
                self.mirror.forget(digest)
                assert self.mirror.send(digest, len(data)) is Send.KEEP
                self.node.put(data)
        elif how is Send.KEEP:
            self.node.put(data)
        else:
            assert len(data) > BUDGET

    @rule(data=st.binary(min_size=1, max_size=BUDGET))
    def other_sender(self, data: bytes) -> None:
        self.node.put(data)
        self.shared = True

    @rule()
    def coordinator_restarts(self) -> None:
        self.mirror = InputMirror(BUDGET)
        self.before_restart = set(self.node.digests())
        self.shared = False  # others' inputs so far are as old as the rest: evicted first

    @invariant()
    def mirror_claims_only_what_the_node_holds(self) -> None:
        if self.shared:
            return
        ours, held = self.mirror.digests(), self.node.digests()
        older = held[: len(held) - len(ours)]
        assert held[len(older) :] == ours  # every reference would hit, in the same LRU order
        assert set(older) <= self.before_restart  # the rest the node held before the restart


TestMirrorAgainstNodeCache = MirrorAgainstNodeCache.TestCase
TestMirrorAgainstNodeCache.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None
)
