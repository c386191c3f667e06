"""The peer table and the revocation exchange (session 28): what is queued for a re-enrolled
node goes over its good session while the one under its revoked certificate is cut; a batch
with a message that does not encode drops that message alone; a tracked send whose owner
dropped it is never reported as an exception nobody retrieved; the revocation file is looked
at off the loop; the exchange holds a growing list as it would the whole list.

Real Noise sessions over TCP on loopback (and the in-memory transport), real MeshNodes.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.errors import LocalProtocolError, TransportError
from meshinfer.identity_files import file_stamp
from meshinfer.proto.identity import NodeIdentity, RevocationList
from meshinfer.proto.messages import AppData
from meshinfer.proto.revocation_sync import PAGE_ENTRIES, RevocationExchange
from meshinfer.proto.revocation_wire import RevocationsWanted
from meshinfer.runtime import revocations
from meshinfer.runtime.endpoint import SessionListener
from meshinfer.runtime.peers import PeerTable
from meshinfer.runtime.revocations import RevocationSyncConfig
from meshinfer.runtime.session import Admission, Session, SessionConfig
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpTransport
from tests.helpers import until
from tests.test_mesh_node import nodes_for, options
from tests.test_peers import Pair
from tests.test_revocation_fixes27 import hold_next_write, on_send_many

#: alpha's check of bravo's older session when the newer one opens: it answers (one round
#: trip), so no test waits for this; only a stall this long could abandon it
PATIENT = SessionConfig(verify_timeout=60.0)


def keep_app_data(peers: PeerTable) -> list[bytes]:
    got: list[bytes] = []
    peers.on(AppData, lambda _peer, msg: got.append(msg.payload))
    return got


class Reenrolled:
    """alpha listens; bravo dials it under its first certificate, then again under a new one
    (re-enrolled, as after a theft of the first): alpha holds two sessions with "bravo", the
    older under the old certificate. ``revoke_old()``: alpha's list in force now names the
    old certificate's serial (merged, not cut)."""

    def __init__(self) -> None:
        self.fleet = make_fleet(None, ["alpha", "bravo"])
        self.old: NodeIdentity = self.fleet.identities["bravo"]
        self.new = self.fleet.enroll("bravo")
        self.transport = TcpTransport()
        self.admission = self.fleet.admission("alpha")
        self.alpha = PeerTable("alpha", self.transport, self.admission, config=PATIENT)
        self.listener = SessionListener(self.transport, self.admission, self.alpha.serve_inbound)
        empty = RevocationList(self.fleet.authority.fleet_id)
        self.bravo = {
            which: PeerTable("bravo", self.transport, Admission(ident, empty))
            for which, ident in (("old", self.old), ("new", self.new))
        }
        self.got = {which: keep_app_data(table) for which, table in self.bravo.items()}

    async def __aenter__(self) -> Reenrolled:
        bound = await self.listener.start(Address("127.0.0.1", 0))
        for n, which in enumerate(("old", "new"), start=1):
            table = self.bravo[which]
            table.learn("alpha", bound, self.fleet.identities["alpha"].static_public)
            await table.request("alpha", AppData("t", b"hello"))
            await until(lambda n=n: len(self.alpha.open_sessions("bravo")) == n)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.alpha.aclose()
        for table in self.bravo.values():
            await table.aclose()
        await self.listener.aclose()

    @property
    def old_session(self) -> Session:
        (session,) = [
            s
            for s in self.alpha.open_sessions("bravo")
            if s.peer.serial == self.old.certificate.serial
        ]
        return session

    def revoke_old(self) -> None:
        self.admission.revocations = self.fleet.authority.revoke(
            self.admission.revocations, now=time.time(), serial=self.old.certificate.serial
        )


