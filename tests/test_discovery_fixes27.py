"""Discovery fixes (session 27): following the host's addresses, loopback addresses of remote
peers, unknown TXT keys.

Live tests use real zeroconf on 127.0.0.1 as ``tests/test_discovery_mdns.py`` does (its helpers
are reused), each with its own fleet id. Only the host's list of interfaces is faked (an
``adapters`` callable handed to the source); sockets, multicast and zeroconf are real.
"""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace

import ifaddr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from meshinfer.discovery.addresses import drop_foreign_loopback
from meshinfer.discovery.base import DiscoveryEvent, MalformedAdvert, PeerAdvert
from meshinfer.discovery.mdns import MdnsConfig, MdnsDiscovery
from meshinfer.discovery.mdns_cache import advert_from_service
from meshinfer.discovery.mdns_txt import (
    SERVICE_TYPE,
    TXT_KEYS,
    advert_from_txt,
    instance_label,
    txt_for_advert,
    unpack_txt,
)
from meshinfer.errors import ConfigError
from tests.helpers import announce_once
from tests.test_discovery_mdns import LOOPBACK, WAIT, Recorder, adverts, make_advert, nodes


@pytest.fixture
def fleet() -> str:
    return f"fleet-{uuid.uuid4().hex[:8]}"


class FakeHost:
    """The host's interfaces as ``ifaddr.get_adapters`` reports them; a test rewrites them."""

    def __init__(self, **interfaces: list[str]) -> None:
        self.interfaces = interfaces
        self.calls = 0

    def __call__(self) -> list[ifaddr.Adapter]:
        self.calls += 1
        return [
            ifaddr.Adapter(name, name, [ifaddr.IP(ip, 8, name) for ip in ips])
            for name, ips in self.interfaces.items()
        ]

    async def looked(self, times: int) -> None:
        """Wait until the source has read the interfaces ``times`` more times (bounded)."""
        target = self.calls + times
        async with asyncio.timeout(WAIT):
            while self.calls < target:
                await asyncio.sleep(0.01)


async def wait_for(seen: Recorder, done: Callable[[DiscoveryEvent], bool]) -> DiscoveryEvent:
    """The first event ``done`` accepts, waiting for it (bounded by WAIT)."""
    async with asyncio.timeout(WAIT):
        while True:
            for event in seen.events:
                if done(event):
                    return event
            seen._changed.clear()
            await seen._changed.wait()


def _service_of(advert: PeerAdvert) -> AsyncServiceInfo:
    label = instance_label(advert.node_id, advert.fleet_id)
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=advert.port,
        properties=txt_for_advert(advert),
        server=f"{label}.local.",
        parsed_addresses=list(advert.addresses),
    )


# --- 1. the host's addresses change while the node runs ------------------------------------------


async def test_a_new_lease_is_announced_and_zeroconf_sends_from_it(fleet: str) -> None:
    host = FakeHost(mesh0=["127.0.0.1"])
    config = replace(LOOPBACK, interfaces=("mesh0",), address_check_interval=0.02)
    async with nodes(fleet, "veh-a") as [(a, a_seen)]:
        b = MdnsDiscovery(make_advert("veh-b", fleet), Recorder(), config, adapters=host)
        async with b:
            found = await a_seen.wait("found", "veh-b")
            assert found.advert.addresses == b.advert.addresses == ("127.0.0.1",)
            host.interfaces = {"mesh0": ["127.0.0.2"]}  # DHCP renewed to a new address
            moved = await wait_for(a_seen, lambda e: e.advert.addresses == ("127.0.0.2",))
            assert moved.kind == "updated" and a.peers["veh-b"].addresses == ("127.0.0.2",)
            assert b._zc is not None
            senders = {t.sock_name[0] for t in b._zc.zeroconf.engine.senders}
            assert senders == {"127.0.0.2"}  # was: the socket of the old address only


async def test_addresses_given_are_kept_and_a_gone_interface_keeps_the_sockets(
    fleet: str,
) -> None:
    host = FakeHost(mesh0=["127.0.0.1"])
    config = replace(LOOPBACK, interfaces=("mesh0",), address_check_interval=0.02)
    advert = make_advert("veh-b", fleet, addresses=("127.0.0.1",))
    async with nodes(fleet, "veh-a") as [(_, a_seen)]:
        async with MdnsDiscovery(advert, Recorder(), config, adapters=host) as b:
            await a_seen.wait("found", "veh-b")
            assert b._zc is not None
            engine = b._zc.zeroconf.engine
            host.interfaces = {}  # the interface went away: nothing to bind, keep what we have
            await host.looked(2)
            assert {t.sock_name[0] for t in engine.senders} == {"127.0.0.1"}
            host.interfaces = {"mesh0": ["127.0.0.3"]}  # back, with another address
            await host.looked(2)
            assert {t.sock_name[0] for t in engine.senders} == {"127.0.0.3"}
            await b.update(replace(b.advert, port=7100))  # still works; a barrier for A
            updated = await a_seen.wait("updated", "veh-b")
            assert updated.advert.addresses == b.advert.addresses == advert.addresses


def test_address_check_interval_is_validated() -> None:
    assert MdnsConfig(address_check_interval=None).address_check_interval is None
    for bad in (0, -1.0, float("nan"), "5"):
        with pytest.raises(ConfigError, match="address_check_interval"):
            MdnsConfig(address_check_interval=bad)  # type: ignore[arg-type]


# --- 2. loopback addresses of a peer on another host --------------------------------------------


