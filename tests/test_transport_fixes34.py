"""Transport, dialling and run-time revocations, session 34 review: an accept loop that meets
an unexpected error, a connection accepted as the listener closes, peer-controlled host names
in logs, redial jitter, memory writes cancelled part-way, a merge whose caller is cancelled,
and the cap on a revocation offer. Real TCP on loopback, real nodes."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import socket
import warnings

import pytest

from meshinfer.errors import RemoteProtocolError, TransportError
from meshinfer.proto import messages
from meshinfer.proto.messages import AppData
from meshinfer.proto.revocation_sync import PAGE_ENTRIES
from meshinfer.proto.revocation_wire import RevocationsOffer
from meshinfer.runtime.peers import PeerTable
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport._handlers import HandlerTasks
from meshinfer.transport.base import Address
from meshinfer.transport.memory import MemoryNetwork, MemoryTransport
from meshinfer.transport.tcp import TcpListener, TcpTransport
from tests.helpers import until
from tests.test_revocation_sync import Fleet

FORGED = "evil\n2024-01-01 ERROR meshinfer forged line"


# --- TCP accept loop -------------------------------------------------------------------------


class _FailsOnce(socket.socket):
    """A listening socket whose first accept() raises what no OSError handler catches."""

    failed = False

    def accept(self):
        if not _FailsOnce.failed:
            _FailsOnce.failed = True
            raise RuntimeError("accept broke (a bug)")
        return super().accept()


def _listening(cls: type[socket.socket] = socket.socket) -> socket.socket:
    sock = cls(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock


async def test_an_unexpected_accept_error_is_logged_and_accepting_goes_on(caplog):
    transport = TcpTransport()
    accepted: list[object] = []

    async def handler(stream):
        accepted.append(stream)
        await stream.aclose()

    sock = _listening(_FailsOnce)
    _FailsOnce.failed = False
    address = Address(*sock.getsockname())
    listener = TcpListener(
        sock,
        address,
        HandlerTasks(handler, "test"),
        lambda: transport._new_stream(on_connect=listener._tasks.spawn),
    )
    try:
        with caplog.at_level(logging.WARNING, logger="meshinfer.transport"):
            client = await transport.dial(address, timeout=5)
            await until(lambda: accepted, timeout=10)  # the accept loop did not die
        assert _FailsOnce.failed
        assert any("accept failed" in r.getMessage() for r in caplog.records)
        await client.aclose()
    finally:
        await listener.aclose(cancel_handlers=True)


async def test_a_connection_arriving_as_the_accept_loop_is_cancelled_is_not_leaked():
    """The client's connection is ready when the loop's selector reports the listening socket
    readable, and the accept task is cancelled later in that same loop turn (a timer runs
    after the I/O callbacks): the accepted socket must not be dropped unclosed."""
    transport = TcpTransport()
    listener = await transport.listen(Address("127.0.0.1", 0), lambda s: s.aclose())
    await asyncio.sleep(0)  # the accept loop is waiting for a connection
    loop = asyncio.get_running_loop()
    port = listener.address.port
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))  # (on loopback, in the backlog at once)
        loop.call_later(0, listener._accepting.cancel)
        await asyncio.gather(listener._accepting, return_exceptions=True)
        await listener.aclose(cancel_handlers=True)
        client.close()
        gc.collect()
    leaked = [
        w for w in caught if issubclass(w.category, ResourceWarning) and str(port) in str(w.message)
    ]
    assert leaked == []


# --- host names a peer chose, in logs --------------------------------------------------------


def test_an_address_with_a_host_that_is_not_printable_is_shown_escaped():
    shown = str(Address(FORGED, 7946))
    assert "\n" not in shown and shown.endswith(":7946") and "\\n" in shown
    assert str(Address("10.0.0.7", 7946)) == "10.0.0.7:7946"
    assert str(Address("::1", 7946)) == "[::1]:7946"


async def test_a_failed_dial_of_a_gossiped_host_logs_it_escaped(caplog):
    fleet = make_fleet(None, ["alpha", "bravo"])
    transport = MemoryTransport(MemoryNetwork(), host="alpha")
    table = PeerTable("alpha", transport, fleet.admission("alpha"))
    table.learn("bravo", Address(FORGED, 1), fleet.identities["bravo"].static_public)
    try:
        with caplog.at_level(logging.DEBUG, logger="meshinfer.runtime.peers"):
            table.send("bravo", AppData("t", b"x"))
            await until(lambda: table.stats.dial_failures == 1)
        lines = [r.getMessage() for r in caplog.records if "dial" in r.getMessage()]
        assert lines and not any("\n" in line for line in lines)
    finally:
        await table.aclose()


async def test_a_memory_dial_error_names_the_host_escaped():
    transport = MemoryTransport(MemoryNetwork())
    with pytest.raises(TransportError) as caught:
        await transport.dial(Address(FORGED, 1))
    assert "\n" not in str(caught.value)


# --- redial jitter ---------------------------------------------------------------------------


async def _redial_delay(seed: int) -> tuple[float, float]:
    """The bounds within which a failed dial's backoff (10 s) must lie for ``seed``."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    transport = MemoryTransport(MemoryNetwork(), host="alpha")
    table = PeerTable(
        "alpha", transport, fleet.admission("alpha"), dial_backoff=10.0, rng=random.Random(seed)
    )
    table.learn("bravo", Address("nowhere", 1), fleet.identities["bravo"].static_public)
    loop = asyncio.get_running_loop()
    try:
        before = loop.time()
        table.send("bravo", AppData("t", b"x"))
        await until(lambda: table.stats.dial_failures == 1)
        after = loop.time()
        retry_at = table._outboxes["bravo"].retry_at
        return retry_at - after, retry_at - before
    finally:
        await table.aclose()


