"""A session ends once its peer's certificate expires beyond the clock skew.

The handshake judged the certificate valid; a session that outlives it (a vehicle parked beside
a roadside unit for hours) must not go on carrying work for an identity no handshake would
admit now. Real sessions over the in-memory transport and TCP on loopback (``Pair`` of
tests/test_session.py); the wall clock is the admission's, so it can be injected.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from meshinfer.errors import HandshakeError, StreamClosed
from meshinfer.proto.identity import DEFAULT_CLOCK_SKEW_S
from meshinfer.proto.messages import AppData, CloseCode
from meshinfer.runtime.endpoint import SessionListener, dial
from meshinfer.runtime.session import Admission
from meshinfer.testing.fleet import DAY, make_fleet
from tests.helpers import until
from tests.test_session import Pair


class FrozenClock:
    """A wall clock that moves only when told, counting its reads."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


async def test_session_ends_when_peer_certificate_expires(transport_and_addr):
    """alpha's certificate expires (beyond the default skew) half a second after it dials:
    bravo ends the session as lost, with a CERTIFICATE_EXPIRED Close naming the expiry, and
    alpha hears why; a new dial by alpha is refused, as the handshake would have."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    now = time.time()
    fleet.enroll("alpha", now=now - DAY, lifetime_s=DAY - DEFAULT_CLOCK_SKEW_S + 0.5)
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        await client.send(AppData(topic="up", payload=b"before"))
        assert (await server.recv()).payload == b"before"
        await until(lambda: not server.is_open, timeout=5.0)
        assert server.lost  # what alpha sent meanwhile is dropped unread
        assert server.close_code == CloseCode.CERTIFICATE_EXPIRED
        assert "certificate of alpha" in server.close_reason
        assert "expired at" in server.close_reason and "UTC" in server.close_reason
        with pytest.raises(StreamClosed, match="expired at"):
            await server.recv()
        await until(lambda: not client.is_open, timeout=5.0)
        assert client.close_code == CloseCode.CERTIFICATE_EXPIRED
        assert client.lost  # the receiver of that Close ends it as lost too
        assert "expired at" in client.close_reason
        with pytest.raises(StreamClosed):
            await client.send(AppData(topic="up", payload=b"after"))
        with contextlib.suppress(StreamClosed, HandshakeError):
            again = await pair.dial()  # XX: the initiator finishes first, then hears the verdict
            await again.wait_closed()
        await until(lambda: pair.metrics.handshake_failures["expired"] == 1)


async def test_early_wakeup_sleeps_again_by_the_wall_clock(transport_and_addr):
    """The loop timer is wall-clock seconds turned into loop time: when it fires and the wall
    clock says the certificate is still valid (clocks drift), the session stays open and waits
    again; once the wall clock passes not_after + clock_skew, it ends."""
    transport, addr = transport_and_addr
    fleet = make_fleet(None, ["alpha", "bravo"])
    not_after = fleet.identities["alpha"].certificate.not_after
    clock = FrozenClock(not_after + DEFAULT_CLOCK_SKEW_S - 0.2)
    admission = Admission(fleet.identities["bravo"], fleet.revocations, wallclock=clock)
    accepted = []

    async def handler(session):
        accepted.append(session)
        await session.wait_closed()

    async with SessionListener(transport, admission, handler) as listener:
        bound = await listener.start(addr)
        async with await dial(transport, bound, fleet.admission("alpha")) as client:
            await until(lambda: accepted)
            server = accepted[0]
            # the handshake's read, the keep-alive task's first, and one wake-up at least
            await until(lambda: clock.reads >= 3, timeout=5.0)
            assert server.is_open and client.is_open
            clock.now = not_after + DEFAULT_CLOCK_SKEW_S + 0.01
            await until(lambda: not server.is_open, timeout=5.0)
            assert server.lost and server.close_code == CloseCode.CERTIFICATE_EXPIRED
            await until(lambda: not client.is_open, timeout=5.0)


async def test_messages_read_no_clock(transport_and_addr):
    """The expiry costs the per-message path nothing: no wall-clock read per message, and a
    certificate far from expiry leaves the session open."""
    transport, addr = transport_and_addr
    fleet = make_fleet(None, ["alpha", "bravo"])
    clock = FrozenClock(time.time())
    admission = Admission(fleet.identities["bravo"], fleet.revocations, wallclock=clock)
    accepted = []

    async def handler(session):
        accepted.append(session)
        await session.wait_closed()

    async with SessionListener(transport, admission, handler) as listener:
        bound = await listener.start(addr)
        async with await dial(transport, bound, fleet.admission("alpha")) as client:
            await until(lambda: accepted)
            server = accepted[0]
            await client.send(AppData(topic="up", payload=b"first"))
            await server.recv()  # the keep-alive task has read the clock by now
            reads = clock.reads
            for i in range(200):
                await client.send(AppData(topic="up", payload=bytes([i % 256])))
                await server.send(AppData(topic="down", payload=b"x"))
            for _ in range(200):
                await server.recv()
                await client.recv()
            assert clock.reads == reads
            assert server.is_open and client.is_open
