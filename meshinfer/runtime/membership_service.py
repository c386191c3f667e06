"""The asyncio driver of the SWIM core: timers on the loop's clock, packets over sessions.

The sans-I/O :class:`~meshinfer.proto.membership.Membership` decides; this service only moves
bytes and time. Its packets travel as :class:`~meshinfer.proto.messages.Gossip` messages over
the node's encrypted sessions (:class:`~meshinfer.runtime.peers.PeerTable`), so ``from_node`` is
always the node id that the Noise handshake and the fleet certificate proved, which is what the
core's impersonation rule relies on. Sending never waits for a dial: an unreachable peer simply
loses the packet, as a lossy radio would, and SWIM's indirect probes and suspicion deal with it.

The timer task sleeps until the core's ``next_deadline()`` (or until an input wakes it), calls
``tick``, and flushes packets and events. Every addressed member's host, port and static key
from its gossiped state are taught to the peer table, so any member can be dialled with IK, and
forgotten there once the core forgets the member (FORGOTTEN).

Concurrency: all methods run on the node's loop; event subscribers are plain callables that
must not block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

from meshinfer.errors import RemoteProtocolError
from meshinfer.proto.membership import (
    MemberEvent,
    MemberEventKind,
    Membership,
    MembershipConfig,
    NodeState,
)
from meshinfer.proto.membership_auth import RecordAuthenticator
from meshinfer.proto.messages import Gossip
from meshinfer.runtime.peers import PeerTable
from meshinfer.transport.base import Address

log = logging.getLogger(__name__)

MemberSubscriber = Callable[[MemberEvent], None]


class MembershipService:
    """Runs one node's membership on the event loop. ``start`` / ``leave`` / ``aclose``."""

    def __init__(
        self,
        peers: PeerTable,
        state: NodeState,
        config: MembershipConfig,
        *,
        rng: random.Random | None = None,
        incarnation: int = 0,
        authenticator: RecordAuthenticator | None = None,
    ) -> None:
        self.peers = peers
        self.config = config
        self._loop = asyncio.get_running_loop()
        self.core = Membership(
            peers.node_id,
            state,
            config,
            rng or random.Random(),
            self._loop.time(),
            incarnation=incarnation,
            authenticator=authenticator,
        )
        self._subscribers: list[MemberSubscriber] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._joined = asyncio.Event()
        self._left = asyncio.Event()
        self._closed = asyncio.Event()
        #: each member's gossiped (host, port, static key) when last looked at (see _teach)
        self._gossiped: dict[str, tuple[str, int, bytes]] = {}
        self.protocol_errors = 0
        #: Gossip packets that came in after :meth:`aclose`, dropped unread
        self.dropped_closed = 0
        peers.on(Gossip, self._on_gossip)

    # --- API -------------------------------------------------------------------------------

    def subscribe(self, callback: MemberSubscriber) -> None:
        """Call ``callback(event)`` for every joined/suspect/alive/dead/left/updated event."""
        self._subscribers.append(callback)

    def start(self) -> None:
        """Start the timer task (once; later calls are no-ops). RuntimeError after
        :meth:`aclose`."""
        if self._closed.is_set():
            raise RuntimeError(f"membership of {self.peers.node_id} is closed: it cannot start")
        if self._task is None:
            self._task = self._loop.create_task(self._run(), name="membership")
            self._task.add_done_callback(self._on_task_done)

    def join(self, seeds: list[str]) -> None:
        """Push-pull with ``seeds`` (node ids the peer table can reach) until one answers."""
        self.core.join(seeds, self._loop.time())
        self._kick()

    async def wait_joined(self) -> None:
        """Wait until a seed or a discovered peer answered. RuntimeError once :meth:`aclose`
        has run without that (no answer can come any more: a waiter would hang)."""
        if not self._joined.is_set() and not self._closed.is_set():
            joined = asyncio.ensure_future(self._joined.wait())
            closed = asyncio.ensure_future(self._closed.wait())
            try:
                await asyncio.wait((joined, closed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                joined.cancel()
                closed.cancel()
                await asyncio.gather(joined, closed, return_exceptions=True)
        if not self._joined.is_set():
            raise RuntimeError(f"membership of {self.peers.node_id} closed before it joined")

    def update_state(self, state: NodeState) -> None:
        """Publish a new version of this node's gossiped state. After :meth:`leave`, a no-op
        (logged): only the LEFT news goes out then (a revocation merge or an address change
        during the leave raised, the merge half done, out of a message handler)."""
        if self.core.has_left:
            log.debug("state of %s not published: it has left", self.peers.node_id)
            return
        self.core.update_local_state(state, self._loop.time())
        self._kick()

    @property
    def state(self) -> NodeState:
        return self.core.local_state

    def live_members(self) -> list[str]:
        return sorted(m.node_id for m in self.core.live_members())

    async def leave(self, timeout: float = 2.0) -> bool:
        """Announce a graceful leave and keep gossiping until it is out (or ``timeout``).
        After :meth:`aclose`, False at once (nothing can be gossiped any more)."""
        if self._closed.is_set():
            return False
        self.core.leave(self._loop.time())
        self._kick()
        try:
            async with asyncio.timeout(timeout):
                await self._left.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Stop the timer task (no leave: call :meth:`leave` first for a graceful exit). A
        task that died was logged then (:meth:`_on_task_done`); a cancelled caller is raised to.
        From the call on, nothing more is sent and Gossip that still comes in over the peer
        table's sessions is dropped unread (the handler stays registered there: the table has
        no way to take one off), so a closed node answers no probe or push-pull."""
        self._closed.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # --- driving the core ------------------------------------------------------------------

    def _kick(self) -> None:
        if self._closed.is_set():
            return  # (closed: nothing is sent any more)
        self._flush()
        self._wake.set()

    def _on_gossip(self, peer: str, msg: Gossip) -> None:
        if self._closed.is_set():
            self.dropped_closed += 1
            return
        try:
            self.core.handle_packet(peer, msg.payload, self._loop.time())
        except RemoteProtocolError as exc:
            self.protocol_errors += 1
            log.warning("membership packet from %s refused: %s", peer, exc)
        self._kick()

    async def _run(self) -> None:
        while True:
            now = self._loop.time()
            self.core.tick(now)
            self._flush()
            delay = max(0.0, min(self.core.next_deadline() - self._loop.time(), 1.0))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _flush(self) -> None:
        for event in self.core.drain_events():
            self._on_event(event)
        for to_node, data in self.core.drain_packets():
            self._teach(to_node)
            self.peers.send(to_node, Gossip(payload=data))
        if self.core.joined and not self._joined.is_set():
            self._joined.set()
        if self.core.has_left and self.core.leave_announced:
            self._left.set()

    def _teach(self, node_id: str) -> None:
        """Teach the peer table where ``node_id`` listens, by its gossiped state: when the
        table has no address for it, another key or port, or when the member's gossiped
        address changed since last looked at (it moved: a new lease, a V2I link). A host that
        alone differs from the table's, gossiped so all along, is left: discovery may have
        taught one nearer this node (mDNS lists first those on a network it shares)."""
        addr = self.core.address_of(node_id)
        if addr is not None and addr[1] and len(addr[2]) == 32:
            known = self.peers.addresses.get(node_id)
            before = self._gossiped.get(node_id)
            self._gossiped[node_id] = (addr[0], addr[1], addr[2])
            moved = before is not None and before != self._gossiped[node_id]
            if (
                moved
                or known is None
                or known.static_key != addr[2]
                or known.address.port != addr[1]
            ):
                self.peers.learn(node_id, Address(addr[0], addr[1]), addr[2])

    def _on_event(self, event: MemberEvent) -> None:
        if event.kind in (MemberEventKind.JOINED, MemberEventKind.ALIVE, MemberEventKind.UPDATED):
            self._teach(event.member.node_id)
        elif event.kind == MemberEventKind.FORGOTTEN:  # else the table keeps every node ever met
            self.peers.forget(event.member.node_id)
            self._gossiped.pop(event.member.node_id, None)
        log.info("member %s %s", event.member.node_id, event.kind.value)
        for callback in self._subscribers:
            try:
                callback(event)
            except Exception:
                log.exception("membership subscriber failed on %s", event)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("membership task died", exc_info=task.exception())
