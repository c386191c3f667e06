"""The peer table (session 37): a peer's outbox is bounded by bytes as well as by count. A
stalled peer held up to 256 queued messages of up to 16 MiB each (~4 GiB); now at most
``outbox_bytes`` (64 MiB by default), or one larger message when nothing else is queued. The
byte count is exact on every path that takes a message off the queue.

Real Noise sessions over the in-memory transport and TCP on loopback.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshinfer.errors import TransportError
from meshinfer.proto.messages import MAX_MESSAGE_SIZE, AppData, Gossip, Ping
from meshinfer.proto.revocation_wire import RevocationsOffer
from meshinfer.proto.tasks_wire import NO_INPUT, TaskAccepted, TaskAssign, TaskResult, Tensor
from meshinfer.runtime.endpoint import SessionListener
from meshinfer.runtime.outbox_size import MESSAGE_OVERHEAD, OUTBOX_BYTES, queued_size
from meshinfer.runtime.peers import PeerTable
from meshinfer.runtime.session import SessionConfig
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.memory import MemoryNetwork, MemoryTransport
from meshinfer.transport.tcp import TcpTransport
from tests.helpers import until
from tests.test_peers import Pair, stick_writes
from tests.test_peers_fixes36 import silent_server
from tests.test_revocation_fixes27 import hold_next_write

LOOPBACK = Address("127.0.0.1", 0)


def queued_bytes(table: PeerTable, peer: str) -> tuple[int, int]:
    """The outbox's byte count, and the sum over what it holds (0, 0 with no outbox)."""
    box = table._outboxes.get(peer)
    if box is None:
        return 0, 0
    return box.size, sum(entry[2] for entry in box.queue)


def app(n: int) -> AppData:
    """An AppData counted at exactly ``n`` bytes (n >= MESSAGE_OVERHEAD)."""
    return AppData("t", bytes(n - MESSAGE_OVERHEAD))


# --- the estimate ----------------------------------------------------------------------------


def test_the_estimate_counts_the_bytes_a_message_carries():
    tensor = Tensor(bytes(4096), "float32", (1024,))
    assign = TaskAssign("i", "t", "m", "1", tensor, b"\x80", None, 0, 1)
    assert queued_size(assign) == 4096 + 1 + MESSAGE_OVERHEAD
    by_ref = TaskAssign("i", "t", "m", "1", NO_INPUT, b"", None, 0, 1)
    assert queued_size(by_ref) == MESSAGE_OVERHEAD
    result = TaskResult("i", 1, tensor, "n", "numpy", "cpu", {"total_s": 0.1})
    assert queued_size(result) == 4096 + MESSAGE_OVERHEAD
    assert queued_size(AppData("t", b"x" * 100)) == 100 + MESSAGE_OVERHEAD
    assert queued_size(Gossip(b"y" * 1400)) == 1400 + MESSAGE_OVERHEAD
    assert queued_size(RevocationsOffer((b"a" * 10, b"b" * 20))) == 30 + MESSAGE_OVERHEAD
    assert queued_size(TaskAccepted("i", 1, "n", 0)) == MESSAGE_OVERHEAD
    assert queued_size(Ping(nonce=1)) == MESSAGE_OVERHEAD


def test_the_estimate_of_a_message_that_will_not_encode_does_not_raise():
    """A payload of the wrong type is the sender's to refuse (too-large), not the queue's."""
    assert queued_size(AppData("t", object())) == MESSAGE_OVERHEAD
    assert queued_size(TaskResult("i", 1, None, "n", "e", "d", {})) == MESSAGE_OVERHEAD


# --- the bound -------------------------------------------------------------------------------


