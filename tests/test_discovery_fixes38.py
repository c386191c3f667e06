"""mDNS goodbyes on close (thirty-eighth session): ``MdnsConfig.goodbyes`` says how many times
a closing node multicasts its records with TTL 0. zeroconf always sent three, 125 ms apart, and
a close waited for the last: every node's stop took 250 ms, the loopback preset's included,
where the kernel loses no multicast that a repeat would make up for. Counted here on a real
multicast socket on 127.0.0.1, as a peer receives them."""

from __future__ import annotations

import socket
import uuid
from dataclasses import replace

import pytest
from zeroconf import DNSIncoming

from meshinfer.discovery.mdns import MdnsConfig, MdnsDiscovery
from meshinfer.errors import ConfigError
from tests.test_discovery_mdns import LOOPBACK, Recorder, make_advert

MDNS_GROUP, MDNS_PORT = "224.0.0.251", 5353


def multicast_listener() -> socket.socket:
    """A socket that receives the mDNS group's packets on loopback, as zeroconf's do."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", MDNS_PORT))
    membership = socket.inet_aton(MDNS_GROUP) + socket.inet_aton("127.0.0.1")
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    sock.setblocking(False)
    return sock


def goodbyes_received(sock: socket.socket, service_name: str) -> int:
    """The packets queued on ``sock`` that withdraw ``service_name`` (a record of it, TTL 0)."""
    count = 0
    while True:
        try:
            data = sock.recv(9000)
        except BlockingIOError:
            return count
        packet = DNSIncoming(data)
        if any(
            record.ttl == 0 and record.name.lower() == service_name.lower()
            for record in packet.answers()
        ):
            count += 1


@pytest.mark.parametrize("goodbyes", [1, 3])
async def test_a_close_multicasts_the_configured_number_of_goodbyes(goodbyes: int) -> None:
    fleet = f"fleet-{uuid.uuid4().hex[:8]}"
    source = MdnsDiscovery(
        make_advert("veh-a", fleet), Recorder(), replace(LOOPBACK, goodbyes=goodbyes)
    )
    await source.start()
    with multicast_listener() as sock:
        try:
            goodbyes_received(sock, source.service_name)  # the announcements: not counted
        finally:
            await source.aclose()
        # every goodbye is sent before aclose returns, and loopback delivers at once
        assert goodbyes_received(sock, source.service_name) == goodbyes


def test_the_presets_goodbyes() -> None:
    assert MdnsConfig.loopback().goodbyes == 1
    assert MdnsConfig.lan().goodbyes == 3 == MdnsConfig.zeroconf_default().goodbyes


@pytest.mark.parametrize("bad", [0, 4, -1, True, 1.0, "3", None])
def test_a_goodbye_count_outside_1_to_3_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"mdns\.goodbyes: must be an integer from 1 to 3"):
        MdnsConfig(goodbyes=bad)  # type: ignore[arg-type]
