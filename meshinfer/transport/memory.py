"""In-process streams between transports that share one :class:`MemoryNetwork`.

For unit tests and the simulator: no sockets, no threads, and no clock but the running loop's
(``loop.time()``/``call_at``), so a virtual-time event loop can drive it.

Addresses are ``Address(name, port)``; listening on port 0 picks a free port. Each direction of a
stream is a :class:`_Pipe`: a bounded queue of chunks, each stamped with the loop time at which it
reaches the reader (``network.latency`` seconds after it was written). A writer waits while the
pipe holds ``network.buffer_limit`` bytes or more (backpressure), then queues its bytes whole
and, for a write over the limit, waits until the reader took all but a limit's worth of them, as
a TCP write waits for its buffer to drain: a write that was cancelled sent all of its bytes or
none, never a part.

Pipe states, per direction::

    open ──writer closes──▶ draining (reader gets what was sent, then b"")
    open / draining ──reader closes──▶ dead (buffer dropped; writes raise StreamClosed)
    any ──network.sever(host)──▶ broken (buffer dropped: reads b"", writes raise StreamClosed)

Fault hooks: ``MemoryNetwork.latency`` (one-way delay in seconds; a dial takes a round trip) and
``MemoryNetwork.sever(host)`` (every stream with an end on ``host`` breaks at once, as when a radio
link drops; listeners stay up, so new dials work).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque

from meshinfer.errors import LocalProtocolError, StreamClosed, TransportError
from meshinfer.transport._handlers import HandlerTasks
from meshinfer.transport.base import Address, LinkKind, StreamHandler

DEFAULT_BUFFER_LIMIT = 64 * 1024
FIRST_PORT = 1024


class _Pipe:
    """One direction of a memory stream. Methods run on the loop."""

    def __init__(self, network: MemoryNetwork) -> None:
        self._network = network
        self._chunks: deque[tuple[float, bytes]] = deque()  # (deliver at, data)
        self._head = 0  # bytes of the first chunk already read
        self.buffered = 0
        self._eof_at: float | None = None  # writer closed; reader sees EOF from then on
        self.reader_closed = False
        self.writer_closed = False
        self.broken = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None

    # --- reader side -------------------------------------------------------------------------

    async def read(self, max_bytes: int) -> bytes:
        if self._read_waiter is not None:
            raise LocalProtocolError("another task is already reading from this stream")
        loop = asyncio.get_running_loop()
        while not (self.reader_closed or self.broken):
            now = loop.time()
            if self._chunks:
                deliver_at = self._chunks[0][0]
                if deliver_at <= now:
                    return self._take(max_bytes)
            elif self._eof_at is not None:
                if self._eof_at <= now:
                    return b""
                deliver_at = self._eof_at
            else:
                deliver_at = None
            await self._wait_readable(loop, deliver_at)
        return b""

    def _take(self, max_bytes: int) -> bytes:
        """Hand out up to ``max_bytes`` of the chunks already delivered, in order."""
        now = asyncio.get_running_loop().time()
        chunks, parts, want = self._chunks, [], max_bytes
        while chunks and want and chunks[0][0] <= now:
            chunk, start = chunks[0][1], self._head
            end = min(len(chunk), start + want)
            parts.append(chunk if start == 0 and end == len(chunk) else chunk[start:end])
            want -= end - start
            if end == len(chunk):
                chunks.popleft()
                self._head = 0
            else:
                self._head = end
        data = b"".join(parts)
        self.buffered -= len(data)
        self._wake("_write_waiter")
        return data

    async def _wait_readable(self, loop: asyncio.AbstractEventLoop, at: float | None) -> None:
        self._read_waiter = loop.create_future()
        timer = None if at is None else loop.call_at(at, self._wake, "_read_waiter")
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None
            if timer is not None:
                timer.cancel()

    def close_reader(self) -> None:
        self.reader_closed = True
        self._drop()

    # --- writer side -------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        if self._write_waiter is not None:
            raise LocalProtocolError("another task is already writing to this stream")
        # wait until the buffer is below the limit, queue the bytes whole (as TCP does), then
        # wait until no more than a limit's worth of them is left above it (a write of up to
        # the limit never waits there). Cancelled, a write sent all of its bytes or none,
        # never a part (that would break a record stream)
        limit = self._network.buffer_limit
        while self.buffered >= limit and not self._failed():
            await self._wait_writable()
        if not self._failed() and data:
            self._append(data)
        while self.buffered - min(len(data), limit) >= limit and not self._failed():
            await self._wait_writable()
        if self._failed():
            raise StreamClosed("stream closed while writing")

    def _append(self, piece: bytes) -> None:
        deliver_at = asyncio.get_running_loop().time() + self._network.latency
        self._chunks.append((deliver_at, piece))
        self.buffered += len(piece)
        self._wake("_read_waiter")

    def _failed(self) -> bool:
        return self.writer_closed or self.reader_closed or self.broken

    async def _wait_writable(self) -> None:
        self._write_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._write_waiter
        finally:
            self._write_waiter = None

    def close_writer(self) -> None:
        if self.writer_closed:
            return
        self.writer_closed = True
        self._eof_at = asyncio.get_running_loop().time() + self._network.latency
        self._wake("_read_waiter")
        self._wake("_write_waiter")

    # --- both --------------------------------------------------------------------------------

    def sever(self) -> None:
        self.broken = True
        self._drop()

    def _drop(self) -> None:
        self._chunks.clear()
        self._head = 0
        self.buffered = 0
        self._wake("_read_waiter")
        self._wake("_write_waiter")

    def _wake(self, which: str) -> None:
        waiter = getattr(self, which)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class MemoryStream:
    """One end of an in-memory stream (a :class:`~meshinfer.transport.base.Stream`).

    ``read`` returns ``b""`` at EOF, after a local close, and once the link is severed;
    ``write`` raises :class:`StreamClosed` after either side closed or the link was severed.
    """

    def __init__(
        self,
        network: MemoryNetwork,
        link: LinkKind,
        local: Address,
        remote: Address,
        inbound: _Pipe,
        outbound: _Pipe,
    ) -> None:
        self.link = link
        self.local_address = local
        self.remote_address = remote
        self._network = network
        self._inbound = inbound
        self._outbound = outbound
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemoryStream {self.local_address} -> {self.remote_address}>"

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return up to ``max_bytes`` bytes; ``b""`` at EOF, after close, or once severed."""
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        return await self._inbound.read(max_bytes)

    async def write(self, data: bytes) -> None:
        """Send ``data``, waiting while the peer's buffer is full; raises :class:`StreamClosed`."""
        if self._closed:
            raise StreamClosed(f"{self!r} is closed")
        # a copy (the caller may reuse its buffer); memoryview: bytes(3) would be three NULs
        await self._outbound.write(data if type(data) is bytes else bytes(memoryview(data)))

    async def aclose(self) -> None:
        """Close both directions (idempotent): the peer reads what was sent, then ``b""``."""
        if self._closed:
            return
        self._closed = True
        self._inbound.close_reader()
        self._outbound.close_writer()
        self._network._forget(self)

    def abort(self) -> None:
        """Close at once, dropping buffered bytes both ways (as a TCP reset would). After
        :meth:`aclose` this does nothing: the bytes that close let go are on the wire, and the
        peer reads them then ``b""``, as over TCP."""
        if self._closed:
            return
        self._closed = True
        self.sever()
        self._network._forget(self)

    def sever(self) -> None:
        """Break both directions at once, dropping buffered bytes (a lost radio link)."""
        self._inbound.sever()
        self._outbound.sever()