async def test_a_stalled_peer_holds_at_most_the_default_byte_bound():
    """bravo stops taking what alpha writes (its writes never complete). With 16 MiB messages
    the count bound (256) let alpha hold ~4 GiB for it; now the fifth is refused: 64 MiB."""
    assert OUTBOX_BYTES == 64 * 1024 * 1024
    big = app(MAX_MESSAGE_SIZE)  # (one bytes object: queued five times, held once here)
    async with Pair(TcpTransport(), LOOPBACK) as pair:
        await pair.alpha.request("bravo", AppData("t", b"first"))
        stick_writes(pair.alpha.session("bravo"))
        queued = [pair.alpha.send_tracked("bravo", big) for _ in range(4)]
        assert None not in queued
        with pytest.raises(TransportError, match=r"bound of 67108864 bytes"):
            async with asyncio.timeout(5):  # (refused at once; the old table queued it)
                await pair.alpha.request("bravo", big)
        assert not pair.alpha.send("bravo", big)
        assert pair.alpha.stats.dropped["outbox-bytes"] == 2
        assert pair.alpha.stats.dropped["outbox-full"] == 0
        assert queued_bytes(pair.alpha, "bravo") == (OUTBOX_BYTES, OUTBOX_BYTES)
        # (far under the count bound, a small one is refused too: the byte bound is reached)
        assert not pair.alpha.send("bravo", AppData("t", b"small"))
        await pair.alpha.aclose()  # close: what is queued is dropped, the count goes to 0
        for fut in queued:
            with pytest.raises(TransportError, match="shutting-down"):
                await fut
        assert queued_bytes(pair.alpha, "bravo") == (0, 0)


async def test_a_message_over_the_bound_goes_alone_and_the_count_follows_the_writes(
    transport_and_addr,
):
    """A message larger than the whole bound is queued when nothing else is (else it could
    never go); while it waits for the writer nothing else is queued; once written, the count
    is back to 0 and the next one goes."""
    async with Pair(*transport_and_addr) as pair:
        pair.alpha._outbox_bytes = 4096
        await pair.alpha.request("bravo", AppData("t", b"first"))
        gate = hold_next_write(pair.alpha.session("bravo"))
        large = pair.alpha.send_tracked("bravo", app(10_000))
        assert large is not None
        with pytest.raises(TransportError, match=r"10000 bytes queued.*bound of 4096 bytes"):
            async with asyncio.timeout(5):  # (refused at once; the old table queued it)
                await pair.alpha.request("bravo", app(300))
        assert pair.alpha.stats.dropped["outbox-bytes"] == 1
        assert queued_bytes(pair.alpha, "bravo") == (10_000, 10_000)
        gate.set()
        async with asyncio.timeout(10):
            await large
        assert queued_bytes(pair.alpha, "bravo") == (0, 0)
        await pair.alpha.request("bravo", app(10_000))
        assert len(await pair.received(3)) == 3
        assert queued_bytes(pair.alpha, "bravo") == (0, 0)


# --- exact on every path off the queue -------------------------------------------------------


async def test_the_count_is_exact_when_a_message_is_dropped_as_too_large(transport_and_addr):
    async with Pair(*transport_and_addr) as pair:
        await pair.alpha.request("bravo", AppData("t", b"first"))
        gate = hold_next_write(pair.alpha.session("bravo"))
        held = pair.alpha.send_tracked("bravo", app(1000))
        bad = pair.alpha.send_tracked("bravo", AppData("t", object()))  # does not encode
        good = pair.alpha.send_tracked("bravo", app(2000))
        assert queued_bytes(pair.alpha, "bravo") == (3000 + MESSAGE_OVERHEAD,) * 2
        gate.set()
        async with asyncio.timeout(10):
            await held
            await good
            with pytest.raises(Exception, match="cannot encode"):
                await bad
        assert pair.alpha.stats.dropped["too-large"] == 1
        assert queued_bytes(pair.alpha, "bravo") == (0, 0)


async def test_the_count_is_exact_when_a_dial_fails():
    fleet = make_fleet(None, ["alpha", "bravo"])
    config = SessionConfig(handshake_timeout=0.5)
    alpha = PeerTable("alpha", TcpTransport(), fleet.admission("alpha"), config=config)
    try:
        async with silent_server() as (address, accepted):
            alpha.learn("bravo", address, fleet.identities["bravo"].static_public)
            futs = [alpha.send_tracked("bravo", app(500 + i)) for i in range(3)]
            await until(lambda: accepted, timeout=5)
            assert queued_bytes(alpha, "bravo") == (1503, 1503)
            for fut in futs:
                with pytest.raises(TransportError, match="dial-failed"):
                    async with asyncio.timeout(10):
                        await fut
            assert queued_bytes(alpha, "bravo") == (0, 0)
    finally:
        await alpha.aclose()


