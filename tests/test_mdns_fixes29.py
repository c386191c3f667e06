"""mDNS discovery (session 29): paths of the address/cache check not tested before.

* One address of a peer's several expires in zeroconf's cache while the others stay (the peer
  re-announced without it, no goodbye): the check reports ``updated``, not ``lost``.
* Fault: the check asked again only for a peer's address records, never its SRV record, which
  zeroconf gives the same TTL (``host_ttl``, 120 s): a quiet live peer was ``lost`` when it ran
  out. :func:`~meshinfer.discovery.mdns_cache.refresh_questions` now asks for SRV and TXT too,
  each only past ``REFRESH_AT`` of its TTL and before it expires (a real zeroconf ``DNSCache``).
* Fault: zeroconf (0.154) gives an expired record 1 s more to live when a cache-flush answer for
  its name arrives before its 10 s purge, so a dropped address came back (``updated`` with it,
  then without it). The check now purges a peer's expired address records at once.
* ``address_check_interval=None`` (the daemons' 0) turns the check off: documented on
  :class:`~meshinfer.discovery.mdns.MdnsConfig`; no watch task runs.

Live tests use real zeroconf on 127.0.0.1 as ``tests/test_discovery_mdns.py`` does; the peer is
a bare AsyncZeroconf whose address records live 2 s (as ``tests/test_discovery_fixes28b.py``).
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import replace
from types import SimpleNamespace

from zeroconf import DNSAddress, DNSCache, DNSRecord, DNSService, current_time_millis
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from meshinfer.discovery import mdns
from meshinfer.discovery.base import PeerAdvert
from meshinfer.discovery.mdns import MdnsConfig, MdnsDiscovery
from meshinfer.discovery.mdns_cache import REFRESH_AT, drop_expired_addresses, refresh_questions
from meshinfer.discovery.mdns_txt import SERVICE_TYPE, instance_label, txt_for_advert
from tests.helpers import until
from tests.test_discovery_mdns import LOOPBACK, Recorder, make_advert

QUICK = replace(LOOPBACK, address_check_interval=0.1)
HOST_TTL = 2  # seconds: the peer's A records


def peer_service(advert: PeerAdvert, addresses: list[str]) -> AsyncServiceInfo:
    fleet = advert.fleet_id
    label = instance_label(advert.node_id, fleet)
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=advert.port,
        properties=txt_for_advert(advert),
        server=f"{label}.local.",
        parsed_addresses=addresses,
        host_ttl=HOST_TTL,
    )


async def test_one_expired_address_of_several_is_an_update_not_a_loss() -> None:
    fleet = f"fleet-{uuid.uuid4().hex[:8]}"
    seen = Recorder()
    peer = AsyncZeroconf(interfaces=["127.0.0.1"])
    try:
        async with MdnsDiscovery(make_advert("veh-a", fleet), seen, QUICK) as a:
            b = make_advert("veh-b", fleet)
            both = peer_service(b, ["127.0.0.1", "127.0.0.2"])
            await peer.async_register_service(both, cooperating_responders=True)
            found = await seen.wait("found", "veh-b")
            # both on 127.0.0.0/8 with us: in the order zeroconf's cache gives them
            assert sorted(found.advert.addresses) == ["127.0.0.1", "127.0.0.2"]
            # The peer drops 127.0.0.2 without a goodbye: its announcement carries 127.0.0.1
            # alone, and our cached record of 127.0.0.2 runs out (nobody refreshes it).
            one = peer_service(b, ["127.0.0.1"])
            await peer.async_update_service(one)
            updated = await seen.wait("updated", "veh-b", limit=10)
            dropped_at = current_time_millis()
            assert updated.advert.addresses == ("127.0.0.1",)
            assert [e.kind for e in seen.events] == ["found", "updated"]
            assert a.peers["veh-b"].addresses == ("127.0.0.1",)
            # The peer answers our next refresh of 127.0.0.1 (cache-flush): zeroconf marks every
            # record of that name older than 1 s to live 1 s more, expired ones included, so
            # 127.0.0.2 came back (an `updated` with it, another without it a second later).
            await until(lambda: any(r.created > dropped_at for r in live_a(a, one.server)))
            assert sorted(socket.inet_ntoa(r.address) for r in live_a(a, one.server)) == [
                "127.0.0.1"
            ]
    finally:
        await peer.async_close()


def live_a(source: MdnsDiscovery, server: str | None) -> list[DNSAddress]:
    assert source._zc is not None and server is not None
    records = source._zc.zeroconf.cache.get_all_by_details(server, 1, 1)
    return [r for r in records if not r.is_expired(current_time_millis())]


def srv_created(source: MdnsDiscovery, name: str) -> float:
    assert source._zc is not None
    record = source._zc.zeroconf.cache.get_by_details(name, 33, 1)
    return 0.0 if record is None else record.created


def _cache_with(*records: DNSRecord) -> SimpleNamespace:
    cache = DNSCache()
    cache.async_add_records(records)
    return SimpleNamespace(cache=cache)  # what refresh_questions reads of a Zeroconf


def test_refresh_questions_ask_only_between_refresh_at_and_expiry() -> None:
    server, ttl_ms, t0 = "veh-b-0011223344556677.local.", 100_000, 1_000_000
    name = f"veh-b-0011223344556677.{SERVICE_TYPE}"
    a = DNSAddress(server, 1, 1, 100, socket.inet_aton("192.0.2.7"), created=t0)
    srv = DNSService(name, 33, 1, 100, 0, 0, 7000, server, created=t0)
    zc = _cache_with(a, srv)
    early = t0 + ttl_ms * (REFRESH_AT - 0.01)
    late = t0 + ttl_ms * (REFRESH_AT + 0.01)
    gone = t0 + ttl_ms + 1
    assert refresh_questions(zc, name, server, early) == []  # type: ignore[arg-type]
    asked = refresh_questions(zc, name, server, late)  # type: ignore[arg-type]
    # SRV and A (no TXT or AAAA cached); the SRV was never asked for before
    assert [(q.name, q.type) for q in asked] == [(name, 33), (server, 1)]
    assert refresh_questions(zc, name, server, gone) == []  # type: ignore[arg-type]


def test_expired_address_records_are_purged_and_live_ones_kept() -> None:
    server, t0 = "veh-b-0011223344556677.local.", 1_000_000
    old = DNSAddress(server, 1, 1, 2, socket.inet_aton("192.0.2.7"), created=t0)
    new = DNSAddress(server, 1, 1, 120, socket.inet_aton("192.0.2.8"), created=t0)
    zc = _cache_with(old, new)
    drop_expired_addresses(zc, server, t0 + 2_001)  # type: ignore[arg-type]
    assert zc.cache.get_all_by_details(server, 1, 1) == [new]


async def test_a_quiet_live_peer_is_not_lost_when_its_srv_record_runs_out() -> None:
    fleet = f"fleet-{uuid.uuid4().hex[:8]}"
    seen = Recorder()
    peer = AsyncZeroconf(interfaces=["127.0.0.1"])
    try:
        async with MdnsDiscovery(make_advert("veh-a", fleet), seen, QUICK) as a:
            info = peer_service(make_advert("veh-b", fleet), ["127.0.0.1"])
            await peer.async_register_service(info, cooperating_responders=True)
            await seen.wait("found", "veh-b")
            assert a._zc is not None
            cache = a._zc.zeroconf.cache
            first = cache.get_by_details(info.name, 33, 1)  # SRV: host_ttl, as the A record
            assert first is not None and first.ttl == HOST_TTL
            # the source asked for it again before it ran out, and the peer answered
            await until(lambda: srv_created(a, info.name) > first.created)
            expires = first.created + HOST_TTL * 1000
            await until(lambda: current_time_millis() > expires + 300)  # a few checks past it
            assert [e.kind for e in seen.events] == ["found"]  # was: "lost" at `expires`
            assert a.peers["veh-b"].addresses == ("127.0.0.1",)
    finally:
        await peer.async_close()


async def test_no_address_check_interval_means_no_cache_check() -> None:
    fleet = f"fleet-{uuid.uuid4().hex[:8]}"
    config = replace(LOOPBACK, address_check_interval=None)
    async with MdnsDiscovery(make_advert("veh-a", fleet), Recorder(), config) as a:
        assert a._address_watch is None
    doc = MdnsConfig.__doc__ or ""
    assert "``None`` turns that off" in doc  # the peers' cache check goes with the host look
    assert mdns.MdnsConfig is MdnsConfig


def test_names_other_modules_import_from_mdns_stay_there() -> None:
    names = [
        "MdnsConfig",
        "MdnsDiscovery",
        "_cancel_all",
        "_unfinished",
        "AsyncZeroconf",  # monkeypatched there by tests/test_discovery_hunt.py
    ]
    assert [n for n in names if not hasattr(mdns, n)] == []
