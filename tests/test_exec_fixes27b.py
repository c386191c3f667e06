"""Session 27 fixes (b): the executor relays what a re-enrolled helper answers over its good
session while an old session of it, under a revoked certificate, is still being cut; a node
hands the peer table the address of a discovered peer it can reach.

Real peer tables and Noise sessions over the in-memory transport (the
:class:`~tests.test_executor_sharing.Net` of the work-sharing tests), real TCP on loopback."""

from __future__ import annotations

import time
from ipaddress import ip_address, ip_network

import pytest

from meshinfer import PROTOCOL_VERSION
from meshinfer.discovery.base import DiscoveryEvent, PeerAdvert
from meshinfer.inference.synthetic import sample_inputs
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.messages import AppData
from meshinfer.proto.tasks_wire import TaskAccepted, TaskResult, Tensor
from meshinfer.runtime.node import (
    MeshNode,
    MeshNodeOptions,
    _network,
    local_networks,
    preferred_address,
)
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_executor_sharing import MODEL, Endpoint, Net, soon

# --- an answer over a re-enrolled helper's good session -----------------------------------------


async def reenrolled_b(net: Net) -> tuple[Endpoint, Endpoint]:
    """b re-enrolled: its new certificate's session with w is the oldest (the one w sends
    over), and a process left over under its old certificate dialled w too. Returns (fresh,
    stale)."""
    net.members.set("b")
    old = net.fleet.identities["b"]
    new = net.fleet.enroll("b")
    fresh = await net.endpoint("b", new, listen=False)
    stale = await net.endpoint("b", old, listen=False)
    net.nodes["b-new"], net.nodes["b-old"] = fresh, stale  # closed with the rest
    for count, node in enumerate((fresh, stale), 1):
        net.teach(node.peers)
        await node.peers.request("w", AppData(topic="hello", payload=b""))
        await soon(lambda n=count: len(net.w.open_sessions("b")) == n)
    assert net.w.session("b").peer.serial == new.certificate.serial  # the one sent over
    return fresh, stale


async def test_a_reenrolled_helpers_answer_over_its_good_session_is_relayed_during_a_cut():
    """w passed p to b over b's good session; then b's old serial is revoked (the cut of the
    old session has not run yet). b's TaskAccepted and result, over the good session, reach
    coord: they cannot have come over the revoked session (the peer table drops that)."""
    async with Net() as net:
        fresh, stale = await reenrolled_b(net)
        executor = net.worker()
        await net.fill(executor)
        await net.assign("coord", "p")
        await soon(lambda: fresh.assigned() == ["p"])
        net.w.admission.revocations = net.fleet.authority.revoke(
            net.fleet.revocations, now=time.time(), serial=_old_serial(net, "b")
        )
        assert len(net.w.open_sessions("b")) == 2  # the old one is being cut, not yet closed
        await fresh.peers.request("w", TaskAccepted("p", 1, "b", 0))
        result = TaskResult("p", 1, Tensor.from_array(sample_inputs(MODEL, 1)), "b", "", "", {})
        await fresh.peers.request("w", result)
        coord = net.nodes["coord"]
        await soon(lambda: ("TaskResult", "p", 1, "w") in coord.answers())
        accepted = [m for _, m in coord.got if isinstance(m, TaskAccepted) and m.item_id == "p"]
        assert accepted == [TaskAccepted("p", 1, "b", 0)]
        assert executor.stats.relayed == 1 and executor.stats.handed_back == 0
        assert stale.assigned() == []


def _old_serial(net: Net, node: str) -> int:
    """The serial of the newest open session's certificate of ``node`` at w that is not the
    fleet's current certificate of ``node`` (the old one)."""
    current = net.fleet.identities[node].certificate.serial
    (serial,) = {s.peer.serial for s in net.w.open_sessions(node)} - {current}
    return serial


# --- which of a discovered peer's addresses the peer table dials ---------------------------------

V2I, V2V = ip_network("10.20.0.0/16"), ip_network("192.168.49.0/24")


def addresses(*hosts: str) -> tuple[Address, ...]:
    return tuple(Address(host, 7000) for host in hosts)


@pytest.mark.parametrize(
    ("hosts", "networks", "dialled"),
    [
        (("10.99.1.5", "192.168.49.7"), (V2V,), "192.168.49.7"),  # V2I first: not from here
        (("10.20.1.5", "192.168.49.7"), (V2I, V2V), "10.20.1.5"),  # both shared: its order
        (("10.99.1.5", "172.16.0.9"), (V2I, V2V), "10.99.1.5"),  # none shared: the first
        (("car-7.local", "192.168.49.7"), (V2V,), "192.168.49.7"),  # a name: no network
        (("192.168.49.7", "fe80::7%wlan1"), (ip_network("fe80::/64"),), "fe80::7%wlan1"),
        (("::ffff:c0a8:3107", "192.168.49.7"), (V2V,), "192.168.49.7"),  # v6 not in a v4 net
    ],
)
def test_a_peer_is_dialled_at_its_first_address_on_a_network_this_host_shares(
    hosts, networks, dialled
):
    assert preferred_address(addresses(*hosts), networks).host == dialled


def test_this_hosts_networks_include_loopback_and_skip_a_missing_netmask():
    assert ip_network("127.0.0.0/8") in local_networks()
    assert _network("fe80::1%eth0", "ffff:ffff:ffff:ffff::") == ip_network("fe80::/64")
    assert _network("10.20.3.4", "255.255.0.0") == V2I
    assert _network("10.20.3.4", None) is None


def unreachable_host() -> str:
    """A documentation address (RFC 5737) on no network of this host (some test hosts have
    one of them on an interface)."""
    here = local_networks()
    hosts = ("198.51.100.7", "203.0.113.7", "192.0.2.7")
    return next(h for h in hosts if not any(ip_address(h) in n for n in here))


async def test_a_peer_advertising_an_address_not_reachable_from_here_is_dialled_at_another():
    """a advertises (over mDNS, as b sees it) an address on no network of b's host first, then
    loopback, which b shares: b's peer table dials loopback, and b joins a."""
    fleet = make_fleet(None, ("a", "b"))
    opts = MeshNodeOptions(membership=MembershipConfig.test(), mdns=None)
    a = MeshNode(fleet.identities["a"], fleet.revocations, opts)
    b = MeshNode(fleet.identities["b"], fleet.revocations, opts)
    try:
        await a.start()
        await b.start()
        assert a.address is not None
        advert = PeerAdvert(
            "a", fleet.identities["a"].trust.fleet_id, a.identity.static_public, ("vehicle",),
            PROTOCOL_VERSION, (unreachable_host(), "127.0.0.1"), a.address.port,
        )  # fmt: skip
        b._on_discovered(DiscoveryEvent("found", advert, at=0.0, source="mdns"))
        assert b.peers.addresses["a"].address == Address("127.0.0.1", a.address.port)
        await until(lambda: b.live_members() == ["a"] and a.live_members() == ["b"])
    finally:
        await b.aclose()
        await a.aclose()
