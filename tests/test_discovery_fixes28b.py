"""Discovery fixes (session 28b): the mDNS source drops a peer's address once its record
expires in zeroconf's cache (a lost goodbye, a peer gone without one), and asks for a peer's
address records again before they expire, so a peer that is still there keeps them.

Real zeroconf on 127.0.0.1 as ``tests/test_discovery_mdns.py`` does; the peer is a bare
AsyncZeroconf whose address records live 2 s.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

from zeroconf import current_time_millis
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from meshinfer.discovery.mdns import MdnsDiscovery
from meshinfer.discovery.mdns_txt import SERVICE_TYPE, instance_label, txt_for_advert
from tests.helpers import until
from tests.test_discovery_mdns import LOOPBACK, Recorder, make_advert

QUICK = replace(LOOPBACK, address_check_interval=0.1)
HOST_TTL = 2  # seconds: the peer's A records


def peer_service(fleet: str, addresses: list[str]) -> AsyncServiceInfo:
    advert = make_advert("veh-b", fleet, addresses=tuple(addresses))
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


def a_records(source: MdnsDiscovery, server: str) -> list:
    assert source._zc is not None
    records = source._zc.zeroconf.cache.get_all_by_details(server, 1, 1)
    return [r for r in records if not r.is_expired(current_time_millis())]


async def test_a_live_peer_keeps_its_address_and_a_silent_one_is_lost() -> None:
    fleet = f"fleet-{uuid.uuid4().hex[:8]}"
    seen = Recorder()
    peer = AsyncZeroconf(interfaces=["127.0.0.1"])
    info = peer_service(fleet, ["127.0.0.1"])
    closed = False
    try:
        async with MdnsDiscovery(make_advert("veh-a", fleet), seen, QUICK) as a:
            await peer.async_register_service(info, cooperating_responders=True)
            found = await seen.wait("found", "veh-b")
            assert found.advert.addresses == ("127.0.0.1",)
            first = a_records(a, info.server)[0]
            expires = first.created + HOST_TTL * 1000
            # the source asked again before the record ran out, and the peer answered
            await until(lambda: any(r.created > first.created for r in a_records(a, info.server)))
            await until(lambda: current_time_millis() > expires)
            assert a.peers["veh-b"].addresses == ("127.0.0.1",)
            assert [e.kind for e in seen.events] == ["found"]
            # the peer goes without a goodbye (its power cut): its records expire here
            await peer.zeroconf._async_close()
            closed = True
            lost = await seen.wait("lost", "veh-b", limit=10)
            assert lost.advert.addresses == ("127.0.0.1",)
            assert "veh-b" not in a.peers
    finally:
        if not closed:
            await peer.async_close()
