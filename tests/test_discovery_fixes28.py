"""Discovery fixes (session 28): the mDNS source hands a peer's addresses ordered for dialling
(those on a network this host shares first, from the adapters it reads off the loop), a named
interface that comes up after start gets discovery, a node hears of its address watch dying,
and address goodbyes are built with zeroconf's public API.

Live tests use real zeroconf on 127.0.0.1 as ``tests/test_discovery_mdns.py`` does; only the
host's list of interfaces is faked (``FakeHost``, an ``adapters`` callable handed to the source).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import logging
import threading
import uuid
from dataclasses import replace
from ipaddress import ip_network

import ifaddr
import psutil
import pytest

from meshinfer import PROTOCOL_VERSION
from meshinfer.discovery import mdns as mdns_module
from meshinfer.discovery.addresses import host_networks, nearest_first
from meshinfer.discovery.base import DiscoveryEvent, PeerAdvert
from meshinfer.discovery.mdns import MdnsConfig, MdnsDiscovery
from meshinfer.discovery.mdns_config import missing_interfaces
from meshinfer.errors import ConfigError
from meshinfer.proto.membership import MembershipConfig
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_discovery_fixes27 import FakeHost
from tests.test_discovery_mdns import LOOPBACK, Recorder, make_advert, nodes


@pytest.fixture
def fleet() -> str:
    return f"fleet-{uuid.uuid4().hex[:8]}"


V2I = ip_network("10.20.0.0/16")
V2V = ip_network("192.168.49.0/24")


# --- 1. which of a peer's addresses comes first ---------------------------------------------------


@pytest.mark.parametrize(
    ("hosts", "networks", "ordered"),
    [
        (("10.99.1.5", "192.168.49.7"), (V2V,), ("192.168.49.7", "10.99.1.5")),
        (("10.20.1.5", "192.168.49.7"), (V2I, V2V), ("10.20.1.5", "192.168.49.7")),  # its order
        (("10.99.1.5", "172.16.0.9"), (V2I, V2V), ("10.99.1.5", "172.16.0.9")),  # none shared
        (("car-7.local", "192.168.49.7"), (V2V,), ("192.168.49.7", "car-7.local")),  # a name
        (
            ("192.168.49.7", "fe80::7%wlan1"),
            (ip_network("fe80::/64"),),
            ("fe80::7%wlan1", "192.168.49.7"),
        ),
        (("::ffff:c0a8:3107", "192.168.49.7"), (V2V,), ("192.168.49.7", "::ffff:c0a8:3107")),
        (("10.20.1.5", "10.99.1.5", "10.20.1.6"), (V2I,), ("10.20.1.5", "10.20.1.6", "10.99.1.5")),
    ],
)
def test_addresses_on_a_network_this_host_shares_come_first(hosts, networks, ordered) -> None:
    assert nearest_first(hosts, networks) == ordered


def test_host_networks_come_from_the_adapters_prefixes() -> None:
    adapters = [
        ifaddr.Adapter("lo", "lo", [ifaddr.IP("127.0.0.1", 8, "lo")]),
        ifaddr.Adapter("wlan1", "wlan1", [ifaddr.IP(("fe80::1", 0, 3), 64, "wlan1")]),
        ifaddr.Adapter("v2i0", "v2i0", [ifaddr.IP("10.20.3.4", 16, "v2i0")]),
    ]
    assert host_networks(adapters) == (ip_network("127.0.0.0/8"), ip_network("fe80::/64"), V2I)


async def test_the_source_reports_a_peers_shared_network_address_first(fleet: str) -> None:
    """b advertises an address on no network of a's host, then one on a's V2V network: a
    reports them the other way round (it read its host's networks off the loop)."""
    host = FakeHost(lo=["127.0.0.1"], wlan1=["192.168.49.2"])  # FakeHost: every prefix is /8
    advert = make_advert("veh-b", fleet, addresses=("203.0.113.7", "192.168.49.7"))
    a_seen = Recorder()
    async with MdnsDiscovery(make_advert("veh-a", fleet), a_seen, LOOPBACK, adapters=host):
        async with MdnsDiscovery(advert, Recorder(), LOOPBACK):
            found = await a_seen.wait("found", "veh-b")
    assert found.advert.addresses == ("192.168.49.7", "203.0.113.7")  # was: b's order


async def test_a_node_dials_the_first_address_without_reading_interfaces_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node takes the source's order; nothing reads the host's interfaces on the loop for
    a peer with several addresses (it called psutil there)."""
    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    for name in ("net_if_addrs", "net_if_stats"):
        real = getattr(psutil, name)

        def spy(*args: object, _real=real, _name=name, **kwargs: object) -> object:
            if threading.get_ident() == loop_thread:
                on_loop.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(psutil, name, spy)
    fleet_ = make_fleet(None, ("a", "b"))
    opts = MeshNodeOptions(membership=MembershipConfig.test(), mdns=None)
    a = MeshNode(fleet_.identities["a"], fleet_.revocations, opts)
    b = MeshNode(fleet_.identities["b"], fleet_.revocations, opts)
    try:
        await a.start()
        await b.start()
        assert a.address is not None
        advert = PeerAdvert(
            "a", fleet_.identities["a"].trust.fleet_id, a.identity.static_public, ("vehicle",),
            PROTOCOL_VERSION, ("127.0.0.1", "198.51.100.7"), a.address.port,
        )  # fmt: skip
        b._on_discovered(DiscoveryEvent("found", advert, at=0.0, source="mdns"))
        assert b.peers.addresses["a"].address == Address("127.0.0.1", a.address.port)
        await until(lambda: b.live_members() == ["a"] and a.live_members() == ["b"])
    finally:
        await b.aclose()
        await a.aclose()
    assert on_loop == []


# --- 2. a named interface that comes up after start ---------------------------------------------


async def test_an_interface_that_comes_up_later_gets_discovery(
    fleet: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A vehicle's V2I interface is not up at start: a warning, not a ConfigError; once it comes
    up the source binds to it, and it and a peer there find each other."""
    host = FakeHost(lo=["127.0.0.1"])  # no v2i0 yet
    config = replace(LOOPBACK, interfaces=("v2i0",), address_check_interval=0.02)
    advert = make_advert("veh-b", fleet, addresses=("127.0.0.1",))
    b_seen = Recorder()
    async with nodes(fleet, "veh-a") as [(_, a_seen)]:
        with caplog.at_level(logging.WARNING, logger="meshinfer.discovery.mdns"):
            b = MdnsDiscovery(advert, b_seen, config, adapters=host)
            await b.start()  # was: ConfigError "no interface or address named 'v2i0'"
        try:
            assert any("v2i0" in r.getMessage() for r in caplog.records)
            host.interfaces = {"lo": ["127.0.0.1"], "v2i0": ["127.0.0.1"]}  # the link is up
            await a_seen.wait("found", "veh-b")
            await b_seen.wait("found", "veh-a")
        finally:
            await b.aclose()


@pytest.mark.parametrize("name", ["wlan/0", "an-interface-name", "wlan 0", ".."])
async def test_a_name_that_cannot_be_an_interface_is_a_config_error(name: str) -> None:
    config = replace(LOOPBACK, interfaces=(name,))
    host = FakeHost(lo=["127.0.0.1"])
    with pytest.raises(ConfigError, match="neither an IP address nor an interface name"):
        missing_interfaces(config, host())
    source = MdnsDiscovery(make_advert("veh-a", "f"), Recorder(), config, adapters=host)
    with pytest.raises(ConfigError, match=r"mdns\.interfaces"):
        await source.start()
    assert source.closed


def test_present_names_and_addresses_are_not_missing() -> None:
    config = replace(LOOPBACK, interfaces=("lo", "127.0.0.1", "v2i0"))
    assert missing_interfaces(config, FakeHost(lo=["127.0.0.1"])()) == ["v2i0"]
    for bad in [("",), (7,)]:
        with pytest.raises(ConfigError, match=r"mdns\.interfaces"):
            MdnsConfig(interfaces=bad)  # type: ignore[arg-type]


# --- 3. the node's address watch ---------------------------------------------------------------


class WatchBroke(BaseException):
    """Not an Exception: what the watch's own ``except Exception`` does not catch."""


async def test_a_dead_address_watch_is_logged_once_and_close_still_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet_ = make_fleet(None, ("car-a",))
    looks = [0]

    def outbound() -> str:
        looks[0] += 1
        if looks[0] > 1:  # the start's look works; the watch's first one breaks
            raise WatchBroke("interface table gone")
        return "127.0.0.1"

    node = MeshNode(
        fleet_.identities["car-a"],
        fleet_.revocations,
        MeshNodeOptions(
            listen=Address("0.0.0.0", 0),
            mdns=None,
            membership=MembershipConfig.test(),
            address_check_interval=0.01,
        ),
        outbound=outbound,
    )
    with caplog.at_level(logging.ERROR):
        await node.start()
        watch = node._outbound_watch
        assert watch is not None
        await until(watch.done, timeout=5.0)
        await asyncio.sleep(0)  # done-callbacks run one loop step after the task ends
        await node.aclose()  # was: raised WatchBroke, leaving the listener open
    assert node.address is not None
    with pytest.raises(ConnectionRefusedError):  # the listener was closed
        await asyncio.open_connection("127.0.0.1", node.address.port)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # was: nothing
    assert "watch of its address stopped" in errors[0].getMessage()
    assert isinstance(errors[0].exc_info[1], WatchBroke)


# --- 5. address goodbyes on zeroconf's public API ----------------------------------------------


def test_mdns_imports_no_private_zeroconf_names() -> None:
    tree = ast.parse(inspect.getsource(mdns_module))
    private = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zeroconf")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []
