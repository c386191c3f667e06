"""The session listener survives anything a client does, and keeps serving good peers meanwhile.

Attackers are raw TCP sockets bound to 127.0.0.2, the good peer dials from 127.0.0.1, so the
per-host bound limits the attacker without touching the good peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import pytest

from meshinfer.errors import HandshakeError, StreamClosed
from meshinfer.proto.messages import AppData, CloseCode
from meshinfer.runtime.endpoint import ListenerLimits, SessionListener, dial
from meshinfer.runtime.session import SessionConfig, SessionMetrics
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpTransport

ATTACKER = "127.0.0.2"


class Server:
    """A session listener on loopback for fleet member ``bravo``; its sessions echo, or go to
    ``handler``."""

    def __init__(self, *, config=None, limits=None, handler=None):
        self.fleet = make_fleet(None, ["alpha", "bravo"])
        self.metrics = SessionMetrics()
        self.transport = TcpTransport()
        self.listener = SessionListener(
            self.transport,
            self.fleet.admission("bravo"),
            handler or self._echo,
            config=config or SessionConfig(handshake_timeout=0.5),
            limits=limits or ListenerLimits(),
            metrics=self.metrics,
        )

    async def _echo(self, session):
        async for msg in session:
            await session.send(msg)

    async def __aenter__(self):
        self.addr = await self.listener.start(Address("127.0.0.1", 0))
        return self

    async def __aexit__(self, *exc):
        await self.listener.aclose()

    async def good_peer_round_trip(self, payload: bytes = b"hello") -> None:
        """A good peer can still handshake and get an echo, within a bounded time."""
        async with asyncio.timeout(5):
            session = await dial(self.transport, self.addr, self.fleet.admission("alpha"))
            await session.send(AppData(topic="echo", payload=payload))
            assert (await session.recv()).payload == payload
            await session.aclose()


async def raw_connect(addr: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((ATTACKER, 0))
    await asyncio.get_running_loop().sock_connect(sock, (addr.host, addr.port))
    return await asyncio.open_connection(sock=sock)


async def wait_closed_by_server(reader: asyncio.StreamReader, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass


async def test_garbage_bytes_are_dropped_and_counted():
    async with Server() as srv:
        for seed in range(5):
            reader, writer = await raw_connect(srv.addr)
            writer.write(b"\x00\x10" + os.urandom(16) + bytes([seed]) * 100)
            await writer.drain()
            await wait_closed_by_server(reader)
            writer.close()
        assert srv.metrics.handshake_failures["handshake-error"] == 5
        await srv.good_peer_round_trip()


async def test_half_finished_handshake_is_cut_at_the_timeout():
    async with Server() as srv:
        reader, writer = await raw_connect(srv.addr)
        writer.write(b"\x00\x21\x01" + os.urandom(32))  # a plausible first XX record, then silence
        await writer.drain()
        await srv.good_peer_round_trip()  # served while the half-open handshake waits
        await wait_closed_by_server(reader, timeout=3)
        assert srv.metrics.handshake_failures["timeout"] == 1
        writer.close()


async def test_one_byte_per_interval_client_is_cut_at_the_timeout():
    async with Server() as srv:
        reader, writer = await raw_connect(srv.addr)

        async def trickle():
            with contextlib.suppress(ConnectionError, OSError):
                for byte in b"\x00\x21\x01" + os.urandom(32):
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.1)

        task = asyncio.create_task(trickle())
        await srv.good_peer_round_trip()
        await wait_closed_by_server(reader, timeout=3)
        task.cancel()
        assert srv.metrics.handshake_failures["timeout"] == 1
        writer.close()


async def test_thousand_connection_burst_leaves_the_listener_serving():
    limits = ListenerLimits(max_handshakes=64, max_pending_per_host=16)
    async with Server(limits=limits) as srv:

        async def attempt():
            try:
                _reader, writer = await raw_connect(srv.addr)
            except OSError:
                return
            writer.write(b"\x00")
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
            writer.close()

        await asyncio.gather(*(attempt() for _ in range(1000)))
        await srv.good_peer_round_trip()
        refused = sum(srv.metrics.handshake_failures.values())
        assert refused >= 900, srv.metrics.handshake_failures
        async with asyncio.timeout(5):
            while srv.listener._handshaking:
                await asyncio.sleep(0.02)


async def test_per_host_bound_refuses_extra_pending_handshakes():
    limits = ListenerLimits(max_pending_per_host=4)
    async with Server(limits=limits, config=SessionConfig(handshake_timeout=2)) as srv:
        conns = [await raw_connect(srv.addr) for _ in range(10)]
        async with asyncio.timeout(3):
            while srv.metrics.handshake_failures["host-limit"] < 6:
                await asyncio.sleep(0.01)
        await srv.good_peer_round_trip()  # another host is not affected
        for _, writer in conns:
            writer.close()


async def test_certificate_from_another_fleet_is_refused_while_serving_others():
    async with Server() as srv:
        other = make_fleet(None, ["mallory"], fleet_id="other-fleet")
        with pytest.raises((HandshakeError, StreamClosed)):
            await dial(srv.transport, srv.addr, other.admission("mallory"))
        await srv.good_peer_round_trip()
        assert srv.metrics.handshakes_ok == 1
        assert sum(srv.metrics.handshake_failures.values()) >= 1


async def test_sessions_per_peer_are_bounded():
    limits = ListenerLimits(max_sessions_per_peer=2)
    async with Server(limits=limits) as srv:
        admission = srv.fleet.admission("alpha")
        first = await dial(srv.transport, srv.addr, admission)
        second = await dial(srv.transport, srv.addr, admission)
        third = await dial(srv.transport, srv.addr, admission)
        async with asyncio.timeout(5):
            await third.wait_closed()
        assert third.close_code == CloseCode.OVERLOADED
        assert srv.metrics.handshake_failures["peer-limit"] == 1
        for s in (first, second):
            await s.send(AppData(topic="e", payload=b"ok"))
            assert (await s.recv()).payload == b"ok"
            await s.aclose()


async def test_listener_close_is_idempotent_and_closes_sessions():
    async with Server() as srv:
        session = await dial(srv.transport, srv.addr, srv.fleet.admission("alpha"))
        await session.send(AppData(topic="e", payload=b"1"))
        await session.recv()
        await srv.listener.aclose()
        await srv.listener.aclose()
        async with asyncio.timeout(5):
            await session.wait_closed()
        assert session.close_code == CloseCode.GOING_AWAY


class HandlerLog:
    """Session handlers that record how they ended: ``returned`` or ``cancelled``."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.ended: list[str] = []

    async def reads_until_closed(self, session) -> None:
        self.started.set()
        async for _ in session:
            pass
        self.ended.append("returned")

    async def ignores_its_session(self, session) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise


@pytest.mark.parametrize("handler", ["reads_until_closed", "ignores_its_session"])
async def test_listener_close_leaves_no_handler_running(handler):
    """A handler that returns once its session is closed is let return; one that ignores it
    is cancelled after the grace; either way none is left running after aclose()."""
    log = HandlerLog()
    grace_s = 0.05 if handler == "ignores_its_session" else 30
    limits = ListenerLimits(handler_grace_s=grace_s)
    async with Server(limits=limits, handler=getattr(log, handler)) as srv:
        client = await dial(srv.transport, srv.addr, srv.fleet.admission("alpha"))
        await log.started.wait()
        await srv.listener.aclose()
        expected = "returned" if handler == "reads_until_closed" else "cancelled"
        assert log.ended == [expected]
        await client.aclose()
