"""One conformance suite for every :class:`~meshinfer.transport.base.Transport`.

Each ``check_*`` coroutine takes a :data:`TransportFactory` (an async context manager factory
yielding a :class:`TransportSetup`) and raises :class:`AssertionError` when the transport breaks
the contract. ``ALL_CHECKS`` lists them; :func:`run_check` runs one on a fresh event loop (any
``loop_factory``: the default loop, uvloop, a virtual-time loop) under a time limit and fails if
it leaves a task behind. ``tests/test_transport_conformance.py`` parametrizes over transports,
loops and checks; the simulator's transport runs the same checks.

The contract these checks pin down (beyond the docstrings in :mod:`meshinfer.transport.base`):

* ``read`` returns ``b""`` at EOF, after the peer closed or reset, after a local ``aclose`` and
  when a local ``aclose`` happens while it is pending -- it does not raise for closed streams;
  ``read(n)`` never returns more than ``n`` bytes;
* ``write`` raises :class:`~meshinfer.errors.StreamClosed` after a local ``aclose`` (also when
  the close happens while it waits on backpressure) and, perhaps a few writes late, after the
  peer closed;
* a second concurrent ``read``, or a ``write`` while another waits on backpressure, raises
  :class:`~meshinfer.errors.LocalProtocolError`; ``read(0)`` raises ``ValueError``;
* dialling an address where nothing listens raises :class:`~meshinfer.errors.TransportError`;
* a writer to a peer that does not read blocks instead of buffering without bound;
* closing a listener stops new dials but leaves established streams working;
* a handler that raises gets its stream closed, and the listener keeps serving.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from meshinfer.errors import LocalProtocolError, StreamClosed, TransportError
from meshinfer.transport.base import Address, Listener, Stream, StreamHandler, Transport

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class TransportSetup:
    """What a check runs against: ``transport`` listens on ``listen_address``; ``dialer``
    (``transport`` itself when omitted) dials."""

    transport: Transport
    listen_address: Address
    dialer: Transport | None = None

    @property
    def client(self) -> Transport:
        return self.dialer or self.transport


TransportFactory = Callable[[], AbstractAsyncContextManager[TransportSetup]]
Check = Callable[[TransportFactory], Awaitable[None]]


# --- helpers ---------------------------------------------------------------------------------


class Served:
    """A listener for one check: runs ``handler`` per stream (by default hands each stream to
    ``accepted``), remembers every stream so they all get closed at the end, and on exit waits
    for the handlers to finish."""

    def __init__(self, setup: TransportSetup, handler: StreamHandler | None = None) -> None:
        self.setup = setup
        self.accepted: asyncio.Queue[Stream] = asyncio.Queue()
        self._handler = handler or self._hand_over
        self._streams: list[Stream] = []
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.listener: Listener

    async def __aenter__(self) -> Served:
        self.listener = await self.setup.transport.listen(self.setup.listen_address, self._run)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.listener.aclose()
        for stream in self._streams:
            await stream.aclose()
        try:
            async with asyncio.timeout(10):
                await self._idle.wait()
        except TimeoutError:
            raise AssertionError("a stream handler still runs after every stream closed") from None

    async def dial(self) -> Stream:
        """Dial the listener with the setup's dialer."""
        stream = await self.setup.client.dial(self.listener.address, timeout=10)
        self._streams.append(stream)
        return stream

    async def pair(self) -> tuple[Stream, Stream]:
        """Dial and return (dialler's end, listener's end)."""
        client = await self.dial()
        return client, await self.accepted.get()

    async def _run(self, stream: Stream) -> None:
        self._streams.append(stream)
        self._active += 1
        self._idle.clear()
        try:
            await self._handler(stream)
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _hand_over(self, stream: Stream) -> None:
        self.accepted.put_nowait(stream)


async def echo(stream: Stream) -> None:
    """Stream handler: send back everything received, then close."""
    try:
        while data := await stream.read(64 * KiB):
            await stream.write(data)
    except StreamClosed:
        pass
    finally:
        await stream.aclose()


async def read_at_most(stream: Stream, max_bytes: int = 64 * KiB) -> bytes:
    """``stream.read(max_bytes)``, failing the check when it hands out more than asked for."""
    data = await stream.read(max_bytes)
    assert len(data) <= max_bytes, f"read({max_bytes}) returned {len(data)} bytes"
    return data


async def read_exactly(stream: Stream, size: int, max_bytes: int = 64 * KiB) -> bytes:
    """Read until ``size`` bytes arrived; fails the check on an early EOF."""
    out = bytearray()
    while len(out) < size:
        data = await read_at_most(stream, min(max_bytes, size - len(out)))
        assert data, f"EOF after {len(out)} of {size} bytes"
        out += data
    return bytes(out)


