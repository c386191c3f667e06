"""mDNS discovery: TXT codec (round trip, fuzz) and real zeroconf instances on 127.0.0.1.

The live tests use real multicast on the loopback interface, several zeroconf instances in this
process and one in a child process. Every test uses its own fleet id, so nodes of a test running
concurrently elsewhere on this host are only "other fleet" here. Waits are bounded and wait for
events (or a spy on the source's directory), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

import ifaddr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import DNSOutgoing, DNSPointer
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
from zeroconf.const import _CLASS_IN, _TYPE_PTR

from meshinfer.discovery.base import DiscoveryEvent, DiscoverySource, MalformedAdvert, PeerAdvert
from meshinfer.discovery.mdns import MdnsConfig, MdnsDiscovery
from meshinfer.discovery.mdns_cache import advert_from_service
from meshinfer.discovery.mdns_config import resolve_interfaces
from meshinfer.discovery.mdns_txt import (
    SERVICE_TYPE,
    advert_from_txt,
    instance_label,
    pack_txt,
    txt_for_advert,
    unpack_txt,
)
from meshinfer.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from meshinfer.transport.base import LinkKind
from tests.helpers import announce_once

LOOPBACK = MdnsConfig.loopback()
WAIT = 3.0  # upper bound for anything that should take milliseconds
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_advert(node_id: str, fleet_id: str, **changes: object) -> PeerAdvert:
    fields: dict[str, object] = {
        "node_id": node_id,
        "fleet_id": fleet_id,
        "static_key": os.urandom(32),
        "roles": ("vehicle", "gpu"),
        "protocol_version": 1,
        "addresses": (),
        "port": 7000,
        "link": LinkKind.V2V,
    }
    fields.update(changes)
    return PeerAdvert(**fields)  # type: ignore[arg-type]


class Recorder:
    """A sink that keeps every event and lets a test await the one it wants."""

    def __init__(self) -> None:
        self.events: list[DiscoveryEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: DiscoveryEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait(self, kind: str, node_id: str, limit: float = WAIT) -> DiscoveryEvent:
        async with asyncio.timeout(limit):
            while True:
                for event in self.events:
                    if (event.kind, event.node_id) == (kind, node_id):
                        return event
                self._changed.clear()
                await self._changed.wait()


def spy_on(source: MdnsDiscovery, method: str) -> asyncio.Event:
    """An event set whenever ``source.directory.<method>`` is called (sight, malformed...)."""
    called = asyncio.Event()
    original: Callable[..., object] = getattr(source.directory, method)

    def spy(*args: object, **kwargs: object) -> object:
        called.set()
        return original(*args, **kwargs)

    setattr(source.directory, method, spy)
    return called


@pytest.fixture
def fleet() -> str:
    return f"fleet-{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def nodes(fleet: str, *names: str) -> AsyncIterator[list[tuple[MdnsDiscovery, Recorder]]]:
    """Start one MdnsDiscovery per name (in order) and close them all on exit."""
    async with AsyncExitStack() as stack:
        started = []
        for name in names:
            recorder = Recorder()
            source = MdnsDiscovery(make_advert(name, fleet), recorder, LOOPBACK)
            await stack.enter_async_context(source)
            started.append((source, recorder))
        yield started
    for source, recorder in started:
        assert all(e.node_id != source.advert.node_id for e in recorder.events), "own node seen"


# --- TXT codec -----------------------------------------------------------------------------------


def test_txt_round_trip_keeps_every_field() -> None:
    advert = make_advert("veh-1", "f", addresses=("10.0.0.1", "fd00::1"))
    parsed = advert_from_txt(txt_for_advert(advert), addresses=advert.addresses, port=7000)
    assert parsed == advert


def test_unpack_txt_follows_rfc_6763() -> None:
    data = pack_txt({"Key": "1", "flag": "x"}) + b"\x04flag" + b"\x00" + b"\x03=zz" + b"\x05key=2"
    assert unpack_txt(data) == {"key": b"1", "flag": b"x"}  # first wins, case-insensitive
    assert unpack_txt(b"\x04flag") == {"flag": None}
    assert unpack_txt(pack_txt({})) == {}
    with pytest.raises(MalformedAdvert, match="runs past"):
        unpack_txt(b"\x09short")
    with pytest.raises(MalformedAdvert, match="ASCII"):
        unpack_txt(b"\x04\xff=ab")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"txtvers": "2"}, "txtvers"),
        ({"fp": "0" * 16}, "fingerprint"),
        ({"key": "AB" * 32}, "hex"),
        ({"pv": "-1"}, "pv"),
        ({"roles": "Vehicle"}, "roles"),
        ({"link": "lte"}, "link"),
        ({"id": ""}, "node_id"),
        ({"fleet": "x" * 65}, "fleet_id"),
    ],
)
def test_advert_from_txt_refuses_bad_fields(change: dict[str, str], why: str) -> None:
    advert = make_advert("veh-1", "f")
    items = {k: (v or b"").decode() for k, v in unpack_txt(txt_for_advert(advert)).items()}
    data = pack_txt({**items, **change})
    with pytest.raises(MalformedAdvert, match=why):
        advert_from_txt(data, addresses=("10.0.0.1",), port=7000)


def test_advert_from_txt_needs_keys_port_and_address() -> None:
    data = txt_for_advert(make_advert("veh-1", "f"))
    items = unpack_txt(data)
    for key in items:
        rest = {k: (v or b"").decode() for k, v in items.items() if k != key}
        if key != "link":  # optional
            with pytest.raises(MalformedAdvert, match=key):
                advert_from_txt(pack_txt(rest), addresses=("10.0.0.1",), port=7000)
    with pytest.raises(MalformedAdvert, match="port"):
        advert_from_txt(data, addresses=("10.0.0.1",), port=None)
    with pytest.raises(MalformedAdvert, match="addresses"):
        advert_from_txt(data, addresses=("not an address",), port=7000)


adverts = st.builds(
    make_advert,
    node_id=st.text(min_size=1, max_size=40).filter(lambda s: s.isprintable() and s == s.strip()),
    fleet_id=st.from_regex(r"[A-Za-z0-9 _.-]{1,30}", fullmatch=True).map(str.strip).filter(bool),
    roles=st.lists(
        st.from_regex(r"[a-z0-9][a-z0-9_-]{0,8}", fullmatch=True), max_size=5, unique=True
    ).map(tuple),
    protocol_version=st.integers(1, 65535),
    port=st.integers(1, 65535),
    link=st.none() | st.sampled_from(LinkKind),
    addresses=st.lists(st.ip_addresses().map(str), min_size=1, max_size=4).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(adverts)
def test_txt_round_trip_property(advert: PeerAdvert) -> None:
    data = txt_for_advert(advert)
    assert advert_from_txt(data, addresses=advert.addresses, port=advert.port) == advert


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_txt_fuzz_bytes_raise_only_remote_protocol_error(data: bytes) -> None:
    try:
        advert_from_txt(data, addresses=("10.0.0.1",), port=7000)
    except RemoteProtocolError:
        return
    pytest.fail("random bytes parsed as an advert")  # cannot carry a valid fingerprint by chance


txt_values = st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode))
txt_keys = st.sampled_from(["txtvers", "id", "fleet", "key", "fp", "roles", "pv", "link", "x"])


@settings(max_examples=400, deadline=None)
@given(adverts, st.dictionaries(txt_keys, txt_values | st.none(), max_size=5))
def test_txt_fuzz_mutated_records(advert: PeerAdvert, mutation: dict[str, bytes | None]) -> None:
    items = {k.encode(): v for k, v in unpack_txt(txt_for_advert(advert)).items()}
    items.update({k.encode(): v for k, v in mutation.items()})
    entries = [k + (b"=" + v if v is not None else b"") for k, v in items.items()]
    data = b"".join(bytes([len(e)]) + e for e in entries if len(e) < 256)
    try:
        parsed = advert_from_txt(data, addresses=advert.addresses, port=advert.port)
    except RemoteProtocolError:
        return
    assert isinstance(parsed, PeerAdvert) and parsed.static_key.hex() == items[b"key"].decode()


def test_instance_labels_are_distinct_dns_labels() -> None:
    ids = [("f", "A"), ("f", "a"), ("f", "veh 1"), ("f", "veh-1"), ("g", "veh-1"), ("f", "x" * 128)]
    labels = {instance_label(node_id, fleet_id) for fleet_id, node_id in [*ids, ("f", "é")]}
    assert len({label.lower() for label in labels}) == 7
    assert all(len(label.encode()) <= 63 for label in labels)
    assert instance_label("veh-1", "f").startswith("veh-1-")


def test_config_validation_and_interfaces() -> None:
    host = ifaddr.get_adapters()
    assert resolve_interfaces(MdnsConfig(interfaces=("lo",)), host) == ["127.0.0.1"]
    assert MdnsConfig(interfaces=["lo"]).interfaces == ("lo",)  # type: ignore[arg-type]
    assert MdnsConfig(interfaces=("all",)).interfaces == "all"
    assert resolve_interfaces(MdnsConfig(interfaces=("127.0.0.1", "lo")), host) == ["127.0.0.1"]
    with pytest.raises(ConfigError, match="no-such-if0"):
        resolve_interfaces(MdnsConfig(interfaces=("no-such-if0",)), host)
    with pytest.raises(ConfigError, match="IP literals"):
        MdnsDiscovery(make_advert("a", "f", addresses=("rsu.example",)), Recorder())
    for bad in [{"interfaces": "eth0"}, {"ip_version": "v5"}, {"resolve_timeout": 0}]:
        with pytest.raises(ConfigError, match=r"mdns\."):
            MdnsConfig(**bad)  # type: ignore[arg-type]


# --- live zeroconf on 127.0.0.1 ----------------------------------------------------------------


async def test_two_nodes_find_each_other_with_all_fields(fleet: str) -> None:
    async with nodes(fleet, "veh-a", "veh-b") as [(a, a_seen), (b, b_seen)]:
        assert isinstance(a, DiscoverySource)
        found_b = await a_seen.wait("found", "veh-b")
        found_a = await b_seen.wait("found", "veh-a")
        assert found_b.advert == b.advert and found_a.advert == a.advert
        assert b.advert.addresses == ("127.0.0.1",)
        assert found_b.advert.static_key == b.advert.static_key
        assert found_b.at >= b.started_at and found_b.source == "mdns"
        assert dict(a.peers) == {"veh-b": b.advert}
        assert a.stats.ignored_self >= 1  # we hear our own announcement, and drop it


async def test_three_nodes_all_find_each_other(fleet: str) -> None:
    names = ("veh-a", "veh-b", "veh-c")
    async with nodes(fleet, *names) as started:
        for source, seen in started:
            others = [n for n in names if n != source.advert.node_id]
            for other in others:
                await seen.wait("found", other)
            assert sorted(source.peers) == others


async def test_goodbye_on_close_reports_lost_promptly(fleet: str) -> None:
    async with nodes(fleet, "veh-a") as [(a, a_seen)]:
        b = MdnsDiscovery(make_advert("veh-b", fleet), Recorder(), LOOPBACK)
        async with b:
            await a_seen.wait("found", "veh-b")
            closing_at = asyncio.get_running_loop().time()
            await b.aclose()
        lost = await a_seen.wait("lost", "veh-b", limit=1.0)  # else: when TTLs end, in 75 min
        assert closing_at <= lost.at < closing_at + 1.0 and "veh-b" not in a.peers
        assert a.stats.lost == 1 and b.closed


async def test_update_is_reported(fleet: str) -> None:
    async with nodes(fleet, "veh-a", "veh-b") as [(_, a_seen), (b, _)]:
        await a_seen.wait("found", "veh-b")
        await b.update(replace(b.advert, roles=("rsu",), port=7100))
        updated = await a_seen.wait("updated", "veh-b")
        assert updated.advert.roles == ("rsu",) and updated.advert.port == 7100
        with pytest.raises(LocalProtocolError):
            await b.update(replace(b.advert, fleet_id="another"))


async def test_other_fleet_is_ignored_and_counted(fleet: str) -> None:
    async with nodes(fleet, "veh-a") as [(a, a_seen)]:
        sighted = spy_on(a, "sight")
        other = MdnsDiscovery(make_advert("veh-x", fleet + "-other"), Recorder(), LOOPBACK)
        async with other:
            while a.stats.ignored_other_fleet == 0:
                sighted.clear()
                async with asyncio.timeout(WAIT):
                    await sighted.wait()
        assert "veh-x" not in a.peers and a.stats.found == 0
        assert all(e.node_id != "veh-x" for e in a_seen.events)


async def _register_raw(zc: AsyncZeroconf, label: str, text: bytes) -> AsyncServiceInfo:
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=7000,
        properties=text,
        server=f"{label}.local.",
        parsed_addresses=["127.0.0.1"],
    )
    await announce_once(zc, info)
    return info


async def test_malformed_adverts_are_ignored_and_counted(fleet: str) -> None:
    async with nodes(fleet, "veh-a") as [(a, a_seen)]:
        malformed = spy_on(a, "malformed")
        squatter = txt_for_advert(make_advert("veh-real", fleet))
        cases = [
            (instance_label("veh-bad", fleet), pack_txt({"txtvers": "1", "id": "veh-bad"})),
            (instance_label("veh-bad2", fleet), b"\x40truncated"),
            (instance_label("someone-else", fleet), squatter),  # label not derived from its id
        ]
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            for expected, (label, text) in enumerate(cases, start=1):
                await _register_raw(raw, label, text)
                while a.stats.ignored_malformed < expected:
                    malformed.clear()
                    async with asyncio.timeout(WAIT):
                        await malformed.wait()
            await raw.async_unregister_all_services()
        # >= : a concurrent run of this test elsewhere on the host adds its own malformed adverts
        assert a.stats.ignored_malformed >= 3 and not a.peers and a_seen.events == []


MDNS_RESPONSE_FLAGS = 0x8400  # QR (response) + AA (authoritative)


def _service(node_id: str, fleet: str) -> AsyncServiceInfo:
    label = instance_label(node_id, fleet)
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=7000,
        properties=txt_for_advert(make_advert(node_id, fleet, addresses=("127.0.0.1",))),
        server=f"{label}.local.",
        parsed_addresses=["127.0.0.1"],
    )


async def _send_pointer_only(raw: AsyncZeroconf, info: AsyncServiceInfo) -> None:
    """Multicast just the PTR record, so the browser must ask for SRV/TXT/A itself."""
    await raw.zeroconf.async_wait_for_start()
    out = DNSOutgoing(MDNS_RESPONSE_FLAGS)
    out.add_answer_at_time(info.dns_pointer(), 0)
    raw.zeroconf.async_send(out)


async def _resolve_task(source: MdnsDiscovery, trigger: Awaitable[None]) -> asyncio.Task[None]:
    """Await ``trigger`` and return the resolve task it makes ``source`` start."""
    spawned = asyncio.Event()
    original = source._spawn_resolve

    def spy(name: str, info: AsyncServiceInfo) -> None:
        original(name, info)
        spawned.set()

    source._spawn_resolve = spy  # type: ignore[method-assign]
    await trigger
    async with asyncio.timeout(WAIT):
        await spawned.wait()
    [task] = source._resolving.values()
    return task


async def test_service_missing_records_is_resolved_by_asking(fleet: str) -> None:
    async with nodes(fleet, "veh-a") as [(a, a_seen)]:
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            info = _service("veh-slow", fleet)
            raw.zeroconf.registry.async_add(info)  # answers questions, never announced
            task = await _resolve_task(a, _send_pointer_only(raw, info))
            found = await a_seen.wait("found", "veh-slow")
            await task
        assert found.advert.port == 7000 and found.advert.addresses == ("127.0.0.1",)
        assert a.stats.unresolved == 0


async def test_service_never_resolved_is_counted(fleet: str) -> None:
    config = replace(LOOPBACK, resolve_timeout=0.2)
    async with MdnsDiscovery(make_advert("veh-a", fleet), Recorder(), config) as a:
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            ghost = _service("veh-ghost", fleet)  # nobody answers for it
            task = await _resolve_task(a, _send_pointer_only(raw, ghost))
            async with asyncio.timeout(WAIT):
                await task
        assert a.stats.unresolved == 1 and not a.peers


ADVERTISER = """
import asyncio, os, sys
from meshinfer.discovery.base import PeerAdvert
from meshinfer.discovery.mdns import MdnsConfig, MdnsDiscovery

