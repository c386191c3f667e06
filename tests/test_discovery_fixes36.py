"""Discovery fixes of the thirty-sixth session: a cancelled ``aclose``, forged records, the TXT
decoder's properties. Real zeroconf on 127.0.0.1 where a test needs mDNS."""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import current_time_millis
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from meshinfer.discovery.base import DiscoveryEvent, MalformedAdvert, PeerAdvert
from meshinfer.discovery.mdns import MdnsConfig, MdnsDiscovery
from meshinfer.discovery.mdns_txt import (
    SERVICE_TYPE,
    TXT_KEYS,
    advert_from_txt,
    instance_label,
    txt_for_advert,
    unpack_txt,
)
from meshinfer.discovery.static import StaticDiscovery, parse_seed
from meshinfer.transport.base import LinkKind
from tests.helpers import until

LOOPBACK = MdnsConfig.loopback()
WAIT = 3.0


def make_advert(node_id: str, fleet_id: str, **changes: object) -> PeerAdvert:
    fields: dict[str, object] = {
        "node_id": node_id,
        "fleet_id": fleet_id,
        "static_key": os.urandom(32),
        "roles": ("vehicle",),
        "protocol_version": 1,
        "addresses": (),
        "port": 7000,
        "link": LinkKind.V2V,
    }
    fields.update(changes)
    return PeerAdvert(**fields)  # type: ignore[arg-type]


@pytest.fixture
def fleet() -> str:
    return f"fleet-{uuid.uuid4().hex[:8]}"


def _ignore(event: DiscoveryEvent) -> None:
    pass


# --- a cancelled aclose ----------------------------------------------------------------------


async def test_a_cancelled_aclose_still_closes_zeroconf(fleet: str) -> None:
    """``MeshNode.leave`` gathers the sources' ``aclose`` with membership's leave: a caller
    cancelled meanwhile (a shutdown timeout) cancelled ``_stop`` half-way, yet marked the
    source stopped. zeroconf's sockets, browser and tasks stayed open, no goodbye went out, and
    every later ``aclose`` returned at once."""
    source = MdnsDiscovery(make_advert("veh-a", fleet), _ignore, LOOPBACK)
    await source.start()
    assert source._zc is not None
    zc = source._zc.zeroconf
    closing = asyncio.get_running_loop().create_task(source.aclose())
    await asyncio.sleep(0)  # into _stop, waiting for the address watch to end
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    async with asyncio.timeout(WAIT):
        await source.aclose()  # waits for the one stop, which goes on
    assert zc.done


async def test_a_cancelled_aclose_of_a_static_source_still_stops_it(fleet: str) -> None:
    seed = parse_seed(f"rsu-1@10.0.0.1:7400#{os.urandom(32).hex()}", fleet_id=fleet)
    source = StaticDiscovery(
        [seed], _ignore, own_node_id="veh-a", fleet_id=fleet, reannounce_interval=60.0
    )
    await source.start()
    reannouncer = source._reannouncer
    assert reannouncer is not None
    closing = asyncio.get_running_loop().create_task(source.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    async with asyncio.timeout(WAIT):
        await source.aclose()
    assert reannouncer.done() and source.closed


# --- refreshing a quiet peer's records when looks are far apart -------------------------------

HOST_TTL = 2  # seconds: the peer's SRV and address records
SPARSE = replace(LOOPBACK, address_check_interval=1.2)  # looks further apart than a quarter TTL


def _peer_service(fleet: str) -> AsyncServiceInfo:
    advert = make_advert("veh-b", fleet, addresses=("127.0.0.1",))
    label = instance_label(advert.node_id, fleet)
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=advert.port,
        properties=txt_for_advert(advert),
        server=f"{label}.local.",
        parsed_addresses=["127.0.0.1"],
        host_ttl=HOST_TTL,
    )


