"""Transport fixes of session 38: a TCP ``write`` of a ``bytearray`` no longer leaves the
caller's buffer in the socket's queue (uvloop sent later mutations and made the caller's
``clear()`` raise), ``aclose`` with bytes queued lets go of its abort timer once the connection
is gone, a listener whose ``aclose`` is cancelled still closes its socket, and a memory stream
refuses a ``write`` of an int as TCP does (it sent that many NUL bytes)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import uvloop

from meshinfer.errors import TransportError
from meshinfer.transport.base import Address, Stream
from meshinfer.transport.memory import MemoryNetwork, MemoryTransport
from meshinfer.transport.tcp import TcpStream, TcpTransport

LOOPS = {"asyncio": None, "uvloop": uvloop.new_event_loop}


async def _until(condition, what: str, seconds: float = 5.0) -> None:
    """Wait (polling the loop) until ``condition()`` holds; fail naming ``what`` at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, f"{what} did not happen within {seconds}s"
        await asyncio.sleep(0.001)


async def _fill_kernel_buffers(stream: TcpStream) -> int:
    """Write until the kernel's buffers are full and the transport queues bytes itself (below
    its high mark, so no write waits); returns how many bytes were written."""
    sent = 0
    while stream._transport.get_write_buffer_size() == 0:  # type: ignore[union-attr]
        await asyncio.wait_for(stream.write(b"x" * 4096), 5)
        sent += 4096
    return sent


async def _pair(transport: TcpTransport):
    accepted: asyncio.Queue[Stream] = asyncio.Queue()

    async def hand_over(stream: Stream) -> None:
        accepted.put_nowait(stream)

    listener = await transport.listen(Address("127.0.0.1", 0), hand_over)
    client = await transport.dial(listener.address, timeout=5)
    server = await asyncio.wait_for(accepted.get(), 5)
    return listener, client, server


async def _read_to_eof(stream: Stream) -> bytes:
    got = bytearray()
    while data := await asyncio.wait_for(stream.read(), 5):
        got += data
    return bytes(got)


@pytest.mark.parametrize("loop_factory", list(LOOPS.values()), ids=list(LOOPS))
def test_a_written_bytearray_may_be_reused_at_once(loop_factory):
    """The write returns while the socket still queues its bytes; the caller then clears its
    buffer to fill it again. uvloop kept the caller's bytearray in its queue: ``clear()``
    raised BufferError (and an in-place change went out instead of what was written)."""

    async def main() -> None:
        listener, client, server = await _pair(TcpTransport())
        try:
            sent = await _fill_kernel_buffers(client)
            buffer = bytearray(b"A" * 1000)
            await asyncio.wait_for(client.write(buffer), 5)
            buffer[:] = b"B" * 1000
            buffer.clear()  # BufferError while the transport holds an export of it
            memory = bytearray(b"C" * 10)
            await asyncio.wait_for(client.write(memoryview(memory)), 5)
            memory[:] = b"D" * 10
            reading = asyncio.ensure_future(_read_to_eof(server))
            await client.aclose()
            got = await reading
            assert len(got) == sent + 1010
            assert got[sent:] == b"A" * 1000 + b"C" * 10
        finally:
            await client.aclose()
            await server.aclose()
            await listener.aclose(cancel_handlers=True)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


@pytest.mark.parametrize("loop_factory", list(LOOPS.values()), ids=list(LOOPS))
def test_aclose_with_bytes_queued_lets_go_of_the_stream_once_flushed(loop_factory):
    """``aclose`` with bytes still queued arms an abort after ``close_timeout``; once the peer
    took them and the connection is gone, that timer is cancelled. It was left armed, holding
    the stream (and so its buffers) for ``close_timeout`` seconds after every such close."""

    async def main() -> None:
        listener, client, server = await _pair(TcpTransport(close_timeout=3600))
        try:
            sent = await _fill_kernel_buffers(client)
            await client.aclose()  # returns at once: the socket still queues bytes
            assert len(await _read_to_eof(server)) == sent
            ref = weakref.ref(client)
            del client  # freed once the connection is lost, unless a timer still holds it
            await _until(lambda: gc.collect() is not None and ref() is None, "the stream freed")
        finally:
            await server.aclose()
            await listener.aclose(cancel_handlers=True)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


async def test_a_cancelled_listener_close_still_closes_its_socket() -> None:
    """``TcpListener.aclose`` cancelled while it waits for its accept loop to end: the
    listening socket was left open for good (the next ``aclose`` does nothing), so the port
    stayed bound. It is closed, and a new listener can bind the same address."""
    transport = TcpTransport()

    async def handler(stream: Stream) -> None:
        await stream.aclose()

    listener = await transport.listen(Address("127.0.0.1", 0), handler)
    closing = asyncio.ensure_future(listener.aclose())
    await asyncio.sleep(0)  # it has cancelled its accept loop and waits for it
    assert not closing.done()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await listener.aclose()
    try:
        again = await transport.listen(listener.address, handler)
    except TransportError as exc:
        pytest.fail(f"the port is still bound: {exc}")
    await again.aclose(cancel_handlers=True)
    with pytest.raises(TransportError):
        await transport.dial(listener.address, timeout=5)


async def test_writing_an_int_is_refused_by_both_transports() -> None:
    """``write(3)`` is a bug in the caller: TCP raised TypeError, the memory stream sent three
    NUL bytes (``bytes(3)``). Both refuse it now, and send nothing."""
    network = MemoryNetwork()
    transport = MemoryTransport(network, host="a")
    accepted: asyncio.Queue[Stream] = asyncio.Queue()

    async def hand_over(stream: Stream) -> None:
        accepted.put_nowait(stream)

    async with await transport.listen(Address("b", 0), hand_over) as listener:
        client = await transport.dial(listener.address)
        server = await asyncio.wait_for(accepted.get(), 5)
        with pytest.raises(TypeError):
            await client.write(3)  # type: ignore[arg-type]
        await client.write(bytearray(b"ok"))
        await client.aclose()
        assert await _read_to_eof(server) == b"ok"
        await server.aclose()

    listener, tcp_client, tcp_server = await _pair(TcpTransport())
    try:
        with pytest.raises(TypeError):
            await tcp_client.write(3)  # type: ignore[arg-type]
        await tcp_client.write(bytearray(b"ok"))
        await tcp_client.aclose()
        assert await _read_to_eof(tcp_server) == b"ok"
    finally:
        await tcp_server.aclose()
        await listener.aclose(cancel_handlers=True)
