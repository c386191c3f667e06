"""mDNS review (session 33): records anyone on the link can send under a peer's name.

Discovery only adds candidate addresses; admission is by Noise and the fleet certificate. A TXT,
SRV or address record that does not parse, or an SRV record naming another host, must not make
the re-read of the cache (``_check_peer_addresses``) report a peer ``lost``: only the peer's
goodbye or the expiry of its own records does. Live tests use real zeroconf on 127.0.0.1 as
``tests/test_discovery_mdns.py`` does, each with its own fleet id.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

import pytest
from zeroconf import DNSAddress, DNSOutgoing, DNSService, current_time_millis
from zeroconf.asyncio import AsyncZeroconf
from zeroconf.const import _CLASS_IN, _CLASS_UNIQUE, _TYPE_A, _TYPE_SRV

from meshinfer.discovery.base import MalformedAdvert
from meshinfer.discovery.mdns import MdnsDiscovery
from meshinfer.discovery.mdns_cache import advert_from_service
from meshinfer.discovery.mdns_txt import instance_label, pack_txt
from tests.test_discovery_hunt import _send_txt, _service_of, _wait_until
from tests.test_discovery_mdns import (
    LOOPBACK,
    MDNS_RESPONSE_FLAGS,
    Recorder,
    make_advert,
    spy_on,
)

# The cache is re-read by hand (``_check_peer_addresses``), never by the watch's timer.
MANUAL = replace(LOOPBACK, address_check_interval=None)


@pytest.fixture
def fleet() -> str:
    return f"fleet-{uuid.uuid4().hex[:8]}"


async def _pair(fleet: str, stack: list[MdnsDiscovery]) -> tuple[MdnsDiscovery, Recorder]:
    """veh-a (re-read by hand), and veh-b that it has found."""
    seen = Recorder()
    a = MdnsDiscovery(make_advert("veh-a", fleet), seen, MANUAL)
    b = MdnsDiscovery(make_advert("veh-b", fleet), Recorder(), MANUAL)
    for source in (a, b):
        await source.start()
        stack.append(source)
    await seen.wait("found", "veh-b")
    return a, seen


async def _close(stack: list[MdnsDiscovery]) -> None:
    for source in reversed(stack):
        await source.aclose()


def _send(raw: AsyncZeroconf, *records: object) -> None:
    out = DNSOutgoing(MDNS_RESPONSE_FLAGS)
    for record in records:
        out.add_answer_at_time(record, 0)  # type: ignore[arg-type]
    raw.zeroconf.async_send(out)


async def test_a_forged_txt_record_does_not_make_the_cache_check_lose_a_peer(fleet: str) -> None:
    stack: list[MdnsDiscovery] = []
    try:
        a, seen = await _pair(fleet, stack)
        b = stack[1]
        malformed = spy_on(a, "malformed")
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            await _send_txt(raw, b.service_name, pack_txt({"txtvers": "1", "id": "junk"}))
            await _wait_until(malformed, lambda: a.stats.ignored_malformed >= 1)
        a._check_peer_addresses()  # the forged TXT is the newest in a's cache
        assert [e.kind for e in seen.events if e.node_id == "veh-b"] == ["found"]
        assert a.peers["veh-b"] == b.advert and a.stats.lost == 0
    finally:
        await _close(stack)


async def test_a_forged_srv_record_naming_another_host_does_not_lose_a_peer(fleet: str) -> None:
    stack: list[MdnsDiscovery] = []
    try:
        a, seen = await _pair(fleet, stack)
        b = stack[1]
        sighted = spy_on(a, "malformed")
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            await raw.zeroconf.async_wait_for_start()
            srv = DNSService(
                b.service_name, _TYPE_SRV, _CLASS_IN | _CLASS_UNIQUE, 120, 0, 0, 7000, "x.local."
            )
            _send(raw, srv)  # a host with no address record: the service is incomplete
            await _wait_until(sighted, lambda: a.stats.ignored_malformed >= 1)
        a._check_peer_addresses()
        assert [e.kind for e in seen.events if e.node_id == "veh-b"] == ["found"]
        assert a.peers["veh-b"] == b.advert and a.stats.lost == 0
    finally:
        await _close(stack)


async def test_a_forged_srv_record_with_addresses_elsewhere_is_not_taken(fleet: str) -> None:
    """An SRV record pointing a peer's service at a host the attacker owns is malformed: the
    SRV target of a meshinfer service is ``<label>.local.``."""
    stack: list[MdnsDiscovery] = []
    try:
        a, seen = await _pair(fleet, stack)
        b = stack[1]
        malformed = spy_on(a, "malformed")
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            await raw.zeroconf.async_wait_for_start()
            flag = _CLASS_IN | _CLASS_UNIQUE
            srv = DNSService(b.service_name, _TYPE_SRV, flag, 120, 0, 0, 7000, "evil.local.")
            addr = DNSAddress("evil.local.", _TYPE_A, flag, 120, bytes([127, 0, 0, 9]))
            _send(raw, addr, srv)
            await _wait_until(malformed, lambda: a.stats.ignored_malformed >= 1)
        a._check_peer_addresses()
        assert [e.kind for e in seen.events if e.node_id == "veh-b"] == ["found"]
        assert a.peers["veh-b"] == b.advert
    finally:
        await _close(stack)


async def test_forged_records_leave_the_peer_until_its_own_addresses_expire(fleet: str) -> None:
    """Records that do not parse keep the reported advert, less the addresses whose own
    records expired: a peer gone for good is still lost."""
    stack: list[MdnsDiscovery] = []
    try:
        a, seen = await _pair(fleet, stack)
        b = stack[1]
        malformed = spy_on(a, "malformed")
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            await _send_txt(raw, b.service_name, b"\x05junk!")
            await _wait_until(malformed, lambda: a.stats.ignored_malformed >= 1)
        from meshinfer.discovery.mdns_cache import live_addresses

        assert a._zc is not None
        zc = a._zc.zeroconf
        host = f"{instance_label('veh-b', fleet)}.local."
        assert live_addresses(zc, host, current_time_millis()) == frozenset(b.advert.addresses)
        for record in zc.cache.get_all_by_details(host, _TYPE_A, _CLASS_IN):
            record.created = current_time_millis() - record.ttl * 1000 - 1  # b went silent
        a._check_peer_addresses()
        await seen.wait("lost", "veh-b")
        assert "veh-b" not in a.peers
    finally:
        await _close(stack)


def test_advert_from_service_refuses_an_srv_target_not_derived_from_the_label(fleet: str) -> None:
    info = _service_of(make_advert("veh-b", fleet, addresses=("127.0.0.1",)))
    info.server = "elsewhere.local."
    with pytest.raises(MalformedAdvert, match="host"):
        advert_from_service(info.name, info)


async def test_forged_records_log_nothing_at_error(fleet: str, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    stack: list[MdnsDiscovery] = []
    try:
        a, _ = await _pair(fleet, stack)
        b = stack[1]
        malformed = spy_on(a, "malformed")
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            for text in (b"\xff" * 300, b"\x03a=\xff" * 50, b"", b"\x00" * 40):
                await _send_txt(raw, b.service_name, text[:8000])
            await _wait_until(malformed, lambda: a.stats.ignored_malformed >= 1)
        a._check_peer_addresses()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "veh-b" in a.peers
    finally:
        await _close(stack)
