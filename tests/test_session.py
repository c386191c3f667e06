"""Encrypted sessions: handshakes, admission, messages, chunking, rekey, keep-alive, close.

Each behaviour runs over the in-memory transport and over real TCP on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest

from meshinfer.errors import AdmissionError, HandshakeError, LocalProtocolError, StreamClosed
from meshinfer.proto.messages import AppData, CloseCode, Hello, Ping
from meshinfer.runtime.endpoint import SessionListener, dial
from meshinfer.runtime.session import SessionConfig, SessionMetrics
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.memory import MemoryNetwork, MemoryTransport
from meshinfer.transport.tcp import TcpTransport
from tests.helpers import until


class Pair:
    """A listener for ``bravo`` whose accepted sessions land in a queue, and a dialler that
    closes the sessions it opened on exit."""

    def __init__(self, transport, addr, fleet, *, server_config=None, metrics=None):
        self.transport, self.fleet = transport, fleet
        self.accepted: asyncio.Queue = asyncio.Queue()
        self.release = asyncio.Event()
        self.metrics = metrics or SessionMetrics()
        self.listener = SessionListener(
            transport,
            fleet.admission("bravo"),
            self._handler,
            config=server_config,
            metrics=self.metrics,
        )
        self.bind = addr
        self.clients = []

    async def _handler(self, session):
        await self.accepted.put(session)
        await self.release.wait()

    async def __aenter__(self):
        self.addr = await self.listener.start(self.bind)
        return self

    async def __aexit__(self, *exc):
        self.release.set()
        for client in self.clients:
            await client.aclose()
        await self.listener.aclose()

    async def dial(self, node="alpha", **kw):
        client = await dial(self.transport, self.addr, self.fleet.admission(node), **kw)
        self.clients.append(client)
        return client


async def test_xx_session_exchanges_messages_both_ways(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        assert client.peer_id == "bravo" and server.peer_id == "alpha"
        assert client.handshake_hash == server.handshake_hash
        for i in range(20):
            await client.send(AppData(topic="up", payload=bytes([i]) * i))
            await server.send(AppData(topic="down", payload=str(i).encode()))
        ups = [await server.recv() for _ in range(20)]
        downs = [await client.recv() for _ in range(20)]
        assert [m.payload for m in ups] == [bytes([i]) * i for i in range(20)]
        assert [m.payload for m in downs] == [str(i).encode() for i in range(20)]
        await client.aclose()


async def test_ik_when_static_key_is_known(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        bravo_key = fleet.identities["bravo"].static_public
        client = await pair.dial(expected_static=bravo_key, expected_node_id="bravo")
        server = await pair.accepted.get()
        await client.send(AppData(topic="t", payload=b"ik"))
        assert (await server.recv()).payload == b"ik"
        assert pair.metrics.handshakes_ok == 1
        await client.aclose()


async def test_ik_with_wrong_static_key_fails(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo", "charlie"])
    async with Pair(*transport_and_addr, fleet) as pair:
        wrong = fleet.identities["charlie"].static_public
        with pytest.raises(HandshakeError):
            await pair.dial(expected_static=wrong)
        assert pair.accepted.empty()


async def test_expected_node_id_mismatch_is_refused(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        with pytest.raises(AdmissionError) as info:
            await pair.dial(expected_node_id="zulu")
        assert info.value.reason == "unexpected-node"


async def test_node_of_another_fleet_is_refused(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    other = make_fleet(None, ["mallory"], fleet_id="other-fleet")
    async with Pair(*transport_and_addr, fleet) as pair:
        with pytest.raises((HandshakeError, StreamClosed)):
            await dial(pair.transport, pair.addr, other.admission("mallory"))
        await until(lambda: sum(pair.metrics.handshake_failures.values()) >= 1)
        assert pair.accepted.empty()


async def test_same_fleet_id_but_foreign_authority_is_refused(transport_and_addr):
    # Same fleet name, so the prologue matches; the certificate signature is what fails.
    fleet = make_fleet(None, ["alpha", "bravo"])
    forger = make_fleet(None, ["alpha"], fleet_id="test-fleet")
    forged = forger.admission("alpha")
    bravo_key = fleet.identities["bravo"].static_public
    async with Pair(*transport_and_addr, fleet) as pair:
        # IK, so the forged certificate reaches bravo in the first handshake message.
        with pytest.raises((HandshakeError, AdmissionError, StreamClosed)):
            await dial(pair.transport, pair.addr, forged, expected_static=bravo_key)
        await until(lambda: pair.metrics.handshake_failures["bad-signature"] >= 1)
        assert pair.accepted.empty()


async def test_revoked_node_is_refused_with_reason(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    fleet.revoke("alpha", "stolen vehicle")
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()  # XX: the initiator finishes first, then learns the verdict
        async with asyncio.timeout(5):
            await client.wait_closed()
        assert client.close_code == CloseCode.ADMISSION_REFUSED
        assert "revoked" in client.close_reason
        assert pair.metrics.handshake_failures["revoked"] == 1
        assert pair.accepted.empty()


async def test_expired_certificate_is_refused(transport_and_addr):
    fleet = make_fleet(None, ["bravo"])
    fleet.enroll("alpha", now=1_000_000.0, lifetime_s=10.0)
    async with Pair(*transport_and_addr, fleet) as pair:
        with contextlib.suppress(StreamClosed, HandshakeError):
            client = await pair.dial()
            await client.wait_closed()
        await until(lambda: pair.metrics.handshake_failures["expired"] == 1)
        assert pair.accepted.empty()


async def test_messages_larger_than_one_noise_message_are_chunked(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        big = bytes(range(256)) * (5 * 4096)  # 5 MiB
        await client.send(AppData(topic="big", payload=big))
        await client.send(AppData(topic="small", payload=b"after"))
        got = await server.recv()
        assert got.payload == big
        assert (await server.recv()).payload == b"after"
        await client.aclose()


async def test_oversized_message_is_refused_locally(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial(config=SessionConfig(max_message_size=100_000))
        with pytest.raises(LocalProtocolError):
            await client.send(AppData(topic="big", payload=b"x" * 200_000))
        await client.aclose()


async def test_peer_exceeding_our_cap_is_dropped_as_protocol_error(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    small = SessionConfig(max_message_size=100_000)
    async with Pair(*transport_and_addr, fleet, server_config=small) as pair:
        client = await pair.dial()
        client.send_cap = 1 << 30  # a peer that ignores the cap our Hello announced
        server = await pair.accepted.get()
        with contextlib.suppress(StreamClosed):  # the server may cut us off mid-message
            await client.send(AppData(topic="big", payload=b"x" * 300_000))
        with pytest.raises(StreamClosed):
            await server.recv()
        assert server.close_code == CloseCode.PROTOCOL_ERROR
        assert pair.metrics.protocol_errors == 1


async def test_rekey_keeps_both_sides_in_step(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    cfg = SessionConfig(rekey_after=3)
    async with Pair(*transport_and_addr, fleet, server_config=cfg) as pair:
        client = await pair.dial(config=cfg)
        server = await pair.accepted.get()
        for i in range(25):
            await client.send(AppData(topic="r", payload=bytes([i])))
            assert (await server.recv()).payload == bytes([i])
            await server.send(AppData(topic="r", payload=bytes([i])))
            assert (await client.recv()).payload == bytes([i])
        await client.aclose()


async def test_rekey_really_changes_keys(transport_and_addr):
    # If only one side rekeys, the other can no longer decrypt: proof that rekeying happens.
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet, server_config=SessionConfig()) as pair:
        client = await pair.dial()
        client.rekey_after = 2  # (past the handshake's agreement: as if one side ignored it)
        server = await pair.accepted.get()
        for i in range(4):
            await client.send(AppData(topic="r", payload=bytes([i])))
        assert (await server.recv()).payload == b"\x00"
        assert (await server.recv()).payload == b"\x01"
        with pytest.raises(StreamClosed):
            await server.recv()
        assert server.close_code == CloseCode.PROTOCOL_ERROR


async def test_sides_configured_with_different_rekey_after_stay_in_step(transport_and_addr):
    """Each Hello announces its rekey_after and both sides use the smaller: a client set to
    rekey every 2 records and a server left at its default used to fall out of step at the
    second record (the server, unable to decrypt, closed the session as a protocol error)."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet, server_config=SessionConfig()) as pair:
        client = await pair.dial(config=SessionConfig(rekey_after=2))
        server = await pair.accepted.get()
        assert client.rekey_after == server.rekey_after == 2
        for i in range(7):
            await client.send(AppData(topic="r", payload=bytes([i])))
            await server.send(AppData(topic="r", payload=bytes([i])))
        for i in range(7):
            assert (await server.recv()).payload == bytes([i])
            assert (await client.recv()).payload == bytes([i])
        await client.aclose()


