"""The peer table's outboxes: queued messages go out in order, many per write, and a message
that can never be sent is refused without blocking the ones behind it.

Each behaviour runs over the in-memory transport and over real TCP on loopback.
"""

from __future__ import annotations

import asyncio

import pytest

from meshinfer.errors import LocalProtocolError, StreamClosed, TransportError
from meshinfer.proto.messages import AppData
from meshinfer.runtime.endpoint import SessionListener
from meshinfer.runtime.peers import WRITE_BATCH, PeerTable
from meshinfer.runtime.session import Session, SessionConfig
from meshinfer.testing.fleet import make_fleet
from tests.helpers import dial_again, until


class Pair:
    """Peer tables for ``alpha`` and ``bravo``; bravo listens and keeps the AppData it gets.
    ``alpha_config``, if given, is alpha's alone."""

    def __init__(
        self,
        transport,
        addr,
        config: SessionConfig | None = None,
        alpha_config: SessionConfig | None = None,
    ) -> None:
        self.fleet = make_fleet(None, ["alpha", "bravo"])
        self.addr = addr
        kw = {"config": config} if config else {}
        alpha_kw = {"config": alpha_config} if alpha_config else kw
        self.alpha = PeerTable("alpha", transport, self.fleet.admission("alpha"), **alpha_kw)
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

    async def redial(self) -> Session:
        """alpha dials bravo once more (as after roaming), its older session still open; the
        new session is adopted on both sides when this returns."""
        before = len(self.bravo.open_sessions("alpha"))
        session = await dial_again(self.alpha, "bravo")
        await until(lambda: len(self.bravo.open_sessions("alpha")) > before)
        return session


def stick_writes(session: Session) -> None:
    """From now on a write to ``session`` never completes until the session ends (then it
    fails): a send buffer full behind a link that died without a reset."""

    async def write(data: bytes) -> None:
        await session.wait_closed()
        raise StreamClosed("closed while a write was stuck")

    session.stream.write = write


def record_writes(session: Session, *, deliver: bool) -> list[int]:
    """Count what ``session`` writes from now on (the sizes); with ``deliver`` False the
    writes vanish, as into a connection whose far end is gone but was never reset."""
    writes: list[int] = []
    real_write = session.stream.write

    async def write(data: bytes) -> None:
        writes.append(len(data))
        if deliver:
            await real_write(data)

    session.stream.write = write
    return writes


def keep_app_data(peers: PeerTable) -> asyncio.Queue[bytes]:
    got: asyncio.Queue[bytes] = asyncio.Queue()
    peers.on(AppData, lambda _peer, msg: got.put_nowait(msg.payload))
    return got


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


# --- several sessions with one peer --------------------------------------------------------

#: bravo checks older sessions quickly; alpha (the peer that re-dials) leaves its own unchecked,
#: so that what happens to bravo's older session is bravo's doing alone
QUICK_CHECK = SessionConfig(verify_timeout=0.3)
#: for a session that answers: one round trip, however long a busy machine takes
PATIENT_CHECK = SessionConfig(verify_timeout=30.0)
NO_CHECK = SessionConfig(verify_timeout=0)


async def redialled(pair: Pair, *, old_delivers: bool):
    """alpha says hello (bravo then has one session with it) and dials again: returns what
    alpha receives, bravo's older session, and what bravo wrote to that one since (see
    :func:`record_writes` for ``old_delivers``)."""
    at_alpha = keep_app_data(pair.alpha)
    await pair.alpha.request("bravo", AppData(topic="t", payload=b"hello"))
    (old,) = pair.bravo.open_sessions("alpha")
    writes = record_writes(old, deliver=old_delivers)
    await pair.redial()
    return at_alpha, old, writes


async def test_a_peer_that_dials_again_gets_what_is_sent_to_it_over_the_new_session(
    transport_and_addr,
):
    """The older session looks open but is dead (writes into it vanish): when the peer dials
    again, it does not answer bravo's ping, so bravo abandons it as lost, and what bravo sends
    meanwhile waits and goes over the new session instead of into the dead one."""
    async with Pair(*transport_and_addr, QUICK_CHECK, alpha_config=NO_CHECK) as pair:
        at_alpha, old, into_the_void = await redialled(pair, old_delivers=False)
        assert pair.bravo.send("alpha", AppData(topic="t", payload=b"answer"))
        async with asyncio.timeout(10):
            assert await at_alpha.get() == b"answer"
        assert not old.is_open and old.lost  # its watchers re-send what went over it
        assert "no answer to a ping" in old.close_reason
        assert len(into_the_void) == 1  # the ping; the answer waited for it
        assert (pair.bravo.stats.abandoned, pair.bravo.stats.verified) == (1, 0)
        (new,) = pair.bravo.open_sessions("alpha")
        assert new is not old and pair.bravo.session("alpha") is new


