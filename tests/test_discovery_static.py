"""Static seed discovery, seed-string parsing, and the shared discovery base (adverts, filter)."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer import PROTOCOL_VERSION
from meshinfer.discovery.base import (
    MALFORMED_WARNING_S,
    DiscoveryEvent,
    DiscoverySource,
    DiscoveryStats,
    EventQueue,
    PeerAdvert,
    PeerDirectory,
    key_fingerprint,
)
from meshinfer.discovery.static import StaticDiscovery, StaticSeed, parse_seed, parse_seeds
from meshinfer.errors import ConfigError, LocalProtocolError
from meshinfer.transport.base import Address, LinkKind

FLEET = "fleet-test"
KEY = bytes(range(32))


def make_seed(node_id: str = "rsu-1", **changes: object) -> StaticSeed:
    fields: dict[str, object] = {
        "node_id": node_id,
        "host": "10.0.0.7",
        "port": 7400,
        "static_key": KEY,
        "fleet_id": FLEET,
        "roles": ("rsu",),
    }
    fields.update(changes)
    return StaticSeed(**fields)  # type: ignore[arg-type]


async def next_event(queue: EventQueue, limit: float = 2.0) -> DiscoveryEvent:
    async with asyncio.timeout(limit):
        return await queue.get()


# --- PeerAdvert and the directory ---------------------------------------------------------------


def test_advert_validates_fields_and_names_the_bad_one() -> None:
    good = make_seed().advert
    assert good.fingerprint == key_fingerprint(KEY) and len(good.fingerprint) == 16
    assert good.dial_addresses() == (Address("10.0.0.7", 7400),)
    cases = {
        "static_key": {"static_key": b"\x00" * 31},
        "port": {"port": 0},
        "roles": {"roles": ("Bad Role",)},
        "node_id": {"node_id": "bad\nid"},
        "fleet_id": {"fleet_id": ""},
        "protocol_version": {"protocol_version": True},
        "addresses": {"addresses": ("not a host!",)},
    }
    fields = {f: getattr(good, f) for f in good.__dataclass_fields__}
    for name, change in cases.items():
        with pytest.raises(ConfigError, match=name):
            PeerAdvert(**{**fields, **change})


def test_malformed_adverts_are_a_warning_at_most_once_a_minute(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="meshinfer.discovery.base")
    stats = DiscoveryStats()
    directory = PeerDirectory("me", FLEET, lambda event: None, stats, "mdns")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    directory.malformed("bad TXT 1", now=100.0)
    for i in range(2, 6):  # a flood within the minute: DEBUG only
        directory.malformed(f"bad TXT {i}", now=100.0 + i)
    directory.malformed("bad TXT 6", now=100.0 + MALFORMED_WARNING_S)
    assert warnings() == [
        "mdns: ignored a malformed advert: bad TXT 1",
        "mdns: ignored a malformed advert: bad TXT 6 (4 more since the last warning)",
    ]
    assert stats.ignored_malformed == 6
    assert "mdns: ignored a malformed advert: bad TXT 3" in caplog.text  # at DEBUG


def test_directory_reports_found_updated_lost_in_order_and_filters() -> None:
    events: list[DiscoveryEvent] = []
    stats = DiscoveryStats()
    directory = PeerDirectory("me", FLEET, events.append, stats, "test")
    peer = make_seed("peer").advert
    assert directory.sight(make_seed("me").advert, 1.0) is None
    assert directory.sight(make_seed("x", fleet_id="other").advert, 1.0) is None
    assert directory.sight(peer, 2.0) is not None
    assert directory.sight(peer, 2.5) is None  # unchanged: nothing to report
    namesake = make_seed("peer", fleet_id="other").advert  # same node id, another fleet
    assert directory.sight(namesake, 2.6) is None and directory.peers["peer"] == peer
    moved = make_seed("peer", port=7500).advert
    directory.sight(moved, 3.0)
    directory.lose("peer", 4.0)
    assert directory.lose("peer", 5.0) is None  # not known any more
    assert [(e.kind, e.advert, e.at) for e in events] == [
        ("found", peer, 2.0),
        ("updated", moved, 3.0),
        ("lost", moved, 4.0),
    ]
    assert (stats.found, stats.updated, stats.lost) == (1, 1, 1)
    assert (stats.ignored_self, stats.ignored_other_fleet) == (1, 2)


def test_directory_survives_a_failing_sink() -> None:
    stats = DiscoveryStats()

    def broken(event: DiscoveryEvent) -> None:
        raise RuntimeError("consumer bug")

    directory = PeerDirectory("me", FLEET, broken, stats, "test")
    directory.sight(make_seed("a").advert, 1.0)
    directory.sight(make_seed("b").advert, 1.0)
    assert set(directory.peers) == {"a", "b"}
    assert stats.sink_errors == 2 and stats.found == 2


# --- seed strings --------------------------------------------------------------------------------


def test_parse_seed_reads_every_field() -> None:
    text = f"rsu-17@10.20.0.17:7400?key={KEY.hex()}&roles=rsu,relay&link=v2i&pv=3&fleet=f2"
    seed = parse_seed(text, fleet_id=FLEET)
    assert seed == StaticSeed(
        "rsu-17", "10.20.0.17", 7400, KEY, "f2", ("rsu", "relay"), 3, LinkKind.V2I
    )


def test_parse_seed_defaults_and_host_forms() -> None:
    v6 = parse_seed(f"coord@[fd00::10]:7400?key={KEY.hex().upper()}", fleet_id=FLEET)
    assert (v6.host, v6.port, v6.static_key, v6.fleet_id) == ("fd00::10", 7400, KEY, FLEET)
    assert (v6.roles, v6.protocol_version, v6.link) == ((), PROTOCOL_VERSION, None)
    named = parse_seed(f"a@rsu-3.example.net:1?key={KEY.hex()}", fleet_id=FLEET)
    assert named.host == "rsu-3.example.net"
    short = parse_seed(f"a@rsu-3.example.net:1?roles=rsu#{KEY.hex()}", fleet_id=FLEET)
    assert (short.static_key, short.roles) == (KEY, ("rsu",))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("rsu@10.0.0.1:7400", "key="),
        (f"rsu@10.0.0.1:7400?key={KEY.hex()[:-2]}", "key="),
        (f"10.0.0.1:7400?key={KEY.hex()}", "NODE_ID@"),
        (f"rsu@10.0.0.1?key={KEY.hex()}", "HOST:PORT"),
        (f"rsu@10.0.0.1:99999?key={KEY.hex()}", "port"),
        (f"rsu@10.0.0.1:port?key={KEY.hex()}", "port"),
        (f"rsu@fd00::1:7400?key={KEY.hex()}", "IPv6"),
        (f"rsu@[10.0.0.1]:7400?key={KEY.hex()}", "IPv6"),
        (f"rsu@10.0.0.1:7400?key={KEY.hex()}&colour=red", "unknown option"),
        (f"rsu@10.0.0.1:7400?key={KEY.hex()}&key={KEY.hex()}", "twice"),
        (f"rsu@10.0.0.1:7400?key={KEY.hex()}#{KEY.hex()}", "once"),
        ("rsu@10.0.0.1:7400#abc", "key="),
        (f"rsu@10.0.0.1:7400?key={KEY.hex()}&link=satellite", "link="),
        (f"rsu@10.0.0.1:7400?key={KEY.hex()}&roles=a,,b", "roles"),
        (f"rsu@bad_host!:7400?key={KEY.hex()}", "addresses"),
    ],
)
def test_parse_seed_errors_name_the_entry(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_seed(text, fleet_id=FLEET)
    assert repr(text) in str(info.value) and why in str(info.value)


def test_parse_seeds_refuses_a_node_twice() -> None:
    entry = f"rsu@10.0.0.1:7400?key={KEY.hex()}"
    assert len(parse_seeds([entry], fleet_id=FLEET)) == 1
    with pytest.raises(ConfigError, match="'rsu' appears twice"):
        parse_seeds([entry, entry.replace("7400", "7401")], fleet_id=FLEET)


node_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,40}", fullmatch=True)  # no ? or #
hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z][a-z0-9]{0,8}){0,3}", fullmatch=True),
)
seeds = st.builds(
    StaticSeed,
    node_id=node_ids,
    host=hosts,
    port=st.integers(1, 65535),
    static_key=st.binary(min_size=32, max_size=32),
    fleet_id=st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True),
    roles=st.lists(
        st.from_regex(r"[a-z0-9][a-z0-9_-]{0,8}", fullmatch=True), max_size=4, unique=True
    ).map(tuple),
    protocol_version=st.integers(1, 65535),
    link=st.none() | st.sampled_from(LinkKind),
)


@settings(max_examples=300, deadline=None)
@given(seeds)
def test_seed_string_round_trips(seed: StaticSeed) -> None:
    assert parse_seed(str(seed), fleet_id="unused") == seed


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.builds(lambda s: f"a@{s}", st.text(max_size=120)))
def test_parse_seed_fuzz_raises_only_config_error(text: str) -> None:
    try:
        seed = parse_seed(text, fleet_id=FLEET)
    except ConfigError:
        return
    assert isinstance(seed, StaticSeed)


# --- the source ----------------------------------------------------------------------------------


async def test_static_source_reports_seeds_at_start_and_filters() -> None:
    queue = EventQueue()
    mine, other_fleet = make_seed("me"), make_seed("far", fleet_id="other-fleet")
    listed = [make_seed("rsu-1"), mine, other_fleet, make_seed("coord", roles=("coordinator",))]
    source = StaticDiscovery(listed, queue, own_node_id="me", fleet_id=FLEET)
    assert isinstance(source, DiscoverySource)
    async with source:
        found = [await next_event(queue), await next_event(queue)]
        assert queue.get_nowait() is None
        assert [(e.kind, e.advert) for e in found] == [
            ("found", listed[0].advert),
            ("found", listed[3].advert),
        ]
        assert all(e.at >= source.started_at and e.source == "static" for e in found)
        assert set(source.peers) == {"rsu-1", "coord"}
        assert (source.stats.ignored_self, source.stats.ignored_other_fleet) == (1, 1)
    assert source.closed
    await source.aclose()  # idempotent
    with pytest.raises(LocalProtocolError):
        await source.start()


async def test_static_source_reannounces_periodically() -> None:
    queue = EventQueue()
    source = StaticDiscovery([make_seed()], queue, own_node_id="me", fleet_id=FLEET,
                             reannounce_interval=0.01)  # fmt: skip
    async with source:
        first, second = await next_event(queue), await next_event(queue)
    assert (first.kind, second.kind) == ("found", "found")
    assert second.at >= first.at + 0.01
    assert source.stats.found >= 2


async def test_replace_seeds_reports_the_difference() -> None:
    queue = EventQueue()
    old, gone = make_seed("rsu-1"), make_seed("rsu-2")
    source = StaticDiscovery([old, gone], queue, own_node_id="me", fleet_id=FLEET)
    async with source:
        await next_event(queue), await next_event(queue)
        moved, new = make_seed("rsu-1", host="10.0.0.8"), make_seed("rsu-3")
        source.replace_seeds([moved, new])
        events = [await next_event(queue) for _ in range(3)]
    assert [(e.kind, e.node_id) for e in events] == [
        ("lost", "rsu-2"),
        ("updated", "rsu-1"),
        ("found", "rsu-3"),
    ]
    assert events[1].advert.addresses == ("10.0.0.8",)


async def test_static_source_rejects_bad_interval_and_closes_without_start() -> None:
    with pytest.raises(ConfigError, match="reannounce_interval"):
        StaticDiscovery([], EventQueue(), own_node_id="me", fleet_id=FLEET, reannounce_interval=0)
    source = StaticDiscovery([], EventQueue(), own_node_id="me", fleet_id=FLEET)
    await source.aclose()
    assert source.closed and source.started_at is None


def test_static_key_is_carried_for_ik() -> None:
    key = os.urandom(32)
    seed = parse_seed(f"rsu@10.0.0.1:7400?key={key.hex()}", fleet_id=FLEET)
    assert seed.advert.static_key == key