def test_a_peer_rekey_after_is_read_from_its_hello_features():
    """The first well-formed ``rekey-after=N`` counts; none, or only malformed ones (an older
    node, a hostile one), reads as None: ours is used."""
    from meshinfer.runtime.session import peer_rekey_after

    def hello(*features: str) -> Hello:
        return Hello(1, "a", b"", (), features, 1 << 20)

    assert peer_rekey_after(hello("packed", "rekey-after=5")) == 5
    assert peer_rekey_after(hello("rekey-after=x", "rekey-after=7")) == 7
    for bad in ("rekey-after=", "rekey-after=0", "rekey-after=-3", "rekey-after=1e3",
                "rekey-after=\u0663", f"rekey-after={1 << 63}"):  # fmt: skip
        assert peer_rekey_after(hello(bad)) is None
    assert peer_rekey_after(hello("packed")) is None


async def test_graceful_close_reaches_the_peer(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        await client.send(AppData(topic="last", payload=b"bye"))
        await client.aclose(CloseCode.NORMAL, "done here")
        await client.aclose()  # idempotent
        assert (await server.recv()).payload == b"bye"  # queued work is not lost on close
        with pytest.raises(StreamClosed, match="done here"):
            await server.recv()
        assert server.close_code == CloseCode.NORMAL
        with pytest.raises(StreamClosed):
            await client.send(AppData(topic="x", payload=b""))


async def test_a_close_frame_is_not_a_lost_session_but_a_dropped_stream_is(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        await client.aclose(CloseCode.NORMAL, "bye")
        await server.wait_closed()
        assert not server.lost and not client.lost

        client = await pair.dial()
        server = await pair.accepted.get()
        await client.stream.aclose()  # the peer's process dies: no Close frame
        await server.wait_closed()
        assert server.lost
        assert "peer closed the connection" in server.close_reason


async def test_a_failed_write_ends_the_session_at_once(transport_and_addr):
    """The connection is lost and the stream says so to a writer before the session's reader
    has run: the session is closed (lost) by that failed write itself, so a sender that picks
    the peer's open session again does not spin on it."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        await pair.accepted.get()

        async def lost(data: bytes) -> None:
            raise StreamClosed("connection lost")

        client.stream.write = lost
        tasks = {t for t in asyncio.all_tasks() if t.get_name().endswith("-bravo")}
        with pytest.raises(StreamClosed):
            await client.send(AppData(topic="up", payload=b"x"))
        assert not client.is_open and client.lost
        assert "connection lost" in client.close_reason
        assert len(tasks) == 2 and all(t.done() for t in tasks)  # reader and keep-alive ended


async def test_a_sender_cancelled_while_its_failed_write_shuts_the_session_down_is_cancelled(
    transport_and_addr,
):
    """The failed write waits for the session's tasks to end; a cancel of the sender meanwhile
    is not swallowed (the sender ends cancelled, not with the write's error)."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        await pair.accepted.get()

        async def slow_to_end() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(0.5)  # ends, in its own time

        async def lost(data: bytes) -> None:
            raise StreamClosed("connection lost")

        client._keeper.cancel()
        client._keeper = asyncio.create_task(slow_to_end())
        await asyncio.sleep(0)
        client.stream.write = lost
        sender = asyncio.create_task(client.send(AppData(topic="up", payload=b"x")))
        await until(lambda: not client.is_open)  # the write failed: shutting down
        sender.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sender


async def test_a_session_its_peer_closed_ends_its_tasks_without_aclose(transport_and_addr):
    """Its owner may never call aclose(): the reader ends at the Close, and the keep-alive
    task wakes at once rather than at its next ping (30 s away here)."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    cfg = SessionConfig(keepalive_interval=30, idle_timeout=60)
    async with Pair(*transport_and_addr, fleet, server_config=cfg) as pair:
        client = await pair.dial(config=cfg)
        server = await pair.accepted.get()
        tasks = {t for t in asyncio.all_tasks() if t.get_name().startswith("session-")}
        mine = {t for t in tasks if t.get_name().endswith("-bravo")}  # the client's
        assert len(mine) == 2
        await server.aclose()
        async with asyncio.timeout(5):
            await asyncio.wait(mine)
        assert not client.is_open


async def test_ping_measures_round_trip(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        await pair.accepted.get()
        rtt = await client.ping()
        assert 0 < rtt < 5
        await client.aclose()


async def test_a_ping_whose_write_fails_leaves_no_unretrieved_future(transport_and_addr):
    """The failed write ends the session, which fails the ping's waiter with why; ping()
    raises the write's own error, and the waiter's error is retrieved: nothing is logged as
    "Future exception was never retrieved" once it is collected (seen in a chaos run's
    coordinator log)."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    reported = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        async with Pair(*transport_and_addr, fleet) as pair:
            client = await pair.dial()
            await pair.accepted.get()

            async def lost(data: bytes) -> None:
                raise StreamClosed("connection lost")

            client.stream.write = lost
            failed = None
            try:
                await client.ping()
            except StreamClosed as exc:  # the traceback (which holds the waiter) goes with it
                failed = str(exc)
            assert failed == "connection lost" and not client.is_open
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert [c.get("message") for c in reported] == []


async def test_keepalive_holds_an_idle_session_open(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    cfg = SessionConfig(idle_timeout=0.3, keepalive_interval=0.05)
    async with Pair(*transport_and_addr, fleet, server_config=cfg) as pair:
        client = await pair.dial(config=cfg)
        server = await pair.accepted.get()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):  # three idle timeouts with no application traffic
                await server.wait_closed()
        assert client.is_open and server.is_open
        await client.aclose()


async def test_idle_timeout_closes_a_silent_peer(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    cfg = SessionConfig(idle_timeout=0.2, keepalive_interval=0.05)
    async with Pair(*transport_and_addr, fleet, server_config=cfg) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        # Freeze the client: it reads but never answers or sends, and keeps its socket open.
        client._keeper.cancel()

        async def ignore(msg):
            return None

        client._dispatch = ignore
        async with asyncio.timeout(3):
            await server.wait_closed()
        assert server.close_code == CloseCode.IDLE_TIMEOUT
        assert server.lost  # what went to the silent peer may never have arrived
        await client.aclose()


def withhold_pongs(session) -> None:
    """``session`` keeps reading (a Close still ends it) but answers no ping and sends no
    keep-alive: its peer hears nothing."""
    session._keeper.cancel()
    dispatch = session._dispatch

    async def no_pongs(msg):
        if not isinstance(msg, Ping):
            await dispatch(msg)

    session._dispatch = no_pongs


@contextlib.asynccontextmanager
async def silent_client(transport_and_addr):
    """``(client, server)``: the server ends a session silent for 0.3 s; the client hears it
    but says nothing (:func:`withhold_pongs`)."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    cfg = SessionConfig(idle_timeout=0.3, keepalive_interval=0.05)
    async with Pair(*transport_and_addr, fleet, server_config=cfg) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        withhold_pongs(client)
        yield client, server


async def test_the_idle_timeout_ends_a_session_as_lost_on_both_sides(transport_and_addr):
    """The side that times out sends Close(IDLE_TIMEOUT): the other side, which may have missed
    what it was sent too, ends the session as lost as well."""
    async with silent_client(transport_and_addr) as (client, server):
        async with asyncio.timeout(5):
            await client.wait_closed()
        assert client.close_code == CloseCode.IDLE_TIMEOUT and client.lost and server.lost


async def test_a_write_stuck_behind_a_dead_link_does_not_hold_off_the_idle_timeout(
    transport_and_addr,
):
    """A send never completes (the link died without a reset, the send buffer is full): the
    keep-alive does not queue behind it, so the idle timeout still ends the session, and the
    stuck send then fails."""
    async with silent_client(transport_and_addr) as (client, server):

        async def stuck(data: bytes) -> None:
            await server.wait_closed()
            raise StreamClosed("closed while a write was stuck")

        server.stream.write = stuck
        sending = asyncio.create_task(server.send(AppData(topic="t", payload=b"never")))
        async with asyncio.timeout(5):
            await server.wait_closed()
        assert server.close_code == CloseCode.IDLE_TIMEOUT and server.lost
        with pytest.raises(StreamClosed):
            await sending
        await client.aclose()


async def test_slow_reader_pushes_back_instead_of_buffering(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    cfg = SessionConfig(recv_queue=4)
    async with Pair(*transport_and_addr, fleet, server_config=cfg) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        flood = Flood(client)
        await asyncio.sleep(0.3)
        assert not flood.task.done(), "sender should be blocked by backpressure"
        assert flood.sent < Flood.COUNT
        for i in range(Flood.COUNT):
            assert (await server.recv()).payload == Flood.PAYLOAD, i
        await flood.task
        await client.aclose()


class Flood:
    """Sends ``COUNT`` messages of ``PAYLOAD`` over ``session`` in a task; ``sent`` counts
    those the session took."""

    COUNT = 2000
    PAYLOAD = b"p" * 16384

    def __init__(self, session) -> None:
        self.sent = 0
        self.task = asyncio.create_task(self._send(session))

    async def _send(self, session) -> None:
        for _ in range(self.COUNT):
            await session.send(AppData(topic="f", payload=self.PAYLOAD))
            self.sent += 1


@pytest.mark.parametrize("kind", ["memory", "tcp"])
async def test_abandon_drops_what_is_still_queued_instead_of_delivering_it_late(kind):
    """A peer given up on gets no late delivery of what was queued for it (its watchers send
    that again over another session): the stream is reset, not flushed and closed. (In memory
    the link has a second of latency, so that what was sent is still on the way.)"""
    fleet = make_fleet(None, ["alpha", "bravo"])
    cfg = SessionConfig(recv_queue=4)
    if kind == "memory":
        network = MemoryNetwork()
        where = MemoryTransport(network), Address("bravo", 0)
    else:
        where = TcpTransport(), Address("127.0.0.1", 0)
    async with Pair(*where, fleet, server_config=cfg) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        if kind == "memory":
            network.latency = 1.0  # after the handshake
        flood = Flood(client)
        await until(lambda: flood.sent > 2)
        await asyncio.sleep(0.3)
        assert not flood.task.done(), "the sender should be held by backpressure"
        await client.abandon("the peer stopped answering")
        with contextlib.suppress(StreamClosed, LocalProtocolError):
            await flood.task
        assert client.lost and not client.is_open
        received = 0
        with contextlib.suppress(StreamClosed, LocalProtocolError):
            async with asyncio.timeout(10):
                while True:
                    await server.recv()
                    received += 1
        assert received < flood.sent  # what was queued but not yet taken by the peer is gone
        assert server.lost


class CountingWrites:
    """Wraps a stream's ``write`` to count the calls (each is one send on the socket)."""

    def __init__(self, stream) -> None:
        self.calls = 0
        self._write = stream.write
        stream.write = self.write

    async def write(self, data: bytes) -> None:
        self.calls += 1
        await self._write(data)


async def test_send_many_writes_every_message_once_in_order(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    cfg = SessionConfig(rekey_after=3)  # the batch crosses several rekeys
    async with Pair(*transport_and_addr, fleet, server_config=cfg) as pair:
        client = await pair.dial(config=cfg)
        server = await pair.accepted.get()
        writes = CountingWrites(client.stream)
        big = bytes(range(256)) * 1024  # 256 KiB: several records
        payloads = [b"a", big, *(b"m%d" % n for n in range(10))]
        await client.send_many([AppData(topic="t", payload=p) for p in payloads])
        assert writes.calls == 1
        assert [(await server.recv()).payload for _ in payloads] == payloads
        assert client.metrics.messages_sent >= len(payloads)
        await client.aclose()


async def test_send_many_stops_before_a_message_too_large_and_refuses_it_first(
    transport_and_addr,
):
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial(config=SessionConfig(max_message_size=100_000))
        server = await pair.accepted.get()
        writes = CountingWrites(client.stream)
        too_large = AppData(topic="t", payload=b"x" * 200_000)
        assert await client.send_many([AppData(topic="t", payload=b"ok"), too_large]) == 1
        assert (await server.recv()).payload == b"ok"
        with pytest.raises(LocalProtocolError, match="exceeds"):
            await client.send_many([too_large, AppData(topic="t", payload=b"behind")])
        assert writes.calls == 1  # nothing written for the refused call
        await client.send(AppData(topic="t", payload=b"next"))  # the session goes on
        assert (await server.recv()).payload == b"next"
        await client.aclose()


async def test_send_many_puts_at_most_max_bytes_in_one_write(transport_and_addr):
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        writes = CountingWrites(client.stream)
        msgs = [AppData(topic="t", payload=bytes([n]) * 400_000) for n in range(3)]
        assert await client.send_many(msgs, max_bytes=1_000_000) == 2  # a third would pass 1 MB
        assert await client.send_many(msgs[2:], max_bytes=1) == 1  # the first always goes
        assert writes.calls == 2
        assert [(await server.recv()).payload[0] for _ in msgs] == [0, 1, 2]
        await client.aclose()


async def test_small_messages_of_one_send_many_share_a_record_when_both_sides_pack(
    transport_and_addr,
):
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        assert client.pack and server.pack  # both announced the feature
        sent, received = client.metrics.records_sent, pair.metrics.records_received
        payloads = [b"m%d" % n for n in range(40)]
        assert await client.send_many([AppData(topic="t", payload=p) for p in payloads]) == 40
        assert [(await server.recv()).payload for _ in payloads] == payloads
        assert client.metrics.records_sent - sent == 1
        assert pair.metrics.records_received - received == 1
        await server.send_many([AppData(topic="t", payload=b"back%d" % n) for n in range(3)])
        assert [(await client.recv()).payload for _ in range(3)] == [b"back0", b"back1", b"back2"]
        await client.aclose()


@pytest.mark.parametrize("plain_side", ["client", "server"])
async def test_a_peer_that_does_not_announce_packing_gets_a_record_per_message(
    transport_and_addr, plain_side
):
    fleet = make_fleet(None, ["alpha", "bravo"])
    plain = SessionConfig(pack=False)
    server_config = plain if plain_side == "server" else None
    async with Pair(*transport_and_addr, fleet, server_config=server_config) as pair:
        client = await pair.dial(config=plain if plain_side == "client" else None)
        server = await pair.accepted.get()
        assert not client.pack and not server.pack
        for one, other, metrics in (
            (client, server, client.metrics),
            (server, client, pair.metrics),
        ):
            sent = metrics.records_sent
            await one.send_many([AppData(topic="t", payload=bytes([n])) for n in range(10)])
            assert [(await other.recv()).payload for _ in range(10)] == [
                bytes([n]) for n in range(10)
            ]
            assert metrics.records_sent - sent == 10
        await client.aclose()