async def test_what_is_queued_for_a_reenrolled_node_goes_over_its_good_session():
    """It was dropped (counted ``revoked``, its requester told) while the session under the
    revoked certificate, the older one, was being cut, although the node's new one was up."""
    async with Reenrolled() as r:
        await r.alpha.request("bravo", AppData("t", b"before"))
        await until(lambda: r.got["old"] == [b"before"])  # the older session carried
        r.revoke_old()
        await r.alpha.request("bravo", AppData("t", b"after"))
        await until(lambda: r.got["new"] == [b"after"])
        assert r.got["old"] == [b"before"]
        assert r.alpha.stats.dropped["revoked"] == 0
        assert r.alpha.carrier_revoked("bravo")  # new work still held back until the cut
        await r.old_session.aclose()  # the cut
        assert not r.alpha.carrier_revoked("bravo")
        await r.alpha.request("bravo", AppData("t", b"later"))
        await until(lambda: r.got["new"] == [b"after", b"later"])


async def test_what_waits_for_a_revoked_sessions_writer_goes_over_the_good_session():
    """The batch was waiting for the older session's writer (busy with a ping) when the list
    came in force: the session refuses it, and the table sends it over the good one."""
    async with Reenrolled() as r:
        await r.alpha.request("bravo", AppData("t", b"before"))
        old = r.old_session
        gate, entered = hold_next_write(old), on_send_many(old)
        ping = asyncio.create_task(old.ping())  # session control holds the writer
        await until(old._write_lock.locked)
        queued = [r.alpha.send_tracked("bravo", AppData("t", b"q%d" % i)) for i in range(3)]
        await entered.wait()  # the outbox's batch waits for the old session's writer
        r.revoke_old()
        gate.set()
        await ping
        assert await asyncio.gather(*queued) == [None, None, None]
        await until(lambda: len(r.got["new"]) == 3)
        assert r.got["new"] == [b"q0", b"q1", b"q2"]
        assert r.got["old"] == [b"before"]


async def test_with_no_good_session_what_is_queued_for_a_revoked_node_is_still_dropped():
    async with Reenrolled() as r:
        for s in r.alpha.open_sessions("bravo"):
            if s is not r.old_session:
                await s.aclose()
        await until(lambda: len(r.alpha.open_sessions("bravo")) == 1)
        r.revoke_old()
        with pytest.raises(TransportError, match="revoked"):
            await r.alpha.request("bravo", AppData("t", b"lost"))
        assert r.alpha.stats.dropped["revoked"] == 1
        assert r.got["old"] == []


async def test_a_message_that_does_not_encode_is_dropped_alone(transport_and_addr):
    """It was not first in its batch: the table took the batch's first message for the bad
    one, dropped it (as ``too-large``, its requester told), and so on up to the bad one."""
    async with Pair(*transport_and_addr) as pair:
        await pair.alpha.request("bravo", AppData(topic="t", payload=b"first"))
        good = [pair.alpha.send_tracked("bravo", AppData("t", b"g%d" % i)) for i in range(2)]
        bad = pair.alpha.send_tracked("bravo", AppData("t", object()))  # msgpack refuses it
        good.append(pair.alpha.send_tracked("bravo", AppData("t", b"g2")))
        assert await asyncio.gather(*good) == [None, None, None]
        with pytest.raises(LocalProtocolError, match="cannot encode"):
            await bad
        assert await pair.received(4) == [b"first", b"g0", b"g1", b"g2"]
        assert pair.alpha.stats.dropped["too-large"] == 1