async def test_the_dial_backoff_is_stretched_at_random_by_the_rng_given():
    for seed in (1, 2):
        low, high = await _redial_delay(seed)
        expected = 10.0 * (1 + random.Random(seed).random() / 2)
        assert low <= expected <= high
        assert 10.0 <= expected <= 15.0
    # (two seeds, two different delays: nodes do not redial in the same instant)
    assert random.Random(1).random() != random.Random(2).random()


# --- memory transport ------------------------------------------------------------------------


async def test_a_memory_write_cancelled_part_way_sent_all_or_nothing():
    network = MemoryNetwork(buffer_limit=10)
    transport = MemoryTransport(network, host="a")
    got: asyncio.Queue = asyncio.Queue()

    async def handler(stream):
        got.put_nowait(stream)

    listener = await transport.listen(Address("b", 0), handler)
    client = await transport.dial(listener.address)
    server = await got.get()
    writing = asyncio.create_task(client.write(bytes(100)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not writing.done()  # waits: the reader takes nothing
    writing.cancel()
    await asyncio.gather(writing, return_exceptions=True)
    await client.aclose()
    received = 0
    while chunk := await server.read(1000):
        received += len(chunk)
    assert received in (0, 100)  # never a part of a write: a record stream would break
    await server.aclose()
    await listener.aclose(cancel_handlers=True)


# --- revocations -----------------------------------------------------------------------------


async def test_a_merge_whose_caller_is_cancelled_is_still_written_down_and_cut(tmp_path):
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        a = f.nodes["car-a"]
        await until(lambda: a.peers.session("car-b") is not None)
        f.fleet.revoke("car-b")
        push = asyncio.create_task(a.revocation_sync.merge_list(f.fleet.revocations, "a push"))
        await asyncio.sleep(0)  # the merge is in force; the write-down has begun
        assert a.admission.revocations.entries == f.fleet.revocations.entries
        push.cancel()
        await asyncio.gather(push, return_exceptions=True)
        await until(lambda: a.peers.session("car-b") is None, timeout=10)
        expected = a.admission.revocations.to_bytes()
        await until(lambda: f.files["car-a"].exists(), timeout=10)
        assert f.files["car-a"].read_bytes() == expected


def test_an_offer_longer_than_a_few_pages_is_refused_by_the_decoder():
    page = RevocationsOffer((b"x" * 1024,) * PAGE_ENTRIES)
    assert messages.decode(messages.encode(page)) == page  # a full page of the largest entries
    spec = messages.spec_of(RevocationsOffer)
    assert spec.max_size < 2 * 1024 * 1024
    too_long = RevocationsOffer((b"x",) * (16 * PAGE_ENTRIES))
    with pytest.raises(RemoteProtocolError):  # (a session closes; 8 MiB used to be taken)
        messages.decode(messages.encode(too_long))
