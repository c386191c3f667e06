"""A node listening on every interface (no ``advertise_host``) follows the address its host
routes from: when a V2I link comes up or DHCP gives a new lease, its gossiped state and its mDNS
advert name the new address, so peers dial where it now is (it kept the start's address)."""

from __future__ import annotations

import asyncio

from meshinfer.discovery.mdns import MdnsConfig, MdnsDiscovery
from meshinfer.proto.membership import MembershipConfig
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from tests.helpers import seed_of, until


def _host_seen(observer: MeshNode, node_id: str) -> str | None:
    member = observer.membership.core.member(node_id)
    return None if member is None or not member.is_live else member.state.host


async def test_a_node_on_every_interface_tells_the_mesh_when_its_address_moves():
    fleet = make_fleet(None, ["car-a", "car-b"])
    route = ["127.0.0.1"]  # what the host routes from: the lease of the moment
    moving = MeshNode(
        fleet.identities["car-a"],
        fleet.revocations,
        MeshNodeOptions(
            listen=Address("0.0.0.0", 0),  # every interface: 127.0.0.2 reaches it too
            mdns=MdnsConfig.loopback(),
            membership=MembershipConfig.test(),
            address_check_interval=0.05,
        ),
        outbound=lambda: route[0],
    )
    await moving.start()
    watcher = MeshNode(
        fleet.identities["car-b"],
        fleet.revocations,
        MeshNodeOptions(mdns=None, membership=MembershipConfig.test(), seeds=[seed_of(moving)]),
    )
    try:
        await watcher.start()
        await until(lambda: _host_seen(watcher, "car-a") == "127.0.0.1")
        route[0] = "127.0.0.2"  # a new lease
        await until(lambda: _host_seen(watcher, "car-a") == "127.0.0.2")
        (mdns,) = [s for s in moving.discovery if isinstance(s, MdnsDiscovery)]
        assert mdns.advert.addresses == ("127.0.0.2",)
        assert moving.advertised_host == "127.0.0.2"
    finally:
        await watcher.aclose()
        await moving.aclose()


async def test_a_node_with_an_advertised_host_keeps_it():
    fleet = make_fleet(None, ["car-a"])
    looked: list[int] = []

    def outbound() -> str:
        looked.append(1)
        return "127.0.0.2"

    node = MeshNode(
        fleet.identities["car-a"],
        fleet.revocations,
        MeshNodeOptions(
            listen=Address("0.0.0.0", 0),
            advertise_host="127.0.0.1",  # the operator said where peers reach it
            mdns=None,
            membership=MembershipConfig.test(),
            address_check_interval=0.01,
        ),
        outbound=outbound,
    )
    async with node:
        watches = [t for t in asyncio.all_tasks() if "_watch_outbound" in repr(t.get_coro())]
        assert watches == []  # nothing will look up its address again
        assert looked == []
        assert node.membership.state.host == "127.0.0.1"