async def main(node_id, fleet_id, key_hex):
    def report(event):
        print(event.kind, event.node_id, flush=True)
    advert = PeerAdvert(node_id, fleet_id, bytes.fromhex(key_hex), ("vehicle",), 1, (), 7400)
    async with MdnsDiscovery(advert, report, MdnsConfig.loopback()):
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_second_process_finds_and_is_found(fleet: str) -> None:
    key = os.urandom(32)
    async with nodes(fleet, "veh-parent") as [(_, seen)]:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ADVERTISER, "veh-child", fleet, key.hex(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": REPO_ROOT},
        )  # fmt: skip
        assert child.stdin is not None and child.stdout is not None
        try:
            found = await seen.wait("found", "veh-child", limit=10.0)  # includes interpreter start
            assert found.advert.static_key == key and found.advert.port == 7400
            async with asyncio.timeout(WAIT):
                lines = [(await child.stdout.readline()).decode().split() for _ in range(2)]
            assert ["found", "veh-parent"] in lines
        finally:
            child.stdin.close()
            async with asyncio.timeout(10):
                await child.wait()
        assert child.returncode == 0
        await seen.wait("lost", "veh-child", limit=1.0)


# --- hostile hosts ---------------------------------------------------------------------------


async def _send_pointers(raw: AsyncZeroconf, *names: str) -> None:
    """Multicast one PTR record per name, as a host on the link could, valid name or not."""
    await raw.zeroconf.async_wait_for_start()
    out = DNSOutgoing(MDNS_RESPONSE_FLAGS)
    for name in names:
        out.add_answer_at_time(DNSPointer(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN, 4500, name), 0)
    raw.zeroconf.async_send(out)


