"""IP addresses of peers and of this host: pure functions, no sockets, no zeroconf (but
:func:`up_adapters`, which reads the host).

A peer's addresses are filtered (:func:`is_unicast`, :func:`drop_foreign_loopback`) and ordered
(:func:`nearest_first`) against this host's addresses and networks, which
:func:`host_addresses` and :func:`host_networks` read off ``ifaddr`` adapters (those up:
:func:`up_adapters`). Used by the mDNS
source (:mod:`meshinfer.discovery.mdns`); import them from here.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Collection, Mapping, Sequence

import ifaddr
import psutil

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def drop_foreign_loopback(addresses: Sequence[str], local: Collection[str]) -> list[str]:
    """``addresses`` (IP literals) of one peer, less the loopback ones if it is on another host.

    A loopback address reaches the peer only from the peer's own host; from here it dials this
    host (often another node on the fleet's common port). zeroconf keeps no sender per cached
    record, so the addresses themselves decide: a peer that also advertises an address that is
    neither loopback nor one of ``local`` (this host's addresses) is elsewhere. A peer that
    advertises only loopback and local addresses may be on this host (every node of a mesh run
    on one machine) and keeps them all; so does a remote peer advertising loopback alone, which
    nothing here can tell apart (its handshake then fails: the key proves who answered).
    """
    ips = [bare_ip(a) for a in addresses]
    loopback = [ip.is_loopback for ip in ips]
    own = {bare_ip(a) for a in local if is_ip(a.split("%", 1)[0])}
    foreign = any(not lb and ip not in own for ip, lb in zip(ips, loopback, strict=True))
    return [a for a, lb in zip(addresses, loopback, strict=True) if not (foreign and lb)]


def nearest_first(addresses: Sequence[str], networks: Sequence[Network]) -> tuple[str, ...]:
    """A peer's ``addresses`` (in its order) with those on one of ``networks`` (this host's)
    first, each group kept in the peer's order: a vehicle advertising a V2I address and a V2V
    one is dialled over the network both share. A peer on none of them (behind a router) keeps
    its order. Host names and IPv4-mapped IPv6 addresses are on no network here."""

    def elsewhere(host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return True
        return not any(ip in network for network in networks)

    return tuple(sorted(addresses, key=elsewhere))  # stable: each group keeps its order


def dial_preference(host: str) -> tuple[bool, int, int, str]:
    """Sort key of a peer's IP literal among its others, for a stable order whatever order
    its records came in: loopback last (another address of a peer on this host reaches it
    too), IPv4 before IPv6, then by address and scope."""
    address, _, scope = host.partition("%")
    ip = ipaddress.ip_address(address)
    return (ip.is_loopback, ip.version, int(ip), scope)


def bare_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of an IP literal without its ``%scope``, IPv4-mapped IPv6 as IPv4."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped or ip


def host_networks(adapters: Sequence[ifaddr.Adapter]) -> tuple[Network, ...]:
    """The networks the host's interface addresses are on (loopback's included), from each
    address and its prefix length: what "a network this host shares" means to
    :func:`nearest_first`."""
    networks: dict[Network, None] = {}
    for ip in (ip for a in adapters for ip in a.ips):
        with contextlib.suppress(ValueError):  # a prefix the platform did not report
            host = ifaddr_ip(ip.ip).split("%", 1)[0]
            networks[ipaddress.ip_interface(f"{host}/{ip.network_prefix}").network] = None
    return tuple(networks)


def host_addresses(adapters: Sequence[ifaddr.Adapter]) -> frozenset[str]:
    """Every IP address of the host's interfaces (IPv6 without scope): what "local" means to
    :func:`drop_foreign_loopback`."""
    return frozenset(ifaddr_ip(ip.ip).split("%", 1)[0] for a in adapters for ip in a.ips)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_unicast(host: str) -> bool:
    """True for an IP literal a peer can listen on and we can dial: not unspecified, multicast
    or broadcast, nor an IPv6 link-local address without its ``%scope`` (connect() refuses).
    An IPv4-mapped IPv6 address is judged as its IPv4 address: ``::ffff:0.0.0.0`` dials this
    host, as 0.0.0.0 does."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    broadcast = ip.version == 4 and int(ip) == 0xFFFFFFFF
    unscoped = isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local and not ip.scope_id
    return not (ip.is_unspecified or ip.is_multicast or broadcast or unscoped)


def up_adapters() -> list[ifaddr.Adapter]:
    """The host's interfaces that are up (``ifaddr.get_adapters`` by psutil's ``isup``):
    ifaddr lists a down interface's addresses too, and a node advertised them (a V2I link
    gone down kept its address in our advert) and bound zeroconf to them. An interface psutil
    does not know is kept. Blocks (reads the system): call it in a worker thread."""
    adapters = ifaddr.get_adapters()
    try:
        stats = psutil.net_if_stats()
    except OSError:  # the states cannot be read: every interface, as ifaddr lists them
        return list(adapters)
    return only_up(adapters, {name: stat.isup for name, stat in stats.items()})


def only_up(adapters: Sequence[ifaddr.Adapter], up: Mapping[str, bool]) -> list[ifaddr.Adapter]:
    """``adapters`` less those ``up`` (interface name: is it up) says are down."""
    return [a for a in adapters if up.get(a.name, True)]


def ifaddr_ip(ip: str | tuple[str, int, int]) -> str:
    return ip if isinstance(ip, str) else ip[0]


def version_matches(ip: str, version: str) -> bool:
    family = ipaddress.ip_address(ip).version
    return version == "both" or family == (4 if version == "v4" else 6)


def address_snapshot(adapters: Sequence[ifaddr.Adapter]) -> frozenset[tuple[str, str, int]]:
    return frozenset(
        (a.name, str(ifaddr_ip(ip.ip)), ip.network_prefix) for a in adapters for ip in a.ips
    )
