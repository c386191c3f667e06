"""Discovery review (session 34): duplicate seed ids, one rule for a dialable host, a stable
order for a peer's mDNS addresses, interfaces that are down, and a peer whose key flips.

Live tests use real zeroconf on 127.0.0.1 as ``tests/test_discovery_mdns.py`` does, each with
its own fleet id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import replace

import ifaddr
import pytest
from zeroconf.asyncio import AsyncServiceInfo

from meshinfer.discovery.addresses import only_up, up_adapters
from meshinfer.discovery.base import EventQueue
from meshinfer.discovery.mdns import MdnsDiscovery
from meshinfer.discovery.mdns_cache import advert_from_service
from meshinfer.discovery.mdns_txt import SERVICE_TYPE, instance_label, txt_for_advert
from meshinfer.discovery.static import StaticDiscovery, parse_seed, parse_seeds
from meshinfer.errors import ConfigError
from tests.test_discovery_mdns import LOOPBACK, WAIT, Recorder, make_advert
from tests.test_discovery_static import FLEET, make_seed

MANUAL = replace(LOOPBACK, address_check_interval=None)


@pytest.fixture
def fleet() -> str:
    return f"fleet-{uuid.uuid4().hex[:8]}"


# --- static seeds: one node id, one seed --------------------------------------------------------


async def test_replace_seeds_refuses_two_seeds_with_one_id_and_keeps_the_list() -> None:
    queue = EventQueue()
    first = make_seed("rsu-1")
    source = StaticDiscovery([first], queue, own_node_id="me", fleet_id=FLEET)
    async with source:
        assert queue.get_nowait() is not None  # rsu-1 found
        one = make_seed("rsu-1", host="10.0.0.8")
        other = make_seed("rsu-1", host="10.0.0.9", static_key=os.urandom(32))
        with pytest.raises(ConfigError, match=r"rsu-1.*twice"):
            source.replace_seeds([one, other])  # which to dial, with which key: a guess
        assert source.seeds == (first,) and source.peers["rsu-1"] == first.advert
        assert queue.get_nowait() is None  # nothing reported


def test_a_static_source_refuses_two_seeds_with_one_id() -> None:
    seeds = [make_seed("rsu-1"), make_seed("rsu-1", host="10.0.0.9")]
    with pytest.raises(ConfigError, match="twice"):
        StaticDiscovery(seeds, EventQueue(), own_node_id="me", fleet_id=FLEET)


# --- one rule for an address a peer can listen on ------------------------------------------------


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "224.0.0.251", "255.255.255.255", "::", "ff02::fb", "::ffff:0.0.0.0"]
)
async def test_a_seed_at_an_address_no_peer_listens_on_is_refused(host: str) -> None:
    # mDNS drops these from a peer's records (is_unicast); a seed list took them
    entry = f"rsu-1@{f'[{host}]' if ':' in host else host}:7400#{'ab' * 32}"
    assert parse_seed(entry, fleet_id="f").host == host  # the form is right
    with pytest.raises(ConfigError, match="no address a peer listens on"):
        parse_seeds([entry], fleet_id="f")
    with pytest.raises(ConfigError, match="no address a peer listens on"):
        StaticDiscovery([make_seed(host=host)], EventQueue(), own_node_id="me", fleet_id=FLEET)
    source = StaticDiscovery([make_seed()], EventQueue(), own_node_id="me", fleet_id=FLEET)
    async with source:
        with pytest.raises(ConfigError, match="no address a peer listens on"):
            source.replace_seeds([make_seed(host=host)])
        assert source.seeds == (make_seed(),)


def test_an_unscoped_ipv6_link_local_seed_is_refused_a_scoped_one_taken() -> None:
    with pytest.raises(ConfigError, match="no address a peer listens on"):  # connect(): EINVAL
        parse_seeds([f"rsu-1@[fe80::7]:7400#{'ab' * 32}"], fleet_id="f")
    entries = [f"rsu-1@[fe80::7%1]:7400#{'ab' * 32}", f"rsu-2@rsu-2.example:7400#{'ab' * 32}"]
    assert [s.host for s in parse_seeds(entries, fleet_id="f")] == ["fe80::7%1", "rsu-2.example"]


# --- a peer's mDNS addresses in a stable order --------------------------------------------------


def _offline(addresses: list[str]) -> AsyncServiceInfo:
    advert = make_advert("veh-1", "f")
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{instance_label('veh-1', 'f')}.{SERVICE_TYPE}",
        port=7000,
        properties=txt_for_advert(advert),
        parsed_addresses=addresses,
    )


def test_a_peers_addresses_come_in_one_order_whatever_order_its_records_came_in() -> None:
    hosts = ["127.0.0.1", "10.0.0.9", "10.0.0.3"]
    orders = {
        advert_from_service(info.name, info).addresses
        for info in (_offline(hosts), _offline(hosts[::-1]), _offline(hosts[1:] + hosts[:1]))
    }
    assert orders == {("10.0.0.3", "10.0.0.9", "127.0.0.1")}  # loopback last


def test_loopback_alone_is_still_reported() -> None:
    info = _offline(["127.0.0.1"])
    assert advert_from_service(info.name, info).addresses == ("127.0.0.1",)


# --- interfaces that are down ---------------------------------------------------------------------


def _adapter(name: str, ip: str) -> ifaddr.Adapter:
    return ifaddr.Adapter(name, name, [ifaddr.IP(ip, 24, name)])


def test_the_addresses_of_a_down_interface_are_not_read() -> None:
    adapters = [
        _adapter("eth0", "10.0.0.2"),
        _adapter("wlan1", "10.20.0.5"),
        _adapter("x", "1.2.3.4"),
    ]
    up = {"eth0": True, "wlan1": False}  # "x" unknown: kept
    assert [a.name for a in only_up(adapters, up)] == ["eth0", "x"]


def test_mdns_reads_only_interfaces_that_are_up_by_default() -> None:
    source = MdnsDiscovery(make_advert("veh-1", "f"), Recorder(), MANUAL)
    assert source._adapters is up_adapters
    assert any(a.name == "lo" for a in up_adapters())  # the real host: lo is up


# --- a reported peer whose static key flips -----------------------------------------------------


async def _until(seen: Recorder, predicate) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(WAIT):
        while not predicate():
            seen._changed.clear()
            await seen._changed.wait()


async def test_a_peers_key_change_is_logged_once_however_often_it_flips(
    fleet: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Recorder()
    a = MdnsDiscovery(make_advert("veh-a", fleet), seen, MANUAL)
    b = MdnsDiscovery(make_advert("veh-b", fleet), Recorder(), MANUAL)
    try:
        for source in (a, b):
            await source.start()
        await seen.wait("found", "veh-b")
        # two nodes announcing one id, or a forger: the key changes with every announcement
        # (fresh keys each time: zeroconf takes a record still in its cache as no news)
        keys = [os.urandom(32) for _ in range(3)]
        caplog.set_level(logging.DEBUG, logger="meshinfer.discovery.mdns")
        for flip, key in enumerate(keys, 1):
            await b.update(replace(b.advert, static_key=key))
            await _until(seen, lambda n=flip: _updates(seen, "veh-b") >= n)
        assert a.peers["veh-b"].static_key == keys[-1]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "veh-b changed its advertised static key" in warnings[0].message
        assert sum("static key again" in r.message for r in caplog.records) == 2
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        for source in (b, a):
            await source.aclose()


def _updates(seen: Recorder, node_id: str) -> int:
    return sum(e.kind == "updated" and e.node_id == node_id for e in seen.events)


async def test_a_change_other_than_the_key_warns_of_nothing(
    fleet: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Recorder()
    a = MdnsDiscovery(make_advert("veh-a", fleet), seen, MANUAL)
    b = MdnsDiscovery(make_advert("veh-b", fleet), Recorder(), MANUAL)
    try:
        for source in (a, b):
            await source.start()
        await seen.wait("found", "veh-b")
        caplog.set_level(logging.WARNING, logger="meshinfer.discovery.mdns")
        await b.update(replace(b.advert, roles=("vehicle",)))
        await seen.wait("updated", "veh-b")
        assert not caplog.records
    finally:
        for source in (b, a):
            await source.aclose()
