"""The node's task executor: work items that reach this node, run through the batcher.

Protocol (messages in :mod:`meshinfer.proto.tasks_wire`), per work item::

    coordinator --TaskAssign--> node --TaskAccepted--> coordinator   (if still running after
                                                                      accepted_notice_ms)
                                node --TaskResult | TaskFailed--> coordinator
    coordinator --TaskCancel--> node   (the item's asyncio task is cancelled; TaskFailed CANCELLED;
                                        an item passed to a peer: the cancel is passed on)

At most ``max_concurrent`` items run at once; the rest wait in order of priority (larger
first, then in order of arrival), each until its deadline at most (then it is answered
``DEADLINE_EXCEEDED``, not once a slot frees). Work sharing:
when an item from a coordinator arrives while this node's backlog reaches
``offload_queue_depth`` (or it lacks the model) and a peer that is ALIVE (not suspect), has an
open session with this node and gossips the model with a smaller load (any load, if this node
lacks the model) exists, the item is forwarded to that peer, and whatever comes back is relayed
to the coordinator (its ``TaskAccepted`` too, so the coordinator sees the item running), except
a refusal (the peer is draining, overloaded or lacks the model: it never ran the item), after
which the item runs here unless this node is draining too. One hop only: an item another node
passed on runs where it lands. A peer's load is its gossiped queue depth (up to a second old)
plus the items this node passed to it that are not answered yet, and ties are broken at random,
so overloaded nodes do not all pile onto the one peer that looked idlest. A peer whose session
this node would send over carries a certificate that is now revoked (the session is about to be
cut) gets nothing. A node already holding an item, running or passed on, answers its latest
``TaskAssign`` (a coordinator's retry after the first sender went away, or its resend after a
lost session): an item passed on is not passed on again, and the peer's answer is relayed under
the latest attempt. If the peer an item was passed to dies, leaves, loses its session abruptly
or closes it without answering (and keeps no other), or the session the item went over is
closed for a revoked certificate first, or the item could never be written to it (the peer
table gave up: dial failed, message too large), the item is handed back (``TaskFailed``
``PEER_LOST``, retryable) so the coordinator re-runs it at once instead of waiting for its item
timeout; one its coordinator cancelled meanwhile is answered ``CANCELLED`` instead. A session
with the peer lost while another stays open (the peer dialled again after roaming) sends the
peer's items again over the open one instead (unless that one is being cut for a revoked
certificate: then they are handed back). What a peer sends over a session under a revoked
certificate (being cut) never reaches the executor (the peer table drops it:
``PeerStats.from_revoked``), so an answer that does is relayed: it came over a good session (a
re-enrolled peer's new certificate), while the cut hands back what went over the revoked one.
Items a node passed here are cancelled when it
dies or leaves (it handed them back: their answer would go nowhere useful; answered
``PEER_LOST`` if its session stays open, as it may be alive after all), or when its last good
session is cut for a revoked certificate (not answered: nothing goes to the holder), unless a
coordinator assigned them here again meanwhile. Sent again, or run here after a refusal, an item
has what is left of its deadline, counted from when it came here. Bad input from a peer is answered
with ``TaskFailed`` (``BAD_INPUT``) and never reaches the engine. Inputs a coordinator asks this
node to keep (``keep_input``) go into its input cache
(:class:`~meshinfer.inference.cache.ContentCache`, ``input_cache_mib``) as the item arrives, and an
item that names its input by reference (``input_ref``) is given it from there, or answered
``INPUT_NOT_CACHED`` so the coordinator sends the bytes; both happen before anything else is
decided about the item, so the cache sees every message in the order sent (which is what lets the
coordinator mirror it). An input to keep larger than 256 KiB is hashed in a worker thread
(:class:`~meshinfer.inference.cache.OrderedInputs`), not on the loop; an item naming its input by
reference meanwhile waits (milliseconds) until the cache operations before it are done, and if
cancelled then is answered ``CANCELLED`` when they are, unless the cache holds its input already
(and no earlier assignment of the item waits): it is given it at once, and its use of the cache
takes effect in its turn all the same. An item this node already answered (its
result is kept a while: :mod:`node.replay`, ``result_replay_mib``) is answered again from the
kept result when it comes back (a coordinator resending what a lost session or its restart may
have swallowed), even while draining, instead of running again. While draining (SIGTERM) new
items are refused as retryable and queued ones are handed back, so the coordinator re-runs them
elsewhere; those still running when the drain's time is up are handed back too. A cancelled
item is answered (``CANCELLED``, or ``SHUTTING_DOWN`` while draining) even if its cancel came
before its task first ran.

Concurrency: every method runs on the node's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from meshinfer.errors import (
    BatchShapeError,
    DeadlineExceededError,
    InferenceError,
    MeshInferError,
    ModelNotFoundError,
    OverloadedError,
    RemoteProtocolError,
)
from meshinfer.inference.base import ModelRef
from meshinfer.inference.batching import INLINE_MAX_BYTES, DynamicBatcher
from meshinfer.inference.cache import ContentCache, OrderedInputs
from meshinfer.proto.membership import Member, MemberEvent, MemberEventKind, MemberStatus
from meshinfer.proto.tasks_wire import (
    DTYPES,
    REFUSALS,
    FailureKind,
    TaskAccepted,
    TaskAssign,
    TaskCancel,
    TaskFailed,
    TaskResult,
    Tensor,
    failure_kind,
)
from meshinfer.runtime.loop import log_failure
from meshinfer.runtime.node import MeshNode
from meshinfer.runtime.revocations import CutOff
from meshinfer.runtime.session import Session
from node.config import ExecutorSection
from node.replay import ResultReplay

log = logging.getLogger(__name__)

#: How long an item passed to a peer may go unanswered (less: its deadline and a second) before
#: it is handed back; its answer was lost on the way, and until then it counts against the peer.
OFFLOAD_ANSWER_S = 60.0
#: How long a drain waits, past its own timeout if need be, for the hand-backs and relayed
#: answers it queued to be written to their sessions (one may need a re-dial): the peer table
#: drops what is still queued when it closes, and a coordinator that missed one waits for the
#: node's LEAVE.
HAND_BACK_WRITE_S = 2.0
#: The least time between two sweeps of the kept results (:mod:`node.replay`) that drop the
#: expired ones (a quarter of ``result_replay_s`` if shorter): a result is held up to this long
#: past its time, never answered from then.
REPLAY_SWEEP_S = 1.0

_log_failure = log_failure(log, "executor step")


@dataclass
class ExecutorStats:
    accepted: int = 0
    completed: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    offloaded: int = 0
    relayed: int = 0
    cancelled: int = 0
    handed_back: int = 0
    taken_back: int = 0  # items passed on, refused by the peer, then run here
    passed_again: int = 0  # items passed on, sent to their peer again after a lost session
    cancels_refused: int = 0  # TaskCancel for an item here from a peer that may not: ignored
    reassigns_refused: int = 0  # TaskAssign for an item held here, from a peer that may not
    dropped: int = 0  # items a node passed here, cancelled: it died, left or was revoked


#: An item passed to a peer: (the coordinator that sent it, the item, the peer it went to).
Offload = tuple[str, TaskAssign, str]


class TaskExecutor:
    """Serves TaskAssign/TaskCancel for one node; see the module docstring. ``rng`` breaks ties
    between equally loaded peers when passing an item on."""

    def __init__(
        self,
        mesh: MeshNode,
        batchers: dict[ModelRef, DynamicBatcher],
        config: ExecutorSection,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.mesh = mesh
        self.batchers = batchers
        self.config = config
        self.stats = ExecutorStats()
        self.running = 0
        self._slots = _Slots(config.max_concurrent)
        self._items: dict[str, asyncio.Task[None]] = {}
        self._notices: dict[str, asyncio.TimerHandle] = {}  # item -> its pending TaskAccepted
        self._started: set[str] = set()
        self._answered: set[str] = set()  # items whose result is queued or being written
        self._offloaded: dict[str, Offload] = {}
        #: items passed on, then cancelled: the cancel passed on too (sent again with them)
        self._offload_cancels: dict[str, TaskCancel] = {}
        #: per item passed on, the timer that hands it back if no answer comes
        self._offload_timers: dict[str, asyncio.TimerHandle] = {}
        #: per item passed on with a deadline, when (loop time) that deadline passes: what is
        #: left of it goes with the item when it is sent again or run here after all
        self._offload_expiry: dict[str, float] = {}
        self._no_offloads = asyncio.Event()  # set while nothing passed on awaits an answer
        self._no_offloads.set()
        self._handing_back: set[asyncio.Future[None]] = set()  # answers sent while draining
        self._closed = False
        #: item -> (sender, attempt) of a later TaskAssign for an item already held here (a
        #: coordinator's retry after the one who sent it first went away): answered instead
        self._reply: dict[str, tuple[str, int]] = {}
        self._senders: dict[str, str] = {}  # item running here -> the peer it came from
        self._passed_here: set[str] = set()  # items here that a node (no coordinator) passed
        #: items cancelled because the node that passed them is gone -> what to answer it
        #: (``PEER_LOST`` with this text), or None: nothing (its certificate is revoked)
        self._dropped: dict[str, str | None] = {}
        self._draining = False
        self._watchers: set[asyncio.Task[None]] = set()  # session watchers and offload sends
        self._rng = rng or random.Random()
        self._engine_name = type(next(iter(batchers.values())).engine).__name__ if batchers else ""
        self._device_name: str | None = None
        self.inputs = ContentCache(config.input_cache_mib << 20)
        self.input_order = OrderedInputs(self.inputs)  # the cache, fed in message order
        #: items whose assignment (by reference) waits behind an input being hashed -> the
        #: sender of each such assignment; and those of them cancelled meanwhile
        self._waiting: dict[str, list[str]] = {}
        self._waiting_cancels: set[str] = set()
        self._cancelled: set[str] = set()  # items here whose cancel was counted (stats)
        self.replay = ResultReplay(config.result_replay_mib << 20, config.result_replay_s)
        self._replay_sweep: asyncio.TimerHandle | None = None  # drops expired kept results

    def start(self) -> None:
        """Take task messages from the peer table; watch every session, those open now (the
        mesh started first) and those to come."""
        peers = self.mesh.peers
        peers.on(TaskAssign, self._on_assign)
        peers.on(TaskCancel, self._on_cancel)
        peers.on(TaskResult, self._on_relay)
        peers.on(TaskFailed, self._on_relay)
        peers.on(TaskAccepted, self._on_accepted)
        peers.on_session(self._on_session)
        if self.mesh.membership is not None:
            self.mesh.membership.subscribe(self._on_member)
        if self.mesh.revocation_sync is not None:
            self.mesh.revocation_sync.on_cut_off(self._on_cut_off)
        for session in peers.open_sessions():
            self._on_session(session.peer_id, session)

    @property
    def backlog(self) -> int:
        return len(self._items)

    # --- incoming --------------------------------------------------------------------------

    def _on_assign(self, peer: str, msg: TaskAssign) -> None:
        """Take the item's input from the input cache (it names it by reference) or put it
        there (``keep_input``), in message order (see the module docstring), then go on."""
        ref = msg.input_ref
        if ref is not None:
            waits = self.input_order.busy  # behind an input being hashed: may be cancelled
            if waits and msg.item_id not in self._waiting:  # (else it would pass its retry)
                data = self.input_order.fetch_cached(ref.digest)
                if data is not None:  # held already: served now, its get done in turn
                    self._with_cached(peer, msg, False, data)
                    return
            if waits:
                self._waiting.setdefault(msg.item_id, []).append(peer)
            self.input_order.fetch(ref.digest, partial(self._with_cached, peer, msg, waits))
            return
        if msg.keep_input:
            self.input_order.keep(msg.input.data)
            msg = replace(msg, keep_input=False)  # offloaded, it travels as a plain item
        self._assign(peer, msg)

    def _assign(self, peer: str, msg: TaskAssign) -> None:
        """An item with its input inline: answer it from the kept result, refuse, run it or
        pass it on."""
        if self._replayed(peer, msg):
            return
        if self._draining:
            self._fail(peer, msg, FailureKind.SHUTTING_DOWN, "node is draining", retryable=True)
            return
        if msg.item_id in self._items or msg.item_id in self._offloaded:
            if not self._may_direct(peer, msg.item_id):  # would take the answer (and cancel)
                self.stats.reassigns_refused += 1
                log.info("%s may not re-assign %s: ignored", peer, msg.item_id)
                return
            self._reply[msg.item_id] = (peer, msg.attempt)  # answer the latest assignment
            return
        ref = ModelRef(msg.model_id, msg.model_version)
        offloaded_to_us = not self._is_coordinator(peer)
        if not offloaded_to_us and self._should_offload(ref) and self._offload(peer, msg, ref):
            return
        if ref not in self.batchers:
            self._fail(peer, msg, FailureKind.MODEL_NOT_FOUND, f"{ref} not loaded", retryable=True)
            return
        self._start(peer, msg, ref)
        if offloaded_to_us:
            self._passed_here.add(msg.item_id)

    def _start(self, peer: str, msg: TaskAssign, ref: ModelRef) -> None:
        """Run the item here (``ref`` is loaded); its answer goes to ``peer``."""
        self.stats.accepted += 1
        loop = asyncio.get_running_loop()
        item_id = msg.item_id
        task = loop.create_task(self._run(peer, msg, ref), name=f"item-{item_id}")
        self._items[item_id] = task
        self._senders[item_id] = peer
        delay = self.config.accepted_notice_ms / 1000
        if delay > 0:
            self._notices[item_id] = loop.call_later(
                delay, self._notify_accepted, peer, item_id, msg.attempt
            )
        else:
            self._notify_accepted(peer, item_id, msg.attempt)
        task.add_done_callback(lambda t: self._item_done(peer, msg, t))

    def _replayed(self, peer: str, msg: TaskAssign) -> bool:
        """Whether ``msg`` was answered from the result kept of its item: one that ran here (or
        was passed on and answered) and is not running here now, or whose answer is queued."""
        if msg.item_id not in self.replay:  # (the usual case: no clock read, no CRC)
            return False
        if msg.item_id in self._items and msg.item_id not in self._answered:
            return False
        result = self.replay.answer(peer, msg, asyncio.get_running_loop().time())
        if result is None:
            return False
        self.mesh.peers.send(peer, result)
        return True

    def _with_cached(self, peer: str, msg: TaskAssign, waited: bool, data: bytes | None) -> None:
        """Go on with an item naming its input by reference, given the cache's bytes under it:
        answered with ``TaskFailed`` if this node does not hold them, they do not fit the
        reference's dtype and shape, or the item was cancelled while it ``waited``."""
        if waited and self._waited(peer, msg.item_id):
            why = "cancelled by the coordinator while its input was being stored"
            self._fail(peer, msg, FailureKind.CANCELLED, why, retryable=False)
            return
        ref = msg.input_ref
        if data is None:
            text = f"input {ref.digest[:16]} is not in this node's input cache"
            self._fail(peer, msg, FailureKind.INPUT_NOT_CACHED, text, retryable=True)
            return
        try:
            msg = replace(msg, input=ref.resolve(data), input_ref=None)
        except RemoteProtocolError as exc:
            self._fail(peer, msg, FailureKind.BAD_INPUT, str(exc), retryable=False)
            return
        self._assign(peer, msg)

    def _waited(self, peer: str, item_id: str) -> bool:
        """One assignment of ``item_id`` from ``peer`` waited for its input and is done
        waiting: whether the item was cancelled meanwhile."""
        senders = self._waiting[item_id]
        senders.remove(peer)
        cancelled = item_id in self._waiting_cancels
        if not senders:
            del self._waiting[item_id]
            self._waiting_cancels.discard(item_id)
        return cancelled

    def _notify_accepted(self, peer: str, item_id: str, attempt: int) -> None:
        """Tell the coordinator the item runs here (only sent for items that take a while)."""
        self._notices.pop(item_id, None)
        if item_id in self._items:
            peer, attempt = self._reply.get(item_id, (peer, attempt))
            self.mesh.peers.send(
                peer, TaskAccepted(item_id, attempt, self.mesh.node_id, self.backlog)
            )

    def _item_done(self, peer: str, msg: TaskAssign, task: asyncio.Task[None]) -> None:
        """Forget a finished item. A cancelled one is answered here, not in :meth:`_run`: a
        task cancelled before its first step (its cancel or a drain came in the same loop
        iteration as the item) never runs a line of it."""
        item_id = msg.item_id
        dropped = self._dropped.pop(item_id, "")
        if task.cancelled() and item_id not in self._answered and dropped is not None:
            peer, msg = self._answer_to(peer, msg)
            kind, text = (
                (FailureKind.SHUTTING_DOWN, "handed back: node draining")
                if self._draining
                else (FailureKind.CANCELLED, "cancelled by the coordinator")
            )
            if dropped:  # the node that passed it was declared dead or left: maybe wrongly
                kind, text = FailureKind.PEER_LOST, dropped
            self._fail(peer, msg, kind, text, retryable=self._draining or bool(dropped))
        self._items.pop(item_id, None)
        self._passed_here.discard(item_id)
        self._senders.pop(item_id, None)
        self._answered.discard(item_id)
        self._cancelled.discard(item_id)
        self._reply.pop(item_id, None)
        notice = self._notices.pop(item_id, None)
        if notice is not None:
            notice.cancel()

    def _on_cancel(self, peer: str, msg: TaskCancel) -> None:
        """Cancel the item: its assignments waiting for their input, and the item running here
        or passed on. ``stats.cancelled`` counts an item once, however many of those it has
        (a coordinator's retry may wait for its input while the first assignment runs) and
        however often its cancel comes."""
        counted = self._cancel_waiting(peer, msg.item_id)
        if msg.item_id not in self._items and msg.item_id not in self._offloaded:
            return  # over already (a forwarded cancel may come after the answer), or unknown
        if not self._may_direct(peer, msg.item_id):
            self.stats.cancels_refused += 1
            log.info("%s may not cancel %s: ignored", peer, msg.item_id)
            return
        forward = self._offloaded.get(msg.item_id)
        if forward is not None:  # the peer runs it: the cancel goes there (its CANCELLED, or a
            self._offload_cancels[msg.item_id] = msg  # result already on its way, is relayed);
            self.mesh.peers.send(forward[2], msg)  # if it refuses, the item is not run here
            return
        task = self._items.get(msg.item_id)
        if task is None or task.done() or msg.item_id in self._answered:
            return  # its answer is queued already: too late to cancel (it completes as sent)
        if not counted and msg.item_id not in self._cancelled:
            self.stats.cancelled += 1
        self._cancelled.add(msg.item_id)  # (another cancel of it is not counted again)
        task.cancel()

    def _cancel_waiting(self, peer: str, item_id: str) -> bool:
        """Mark the assignments of ``item_id`` waiting for their input as cancelled (each is
        answered once done waiting), if ``peer`` may cancel them; whether it was, counted
        now or by an earlier cancel."""
        senders = self._waiting.get(item_id)
        if senders is None or not (peer in senders or self._is_coordinator(peer)):
            return False
        if item_id not in self._waiting_cancels:
            self._waiting_cancels.add(item_id)
            self.stats.cancelled += 1
        return True

    def _may_direct(self, peer: str, item_id: str) -> bool:
        """Whether ``peer`` may cancel or re-assign an item held here: a coordinator (by its
        certificate: :meth:`_is_coordinator`), the peer that sent the item here (a node that
        passed it on forwards its coordinator's cancel) or re-assigned it last (one of those),
        or the one whose item this node passed on: not any other member of the fleet."""
        latest, passed = self._reply.get(item_id), self._offloaded.get(item_id)
        return (
            peer == self._senders.get(item_id)
            or (passed is not None and peer == passed[0])
            or (latest is not None and peer == latest[0])
            or self._is_coordinator(peer)
        )

    def _on_relay(self, peer: str, msg: TaskResult | TaskFailed) -> None:
        offload = self._offloaded.get(msg.item_id)
        if offload is None or offload[2] != peer or offload[1].attempt != msg.attempt:
            return  # not ours to relay (a late, foreign or earlier attempt's message): ignore
        cancelled = msg.item_id in self._offload_cancels
        item = self._time_left(offload[1])  # (before it is settled: that forgets its expiry)
        coordinator, _, _ = self._settle_offload(msg.item_id)
        ref = ModelRef(item.model_id, item.model_version)
        coordinator, latest = self._answer_to(coordinator, item)
        if isinstance(msg, TaskResult):
            self._keep_result(coordinator, latest, msg)
        if isinstance(msg, TaskFailed) and not cancelled and self._runs_refused(msg, ref):
            log.info("%s refused %s (%s): running it here", peer, msg.item_id, msg.message)
            self.stats.taken_back += 1
            self._start(coordinator, latest, ref)
            return
        if latest.attempt != msg.attempt:
            msg = replace(msg, attempt=latest.attempt)
        self.stats.relayed += 1
        self._answer(coordinator, msg)

    def _on_accepted(self, peer: str, msg: TaskAccepted) -> None:
        """The peer an item was passed to accepted it: the coordinator hears so (under the
        item's latest assignment), as from a node running it itself; else its journal shows
        the item dispatched, never running, until the answer."""
        offload = self._offloaded.get(msg.item_id)
        if offload is None or offload[2] != peer or offload[1].attempt != msg.attempt:
            return
        coordinator, attempt = self._reply.get(msg.item_id, (offload[0], msg.attempt))
        self.mesh.peers.send(coordinator, replace(msg, attempt=attempt))

    # --- running ---------------------------------------------------------------------------

    async def _run(self, peer: str, msg: TaskAssign, ref: ModelRef) -> None:
        loop = asyncio.get_running_loop()
        received = loop.time()
        deadline = None if msg.deadline_s is None else received + msg.deadline_s
        try:
            batch = _input_array(msg.input)
            async with self._slot(msg.item_id, _priority(msg.priority), deadline):
                started = loop.time()
                output = await self._infer(ref, batch, _priority(msg.priority), deadline)
            done = loop.time()
            timings = {"queue_s": started - received, "infer_s": done - started}
            timings["total_s"] = done - received
            packed = await self._output(ref, output)
            peer, msg = self._answer_to(peer, msg)
            result = TaskResult(
                msg.item_id,
                msg.attempt,
                packed,
                self.mesh.node_id,
                self._engine_name,
                self._device(),
                timings,
            )
            self._answered.add(msg.item_id)  # its answer is queued: cancelling sends no other
            self._keep_result(peer, msg, result)
            await self.mesh.peers.request(peer, result)
            self.stats.completed += 1
            later = self._reply.pop(msg.item_id, None)
            if later is not None:  # re-assigned while written (and not answered from replay)
                self._answer(later[0], replace(result, attempt=later[1]))
        except MeshInferError as exc:
            peer, msg = self._answer_to(peer, msg)
            kind, retryable = _classify(exc)
            self._fail(peer, msg, kind, str(exc), retryable=retryable)
        except Exception as exc:  # a bug here or in an engine: say so, never leave it unanswered
            log.exception("item %s failed unexpectedly", msg.item_id)
            if msg.item_id in self._answered:
                return  # its result is on its way
            peer, msg = self._answer_to(peer, msg)
            why = f"node {self.mesh.node_id} failed: {type(exc).__name__}: {exc}"
            self._fail(peer, msg, FailureKind.UNKNOWN, why[:500], retryable=True)

    async def _infer(
        self, ref: ModelRef, batch: np.ndarray, priority: int, deadline: float | None
    ) -> np.ndarray:
        """Run ``batch`` through the model's batcher, in pieces the batcher accepts (their
        outputs joined in the batcher's worker thread when large: never on the loop)."""
        batcher = self.batchers[ref]
        size = batcher.max_request_rows
        if len(batch) <= size:
            return await batcher.submit(batch, priority=priority, deadline=deadline)
        parts = await asyncio.gather(
            *(
                batcher.submit(batch[i : i + size], priority=priority, deadline=deadline)
                for i in range(0, len(batch), size)
            )
        )
        if sum(part.nbytes for part in parts) <= INLINE_MAX_BYTES:
            return np.concatenate(parts)
        return await batcher.in_worker(np.concatenate, parts)

    async def _output(self, ref: ModelRef, output: np.ndarray) -> Tensor:
        """The item's output as it travels (:func:`_wire_tensor`), packed (a copy of it) in the
        model's batcher's worker thread when larger than
        :data:`~meshinfer.inference.batching.INLINE_MAX_BYTES`, as the batcher does its own
        work on big arrays: never on the loop."""
        if output.nbytes <= INLINE_MAX_BYTES:
            return _wire_tensor(output)
        return await self.batchers[ref].in_worker(_wire_tensor, output)

    @contextlib.asynccontextmanager
    async def _slot(self, item_id: str, priority: int, deadline: float | None):
        """One of the ``max_concurrent`` slots (highest ``priority`` first), waited for until
        ``deadline`` (loop time) at most: an item whose deadline passes while it waits is
        answered then, not once a slot frees (DeadlineExceededError)."""
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire(priority)
        except TimeoutError:
            raise DeadlineExceededError(f"item {item_id}: deadline passed waiting to run") from None
        self._started.add(item_id)
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._started.discard(item_id)
            self._slots.release()

    def _answer_to(self, peer: str, msg: TaskAssign) -> tuple[str, TaskAssign]:
        """Who a held item's answer goes to: the latest assignment of it (``_reply``), else
        the one it came with."""
        later = self._reply.pop(msg.item_id, None)
        return (peer, msg) if later is None else (later[0], replace(msg, attempt=later[1]))

    def _fail(self, peer: str, msg: TaskAssign, kind: FailureKind, text: str, *, retryable: bool):
        self.stats.failed[kind.name.lower()] += 1
        self._answer(peer, TaskFailed(msg.item_id, msg.attempt, int(kind), text, retryable))

    def _answer(self, peer: str, msg: TaskResult | TaskFailed) -> None:
        """Send an answer that nothing here waits for (a failure, a relayed answer): best
        effort, except during a drain, which waits for it to be written before the node closes
        its sessions (see :meth:`drain`)."""
        if not self._draining or self._closed:
            self.mesh.peers.send(peer, msg)
            return
        sent = self.mesh.peers.send_tracked(peer, msg)
        if sent is not None:
            self._handing_back.add(sent)
            sent.add_done_callback(self._written)

    def _written(self, sent: asyncio.Future[None]) -> None:
        self._handing_back.discard(sent)
        if not sent.cancelled() and sent.exception() is not None:  # the coordinator relies
            log.info("an answer sent while draining was not written: %s", sent.exception())

    def _keep_result(self, asker: str, item: TaskAssign, result: TaskResult) -> None:
        """Keep ``result`` a while (:mod:`node.replay`), and the sweep that drops it then: an
        idle node keeps no result past its time."""
        self.replay.keep(asker, item, result, asyncio.get_running_loop().time())
        if self._replay_sweep is None:
            self._sweep_replay()

    def _sweep_replay(self) -> None:
        """Drop the kept results expired by now; come back when the oldest left expires (at
        least :data:`REPLAY_SWEEP_S` later, or a quarter of ``result_replay_s``)."""
        loop = asyncio.get_running_loop()
        due = self.replay.expire(loop.time())
        self._replay_sweep = None
        if due is not None and not self._closed:
            gap = min(REPLAY_SWEEP_S, self.replay.keep_s / 4)
            self._replay_sweep = loop.call_at(max(due, loop.time() + gap), self._sweep_replay)

    def _device(self) -> str:
        """The engine's device name (read once: ``capacity()`` also samples free memory)."""
        if self._device_name is None:
            engine = next(iter(self.batchers.values())).engine if self.batchers else None
            self._device_name = engine.capacity().device if engine is not None else ""
        return self._device_name

    # --- work sharing ----------------------------------------------------------------------

    def _should_offload(self, ref: ModelRef) -> bool:
        return ref not in self.batchers or self.backlog >= self.config.offload_queue_depth

    def _offload(self, coordinator: str, msg: TaskAssign, ref: ModelRef) -> bool:
        target = self._least_loaded_peer(ref, exclude={coordinator})
        if target is None:
            return False
        sent = self.mesh.peers.send_tracked(target, msg)
        if sent is None:  # refused at once (outbox full): run it here after all
            return False
        offload = self._offloaded[msg.item_id] = (coordinator, msg, target)
        self._no_offloads.clear()
        loop = asyncio.get_running_loop()
        wait = OFFLOAD_ANSWER_S
        if msg.deadline_s is not None:
            self._offload_expiry[msg.item_id] = loop.time() + msg.deadline_s
            wait = min(wait, msg.deadline_s + 1.0)
        self._offload_timers[msg.item_id] = loop.call_later(wait, self._offload_overdue, offload)
        self._spawn(self._forward(offload, sent))
        self.stats.offloaded += 1
        log.info("offloaded %s to %s (backlog %d)", msg.item_id, target, self.backlog)
        return True

    async def _forward(self, offload: Offload, sent: asyncio.Future[None]) -> None:
        """Wait until an offloaded item was written to its peer; if the peer table gives up on
        it (dial failed, too large for the session), hand it back unless it was answered or
        handed back meanwhile."""
        _, msg, target = offload
        try:
            await sent
        except MeshInferError as exc:
            if self._offloaded.get(msg.item_id) is offload:
                self._hand_back(msg.item_id, f"offloaded to {target}, but not sent: {exc}")

    def _on_member(self, event: MemberEvent) -> None:
        if event.kind in (MemberEventKind.DEAD, MemberEventKind.LEFT):
            node = event.member.node_id
            self._hand_back_from(node, event.kind.value)
            tell = self.mesh.peers.session(node) is not None  # it may be alive after all
            why = f"passed here by {node}, which is {event.kind.value} as seen here"
            self._drop_from(node, why, tell=tell)

    def _on_cut_off(self, cut: CutOff) -> None:
        """A session with a peer was closed for its revoked certificate: a graceful close, but
        what went over it will not be answered. Nothing is lost if the items went over another
        session of that peer, under a good certificate, which stays up."""
        if cut.sends_lost:
            self._hand_back_from(cut.node_id, f"certificate serial {cut.serial} revoked")
        if not cut.still_connected:  # an answer would go to the revoked certificate's holder
            self._drop_from(cut.node_id, "", tell=False)

    def _on_session(self, node: str, session: Session) -> None:
        self._spawn(self._watch(node, session))

    def _spawn(self, step: Coroutine[object, object, None]) -> None:
        """Run ``step`` as a task this executor owns (cancelled by :meth:`aclose`; after it,
        dropped)."""
        if self._closed:
            step.close()
            return
        task = asyncio.get_running_loop().create_task(step)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        task.add_done_callback(_log_failure)

    async def _watch(self, node: str, session: Session) -> None:
        """Once ``session`` ends: with no other session left, hand back what was passed to
        ``node`` (lost, or closed by a peer going away without answering: nothing more comes,
        and a peer that still runs an item dials again only to have its answer ignored); lost
        while another stays, send it again. A session cut for a revoked certificate is left
        to :meth:`_on_cut_off`. Nothing once this executor is closed (its :meth:`aclose` may
        wait for an input's hash meanwhile): what is passed on is dropped, and a send whose
        outcome nobody awaits (its :meth:`_forward` is not run then) would leave a failure
        unretrieved."""
        await session.wait_closed()
        if self._closed:
            return
        peers = self.mesh.peers
        if peers.session(node) is None:
            if session.lost:
                self._hand_back_from(node, "session lost")
            elif not peers.admission.revocations.is_revoked(session.peer):
                self._hand_back_from(node, f"session closed: {session.close_reason}")
        elif session.lost and peers.carried(session):
            self._pass_again(node)

    def _pass_again(self, target: str) -> None:
        """A session with ``target`` that carried messages to it was lost while another stays
        open (it dialled again after roaming, or both sides had dialled): an item passed to it
        over the lost one may never have arrived, or its answer may have gone with it. Send
        each item passed to ``target`` again, over the open session; a peer that holds or
        answered one answers it once more (its latest assignment; its kept result), as for a
        coordinator's resend. An item cancelled meanwhile is not sent again: its cancel is. The
        session left being cut for a revoked certificate, nothing goes to its holder: the items
        are handed back."""
        if self.mesh.peers.carrier_revoked(target):
            self._hand_back_from(target, "its session left is under a revoked certificate")
            return
        for offload in [o for o in self._offloaded.values() if o[2] == target]:
            _, item, _ = offload
            cancel = self._offload_cancels.get(item.item_id)
            if cancel is not None:  # not wanted any more: the cancel may have been lost too
                self.mesh.peers.send(target, cancel)
                continue
            sent = self.mesh.peers.send_tracked(target, self._time_left(item))
            if sent is None:  # the outbox is full: it would wait for its deadline
                self._hand_back(item.item_id, f"offloaded to {target}, not sent again")
                continue
            self.stats.passed_again += 1
            self._spawn(self._forward(offload, sent))

    def _drop_from(self, sender: str, why: str, *, tell: bool) -> None:
        """Cancel the items ``sender``, a node, passed here whose answer goes to it (not to a
        coordinator that assigned them again): it died, left or was revoked, and gave them
        back to their coordinators, so running them only spends this node's engine.
        ``tell``: answer each to it all the same (``PEER_LOST``, retryable, ``why``), for a
        node declared dead while its session with this one stays open."""
        for item_id in list(self._passed_here):
            task = self._items[item_id]
            to = self._reply.get(item_id, (self._senders.get(item_id), 0))[0]
            if to != sender or task.done() or item_id in self._answered:
                continue
            self._dropped[item_id] = why if tell else None
            self.stats.dropped += 1
            task.cancel()

    def _hand_back_from(self, target: str, why: str) -> None:
        """Items offloaded to ``target`` will not come back: the coordinator re-runs them."""
        for item_id, (_, _, to) in list(self._offloaded.items()):
            if to == target:
                self._hand_back(item_id, f"offloaded to {target}, which was lost ({why})")

    def _hand_back(self, item_id: str, text: str) -> None:
        """Tell the coordinator an offloaded item will not be answered (retryable), or, if it
        cancelled the item, that it is cancelled: it wants no re-run."""
        cancelled = item_id in self._offload_cancels
        coordinator, msg = self._answer_to(*self._settle_offload(item_id)[:2])
        if cancelled:
            why = f"cancelled by the coordinator; {text}"
            self._fail(coordinator, msg, FailureKind.CANCELLED, why, retryable=False)
            return
        self.stats.handed_back += 1
        self._fail(coordinator, msg, FailureKind.PEER_LOST, text, retryable=True)

    def _settle_offload(self, item_id: str) -> Offload:
        """The item passed on is answered or handed back: forget it (and its timer)."""
        offload = self._offloaded.pop(item_id)
        self._offload_cancels.pop(item_id, None)
        self._offload_expiry.pop(item_id, None)
        timer = self._offload_timers.pop(item_id, None)
        if timer is not None:
            timer.cancel()
        if not self._offloaded:
            self._no_offloads.set()
        return offload

    def _time_left(self, item: TaskAssign) -> TaskAssign:
        """``item``, passed on, with what is left of its deadline now (it counts from when the
        item arrived here, not from when it is sent again or run here after all)."""
        expiry = self._offload_expiry.get(item.item_id)
        if expiry is None:
            return item
        left = max(0.0, expiry - asyncio.get_running_loop().time())
        return replace(item, deadline_s=left)

    def _offload_overdue(self, offload: Offload) -> None:
        """No answer from the peer an item was passed to, by the item's deadline (or within
        :data:`OFFLOAD_ANSWER_S`): the answer was lost on the way; hand the item back."""
        _, msg, target = offload
        self._offload_timers.pop(msg.item_id, None)
        if self._offloaded.get(msg.item_id) is offload:
            self._hand_back(msg.item_id, f"offloaded to {target}, which has not answered")

    def _runs_refused(self, failed: TaskFailed, ref: ModelRef) -> bool:
        """Whether an item the peer refused (draining, overloaded, model not loaded: it never
        ran there) runs here instead of the refusal going back: this node has the model and is
        not draining itself (one round trip to the coordinator and its re-scheduling saved)."""
        refused = failed.retryable and failure_kind(failed.code) in REFUSALS
        return refused and not self._draining and ref in self.batchers

    def _is_coordinator(self, peer: str) -> bool:
        """Whether ``peer`` holds the coordinator role, as the fleet certificate its session
        proved says (not what membership gossips, nor "unknown, so maybe"): a coordinator may
        send items to run or pass on, and cancel any. An item a node passed to us is run here,
        never passed on again: one hop, so items cannot bounce between nodes whose gossiped
        queue depths are a second old, and an offloading node's relay entry is never
        overwritten. A message's handler runs while its session is listed, so its sender's
        certificate is always at hand."""
        return "coordinator" in self.mesh.peers.roles(peer)

    def _least_loaded_peer(self, ref: ModelRef, exclude: set[str]) -> str | None:
        """The peer to pass an item for ``ref`` to: the least loaded of those that can take
        it and are less loaded than this node (any, if this node lacks the model), at random
        among equals; None if there is none. A peer's load counts what this node passed to it
        and has not had answered, which its gossiped depth may not show yet."""
        passed = Counter(to for _, _, to in self._offloaded.values())
        ceiling = self.backlog if ref in self.batchers else math.inf
        loads = {
            m.node_id: m.state.queue_depth + passed[m.node_id]
            for m in self._offload_targets(ref, exclude)
        }
        loads = {node: load for node, load in loads.items() if load < ceiling}
        if not loads:
            return None
        least = min(loads.values())
        return self._rng.choice(sorted(node for node, load in loads.items() if load == least))

    def _offload_targets(self, ref: ModelRef, exclude: set[str]) -> Iterator[Member]:
        """Live members that gossip ``ref`` and can be sent an item now (:meth:`_reachable`)."""
        membership = self.mesh.membership
        if membership is None:
            return
        for member in membership.core.live_members():
            models = member.state.models
            has = any((m.model_id, m.version) == (ref.model_id, ref.version) for m in models)
            if has and member.node_id not in exclude and self._reachable(member):
                yield member

    def _reachable(self, member: Member) -> bool:
        """ALIVE (a suspect may be dead or just restarted), with an open session (else an item
        would wait for a dial that may fail), and that session's certificate not revoked: the
        revocation list in force already names it while the session is being cut, and what
        went over it then would be lost."""
        if member.status is not MemberStatus.ALIVE:
            return False
        peers, node = self.mesh.peers, member.node_id
        return peers.session(node) is not None and not peers.carrier_revoked(node)

    # --- lifecycle -------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Stop taking work; hand back items not yet started; let running ones finish, and
        items passed to peers be answered (relayed), within ``timeout``; then hand back the
        passed items still unanswered, and the items still running here: once this node is
        gone their answers have nowhere to go, and the coordinator re-runs them at once
        instead of at their timeout. Returns once every hand-back, result and relayed answer
        was written to its session (or failed), for up to :data:`HAND_BACK_WRITE_S` past
        ``timeout``: the peer table drops what is still queued when it closes."""
        self._draining = True
        self._stop_items(running=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = [t for t in self._items.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._no_offloads.wait()
                await self.input_order.settled()  # items waiting for their input: answered
        for item_id in list(self._offloaded):
            self._hand_back(item_id, "passed on by a node that is stopping; not answered yet")
        write_by = max(deadline, loop.time() + HAND_BACK_WRITE_S)
        stopped = self._stop_items(running=True)
        if stopped:  # each is answered as it ends (_item_done)
            await asyncio.wait(stopped, timeout=max(0.0, write_by - loop.time()))
        writing = {*self._handing_back, *(t for t in self._items.values() if not t.done())}
        if writing:  # written before the sessions close (which drops what is queued)
            await asyncio.wait(writing, timeout=max(0.0, write_by - loop.time()))

    def _stop_items(self, *, running: bool) -> list[asyncio.Task[None]]:
        """Cancel (hand back) the items here that wait for a slot, and with ``running`` those
        that run too, but none whose result is queued; return their tasks."""
        stopped = []
        for item_id, task in list(self._items.items()):
            started = item_id in self._started and not running
            if started or task.done() or item_id in self._answered:
                continue
            self.stats.handed_back += 1
            task.cancel()
            stopped.append(task)
        return stopped

    async def aclose(self) -> None:
        """Stop: cancel running items, session watchers and the waits for offloaded items'
        sends (what is queued is still written), and the timers of items passed on; drop the
        items waiting for an input being hashed (not answered). Idempotent."""
        self._draining = True
        self._closed = True
        for timer in self._offload_timers.values():
            timer.cancel()
        if self._replay_sweep is not None:
            self._replay_sweep.cancel()
            self._replay_sweep = None
        await self.input_order.aclose()  # (first: what waits for its input is dropped)
        tasks = [t for t in (*self._watchers, *self._items.values()) if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Slots:
    """``limit`` slots for items to run in, given to waiters highest priority first (in order
    of arrival within one priority). A waiter cancelled after it was given a slot passes the
    slot on; one cancelled before stays in the heap until popped, or until the cancelled ones
    are more than half of it (then they are all dropped): a heap of waiters whose deadlines
    passed while every slot stayed busy is not kept."""

    def __init__(self, limit: int) -> None:
        self.free = limit
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # (-priority, n, fut)
        self._arrivals = itertools.count()
        self._gone = 0  # waiters in the heap that were cancelled before being given a slot

    async def acquire(self, priority: int) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        given: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._arrivals), given))
        try:
            await given
        except asyncio.CancelledError:
            if given.done() and not given.cancelled():  # given a slot, then cancelled
                self.release()
            else:
                given.cancel()  # (cancelled with its task already: a stale entry either way)
                self._left()
            raise

    def _left(self) -> None:
        """A waiter was cancelled in the heap: drop every cancelled one once they are most."""
        self._gone += 1
        if 2 * self._gone > len(self._waiters):
            self._waiters = [w for w in self._waiters if not w[2].done()]
            heapq.heapify(self._waiters)
            self._gone = 0

    def release(self) -> None:
        while self._waiters:
            _, _, given = heapq.heappop(self._waiters)
            if not given.done():  # (a cancelled waiter's future is done: skipped)
                given.set_result(None)
                return
            self._gone -= 1
        self.free += 1


def _input_array(tensor: Tensor) -> np.ndarray:
    """The item's input as it came (a read-only view of its bytes, no copy): its batcher
    converts it to the model's dtype, in its worker thread for a big one, never on the loop."""
    array = tensor.to_array()
    if array.ndim < 2:
        raise RemoteProtocolError(f"input must have a batch axis, got shape {array.shape}")
    return array


