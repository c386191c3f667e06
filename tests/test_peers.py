"""The peer table's outboxes: queued messages go out in order, many per write, and a message
that can never be sent is refused without blocking the ones behind it.

Each behaviour runs over the in-memory transport and over real TCP on loopback.
"""

from __future__ import annotations

import asyncio

import pytest

from meshinfer.errors import LocalProtocolError, TransportError
from meshinfer.proto.messages import AppData
from meshinfer.runtime.endpoint import SessionListener
from meshinfer.runtime.peers import WRITE_BATCH, PeerTable
from meshinfer.runtime.session import SessionConfig
from meshinfer.testing.fleet import make_fleet
from tests.helpers import until


class Pair:
    """Peer tables for ``alpha`` and ``bravo``; bravo listens and keeps the AppData it gets."""

    def __init__(self, transport, addr, config: SessionConfig | None = None) -> None:
        self.fleet = make_fleet(None, ["alpha", "bravo"])
        self.addr = addr
        kw = {"config": config} if config else {}
        self.alpha = PeerTable("alpha", transport, self.fleet.admission("alpha"), **kw)
        self.bravo = PeerTable("bravo", transport, self.fleet.admission("bravo"), **kw)
        self.listener = SessionListener(
            transport, self.fleet.admission("bravo"), self.bravo.serve_inbound, **kw
        )
        self.got: asyncio.Queue[bytes] = asyncio.Queue()
        self.bravo.on(AppData, lambda _peer, msg: self.got.put_nowait(msg.payload))

    async def __aenter__(self) -> Pair:
        bound = await self.listener.start(self.addr)
        self.alpha.learn("bravo", bound, self.fleet.identities["bravo"].static_public)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.alpha.aclose()
        await self.bravo.aclose()
        await self.listener.aclose()

    async def received(self, n: int) -> list[bytes]:
        async with asyncio.timeout(10):
            return [await self.got.get() for _ in range(n)]


async def test_a_burst_of_sends_arrives_whole_and_in_order(transport_and_addr):
    async with Pair(*transport_and_addr) as pair:
        payloads = [b"%d" % n for n in range(3 * WRITE_BATCH + 5)]
        for payload in payloads:  # all queued in one turn of the loop
            assert pair.alpha.send("bravo", AppData(topic="t", payload=payload))
        assert await pair.received(len(payloads)) == payloads
        assert pair.alpha.stats.sent == len(payloads)


async def test_a_message_too_large_to_send_is_refused_and_the_rest_go_on(transport_and_addr):
    async with Pair(*transport_and_addr, SessionConfig(max_message_size=100_000)) as pair:
        await pair.alpha.request("bravo", AppData(topic="t", payload=b"first"))
        pair.alpha.send("bravo", AppData(topic="t", payload=b"before"))
        too_large = pair.alpha.request("bravo", AppData(topic="t", payload=b"x" * 200_000))
        pair.alpha.send("bravo", AppData(topic="t", payload=b"after"))
        with pytest.raises(LocalProtocolError, match="exceeds"):
            await too_large
        assert await pair.received(3) == [b"first", b"before", b"after"]
        assert pair.alpha.stats.dropped["too-large"] == 1
        await pair.alpha.request("bravo", AppData(topic="t", payload=b"later"))
        assert await pair.received(1) == [b"later"]


async def test_a_session_whose_write_fails_is_ended_and_redialled(transport_and_addr):
    """The stream fails the write before the session's reader has noticed anything: that write
    ends the session (lost, its stream closed), and the sender dials a new one for what is
    queued rather than retrying the broken one."""
    async with Pair(*transport_and_addr) as pair:
        await pair.alpha.request("bravo", AppData(topic="t", payload=b"first"))
        broken = pair.alpha.session("bravo")
        real_write, calls = broken.stream.write, []

        async def failing_write(data: bytes) -> None:
            calls.append(len(data))
            if len(calls) > 50:  # were the broken session retried, it would spin here
                return await real_write(data)
            raise TransportError("write failed, the reader none the wiser")

        broken.stream.write = failing_write
        await pair.alpha.request("bravo", AppData(topic="t", payload=b"second"))
        assert await pair.received(2) == [b"first", b"second"]
        assert len(calls) == 1  # one failed write, then a new session
        assert not broken.is_open and broken.lost  # ended as lost: no Close frame went
        assert pair.alpha.session("bravo") is not broken
        assert pair.alpha.stats.dials == 2


async def test_a_send_never_written_tells_its_on_failure_and_a_written_one_does_not(
    transport_and_addr, caplog
):
    async with Pair(*transport_and_addr) as pair:
        failures: list[tuple[bytes, BaseException]] = []

        def on_failure(payload: bytes):
            return lambda error: failures.append((payload, error))

        assert pair.alpha.send("bravo", AppData(topic="t", payload=b"ok"), on_failure(b"ok"))
        assert await pair.received(1) == [b"ok"]
        await pair.alpha.request("bravo", AppData(topic="t", payload=b"after"))  # (in order)
        assert await pair.received(1) == [b"after"] and failures == []

        await pair.alpha.disconnect("bravo")
        await pair.listener.aclose()  # nobody at bravo's address now: the re-dial fails
        assert pair.alpha.send("bravo", AppData(topic="t", payload=b"lost"), on_failure(b"lost"))
        await until(lambda: failures)
        assert [(p, type(e)) for p, e in failures] == [(b"lost", TransportError)]
        assert "dial-failed" in str(failures[0][1])

        def broken(error: BaseException) -> None:
            raise RuntimeError("bug in a sender's callback")

        assert pair.alpha.send("bravo", AppData(topic="t", payload=b"x"), broken)  # backoff
        assert pair.alpha.send("bravo", AppData(topic="t", payload=b"y"), on_failure(b"y"))
        await until(lambda: len(failures) == 2)
        assert failures[1][0] == b"y" and "unreachable" in str(failures[1][1])
        assert "on_failure callback of a send failed" in caplog.text