async def test_hostile_service_names_do_not_stop_discovery(fleet: str) -> None:
    async with nodes(fleet, "veh-a") as [(a, a_seen)]:
        malformed = spy_on(a, "malformed")
        hostile = [f"bad\x01name.{SERVICE_TYPE}", f"{'x' * 40}.{'y' * 40}.{SERVICE_TYPE}"]
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            await _send_pointers(raw, *hostile)
            while a.stats.ignored_malformed < len(hostile):
                malformed.clear()
                async with asyncio.timeout(WAIT):
                    await malformed.wait()
        # zeroconf keeps a change whose handler raised pending, and fires it first on every
        # later update: had the names reached it, no peer would be found from here on.
        async with nodes(fleet, "veh-b"):
            found = await a_seen.wait("found", "veh-b")
        assert found.advert.addresses == ("127.0.0.1",)


def _offline_service(node_id: str, fleet: str, addresses: list[str]) -> AsyncServiceInfo:
    label = instance_label(node_id, fleet)
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=7000,
        properties=txt_for_advert(make_advert(node_id, fleet)),
        server=f"{label}.local.",
        parsed_addresses=addresses,
    )


def test_addresses_no_peer_listens_on_are_dropped() -> None:
    usable = ["0.0.0.0", "224.0.0.251", "127.0.0.1", "255.255.255.255", "ff02::fb", "::", "fd00::1"]
    info = _offline_service("veh-1", "f", usable)
    advert = advert_from_service(info.name, info)
    assert sorted(advert.addresses) == ["127.0.0.1", "fd00::1"]
    info = _offline_service("veh-1", "f", ["0.0.0.0", "255.255.255.255", "224.0.0.1", "::"])
    with pytest.raises(MalformedAdvert, match="unicast"):
        advert_from_service(info.name, info)