async def test_an_older_session_that_answers_keeps_carrying_the_messages(transport_and_addr):
    """Both sessions work (the two sides dialled at once): the older one answers the ping and
    stays the one messages go over; what was sent while the ping was out arrives, in order."""
    async with Pair(*transport_and_addr, PATIENT_CHECK, alpha_config=NO_CHECK) as pair:
        at_alpha, old, over_old = await redialled(pair, old_delivers=True)
        (new,) = [s for s in pair.bravo.open_sessions("alpha") if s is not old]
        over_new = record_writes(new, deliver=True)
        payloads = [b"%d" % n for n in range(10)]
        for payload in payloads:
            assert pair.bravo.send("alpha", AppData(topic="t", payload=payload))
        async with asyncio.timeout(10):
            assert [await at_alpha.get() for _ in payloads] == payloads
        assert (pair.bravo.stats.verified, pair.bravo.stats.abandoned) == (1, 0)
        assert old.is_open and new.is_open and pair.bravo.session("alpha") is old
        assert len(over_old) >= 2 and over_new == []  # the ping, then the ten


async def test_with_no_verify_timeout_an_older_session_is_left_unchecked(transport_and_addr):
    async with Pair(*transport_and_addr, NO_CHECK) as pair:
        _, old, into_the_void = await redialled(pair, old_delivers=False)
        await pair.bravo.request("alpha", AppData(topic="t", payload=b"lost"))
        assert into_the_void and old.is_open and pair.bravo.session("alpha") is old
        assert (pair.bravo.stats.verified, pair.bravo.stats.abandoned) == (0, 0)


def test_a_negative_verify_timeout_is_refused():
    with pytest.raises(ValueError, match="verify_timeout"):
        SessionConfig(verify_timeout=-1)


async def test_an_older_session_whose_write_is_stuck_is_abandoned_and_its_message_goes_on(
    transport_and_addr,
):
    """bravo's write into the older session never completes (it holds the session's writer, so
    the ping cannot even be written): the check still ends after ``verify_timeout``, and the
    message stuck there goes over the new session, followed by the next one."""
    async with Pair(*transport_and_addr, QUICK_CHECK, alpha_config=NO_CHECK) as pair:
        at_alpha = keep_app_data(pair.alpha)
        await pair.alpha.request("bravo", AppData(topic="t", payload=b"hello"))
        (old,) = pair.bravo.open_sessions("alpha")
        stick_writes(old)
        assert pair.bravo.send("alpha", AppData(topic="t", payload=b"stuck"))
        await until(lambda: old._write_lock.locked())
        await pair.redial()
        assert pair.bravo.send("alpha", AppData(topic="t", payload=b"next"))
        async with asyncio.timeout(10):
            assert [await at_alpha.get(), await at_alpha.get()] == [b"stuck", b"next"]
        assert old.lost and pair.bravo.stats.abandoned == 1


async def test_overlapping_checks_of_one_peer_all_settle_before_it_gets_messages(
    transport_and_addr,
):
    """alpha dials twice more while its first session with bravo is dead: two checks of it
    run at once; bravo's message waits for both, then goes over a session that works."""
    async with Pair(*transport_and_addr, QUICK_CHECK, alpha_config=NO_CHECK) as pair:
        at_alpha, old, _ = await redialled(pair, old_delivers=False)
        await pair.redial()
        assert pair.bravo.send("alpha", AppData(topic="t", payload=b"answer"))
        async with asyncio.timeout(10):
            assert await at_alpha.get() == b"answer"
        assert old.lost and pair.bravo.stats.abandoned == 1  # pinged twice, abandoned once
        assert pair.bravo.stats.verified == 1  # the second check found the first redial alive
        await until(lambda: not pair.bravo._verifying)


async def test_a_table_closed_during_a_check_stops_at_once(transport_and_addr):
    slow = SessionConfig(verify_timeout=60.0)
    async with Pair(*transport_and_addr, slow, alpha_config=NO_CHECK) as pair:
        _, old, _ = await redialled(pair, old_delivers=False)
        assert pair.bravo.send("alpha", AppData(topic="t", payload=b"waits"))
        await until(lambda: pair.bravo._verifying)
        async with asyncio.timeout(5):
            await pair.bravo.aclose()
        assert not old.is_open and pair.bravo.stats.dropped["shutting-down"] == 1


async def test_a_role_counts_only_while_every_session_listed_with_the_peer_proves_it(
    transport_and_addr,
):
    """alpha, a coordinator, is re-enrolled as a vehicle and dials again while its session
    under the older certificate is still listed: bravo no longer takes it for a coordinator."""
    async with Pair(*transport_and_addr) as pair:
        pair.fleet.enroll("alpha", ("vehicle", "coordinator"))
        pair.alpha.admission = pair.fleet.admission("alpha")
        await pair.alpha.request("bravo", AppData(topic="t", payload=b"hello"))
        assert pair.bravo.roles("alpha") == {"vehicle", "coordinator"}
        pair.fleet.enroll("alpha", ("vehicle",))
        pair.alpha.admission = pair.fleet.admission("alpha")
        await pair.redial()
        assert len(pair.bravo.open_sessions("alpha")) == 2
        assert pair.bravo.roles("alpha") == {"vehicle"}
        assert pair.bravo.roles("nobody") == frozenset()
