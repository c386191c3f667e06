"""Real TCP streams on asyncio (the default loop or uvloop).

:class:`TcpStream` is an :class:`asyncio.Protocol` that is also the :class:`~.base.Stream` the
rest of meshinfer reads and writes: received chunks go into a deque (handed out without copying
when one fits the read), one waiter future wakes a pending ``read``, and ``pause_writing`` /
``resume_writing`` gate ``write`` (backpressure). Reading is flow-controlled too: above
``read_buffer`` buffered bytes the socket stops being read until the application catches up.
Each buffered chunk counts ``_CHUNK_COST`` bytes beyond its length (what a ``bytes`` object and
its deque slot take), so a peer that sends one byte per segment cannot make a stream hold some
fifty times ``read_buffer`` in chunk objects.

Stream lifecycle (``read`` never raises for a closed or broken stream; ``write`` raises
:class:`~meshinfer.errors.StreamClosed`)::

    open ──peer FIN──▶ peer-eof (reads drain the buffer, then b""; writes still go out)
    open / peer-eof ──aclose()──▶ closed   (reads b"", writes raise; graceful FIN after the
                                            write buffer flushes, abort after close_timeout)
    any ──reset / socket error──▶ lost     (reads drain the buffer, then b""; writes raise)

Dial failures and dial timeouts raise plain :class:`~meshinfer.errors.TransportError` whose
message names the address (``dial 10.0.0.7:7946: timed out after 3s``).

Listeners accept with a configurable ``backlog`` in their own accept loop. Accept errors such as
EMFILE are logged and accepting backs off briefly, then resumes; no error ends the listener.
Handler task ownership is described in :mod:`meshinfer.transport._handlers`.

No SO_KEEPALIVE: a session pings an idle peer itself (``SessionConfig``), far sooner than the
kernel's two-hour keepalive would.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections import deque
from typing import Any

from meshinfer.errors import LocalProtocolError, StreamClosed, TransportError, log_stopped
from meshinfer.transport._handlers import HandlerTasks
from meshinfer.transport.base import Address, LinkKind, StreamHandler

DEFAULT_READ_BUFFER = 256 * 1024
DEFAULT_BACKLOG = 1024
DEFAULT_CLOSE_TIMEOUT = 5.0

_MIN_ACCEPT_BACKOFF = 0.01
_MAX_ACCEPT_BACKOFF = 1.0
# accept() errors that concern one connection only: skip it and accept the next at once
_SKIPPABLE_ACCEPT_ERRORS = frozenset(
    (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN, errno.EINTR)
)

log = logging.getLogger("meshinfer.transport")

_UNKNOWN = Address("", 0)
# what one received chunk costs beyond its bytes (object header, allocator rounding, deque slot)
_CHUNK_COST = 64
_LINGER_ZERO = struct.pack("ii", 1, 0)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _address(sockaddr: Any) -> Address:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return Address(str(sockaddr[0]), int(sockaddr[1]))
    return _UNKNOWN


def _check_address(action: str, address: Address) -> None:
    port = address.port
    if type(port) is not int or not 0 <= port <= 65535:
        raise TransportError(f"{action} {address.host!r} port {port!r}: not a port (0..65535)")


def _bad_host(action: str, address: Address, exc: ValueError) -> TransportError:
    # repr: the host may hold control characters that a log line must not carry raw
    return TransportError(f"{action} {address.host!r} port {address.port}: bad host name ({exc})")


class TcpStream(asyncio.Protocol):
    """One TCP connection as a :class:`~meshinfer.transport.base.Stream`.

    ``read``/``write``/``aclose`` run on the loop. The ``connection_*``, ``data_received``,
    ``eof_received`` and ``*_writing`` methods are asyncio's protocol callbacks, not API.
    """

    def __init__(
        self,
        link: LinkKind,
        *,
        nodelay: bool = True,
        read_buffer: int = DEFAULT_READ_BUFFER,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        on_connect: Any = None,
    ) -> None:
        self.link = link
        self.local_address = _UNKNOWN
        self.remote_address = _UNKNOWN
        self._nodelay = nodelay
        self._read_limit = read_buffer
        self._close_timeout = close_timeout
        self._on_connect = on_connect
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._chunks: deque[bytes] = deque()
        self._head = 0  # bytes of _chunks[0] already handed out
        self._buffered = 0
        self._reading_paused = False
        self._writing_paused = False
        self._eof = False  # no more bytes will arrive
        self._closed = False  # aclose() was called
        self._lost = False  # the socket is gone (closed or broken)
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._lost_waiter: asyncio.Future[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None  # aclose's abort after a flush

    def __repr__(self) -> str:
        return f"<TcpStream {self.local_address} -> {self.remote_address}>"

    # --- Stream API ------------------------------------------------------------------------

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return up to ``max_bytes`` received bytes; ``b""`` at EOF, after a reset or a close."""
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        if self._read_waiter is not None:
            raise LocalProtocolError("another task is already reading from this stream")
        if not self._chunks:
            if self._eof or self._closed:
                return b""
            await self._wait_readable()
        if self._closed or not self._chunks:
            return b""
        return self._take(max_bytes)

    async def write(self, data: bytes) -> None:
        """Queue ``data`` on the socket and wait while the send buffer is above its high mark.

        A write that finds the buffer above the mark (one before it was cancelled while it
        waited) waits first and queues nothing until the peer takes bytes, so cancelled writes
        cannot pile up bytes for a peer that never reads; cancelled while it waits there, it
        has sent nothing. Raises :class:`StreamClosed` if this stream was closed or the
        connection is lost. A ``bytearray`` or ``memoryview`` is copied: the socket may still
        hold the bytes when this returns (uvloop and Python 3.12+ keep the caller's object),
        and the caller may reuse or resize its buffer at once.
        """
        if self._closed or self._lost:
            raise StreamClosed(f"{self!r} is closed")
        if self._drain_waiter is not None:
            raise LocalProtocolError("another task is already writing to this stream")
        if self._writing_paused:
            await self._drain()
        if type(data) is not bytes:
            data = bytes(memoryview(data))  # memoryview: bytes(3) would be three NULs
        self._transport.write(data)  # type: ignore[union-attr]
        if self._writing_paused:
            await self._drain()

    async def aclose(self) -> None:
        """Close the connection; idempotent, safe from any task, never raises.

        Already-queued bytes are flushed before the FIN; if the peer does not take them within
        ``close_timeout`` seconds the connection is aborted with a reset. A pending ``read``
        returns ``b""`` and a pending ``write`` raises :class:`StreamClosed`.
        """
        if self._closed:
            return
        self._closed = True
        self._chunks.clear()
        self._wake_all()
        transport = self._transport
        if transport is None or self._lost:
            return
        transport.close()
        if transport.get_write_buffer_size():
            # cancelled once the connection is lost (it would keep this stream alive for
            # close_timeout seconds after the flush)
            self._close_timer = self._loop.call_later(  # type: ignore[union-attr]
                self._close_timeout, self._abort
            )
            return
        await asyncio.shield(self._lost_waiter)  # type: ignore[arg-type]

    def abort(self) -> None:
        """Drop the connection at once with a reset, discarding what is queued: for a peer
        given up on, whose late delivery of old bytes would do more harm than good.
        Idempotent, never raises; pending reads and writes end as after :meth:`aclose`."""
        if self._closed and (self._lost or self._transport is None):
            return
        self._closed = True
        self._chunks.clear()
        self._wake_all()
        self._abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """asyncio's transport information (``"socket"``, ``"peername"``, ``"sockname"``...)."""
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)

    # --- protocol callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        self._lost_waiter = self._loop.create_future()
        self.local_address = _address(transport.get_extra_info("sockname"))
        self.remote_address = _address(transport.get_extra_info("peername"))
        self._set_nodelay(transport.get_extra_info("socket"))
        if self._on_connect is not None:
            self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._held() > self._read_limit and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()  # type: ignore[union-attr]
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_all()
        return True  # keep our sending side open until aclose()

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._wake_all()
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- internals -------------------------------------------------------------------------

    def _take(self, max_bytes: int) -> bytes:
        """Hand out whole received chunks (no copy for one), joining small ones up to
        ``max_bytes``; split a chunk only when it alone is larger than ``max_bytes``."""
        chunks, start = self._chunks, self._head
        first = chunks[0]
        if len(first) - start > max_bytes:
            data = first[start : start + max_bytes]
            self._head = start + max_bytes
        else:
            data = first[start:] if start else first
            chunks.popleft()
            self._head = 0
            if chunks and len(data) + len(chunks[0]) <= max_bytes:
                data = self._join_small(data, max_bytes)
        self._buffered -= len(data)
        if self._reading_paused and self._held() <= self._read_limit // 2:
            self._reading_paused = False
            if not self._lost:
                self._transport.resume_reading()  # type: ignore[union-attr]
        return data

    def _held(self) -> int:
        """Memory the received chunks hold: their bytes plus a cost per chunk."""
        return self._buffered + _CHUNK_COST * len(self._chunks)

    def _join_small(self, data: bytes, max_bytes: int) -> bytes:
        chunks, parts, size = self._chunks, [data], len(data)
        while chunks and size + len(chunks[0]) <= max_bytes:
            chunk = chunks.popleft()
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    async def _wait_readable(self) -> None:
        self._read_waiter = self._loop.create_future()  # type: ignore[union-attr]
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None

    async def _drain(self) -> None:
        """Wait until the send buffer is below its high mark. The peer's FIN also wakes the
        waiter, but a half-closed peer may still read: only ``resume_writing``, a close or a
        lost connection end the wait."""
        while self._writing_paused and not (self._closed or self._lost):
            self._drain_waiter = self._loop.create_future()  # type: ignore[union-attr]
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._closed or self._lost:
            raise StreamClosed(f"{self!r} closed while writing")

    def _wake_all(self) -> None:
        for waiter in (self._read_waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _abort(self) -> None:
        """Drop the connection with a reset: the kernel discards what it still holds too."""
        if self._lost or self._transport is None:
            return
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            except OSError:
                pass
        self._transport.abort()

    def _set_nodelay(self, sock: Any) -> None:
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self._nodelay))
        except OSError:
            pass  # the peer already reset the connection; reads and writes will say so


