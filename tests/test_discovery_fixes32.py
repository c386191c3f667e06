"""Session 32 review of discovery and revocation spreading: hostile adverts, a start that an
aclose overtakes, odd list files, and property tests for the revocation wire decoders."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import random
import stat
import threading
import uuid

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import Zeroconf
from zeroconf.asyncio import AsyncZeroconf

from meshinfer.discovery.addresses import is_unicast
from meshinfer.discovery.base import PeerAdvert
from meshinfer.discovery.mdns import MdnsConfig, MdnsDiscovery
from meshinfer.errors import LocalProtocolError, RemoteProtocolError
from meshinfer.proto import messages
from meshinfer.proto.identity import RevocationList
from meshinfer.proto.revocation_sync import PAGE_ENTRIES, RevocationExchange
from meshinfer.proto.revocation_wire import MAX_VERSION, RevocationsOffer, RevocationsWanted
from meshinfer.runtime.node import MeshNode
from meshinfer.runtime.revocations import RevocationSyncConfig
from meshinfer.testing.fleet import make_fleet
from tests.helpers import until
from tests.test_mesh_node import options

# --- addresses: IPv4-mapped IPv6 forms are judged as the IPv4 address they name ----------------


@pytest.mark.parametrize(
    "host", ["::ffff:0.0.0.0", "::ffff:224.0.0.251", "::ffff:255.255.255.255", "::ffff:239.1.2.3"]
)
def test_a_mapped_address_no_peer_listens_on_is_not_unicast(host: str) -> None:
    assert not is_unicast(host)  # ::ffff:0.0.0.0 dials this very host


@given(st.ip_addresses(v=4))
def test_a_mapped_address_is_unicast_exactly_when_its_ipv4_address_is(ip) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    assert is_unicast(str(mapped)) == is_unicast(str(ip))


@given(st.text(max_size=60) | st.ip_addresses().map(str))
def test_is_unicast_never_raises(host: str) -> None:
    assert is_unicast(host) in (True, False)


# --- mdns: an aclose that overtakes start leaves no zeroconf running --------------------------


def _open_zeroconfs() -> list[Zeroconf]:
    return [z for z in gc.get_objects() if isinstance(z, Zeroconf) and not z.done]


async def test_an_aclose_during_starts_interface_read_leaves_no_zeroconf_open() -> None:
    reading, release = threading.Event(), threading.Event()

    def slow_adapters():  # the interface read, in its worker thread, taking its time
        reading.set()
        release.wait(10)
        return []

    advert = PeerAdvert(
        node_id="car-a",
        fleet_id=f"f-{uuid.uuid4().hex[:8]}",
        static_key=os.urandom(32),
        roles=(),
        protocol_version=1,
        addresses=("127.0.0.1",),
        port=7000,
    )
    # (a scan of every object: long in a big test process, so off the loop's thread)
    before = set(map(id, await asyncio.to_thread(_open_zeroconfs)))
    source = MdnsDiscovery(advert, lambda e: None, MdnsConfig.loopback(), adapters=slow_adapters)
    starting = asyncio.ensure_future(source.start())
    await asyncio.to_thread(reading.wait, 10)
    await source.aclose()  # nothing to close yet
    release.set()
    with pytest.raises(LocalProtocolError, match="aclose"):
        await starting
    leaked = [z for z in await asyncio.to_thread(_open_zeroconfs) if id(z) not in before]
    for zc in leaked:  # (so that a failure here leaves no sockets behind)
        await AsyncZeroconf(zc=zc).async_close()
    assert not leaked


# --- revocations: a list file that is not a regular file ---------------------------------------


async def test_a_fifo_as_list_file_is_warned_about_and_holds_nothing_up(tmp_path, caplog) -> None:
    fleet = make_fleet(None, ["car-a", "car-b"])
    store = tmp_path / "revocations.bin"
    os.mkfifo(store)
    quick = RevocationSyncConfig(check_interval_s=0.05, ask_timeout_s=0.5)
    node = MeshNode(
        fleet.identities["car-a"],
        fleet.revocations,
        options(mdns=None, revocations_file=store, revocations=quick),
        rng=random.Random(1),
    )
    try:
        with caplog.at_level(logging.WARNING, logger="meshinfer.runtime.revocations"):
            await node.start()
            await until(lambda: "FIFO" in caplog.text, timeout=5.0)
            fleet.revoke("car-b")
            # a merge must not wait behind a read of the FIFO (it holds the file lock)
            async with asyncio.timeout(5.0):
                await node.revocation_sync.merge_list(fleet.revocations, "test")
        assert node.admission.revocations.version == 1
        assert stat_is_fifo(store)  # not written over
    finally:
        _unblock_fifo_reader(store)
        await node.aclose()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def stat_is_fifo(path) -> bool:
    return stat.S_ISFIFO(os.stat(path).st_mode)


def _unblock_fifo_reader(path) -> None:
    """Open the FIFO for writing and close it: a reader stuck in open() (the old code) gets
    end-of-file, so that the test's loop can shut its worker threads down."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader waiting: nothing to unblock
        return
    os.close(fd)