@contextmanager
def reported() -> Iterator[list[str]]:
    """What the running loop's exception handler is given meanwhile (asyncio would log each
    at ERROR: "Future exception was never retrieved"); garbage is collected at the end."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context["message"]))
    try:
        yield seen
        gc.collect()
    finally:
        loop.set_exception_handler(previous)


async def test_a_failed_tracked_send_whose_owner_dropped_it_is_not_reported():
    fleet = make_fleet(None, ["alpha", "bravo"])
    transport = TcpTransport()
    listener = SessionListener(transport, fleet.admission("bravo"), lambda s: s.aclose())
    gone = await listener.start(Address("127.0.0.1", 0))
    await listener.aclose()  # nobody listens there now: the dial fails
    alpha = PeerTable("alpha", transport, fleet.admission("alpha"))
    alpha.learn("bravo", gone, fleet.identities["bravo"].static_public)
    try:
        with reported() as seen:
            assert alpha.send_tracked("bravo", AppData("t", b"x")) is not None  # dropped
            await until(lambda: alpha.stats.dropped["dial-failed"] == 1)
        assert seen == []
        with pytest.raises(TransportError, match="unreachable"):  # an owner still hears it
            await alpha.request("bravo", AppData("t", b"y"))
    finally:
        await alpha.aclose()


async def test_the_revocation_file_is_looked_at_in_a_worker_thread(tmp_path, monkeypatch):
    """The look (a stat every ``check_interval_s``) ran on the loop: on a network file system
    a stat can block."""
    threads: list[int] = []

    def stamp(path):
        threads.append(threading.get_ident())
        return file_stamp(path)

    monkeypatch.setattr(revocations, "file_stamp", stamp)
    fleet = make_fleet(None, ["car-a"])
    store = tmp_path / "revocations.bin"
    config = RevocationSyncConfig(check_interval_s=0.05)
    (node,) = nodes_for(
        fleet, ["car-a"], lambda _: options(revocations_file=store, revocations=config)
    )
    await node.start()
    try:
        await until(lambda: len(threads) >= 3)
    finally:
        await node.aclose()
    assert threading.get_ident() not in threads


# --- the exchange holds a growing list as it holds the whole list ----------------------------

_FLEET = make_fleet(node_ids=())
for _i in range(24):
    _FLEET.revoke(f"veh-{_i}")
_ENTRIES = sorted(_FLEET.revocations.entries, key=lambda e: e.sequence)


def _pages(exchange: RevocationExchange) -> list[tuple[bytes, ...]]:
    return [
        exchange.answer(f"p{have}", RevocationsWanted(have=have), 0.0).entries
        for have in range(len(_ENTRIES) + 1)
    ]


def _unbroken(held: set) -> int:
    """The version of ``held``: the highest sequence up to which it has every entry (a list
    with a gap is gossiped, and answered, only up to the gap: test_revocation_fixes36)."""
    sequences, version = {e.sequence for e in held}, 0
    while version + 1 in sequences:
        version += 1
    return version


def _expected(held: set) -> list[tuple[bytes, ...]]:
    version = _unbroken(held)
    ordered = sorted(held, key=lambda e: (e.sequence, e.signature))
    return [
        tuple(e.to_bytes() for e in ordered if have < e.sequence <= version)[:PAGE_ENTRIES]
        for have in range(len(_ENTRIES) + 1)
    ]


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 24), max_size=6), shuffle=st.randoms(use_true_random=False))
def test_an_exchange_fed_a_growing_list_answers_as_for_the_whole_list(cuts, shuffle):
    """Merges add entries above the version (appended) or anywhere (the list taken whole)."""
    fleet_id = _FLEET.revocations.fleet_id
    order = list(_ENTRIES)
    if shuffle.random() < 0.5:
        shuffle.shuffle(order)
    grown = RevocationExchange(RevocationList(fleet_id), patience=1.0, answer_interval=0.0)
    held: set = set()
    for cut in [*cuts, len(order)]:
        held |= set(order[:cut])
        grown.hold(RevocationList(fleet_id, frozenset(held)))
        assert grown.version == _unbroken(held)
        assert _pages(grown) == _expected(held)


async def test_a_session_callback_that_raises_neither_stalls_the_send_nor_drops_the_session(
    transport_and_addr, caplog
):
    """It raised out of the dial's adopt into the peer's sender task, which ended: the message
    that made it dial stayed queued (its requester waiting) until another was sent."""
    async with Pair(*transport_and_addr) as pair:

        def broken(peer: str, session: Session) -> None:
            raise RuntimeError("bug in a session callback")

        pair.alpha.on_session(broken)
        async with asyncio.timeout(10):
            await pair.alpha.request("bravo", AppData(topic="t", payload=b"hello"))
        assert await pair.received(1) == [b"hello"]
        assert pair.alpha.session("bravo") is not None
        assert "session callback for bravo failed" in caplog.text
