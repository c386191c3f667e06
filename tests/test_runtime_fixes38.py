"""The mesh runtime's composition at its edges (real TCP on loopback): a closed membership
answers no gossip and strands no waiter; a handshake that ends during the listener's close is
not served."""

from __future__ import annotations

import asyncio
import random

import pytest

from meshinfer.errors import SessionTimeout, StreamClosed
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.messages import AppData, CloseCode
from meshinfer.runtime.endpoint import ListenerLimits, SessionListener, dial
from meshinfer.runtime.membership_service import MembershipService
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.runtime.session import SessionConfig, SessionMetrics, connect
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpTransport
from tests.helpers import seed_of, until


@pytest.fixture(scope="module")
def fleet():
    return make_fleet(None, ["car-a", "car-b"])


def node_for(fleet, name: str) -> MeshNode:
    options = MeshNodeOptions(
        listen=Address("127.0.0.1", 0), mdns=None, membership=MembershipConfig.test()
    )
    return MeshNode(fleet.identities[name], fleet.revocations, options, rng=random.Random(1))


async def test_a_closed_membership_drops_gossip_and_answers_nothing(fleet):
    a, b = node_for(fleet, "car-a"), node_for(fleet, "car-b")
    marks: list[str] = []
    async with a, b:
        assert a.membership is not None and b.membership is not None and a.address
        a.peers.on(AppData, lambda peer, msg: marks.append(msg.topic))
        await a.membership.aclose()  # the peer table (and its Gossip handler) still up
        b.peers.learn(a.node_id, a.address, a.identity.static_public)
        b.membership.join([a.node_id])  # a push-pull to a: queued before the mark below
        b.peers.send(a.node_id, AppData(topic="mark", payload=b""))
        async with asyncio.timeout(10):
            while not marks:  # one session, one outbox: the Gossip was handled before
                await asyncio.sleep(0.01)
        assert a.membership.core.member(b.node_id) is None  # (before: b was learnt, answered)
        assert a.membership.dropped_closed >= 1


async def test_wait_joined_ends_with_a_clear_error_when_the_node_closes_unjoined(fleet):
    a = node_for(fleet, "car-a")
    await a.start()
    waiter = asyncio.create_task(a.wait_joined())
    await asyncio.sleep(0)  # (waiting now)
    await a.aclose()
    async with asyncio.timeout(5):  # (before: it waited for ever)
        with pytest.raises(RuntimeError, match="closed before it joined"):
            await waiter
    with pytest.raises(RuntimeError, match="closed before it joined"):
        await a.wait_joined()  # (and a later call at once)


async def test_a_closed_membership_does_not_start_and_its_leave_says_false_at_once(fleet):
    a = node_for(fleet, "car-a")
    async with a:
        membership = a.membership
        assert membership is not None
    with pytest.raises(RuntimeError, match="is closed"):
        membership.start()
    assert await membership.leave(timeout=60) is False  # (before: it waited the 60 s)


async def test_an_unstarted_membership_closed_then_started_runs_no_task(fleet):
    b = node_for(fleet, "car-b")
    service = MembershipService(b.peers, b.initial_state(1), MembershipConfig.test())
    await service.aclose()
    with pytest.raises(RuntimeError, match="cannot start"):
        service.start()  # (before: a timer task started that nothing would stop)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "membership"]