async def test_a_directory_as_list_file_is_warned_about_once(tmp_path, caplog) -> None:
    fleet = make_fleet(None, ["car-a"])
    store = tmp_path / "revocations.bin"
    store.mkdir()
    quick = RevocationSyncConfig(check_interval_s=0.02, ask_timeout_s=0.5)
    node = MeshNode(
        fleet.identities["car-a"],
        fleet.revocations,
        options(mdns=None, revocations_file=store, revocations=quick),
        rng=random.Random(1),
    )
    try:
        with caplog.at_level(logging.WARNING, logger="meshinfer.runtime.revocations"):
            await node.start()
            sync = node.revocation_sync
            await until(lambda: sync.stats.checks >= 5, timeout=5.0)
    finally:
        await node.aclose()
    warned = [r for r in caplog.records if "is a directory" in r.getMessage()]
    assert len(warned) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- property tests: the revocation wire decoders and the exchange's answers -------------------

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(st.sampled_from([17, 18]), st.lists(_values, max_size=3))
def test_revocation_messages_decode_or_raise_remote_protocol_error(type_id, fields) -> None:
    wire = msgpack.packb([type_id, *fields], use_bin_type=True)
    try:
        msg = messages.decode(wire)
    except RemoteProtocolError:
        return
    assert isinstance(msg, RevocationsWanted | RevocationsOffer)
    if isinstance(msg, RevocationsWanted):
        assert 0 <= msg.have <= MAX_VERSION


@given(st.binary(max_size=200))
def test_revocation_message_bytes_decode_or_raise_remote_protocol_error(tail: bytes) -> None:
    for type_id in (17, 18):
        try:
            messages.decode(bytes([0x92, type_id]) + tail)
        except RemoteProtocolError:
            pass


@given(
    st.lists(st.binary(max_size=30), max_size=PAGE_ENTRIES + 2),
    st.booleans(),
    st.floats(min_value=0, max_value=10),
)
def test_take_keeps_only_fresh_entries_of_a_page_asked_for(entries, asked, later) -> None:
    exchange = RevocationExchange(RevocationList("fleet"), patience=5.0, answer_interval=0.05)
    if asked:
        exchange.asked("car-b", claimed=9, now=0.0)
    answer = exchange.take("car-b", RevocationsOffer(tuple(entries)), later)
    if not asked or later >= 5.0 or len(entries) > PAGE_ENTRIES:
        assert answer is None
        return
    assert answer is not None
    assert list(answer.fresh) == list(dict.fromkeys(entries))
    assert answer.full == (len(entries) == PAGE_ENTRIES)
    assert exchange.take("car-b", RevocationsOffer(tuple(entries)), later) is None  # answered


@given(
    st.integers(min_value=0, max_value=MAX_VERSION), st.integers(min_value=0, max_value=MAX_VERSION)
)
def test_answers_at_any_version_are_pages_that_encode(have: int, again: int) -> None:
    exchange = RevocationExchange(RevocationList("fleet"), patience=5.0, answer_interval=0.05)
    offer = exchange.answer("car-b", RevocationsWanted(have), 0.0)
    assert offer == RevocationsOffer(())
    messages.decode(messages.encode(offer))
    second = exchange.answer("car-b", RevocationsWanted(again), 0.01)
    assert (second is None) == (again <= have)
