"""The one narrow Transport interface every link implementation provides.

A transport dials and listens; a connection is a reliable, ordered byte :class:`Stream`.
Implementations: :mod:`meshinfer.transport.tcp` (real sockets), :mod:`meshinfer.transport.memory`
(in-process, for unit tests and the simulator). ``tests/test_transport_conformance.py`` runs the
same suite against each.

Concurrency rules: one task may ``read`` while another ``write``s; two concurrent readers (or two
concurrent writers) on one stream are not allowed. ``aclose`` may be called from any task, any
number of times.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class LinkKind(enum.Enum):
    """What kind of link a stream runs over; schedulers and routing look at this."""

    V2V = "v2v"  # vehicle to vehicle: short-lived, lossy radio
    V2I = "v2i"  # vehicle to infrastructure (roadside unit) with backhaul
    WAN = "wan"  # wired/cellular wide area, or loopback in tests


@dataclass(frozen=True, slots=True)
class Address:
    """Where a listener is reachable: ``host``/``port`` for TCP, ``host`` as a name in memory."""

    host: str
    port: int = 0

    def __str__(self) -> str:
        """``host:port``; an IPv6 host in brackets (``[::1]:7946``), as config and seeds take it.
        A host with a character that is not printable is shown escaped, as ``repr`` writes it:
        a gossiped address is a peer's string, and logs and error messages name it."""
        host = self.host
        if not host.isprintable():
            return f"{host!r}:{self.port}"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


@runtime_checkable
class Stream(Protocol):
    """A reliable, ordered, bidirectional byte stream."""

    link: LinkKind
    local_address: Address
    remote_address: Address

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return up to ``max_bytes`` bytes; ``b""`` once the peer has closed its side."""
        ...

    async def write(self, data: bytes) -> None:
        """Send all of ``data``, waiting while the peer's buffers are full (backpressure)."""
        ...

    async def aclose(self) -> None:
        """Close both directions. Idempotent."""
        ...

    def abort(self) -> None:
        """Close at once, dropping what is still queued (a TCP reset): a blocked ``write``
        fails, a pending ``read`` ends. Idempotent. Sessions use it to give up on a silent
        peer (:meth:`~meshinfer.runtime.session.Session.abandon`)."""
        ...


@runtime_checkable
class Listener(Protocol):
    address: Address

    async def aclose(self) -> None:
        """Stop accepting; established streams stay open. Idempotent."""
        ...


StreamHandler = Callable[[Stream], Awaitable[None]]


@runtime_checkable
class Transport(Protocol):
    link: LinkKind

    async def dial(self, address: Address, *, timeout: float | None = None) -> Stream:
        """Open a stream to ``address``; raises :class:`~meshinfer.errors.TransportError`."""
        ...

    async def listen(self, address: Address, handler: StreamHandler) -> Listener:
        """Accept streams on ``address`` (port 0 picks one) and run ``handler`` for each.

        The handler runs in its own task owned by the listener; an exception in it closes that
        stream only and is logged. ``Listener.address`` is the bound address.
        """
        ...
