"""The peer table: one node's sessions with its peers, dialled on demand, and message dispatch.

``PeerTable`` owns every session of a node, inbound (handed over by the
:class:`~meshinfer.runtime.endpoint.SessionListener`) and outbound (dialled here, with IK since
the static key is known from discovery or membership). Callers never wait for a dial:
:meth:`PeerTable.send` queues the message on the peer's bounded outbox and a per-peer sender
task dials if needed and writes. Best-effort traffic (gossip) is dropped, counted, when a peer
is unreachable or its outbox is full (not when a dial fails while the peer dials in: what is
queued goes over its session). An outbox is bounded by count (``outbox_limit``) and by bytes
(``outbox_bytes``, estimated per message as it is queued:
:func:`~meshinfer.runtime.outbox_size.queued_size`), so a peer that stalls (or never reads
what it asked for) holds at most that much of this node's memory, or one message larger than
the byte bound (which goes when nothing else is queued for the peer); a send over either bound
is refused at once (``outbox-full``, ``outbox-bytes``). :meth:`PeerTable.request` is for
callers that need to know the message went out. A sender that fails (our bug) is logged at
ERROR once, and what is queued for its peer is dropped (counted as ``sender-failed``), its
requesters told; the next send to the peer starts a new one.

Every session gets a reader task that hands each message to the handler registered for its
type (:meth:`PeerTable.on`). Handlers are plain callables run on the loop; they must not block
and should spawn their own tasks for slow work. A handler's exception is logged and counted and
does not close the session.

A session whose peer certificate the revocation list in force revokes is about to be cut
(:mod:`~meshinfer.runtime.revocations` writes the list down, then closes it): from the moment
the list is in force, nothing goes to the peer over it (what is queued for the peer while it
goes over another open session with the peer, under a good certificate, if it has one, else
is dropped, counted as ``revoked``, its requesters told; a write that was waiting for the
session's writer is refused by the session itself), and what comes over it is dropped before
any handler (counted in ``PeerStats.from_revoked``). Both checks are a cached look per message
(:attr:`~meshinfer.runtime.session.Session.peer_revoked`).

A peer may hold several sessions with this node: both sides dialled at once, or the peer dialled
again while an older connection looked open here (a vehicle that roamed: its old connections
dead, not reset; another certificate of the same node). Messages go over the peer's oldest open
session whose certificate is not revoked, so a newer one never takes traffic from a session that
works (nor does a session under a stale certificate), and a node re-enrolled with a new
certificate gets what is queued for it over its new session while the one under its revoked
certificate is being cut. A newer session is also a hint that an older one may be dead, which a
send would otherwise find out only after ``idle_timeout``: when one is adopted, every older open
session with that peer is pinged, and one that neither answers nor receives anything within the
session config's ``verify_timeout`` is abandoned as lost (its watchers re-send what went over
it). A ping stuck behind a write that never completes still times out (it is not cancelled: a
send cut off part-way would break the record stream; it ends with the session). Sends to the
peer wait until those pings are settled (one round trip when the older sessions work), so they go
over a session that answered, or the new one.

Concurrency: all methods run on the node's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from meshinfer.closing import OneClose
from meshinfer.errors import (
    LocalProtocolError,
    MeshInferError,
    StreamClosed,
    TransportError,
    log_failure,
)
from meshinfer.proto import messages
from meshinfer.proto.messages import CloseCode
from meshinfer.runtime.endpoint import dial
from meshinfer.runtime.outbox_size import OUTBOX_BYTES, queued_size
from meshinfer.runtime.session import Admission, Session, SessionConfig, SessionMetrics
from meshinfer.transport.base import Address, Transport

log = logging.getLogger(__name__)

#: Most messages written to a session at once by a peer's sender task.
WRITE_BATCH = 64

MessageHandler = Callable[[str, messages.Message], None]
SessionCallback = Callable[[str, Session], None]


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """How to reach a peer: where it listens and the static key it must prove."""

    address: Address
    static_key: bytes


@dataclass
class PeerStats:
    sent: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    dials: int = 0
    dial_failures: int = 0
    verified: int = 0  # older sessions that answered a ping when a newer one opened
    abandoned: int = 0  # older sessions that did not, abandoned as lost
    handler_errors: int = 0
    unhandled: Counter[str] = field(default_factory=Counter)
    #: messages received over a session under a revoked certificate (by type): not handled
    from_revoked: Counter[str] = field(default_factory=Counter)


#: Who hears what became of a queued message: a future (:meth:`PeerTable.send_tracked`), a
#: callback told only if it is never written (``send``'s ``on_failure``), or nobody.
Requester = asyncio.Future[None] | Callable[[BaseException], None] | None


class _Outbox:
    """Bounded queue of messages for one peer and the task that sends them. Each entry keeps
    the size it was counted at when queued; ``size`` is their sum (entries come and go only
    through :meth:`push` and :meth:`pop`)."""

    def __init__(self, limit: int, byte_limit: int) -> None:
        self.queue: deque[tuple[messages.Message, Requester, int]] = deque()
        self.limit = limit
        self.byte_limit = byte_limit
        self.size = 0
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.retry_at = 0.0

    def push(self, msg: messages.Message, fut: Requester, size: int) -> None:
        self.queue.append((msg, fut, size))
        self.size += size

    def pop(self) -> Requester:
        """Take the oldest entry off (it was written or is dropped): its requester."""
        _, fut, size = self.queue.popleft()
        self.size -= size
        return fut


class PeerTable:
    """Sessions by node id, on-demand dialling, per-peer outboxes and typed dispatch.

    ``dial_backoff``: after a failed dial, sends to that peer are dropped (``unreachable``) for
    this many seconds, stretched by up to half at random (``rng``; by default one seeded with
    the node id) so that a fleet's nodes do not redial in lockstep.

    ``outbox_limit``, ``outbox_bytes``: the most messages, and the most bytes (estimated:
    :func:`~meshinfer.runtime.outbox_size.queued_size`), queued for one peer; a message larger
    than ``outbox_bytes`` is queued only when nothing else is."""

    def __init__(
        self,
        node_id: str,
        transport: Transport,
        admission: Admission,
        *,
        config: SessionConfig | None = None,
        metrics: SessionMetrics | None = None,
        outbox_limit: int = 256,
        outbox_bytes: int = OUTBOX_BYTES,
        dial_backoff: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.transport = transport
        self.admission = admission
        self.config = config or SessionConfig()
        self.metrics = metrics or SessionMetrics()
        self.stats = PeerStats()
        self.addresses: dict[str, PeerAddress] = {}
        self._sessions: dict[str, list[Session]] = {}
        self._readers: set[asyncio.Task[None]] = set()
        self._verifying: Counter[str] = Counter()  # peer -> verifications of its sessions
        self._verifiers: set[asyncio.Task[object]] = set()
        self._carriers: weakref.WeakSet[Session] = weakref.WeakSet()  # sessions sent over
        self._outboxes: dict[str, _Outbox] = {}
        self._handlers: dict[type, MessageHandler] = {}
        self._session_callbacks: list[SessionCallback] = []
        self._outbox_limit = outbox_limit
        self._outbox_bytes = outbox_bytes
        self._dial_backoff = dial_backoff
        # (unseeded it would make a simulation's run differ from one with the same seed)
        self._rng = rng or random.Random(f"dial jitter of {node_id}")
        #: addresses of nodes forgotten while connected, kept until their last session ends
        self._parked: dict[str, PeerAddress] = {}
        self._closed = False
        self._closing = OneClose()

    # --- configuration ---------------------------------------------------------------------

    def on(self, message_type: type, handler: MessageHandler) -> None:
        """Route every received message of ``message_type`` to ``handler(peer_id, msg)``."""
        self._handlers[message_type] = handler

    def on_session(self, callback: SessionCallback) -> None:
        """Call ``callback(peer_id, session)`` whenever a session with a peer opens (on the
        loop; one that raises is logged, and the session is kept)."""
        self._session_callbacks.append(callback)

    def learn(self, node_id: str, address: Address, static_key: bytes) -> None:
        """Remember where ``node_id`` listens (from discovery or membership)."""
        if node_id != self.node_id:
            self.addresses[node_id] = PeerAddress(address, static_key)
            self._parked.pop(node_id, None)

    def forget(self, node_id: str) -> None:
        """Forget where ``node_id`` listens (membership forgot it: dead or left for good).
        With a session with it still listed, the address is kept aside (it is still dialled
        if a send needs it) until the last one ends, then dropped, unless it is learnt again
        meanwhile: else the table would keep the address of every node forgotten while
        connected. Discovery or membership teach it again if it comes back (not in
        :attr:`addresses` any more, it is seen as new)."""
        address = self.addresses.pop(node_id, None)
        if address is not None and node_id in self._sessions:
            self._parked[node_id] = address

    # --- queries ---------------------------------------------------------------------------

    def session(self, node_id: str) -> Session | None:
        """The oldest open session with ``node_id``, if any: the one messages go over, unless
        its peer certificate is revoked and a newer one's is not (see :meth:`carrier_revoked`)."""
        for s in self._sessions.get(node_id, ()):
            if s.is_open:
                return s
        return None

    def _carrier(self, node_id: str) -> Session | None:
        """The session messages to ``node_id`` go over: its oldest open one under a certificate
        the list in force does not revoke, else its oldest open one (being cut: the sender
        drops what is queued), else None."""
        oldest = None
        for s in self._sessions.get(node_id, ()):
            if s.is_open:
                if not s.peer_revoked:
                    return s
                oldest = oldest or s
        return oldest

    def roles(self, node_id: str) -> frozenset[str]:
        """The roles the fleet's certificates grant ``node_id``, as its sessions with this table
        proved them in their handshakes: those that every session still listed proves (also the
        one whose message is being handled while it closes), so a node re-enrolled with fewer
        roles has lost the others even while a session under its older certificate is listed;
        empty if this table holds none. Unlike the roles membership gossips, these were checked
        against the fleet authority."""
        sessions = self._sessions.get(node_id, ())
        if not sessions:
            return frozenset()
        if len(sessions) == 1:
            return sessions[0].peer.roles
        return frozenset.intersection(*(s.peer.roles for s in sessions))

    def carrier_revoked(self, node_id: str) -> bool:
        """Whether the session that carried messages to ``node_id`` until the revocation list
        in force came in force (its oldest open one) is under a certificate that list revokes.
        That session is being cut (the list is written down first; the close may wait behind
        the session's writer), and what went over it may be lost with it: the cut's
        :class:`~meshinfer.runtime.revocations.CutOff` tells its listeners, who re-send; a
        sender holds new work for the node back until then. The table sends nothing over it
        meanwhile: what is queued for the node goes over the node's oldest open session under
        a good certificate (a re-enrolled node's new one) if it has one, else is dropped, its
        requesters told. False if no session is open."""
        if not self.admission.revocations.entries:
            return False
        session = self.session(node_id)
        return session is not None and session.peer_revoked

    def carried(self, session: Session) -> bool:
        """Whether this table wrote a message to ``session`` (so what it sent the peer may be
        lost with it); session control (pings, keep-alives) does not count."""
        return session in self._carriers

    @property
    def connected(self) -> list[str]:
        return sorted(n for n in self._sessions if self.session(n) is not None)

    def open_sessions(self, node_id: str | None = None) -> list[Session]:
        """Every open session, with every peer or with ``node_id`` only (a node id may have
        more than one), each peer's oldest first."""
        if node_id is not None:
            return [s for s in self._sessions.get(node_id, ()) if s.is_open]
        return [s for sessions in self._sessions.values() for s in sessions if s.is_open]

    # --- sending ---------------------------------------------------------------------------

    def send(
        self,
        node_id: str,
        msg: messages.Message,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> bool:
        """Queue ``msg`` for ``node_id`` (best effort); False if it was dropped at once.
        ``on_failure`` is called (on the loop) with the reason if it is dropped later, never
        written to a session (no session could be had with the peer, this table closed):
        cheaper than :meth:`send_tracked` for a sender that only acts on a loss."""
        return self._enqueue(node_id, msg, on_failure) is None

    async def request(self, node_id: str, msg: messages.Message) -> None:
        """Send ``msg`` and wait until it was written to a session; raises if it could not be
        (a :class:`TransportError` naming why: refused at once, or failed later)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        refused = self._enqueue(node_id, msg, fut)
        if refused is not None:
            raise TransportError(f"cannot send to {node_id}: {refused}")
        await fut

    def send_tracked(self, node_id: str, msg: messages.Message) -> asyncio.Future[None] | None:
        """Queue ``msg`` for ``node_id``: None if it was dropped at once, else a future done
        once it was written to a session (or failed with why it never will be)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        return fut if self._enqueue(node_id, msg, fut) is None else None

    def _enqueue(self, node_id: str, msg: messages.Message, fut: Requester) -> str | None:
        """Queue ``msg``; None if queued, else why it was refused (``fut`` is not told)."""
        if self._closed:
            return "the peer table is closed"
        if node_id == self.node_id:
            return "that is this node"
        known = node_id in self.addresses or node_id in self._parked
        if not known and self.session(node_id) is None:
            self.stats.dropped["unknown-peer"] += 1
            return "unknown peer (no address learnt, no session open)"
        box = self._outboxes.get(node_id)
        if box is None:
            box = self._outboxes[node_id] = _Outbox(self._outbox_limit, self._outbox_bytes)
        if len(box.queue) >= box.limit:
            self.stats.dropped["outbox-full"] += 1
            return f"its outbox is full ({box.limit} messages queued)"
        size = queued_size(msg)
        if box.size + size > box.byte_limit and box.queue:  # (a larger one goes alone)
            self.stats.dropped["outbox-bytes"] += 1
            return (
                f"its outbox is full ({box.size} bytes queued, {size} more would pass its"
                f" bound of {box.byte_limit} bytes)"
            )
        box.push(msg, fut, size)
        box.wake.set()
        if box.task is None or box.task.done():
            box.task = asyncio.get_running_loop().create_task(
                self._sender(node_id, box), name=f"peer-send-{node_id}"
            )
            box.task.add_done_callback(functools.partial(self._sender_ended, node_id, box))
        return None

    def _sender_ended(self, node_id: str, box: _Outbox, task: asyncio.Task[None]) -> None:
        """A sender's done-callback. One that failed (our bug) is logged, and what is queued
        for its peer is dropped, its requesters told (unless a send has started a new sender
        meanwhile, which tries it): nobody waits for a sender that is gone, and the next send
        starts a new one. A cancelled one (the table closing) ended as it should."""
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.error("the sender for %s failed", node_id, exc_info=exc)
        if box.task is task:
            self._fail_queue(box, "sender-failed", f"the sender for {node_id} failed", exc)

    async def _sender(self, node_id: str, box: _Outbox) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not box.queue:
                box.wake.clear()
                try:
                    async with asyncio.timeout(30):
                        await box.wake.wait()
                except TimeoutError:
                    if box.queue:  # queued as the wait timed out
                        continue
                    # idle: the task ends, and its outbox goes too (a node meets many peers
                    # over weeks, most of them never again); the next send makes both anew
                    if self._outboxes.get(node_id) is box:
                        del self._outboxes[node_id]
                    return
                continue
            if node_id in self._verifying:  # an older session may be dead: wait for the ping
                box.wake.clear()
                await box.wake.wait()
                continue
            session = self._carrier(node_id)
            if session is not None:
                await self._drain(node_id, session, box)
            elif loop.time() < box.retry_at:
                self._fail_queue(box, "unreachable")
            elif await self._dial(node_id) is None:
                if self._carrier(node_id) is not None:
                    continue  # the peer dialled us while our dial failed: go over its session
                box.retry_at = loop.time() + self._redial_after()
                self._fail_queue(box, "dial-failed")
            # else round again: the carrier, as for every send (one the peer dialled
            # meanwhile may have been adopted first, and is then being checked)

    async def _drain(self, node_id: str, session: Session, box: _Outbox) -> None:
        """Send what is queued, several messages per write (up to ``WRITE_BATCH``, and
        :data:`~meshinfer.runtime.session.SEND_MANY_BYTES`): one syscall and one wake-up of the
        peer's reader for all of them. A message leaves the queue only once written; one that
        can never be sent (over the session's size cap, or one that does not encode) is
        dropped, its requester told, and the rest go on. Nothing goes over a session whose
        peer certificate is revoked (it is being cut): the sender goes on over the peer's
        good session if it has one; if not, what is queued is dropped, its requesters told."""
        alone = 0  # messages to send one per write: a batch of them did not encode
        while box.queue and session.is_open and node_id not in self._verifying:
            if session.peer_revoked:  # checked again by the session once its writer is free
                if self._carrier(node_id) is session:  # no good session to send over instead
                    self._fail_queue(box, "revoked")
                return
            batch = list(itertools.islice(box.queue, 1 if alone else WRITE_BATCH))
            try:
                sent = await session.send_many([msg for msg, _, _ in batch])
            except LocalProtocolError as exc:  # a message is too large or does not encode
                if len(batch) > 1:  # not necessarily the first: find which, one at a time
                    alone = len(batch)
                    continue
                box.pop()
                alone = max(alone - 1, 0)
                self.stats.dropped["too-large"] += 1
                _settle(batch[0][1], exc)
                continue
            except (StreamClosed, TransportError, OSError):
                return  # the session ended with the failed write (the sender redials), or its
                # certificate was revoked while the write waited (the sender goes on over the
                # peer's good session if it has one, else drops what is queued)
            for _, fut, _ in batch[:sent]:
                box.pop()
                _settle(fut, None)
            alone = max(alone - sent, 0)
            self.stats.sent += sent
            self._carriers.add(session)

    def _fail_queue(
        self, box: _Outbox, reason: str, text: str = "", cause: BaseException | None = None
    ) -> None:
        """Drop what is queued, counted as ``reason``, each requester told with a
        :class:`TransportError` (``text``: ``"peer <reason>"`` unless given; ``cause``: its
        ``__cause__``)."""
        text = text or f"peer {reason}"
        if cause is not None:
            text = f"{text}: {cause!r}"
        while box.queue:
            fut = box.pop()
            self.stats.dropped[reason] += 1
            error = TransportError(text)
            error.__cause__ = cause
            _settle(fut, error)

    def _redial_after(self) -> float:
        """How long a peer that could not be dialled is not dialled again: ``dial_backoff``
        stretched by up to half at random, so that nodes that lost a peer together (a fleet
        restarting, a roadside unit back up) do not all dial it again in the same instant."""
        return self._dial_backoff * (1.0 + self._rng.random() / 2)

    async def _dial(self, node_id: str) -> Session | None:
        peer = self.addresses.get(node_id) or self._parked.get(node_id)
        if peer is None:
            return None
        self.stats.dials += 1
        try:
            session = await dial(
                self.transport,
                peer.address,
                self.admission,
                config=self.config,
                metrics=self.metrics,
                expected_static=peer.static_key,
                expected_node_id=node_id,
            )
        except (MeshInferError, OSError, TimeoutError) as exc:
            self.stats.dial_failures += 1
            log.debug("dial %s at %s failed: %s", node_id, peer.address, exc)
            return None
        self.adopt(session)
        return session

    # --- receiving -------------------------------------------------------------------------

    def adopt(self, session: Session) -> asyncio.Task[None]:
        """Take ownership of ``session``: register it and start its reader task; if older
        sessions with its peer are open, check that they still answer."""
        peer = session.peer_id
        sessions = self._sessions.setdefault(peer, [])
        older = [s for s in sessions if s.is_open]
        sessions.append(session)
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._read(session), name=f"peer-read-{peer}")
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)
        if older and self.config.verify_timeout > 0 and not self._closed:
            self._verifying[peer] += 1
            check = loop.create_task(self._verify(peer, older), name=f"peer-verify-{peer}")
            self._verifiers.add(check)
            check.add_done_callback(self._verifiers.discard)
            check.add_done_callback(_log_check_failure)
        for callback in self._session_callbacks:
            try:
                callback(peer, session)
            except Exception:  # its owner's bug: the session (and the dial's sender) go on
                log.exception("session callback for %s failed", peer)
        return task

    async def _verify(self, peer: str, older: list[Session]) -> None:
        """Ping each of ``older`` (open sessions with ``peer`` when a newer one opened);
        abandon those that do not answer in time; then let sends to ``peer`` go on."""
        try:
            answers = await asyncio.gather(*(self._answers(s) for s in older))
            for session, answered in zip(older, answers, strict=True):
                if answered:
                    self.stats.verified += 1
                elif session.is_open:
                    self.stats.abandoned += 1
                    log.info("an older session with %s did not answer a ping: abandoned", peer)
                    await session.abandon("no answer to a ping after a newer session opened")
        finally:
            self._verifying[peer] -= 1
            if self._verifying[peer] <= 0:
                del self._verifying[peer]
                box = self._outboxes.get(peer)
                if box is not None:
                    box.wake.set()

    async def _answers(self, session: Session) -> bool:
        """Whether ``session`` answers a ping within ``verify_timeout``, or at least received
        something meanwhile (a busy link may hold the answer behind what it carries). The
        ping is not cancelled when the time is up: a send cut off part-way would break the
        session's record stream; it ends with the session if its write is stuck."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        ping = loop.create_task(session.ping(timeout=self.config.verify_timeout))
        self._verifiers.add(ping)
        ping.add_done_callback(self._verifiers.discard)
        ping.add_done_callback(_retrieve)
        done, _ = await asyncio.wait((ping,), timeout=self.config.verify_timeout)
        if done:
            return not ping.cancelled() and ping.exception() is None
        return session.last_received > started

    async def serve_inbound(self, session: Session) -> None:
        """A :class:`SessionListener` handler: adopt the session and wait until it ends."""
        await self.adopt(session)

    async def _read(self, session: Session) -> None:
        peer = session.peer_id
        try:
            async for msg in session:
                if session.peer_revoked:  # in force, the session not cut yet: no work from it
                    self.stats.from_revoked[type(msg).__name__] += 1
                    continue
                self._dispatch(peer, msg)
        finally:
            sessions = self._sessions.get(peer, [])
            if session in sessions:
                sessions.remove(session)
            if not sessions:
                self._sessions.pop(peer, None)
                self._parked.pop(peer, None)  # (membership forgot it while it was connected)

    def _dispatch(self, peer: str, msg: messages.Message) -> None:
        handler = self._handlers.get(type(msg))
        if handler is None:
            self.stats.unhandled[type(msg).__name__] += 1
            return
        try:
            handler(peer, msg)
        except Exception:
            self.stats.handler_errors += 1
            log.exception("handler for %s from %s failed", type(msg).__name__, peer)

    # --- lifecycle -------------------------------------------------------------------------

    async def disconnect(self, node_id: str, reason: str = "disconnect") -> None:
        """Close every session with ``node_id`` (e.g. it was declared dead or revoked)."""
        for session in list(self._sessions.get(node_id, ())):
            await session.aclose(CloseCode.GOING_AWAY, reason)

    async def aclose(self) -> None:
        """Close every session and stop every task. Idempotent: every call, also one after a
        call that was cancelled, waits until the one close has ended (it goes on when a caller
        is cancelled)."""
        self._closed = True  # (no more sends are queued from now on)
        await self._closing.run(self._close, name="peer-table-close")

    async def _close(self) -> None:
        for box in self._outboxes.values():
            self._fail_queue(box, "shutting-down")
            box.wake.set()
            if box.task is not None:
                box.task.cancel()
        sessions = [s for group in self._sessions.values() for s in group]
        await asyncio.gather(
            *(s.aclose(CloseCode.GOING_AWAY, "node shutting down") for s in sessions),
            return_exceptions=True,
        )
        tasks = [b.task for b in self._outboxes.values() if b.task]
        tasks += [*self._readers, *self._verifiers]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)


_log_check_failure = log_failure(log, "check of older sessions")


def _retrieve(task: asyncio.Task[object]) -> None:
    """Mark a ping's outcome as seen: no answer in time, or its session ended, needs no
    report; anything else is our bug and is logged."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, MeshInferError | OSError | TimeoutError):
        log.error("ping of an older session failed", exc_info=exc)


def _settle(requester: Requester, error: BaseException | None) -> None:
    """Tell a requester its message was written (a future only), or why it never will be. A
    future's error is marked retrieved: its owner may have stopped waiting for it (dropped it,
    or let it go with a task that ended otherwise), and asyncio would then log "Future
    exception was never retrieved" at ERROR when it is collected; an owner that awaits it
    still gets the error."""
    if requester is None:
        return
    if not isinstance(requester, asyncio.Future):
        if error is not None:
            try:
                requester(error)
            except Exception:  # the sender's bug: the table goes on
                log.exception("on_failure callback of a send failed")
    elif requester.done():
        return
    elif error is None:
        requester.set_result(None)
    else:
        requester.set_exception(error)
        requester.exception()  # retrieved: see above