class MemoryListener:
    """Accepts in-memory streams on one address and runs a handler task for each."""

    def __init__(
        self, network: MemoryNetwork, address: Address, link: LinkKind, tasks: HandlerTasks
    ) -> None:
        self.address = address
        self.link = link
        self._network = network
        self._tasks = tasks
        self._closed = False

    @property
    def handler_count(self) -> int:
        """How many handler tasks are running now."""
        return len(self._tasks)

    def accept(self, stream: MemoryStream) -> None:
        """Run the handler for a newly dialled stream (called by the network)."""
        self._tasks.spawn(stream)

    async def aclose(self, *, cancel_handlers: bool = False) -> None:
        """Stop accepting (idempotent); see :class:`~meshinfer.transport.tcp.TcpListener`."""
        if not self._closed:
            self._closed = True
            self._network._unbind(self)
        if cancel_handlers:
            await self._tasks.cancel_all()

    async def __aenter__(self) -> MemoryListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose(cancel_handlers=True)


class MemoryNetwork:
    """The shared medium: bound listeners, live streams and fault settings.

    ``latency`` is the one-way delay in seconds (may be changed at any time; applies to bytes
    written afterwards); ``buffer_limit`` is how many bytes each stream direction holds before
    writers wait.
    """

    def __init__(self, *, latency: float = 0.0, buffer_limit: int = DEFAULT_BUFFER_LIMIT) -> None:
        if latency < 0 or buffer_limit < 1:
            raise ValueError("latency must be >= 0 and buffer_limit >= 1")
        self.latency = latency
        self.buffer_limit = buffer_limit
        self._listeners: dict[Address, MemoryListener] = {}
        self._streams: set[MemoryStream] = set()
        self._ports = itertools.count(FIRST_PORT)
        self._hosts = itertools.count(1)

    @property
    def stream_count(self) -> int:
        """How many stream ends are open (not yet closed by their owner)."""
        return len(self._streams)

    def sever(self, host: str) -> int:
        """Break every open stream with an end on ``host``; returns how many ends broke."""
        hit = [s for s in self._streams if host in (s.local_address.host, s.remote_address.host)]
        for stream in hit:
            stream.sever()
        return len(hit)

    def new_host_name(self) -> str:
        """A host name no transport on this network has been given yet."""
        return f"host-{next(self._hosts)}"

    def listener_at(self, address: Address) -> MemoryListener:
        """The listener bound to ``address``; raises :class:`TransportError` if none."""
        listener = self._listeners.get(address)
        if listener is None:
            raise TransportError(f"dial {address}: connection refused")
        return listener

    def connect(
        self, link: LinkKind, local_host: str, listener: MemoryListener
    ) -> tuple[MemoryStream, MemoryStream]:
        """Create a connected (dialler end, listener end) pair of streams. Each end carries
        the link kind of its own transport."""
        local = Address(local_host, self._free_port(local_host))
        there, back = _Pipe(self), _Pipe(self)
        client = MemoryStream(self, link, local, listener.address, inbound=back, outbound=there)
        server = MemoryStream(
            self, listener.link, listener.address, local, inbound=there, outbound=back
        )
        self._streams.update((client, server))
        return client, server

    def bind(self, address: Address, link: LinkKind, tasks: HandlerTasks) -> MemoryListener:
        """Register a listener on ``address`` (port 0 picks a free port)."""
        if not address.host:
            raise TransportError("listen: a memory address needs a host name")
        if address.port == 0:
            address = Address(address.host, self._free_port(address.host))
        if address in self._listeners:
            raise TransportError(f"listen {address}: address already in use")
        listener = MemoryListener(self, address, link, tasks)
        self._listeners[address] = listener
        return listener

    def _free_port(self, host: str) -> int:
        while True:
            port = next(self._ports)
            if Address(host, port) not in self._listeners:
                return port

    def _unbind(self, listener: MemoryListener) -> None:
        if self._listeners.get(listener.address) is listener:
            del self._listeners[listener.address]

    def _forget(self, stream: MemoryStream) -> None:
        self._streams.discard(stream)


