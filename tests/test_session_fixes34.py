"""Session hardening (session 34): nothing after a Close, the receive queue bounded in bytes,
the Close frame counted, a send cancelled while its write waits.

Each behaviour runs over the in-memory transport and over real TCP on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tracemalloc

import msgpack
import pytest

from meshinfer.errors import StreamClosed
from meshinfer.proto import framing, messages
from meshinfer.proto import membership_wire as wire
from meshinfer.proto.messages import AppData, Close, CloseCode
from meshinfer.runtime.session import SessionConfig, SessionMetrics
from meshinfer.testing.fleet import make_fleet
from tests.helpers import until
from tests.test_session import Pair


async def test_nothing_the_peer_sends_after_its_close_is_delivered(transport_and_addr):
    """A Close and an application message behind it in one read: the message used to be
    queued behind the close sentinel, so recv raised StreamClosed and then, called again,
    returned it."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        await client.send(AppData(topic="before", payload=b"1"))
        bye = Close(code=int(CloseCode.NORMAL), reason="bye")
        chunks = framing.split_message(messages.encode(bye))
        chunks += framing.split_message(messages.encode(AppData(topic="after", payload=b"2")))
        async with client._write_lock:
            await client._write_records(chunks)  # one write: both records in one read
        assert (await server.recv()).topic == "before"
        for _ in range(3):
            with pytest.raises(StreamClosed):
                await server.recv()
        assert server.close_code == CloseCode.NORMAL
        await client.aclose()


async def test_the_receive_queue_is_bounded_in_bytes_too(transport_and_addr):
    """recv_queue counts messages: 1024 of them at the 16 MiB cap let a peer park 16 GiB
    here. The reader also stops at recv_queue_bytes (one message past it at most), and goes
    on, in order, as the application reads."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    cfg = SessionConfig(recv_queue_bytes=250_000)
    async with Pair(*transport_and_addr, fleet, server_config=cfg) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        payloads = [bytes([i]) * 100_000 for i in range(12)]

        async def send_all() -> None:
            for payload in payloads:
                await client.send(AppData(topic="big", payload=payload))

        sender = asyncio.create_task(send_all())
        await until(lambda: not server._room.is_set(), timeout=5)
        assert server._inbox.qsize() == 3  # 300 KB queued: the reader waits for room
        assert server._inbox_bytes < cfg.recv_queue_bytes + 100_100
        got = [(await server.recv()).payload for _ in payloads]
        await sender
        assert got == payloads
        assert server._inbox_bytes == 0
        await client.aclose()


async def test_the_close_frame_counts_as_a_message_sent(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        metrics = SessionMetrics()
        client = await pair.dial(metrics=metrics)
        await pair.accepted.get()
        await client.send(AppData(topic="t", payload=b"x"))
        records = metrics.records_sent
        await client.aclose()
        assert metrics.messages_sent == 2
        assert metrics.records_sent == records + 1
        await client.aclose()  # idempotent: sends nothing more
        assert metrics.messages_sent == 2


async def test_a_send_cancelled_while_its_write_waits_does_not_corrupt_the_stream(
    transport_and_addr,
):
    """The peer reads nothing (its queue is full), so a large send's write waits; the caller
    cancels it. Its records were already encrypted, their nonces spent, and part of them (in
    memory) or none (TCP, the write waiting before it queues anything) went out: a session
    that carried on would send the peer a cut record or one it cannot decrypt (its reader then
    ends the session as the peer's protocol error). The session now ends at once, as lost,
    its stream reset; the peer sees a lost connection and every message it got is whole."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet, server_config=SessionConfig(recv_queue=1)) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        payload = b"x" * (1 << 20)
        cancelled = 0
        for _ in range(200):
            send = asyncio.create_task(client.send(AppData(topic="big", payload=payload)))
            done, _ = await asyncio.wait([send], timeout=0.5)
            if done:
                send.result()
                continue
            send.cancel()  # the write waits for the peer: give up on it
            with contextlib.suppress(asyncio.CancelledError):
                await send
            cancelled += 1
            if cancelled == 2 or not client.is_open:
                break
        assert cancelled >= 1

        async def drain() -> list[AppData]:
            got = []
            with contextlib.suppress(StreamClosed):
                while True:
                    got.append(msg := await server.recv())
                    if msg.topic == "end":
                        break
            return got

        drainer = asyncio.create_task(drain())
        if client.is_open:  # the old code went on: its next record is undecryptable
            with contextlib.suppress(StreamClosed):
                await client.send(AppData(topic="end", payload=b""))
        async with asyncio.timeout(10):
            got = await drainer
        assert pair.metrics.protocol_errors == 0
        assert all(msg.payload == payload for msg in got if msg.topic == "big")
        assert client.lost and not client.is_open
        async with asyncio.timeout(5):
            await server.wait_closed()
        assert server.lost
        await client.aclose()


def test_a_membership_array_longer_than_any_on_the_wire_is_refused_before_it_is_built() -> None:
    """A DIGEST_REPLY whose wants claim 2 million one-byte node ids: msgpack used to build the
    whole list (8 bytes of pointer per byte of packet, 16 MiB here) before the decoder found
    it too long. Arrays are now capped at MAX_RECORDS, the longest any message has."""
    count = 2_000_000
    head = b"\x93" + msgpack.packb(wire.PROTOCOL) + msgpack.packb(int(wire.PacketKind.DIGEST_REPLY))
    data = head + b"\xdd" + struct.pack(">I", count) + b"\x00" * count  # [1, 8, [0, 0, ...]]
    tracemalloc.start()
    try:
        with pytest.raises(wire.MembershipProtocolError):
            wire.decode_packet(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data)  # the packet's copies, not a list of it
