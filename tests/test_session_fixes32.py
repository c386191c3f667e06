"""Session hardening (session 32): a keep-alive stuck behind a dead link, the peer's cap.

Each behaviour runs over the in-memory transport and over real TCP on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from meshinfer.errors import LocalProtocolError, StreamClosed
from meshinfer.proto.messages import AppData, CloseCode
from meshinfer.runtime.session import SessionConfig
from meshinfer.testing.fleet import make_fleet
from tests.test_session import Pair, withhold_pongs


async def test_a_keepalive_ping_stuck_behind_a_dead_link_does_not_hold_off_the_idle_timeout(
    transport_and_addr,
):
    """The peer went silent and the link died without a reset: the next write never
    completes, and here that write is the keep-alive's own ping (no other sender holds the
    writer). The idle timeout still ends the session, as lost, and nothing is left running."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    cfg = SessionConfig(idle_timeout=0.3, keepalive_interval=0.05)
    async with Pair(*transport_and_addr, fleet, server_config=cfg) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        withhold_pongs(client)
        writes = 0

        async def stuck(data: bytes) -> None:
            nonlocal writes
            writes += 1
            await server.wait_closed()
            raise StreamClosed("closed while a write was stuck")

        server.stream.write = stuck
        async with asyncio.timeout(5):
            await server.wait_closed()
        assert writes >= 1  # the keep-alive's ping got stuck
        assert server.close_code == CloseCode.IDLE_TIMEOUT and server.lost
        await client.aclose()


async def test_a_message_over_the_cap_the_peer_announced_is_refused_here(transport_and_addr):
    """The peer's Hello says how large a message it reads; one larger would end the session
    there as a protocol error (and be lost, its sender told it went). It is refused before it
    is written, as one over our own cap is, and the session goes on."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    small = SessionConfig(max_message_size=64 * 1024)
    async with Pair(*transport_and_addr, fleet, server_config=small) as pair:
        client = await pair.dial()  # its own cap: the default 16 MiB
        server = await pair.accepted.get()
        with pytest.raises(LocalProtocolError, match="cap"):
            await client.send(AppData(topic="big", payload=b"x" * 100_000))
        sent = await client.send_many(
            [AppData(topic="ok", payload=b"y"), AppData(topic="big", payload=b"x" * 100_000)]
        )
        assert sent == 1  # the batch ends before the message too large for the peer
        assert (await server.recv()).payload == b"y"
        assert client.is_open and server.is_open
        assert client.send_cap == 64 * 1024 and server.send_cap == 64 * 1024
        await client.aclose()


async def test_a_peer_that_ignores_the_cap_we_announced_is_still_dropped(transport_and_addr):
    """The receiver's own check stands for a peer that sends past our Hello's cap anyway (the
    sender-side check is bypassed here, as a hostile or buggy peer would)."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    small = SessionConfig(max_message_size=100_000)
    async with Pair(*transport_and_addr, fleet, server_config=small) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        client.send_cap = 1 << 30
        with contextlib.suppress(StreamClosed):  # the server may cut us off mid-message
            await client.send(AppData(topic="big", payload=b"x" * 300_000))
        with pytest.raises(StreamClosed):
            await server.recv()
        assert server.close_code == CloseCode.PROTOCOL_ERROR
        assert pair.metrics.protocol_errors == 1