async def test_the_count_is_exact_when_the_sender_fails(transport_and_addr):
    async with Pair(*transport_and_addr) as pair:
        await pair.alpha.request("bravo", AppData("t", b"first"))

        async def broken(*_args, **_kwargs):
            raise RuntimeError("a bug in the write path")

        pair.alpha.session("bravo").send_many = broken
        futs = [pair.alpha.send_tracked("bravo", app(700)) for _ in range(2)]
        for fut in futs:
            with pytest.raises(TransportError, match="sender for bravo failed"):
                async with asyncio.timeout(10):
                    await fut
        assert queued_bytes(pair.alpha, "bravo") == (0, 0)
        assert pair.alpha.stats.dropped["sender-failed"] == 2


# --- the property ----------------------------------------------------------------------------

_FLEET = make_fleet(None, ["alpha", "bravo"])
_BOUND = 4096

#: ("send", bytes counted) | ("hold",): hold the session's next write | ("release",) |
#: ("yield",): let the sender run
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(MESSAGE_OVERHEAD, 2 * _BOUND)),
        st.tuples(st.just("hold")),
        st.tuples(st.just("release")),
        st.tuples(st.just("yield")),
    ),
    max_size=40,
)


async def _scenario(ops: list[tuple], close_held: bool) -> None:
    transport = MemoryTransport(MemoryNetwork())
    alpha = PeerTable(
        "alpha", transport, _FLEET.admission("alpha"), outbox_limit=8, outbox_bytes=_BOUND
    )
    bravo = PeerTable("bravo", transport, _FLEET.admission("bravo"))
    listener = SessionListener(transport, _FLEET.admission("bravo"), bravo.serve_inbound)
    got: list[bytes] = []
    bravo.on(AppData, lambda _peer, msg: got.append(msg.payload))
    try:
        bound = await listener.start(Address("bravo", 0))
        alpha.learn("bravo", bound, _FLEET.identities["bravo"].static_public)
        await alpha.request("bravo", AppData("t", b"first"))
        gates: list[asyncio.Event] = []
        accepted: list[asyncio.Future[None]] = []
        for op in ops:
            if op[0] == "send":
                before, empty = queued_bytes(alpha, "bravo")[0], not _queue(alpha)
                full = len(_queue(alpha)) >= 8
                fut = alpha.send_tracked("bravo", app(op[1]))
                fits = not full and (empty or before + op[1] <= _BOUND)
                assert (fut is not None) == fits
                if fut is not None:
                    accepted.append(fut)
            elif op[0] == "hold":
                gates.append(hold_next_write(alpha.session("bravo")))
            elif op[0] == "release":
                for gate in gates:
                    gate.set()
            else:
                await asyncio.sleep(0)
            size, total = queued_bytes(alpha, "bravo")
            assert size == total
            assert size <= _BOUND or len(_queue(alpha)) == 1
        if close_held:  # what is queued is dropped (shutting-down), the rest was written
            await alpha.aclose()
            assert all(fut.done() for fut in accepted)
            assert queued_bytes(alpha, "bravo") == (0, 0)
            return
        for gate in gates:
            gate.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*accepted)
        assert queued_bytes(alpha, "bravo") == (0, 0)
        await until(lambda: len(got) == len(accepted) + 1, timeout=10)
    finally:
        await alpha.aclose()
        await bravo.aclose()
        await listener.aclose()


def _queue(table: PeerTable) -> list:
    box = table._outboxes.get("bravo")
    return [] if box is None else list(box.queue)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_OPS, st.booleans())
def test_the_byte_count_is_always_the_sum_over_what_is_queued(ops, close_held):
    """Whatever is sent, held and written, the outbox's count is the sum of what it holds,
    a send is refused exactly when it would pass a bound (a larger one goes alone), and
    everything accepted is written (or, closed while held, dropped), the count back to 0."""
    asyncio.run(_scenario(ops, close_held))
