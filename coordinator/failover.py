"""Fast failover: which nodes the coordinator can reach, judged by its own sessions with them.

Membership needs seconds to declare a crashed node dead. A node's session that ends lost
(:attr:`~meshinfer.runtime.session.Session.lost`: without the node's ``Close`` frame, by EOF or
reset as a killed process's socket is closed by its kernel at once; or given up on, silent for
the session's ``idle_timeout`` or for a ping when the node opened a newer session) makes the
node *suspect here*: it gets no new items while the coordinator has it answer a
ping within ``redial_timeout_s`` over every other session still open with it (an open session
proves nothing: the node may be dead with its end not read yet, or silent behind a broken link).
If none answers, it is re-dialled (a handshake done is the answer): at once, in what is left of
that time, if every session with it ended meanwhile (a killed node); if some stayed open without
answering, once those are abandoned, with ``redial_timeout_s`` afresh (a vehicle that roamed: its
old connections dead but not reset, a dial to where it is now works). A node that answers keeps
its items, sent to it again; one that answers neither is *unreachable here*: its in-flight items
are re-dispatched at once (a late result is still accepted exactly once), and it stays out of
scheduling until a new session with it opens or membership reports it at a higher incarnation.
Either way a session left open that did not answer is abandoned before anything is sent again
(what is sent over it vanishes, and the peer table sends over a node's oldest open session): it
ends lost at once, its stream reset, with no Close frame to wait behind a stuck write.
A ``Close`` frame (a draining node, a graceful leave) triggers none of this.
A node whose last session under a good certificate this coordinator closed because that
certificate is revoked (:meth:`~meshinfer.runtime.revocations.RevocationSync.on_cut_off`) is
*revoked here*: its items are re-dispatched at once, and it gets no work until a session with it
opens again (which only a certificate that is not revoked can open), whatever membership says
meanwhile, or until membership forgets it (the list in force keeps a revoked certificate out of
membership as out of sessions; the scheduler goes on refusing such a node after that, by the
certificate of its last session: :mod:`coordinator.certificates`). A node that keeps a session
under a good certificate (re-enrolled; only its old certificate was revoked, by serial) stays
as it was: only if the closed session was the one its items went over are they re-dispatched
at once (items are tracked by node, not by session: all of the node's move, maybe back to it
over the good session; a result still coming is accepted once)::

    reachable --session lost (abruptly, or silent)--> suspect (pings every session open)
    suspect --a ping answered, or a session opened meanwhile (either still open)-->
                                       reachable (items sent again)
    suspect --every session ended--> re-dialling (in the rest of the time)
    suspect --none answered, some open--> re-dialling (silent ones abandoned first; time anew)
    re-dialling --handshake done--> reachable (items sent again)
    re-dialling --dial failed or timed out--> unreachable (re-dispatch)
    unreachable --new session / higher incarnation / forgotten--> reachable
    any --its last good session closed for a revoked certificate--> revoked (re-dispatch)
    any --a session closed for a revoked certificate, a good one open--> unchanged
                                       (re-dispatch if the closed session carried its items)
    any --the session its items go over is under a revoked certificate--> no new items,
                                       none sent again (until the cut-off closes it)
    revoked --new session / forgotten--> reachable

What is kept per node is bounded by the members: a node is kept unreachable or revoked only
while membership knows it (a node it does not know, or no longer, is never scheduled: one that
joins later is reachable at any incarnation), and a node waiting for a cut before its items go
again is looked at after :data:`CUT_WAIT_S` (the cut never came: the session closed otherwise).

Concurrency: every method runs on the coordinator's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Protocol

from meshinfer.errors import MeshInferError, log_failure
from meshinfer.proto.membership import Member, MemberEvent, MemberEventKind
from meshinfer.proto.messages import Ping
from meshinfer.runtime.loop import pop_timer, replace_timer
from meshinfer.runtime.node import MeshNode
from meshinfer.runtime.revocations import CutOff
from meshinfer.runtime.session import Session

__all__ = ["Reachability"]

log = logging.getLogger(__name__)
_log_failure = log_failure(log, "session watcher")
#: The incarnation an unreachable node must exceed when its certificate is revoked: none does.
_REVOKED = math.inf
#: How long a node that answered a probe waits for the cut of the revoked session its items
#: would go over (the list written down, then a close of up to a second behind a stuck write)
#: before it is looked at again: still being cut, it waits on; else its items go again now
#: (over a session open with it) or are left to their timeout (none is open).
CUT_WAIT_S = 10.0


class SessionCounts(Protocol):
    """Where :class:`Reachability` counts what happened to sessions (the coordinator's stats)."""

    sessions_lost: int
    sessions_closed: int
    redials_ok: int


class Reachability:
    """Tracks suspect and unreachable nodes (see the module docstring) for one coordinator.

    ``on_lost(node, why)`` is called when a node answered neither a ping over another session
    nor a re-dial after a lost session, or a session with it was closed for a revoked
    certificate and either its items went over that session or no session under a good
    certificate is left (re-dispatch its items); ``on_back()`` when a node may take work again
    (retry parked items); ``on_session_lost(node)``, if given, as soon as any session with a
    node ends without its Close frame (what was queued on it may never have arrived);
    ``on_resend(node)``, if given, once such a node answered the ping (over a session already
    open, or a new one): what went over the lost session, and the answers coming back on it,
    may be gone (a node restarted quickly holds nothing at all), so its items are sent again;
    if the session they would go over is being cut for a revoked certificate, once the cut is
    done (unless the cut-off re-dispatches them; ``cut_wait_s``: how long that is waited for
    before looking again, :data:`CUT_WAIT_S`).
    ``counts`` gets the session counters. :meth:`start` hooks into ``mesh``'s sessions;
    :meth:`aclose` stops the watchers (idempotent).
    """

    def __init__(
        self,
        mesh: MeshNode,
        counts: SessionCounts,
        *,
        redial_timeout_s: float,
        on_lost: Callable[[str, str], None],
        on_back: Callable[[], None],
        on_session_lost: Callable[[str], None] | None = None,
        on_resend: Callable[[str], None] | None = None,
        cut_wait_s: float = CUT_WAIT_S,
    ) -> None:
        self.mesh = mesh
        self.counts = counts
        self.redial_timeout_s = redial_timeout_s
        self._on_lost = on_lost
        self._on_back = on_back
        self._on_session_lost = on_session_lost
        self._on_resend = on_resend
        self.cut_wait_s = cut_wait_s
        self._watchers: set[asyncio.Task[None]] = set()
        #: node being probed (it lost a session) -> sessions opened with it since the probe began
        #: (one still open when the probe ends is an answer); kept only while probed: bounded by
        #: the nodes under probe and the sessions that open in a probe's time
        self._suspects: dict[str, list[Session]] = {}
        #: node -> its incarnation when we gave up on it (_REVOKED: its certificate was revoked)
        self._unreachable: dict[str, float] = {}
        #: nodes that answered a probe while the session their items go over was being cut for
        #: a revoked certificate: their items are sent again once the cut is done; each with
        #: the timer that looks at it again after CUT_WAIT_S (a cut that never comes)
        self._resend_after_cut: dict[str, asyncio.TimerHandle] = {}
        self._closed = False

    def start(self) -> None:
        """Watch every session with a node, those open now and those to come."""
        peers = self.mesh.peers
        peers.on_session(self._on_session)
        if self.mesh.revocation_sync is not None:
            self.mesh.revocation_sync.on_cut_off(self._on_revoked)
        for session in peers.open_sessions():
            self._on_session(session.peer_id, session)

    async def aclose(self) -> None:
        """Stop watching (probes under way are cancelled). Idempotent."""
        self._closed = True
        for timer in self._resend_after_cut.values():
            timer.cancel()
        self._resend_after_cut.clear()
        watchers = list(self._watchers)
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    def reachable(self, member: Member) -> bool:
        """Whether ``member`` may get work: not suspect, not given up on at this incarnation,
        and the session its items would go over (the oldest open one) not under a certificate
        the list in force revokes: that session is being cut (the list is written down first;
        the close may wait behind the session's writer), and what went over it meanwhile
        would reach the revoked certificate's holder. A node with no session is left to the
        dial (which such a certificate cannot pass)."""
        node = member.node_id
        if node in self._suspects:
            return False
        gave_up_at = self._unreachable.get(node)
        if gave_up_at is not None and member.incarnation <= gave_up_at:
            return False
        return not self.mesh.peers.carrier_revoked(node)

    def on_member(self, event: MemberEvent) -> None:
        """Membership news: an unreachable node forgotten or back at a higher incarnation is
        reachable again; a revoked one forgotten is no longer kept (membership refuses its
        revoked certificate, and a dial to it cannot pass either)."""
        node = event.member.node_id
        gave_up_at = self._unreachable.get(node)
        if gave_up_at is None:
            return
        if event.kind == MemberEventKind.FORGOTTEN or (
            gave_up_at != _REVOKED and event.member.incarnation > gave_up_at
        ):
            self._unreachable.pop(node)
            self._on_back()

    def _give_up(self, node: str, incarnation: float) -> None:
        """Keep ``node`` out of scheduling up to ``incarnation`` (:data:`_REVOKED`: until a
        session opens), if membership knows it: one it does not know is never scheduled, and
        gets no FORGOTTEN event to drop it by."""
        membership = self.mesh.membership
        if membership is not None and membership.core.member(node) is None:
            self._unreachable.pop(node, None)
            return
        self._unreachable[node] = incarnation

    def _on_revoked(self, cut: CutOff) -> None:
        """This node closed a session with ``cut.node_id``: its certificate is revoked."""
        if self._closed:
            return
        node = cut.node_id
        if cut.sends_lost:
            if not cut.still_connected:  # else it stays reachable, over its good session
                self._give_up(node, _REVOKED)
            log.warning(
                "certificate %d of %s is revoked: re-dispatching its items", cut.serial, node
            )
            pop_timer(self._resend_after_cut, node)  # (moved instead)
            self._on_lost(node, f"the certificate of {node} (serial {cut.serial}) was revoked")
        elif node in self._resend_after_cut:  # it answered a probe while this session was cut
            self._resend(node)
        if cut.still_connected:  # schedulable again (refused while the cut was under way)
            self._on_back()

    def _on_session(self, node: str, session: Session) -> None:
        """A session with ``node`` opened: it is reachable; watch how the session ends."""
        if self._closed:
            return
        if node in self._suspects:
            self._suspects[node].append(session)
        if self._unreachable.pop(node, None) is not None:
            log.info("node %s is reachable again", node)
            self._on_back()
        task = asyncio.get_running_loop().create_task(
            self._watch(node, session), name=f"coordinator-watch-{node}"
        )
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        task.add_done_callback(_log_failure)

    async def _watch(self, node: str, session: Session) -> None:
        await session.wait_closed()
        if self._closed:
            return
        if not session.lost:  # ended with a Close frame: nothing to recover
            self.counts.sessions_closed += 1
            return
        self.counts.sessions_lost += 1
        if self._on_session_lost is not None:
            self._on_session_lost(node)
        if self.redial_timeout_s <= 0 or node in self._suspects:
            return
        await self._probe(node)

    async def _probe(self, node: str) -> None:
        """Have ``node`` answer (:meth:`_ping`: a ping over a session still open, else a
        re-dial); give up on it (``on_lost``) if it does not in time. The sessions pinged in
        vain are abandoned by then either way; a session with it that opened meanwhile is an
        answer while it is still open (one lost again meanwhile, whose loss starts no probe
        while this one runs, leaves nothing the items could go over)."""
        self._suspects[node] = []
        silent: list[Session] = []
        try:
            answered = await self._ping(node, silent)
        finally:
            opened = self._suspects.pop(node)
        if self._closed:
            return
        if answered or any(s.is_open for s in opened):
            self.counts.redials_ok += 1
            self._on_back()
            self._resend(node)
            return
        member = self.mesh.membership.core.member(node) if self.mesh.membership else None
        if self._unreachable.get(node) != _REVOKED:  # (cut off meanwhile: it stays so)
            self._give_up(node, member.incarnation if member is not None else -1)
        how = "it neither answered a ping nor a new dial" if silent else "could not re-dial it"
        log.warning("lost the session with %s and %s: re-dispatching", node, how)
        self._on_lost(node, f"lost the session with {node}")

    async def _ping(self, node: str, silent: list[Session]) -> bool:
        """True if ``node`` answered: a ping over any session still open with it within
        ``redial_timeout_s`` (and still open once the silent ones are abandoned), else a
        re-dial (a handshake done is an answer). An open session
        proves nothing: a second session with a killed node may not have seen its end yet, and
        one across a link that went silent never will; items sent over it would wait for their
        timeout. The sessions that stay open without answering are abandoned, and added to
        ``silent``. The re-dial comes at once, in what is left of the time, if every session
        ended (a killed node), and with ``redial_timeout_s`` afresh once the silent ones are
        abandoned (a node that roamed: its old connections dead but not reset)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.redial_timeout_s
        answering = await self._ping_open(node, deadline, silent)
        if silent:
            # Given up on before anything else goes to the node, above all the dial: the peer
            # table sends over a node's oldest open session, so the dial's Ping would be written
            # into a silent session and pass for an answer. Abandoned, not closed: a Close frame
            # would wait up to a second behind a write stuck in the dead link, and what is
            # queued on the session would still be flushed into it, to arrive late (if ever)
            # beside what is sent again over the new session; abandoning resets the stream and
            # ends the session lost at once, as the peer table does with a silent older
            # session. The dial still waits for the whole shutdown (a loop turn or two), which
            # leaves no closing task to outlive the probe.
            await self._abandon_silent(silent)
            deadline = loop.time() + self.redial_timeout_s
        # An answer counts while a session that gave one is still open: one that answered and
        # ended meanwhile (its loss, the node being under probe, starts no probe of its own)
        # left nothing the items could go over but a new dial, which decides then.
        return any(s.is_open for s in answering) or await self._redial(node, deadline)

    async def _ping_open(self, node: str, deadline: float, silent: list[Session]) -> list[Session]:
        """The sessions still open with ``node`` that answered a ping by ``deadline``; those
        that stay open without answering are added to ``silent``."""
        sessions = self.mesh.peers.open_sessions(node)
        answers = await asyncio.gather(*(self._answers(s, deadline) for s in sessions))
        silent.extend(s for s, ok in zip(sessions, answers, strict=True) if not ok and s.is_open)
        return [s for s, ok in zip(sessions, answers, strict=True) if ok]

    async def _redial(self, node: str, deadline: float) -> bool:
        """True if a session with ``node`` could be had by ``deadline``: a dial's handshake
        done (no session is open with it by now, so the Ping queued goes over the new one)."""
        try:
            async with asyncio.timeout_at(deadline):
                await self.mesh.peers.request(node, Ping(nonce=0))
        except (MeshInferError, OSError, TimeoutError):
            return False
        return True

    @staticmethod
    async def _abandon_silent(sessions: list[Session]) -> None:
        """Abandon the sessions that did not answer, together: each ends lost (its watcher,
        woken first, counts it and calls ``on_session_lost``: what went over it may never have
        arrived; it starts no probe while this one runs). A session whose close was already
        under way (abandoning it does nothing then) is waited for: until it is closed, the
        peer table would still send over it."""

        async def abandon(session: Session) -> None:
            await session.abandon("no answer to a ping")
            await session.wait_closed()

        await asyncio.gather(*(abandon(s) for s in sessions))

    def _resend(self, node: str) -> None:
        """``on_resend(node)``, unless the session the items would go over is being cut for a
        revoked certificate (they would reach its holder): then once the cut is done."""
        if self._on_resend is None:
            return
        if self.mesh.peers.carrier_revoked(node):
            log.info("not sending %s's items again over a session being cut off", node)
            overdue = asyncio.get_running_loop().call_later(
                self.cut_wait_s, self._cut_overdue, node
            )
            replace_timer(self._resend_after_cut, node, overdue)
            return
        pop_timer(self._resend_after_cut, node)
        self._on_resend(node)

    def _cut_overdue(self, node: str) -> None:
        """No cut came ``cut_wait_s`` after ``node`` answered a probe while the session
        its items go over was being cut: wait on if it still is; else that session closed
        otherwise, and the items go again over a session still open (none: they are left to
        their timeout, or to a probe if the session was lost)."""
        self._resend_after_cut.pop(node, None)
        if self._closed:
            return
        if self.mesh.peers.carrier_revoked(node) or self.mesh.peers.open_sessions(node):
            self._resend(node)

    async def _answers(self, session: Session, deadline: float) -> bool:
        try:
            async with asyncio.timeout_at(deadline):
                await session.ping(timeout=self.redial_timeout_s)
        except (MeshInferError, OSError, TimeoutError):  # (StreamClosed: it ended meanwhile)
            return False
        return True
