"""Discovery bug hunt: hostile and colliding adverts, restarts, shutdown races, seeds.

Live tests use real zeroconf on 127.0.0.1 as ``tests/test_discovery_mdns.py`` does (its helpers
are reused), each with its own fleet id. Waits are bounded and wait for an event, a spy, or a
later packet used as a barrier (loopback multicast reaches a socket in the order it was sent).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import DNSOutgoing, DNSText
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
from zeroconf.const import _CLASS_IN, _CLASS_UNIQUE, _TYPE_TXT

from meshinfer.discovery.base import MalformedAdvert, PeerAdvert, is_host
from meshinfer.discovery.mdns import MdnsDiscovery
from meshinfer.discovery.mdns_cache import advert_from_service
from meshinfer.discovery.mdns_txt import (
    SERVICE_TYPE,
    instance_label,
    pack_txt,
    txt_for_advert,
    unpack_txt,
)
from meshinfer.discovery.static import parse_seed
from meshinfer.errors import ConfigError, LocalProtocolError
from tests.helpers import announce_once
from tests.test_discovery_mdns import (
    LOOPBACK,
    MDNS_RESPONSE_FLAGS,
    WAIT,
    Recorder,
    _resolve_task,
    _send_pointer_only,
    make_advert,
    nodes,
    spy_on,
)


@pytest.fixture
def fleet() -> str:
    return f"fleet-{uuid.uuid4().hex[:8]}"


async def _send_txt(raw: AsyncZeroconf, name: str, text: bytes) -> None:
    """Multicast one TXT record (cache-flush set) under ``name``, as any host on the link could."""
    await raw.zeroconf.async_wait_for_start()
    out = DNSOutgoing(MDNS_RESPONSE_FLAGS)
    out.add_answer_at_time(DNSText(name, _TYPE_TXT, _CLASS_IN | _CLASS_UNIQUE, 4500, text), 0)
    raw.zeroconf.async_send(out)


def _service_of(advert: PeerAdvert) -> AsyncServiceInfo:
    """The service an MdnsDiscovery publishes for ``advert``, for a raw zeroconf to register."""
    label = instance_label(advert.node_id, advert.fleet_id)
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=advert.port,
        properties=txt_for_advert(advert),
        server=f"{label}.local.",
        parsed_addresses=list(advert.addresses),
    )


async def _wait_until(event: asyncio.Event, done: object) -> None:
    """Wait on a spy ``event`` until ``done()`` is true (bounded by WAIT)."""
    async with asyncio.timeout(WAIT):
        while not done():  # type: ignore[operator]
            event.clear()
            await event.wait()


# --- the lead: a broken TXT record under a known peer's name -----------------------------------


async def test_malformed_txt_under_a_peers_name_does_not_lose_the_peer(fleet: str) -> None:
    async with nodes(fleet, "veh-a", "veh-b") as [(a, a_seen), (b, _)]:
        await a_seen.wait("found", "veh-b")
        malformed = spy_on(a, "malformed")
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            await _send_txt(raw, b.service_name, pack_txt({"txtvers": "1", "id": "junk"}))
            await _wait_until(malformed, lambda: a.stats.ignored_malformed >= 1)
        assert [e.kind for e in a_seen.events if e.node_id == "veh-b"] == ["found"]
        assert a.peers["veh-b"] == b.advert and a.stats.lost == 0


# --- name collisions across fleets --------------------------------------------------------------


async def test_other_fleets_node_leaving_does_not_lose_our_node_of_the_same_id(fleet: str) -> None:
    async with nodes(fleet, "veh-a", "veh-b") as [(a, a_seen), _]:
        await a_seen.wait("found", "veh-b")
        sighted = spy_on(a, "sight")
        twin = MdnsDiscovery(make_advert("veh-b", fleet + "-other"), Recorder(), LOOPBACK)
        async with twin:
            await _wait_until(sighted, lambda: a.stats.ignored_other_fleet >= 1)
        # twin's goodbye went out before barrier's: once barrier is lost, twin's was handled
        async with nodes(fleet, "barrier"):
            await a_seen.wait("found", "barrier")
        await a_seen.wait("lost", "barrier")
        assert [e.kind for e in a_seen.events if e.node_id == "veh-b"] == ["found"]
        assert "veh-b" in a.peers and twin.service_name.lower() not in a._names


# --- restarts -------------------------------------------------------------------------------------


async def test_node_restarted_on_a_new_port_without_goodbye_is_updated(fleet: str) -> None:
    async with nodes(fleet, "veh-a") as [(_, a_seen)]:
        first = make_advert("veh-b", fleet, addresses=("127.0.0.1",), port=7000)
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as crashed:
            info = _service_of(first)
            await announce_once(crashed, info)
            await a_seen.wait("found", "veh-b")
            crashed.zeroconf.registry.async_remove(info)  # dies: no goodbye on close
        restarted = MdnsDiscovery(replace(first, port=7100), Recorder(), LOOPBACK)
        async with restarted:
            updated = await a_seen.wait("updated", "veh-b")
        assert updated.advert == restarted.advert and updated.advert.port == 7100


# --- shutdown races -----------------------------------------------------------------------------


class _Gate:
    """Holds the return of an AsyncZeroconf method (``register`` or ``update``), once zeroconf
    has made its announcement task, until the test opens it: an ``aclose`` that runs meanwhile
    is one that ran during zeroconf's own awaits in that method."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    def zeroconf_class(self, method: str) -> type[AsyncZeroconf]:
        gate = self

        class GatedZeroconf(AsyncZeroconf):
            async def _gated(self, name: str, *args: object, **kwargs: object) -> object:
                announcing = await getattr(super(), name)(*args, **kwargs)
                gate.entered.set()
                await gate.opened.wait()
                return announcing

            if method == "register":

                async def async_register_service(self, *args: object, **kwargs: object) -> object:
                    return await self._gated("async_register_service", *args, **kwargs)
            else:

                async def async_update_service(self, *args: object, **kwargs: object) -> object:
                    return await self._gated("async_update_service", *args, **kwargs)

        return GatedZeroconf