class TcpListener:
    """A listening TCP socket that runs a handler task per accepted :class:`TcpStream`.

    Accepting happens in one task the listener owns, a non-blocking ``accept()`` when the
    socket is readable (so cancelling it never loses a connection accepted just then): on a
    resource error (EMFILE, ENFILE, ENOBUFS, ENOMEM) it logs a warning and backs off (10 ms
    doubling to 1 s) while the connections waiting in the kernel queue stay there;
    per-connection errors (a client that reset before it was accepted) are skipped; any other
    exception (our bug) is logged at ERROR and backs off the same way. Nothing a client does
    ends it, and should it ever end other than by ``aclose`` that is logged at ERROR.
    (asyncio's own ``create_server`` is not used: on Python 3.11 it reschedules its accept
    retry once per backlog slot after EMFILE and can starve the loop, CPython gh-151615.)
    """

    def __init__(
        self, sock: socket.socket, address: Address, tasks: HandlerTasks, new_stream: Any
    ) -> None:
        self.address = address
        self._sock = sock
        self._tasks = tasks
        self._new_stream = new_stream
        self._closed = False
        self._accepting = asyncio.get_running_loop().create_task(
            self._accept_loop(), name=f"tcp listener {address} accept loop"
        )
        self._accepting.add_done_callback(
            log_stopped(log, f"{self}: accepting", lambda: "no new connections are accepted")
        )

    @property
    def handler_count(self) -> int:
        """How many handler tasks are running now."""
        return len(self._tasks)

    async def aclose(self, *, cancel_handlers: bool = False) -> None:
        """Stop accepting (idempotent). Established streams and their handlers keep running
        unless ``cancel_handlers`` is true: then every handler task is cancelled, its stream
        closed, and this waits for them to end."""
        if not self._closed:
            self._closed = True
            self._accepting.cancel()
            try:
                await asyncio.gather(self._accepting, return_exceptions=True)
            finally:  # cancelled here, a later aclose() does not come back to close it
                if self._accepting.done():
                    self._sock.close()
                else:  # once the accept loop has removed its reader from the socket's fd
                    self._accepting.add_done_callback(lambda _: self._sock.close())
        if cancel_handlers:
            await self._tasks.cancel_all()

    async def __aenter__(self) -> TcpListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose(cancel_handlers=True)

    async def _accept_loop(self) -> None:
        backoff = _MIN_ACCEPT_BACKOFF
        while True:
            try:
                conn = await self._accept()
            except OSError as exc:
                if exc.errno in _SKIPPABLE_ACCEPT_ERRORS:
                    continue
                log.warning("%s: accept failed (%s); retrying in %.2fs", self, exc, backoff)
            except Exception:  # our bug: said loudly, but the listener goes on accepting
                log.exception("%s: accept failed; retrying in %.2fs", self, backoff)
            else:
                backoff = _MIN_ACCEPT_BACKOFF
                await self._connect(conn)
                continue
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, _MAX_ACCEPT_BACKOFF)

    async def _accept(self) -> socket.socket:
        """The next connection, accepted without a cancellation point between ``accept()``
        and the return: cancelled, this has accepted nothing (``loop.sock_accept`` can lose
        a connection it accepted just as it is cancelled, an open socket nobody closes)."""
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            conn.setblocking(False)
            return conn

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self._sock.fileno()
        loop.add_reader(fd, _set_done, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)

    async def _connect(self, conn: socket.socket) -> None:
        """Hand ``conn`` to a new stream (cancelled meanwhile, asyncio closes its transport)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(self._new_stream, conn)
        except Exception as exc:  # a broken connection must never end the accept loop
            log.debug("%s: dropped a connection while setting it up: %s", self, exc)
            conn.close()

    def __repr__(self) -> str:
        return f"<TcpListener {self.address}>"


class TcpTransport:
    """Dial and listen over TCP. ``link`` tags every stream (WAN for wired/cellular/loopback).

    ``nodelay`` sets TCP_NODELAY; ``read_buffer`` is how many received bytes a stream buffers
    before it stops reading the socket; ``backlog`` is the listen queue length;
    ``close_timeout`` bounds how long a closed stream may keep flushing to a stalled peer.
    """

    def __init__(
        self,
        link: LinkKind = LinkKind.WAN,
        *,
        nodelay: bool = True,
        read_buffer: int = DEFAULT_READ_BUFFER,
        backlog: int = DEFAULT_BACKLOG,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        if read_buffer < 1:
            raise ValueError(f"read_buffer must be at least 1, not {read_buffer}")
        self.link = link
        self.nodelay = nodelay
        self.read_buffer = read_buffer
        self.backlog = backlog
        self.close_timeout = close_timeout

    def __repr__(self) -> str:
        return f"<TcpTransport {self.link.value}>"

    async def dial(self, address: Address, *, timeout: float | None = None) -> TcpStream:
        """Connect to ``address``; raises :class:`TransportError` on refusal, error or timeout,
        and for an address no socket can take (a port outside 0..65535, a host name the
        resolver refuses: a NUL byte, a label over 63 characters), as gossip may bring."""
        _check_address("dial", address)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, stream = await loop.create_connection(
                    self._new_stream, address.host, address.port
                )
        except TimeoutError as exc:
            raise TransportError(f"dial {address}: timed out after {timeout}s") from exc
        except OSError as exc:
            raise TransportError(f"dial {address}: {exc.strerror or exc}") from exc
        except ValueError as exc:  # UnicodeError (IDNA) or an embedded NUL, from the resolver
            raise _bad_host("dial", address, exc) from exc
        return stream

    async def listen(self, address: Address, handler: StreamHandler) -> TcpListener:
        """Bind ``address`` (port 0 picks a free port) and run ``handler`` for each connection.

        ``TcpListener.address`` is the bound address. A host name that resolves to several
        addresses is bound on the first only. Raises :class:`TransportError` when it cannot
        bind, and for a port outside 0..65535 (the resolver would wrap 70000 to 4464).
        """
        _check_address("listen", address)
        tasks = HandlerTasks(handler, f"tcp listener {address}")
        try:
            sock = await self._bind(address)
        except OSError as exc:
            raise TransportError(f"listen {address}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise _bad_host("listen", address, exc) from exc
        bound = _address(sock.getsockname())
        return TcpListener(sock, bound, tasks, lambda: self._new_stream(on_connect=tasks.spawn))

    async def _bind(self, address: Address) -> socket.socket:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _new_stream(self, on_connect: Any = None) -> TcpStream:
        return TcpStream(
            self.link,
            nodelay=self.nodelay,
            read_buffer=self.read_buffer,
            close_timeout=self.close_timeout,
            on_connect=on_connect,
        )