async def read_to_eof(stream: Stream) -> bytes:
    """Read until ``b""``."""
    out = bytearray()
    while data := await read_at_most(stream, 64 * KiB):
        out += data
    return bytes(out)


async def write_in_pieces(stream: Stream, data: bytes, piece: int = 64 * KiB) -> None:
    for start in range(0, len(data), piece):
        await stream.write(data[start : start + piece])


async def expect_raises(exc_type: type[BaseException], awaitable: Awaitable[Any]) -> BaseException:
    """Await ``awaitable`` and fail the check unless it raises ``exc_type`` (another exception
    fails the check too, naming both; cancellation passes through)."""
    try:
        await awaitable
    except exc_type as exc:
        return exc
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise AssertionError(
            f"expected {exc_type.__name__}, got {type(exc).__name__}: {exc}"
        ) from exc
    raise AssertionError(f"expected {exc_type.__name__}, nothing was raised")


async def settle(task: asyncio.Task[Any], rounds: int = 5) -> None:
    """Let the loop run a few rounds, then check ``task`` is still waiting."""
    for _ in range(rounds):
        await asyncio.sleep(0)
    assert not task.done(), f"{task.get_name()} finished early"


async def within(seconds: float, awaitable: Awaitable[Any], what: str) -> Any:
    """Await ``awaitable``; fail the check if that takes over ``seconds`` (a TimeoutError that
    the awaitable raises itself passes through as it is)."""
    limit = asyncio.timeout(seconds)
    try:
        async with limit:
            return await awaitable
    except TimeoutError:
        if not limit.expired():
            raise
        raise AssertionError(f"{what} did not happen within {seconds}s") from None


# --- checks ----------------------------------------------------------------------------------


async def check_dial_and_listen(factory: TransportFactory) -> None:
    """A listener binds (port 0 gets a real port); a dialled stream carries bytes both ways."""
    async with factory() as setup, Served(setup, echo) as served:
        assert isinstance(served.listener, Listener)
        if setup.listen_address.port == 0:
            assert served.listener.address.port != 0, "port 0 was not replaced by the bound port"
        stream = await served.dial()
        assert isinstance(stream, Stream)
        await stream.write(b"ping")
        assert await read_exactly(stream, 4) == b"ping"
        await expect_raises(ValueError, stream.read(0))


async def check_addresses_and_link(factory: TransportFactory) -> None:
    """Both ends carry their transport's link and mirror each other's addresses."""
    async with factory() as setup, Served(setup) as served:
        client, server = await served.pair()
        assert client.link == setup.client.link
        assert server.link == setup.transport.link
        assert client.remote_address == served.listener.address
        assert server.local_address == served.listener.address
        assert server.remote_address == client.local_address
        assert client.local_address.port != 0


async def check_ordered_and_complete(
    factory: TransportFactory, seed: int = 1, total: int = 2 * MiB
) -> None:
    """Random-sized writes echo back complete and in order through random-sized reads."""
    rng = random.Random(seed)
    payload = rng.randbytes(total)
    cuts = sorted(rng.sample(range(1, total), 300))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    async with factory() as setup, Served(setup, echo) as served:
        stream = await served.dial()

        async def send() -> None:
            for piece in pieces:
                await stream.write(piece)

        async def receive() -> bytes:
            out = bytearray()
            while len(out) < total:
                data = await read_at_most(stream, rng.choice((1, 7, 1000, 4096, 65536, 1 << 20)))
                assert data, f"EOF after {len(out)} of {total} bytes"
                out += data
            return bytes(out)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(send())
            received = tg.create_task(receive())
        assert received.result() == payload, "bytes arrived reordered, changed or duplicated"


async def check_full_duplex(factory: TransportFactory, size: int = 4 * MiB) -> None:
    """Both ends write a large volume at once while reading; neither direction stalls the other."""
    rng = random.Random(2)
    there, back = rng.randbytes(size), rng.randbytes(size)
    async with factory() as setup, Served(setup) as served:
        client, server = await served.pair()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(write_in_pieces(client, there))
            tg.create_task(write_in_pieces(server, back))
            at_server = tg.create_task(read_exactly(server, size))
            at_client = tg.create_task(read_exactly(client, size))
        assert at_server.result() == there
        assert at_client.result() == back


async def check_eof_after_peer_close(factory: TransportFactory) -> None:
    """After the peer closes, reads drain what it sent, then return b"" every time; a read
    pending when the peer closes returns b"" too."""
    data = random.Random(3).randbytes(300 * KiB)
    async with factory() as setup, Served(setup) as served:
        client, server = await served.pair()
        pending = asyncio.create_task(client.read(), name="read pending at peer close")
        await settle(pending)
        await server.aclose()
        assert await within(5, pending, "EOF to reach a pending read") == b""

        client, server = await served.pair()
        received = asyncio.create_task(read_to_eof(client), name="read to EOF")
        await write_in_pieces(server, data)
        await server.aclose()
        assert await within(5, received, "EOF after the sent bytes") == data
        assert await client.read() == b""
        assert await client.read() == b""


