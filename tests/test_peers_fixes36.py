"""The peer table and MeshNode (session 36): what is queued for a peer whose dial fails while
the peer dials in goes over the peer's session (it was dropped as ``dial-failed``); a refused
``request`` says why; a second ``PeerTable.aclose`` after a cancelled one waits for the close;
a cancelled ``MeshNode.leave`` still closes the node.

Real Noise sessions over TCP on loopback, real MeshNodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest

from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.errors import TransportError
from meshinfer.proto.messages import AppData
from meshinfer.runtime.endpoint import SessionListener
from meshinfer.runtime.peers import PeerTable
from meshinfer.runtime.session import SessionConfig
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpTransport
from tests.helpers import until
from tests.test_mesh_node import nodes_for, options
from tests.test_peers import Pair

LOOPBACK = Address("127.0.0.1", 0)


@asynccontextmanager
async def silent_server() -> AsyncIterator[tuple[Address, list[asyncio.StreamWriter]]]:
    """A TCP server that accepts and never answers a handshake (a peer's old address)."""
    accepted: list[asyncio.StreamWriter] = []

    async def on_client(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Address("127.0.0.1", port), accepted
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_queued_message_goes_over_the_session_the_peer_dialled_while_our_dial_failed():
    """alpha dials bravo at an address that never answers (bravo roamed); bravo dials alpha
    meanwhile. When alpha's dial times out, what alpha queued for bravo goes over bravo's
    session: it was dropped as ``dial-failed`` (and its requester failed) with a session open."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    transport = TcpTransport()
    config = SessionConfig(handshake_timeout=1.0)
    alpha = PeerTable("alpha", transport, fleet.admission("alpha"), config=config)
    bravo = PeerTable("bravo", transport, fleet.admission("bravo"), config=config)
    listener = SessionListener(transport, fleet.admission("alpha"), alpha.serve_inbound)
    got: asyncio.Queue[bytes] = asyncio.Queue()
    bravo.on(AppData, lambda _peer, msg: got.put_nowait(msg.payload))
    try:
        async with silent_server() as (old_address, accepted):
            bound = await listener.start(LOOPBACK)
            alpha.learn("bravo", old_address, fleet.identities["bravo"].static_public)
            bravo.learn("alpha", bound, fleet.identities["alpha"].static_public)
            fut = alpha.send_tracked("bravo", AppData(topic="t", payload=b"queued"))
            assert fut is not None
            await until(lambda: accepted, timeout=5)  # alpha's dial is under way
            await bravo.request("alpha", AppData(topic="t", payload=b"hello"))
            await until(lambda: alpha.session("bravo") is not None, timeout=5)
            async with asyncio.timeout(10):
                await fut  # raised "peer dial-failed"
                assert await got.get() == b"queued"
            assert alpha.stats.dropped["dial-failed"] == 0
            assert alpha.stats.dial_failures == 1
    finally:
        await alpha.aclose()
        await bravo.aclose()
        await listener.aclose()


async def test_a_refused_request_says_why():
    """``request`` named "outbox full or node unknown" whatever the reason."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    alpha = PeerTable("alpha", TcpTransport(), fleet.admission("alpha"), outbox_limit=1)
    msg = AppData(topic="t", payload=b"x")
    try:
        with pytest.raises(TransportError, match="unknown peer"):
            await alpha.request("nobody", msg)
        with pytest.raises(TransportError, match="this node"):
            await alpha.request("alpha", msg)
        async with silent_server() as (address, accepted):
            alpha.learn("bravo", address, fleet.identities["bravo"].static_public)
            first = alpha.send_tracked("bravo", msg)  # stays queued while the dial hangs
            assert first is not None
            await until(lambda: accepted, timeout=5)
            with pytest.raises(TransportError, match=r"outbox is full \(1 messages"):
                await alpha.request("bravo", msg)
            assert alpha.stats.dropped["outbox-full"] == 1
            await alpha.aclose()
            with pytest.raises(TransportError, match="shutting-down"):
                await first
        with pytest.raises(TransportError, match="closed"):
            await alpha.request("bravo", msg)
    finally:
        await alpha.aclose()


async def test_aclose_after_a_cancelled_aclose_waits_for_the_close():
    """A second ``aclose`` after one whose caller was cancelled returned at once on the
    ``_closed`` flag: sessions still open, their readers running."""
    async with Pair(TcpTransport(), LOOPBACK) as pair:
        await pair.alpha.request("bravo", AppData(topic="t", payload=b"x"))
        assert await pair.received(1) == [b"x"]
        readers = list(pair.alpha._readers)
        assert readers
        first = asyncio.create_task(pair.alpha.aclose())
        await asyncio.sleep(0)  # it starts closing the sessions
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        async with asyncio.timeout(10):
            await pair.alpha.aclose()
        assert pair.alpha.open_sessions() == []
        assert all(task.done() for task in readers)


async def test_a_cancelled_leave_still_closes_the_node():
    """A ``leave`` cancelled half-way (a timeout around it, a second SIGTERM) announced LEFT
    and left the node running: listener open, membership timer going, nobody to close them."""
    fleet = make_fleet(None, ["solo"])
    three_goodbyes = replace(MdnsConfig.loopback(), goodbyes=3)
    (node,) = nodes_for(fleet, ["solo"], lambda _name: options(mdns=three_goodbyes))
    await node.start()
    try:
        leaving = asyncio.create_task(node.leave(timeout=5.0))
        # (mDNS says three goodbyes, 125 ms apart: the leave is under way a while)
        await until(lambda: node.membership.core.has_left, timeout=5)
        assert not leaving.done()
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await until(lambda: node._closing is not None and node._closing.done(), timeout=10)
        assert node.listener._closed
        assert node.membership._task.done()
    finally:
        await node.aclose()


async def test_listener_aclose_after_a_cancelled_aclose_waits_for_the_close():
    """As for the peer table: the second ``SessionListener.aclose`` returned at once, the
    sessions it accepted still open, their handlers running."""
    async with Pair(TcpTransport(), LOOPBACK) as pair:
        await pair.alpha.request("bravo", AppData(topic="t", payload=b"x"))
        assert await pair.received(1) == [b"x"]
        handlers = list(pair.listener._handlers)
        assert handlers and pair.listener.sessions
        first = asyncio.create_task(pair.listener.aclose())
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        async with asyncio.timeout(10):
            await pair.listener.aclose()
        assert not pair.listener.sessions
        assert all(task.done() for task in handlers)


async def test_a_state_update_after_the_leave_is_not_an_error():
    """``update_state`` after ``leave`` raised LocalProtocolError out of the core: a revocation
    merge from a peer during the node's leave raised out of the merge, half done (the list in
    force, not written down, no session cut), as did an address change (logged at ERROR)."""
    fleet = make_fleet(None, ["solo"])
    (node,) = nodes_for(fleet, ["solo"])
    await node.start()
    try:
        membership = node.membership
        assert await membership.leave(timeout=1.0)  # no member to tell: at once
        left = membership.state
        membership.update_state(replace(left, revocation_version=left.revocation_version + 1))
        assert membership.state == left  # a node that left publishes nothing more
    finally:
        await node.aclose()