async def test_a_quiet_peer_is_kept_when_looks_are_further_apart_than_its_refresh_window(
    fleet: str,
) -> None:
    """The last quarter of a 2 s TTL is 0.5 s; looks 1.2 s apart fell on it about four times
    in ten, so the peer's SRV record ran out unasked for and the live peer was ``lost``. Now a
    record that would expire before the next look is asked for at this one."""
    events: list[DiscoveryEvent] = []
    peer = AsyncZeroconf(interfaces=["127.0.0.1"])
    info = _peer_service(fleet)
    try:
        async with MdnsDiscovery(make_advert("veh-a", fleet), events.append, SPARSE) as a:
            await peer.async_register_service(info, cooperating_responders=True)
            await until(lambda: "veh-b" in a.peers)
            start = current_time_millis()
            await until(lambda: current_time_millis() > start + 2.5 * HOST_TTL * 1000, timeout=10)
            assert [e.kind for e in events] == ["found"]
    finally:
        await peer.async_close()


# --- the TXT decoder against a model of RFC 6763 section 6 ----------------------------------

_KEY_BYTES = st.sampled_from([b"id", b"ID", b"Id", b"key", b"fp", b"x", b"pv", b"", b"a b"])
_ENTRIES = st.lists(
    st.tuples(_KEY_BYTES, st.booleans(), st.binary(max_size=40)), max_size=12
)  # (key, with '=', value)


def _encode(entries: list[bytes]) -> bytes:
    return b"".join(bytes([len(e)]) + e for e in entries)


@settings(max_examples=300, deadline=None)
@given(entries=_ENTRIES)
def test_unpack_txt_matches_the_rfc_model(entries: list[tuple[bytes, bool, bytes]]) -> None:
    """Empty keys are skipped, keys compare case-insensitively, the first occurrence wins, a
    key without '=' has no value and one with '=' has its (possibly empty) value."""
    raw = [key + (b"=" + value if equals else b"") for key, equals, value in entries]
    model: dict[str, bytes | None] = {}
    for key, equals, value in entries:
        if key and b"=" not in key:
            model.setdefault(key.decode().lower(), value if equals else None)
    assert unpack_txt(_encode(raw)) == model


@settings(max_examples=300, deadline=None)
@given(
    noise=st.lists(
        st.binary(min_size=1, max_size=60).filter(
            lambda e: e.partition(b"=")[0].lower() not in {k.encode() for k in TXT_KEYS}
        ),
        max_size=40,
    ),
    cut=st.integers(0, 20),
)
def test_unwanted_entries_of_any_bytes_never_change_the_advert(
    noise: list[bytes], cut: int
) -> None:
    """Entries under keys the decoder does not read (non-ASCII, non-printable, huge counts)
    leave the advert as it was, wherever they stand."""
    advert = make_advert("veh-1", "f", addresses=("10.0.0.1",))
    data = txt_for_advert(advert)
    at = 0
    for _ in range(min(cut, 8)):  # an entry boundary of the real record
        at += 1 + data[at]
    mixed = data[:at] + _encode(noise) + data[at:]
    assert advert_from_txt(mixed, addresses=advert.addresses, port=advert.port) == advert


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600))
def test_advert_from_txt_of_any_bytes_is_an_advert_or_malformed(data: bytes) -> None:
    try:
        advert = advert_from_txt(data, addresses=("10.0.0.1",), port=7000)
    except MalformedAdvert:
        return
    assert advert_from_txt(txt_for_advert(advert), addresses=("10.0.0.1",), port=7000) == advert


# --- a seed list reloaded -------------------------------------------------------------------


async def test_a_seed_moved_to_another_fleet_on_reload_is_lost(fleet: str) -> None:
    """``replace_seeds`` kept every node id still listed, so a seed now naming another fleet
    (ignored, as other fleets are) stayed reported with its old advert, dialled as ours."""
    key = os.urandom(32).hex()
    ours = parse_seed(f"rsu-1@10.0.0.1:7400#{key}", fleet_id=fleet)
    events: list[DiscoveryEvent] = []
    async with StaticDiscovery([ours], events.append, own_node_id="veh-a", fleet_id=fleet) as src:
        assert "rsu-1" in src.peers
        moved = parse_seed(f"rsu-1@10.0.0.1:7400?key={key}&fleet=other", fleet_id=fleet)
        src.replace_seeds([moved])
        assert "rsu-1" not in src.peers
        assert [e.kind for e in events] == ["found", "lost"]
        assert src.stats.ignored_other_fleet == 1
