"""Transport fixes of session 36: a TCP stream's read buffer counts what each received chunk
costs (a peer trickling one byte per segment), a handler that closes its own listener with
``cancel_handlers`` is not cancelled half-way, a memory stream's ``abort()`` after ``aclose()``
takes nothing back, and the conformance suite over IPv6 loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import uvloop

from meshinfer.testing import transport_conformance as conformance
from meshinfer.testing.transport_conformance import TransportSetup
from meshinfer.transport.base import Address, LinkKind, Stream
from meshinfer.transport.memory import MemoryNetwork, MemoryTransport
from meshinfer.transport.tcp import TcpStream, TcpTransport

LOOPS = {"asyncio": None, "uvloop": uvloop.new_event_loop}


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


async def _until(condition, what: str, seconds: float = 5.0) -> None:
    """Wait (polling the loop) until ``condition()`` holds; fail naming ``what`` at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, f"{what} did not happen within {seconds}s"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("loop_factory", list(LOOPS.values()), ids=list(LOOPS))
def test_a_peer_trickling_single_bytes_cannot_hold_fifty_times_the_read_buffer(loop_factory):
    """A peer that sends one byte per segment to a stream whose reader is not reading fills the
    deque with one ``bytes`` object per byte (~50 bytes of memory each): reading pauses once
    the chunks' cost, not only their bytes, passes ``read_buffer``. Every byte still arrives,
    in order, and reading resumes once the application reads."""
    read_buffer = 4096

    async def main() -> None:
        accepted: asyncio.Queue[Stream] = asyncio.Queue()

        async def hand_over(stream: Stream) -> None:
            accepted.put_nowait(stream)

        transport = TcpTransport(read_buffer=read_buffer)
        async with await transport.listen(Address("127.0.0.1", 0), hand_over) as listener:
            loop = asyncio.get_running_loop()
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            raw.setblocking(False)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream = None
            try:
                await loop.sock_connect(raw, ("127.0.0.1", listener.address.port))
                stream = await accepted.get()
                assert isinstance(stream, TcpStream)
                sent = bytearray()
                while not stream._reading_paused and len(sent) < 400:
                    byte = bytes((len(sent) % 251,))
                    await loop.sock_sendall(raw, byte)
                    sent += byte
                    want = len(sent)
                    await _until(lambda: stream._buffered == want, "the byte to arrive")  # noqa: B023
                # each byte came as its own chunk; 400 chunks hold ~20 KiB, five read_buffers
                assert stream._reading_paused, f"still reading after {len(sent)} 1-byte chunks"
                assert len(sent) <= read_buffer // 64 + 1
                await loop.sock_sendall(raw, b"tail")  # held by the kernel while paused
                got = bytearray()
                while len(got) < len(sent) + 4:
                    data = await asyncio.wait_for(stream.read(), 5)
                    assert data, "EOF before every byte arrived"
                    got += data
                assert bytes(got) == bytes(sent) + b"tail"
                assert not stream._reading_paused
            finally:
                raw.close()
                if stream is not None:
                    await stream.aclose()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


async def test_a_handler_closing_its_listener_with_cancel_handlers_is_not_cancelled() -> None:
    """``aclose(cancel_handlers=True)`` called from one of the listener's own handlers cancels
    and waits for the other handlers, and the calling handler goes on (it cancelled itself
    half-way before: the close after it never ran and the other handlers were not awaited)."""
    accepted: asyncio.Queue[Stream] = asyncio.Queue()
    finished: list[str] = []
    listener = None

    async def handler(stream: Stream) -> None:
        if await stream.read(4) != b"stop":
            accepted.put_nowait(stream)
            try:
                await stream.read()  # waits until cancelled
            finally:
                finished.append("other")
            return
        await listener.aclose(cancel_handlers=True)
        finished.append("stopper")
        await stream.write(b"stopped")
        await stream.aclose()

    transport = TcpTransport()
    listener = await transport.listen(Address("127.0.0.1", 0), handler)
    other = await transport.dial(listener.address, timeout=5)
    stopper = await transport.dial(listener.address, timeout=5)
    try:
        await other.write(b"wait")
        await asyncio.wait_for(accepted.get(), 5)
        await stopper.write(b"stop")
        reply = bytearray()
        while data := await asyncio.wait_for(stopper.read(), 5):
            reply += data
        assert bytes(reply) == b"stopped"
        assert finished == ["other", "stopper"], "the others are awaited before it goes on"
        assert await asyncio.wait_for(other.read(), 5) == b"", "the other handler's stream closed"
        await _until(lambda: listener.handler_count == 0, "every handler to end")
    finally:
        await other.aclose()
        await stopper.aclose()
        await listener.aclose(cancel_handlers=True)


@asynccontextmanager
async def _tcp_setup() -> AsyncIterator[TransportSetup]:
    yield TransportSetup(TcpTransport(LinkKind.WAN), Address("127.0.0.1", 0))


@asynccontextmanager
async def _tcp_ipv6_setup() -> AsyncIterator[TransportSetup]:
    yield TransportSetup(TcpTransport(LinkKind.WAN), Address("::1", 0))


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("check", conformance.ALL_CHECKS, ids=lambda c: c.__name__[6:])
def test_conformance_over_ipv6_loopback(check: conformance.Check) -> None:
    """The whole conformance suite holds for TCP over ``::1`` (addresses, EOF, backpressure,
    abort, many connections), as it does over 127.0.0.1."""
    conformance.run_check(check, _tcp_ipv6_setup)


@asynccontextmanager
async def _memory_setup() -> AsyncIterator[TransportSetup]:
    network = MemoryNetwork(latency=0.001)
    yield TransportSetup(MemoryTransport(network, host="rsu"), Address("rsu", 0))


@pytest.mark.parametrize("factory", [_memory_setup, _tcp_setup], ids=["memory", "tcp"])
async def test_abort_after_aclose_does_not_take_back_what_the_close_sent(factory) -> None:
    """``abort()`` after ``aclose()`` is a no-op, as the Stream contract and the conformance
    suite say: the peer still reads what was written before the close, then ``b""``. (The
    memory transport severed the pipes, so the peer read ``b""`` at once; TCP already kept it.)"""
    async with factory() as setup, conformance.Served(setup) as served:
        client, server = await served.pair()
        await client.write(b"last words")
        await client.aclose()
        client.abort()
        assert await asyncio.wait_for(conformance.read_to_eof(server), 5) == b"last words"
