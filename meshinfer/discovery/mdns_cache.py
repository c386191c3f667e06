"""Reading a peer's advert from zeroconf's records, and again as they expire.

:func:`advert_from_service` parses a resolved service (TXT, SRV port, A/AAAA) into a
:class:`~meshinfer.discovery.base.PeerAdvert`, its addresses filtered and ordered by
:mod:`meshinfer.discovery.addresses`. zeroconf's browser re-reads a service when a record arrives,
never when one expires, so the mDNS source re-reads each reported peer every
``address_check_interval`` with :func:`cached_advert` (an address whose record expired is gone
from it) and asks again for address records near their end (:func:`refresh_questions`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence
from typing import Any

from zeroconf import DNSQuestion, Zeroconf
from zeroconf.asyncio import AsyncServiceInfo

from meshinfer.discovery.addresses import (
    Network,
    dial_preference,
    drop_foreign_loopback,
    is_unicast,
    nearest_first,
)
from meshinfer.discovery.base import MalformedAdvert, PeerAdvert
from meshinfer.discovery.mdns_txt import SERVICE_TYPE, advert_from_txt, instance_label

_ADDRESS_TYPES = (1, 28)  # DNS record types A and AAAA
_SERVICE_TYPES = (33, 16)  # DNS record types SRV and TXT
_CLASS_IN = 1
#: Share of its TTL after which a peer's address record is asked for again, each check until an
#: answer comes (RFC 6762 section 5.2 asks from 80%); one that expires unanswered is dropped.
REFRESH_AT = 0.75


def advert_from_service(
    name: str,
    info: AsyncServiceInfo,
    local_addresses: Collection[str] | None = None,
    *,
    local_networks: Sequence[Network] = (),
) -> PeerAdvert:
    """Parse a resolved service into a PeerAdvert; its label must derive from its TXT ids.

    Addresses no peer can be reached at (unspecified, multicast, broadcast, IPv6 link-local
    without a scope) are dropped, and so are loopback addresses of a peer on another host, if
    ``local_addresses`` (this host's addresses) are given (see :func:`drop_foreign_loopback`);
    a service left with none is malformed. The rest are ordered by :func:`nearest_first` on
    ``local_networks`` (this host's networks:
    :func:`~meshinfer.discovery.addresses.host_networks`), so the first is the one to dial;
    within each of its groups by :func:`~meshinfer.discovery.addresses.dial_preference`, not
    zeroconf's cache order (which follows arrivals: a re-read reported ``updated`` for a mere
    reordering, and the address dialled depended on which record came last).
    """
    suffix = "." + SERVICE_TYPE
    if not name.lower().endswith(suffix.lower()):
        raise MalformedAdvert(f"service name {name!r} is not of type {SERVICE_TYPE}")
    if not own_host(name, info):
        raise MalformedAdvert(f"service {name!r} names host {info.server!r}, not its own")
    text = info.text if isinstance(info.text, bytes) else b""
    addresses = [a for a in info.parsed_scoped_addresses() if is_unicast(a)]
    if local_addresses is not None:
        addresses = drop_foreign_loopback(addresses, local_addresses)
    if not addresses:
        raise MalformedAdvert(f"service {name!r} has no unicast address")
    addresses = nearest_first(sorted(addresses, key=dial_preference), local_networks)
    advert = advert_from_txt(text, addresses=addresses, port=info.port)
    if name[: -len(suffix)].lower() != instance_label(advert.node_id, advert.fleet_id).lower():
        raise MalformedAdvert(f"service name {name!r} does not derive from fleet and node id")
    return advert


def service_host(name: str) -> str:
    """The host (SRV target) of meshinfer service ``name``: ``<instance label>.local.``, as
    every node publishes it (``MdnsDiscovery._service_info``)."""
    return f"{name[: -len(SERVICE_TYPE) - 1]}.local."


def own_host(name: str, info: AsyncServiceInfo) -> bool:
    """False when ``info``'s SRV record names a host other than :func:`service_host`: anyone on
    the link can send one, to point a peer's service at addresses of theirs (or at none)."""
    return info.server is None or info.server.lower() == service_host(name).lower()