def _offline(addresses: list[str]) -> AsyncServiceInfo:
    return _service_of(make_advert("veh-1", "f", addresses=tuple(addresses)))


def test_loopback_of_a_peer_on_another_host_is_dropped() -> None:
    local = {"127.0.0.1", "10.0.0.5"}
    cases = [
        (["127.0.0.1", "192.0.2.7"], ["192.0.2.7"]),  # another host: 127.0.0.1 would dial us
        (["::1", "::ffff:127.0.0.2", "192.0.2.7"], ["192.0.2.7"]),
        (["127.0.0.1"], ["127.0.0.1"]),  # a node of a single-machine mesh
        (["10.0.0.5", "127.0.0.1"], ["10.0.0.5", "127.0.0.1"]),  # on this host
    ]
    for given_, kept in cases:
        info = _offline(given_)
        advert = advert_from_service(info.name, info, local)
        assert _ips(advert.addresses) == _ips(kept), given_
        assert _ips(advert_from_service(info.name, info).addresses) == _ips(given_)


def _ips(hosts: Sequence[str]) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return {ipaddress.ip_address(host) for host in hosts}


loopbacks = st.sampled_from(["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"])
locals_ = st.sampled_from(["10.0.0.5", "fd00::5", "192.168.1.9"])
foreigns = st.sampled_from(["10.0.0.6", "fd00::6", "192.0.2.7", "fe80::1%eth0"])


@settings(max_examples=300, deadline=None)
@given(st.lists(loopbacks | locals_ | foreigns | st.ip_addresses().map(str), max_size=8))
def test_drop_foreign_loopback_property(addresses: list[str]) -> None:
    local = {"10.0.0.5", "fd00::5", "192.168.1.9", "127.0.0.1"}
    kept = drop_foreign_loopback(addresses, local)

    def loop(a: str) -> bool:
        ip = ipaddress.ip_address(a.split("%")[0])
        return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback

    foreign = any(not loop(a) and a.split("%")[0] not in local for a in addresses)
    assert kept == [a for a in addresses if not (foreign and loop(a))]


async def test_remote_peer_announcing_loopback_is_dialled_elsewhere(fleet: str) -> None:
    remote = make_advert("veh-r", fleet, addresses=("127.0.0.1", "192.0.2.7"))
    async with nodes(fleet, "veh-a") as [(_, a_seen)]:
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            await announce_once(raw, _service_of(remote))
            found = await a_seen.wait("found", "veh-r")
            await raw.async_unregister_all_services()
    assert found.advert.addresses == ("192.0.2.7",)  # was: 127.0.0.1 too, a local node's port


async def test_peer_on_this_host_keeps_its_loopback_address(fleet: str) -> None:
    here = make_advert("veh-h", fleet, addresses=("127.0.0.1", "192.0.2.7"))
    host = FakeHost(lo=["127.0.0.1"], eth0=["192.0.2.7"])  # 192.0.2.7 is ours
    a_seen = Recorder()
    async with MdnsDiscovery(make_advert("veh-a", fleet), a_seen, LOOPBACK, adapters=host):
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            await announce_once(raw, _service_of(here))
            found = await a_seen.wait("found", "veh-h")
            await raw.async_unregister_all_services()
    assert sorted(found.advert.addresses) == ["127.0.0.1", "192.0.2.7"]


# --- 3. unknown TXT keys --------------------------------------------------------------------------


def _entry(key: bytes, value: bytes | None) -> bytes:
    entry = key + (b"=" + value if value is not None else b"")
    return bytes([len(entry)]) + entry


def test_unknown_key_with_non_ascii_bytes_is_ignored() -> None:
    advert = make_advert("veh-1", "f", addresses=("10.0.0.1",))
    data = _entry("é-future".encode(), b"\xff\xfe") + txt_for_advert(advert) + _entry(b"\x01", None)
    assert advert_from_txt(data, addresses=advert.addresses, port=advert.port) == advert
    with pytest.raises(MalformedAdvert, match="ASCII"):  # the generic decoder stays strict
        unpack_txt(data)
    assert unpack_txt(data, TXT_KEYS).keys() <= TXT_KEYS


unknown_keys = st.binary(min_size=1, max_size=30).filter(
    lambda k: b"=" not in k and k.lower() not in {key.encode() for key in TXT_KEYS}
)


@settings(max_examples=300, deadline=None)
@given(
    adverts,
    st.lists(st.tuples(unknown_keys, st.none() | st.binary(max_size=60)), max_size=6),
    st.randoms(use_true_random=False),
)
def test_unknown_entries_anywhere_do_not_change_the_advert(
    advert: PeerAdvert, extra: list[tuple[bytes, bytes | None]], rnd: object
) -> None:
    entries = [_entry(k.encode(), v) for k, v in unpack_txt(txt_for_advert(advert)).items()]
    entries += [_entry(k, v) for k, v in extra if len(k) + 1 + len(v or b"") < 256]
    rnd.shuffle(entries)  # type: ignore[attr-defined]
    data = b"".join(entries)
    assert advert_from_txt(data, addresses=advert.addresses, port=advert.port) == advert


@settings(max_examples=300, deadline=None)
@given(adverts, st.sampled_from(sorted(TXT_KEYS)), st.binary(max_size=40))
def test_a_known_key_that_is_not_utf8_is_still_rejected(
    advert: PeerAdvert, key: str, tail: bytes
) -> None:
    bad = _entry(key.upper().encode(), b"\xff" + tail)  # first occurrence wins, any case
    with pytest.raises(MalformedAdvert):
        advert_from_txt(bad + txt_for_advert(advert), addresses=advert.addresses, port=1)
