"""Inputs by reference, the coordinator's side: what each node's input cache holds of ours.

An input of at least ``min_bytes`` goes to a node that gossips an input cache with
``keep_input``, and again to that node as a reference to its sha256, while the node's
:class:`~meshinfer.inference.cache.InputMirror` says it holds it. A mirror is per node
incarnation and cache budget: a restarted node, or one with a new budget, starts from an empty
mirror, and the coordinator has one start again (:meth:`InputRefs.forget_node`) when messages to
its node may not have arrived (a session lost, a send failed, the node died or left): it then
knows less than the node keeps, never more.

Counting: an item is counted as sent by reference (and its input's bytes as saved) once its
message is queued (:meth:`InputRefs.queued`), and the bytes are taken back when the node did not
hold the input after all and the same attempt goes again with them (:meth:`InputRefs.missed`).

Hashing: an input that may go by reference and has at least :data:`HASH_OFF_LOOP_BYTES` is
hashed in a worker thread (hashlib lets go of the GIL), and its item is queued only once its
digest is known (:meth:`InputRefs.when_hashed`), so its first send finds it there; the loop goes
on meanwhile. A smaller one is hashed on the loop at its first send to a node that keeps inputs
(cheaper than the hop to a thread). The thread computes a digest and nothing else: mirrors are
read and changed only on the loop, in :meth:`InputRefs.message`, just before the message is
queued, so a mirror still sees its node's cache operations in the order the session delivers
them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Protocol

from meshinfer.inference.cache import KEEP_OFF_LOOP_BYTES, InputMirror, Send, content_digest
from meshinfer.proto.tasks_wire import TaskAssign, by_reference

if TYPE_CHECKING:
    from coordinator.runs import ItemRun, TaskRun
    from meshinfer.runtime.node import MeshNode

log = logging.getLogger(__name__)

#: Inputs of at least this many bytes (and ``min_bytes``) are hashed in a worker thread: the
#: node's figure for the inputs it keeps (measured: sha256 takes the loop 37 us for 64 KiB,
#: 145 us for 256 KiB and 0.6 ms for 1 MiB; the hop to a thread and back about 30 us of the
#: loop's time, whatever the size).
HASH_OFF_LOOP_BYTES = KEEP_OFF_LOOP_BYTES


class InputRefStats(Protocol):
    """Where :class:`InputRefs` counts (the coordinator's stats)."""

    inputs_by_reference: int
    input_bytes_saved: int
    input_cache_misses: int


class InputRefs:
    """Per node, an :class:`InputMirror` of its input cache, and the messages that follow."""

    def __init__(
        self,
        mesh: MeshNode,
        min_bytes: int,
        stats: InputRefStats,
        *,
        off_loop_bytes: int = HASH_OFF_LOOP_BYTES,
    ) -> None:
        self.mesh = mesh
        self.min_bytes = min_bytes
        self.stats = stats
        #: inputs at least this large are hashed in a worker thread (0 bytes: never, no refs)
        self.off_loop_from = max(min_bytes, off_loop_bytes) if min_bytes else 1 << 62
        #: per node that keeps inputs: what it holds of ours, for its (incarnation, MiB)
        self._mirrors: dict[str, tuple[tuple[int, int], InputMirror]] = {}
        #: id(input) -> (input, its sha256 being computed in a worker thread: the thread's
        #: future, and the loop's)
        self._hashing: dict[int, tuple[bytes, Future[str], asyncio.Future[str]]] = {}
        #: the one thread that hashes (started at the first large input): in the order asked,
        #: so a batch's shards are queued in order, and never holding up the loop's other
        #: worker-thread users (the default executor's)
        self._hasher: ThreadPoolExecutor | None = None
        self._closed = False

    def when_hashed(
        self, run: TaskRun, entry: ItemRun, then: Callable[..., None], *args: object
    ) -> None:
        """Call ``then(*args)`` (queue the item) once the item's input has its digest, if that
        input is hashed in a worker thread; at once otherwise: a small input (no hop to a
        thread), a digest known already, no member keeping inputs (no reference can be sent:
        nothing to wait for), or after :meth:`aclose`. Items sharing an input share its hash.
        On the loop; ``then`` is called on it. Callbacks still pending at :meth:`aclose` are
        dropped."""
        data = entry.item.input.data
        if (
            len(data) < self.off_loop_from
            or self._closed
            or run.known_digest(data) is not None
            or not self._anyone_keeps()
        ):
            then(*args)
            return
        hashing = self._hashing.get(id(data))
        if hashing is None:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="input-hash")
            work = self._hasher.submit(content_digest, data)
            fut = asyncio.wrap_future(work)
            hashing = self._hashing[id(data)] = (data, work, fut)
            fut.add_done_callback(partial(self._hashed, id(data)))
        hashing[2].add_done_callback(partial(self._digest_known, run, data, then, args))

    def is_hashing(self, entry: ItemRun) -> bool:
        """Whether the item's input is being hashed in the worker thread (its item is queued
        once that is done: :meth:`when_hashed`)."""
        data = entry.item.input.data
        hashing = self._hashing.get(id(data))
        return hashing is not None and hashing[0] is data

    def _hashed(self, key: int, fut: asyncio.Future[str]) -> None:
        self._hashing.pop(key, None)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("hashing an input failed (it goes with its bytes)", exc_info=fut.exception())

    def _digest_known(
        self, run: TaskRun, data: bytes, then: Callable[..., None], args: tuple, fut: asyncio.Future
    ) -> None:
        if self._closed:
            return
        if not fut.cancelled() and fut.exception() is None:
            run.remember_digest(data, fut.result())
        then(*args)

    def _anyone_keeps(self) -> bool:
        """Whether a live member gossips an input cache (a reference may be sent to it)."""
        membership = self.mesh.membership
        if membership is None:
            return False
        return any(m.state.input_cache_mb for m in membership.core.live_members())

    async def aclose(self) -> None:
        """Call nothing back any more: drop the hashes not started, wait for the one under way
        (a thread cannot be stopped; it takes milliseconds). Idempotent; the thread is let go
        even if this is cancelled while it waits."""
        self._closed = True
        hashing = list(self._hashing.values())
        under_way = [fut for _, work, fut in hashing if not work.cancel()]  # (not started: off)
        try:
            await asyncio.gather(*under_way, return_exceptions=True)
        finally:
            if self._hasher is not None:
                self._hasher.shutdown(wait=False)

    def message(self, run: TaskRun, entry: ItemRun, node: str, msg: TaskAssign) -> TaskAssign:
        """``msg`` as it goes to ``node``: its input by reference if the node holds it, with
        ``keep_input`` if the node's cache will keep it, else unchanged. Sets
        ``entry.by_reference``; the mirror now holds what the node will once it has ``msg``.

        An input hashed in a worker thread has its digest by now (:meth:`when_hashed` queued
        its item once it had). If it has not (an item queued otherwise, or its hash failed),
        ``msg`` goes unchanged, with its bytes and without ``keep_input``, and the mirror is
        left alone: the node's cache changes only for a reference or ``keep_input``, so the two
        stay in step whatever went before or comes after. (``keep_input`` now and the digest
        into the mirror later would not: other messages may have moved the node's LRU
        meanwhile.) It costs only the chance that the next send of this input is a reference."""
        entry.by_reference = False
        size = len(msg.input.data)
        if not self.min_bytes or size < self.min_bytes:
            return msg
        mirror = self.mirror(node)
        if mirror is None:
            return msg
        if not entry.digest:
            entry.digest = self._digest(run, msg.input.data)
            if not entry.digest:
                return msg
        how = mirror.send(entry.digest, size)
        if how is Send.REF:
            entry.by_reference = True
            return by_reference(msg, entry.digest)
        return replace(msg, keep_input=True) if how is Send.KEEP else msg

    def queued(self, entry: ItemRun) -> None:
        """The message :meth:`message` made for ``entry`` was queued for its node."""
        if entry.by_reference:
            entry.referenced = entry.attempt
            self.stats.inputs_by_reference += 1
            self.stats.input_bytes_saved += len(entry.item.input.data)

    def missed(self, node: str, entry: ItemRun) -> None:
        """``node`` answered that it does not hold the input ``entry`` named by reference: the
        same attempt goes again with the bytes, which are not saved after all."""
        self.stats.input_cache_misses += 1
        self.stats.input_bytes_saved -= len(entry.item.input.data)
        self.forget_input(node, entry)

    def _digest(self, run: TaskRun, data: bytes) -> str:
        """The input's sha256, hashed here if it is small ("": hashed in a thread, not known)."""
        if len(data) < self.off_loop_from:
            return run.digest_of(data)
        return run.known_digest(data) or ""

    def mirror(self, node: str) -> InputMirror | None:
        """What ``node``'s input cache holds of ours (None: it gossips no input cache)."""
        membership = self.mesh.membership
        member = membership.core.member(node) if membership is not None else None
        if member is None or not member.state.input_cache_mb:
            self._mirrors.pop(node, None)
            return None
        key = (member.record.incarnation, member.state.input_cache_mb)
        known = self._mirrors.get(node)
        if known is None or known[0] != key:
            known = self._mirrors[node] = (key, InputMirror(member.state.input_cache_mb << 20))
        return known[1]

    def forget_node(self, node: str) -> None:
        """What ``node`` keeps of ours is no longer known: its mirror starts again."""
        self._mirrors.pop(node, None)

    def forget_input(self, node: str, entry: ItemRun) -> None:
        """``node`` does not hold the item's input, whatever its mirror said."""
        mirror = self.mirror(node)
        if mirror is not None and entry.digest:
            mirror.forget(entry.digest)