def live_addresses(zc: Zeroconf, server: str, now: float) -> frozenset[str]:
    """The addresses (without scope) of ``server``'s address records in ``zc``'s cache that
    have not expired at ``now`` (ms)."""
    return frozenset(
        str(ipaddress.ip_address(record.address))
        for type_ in _ADDRESS_TYPES
        for record in zc.cache.get_all_by_details(server, type_, _CLASS_IN)
        if not record.is_expired(now) and len(record.address) in (4, 16)
    )


def _near_end(record: Any, now: float, horizon: float) -> bool:
    """Whether a cached record is not yet expired but past :data:`REFRESH_AT` of its TTL, or
    would expire within ``horizon`` seconds."""
    remaining = record.get_remaining_ttl(now)
    return 0 < remaining <= max(record.ttl * (1 - REFRESH_AT), horizon)


def cached_advert(
    zc: Zeroconf,
    name: str,
    info: AsyncServiceInfo,
    now: float,
    local_addresses: Collection[str] | None,
    local_networks: Sequence[Network],
) -> PeerAdvert | None:
    """Service ``name`` read into ``info`` from ``zc``'s cache at ``now`` (ms) and parsed as by
    :func:`advert_from_service`; None when a record it needs expired (the peer is lost).

    Raises :class:`MalformedAdvert` when the records there do not parse, no usable address is
    left, or the SRV record names another host: any host on the link can send such records
    under a peer's name, so the caller must not take them as the peer's goodbye (it keeps the
    reported advert, less addresses whose records expired: :func:`live_addresses`)."""
    complete = info.load_from_cache(zc, now)
    if not own_host(name, info):
        raise MalformedAdvert(f"service {name!r} names host {info.server!r}, not its own")
    if not (complete and info.port is not None and info.server):
        return None
    return advert_from_service(name, info, local_addresses, local_networks=local_networks)


def refresh_questions(
    zc: Zeroconf, name: str, server: str, now: float, horizon: float = 0.0
) -> list[DNSQuestion]:
    """Questions for the records of service ``name`` (SRV, TXT) and its host ``server`` (A,
    AAAA) with a cached record past :data:`REFRESH_AT` of its TTL, or expiring within
    ``horizon`` seconds (when the caller looks next), and not yet expired, so a peer still
    there keeps them. The SRV record lives as long as the address records (zeroconf's
    ``host_ttl``, 120 s) and nothing else asks for it (zeroconf's browser refreshes only PTR
    records): left to expire, it made a live, quiet peer ``lost``. Without ``horizon``, looks
    further apart than the last quarter of a TTL (every 60 s, for 120 s records) missed it
    about every other time."""
    wanted = [(name, type_) for type_ in _SERVICE_TYPES]
    wanted += [(server, type_) for type_ in _ADDRESS_TYPES]
    return [
        DNSQuestion(owner, type_, _CLASS_IN)
        for owner, type_ in wanted
        if any(
            _near_end(r, now, horizon) for r in zc.cache.get_all_by_details(owner, type_, _CLASS_IN)
        )
    ]


def drop_expired_addresses(zc: Zeroconf, server: str, now: float) -> None:
    """Remove ``server``'s expired address records from ``zc``'s cache now, not at zeroconf's
    next purge (every 10 s). Until then a cache-flush answer for that name (the peer's other
    addresses) gives every record of it older than 1 s, expired ones included, 1 s more to
    live (zeroconf's ``async_mark_unique_records_older_than_1s_to_expire``): an address already
    dropped came back, and was dropped again a second later. zeroconf's browser ignores
    expired address records, so nothing waits to see these. On the loop."""
    expired = [
        record
        for type_ in _ADDRESS_TYPES
        for record in zc.cache.get_all_by_details(server, type_, _CLASS_IN)
        if record.is_expired(now)
    ]
    zc.cache.async_remove_records(expired)
