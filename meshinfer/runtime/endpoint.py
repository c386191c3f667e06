"""A node's session endpoint: a listener that survives hostile clients, and a dialler.

The listener runs the responder handshake for every accepted stream, under three bounds:

* ``max_handshakes`` handshakes in progress at once (the rest are closed at once and counted),
  so a burst of a thousand connection attempts cannot exhaust memory or starve good peers;
* ``max_pending_per_host`` handshakes from one remote host, so one misbehaving host cannot take
  every handshake slot with half-finished handshakes or a byte-per-second trickle;
* ``max_sessions_per_peer`` established sessions per authenticated node id.

Every handshake runs under the session's ``handshake_timeout``. Refusals are counted by reason in
:class:`~meshinfer.runtime.session.SessionMetrics`. Good peers keep being served meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from meshinfer.closing import OneClose
from meshinfer.errors import MeshInferError
from meshinfer.proto.messages import CloseCode
from meshinfer.runtime.session import (
    Admission,
    Session,
    SessionConfig,
    SessionMetrics,
    accept,
    connect,
)
from meshinfer.transport.base import Address, Listener, Stream, Transport

log = logging.getLogger(__name__)

SessionHandler = Callable[[Session], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """Bounds that keep a listener serving under abuse (see the module docstring)."""

    max_handshakes: int = 64
    max_pending_per_host: int = 8
    max_sessions_per_peer: int = 4
    #: Seconds ``SessionListener.aclose`` gives handlers whose session it closed to return
    #: before it cancels them.
    handler_grace_s: float = 1.0


class SessionListener:
    """Accepts streams, runs the responder handshake and hands each session to ``handler``.

    The session is closed when ``handler`` returns. ``start`` and ``aclose`` run on the loop;
    ``aclose`` closes the listener, then every session it accepted, then waits for the handler
    tasks: a handler whose session was closed has ``limits.handler_grace_s`` to return, then
    it is cancelled, as is a handshake still in progress. Nothing it started outlives ``aclose``,
    which is idempotent: every call, also one after a call that was cancelled, waits until the
    one close has ended (it goes on when a caller is cancelled). A handshake that ends during
    the close gets its session closed at once (``GOING_AWAY``), never handed to ``handler``.
    """

    def __init__(
        self,
        transport: Transport,
        admission: Admission,
        handler: SessionHandler,
        *,
        config: SessionConfig | None = None,
        limits: ListenerLimits | None = None,
        metrics: SessionMetrics | None = None,
    ) -> None:
        self.transport = transport
        self.admission = admission
        self.handler = handler
        self.config = config or SessionConfig()
        self.limits = limits or ListenerLimits()
        self.metrics = metrics or SessionMetrics()
        self.sessions: set[Session] = set()
        self._listener: Listener | None = None
        self._handshaking = 0
        self._pending_by_host: Counter[str] = Counter()
        self._by_peer: Counter[str] = Counter()
        self._handlers: set[asyncio.Task[None]] = set()
        self._closed = False
        self._started = False
        self._closing = OneClose()

    @property
    def address(self) -> Address:
        if self._listener is None:
            raise RuntimeError("listener not started")
        return self._listener.address

    async def start(self, address: Address) -> Address:
        """Bind and start accepting; returns the bound address (port 0 picks one). Once only:
        RuntimeError when started before, or closed before it listens (a socket bound then
        would never be closed)."""
        if self._closed or self._started:
            what = "closed" if self._closed else "already started"
            raise RuntimeError(f"session listener {what}: it cannot start again")
        self._started = True
        listener = await self.transport.listen(address, self._on_stream)
        if self._closed:  # aclose ran during the bind and found nothing to close
            await listener.aclose()  # (a stream it accepted meanwhile is refused)
            raise RuntimeError("session listener closed during its start")
        self._listener = listener
        return listener.address

    async def aclose(self) -> None:
        self._closed = True  # (no more handshakes are started from now on)
        caller = asyncio.current_task()  # (a handler that closes the listener: not waited for)
        if caller in self._handlers and self._closing.started:
            return  # the close under way waits for the handlers: not for itself
        await self._closing.run(lambda: self._close(caller), name="session-listener-close")

    async def _close(self, caller: asyncio.Task[object] | None) -> None:
        if self._listener is not None:
            await self._listener.aclose()
        await asyncio.gather(
            *(s.aclose(CloseCode.GOING_AWAY, "node shutting down") for s in list(self.sessions)),
            return_exceptions=True,
        )
        await self._end_handlers(caller)

    async def _end_handlers(self, caller: asyncio.Task[object] | None) -> None:
        handlers = self._handlers - {caller}
        if not handlers:
            return
        _, late = await asyncio.wait(handlers, timeout=self.limits.handler_grace_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def __aenter__(self) -> SessionListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _on_stream(self, stream: Stream) -> None:
        task = asyncio.current_task()
        assert task is not None  # the transport runs each handler in its own task
        self._handlers.add(task)
        try:
            await self._handle_stream(stream)
        finally:
            self._handlers.discard(task)

    async def _handle_stream(self, stream: Stream) -> None:
        host = stream.remote_address.host
        refusal = self._admit_handshake(host)
        if refusal:
            self.metrics.refuse(refusal)
            await stream.aclose()
            return
        self._handshaking += 1
        self._pending_by_host[host] += 1
        try:
            session = await accept(stream, self.admission, config=self.config, metrics=self.metrics)
        except (MeshInferError, OSError, TimeoutError):
            return  # counted and logged by the session layer; the stream is closed
        finally:
            self._handshaking -= 1
            self._pending_by_host[host] -= 1
            if self._pending_by_host[host] <= 0:
                del self._pending_by_host[host]
        await self._serve(session)

    def _admit_handshake(self, host: str) -> str | None:
        if self._closed:
            return "shutting-down"
        if self._handshaking >= self.limits.max_handshakes:
            return "busy"
        if self._pending_by_host[host] >= self.limits.max_pending_per_host:
            return "host-limit"
        return None

    async def _serve(self, session: Session) -> None:
        peer = session.peer_id
        if self._closed:  # a handshake that ended during the close: not served
            self.metrics.refuse("shutting-down")
            await session.aclose(CloseCode.GOING_AWAY, "node shutting down")
            return
        if self._by_peer[peer] >= self.limits.max_sessions_per_peer:
            self.metrics.refuse("peer-limit")
            await session.aclose(CloseCode.OVERLOADED, "too many sessions from this peer")
            return
        self._by_peer[peer] += 1
        self.sessions.add(session)
        try:
            await self.handler(session)
        except Exception:
            log.exception("session handler for %s failed", peer)
        finally:
            self.sessions.discard(session)
            self._by_peer[peer] -= 1
            if self._by_peer[peer] <= 0:
                del self._by_peer[peer]
            with contextlib.suppress(Exception):
                await session.aclose()


async def dial(
    transport: Transport,
    address: Address,
    admission: Admission,
    *,
    config: SessionConfig | None = None,
    metrics: SessionMetrics | None = None,
    expected_static: bytes | None = None,
    expected_node_id: str | None = None,
    timeout: float | None = None,
) -> Session:
    """Dial ``address`` and run the initiator handshake (IK when ``expected_static`` is given).
    ``timeout`` (default: the config's ``handshake_timeout``) bounds the TCP connect, and the
    handshake has ``handshake_timeout`` after it: a listener that accepts and then stalls costs
    at most the two together (:class:`~meshinfer.errors.SessionTimeout`)."""
    config = config or SessionConfig()
    stream = await transport.dial(address, timeout=timeout or config.handshake_timeout)
    return await connect(
        stream,
        admission,
        config=config,
        metrics=metrics,
        expected_static=expected_static,
        expected_node_id=expected_node_id,
    )