class HeldThirdMessage:
    """A client stream whose second handshake write (XX's third message) waits for ``go``."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.writes = 0
        self.held = asyncio.Event()
        self.go = asyncio.Event()

    def __getattr__(self, name):
        return getattr(self._stream, name)

    async def write(self, data: bytes) -> None:
        self.writes += 1
        if self.writes == 2:
            self.held.set()
            await self.go.wait()
        await self._stream.write(data)


async def test_a_handshake_that_ends_during_the_listener_close_is_not_served():
    fleet = make_fleet(None, ["alpha", "bravo"])
    served: list[str] = []

    async def handler(session) -> None:
        served.append(session.peer_id)
        async for _ in session:
            pass

    metrics = SessionMetrics()
    transport = TcpTransport()
    listener = SessionListener(
        transport,
        fleet.admission("bravo"),
        handler,
        config=SessionConfig(handshake_timeout=5),
        limits=ListenerLimits(handler_grace_s=5),
        metrics=metrics,
    )
    address = await listener.start(Address("127.0.0.1", 0))
    stream = HeldThirdMessage(await transport.dial(address, timeout=5))
    client = asyncio.create_task(connect(stream, fleet.admission("alpha")))
    await asyncio.wait_for(stream.held.wait(), 5)  # the responder waits for the last message
    closing = asyncio.create_task(listener.aclose())
    await asyncio.sleep(0)  # (the close has begun: the listener is closed to new handshakes)
    stream.go.set()
    session = await asyncio.wait_for(client, 5)
    with pytest.raises(StreamClosed):
        async with asyncio.timeout(5):
            await session.recv()  # closed by the listener, GOING_AWAY
    assert session.close_code == CloseCode.GOING_AWAY
    await asyncio.wait_for(closing, 10)
    assert served == []  # (before: handed to the handler, then cancelled after the grace)
    assert metrics.handshake_failures["shutting-down"] == 1
    await session.aclose()


async def test_a_dial_to_a_listener_that_accepts_and_stalls_is_cut_at_the_handshake_timeout():
    fleet = make_fleet(None, ["alpha"])
    held: list[asyncio.StreamWriter] = []

    async def stall(reader, writer) -> None:
        held.append(writer)  # accepted, never answered

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    metrics = SessionMetrics()
    try:
        with pytest.raises(SessionTimeout):
            async with asyncio.timeout(10):  # (a guard: the handshake timeout ends it first)
                await dial(
                    TcpTransport(),
                    Address("127.0.0.1", port),
                    fleet.admission("alpha"),
                    config=SessionConfig(handshake_timeout=0.3),
                    metrics=metrics,
                )
        assert metrics.handshake_failures["timeout"] == 1
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def connection_refused(address: Address) -> bool:
    """Whether nothing accepts connections at ``address``."""
    try:
        _, writer = await asyncio.open_connection(address.host, address.port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


def plain_listener(transport=None) -> SessionListener:
    async def handler(session) -> None:
        pass

    fleet = make_fleet(None, ["bravo"])
    return SessionListener(transport or TcpTransport(), fleet.admission("bravo"), handler)


async def test_a_listener_starts_once_and_not_after_its_close():
    listener = plain_listener()
    address = await listener.start(Address("127.0.0.1", 0))
    with pytest.raises(RuntimeError, match="already started"):
        await listener.start(Address("127.0.0.1", 0))  # (before: a second socket, never closed)
    await listener.aclose()
    assert await connection_refused(address)
    with pytest.raises(RuntimeError, match="closed"):
        await listener.start(Address("127.0.0.1", 0))  # (before: bound, and nothing closed it)


class HeldBind(TcpTransport):
    """TCP whose ``listen`` binds, then waits for ``go`` before it returns the listener."""

    def __init__(self) -> None:
        super().__init__()
        self.bound: Address | None = None
        self.held = asyncio.Event()
        self.go = asyncio.Event()

    async def listen(self, address, handler):
        listener = await super().listen(address, handler)
        self.bound = listener.address
        self.held.set()
        await self.go.wait()
        return listener


async def test_a_listener_closed_during_its_start_closes_the_socket_it_bound():
    transport = HeldBind()
    listener = plain_listener(transport)
    start = asyncio.create_task(listener.start(Address("127.0.0.1", 0)))
    await asyncio.wait_for(transport.held.wait(), 5)
    await listener.aclose()  # (nothing to close yet)
    transport.go.set()
    with pytest.raises(RuntimeError, match="closed during its start"):
        await start
    assert transport.bound is not None
    assert await connection_refused(transport.bound)  # (before: listening, owned by no one)


async def test_a_node_known_by_gossip_only_is_dialled_where_it_moved():
    fleet = make_fleet(None, ["car-a", "car-b", "car-c"])
    route = ["127.0.0.1"]  # what car-a's host routes from: the lease of the moment

    def options(**kw) -> MeshNodeOptions:
        return MeshNodeOptions(mdns=None, membership=MembershipConfig.test(), **kw)

    def mesh_node(name: str, opts: MeshNodeOptions, **kw) -> MeshNode:
        return MeshNode(fleet.identities[name], fleet.revocations, opts, **kw)

    moving = mesh_node(
        "car-a",
        options(listen=Address("0.0.0.0", 0), address_check_interval=0.05),
        outbound=lambda: route[0],
    )
    async with moving:
        relay = mesh_node("car-b", options(seeds=[seed_of(moving)]))
        async with relay:
            far = mesh_node("car-c", options(seeds=[seed_of(relay)]))  # hears of car-a by gossip
            async with far:

                def dialled_at() -> str | None:
                    known = far.peers.addresses.get("car-a")
                    return None if known is None else known.address.host

                await until(lambda: dialled_at() == "127.0.0.1")
                route[0] = "127.0.0.2"  # a new lease
                await until(lambda: _gossiped_host(far, "car-a") == "127.0.0.2")
                await until(lambda: dialled_at() == "127.0.0.2", timeout=5)  # (before: never)


def _gossiped_host(observer: MeshNode, node_id: str) -> str | None:
    member = observer.membership.core.member(node_id) if observer.membership else None
    return None if member is None else member.state.host