async def check_aclose_wakes_pending_read(factory: TransportFactory) -> None:
    """``aclose`` from another task makes a pending read return b""; closing again is a no-op;
    the peer sees EOF."""
    async with factory() as setup, Served(setup) as served:
        client, server = await served.pair()
        pending = asyncio.create_task(client.read(), name="read pending at local close")
        await settle(pending)
        await client.aclose()
        assert await within(5, pending, "a pending read to end at close") == b""
        await client.aclose()
        await client.aclose()
        assert await client.read() == b""
        assert await within(5, server.read(), "EOF at the peer") == b""


async def check_write_after_close_raises(factory: TransportFactory) -> None:
    """Writing to a stream this side closed raises StreamClosed."""
    async with factory() as setup, Served(setup) as served:
        client, _ = await served.pair()
        await client.aclose()
        await expect_raises(StreamClosed, client.write(b"late"))


async def check_write_after_peer_close_fails(factory: TransportFactory) -> None:
    """Writes to a stream whose peer closed raise StreamClosed (possibly a few writes late)."""
    async with factory() as setup, Served(setup) as served:
        client, server = await served.pair()
        await server.aclose()
        assert await within(5, client.read(), "EOF") == b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        try:
            while loop.time() < deadline:
                await client.write(b"x" * KiB)
                await asyncio.sleep(0.01)
        except StreamClosed:
            return
        raise AssertionError("writes to a closed peer kept succeeding for 5s")


async def check_dial_nothing_raises(factory: TransportFactory) -> None:
    """Dialling an address where no listener is raises TransportError."""
    async with factory() as setup:
        listener = await setup.transport.listen(setup.listen_address, echo)
        address = listener.address
        await listener.aclose()
        await expect_raises(TransportError, setup.client.dial(address, timeout=5))