def _other_tasks() -> list[asyncio.Task[object]]:
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current and not t.done()]


async def test_aclose_while_start_registers_leaves_no_task(
    fleet: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate()
    monkeypatch.setattr("meshinfer.discovery.mdns.AsyncZeroconf", gate.zeroconf_class("register"))
    a = MdnsDiscovery(make_advert("veh-a", fleet), Recorder(), LOOPBACK)
    starting = asyncio.create_task(a.start())
    async with asyncio.timeout(WAIT):
        await gate.entered.wait()
    await a.aclose()
    gate.opened.set()
    with pytest.raises(LocalProtocolError, match="aclose"):
        await starting
    assert a.closed and _other_tasks() == []  # zeroconf's announcement task was left running


async def test_aclose_while_update_announces_leaves_no_task(
    fleet: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate()
    gate.opened.set()  # start goes through
    monkeypatch.setattr("meshinfer.discovery.mdns.AsyncZeroconf", gate.zeroconf_class("update"))
    a = MdnsDiscovery(make_advert("veh-a", fleet), Recorder(), LOOPBACK)
    await a.start()
    gate.opened.clear()
    updating = asyncio.create_task(a.update(replace(a.advert, port=7100)))
    async with asyncio.timeout(WAIT):
        await gate.entered.wait()
    await a.aclose()
    gate.opened.set()
    with pytest.raises(LocalProtocolError, match="aclose"):
        await updating
    assert _other_tasks() == []


async def test_second_aclose_returns_only_once_the_source_is_closed(fleet: str) -> None:
    a = MdnsDiscovery(make_advert("veh-a", fleet), Recorder(), LOOPBACK)
    await a.start()
    stopping, stopped = asyncio.Event(), asyncio.Event()
    stop = a._stop

    async def spy() -> None:
        stopping.set()
        await stop()
        stopped.set()

    a._stop = spy  # type: ignore[method-assign]
    first = asyncio.create_task(a.aclose())
    async with asyncio.timeout(WAIT):
        await stopping.wait()
    await a.aclose()
    assert stopped.is_set()  # was: returned at once, goodbyes unsent and sockets still open
    await first


async def test_aclose_while_a_lookup_is_in_flight_cancels_it(fleet: str) -> None:
    config = replace(LOOPBACK, resolve_timeout=60.0)
    a = MdnsDiscovery(make_advert("veh-a", fleet), Recorder(), config)
    async with a, AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
        ghost = _service_of(make_advert("veh-ghost", fleet, addresses=("127.0.0.1",)))
        task = await _resolve_task(a, _send_pointer_only(raw, ghost))
        await a.aclose()
        assert task.done() and not a._resolving and a.stats.unresolved == 0
        await a.aclose()  # idempotent
    assert _other_tasks() == []


# --- addresses no one can dial -------------------------------------------------------------------


def _offline(addresses: list[str], interface_index: int | None = None) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{instance_label('veh-1', 'f')}.{SERVICE_TYPE}",
        port=7000,
        properties=txt_for_advert(make_advert("veh-1", "f")),
        parsed_addresses=addresses,
        interface_index=interface_index,
    )


def test_ipv6_link_local_without_scope_is_not_dialed() -> None:
    info = _offline(["fe80::1", "10.0.0.1"])
    assert advert_from_service(info.name, info).addresses == ("10.0.0.1",)
    info = _offline(["fe80::1"])  # connect() to it fails with EINVAL
    with pytest.raises(MalformedAdvert, match="unicast"):
        advert_from_service(info.name, info)
    info = _offline(["fe80::1"], interface_index=3)  # heard on an interface: dialable
    assert advert_from_service(info.name, info).addresses == ("fe80::1%3",)


# --- static seeds -------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["10.0.7", "10.0.0.256", "999.1.1.1", "1234", "rsu.17"])
def test_seed_host_that_is_neither_an_address_nor_a_name_is_refused(host: str) -> None:
    # the resolver reads 10.0.7 as 10.0.0.7 and 1234 as 0.0.4.210: a typo would dial elsewhere
    with pytest.raises(ConfigError, match="addresses"):
        parse_seed(f"rsu-1@{host}:7400#{'ab' * 32}", fleet_id="f")
    assert not is_host(host)


@pytest.mark.parametrize("host", ["10.0.0.7", "rsu-17.example", "rsu17.", "localhost", "1e100.net"])
def test_seed_hosts_still_accepted(host: str) -> None:
    seed = parse_seed(f"rsu-1@{host}:7400#{'ab' * 32}", fleet_id="f")
    assert seed.advert.addresses == (host,) and is_host(host)


# --- many adverts -------------------------------------------------------------------------------


async def test_forged_adverts_beyond_max_peers_are_counted_not_kept(fleet: str) -> None:
    config = replace(LOOPBACK, max_peers=2)
    a = MdnsDiscovery(make_advert("veh-a", fleet), Recorder(), config)
    forged = [make_advert(f"veh-{i}", fleet, addresses=("127.0.0.1",)) for i in range(4)]
    async with a, AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
        sighted = spy_on(a, "sight")
        for advert in forged:
            await announce_once(raw, _service_of(advert))
        await _wait_until(sighted, lambda: a.stats.ignored_full >= 2)
        assert len(a.peers) == 2 and len(a._names) == 2 and a.stats.found == 2
        known = next(iter(a.peers.values()))
        await announce_once(raw, _service_of(replace(known, port=7100)), update=True)
        await _wait_until(sighted, lambda: a.stats.updated == 1)  # a known peer still updates
        assert a.peers[known.node_id].port == 7100 and len(a.peers) == 2


# --- the TXT decoder on its own -------------------------------------------------------------------

txt_keys = st.from_regex(r"[!-<>-~]{1,20}", fullmatch=True)  # printable ASCII but '='


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(txt_keys, st.text(max_size=50), max_size=8))  # entries < 255 bytes
def test_unpack_txt_reads_what_pack_txt_wrote(items: dict[str, str]) -> None:
    firsts: dict[str, bytes] = {}
    for key, value in items.items():
        firsts.setdefault(key.lower(), value.encode())  # first of a case-insensitive key wins
    assert unpack_txt(pack_txt(items)) == firsts


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_unpack_txt_raises_only_malformed_advert(data: bytes) -> None:
    try:
        items = unpack_txt(data)
    except MalformedAdvert:
        return
    assert all(key.isascii() and key == key.lower() and "=" not in key for key in items)
