"""TCP transport faults found in review (session 33), each on the default loop and on uvloop.

* ``dial``/``listen`` raise :class:`TransportError` for an address no socket can take: a host
  name the resolver refuses (gossip carries any string of up to 253 characters) and a port
  outside 0..65535 (``listen`` on 70000 used to bind port 4464);
* a ``write`` cancelled while it waits for a peer that never reads leaves at most its own bytes
  queued: the next write waits before it queues, so retried writes cannot grow the buffer;
* a peer's FIN does not end a write's wait for backpressure (a half-closed peer may still read).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from meshinfer.errors import TransportError
from meshinfer.testing.transport_conformance import echo
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpStream, TcpTransport

LOOPBACK = Address("127.0.0.1", 0)
CHUNK = 1024 * 1024


@pytest.fixture(params=["asyncio", "uvloop"])
def runner(request: pytest.FixtureRequest) -> Iterator[asyncio.Runner]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner


def run(runner: asyncio.Runner, scenario: Coroutine[Any, Any, None]) -> None:
    runner.run(asyncio.wait_for(scenario, 30))


BAD_HOSTS = [
    pytest.param("a" * 64 + ".example", id="label-over-63"),
    pytest.param("bad\x00host", id="nul-byte"),
]
BAD_PORTS = [pytest.param(70000, id="70000"), pytest.param(-1, id="minus-1")]


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_dial_to_a_host_the_resolver_refuses_is_a_transport_error(
    runner: asyncio.Runner, host: str
) -> None:
    async def scenario() -> None:
        with pytest.raises(TransportError, match=r"^dial "):  # uvloop: the resolver's own error
            await TcpTransport().dial(Address(host, 7946), timeout=5)

    run(runner, scenario())


@pytest.mark.parametrize("port", BAD_PORTS)
def test_dial_to_a_port_out_of_range_is_a_transport_error(
    runner: asyncio.Runner, port: int
) -> None:
    async def scenario() -> None:
        with pytest.raises(TransportError, match="not a port"):
            await TcpTransport().dial(Address("127.0.0.1", port), timeout=5)

    run(runner, scenario())


@pytest.mark.parametrize("port", BAD_PORTS)
def test_listen_on_a_port_out_of_range_is_refused_not_wrapped(
    runner: asyncio.Runner, port: int
) -> None:
    async def scenario() -> None:
        listener = None
        try:
            with pytest.raises(TransportError, match="not a port"):
                listener = await TcpTransport().listen(Address("127.0.0.1", port), echo)
        finally:
            if listener is not None:  # the old code bound port 70000 - 65536 = 4464
                await listener.aclose(cancel_handlers=True)

    run(runner, scenario())


def test_listen_on_a_host_the_resolver_refuses_is_a_transport_error(
    runner: asyncio.Runner,
) -> None:
    async def scenario() -> None:
        with pytest.raises(TransportError, match=r"^listen "):
            await TcpTransport().listen(Address("a" * 64 + ".example", 0), echo)

    run(runner, scenario())


async def connect_raw(address: Address) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (address.host, address.port))
    return sock


async def write_until_blocked(stream: TcpStream) -> tuple[asyncio.Task[None], int]:
    """Write CHUNKs until one stays blocked; return that write's (pending) task and how many
    writes completed before it."""
    for done in range(256):
        task = asyncio.create_task(stream.write(bytes(CHUNK)))
        await let_run()
        if not task.done():
            return task, done
        await task
    raise AssertionError("the socket took 256 MiB from a peer that reads nothing")


async def let_run() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def receive_to_eof(sock: socket.socket) -> int:
    loop, total = asyncio.get_running_loop(), 0
    while data := await loop.sock_recv(sock, 1 << 20):
        total += len(data)
    return total


def test_writes_cancelled_while_the_peer_reads_nothing_do_not_pile_up(
    runner: asyncio.Runner,
) -> None:
    """Each write into a full buffer is cancelled (a caller's timeout); before the fix each
    still queued its whole megabyte, so retries grew the buffer without bound."""

    async def scenario() -> None:
        accepted: asyncio.Queue[TcpStream] = asyncio.Queue()
        listener = await TcpTransport().listen(LOOPBACK, accepted.put)
        sock = await connect_raw(listener.address)
        try:
            server = await accepted.get()
            first, completed = await write_until_blocked(server)  # now above the high mark
            retries = (asyncio.create_task(server.write(bytes(CHUNK))) for _ in range(8))
            for task in itertools.chain([first], retries):  # each made once the last is cancelled
                await let_run()
                assert not task.done()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            closing = asyncio.create_task(server.aclose())  # flushes what was queued
            received = await receive_to_eof(sock)
            await closing
            # the blocked write had queued its chunk; none of the 8 retries queued a byte
            assert received == (completed + 1) * CHUNK
        finally:
            sock.close()
            await listener.aclose(cancel_handlers=True)

    run(runner, scenario())


def test_a_peer_half_close_does_not_end_a_write_s_wait_for_backpressure(
    runner: asyncio.Runner,
) -> None:
    """The peer shuts down its sending side but reads nothing: our blocked write stays
    blocked (the old code let it return at the FIN), then completes once the peer reads."""

    async def scenario() -> None:
        accepted: asyncio.Queue[TcpStream] = asyncio.Queue()
        listener = await TcpTransport().listen(LOOPBACK, accepted.put)
        sock = await connect_raw(listener.address)
        try:
            server = await accepted.get()
            blocked, _ = await write_until_blocked(server)
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(5):
                assert await server.read() == b""  # the FIN has arrived
            await let_run()
            assert not blocked.done(), "the write returned while the peer still read nothing"
            reading = asyncio.create_task(receive_to_eof(sock))
            async with asyncio.timeout(10):
                await blocked
            await server.aclose()
            async with asyncio.timeout(10):
                assert await reading > 0
        finally:
            sock.close()
            await listener.aclose(cancel_handlers=True)

    run(runner, scenario())