def _wire_tensor(output: np.ndarray) -> Tensor:
    """An item's output as a tensor that travels: in the engine's own
    dtype where the wire carries it (:data:`~meshinfer.proto.tasks_wire.DTYPES`: integer labels
    stay labels, float16 stays half the bytes); a float dtype it lacks (float64) as float32, an
    integer one as int64. InferenceError for any other (complex, uint64: no dtype the wire
    carries holds its values), and for a float64 output with a finite value beyond float32's
    range (it would arrive as inf: :func:`_as_float32`). Linear in the output: on the loop
    only for small ones."""
    dtype = output.dtype
    if dtype.name not in DTYPES:
        if dtype.kind == "f":
            output = _as_float32(output)
        elif dtype.kind in "iu" and np.can_cast(dtype, np.int64):
            output = output.astype(np.int64)
        else:
            raise InferenceError(
                f"the engine's output dtype {dtype} cannot be sent: the wire carries "
                f"{', '.join(sorted(DTYPES))}"
            )
    return Tensor.from_array(output)


def _as_float32(output: np.ndarray) -> np.ndarray:
    """``output`` (a float dtype the wire lacks) as float32: inf and NaN stay what they are;
    InferenceError if a finite value is beyond float32's range. The cast itself notices (the
    CPU's overflow flag, which an inf or NaN does not raise): no second pass over a big
    output, only over one that failed, for the message."""
    try:
        with np.errstate(over="raise", invalid="ignore"):
            return output.astype(np.float32)
    except FloatingPointError:
        pass
    limit = float(np.finfo(np.float32).max)
    with np.errstate(invalid="ignore"):
        beyond = np.isfinite(output) & (np.abs(output) > limit)
    where = np.unravel_index(int(np.argmax(beyond)), output.shape)
    raise InferenceError(
        f"the engine's {output.dtype} output cannot be sent: {int(beyond.sum())} value(s) overflow"
        f" float32 (beyond {limit:.4g}; the wire carries no {output.dtype}), the first"
        f" {float(output[where])!r} at index {tuple(int(i) for i in where)}"
    )


def _priority(value: int) -> int:
    return max(0, min(3, value))


def _classify(exc: MeshInferError) -> tuple[FailureKind, bool]:
    if isinstance(exc, RemoteProtocolError | BatchShapeError):
        return FailureKind.BAD_INPUT, False
    if isinstance(exc, OverloadedError):
        return FailureKind.OVERLOADED, True
    if isinstance(exc, DeadlineExceededError):
        return FailureKind.DEADLINE_EXCEEDED, False
    if isinstance(exc, ModelNotFoundError):
        return FailureKind.MODEL_NOT_FOUND, True
    if isinstance(exc, InferenceError):
        return FailureKind.INFERENCE_ERROR, False
    return FailureKind.UNKNOWN, True
