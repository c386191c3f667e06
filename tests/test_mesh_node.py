"""MeshNode in one process: real TCP, real Noise sessions, real mDNS on 127.0.0.1, SWIM."""

from __future__ import annotations

import asyncio
import ipaddress
import random

import psutil

from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.discovery.static import StaticSeed
from meshinfer.proto.membership import MemberEventKind, MembershipConfig
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from tests.helpers import until


def options(**kw) -> MeshNodeOptions:
    kw.setdefault("mdns", MdnsConfig.loopback())
    return MeshNodeOptions(membership=MembershipConfig.test(), **kw)


def nodes_for(fleet, names, opts_for=None):
    return [
        MeshNode(
            fleet.identities[n],
            fleet.revocations,
            opts_for(n) if opts_for else options(),
            rng=random.Random(i),
        )
        for i, n in enumerate(names)
    ]


async def test_three_nodes_find_each_other_by_mdns_and_form_membership():
    names = ["car-a", "car-b", "car-c"]
    fleet = make_fleet(None, names)
    nodes = nodes_for(fleet, names)
    try:
        for node in nodes:
            await node.start()
        await until(lambda: all(len(n.live_members()) == 2 for n in nodes))
        for node in nodes:
            assert set(node.live_members()) == set(names) - {node.node_id}
            assert node.peers.connected  # membership runs over encrypted sessions
    finally:
        for node in nodes:
            await node.aclose()


async def test_crashed_node_is_declared_dead_and_graceful_leave_is_left():
    names = ["n1", "n2", "n3", "n4"]
    fleet = make_fleet(None, names)
    nodes = nodes_for(fleet, names)
    events: list[tuple[str, str, MemberEventKind]] = []
    try:
        for node in nodes:
            await node.start()
        await until(lambda: all(len(n.live_members()) == 3 for n in nodes))
        for node in nodes:
            node.membership.subscribe(
                lambda e, me=node.node_id: events.append((me, e.member.node_id, e.kind))
            )
        crashed, leaver, *rest = nodes
        await crashed.aclose()  # abrupt: no leave announcement, sockets just close
        await until(
            lambda: all(n.membership.core.member("n1").status.value == "dead" for n in nodes[1:]),
            timeout=20,
        )
        await leaver.leave()
        await until(
            lambda: all(n.membership.core.member("n2").status.value == "left" for n in rest)
        )
        assert all(node_id != "n2" or kind != MemberEventKind.DEAD for _, node_id, kind in events)
        assert {(me, "n1", MemberEventKind.DEAD) for me in ("n3", "n4")} <= set(events)
    finally:
        for node in nodes:
            await node.aclose()


async def test_static_seed_without_mdns_joins_the_mesh():
    fleet = make_fleet(None, ["rsu", "car"], roles=("vehicle", "rsu"))
    rsu = MeshNode(fleet.identities["rsu"], fleet.revocations, options(mdns=None))
    await rsu.start()
    seed = StaticSeed(
        node_id="rsu",
        host="127.0.0.1",
        port=rsu.address.port,
        static_key=fleet.identities["rsu"].static_public,
        fleet_id="test-fleet",
    )
    car = MeshNode(fleet.identities["car"], fleet.revocations, options(mdns=None, seeds=[seed]))
    try:
        await car.start()
        async with asyncio.timeout(10):
            await car.wait_joined()
        await until(lambda: rsu.live_members() == ["car"] and car.live_members() == ["rsu"])
    finally:
        await car.aclose()
        await rsu.aclose()


async def test_node_of_another_fleet_is_never_a_member():
    fleet = make_fleet(None, ["good-1", "good-2"])
    other = make_fleet(None, ["evil"], fleet_id="test-fleet-2")
    good = nodes_for(fleet, ["good-1", "good-2"])
    evil = MeshNode(other.identities["evil"], other.revocations, options())
    try:
        for node in [*good, evil]:
            await node.start()
        await until(lambda: all(n.live_members() for n in good))
        await asyncio.sleep(0.5)  # give the intruder's mDNS adverts time to arrive
        assert all("evil" not in n.live_members() for n in good)
        assert evil.live_members() == []
    finally:
        for node in [*good, evil]:
            await node.aclose()


async def test_a_node_listening_on_every_interface_advertises_an_address_peers_can_dial():
    """Not 127.0.0.1 (which a peer on another host would dial itself at): the address this
    host routes from, an address of one of its interfaces; a peer given it joins."""
    fleet = make_fleet(None, ["rsu", "car"], roles=("vehicle", "rsu"))
    everywhere = options(mdns=None, listen=Address("0.0.0.0", 0))
    rsu = MeshNode(fleet.identities["rsu"], fleet.revocations, everywhere)
    await rsu.start()
    car = None
    try:
        host = rsu.membership.state.host  # what gossip (and mDNS) tell every peer
        interfaces = psutil.net_if_addrs().values()
        own = {a.address for addresses in interfaces for a in addresses}
        assert host in own
        others = {a for a in own if "." in a and not ipaddress.ip_address(a).is_loopback}
        assert not ipaddress.ip_address(host).is_loopback or not others
        seed = StaticSeed(
            node_id="rsu",
            host=host,
            port=rsu.address.port,
            static_key=fleet.identities["rsu"].static_public,
            fleet_id="test-fleet",
        )
        car = MeshNode(fleet.identities["car"], fleet.revocations, options(mdns=None, seeds=[seed]))
        await car.start()
        async with asyncio.timeout(10):
            await car.wait_joined()
        await until(lambda: rsu.live_members() == ["car"] and car.live_members() == ["rsu"])
    finally:
        if car is not None:
            await car.aclose()
        await rsu.aclose()
