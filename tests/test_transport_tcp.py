"""TCP-specific transport behaviour: misbehaving clients, resets, bursts, timeouts, options.

Every test runs on the default asyncio loop and on uvloop (the ``runner`` fixture).
The shared contract is in ``tests/test_transport_conformance.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop

from meshinfer.errors import StreamClosed, TransportError
from meshinfer.testing.transport_conformance import echo, read_exactly
from meshinfer.transport.base import Address, LinkKind, Stream
from meshinfer.transport.tcp import TcpListener, TcpStream, TcpTransport

LOOPBACK = Address("127.0.0.1", 0)


@pytest.fixture(params=["asyncio", "uvloop"])
def runner(request: pytest.FixtureRequest) -> Iterator[asyncio.Runner]:
    """A fresh event loop of each kind; tests run their scenario on it with :func:`run`."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner


def run(runner: asyncio.Runner, scenario: Coroutine[Any, Any, None]) -> None:
    runner.run(asyncio.wait_for(scenario, 30))


async def no_handlers_left(listener: TcpListener) -> None:
    """Let the handler tasks' done-callbacks run, then check none is left."""
    for _ in range(50):
        if not listener.handler_count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{listener.handler_count} handler tasks still running")


class Finished:
    """Wraps a handler; ``wait(n)`` returns once ``n`` handler calls have ended."""

    def __init__(self, handler=echo) -> None:
        self._handler = handler
        self.count = 0
        self._changed = asyncio.Event()

    async def __call__(self, stream: Stream) -> None:
        try:
            await self._handler(stream)
        finally:
            self.count += 1
            self._changed.set()

    async def wait(self, n: int, seconds: float = 10) -> None:
        async with asyncio.timeout(seconds):
            while self.count < n:
                self._changed.clear()
                await self._changed.wait()


@asynccontextmanager
async def listening(handler, transport: TcpTransport | None = None) -> AsyncIterator[TcpListener]:
    listener = await (transport or TcpTransport()).listen(LOOPBACK, handler)
    try:
        yield listener
    finally:
        await listener.aclose(cancel_handlers=True)


async def raw_connect(address: Address) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (address.host, address.port))
    return sock


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0, so the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def assert_echoes(listener: TcpListener, payload: bytes = b"still serving") -> None:
    stream = await TcpTransport().dial(listener.address, timeout=5)
    try:
        await stream.write(payload)
        assert await read_exactly(stream, len(payload)) == payload
    finally:
        await stream.aclose()