async def _stalled_writer(
    served: Served, volume: int
) -> tuple[Stream, Stream, asyncio.Task[None], list[int]]:
    client, server = await served.pair()
    written = [0]

    async def flood() -> None:
        for _ in range(volume // (64 * KiB)):
            await client.write(bytes(64 * KiB))
            written[0] += 64 * KiB

    task = asyncio.create_task(flood(), name="writer to a peer that does not read")
    done, _ = await asyncio.wait({task}, timeout=0.25)
    assert not done, f"{volume} bytes were buffered for a peer that never reads"
    return client, server, task, written


async def check_backpressure(factory: TransportFactory, volume: int = 32 * MiB) -> None:
    """A writer to a non-reading peer blocks instead of buffering without bound, rejects a
    second concurrent writer, and completes once the peer reads."""
    async with factory() as setup, Served(setup) as served:
        client, server, task, written = await _stalled_writer(served, volume)
        assert written[0] < volume
        await expect_raises(LocalProtocolError, client.write(b"x"))
        received = 0
        while received < volume:
            data = await within(10, server.read(1 * MiB), "the stalled bytes to arrive")
            assert data, f"EOF after {received} of {volume} bytes"
            received += len(data)
        await within(10, task, "the writer to finish once the peer reads")
        assert received == written[0] == volume


async def check_aclose_fails_blocked_writer(factory: TransportFactory) -> None:
    """``aclose`` from another task makes a write blocked on backpressure raise StreamClosed."""
    async with factory() as setup, Served(setup) as served:
        client, _, task, _ = await _stalled_writer(served, 32 * MiB)
        await client.aclose()
        await within(5, expect_raises(StreamClosed, task), "the blocked write to fail")


async def check_abort_drops_what_is_queued(factory: TransportFactory) -> None:
    """``abort`` (of the :class:`~meshinfer.transport.base.Stream` protocol) ends the stream at
    once: a write blocked on backpressure raises StreamClosed, a pending read returns b"", what
    was still queued never reaches the peer, and the peer sees the stream end (b"" or
    StreamClosed). Aborting again, or after ``aclose``, is a no-op."""
    async with factory() as setup, Served(setup) as served:
        client, server, task, written = await _stalled_writer(served, 32 * MiB)
        assert hasattr(client, "abort"), "the stream has no abort()"
        pending = asyncio.create_task(client.read(), name="read pending at abort")
        await settle(pending)
        client.abort()
        await within(5, expect_raises(StreamClosed, task), "the blocked write to fail")
        assert await within(5, pending, "a pending read to end at abort") == b""
        client.abort()
        received = 0
        try:
            while data := await within(10, server.read(1 * MiB), "the peer to see the end"):
                received += len(data)
        except StreamClosed:
            pass
        assert received < written[0], "every byte written arrived: nothing was dropped"
        other, _ = await served.pair()
        await other.aclose()
        other.abort()


async def check_concurrent_reads_rejected(factory: TransportFactory) -> None:
    """A second read while one is pending raises LocalProtocolError; the first still works."""
    async with factory() as setup, Served(setup) as served:
        client, server = await served.pair()
        pending = asyncio.create_task(client.read(), name="first reader")
        await settle(pending)
        await expect_raises(LocalProtocolError, client.read())
        await server.write(b"hello")
        assert await within(5, pending, "the first read") == b"hello"


async def check_listener_close_keeps_streams(factory: TransportFactory) -> None:
    """Closing a listener (twice) refuses new dials; established streams keep working."""
    async with factory() as setup, Served(setup, echo) as served:
        stream = await served.dial()
        await stream.write(b"accepted?")  # the echo proves the listener accepted this stream
        assert await read_exactly(stream, 9) == b"accepted?"
        await served.listener.aclose()
        await served.listener.aclose()
        await expect_raises(TransportError, setup.client.dial(served.listener.address, timeout=5))
        await stream.write(b"still here")
        assert await read_exactly(stream, 10) == b"still here"


async def check_many_connections(factory: TransportFactory, count: int = 200) -> None:
    """``count`` concurrent streams each echo their own bytes."""
    rng = random.Random(4)
    payloads = [rng.randbytes(rng.randint(1, 8 * KiB)) for _ in range(count)]
    async with factory() as setup, Served(setup, echo) as served:

        async def one(payload: bytes) -> bytes:
            stream = await served.dial()
            await stream.write(payload)
            echoed = await read_exactly(stream, len(payload))
            await stream.aclose()
            return echoed

        echoed = await asyncio.gather(*(one(p) for p in payloads))
        assert echoed == payloads


async def check_handler_failure_closes_only_its_stream(factory: TransportFactory) -> None:
    """A handler that raises gets its stream closed; other streams and the listener go on."""

    async def fail_on_boom(stream: Stream) -> None:
        if await stream.read(4) == b"boom":
            raise RuntimeError("handler failed on purpose (conformance check)")
        await echo(stream)

    async with factory() as setup, Served(setup, fail_on_boom) as served:
        healthy = await served.dial()
        await healthy.write(b"fine")
        doomed = await served.dial()
        await doomed.write(b"boom")
        assert await within(5, doomed.read(), "the failed handler's stream to close") == b""
        later = await served.dial()
        await later.write(b"fine")
        for stream in (healthy, later):
            await stream.write(b"ping")
        assert await read_exactly(healthy, 4) == b"ping"
        assert await read_exactly(later, 4) == b"ping"


ALL_CHECKS: tuple[Check, ...] = (
    check_dial_and_listen,
    check_addresses_and_link,
    check_ordered_and_complete,
    check_full_duplex,
    check_eof_after_peer_close,
    check_aclose_wakes_pending_read,
    check_write_after_close_raises,
    check_write_after_peer_close_fails,
    check_dial_nothing_raises,
    check_backpressure,
    check_aclose_fails_blocked_writer,
    check_abort_drops_what_is_queued,
    check_concurrent_reads_rejected,
    check_listener_close_keeps_streams,
    check_many_connections,
    check_handler_failure_closes_only_its_stream,
)


async def _no_leftover_tasks() -> None:
    for _ in range(10):
        await asyncio.sleep(0)
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current]
    assert not left, f"tasks left running: {[t.get_name() for t in left]}"


async def run_checked(check: Check, factory: TransportFactory, time_limit: float = 30) -> None:
    """Run ``check`` within ``time_limit`` seconds of loop time, then fail on leftover tasks.
    A TimeoutError the check raises itself (not this limit's) passes through as it is; a failed
    assertion inside a task group is raised as the AssertionError itself."""
    limit = asyncio.timeout(time_limit)
    try:
        async with limit:
            await check(factory)
    except BaseExceptionGroup as group:
        failed = group.subgroup(AssertionError)
        if failed is None:
            raise
        while isinstance(failed, BaseExceptionGroup):
            failed = failed.exceptions[0]
        raise failed from group
    except TimeoutError:
        if not limit.expired():
            raise
        raise AssertionError(f"{check.__name__} took over {time_limit}s (deadlock?)") from None
    await _no_leftover_tasks()


def run_check(
    check: Check,
    factory: TransportFactory,
    *,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    time_limit: float = 30,
) -> None:
    """Run one check on a fresh event loop made by ``loop_factory`` (asyncio's default if None)."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run_checked(check, factory, time_limit))


async def run_all(factory: TransportFactory) -> None:
    """Run every check in turn on the running loop."""
    for check in ALL_CHECKS:
        await run_checked(check, factory)
