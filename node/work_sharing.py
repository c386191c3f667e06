"""Work sharing, a part of the node's task executor (:mod:`node.executor`): passing items to less
loaded peers, relaying what comes back, handing items back when the peer is lost, and dropping
the items a lost node passed here.

When an item from a coordinator arrives while this node's backlog reaches ``offload_queue_depth``
(or it lacks the model) and a peer that is ALIVE (not suspect), has an open session with this node
and gossips the model with a smaller load (any load, if this node lacks the model) exists, the item
is forwarded to that peer, and whatever comes back is relayed to the coordinator (its
``TaskAccepted`` too, so the coordinator sees the item running), except a refusal (the peer is
draining, overloaded or lacks the model: it never ran the item), after which the item runs here
unless this node is draining too. One hop only: an item another node passed on runs where it lands,
and a node whose own certificate grants the coordinator role passes nothing on (its peers would take
its items for a coordinator's, free to pass on again).
A peer's load is its gossiped queue depth (up to a second old) plus the items this node passed to
it that are not answered yet, and ties are broken at random, so overloaded nodes do not all pile
onto the one peer that looked idlest. A peer whose session this node would send over carries a
certificate that is now revoked (the session is about to be cut) gets nothing. If the peer an item
was passed to dies, leaves, loses its session abruptly or closes it without answering (and keeps no
other), or the session the item went over is closed for a revoked certificate first, or the item
could never be written to it (the peer table gave up: dial failed, message too large), the item is
handed back (``TaskFailed`` ``PEER_LOST``, retryable) so the coordinator re-runs it at once instead
of waiting for its item timeout; one its coordinator cancelled meanwhile is answered ``CANCELLED``
instead, as it is at once if the cancel cannot be passed on (the outbox to the peer is full). A
session with the peer lost while another stays open (the peer dialled again after
roaming) sends the peer's items again over the open one instead (unless that one is being cut for a
revoked certificate: then they are handed back). What a peer sends over a session under a revoked
certificate (being cut) never reaches the executor (the peer table drops it:
``PeerStats.from_revoked``), so an answer that does is relayed: it came over a good session (a
re-enrolled peer's new certificate), while the cut hands back what went over the revoked one. Items
a node passed here are cancelled when it dies or leaves (it handed them back: their answer would go
nowhere useful; answered ``PEER_LOST`` if its session stays open, as it may be alive after all), or
when its last good session is cut for a revoked certificate (not answered: nothing goes to the
holder), unless a coordinator assigned them here again meanwhile. Sent again, or run here after a
refusal, an item has what is left of its deadline, counted from when it came here.

:class:`WorkSharing` is mixed into :class:`~node.executor.TaskExecutor`: its state (what this node
passed on, with its timers and cancels; the items nodes passed here, and those dropped) lives on
the executor, all of it set up by :meth:`WorkSharing._init_work_sharing`, and the executor reaches
it through this class's methods only (``_note_passed_here``, ``_settle_passed_here``,
``_cancel_passed_on``, ``_stop_offload_timers``; it reads ``_offloaded`` and, draining, awaits
``_no_offloads``). It answers, runs and
checks authority with the executor's own methods (``_fail``, ``_answer``, ``_answer_to``,
``_keep_result``, ``_start``, ``_spawn``, ``_is_coordinator``). Concurrency: every method runs on
the node's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

from meshinfer.errors import MeshInferError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.membership import Member, MemberEvent, MemberEventKind, MemberStatus
from meshinfer.proto.tasks_wire import (
    REFUSALS,
    FailureKind,
    TaskAccepted,
    TaskAssign,
    TaskCancel,
    TaskFailed,
    TaskResult,
    failure_kind,
)
from meshinfer.runtime.revocations import CutOff
from meshinfer.runtime.session import Session

#: (the executor's logger: these lines read as they did before work sharing had its module)
log = logging.getLogger("node.executor")

#: How long an item passed to a peer may go unanswered (less: its deadline and a second) before
#: it is handed back; its answer was lost on the way, and until then it counts against the peer.
OFFLOAD_ANSWER_S = 60.0

#: An item passed to a peer: (the coordinator that sent it, the item, the peer it went to).
Offload = tuple[str, TaskAssign, str]


class WorkSharing:
    """The work-sharing part of :class:`~node.executor.TaskExecutor` (see the module
    docstring); the ``rng`` given to :meth:`_init_work_sharing` breaks ties between equally
    loaded peers when passing an item on."""

    def _init_work_sharing(self, rng: random.Random | None) -> None:
        """Set up all of work sharing's state on the executor (called once, from its
        ``__init__``)."""
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
        self._rng = rng or random.Random()
        self._passed_here: set[str] = set()  # items here that a node (no coordinator) passed
        #: items cancelled because the node that passed them is gone -> what to answer it
        #: (``PEER_LOST`` with this text), or None: nothing (its certificate is revoked)
        self._dropped: dict[str, str | None] = {}

    # --- the executor's hooks --------------------------------------------------------------

    def _note_passed_here(self, item_id: str) -> None:
        """``item_id``, which runs here, was passed here by a node (not a coordinator): it is
        dropped if that node is lost (:meth:`_drop_from`)."""
        self._passed_here.add(item_id)

    def _settle_passed_here(self, item_id: str) -> str | None:
        """The item running here ended: forget it was passed here. What its cancel answers if
        it was dropped for the node that passed it (:meth:`_drop_from`): ``PEER_LOST`` with
        this text, or None: nothing; "" if it was not dropped."""
        self._passed_here.discard(item_id)
        return self._dropped.pop(item_id, "")

    def _cancel_passed_on(self, cancel: TaskCancel) -> bool:
        """Pass ``cancel`` on to the peer its item was passed to, if it was: its CANCELLED, or
        a result already on its way, is relayed, and if it refuses the item, the item is not
        run here. Whether the item was passed on."""
        offload = self._offloaded.get(cancel.item_id)
        if offload is None:
            return False
        self._offload_cancels[cancel.item_id] = cancel
        self._pass_cancel(offload[2], cancel)
        return True

    def _pass_cancel(self, target: str, cancel: TaskCancel) -> None:
        """Send ``cancel`` to ``target``, the peer its item was passed to; if the peer table
        drops it at once (outbox full), answer the item ``CANCELLED`` now instead of at its
        answer timer (the peer runs it on; its late answer is not relayed)."""
        if not self.mesh.peers.send(target, cancel):
            self._hand_back(cancel.item_id, f"the cancel was not passed on to {target}")

    def _stop_offload_timers(self) -> None:
        """Cancel the timers of the items passed on (the executor is closing)."""
        for timer in self._offload_timers.values():
            timer.cancel()

    # --- answers from the peer an item was passed to ---------------------------------------

    def _on_relay(self, peer: str, msg: TaskResult | TaskFailed) -> None:
        offload = self._offloaded.get(msg.item_id)
        if offload is None or offload[2] != peer or offload[1].attempt != msg.attempt:
            _log_ignored(peer, msg, offload)  # not ours to relay: a late, foreign or stale one
            return
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
        self._answer(coordinator, msg, latest if isinstance(msg, TaskResult) else None)

    def _on_accepted(self, peer: str, msg: TaskAccepted) -> None:
        """The peer an item was passed to accepted it: the coordinator hears so (under the
        item's latest assignment), as from a node running it itself; else its journal shows
        the item dispatched, never running, until the answer."""
        offload = self._offloaded.get(msg.item_id)
        if offload is None or offload[2] != peer or offload[1].attempt != msg.attempt:
            return
        coordinator, attempt = self._reply.get(msg.item_id, (offload[0], msg.attempt))
        self.mesh.peers.send(coordinator, replace(msg, attempt=attempt))

    # --- passing items on ------------------------------------------------------------------

    def _should_offload(self, ref: ModelRef) -> bool:
        """Whether an item for ``ref`` from a coordinator is passed on, if a peer can take it:
        never by a node whose own certificate grants the coordinator role (its peers would take
        the item for a coordinator's and might pass it on again, with no hop limit: back to a
        node that passed it, a cycle only the answer timers end)."""
        if "coordinator" in self.mesh.peers.admission.identity.certificate.roles:
            return False
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

    # --- peers lost ------------------------------------------------------------------------

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
                self._pass_cancel(target, cancel)
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


def _log_ignored(peer: str, msg: TaskResult | TaskFailed, offload: Offload | None) -> None:
    """An answer from ``peer`` that is not relayed: the item was not passed on (or is answered
    or handed back already: a late or second answer), was passed to another peer, or under
    another attempt. Logged, so a helper whose answers come too late can be told from one
    whose answers are lost."""
    what = "result" if isinstance(msg, TaskResult) else "failure"
    if offload is None:
        why = "not passed on, or answered or handed back already"
    elif offload[2] != peer:
        why = f"it was passed to {offload[2]}"
    else:
        why = f"it was passed on as attempt {offload[1].attempt}"
    log.info(
        "%s of %s (attempt %d) from %s not relayed: %s", what, msg.item_id, msg.attempt, peer, why
    )