def test_silent_client_that_leaves_gives_the_handler_eof(runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        reads: list[bytes] = []

        async def record(stream: Stream) -> None:
            reads.append(await stream.read())
            await stream.aclose()

        finished = Finished(record)
        async with listening(finished) as listener:
            sock = await raw_connect(listener.address)
            sock.close()
            await finished.wait(1)
            assert reads == [b""]
            await no_handlers_left(listener)

    run(runner, scenario())


def test_peer_reset_gives_eof_then_stream_closed_on_write(runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        accepted: asyncio.Queue[TcpStream] = asyncio.Queue()
        async with listening(accepted.put) as listener:
            sock = await raw_connect(listener.address)
            await asyncio.get_running_loop().sock_sendall(sock, b"partial")
            server = await accepted.get()
            assert await read_exactly(server, 7) == b"partial"
            reset(sock)
            assert await asyncio.wait_for(server.read(), 5) == b""
            with pytest.raises(StreamClosed):
                await server.write(b"x" * 1024)
            await server.aclose()
            await server.aclose()
            other = await TcpTransport().dial(listener.address)
            accepted_other = await accepted.get()
            assert accepted_other.remote_address == other.local_address
            await other.aclose()
            await accepted_other.aclose()

    run(runner, scenario())


def test_dialled_stream_sees_eof_when_the_server_resets(runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        listener_socket = socket.socket()
        listener_socket.bind(("127.0.0.1", 0))
        listener_socket.listen(1)
        listener_socket.setblocking(False)
        host, port = listener_socket.getsockname()
        stream = await TcpTransport().dial(Address(host, port), timeout=5)
        conn, _ = await asyncio.get_running_loop().sock_accept(listener_socket)
        pending = asyncio.create_task(stream.read())
        reset(conn)
        listener_socket.close()
        assert await asyncio.wait_for(pending, 5) == b""
        await stream.aclose()
        with pytest.raises(StreamClosed):
            await stream.write(b"after reset")

    run(runner, scenario())


def test_listener_survives_a_burst_of_1000_misbehaving_clients(runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        finished = Finished()
        loop = asyncio.get_running_loop()
        async with listening(finished) as listener:

            async def misbehave(i: int) -> None:
                sock = await raw_connect(listener.address)
                if i % 3 == 1:
                    await loop.sock_sendall(sock, bytes(range(256)) * 4)  # garbage, never read back
                if i % 3 == 2:
                    reset(sock)
                else:
                    sock.close()

            await asyncio.gather(*(misbehave(i) for i in range(1000)))
            await assert_echoes(listener)
            await finished.wait(1001)
            await no_handlers_left(listener)

    run(runner, scenario())


def test_handler_exception_is_logged_and_closes_only_its_stream(
    runner: asyncio.Runner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async def explode(stream: Stream) -> None:
            first = await stream.read(5)
            if first == b"crash":
                raise RuntimeError("deliberate handler failure")
            await stream.write(first)
            await echo(stream)

        async with listening(explode) as listener:
            stream = await TcpTransport().dial(listener.address)
            with caplog.at_level(logging.ERROR, logger="meshinfer.transport"):
                await stream.write(b"crash")
                assert await asyncio.wait_for(stream.read(), 5) == b""
            await stream.aclose()
            assert "deliberate handler failure" in caplog.text
            await assert_echoes(listener, b"fine!and more")

    run(runner, scenario())


def test_aclose_with_cancel_handlers_cancels_and_closes_their_streams(
    runner: asyncio.Runner,
) -> None:
    async def scenario() -> None:
        started = asyncio.Event()

        async def park(stream: Stream) -> None:
            started.set()
            await asyncio.Event().wait()

        listener = await TcpTransport().listen(LOOPBACK, park)
        stream = await TcpTransport().dial(listener.address)
        await started.wait()
        await listener.aclose()
        assert listener.handler_count == 1, "a plain aclose must leave handlers running"
        await listener.aclose(cancel_handlers=True)
        await no_handlers_left(listener)
        assert await asyncio.wait_for(stream.read(), 5) == b""
        await stream.aclose()

    run(runner, scenario())


def test_dial_refused_names_the_address(runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        host, port = probe.getsockname()
        probe.close()
        with pytest.raises(TransportError, match=f"{host}:{port}"):
            await TcpTransport().dial(Address(host, port))

    run(runner, scenario())


def test_dial_timeout_raises_transport_error(runner: asyncio.Runner) -> None:
    """A listener whose accept queue is full drops new SYNs, so a dial hangs until timeout."""

    async def scenario() -> None:
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        host, port = full.getsockname()
        fillers = [await raw_connect(Address(host, port))]
        try:
            with pytest.raises(TransportError, match="timed out"):
                await TcpTransport().dial(Address(host, port), timeout=0.2)
        finally:
            for sock in fillers:
                sock.close()
            full.close()

    run(runner, scenario())


def test_listen_on_a_taken_port_raises_transport_error(runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        async with listening(echo) as listener:
            taken = Address("127.0.0.1", listener.address.port)
            other = socket.socket()
            try:
                with pytest.raises(OSError):
                    other.bind((taken.host, taken.port))  # sanity: the port really is taken
            finally:
                other.close()
            with pytest.raises(TransportError, match=str(taken.port)):
                await TcpTransport().listen(taken, echo)

    run(runner, scenario())


@pytest.mark.parametrize("nodelay", [True, False])
def test_nodelay_option_is_applied_to_both_ends(runner: asyncio.Runner, nodelay: bool) -> None:
    async def scenario() -> None:
        accepted: asyncio.Queue[TcpStream] = asyncio.Queue()
        transport = TcpTransport(LinkKind.V2I, nodelay=nodelay)
        async with listening(accepted.put, transport) as listener:
            client = await transport.dial(listener.address)
            server = await accepted.get()
            for stream in (client, server):
                sock = stream.get_extra_info("socket")
                assert bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)) is nodelay
                assert stream.link is LinkKind.V2I
                await stream.aclose()

    run(runner, scenario())


def test_close_to_a_stalled_peer_returns_at_once_and_aborts_later(runner: asyncio.Runner) -> None:
    """Closing with unsent bytes queued does not wait for a peer that never reads; after
    ``close_timeout`` the connection is aborted (the peer sees a reset, not a clean EOF)."""

    async def scenario() -> None:
        accepted: asyncio.Queue[TcpStream] = asyncio.Queue()
        transport = TcpTransport(close_timeout=0.1)
        loop = asyncio.get_running_loop()
        async with listening(accepted.put, transport) as listener:
            sock = await raw_connect(listener.address)
            server = await accepted.get()
            # 32 MiB: more than the socket buffers hold while the peer reads nothing
            flood = asyncio.create_task(server.write(bytes(32 * 1024 * 1024)))
            done, _ = await asyncio.wait({flood}, timeout=0.1)
            assert not done, "the peer never reads, so the write must be blocked"
            async with asyncio.timeout(1):
                await server.aclose()
            with pytest.raises(StreamClosed):
                await flood
            await asyncio.sleep(0.3)  # let close_timeout (0.1 s) pass: the abort is what we test
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(5):
                    while await loop.sock_recv(sock, 1 << 20):
                        pass
            sock.close()

    run(runner, scenario())


EMFILE_SERVER = """
import asyncio, logging, resource, sys
import uvloop
from meshinfer.testing.transport_conformance import echo
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpTransport

logging.basicConfig(level=logging.WARNING)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

async def main():
    listener = await TcpTransport().listen(Address("127.0.0.1", 0), echo)
    print(listener.address.port, flush=True)
    await asyncio.Event().wait()

with asyncio.Runner(loop_factory=uvloop.new_event_loop if sys.argv[1] == "uvloop" else None) as r:
    r.run(main())
"""


def wait_for_output(child: subprocess.Popen[bytes], expected: bytes, seconds: float) -> bytes:
    """Read the child's stderr until ``expected`` shows up; fail after ``seconds``."""
    seen = b""
    deadline = time.monotonic() + seconds
    while expected not in seen:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([child.stderr], [], [], max(0.0, remaining))
        assert ready, f"no {expected!r} from the server within {seconds}s; got {seen[-500:]!r}"
        chunk = os.read(child.stderr.fileno(), 65536)
        assert chunk, f"the server exited; it said {seen[-500:]!r}"
        seen += chunk
    return seen


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_listener_survives_running_out_of_file_descriptors(loop: str) -> None:
    """A server process limited to 64 descriptors gets 150 connections held open: accept fails
    with EMFILE, which is logged; once the clients leave, the same listener serves again (on
    Python 3.11, asyncio's own create_server starves its loop here: CPython gh-151615)."""
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen(
        [sys.executable, "-c", EMFILE_SERVER, loop],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    crowd: list[socket.socket] = []
    try:
        port = int(child.stdout.readline())
        crowd = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(150)]
        wait_for_output(child, b"accept failed ([Errno 24] Too many open files)", 10)
        for sock in crowd:
            sock.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.settimeout(10)
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
        assert child.poll() is None, "the server process died"
    finally:
        for sock in crowd:
            sock.close()
        child.kill()
        child.communicate(timeout=10)
