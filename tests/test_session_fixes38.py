"""Session hardening (session 38): a failing reader or keep-alive task ends the session with
a reason, logged once; a send nonce that runs out ends the session (StreamClosed, not a
"bad message" error); a cancelled aclose still ends the session.

Each behaviour runs over the in-memory transport and over real TCP on loopback.
"""

from __future__ import annotations

import asyncio
import logging
import tracemalloc

import pytest

from meshinfer.errors import StreamClosed
from meshinfer.proto import framing
from meshinfer.proto.messages import AppData, CloseCode
from meshinfer.proto.noise import MAX_NONCE
from meshinfer.runtime.session import SessionConfig
from meshinfer.testing.fleet import make_fleet
from tests.helpers import until
from tests.test_session import Pair

_SESSION_LOG = "meshinfer.runtime.session"


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == _SESSION_LOG and r.levelno >= logging.ERROR]


async def test_a_reader_that_fails_ends_the_session_with_a_reason_logged_once(
    transport_and_addr, caplog
):
    """A record at the last receive nonce: decrypt raises NonceExhaustedError, a
    LocalProtocolError the reader did not catch. The session ended as "reader stopped", not
    lost, nothing logged, and the reader task's exception was left for whoever awaited it."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        server._recv_cs.set_nonce(MAX_NONCE)
        await client.stream.write(framing.encode_record(bytes(32)))
        await until(lambda: server._reader.done())
        assert server._reader.exception() is None
        assert not server.is_open and server.lost
        assert "internal error in the session's reader" in server.close_reason
        assert "nonce" in server.close_reason
        assert len(_errors(caplog)) == 1
        await until(lambda: not client.is_open)  # its stream was reset: lost there too
        assert client.lost


async def test_a_keepalive_task_that_fails_ends_the_session(transport_and_addr, caplog):
    """The keep-alive task reads the admission's wall clock; one that raises used to kill the
    task silently: the session stayed open with no idle check and no keep-alives."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    cfg = SessionConfig(keepalive_interval=0.02, idle_timeout=30.0)
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial(config=cfg)
        await pair.accepted.get()

        def broken_clock() -> float:
            raise RuntimeError("clock gone")

        client._admission.wallclock = broken_clock
        await until(lambda: not client.is_open, timeout=5)
        assert client.lost
        assert "keep-alive" in client.close_reason and "clock gone" in client.close_reason
        await until(lambda: client._keeper.done() and client._reader.done())
        assert client._keeper.exception() is None
        assert len(_errors(caplog)) == 1


async def test_a_send_nonce_that_runs_out_ends_the_session(transport_and_addr):
    """NonceExhaustedError is a LocalProtocolError, which a peer table reads as "this message
    cannot be sent": it dropped each queued message in turn as too large, over a session that
    stayed open and could send nothing. Now the session ends, as lost, and send raises
    StreamClosed (the sender dials again)."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        client._send_cs.set_nonce(MAX_NONCE - 1)
        server._recv_cs.set_nonce(MAX_NONCE - 1)
        await client.send(AppData(topic="last", payload=b"1"))
        assert (await server.recv()).topic == "last"
        with pytest.raises(StreamClosed, match="nonce"):
            await client.send(AppData(topic="one too many", payload=b"2"))
        assert not client.is_open and client.lost
        with pytest.raises(StreamClosed):
            await client.send(AppData(topic="later", payload=b"3"))
        await until(lambda: not server.is_open)


async def test_a_send_nonce_that_runs_out_part_way_through_a_message_ends_the_session(
    transport_and_addr,
):
    """A message of three records with one nonce left: the first record spent it unsent."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        await pair.accepted.get()
        client._send_cs.set_nonce(MAX_NONCE - 1)
        big = AppData(topic="big", payload=bytes(2 * framing.MAX_CHUNK))
        with pytest.raises(StreamClosed):
            await client.send(big)
        assert not client.is_open and client.lost


async def test_a_cancelled_aclose_still_ends_the_session(transport_and_addr):
    """aclose cancelled while its Close waited for the writer (a send stuck behind a peer
    that does not read) left the session open, ``_closing`` set, so abandon() was a no-op
    for good and a later aclose wrote a Close behind a record maybe cut part-way."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        await client._write_lock.acquire()  # a send holds the writer
        try:
            closing = asyncio.create_task(client.aclose(CloseCode.NORMAL, "bye"))
            await until(lambda: client._closing)
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            assert not client.is_open
            assert client.close_reason == "bye" and not client.lost
        finally:
            client._write_lock.release()
        await until(lambda: client._reader.done() and client._keeper.done())
        await until(lambda: not server.is_open)
        with pytest.raises(StreamClosed):
            await client.send(AppData(topic="after", payload=b"x"))


def test_a_message_reassembled_from_tiny_chunks_holds_about_its_own_size() -> None:
    parts = 20_000
    reassembler = framing.Reassembler(1 << 20)
    chunk = bytes((framing.FLAG_MORE,)) + b"x"
    tracemalloc.start()
    try:
        for _ in range(parts):
            reassembler.feed(bytes(chunk))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reassembler.buffered == parts
    assert held < 8 * parts + 65536