class MemoryTransport:
    """Dial and listen on a :class:`MemoryNetwork`. ``host`` names this transport's end of the
    streams it dials (a fresh name when omitted); ``listen`` accepts any host name."""

    def __init__(
        self, network: MemoryNetwork, link: LinkKind = LinkKind.V2V, *, host: str | None = None
    ) -> None:
        self.network = network
        self.link = link
        self.host = host or network.new_host_name()

    def __repr__(self) -> str:
        return f"<MemoryTransport {self.host} {self.link.value}>"

    async def dial(self, address: Address, *, timeout: float | None = None) -> MemoryStream:
        """Connect to the listener on ``address`` after one round trip of latency.

        Raises :class:`TransportError` if nothing listens there or ``timeout`` passes first.
        """
        try:
            async with asyncio.timeout(timeout):
                if self.network.latency:
                    await asyncio.sleep(2 * self.network.latency)
                listener = self.network.listener_at(address)
        except TimeoutError as exc:
            raise TransportError(f"dial {address}: timed out after {timeout}s") from exc
        client, server = self.network.connect(self.link, self.host, listener)
        listener.accept(server)
        return client

    async def listen(self, address: Address, handler: StreamHandler) -> MemoryListener:
        """Accept streams on ``address`` (port 0 picks one) and run ``handler`` for each."""
        tasks = HandlerTasks(handler, f"memory listener {address}")
        return self.network.bind(address, self.link, tasks)