@settings(max_examples=300, deadline=None)
@given(
    name=st.text(max_size=90) | st.sampled_from([f"x.{SERVICE_TYPE}", SERVICE_TYPE]),
    text=st.binary(max_size=300) | adverts.map(txt_for_advert),
    port=st.integers(0, 65535),
    addresses=st.lists(st.ip_addresses().map(str), min_size=1, max_size=20),
)
def test_advert_from_service_fuzz_raises_only_malformed(
    name: str, text: bytes, port: int, addresses: list[str]
) -> None:
    info = AsyncServiceInfo(
        SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=port, properties=text, parsed_addresses=addresses
    )
    try:
        advert = advert_from_service(name, info)
    except MalformedAdvert:
        return
    assert name.lower() == f"{instance_label(advert.node_id, advert.fleet_id)}.{SERVICE_TYPE}"
    assert 1 <= len(advert.addresses) <= 16 and advert.port == port


async def test_flood_of_bare_service_names_is_resolved_with_bounded_questions(fleet: str) -> None:
    config = replace(LOOPBACK, resolve_timeout=0.2, max_resolving=1)
    async with MdnsDiscovery(make_advert("veh-a", fleet), Recorder(), config) as a:
        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as raw:
            ghosts = [_service(f"veh-ghost-{i}", fleet).name for i in range(3)]
            task = await _resolve_task(a, _send_pointers(raw, *ghosts))
            async with asyncio.timeout(WAIT):
                await task
        assert a.stats.unresolved >= 3 and not a.peers and not a._resolving
    with pytest.raises(ConfigError, match="max_resolving"):
        MdnsConfig(max_resolving=0)
