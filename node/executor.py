"""The node's task executor: work items that reach this node, run through the batcher.

Protocol (messages in :mod:`meshinfer.proto.tasks_wire`), per work item::

    coordinator --TaskAssign--> node --TaskAccepted--> coordinator   (if still running after
                                                                      accepted_notice_ms)
                                node --TaskResult | TaskFailed--> coordinator
    coordinator --TaskCancel--> node   (the item's asyncio task is cancelled; TaskFailed CANCELLED;
                                        an item passed to a peer: the cancel is passed on)

At most ``max_concurrent`` items run at once; the rest wait in order of priority (larger first,
then in order of arrival; at most 1,024 of them, ``node.slots.MAX_WAITING``: one more is answered
``OVERLOADED``, retryable), each until its deadline at most (then it is answered
``DEADLINE_EXCEEDED``, not once a slot frees: :mod:`node.slots`). Work sharing (an item from a
coordinator passed to a less loaded peer while this node's backlog is deep, whatever comes back
relayed, handed back when the peer is lost; items a lost node passed here dropped) is
:mod:`node.work_sharing`. A node already holding an item, running or passed on, answers its latest
``TaskAssign`` (a coordinator's retry after the first sender went away, or its resend after a lost
session): an item passed on is not passed on again, and the peer's answer is relayed under the
latest attempt. Bad input from a peer is answered with ``TaskFailed`` (``BAD_INPUT``) and never
reaches the engine. Inputs a coordinator asks this node to keep (``keep_input``) go into its input
cache (:class:`~meshinfer.inference.cache.ContentCache`, ``input_cache_mib``) as the item arrives,
and an item that names its input by reference (``input_ref``) is given it from there, or answered
``INPUT_NOT_CACHED`` so the coordinator sends the bytes; both happen before anything else is
decided about the item, so the cache sees every message in the order sent (which is what lets the
coordinator mirror it). An input to keep larger than 256 KiB is hashed in a worker thread
(:class:`~meshinfer.inference.cache.OrderedInputs`), not on the loop; an item naming its input by
reference meanwhile waits (milliseconds) until the cache operations before it are done, and if
cancelled then is answered ``CANCELLED`` when they are, unless the cache holds its input already
(and no earlier assignment of the item waits): it is given it at once, and its use of the cache
takes effect in its turn all the same. An item this node already answered (its result is kept a
while: :mod:`node.replay`, ``result_replay_mib``) is answered again from the kept result when it
comes back (a coordinator resending what a lost session or its restart may have swallowed), even
while draining, instead of running again; a result too large for the session it must go over is
answered with ``TaskFailed`` and forgotten, whether found so when first sent, replayed, relayed
from the peer it was passed to or sent to a later assignment of it, so the item sent again is
answered (it runs again), never met with silence. While draining (SIGTERM) new items are
refused as retryable and queued ones are handed back, so the coordinator re-runs them
elsewhere; those still running when the drain's time is up are handed back too. A cancelled
item is answered (``CANCELLED``, or ``SHUTTING_DOWN`` while draining) even if its cancel came
before its task first ran.

Concurrency: every method runs on the node's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from meshinfer.errors import (
    DeadlineExceededError,
    LocalProtocolError,
    MeshInferError,
    RemoteProtocolError,
    TransportError,
    log_failure,
)
from meshinfer.inference.base import ModelRef
from meshinfer.inference.batching import INLINE_MAX_BYTES, DynamicBatcher
from meshinfer.inference.cache import ContentCache, OrderedInputs
from meshinfer.proto.tasks_wire import (
    FailureKind,
    TaskAccepted,
    TaskAssign,
    TaskCancel,
    TaskFailed,
    TaskResult,
    Tensor,
)
from meshinfer.runtime.node import MeshNode
from node.config import ExecutorSection
from node.item_values import clamp_deadline as _deadline
from node.item_values import clamp_priority as _priority
from node.item_values import classify as _classify
from node.item_values import input_array as _input_array
from node.item_values import wire_tensor as _wire_tensor
from node.replay import ResultReplay, work_of
from node.slots import Slots as _Slots
from node.work_sharing import WorkSharing

log = logging.getLogger(__name__)

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


class TaskExecutor(WorkSharing):
    """Serves TaskAssign/TaskCancel for one node; see the module docstring. ``rng`` breaks ties
    between equally loaded peers when passing an item on (:mod:`node.work_sharing`)."""

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
        self._handing_back: set[asyncio.Future[None]] = set()  # answers sent while draining
        self._closed = False
        #: item -> (sender, attempt) of a later TaskAssign for an item already held here (a
        #: coordinator's retry after the one who sent it first went away): answered instead
        self._reply: dict[str, tuple[str, int]] = {}
        self._senders: dict[str, str] = {}  # item running here -> the peer it came from
        self._held: dict[str, TaskAssign] = {}  # item running here -> its assignment
        self._draining = False
        self._watchers: set[asyncio.Task[None]] = set()  # session watchers and offload sends
        self._init_work_sharing(rng)
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
        there (``keep_input``), in message order (see the module docstring), then go on. A
        deadline past ``MAX_DEADLINE_S`` is taken as that bound, here and wherever the item is
        passed on (:func:`~node.item_values.clamp_deadline`)."""
        if (bounded := _deadline(msg.deadline_s)) != msg.deadline_s:
            msg = replace(msg, deadline_s=bounded)
        ref = msg.input_ref
        if ref is not None and not self._is_coordinator(peer):
            # only a coordinator's inputs are kept here, and only its mirror may name them:
            # another member could run models on a kept input knowing its digest alone (or
            # probe what is held), and its gets would reorder the cache behind the mirrors
            self._fail(peer, msg, FailureKind.BAD_INPUT, "input by reference from a member"
                       " that is not a coordinator", retryable=False)  # fmt: skip
            return
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
            # only a coordinator asks (its mirror of this cache follows what it asked): another
            # member's ask would evict the coordinators' inputs behind their mirrors' backs
            if self._is_coordinator(peer):
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
        if self._ending(msg.item_id):  # taken as a re-assignment, it would go unanswered
            asyncio.get_running_loop().call_soon(self._assign, peer, msg)
            return
        if msg.item_id in self._items or msg.item_id in self._offloaded:
            if not self._may_direct(peer, msg.item_id):  # would take the answer (and cancel)
                # refused, not ignored: a node that passed on a retry of an item still held
                # here runs it itself (or relays the refusal) instead of waiting for its timer
                self.stats.reassigns_refused += 1
                log.info("%s may not re-assign %s: refused", peer, msg.item_id)
                self._fail(peer, msg, FailureKind.OVERLOADED, "holds it already", retryable=True)
                return
            if not self._same_work(msg):  # another coordinator's task of the same id
                self.stats.reassigns_refused += 1
                log.info("%s sent %s for other work than the one held: refused", peer, msg.item_id)
                text = "holds other work under this item id"
                self._fail(peer, msg, FailureKind.OVERLOADED, text, retryable=True)
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
            self._note_passed_here(msg.item_id)

    def _start(self, peer: str, msg: TaskAssign, ref: ModelRef) -> None:
        """Run the item here (``ref`` is loaded); its answer goes to ``peer``."""
        self.stats.accepted += 1
        loop = asyncio.get_running_loop()
        item_id = msg.item_id
        task = loop.create_task(self._run(peer, msg, ref), name=f"item-{item_id}")
        self._items[item_id] = task
        self._senders[item_id] = peer
        self._held[item_id] = msg
        delay = self.config.accepted_notice_ms / 1000
        if delay > 0:
            self._notices[item_id] = loop.call_later(
                delay, self._notify_accepted, peer, item_id, msg.attempt
            )
        else:
            self._notify_accepted(peer, item_id, msg.attempt)
        task.add_done_callback(lambda t: self._item_done(peer, msg, t))

    def _ending(self, item_id: str) -> bool:
        """Whether the item's task here is done and its end not settled yet: its done-callback
        (:meth:`_item_done`, which forgets a later assignment) runs in this loop iteration, so
        a message about the item is dealt with after it (``call_soon``, in arrival order)."""
        task = self._items.get(item_id)
        return task is not None and task.done()

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
        self._answer(peer, result, msg)
        return True

    def _result_unsent(self, peer: str, msg: TaskAssign, exc: BaseException) -> None:
        """The result sent to ``peer`` as the answer to ``msg`` (kept, relayed, or a later
        assignment's) was dropped. One that can never be sent (too large for the session it
        went to) is forgotten and ``msg`` is answered with the failure, as a run's result
        would be; one lost for want of a session stays kept, for the next attempt."""
        if not isinstance(exc, LocalProtocolError):
            return
        self.replay.forget(msg.item_id)
        why = f"result of {msg.item_id} not sent: {exc}"
        self._fail(peer, msg, FailureKind.UNKNOWN, why, retryable=True)

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
        try:
            self._answer_cancelled(peer, msg, task)
        finally:  # (always: a done task left in _items would defer its messages for ever)
            self._forget_item(item_id)

    def _answer_cancelled(self, peer: str, msg: TaskAssign, task: asyncio.Task[None]) -> None:
        """Answer the item if its task was cancelled before it answered (see :meth:`_item_done`)."""
        item_id = msg.item_id
        dropped = self._settle_passed_here(item_id)
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

    def _same_work(self, msg: TaskAssign) -> bool:
        """Whether a re-assignment of an item held here (running, or passed on) is for the
        work held: item ids are ``task/n`` and clients choose task ids, so another coordinator
        may send the id for other work (it took this item's answer, and the first coordinator
        got none). Checked on this rare path only (a CRC-32 of each input)."""
        passed_on = self._offloaded.get(msg.item_id)
        held = passed_on[1] if passed_on is not None else self._held.get(msg.item_id)
        return held is None or work_of("", held) == work_of("", msg)

    def _forget_item(self, item_id: str) -> None:
        self._items.pop(item_id, None)
        self._senders.pop(item_id, None)
        self._held.pop(item_id, None)
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
        self._cancel_held(peer, msg, counted)

    def _cancel_held(self, peer: str, msg: TaskCancel, counted: bool) -> None:
        """Cancel the item running here or passed on (``counted``: its cancel was counted)."""
        if self._ending(msg.item_id):  # after its end, and an assignment of it that came first
            asyncio.get_running_loop().call_soon(self._cancel_held, peer, msg, counted)
            return
        if msg.item_id not in self._items and msg.item_id not in self._offloaded:
            return  # over already (a forwarded cancel may come after the answer), or unknown
        if not self._may_direct(peer, msg.item_id):
            self.stats.cancels_refused += 1
            log.info("%s may not cancel %s: ignored", peer, msg.item_id)
            return
        if self._cancel_passed_on(msg):
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
            try:
                await self.mesh.peers.request(peer, result)
            except TransportError as exc:  # no session carries it now. No TaskFailed: the
                # kept result answers the item sent again (a re-dial, a restart), and a failure
                # would make the coordinator run it again, counted against its attempts
                log.info("result of %s not written to %s (kept): %s", msg.item_id, peer, exc)
            except LocalProtocolError:  # it can never be sent (too large for the session): not
                # kept, or a resend would be answered with it and dropped again, in silence; the
                # failure is answered below, and an attempt sent again runs again
                self.replay.forget(msg.item_id)
                raise
            else:
                self.stats.completed += 1
            later = self._reply.pop(msg.item_id, None)
            if later is not None:  # re-assigned while written (and not answered from replay)
                again = replace(msg, attempt=later[1])
                self._answer(later[0], replace(result, attempt=later[1]), again)
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
        outputs joined in the batcher's worker thread when large: never on the loop). One
        piece failing (its rows hold NaN, say) cancels the others: the item is answered with
        the failure and gives up its slot, so none of it may go on taking the engine."""
        batcher = self.batchers[ref]
        size = batcher.max_request_rows
        if len(batch) <= size:
            return await batcher.submit(batch, priority=priority, deadline=deadline)
        pieces = [
            asyncio.ensure_future(
                batcher.submit(batch[i : i + size], priority=priority, deadline=deadline)
            )
            for i in range(0, len(batch), size)
        ]
        try:
            parts = await asyncio.gather(*pieces)
        except BaseException:
            for piece in pieces:  # (what they end with is retrieved by the gather)
                piece.cancel()
            raise
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

    def _answer(
        self, peer: str, msg: TaskResult | TaskFailed, item: TaskAssign | None = None
    ) -> None:
        """Send an answer that nothing here waits for (a failure, a relayed or kept result):
        best effort, except during a drain, which waits for it to be written before the node
        closes its sessions (see :meth:`drain`). A result names the assignment it answers
        (``item``): one that can never be sent is answered with the failure instead
        (:meth:`_result_unsent`), never dropped in silence."""
        unsent = None if item is None else partial(self._result_unsent, peer, item)
        if not self._draining or self._closed:
            if not self.mesh.peers.send(peer, msg, unsent):
                _log_dropped(peer, msg)
            return
        sent = self.mesh.peers.send_tracked(peer, msg)
        if sent is None:
            _log_dropped(peer, msg)
            return
        self._handing_back.add(sent)
        sent.add_done_callback(partial(self._written, unsent))

    def _written(
        self, unsent: Callable[[BaseException], None] | None, sent: asyncio.Future[None]
    ) -> None:
        self._handing_back.discard(sent)
        if sent.cancelled() or (exc := sent.exception()) is None:
            return
        if unsent is not None and isinstance(exc, LocalProtocolError):
            unsent(exc)  # its failure is sent (and tracked) instead
            return
        log.info("an answer sent while draining was not written: %s", exc)  # the coordinator
        # hears of the item from its own timeout

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

    # --- owned tasks and authority ---------------------------------------------------------

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

    def _is_coordinator(self, peer: str) -> bool:
        """Whether ``peer`` holds the coordinator role, as the fleet certificate its session
        proved says (not what membership gossips, nor "unknown, so maybe"): a coordinator may
        send items to run or pass on, and cancel any. An item a node passed to us is run here,
        never passed on again: one hop, so items cannot bounce between nodes whose gossiped
        queue depths are a second old, and an offloading node's relay entry is never
        overwritten. A message's handler runs while its session is listed, so its sender's
        certificate is always at hand."""
        return "coordinator" in self.mesh.peers.roles(peer)

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
        self._stop_offload_timers()
        if self._replay_sweep is not None:
            self._replay_sweep.cancel()
            self._replay_sweep = None
        await self.input_order.aclose()  # (first: what waits for its input is dropped)
        tasks = [t for t in (*self._watchers, *self._items.values()) if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _log_dropped(peer: str, msg: TaskResult | TaskFailed) -> None:
    """An answer the peer table dropped at once (outbox full, peer unknown or closing): the
    coordinator hears of the item from its attempt timeout (the table counts the drop)."""
    what = "result" if isinstance(msg, TaskResult) else "failure"
    log.info("%s of %s to %s dropped unsent (outbox full or peer gone)", what, msg.item_id, peer)
