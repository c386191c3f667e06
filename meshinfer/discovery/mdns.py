"""Peer discovery by multicast DNS (DNS-SD over mDNS), on zeroconf's asyncio API.

Every node advertises one service ``<label>._meshinfer._tcp.local.``, its instance label derived
from its fleet and node ids (:func:`instance_label`), with SRV (port), A/AAAA (addresses) and a
TXT record carrying node id, fleet id, Noise static key, key fingerprint, roles and protocol
version (:func:`txt_for_advert` / :func:`advert_from_txt`). It browses the same type and reports
peers to its sink as described in :mod:`meshinfer.discovery.base`.

How a peer is found in milliseconds rather than zeroconf's ~1.2 s:

* **No probing.** zeroconf's default registration waits 150-250 ms, then sends three conflict
  probes 500 ms apart before its first announcement. Instance labels derive from fleet id and
  node id, unique together, so a name conflict cannot happen: we register with
  ``cooperating_responders=True``, which skips the probes, and the first announcement (PTR, SRV,
  TXT, A/AAAA in one packet) goes out at once. Every running peer caches it and reports the new
  node straight from its cache, with no question asked.
* **Reciprocal announcement.** The new node still has to learn about the running peers. Its
  browser's first question goes out only after a random 20-120 ms, and the answers come by
  unicast (QU question) or after a further 20-120 ms aggregation delay (QM). Worse, on a host
  running several nodes, unicast answers to port 5353 reach just one of the SO_REUSEPORT sockets,
  chosen by hash, so most of them are lost and the next question goes out a second later. So a
  node that finds a *new* peer multicasts its own records once at once (at most once per
  ``reannounce_interval``, 1 s by default as RFC 6762 section 14 asks), and the newcomer reports
  it from that. The browser's questions remain the fallback for lost packets.
* **Resolve from the cache.** Announcements carry every record, so a service is resolved with
  ``load_from_cache`` inside the browser callback; only a service with records missing is asked
  for, with ``AsyncServiceInfo.async_request`` under ``resolve_timeout``.

``aclose`` sends goodbye packets (TTL 0) before closing the sockets, so peers report ``lost`` at
once rather than when the records expire.

Addresses move on a vehicle (a V2I link comes up, DHCP renews to a new lease): every
``address_check_interval`` the host's interfaces are read again (:data:`AdapterSource`), zeroconf's
sockets follow (``async_update_interfaces``), and an advert whose addresses came from the
interfaces is re-announced, after goodbyes for the addresses gone (zeroconf's browser re-reads a
service when a record arrives, never when one expires, so a peer would keep listing the old one).
The same look reads each reported peer again from zeroconf's cache: an address whose record
expired (its goodbye lost, or the peer gone without one) is dropped (``updated``, or ``lost`` with
none left); a peer's address record past ``REFRESH_AT`` (75%) of its TTL is asked for first.
A peer's loopback addresses are kept only while it may be on this host
(:func:`drop_foreign_loopback`), and its addresses are reported with those on a network this host
shares first (:func:`nearest_first`, on the networks that same look read off the loop): its
consumers dial the first. An interface named in ``MdnsConfig.interfaces`` that is not there at
start (a V2I link not up yet) gets a warning, and zeroconf binds to it when a look finds it.

Loopback: ``MdnsConfig.loopback()`` binds zeroconf to 127.0.0.1 only. Multicast between several
zeroconf instances (in one process or several) works on Linux even when ``lo`` lacks the
MULTICAST flag: the sockets join the group and set ``IP_MULTICAST_IF`` on 127.0.0.1 explicitly,
with ``IP_MULTICAST_LOOP`` on, so no root setup (``ip link set lo multicast on``) is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import ifaddr
from zeroconf import (
    BadTypeInNameException,
    DNSOutgoing,
    DNSQuestion,
    InterfaceChoice,
    IPVersion,
    ServiceStateChange,
    current_time_millis,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshinfer.discovery.base import (
    ADDRESS_CHECK_INTERVAL,
    MAX_ADDRESSES,
    EventSink,
    MalformedAdvert,
    PeerAdvert,
    SourceBase,
    key_fingerprint,
)
from meshinfer.errors import ConfigError, LocalProtocolError
from meshinfer.transport.base import LinkKind

log = logging.getLogger(__name__)

SERVICE_TYPE = "_meshinfer._tcp.local."
TXT_VERSION = 1
_HEX_KEY_RE = re.compile(r"[0-9a-f]{64}")
_DECIMAL_RE = re.compile(r"[0-9]{1,6}")
_LABEL_UNSAFE_RE = re.compile(r"[^A-Za-z0-9-]+")
_IP_VERSIONS = {"v4": IPVersion.V4Only, "v6": IPVersion.V6Only, "both": IPVersion.All}
_IFNAME_RE = re.compile(r"[^\s/]{1,15}")  # Linux: IFNAMSIZ 16 with the NUL; no '/' or spaces
_RESPONSE_FLAGS = 0x8400  # DNS header QR (a response) | AA (authoritative): RFC 6762 section 18
_QUERY_FLAGS = 0x0000
_ADDRESS_TYPES = (1, 28)  # DNS record types A and AAAA
_CLASS_IN = 1
#: Share of its TTL after which a peer's address record is asked for again, each check until an
#: answer comes (RFC 6762 section 5.2 asks from 80%); one that expires unanswered is dropped.
REFRESH_AT = 0.75
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- TXT records -------------------------------------------------------------------------------


def instance_label(node_id: str, fleet_id: str) -> str:
    """The DNS-SD instance label of a node: readable node id prefix + 16 hex digits of a hash.

    The hash covers fleet id and node id: node ids are unique within a fleet, but two fleets may
    share a link (and a node id). mDNS names compare case-insensitively and a label holds 63
    bytes; the hash keeps labels of distinct nodes distinct (``"A"`` and ``"a"`` included), the
    prefix keeps them legible in mDNS browsers.
    """
    identity = f"{fleet_id}\x00{node_id}".encode()
    digest = hashlib.blake2b(identity, digest_size=8).hexdigest()
    readable = _LABEL_UNSAFE_RE.sub("-", node_id).strip("-")[:40] or "node"
    return f"{readable}-{digest}"


def pack_txt(items: Mapping[str, str]) -> bytes:
    """Encode ``key=value`` pairs as TXT record data (RFC 6763 section 6). Local input only."""
    out = bytearray()
    for key, value in items.items():
        entry = f"{key}={value}".encode()
        if not key or "=" in key or len(entry) > 255:
            raise ConfigError(f"TXT entry {key!r}: empty key, '=' in key, or over 255 bytes")
        out += bytes([len(entry)]) + entry
    return bytes(out) or b"\x00"


def unpack_txt(data: bytes, keys: Collection[str] | None = None) -> dict[str, bytes | None]:
    """Decode TXT record data into ``{key: value}``; a key without ``=`` maps to ``None``.

    Keys are ASCII and compared case-insensitively (returned lower-case); the first occurrence of
    a key wins and empty strings are skipped (RFC 6763 section 6.4). ``keys`` (lower-case), if
    given, are the keys wanted: entries under any other key are skipped unread, whatever their
    bytes (forward compatibility). Raises :class:`~meshinfer.discovery.base.MalformedAdvert` for
    truncated data or for a non-ASCII key that is not skipped.
    """
    if not isinstance(data, bytes):
        raise MalformedAdvert("TXT data is not bytes")
    wanted = None if keys is None else frozenset(k.encode("ascii") for k in keys)
    items: dict[str, bytes | None] = {}
    pos = 0
    while pos < len(data):
        end = pos + 1 + data[pos]
        if end > len(data):
            raise MalformedAdvert("TXT string runs past the end of the record")
        _add_txt_entry(items, data[pos + 1 : end], wanted)
        pos = end
    return items


def _add_txt_entry(
    items: dict[str, bytes | None], entry: bytes, wanted: frozenset[bytes] | None
) -> None:
    key, equals, value = entry.partition(b"=")
    if not key or (wanted is not None and key.lower() not in wanted):
        return
    if not key.isascii() or not key.decode("ascii").isprintable():
        raise MalformedAdvert("TXT key is not printable ASCII")
    items.setdefault(key.decode("ascii").lower(), value if equals else None)


TXT_KEYS = frozenset({"txtvers", "id", "fleet", "key", "fp", "roles", "pv", "link"})
"""The TXT keys :func:`advert_from_txt` reads; entries under any other key are ignored."""


def txt_for_advert(advert: PeerAdvert) -> bytes:
    """The TXT record data that advertises ``advert`` (everything but addresses and port)."""
    items = {
        "txtvers": str(TXT_VERSION),
        "id": advert.node_id,
        "fleet": advert.fleet_id,
        "key": advert.static_key.hex(),
        "fp": advert.fingerprint,
        "roles": ",".join(advert.roles),
        "pv": str(advert.protocol_version),
    }
    if advert.link is not None:
        items["link"] = advert.link.value
    return pack_txt(items)


def advert_from_txt(data: bytes, *, addresses: Sequence[str], port: int | None) -> PeerAdvert:
    """Parse a peer's TXT record data (plus its SRV port and addresses) into a PeerAdvert.

    Raises :class:`~meshinfer.discovery.base.MalformedAdvert` (a RemoteProtocolError) for
    anything a peer could get wrong; unknown keys are ignored for forward compatibility.
    """
    items = unpack_txt(data, TXT_KEYS)
    if _txt_int(items, "txtvers") != TXT_VERSION:
        raise MalformedAdvert(f"unsupported txtvers (we read {TXT_VERSION})")
    static_key = _txt_key(items)
    if _txt_text(items, "fp") != key_fingerprint(static_key):
        raise MalformedAdvert("TXT fp is not the fingerprint of TXT key")
    roles = _txt_text(items, "roles")
    try:
        return PeerAdvert(
            node_id=_txt_text(items, "id"),
            fleet_id=_txt_text(items, "fleet"),
            static_key=static_key,
            roles=tuple(roles.split(",")) if roles else (),
            protocol_version=_txt_int(items, "pv"),
            addresses=tuple(addresses)[:MAX_ADDRESSES],
            port=port,  # type: ignore[arg-type]  # None is refused by validation
            link=_txt_link(items),
        )
    except ConfigError as exc:
        raise MalformedAdvert(str(exc)) from None


def _txt_text(items: Mapping[str, bytes | None], key: str) -> str:
    value = items.get(key)
    if value is None:
        raise MalformedAdvert(f"TXT lacks {key}=")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedAdvert(f"TXT {key} is not UTF-8") from None


def _txt_int(items: Mapping[str, bytes | None], key: str) -> int:
    text = _txt_text(items, key)
    if not _DECIMAL_RE.fullmatch(text):
        raise MalformedAdvert(f"TXT {key} is not a small decimal number")
    return int(text)


def _txt_key(items: Mapping[str, bytes | None]) -> bytes:
    text = _txt_text(items, "key")
    if not _HEX_KEY_RE.fullmatch(text):
        raise MalformedAdvert("TXT key is not 64 lower-case hex digits")
    return bytes.fromhex(text)


def _txt_link(items: Mapping[str, bytes | None]) -> LinkKind | None:
    if "link" not in items:
        return None
    try:
        return LinkKind(_txt_text(items, "link"))
    except ValueError:
        raise MalformedAdvert("TXT link is not a known link kind") from None


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
    ``local_networks`` (this host's networks: :func:`host_networks`), so the first is the one
    to dial.
    """
    suffix = "." + SERVICE_TYPE
    if not name.lower().endswith(suffix.lower()):
        raise MalformedAdvert(f"service name {name!r} is not of type {SERVICE_TYPE}")
    text = info.text if isinstance(info.text, bytes) else b""
    addresses = [a for a in info.parsed_scoped_addresses() if _is_unicast(a)]
    if local_addresses is not None:
        addresses = drop_foreign_loopback(addresses, local_addresses)
    if not addresses:
        raise MalformedAdvert(f"service {name!r} has no unicast address")
    addresses = nearest_first(addresses, local_networks)
    advert = advert_from_txt(text, addresses=addresses, port=info.port)
    if name[: -len(suffix)].lower() != instance_label(advert.node_id, advert.fleet_id).lower():
        raise MalformedAdvert(f"service name {name!r} does not derive from fleet and node id")
    return advert


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
    ips = [_bare_ip(a) for a in addresses]
    loopback = [ip.is_loopback for ip in ips]
    own = {_bare_ip(a) for a in local if _is_ip(a.split("%", 1)[0])}
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


def _bare_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of an IP literal without its ``%scope``, IPv4-mapped IPv6 as IPv4."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped or ip


# --- Configuration and interfaces --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MdnsConfig:
    """How :class:`MdnsDiscovery` uses the network. Presets: ``lan()``, ``loopback()``,
    ``zeroconf_default()``.

    * ``interfaces``: ``"all"`` (or ``("all",)``: every interface), or a tuple of interface
      names (``"eth0"``) and/or IP addresses to bind to; names map to their addresses of
      ``ip_version``. A name not there at start is bound to when it comes up (a warning
      at start; ``address_check_interval`` says how soon); one that cannot be an interface
      name is a ConfigError at start.
    * ``ip_version``: ``"v4"``, ``"v6"`` or ``"both"``.
    * ``fast_register``: skip conflict probing (``cooperating_responders``); safe because
      instance labels derive from fleet and node ids. ``False`` is zeroconf's default (~1.2 s).
    * ``reciprocal_announce``: multicast our records once when a new peer is found, so that
      newcomers find us at once (see the module docstring).
    * ``reannounce_interval``: least seconds between two reciprocal announcements (and since
      registration); RFC 6762 section 14 asks for 1 s on a real link.
    * ``resolve_timeout``: seconds to wait for records of a service not fully in the cache.
    * ``max_resolving``: most services asked for at once; a service named while that many are
      being asked for is counted ``unresolved`` and left to the next announcement, so a flood of
      bare service names from one host cannot make us query without bound.
    * ``max_peers``: most peers reported at once; a new node beyond it is counted
      ``ignored_full`` (membership gossip still spreads it). Bounds our memory against a host
      forging adverts without end: zeroconf evicts the oldest of its 10000 cached records
      silently, so a forged peer evicted that way would never be reported lost.
    * ``address_check_interval``: seconds between two looks at the host's interface addresses
      (``None``: never look again after start). On a change (a V2I link comes up, DHCP gives a
      new lease) zeroconf opens and closes sockets to match (``async_update_interfaces``), and
      an advert whose addresses came from the interfaces is re-announced with the new ones.
    """

    interfaces: str | tuple[str, ...] = "all"
    ip_version: Literal["v4", "v6", "both"] = "v4"
    fast_register: bool = True
    reciprocal_announce: bool = True
    reannounce_interval: float = 1.0
    resolve_timeout: float = 0.5
    max_resolving: int = 32
    max_peers: int = 1024
    address_check_interval: float | None = ADDRESS_CHECK_INTERVAL

    def __post_init__(self) -> None:
        if isinstance(self.interfaces, list):  # from TOML
            object.__setattr__(self, "interfaces", tuple(self.interfaces))
        if self.interfaces == ("all",):
            object.__setattr__(self, "interfaces", "all")
        if self.ip_version not in _IP_VERSIONS:
            raise ConfigError(f"mdns.ip_version: {self.ip_version!r} is not v4, v6 or both")
        if not self.interfaces or (isinstance(self.interfaces, str) and self.interfaces != "all"):
            raise ConfigError("mdns.interfaces: 'all' or a non-empty list of names/addresses")
        if self.interfaces != "all" and not all(isinstance(e, str) and e for e in self.interfaces):
            raise ConfigError("mdns.interfaces: each entry is an interface name or IP address")
        if not self.reannounce_interval >= 0:
            raise ConfigError("mdns.reannounce_interval: must be >= 0 seconds")
        if not self.resolve_timeout > 0:
            raise ConfigError("mdns.resolve_timeout: must be > 0 seconds")
        if type(self.max_resolving) is not int or self.max_resolving < 1:
            raise ConfigError("mdns.max_resolving: must be an integer >= 1")
        if type(self.max_peers) is not int or self.max_peers < 1:
            raise ConfigError("mdns.max_peers: must be an integer >= 1")
        interval = self.address_check_interval
        if interval is not None and not (isinstance(interval, int | float) and interval > 0):
            raise ConfigError("mdns.address_check_interval: must be > 0 seconds, or None")

    @classmethod
    def lan(cls) -> MdnsConfig:
        """Every interface, IPv4, fast registration, RFC-paced reciprocal announcements."""
        return cls()

    @classmethod
    def loopback(cls) -> MdnsConfig:
        """127.0.0.1 only, for tests and several nodes on one host; faster re-announcements."""
        return cls(interfaces=("127.0.0.1",), reannounce_interval=0.1)

    @classmethod
    def zeroconf_default(cls, interfaces: str | tuple[str, ...] = "all") -> MdnsConfig:
        """zeroconf's own behaviour (probing, no reciprocal announcement): the baseline."""
        return cls(interfaces=interfaces, fast_register=False, reciprocal_announce=False)


AdapterSource = Callable[[], Sequence[ifaddr.Adapter]]
"""Where :class:`MdnsDiscovery` reads the host's interfaces and addresses: ``ifaddr.get_adapters``
(tests pass a fake). Called in a worker thread after start."""


def resolve_interfaces(
    config: MdnsConfig, adapters: Sequence[ifaddr.Adapter] | None = None, *, strict: bool = True
) -> InterfaceChoice | list[str]:
    """Map ``config.interfaces`` to what zeroconf takes: InterfaceChoice.All or IP strings.

    ``adapters`` defaults to ``ifaddr.get_adapters()``. An interface name not among them is a
    ConfigError if ``strict`` (at start), else it has no addresses (gone since start).
    """
    if config.interfaces == "all":
        return InterfaceChoice.All
    adapters = ifaddr.get_adapters() if adapters is None else adapters
    ips: list[str] = []
    for entry in config.interfaces:
        ips += _entry_ips(entry, adapters, config.ip_version, strict)
    return list(dict.fromkeys(ips))


def _entry_ips(
    entry: str, adapters: Sequence[ifaddr.Adapter], version: str, strict: bool
) -> list[str]:
    with contextlib.suppress(ValueError):
        return [str(ipaddress.ip_address(entry))]
    for adapter in adapters:
        if entry in (adapter.name, adapter.nice_name):
            ips = [_ifaddr_ip(ip.ip) for ip in adapter.ips]
            return [ip for ip in ips if _version_matches(ip, version)]
    if not strict:
        return []
    raise ConfigError(f"mdns.interfaces: no interface or address named {entry!r}")


def missing_interfaces(config: MdnsConfig, adapters: Sequence[ifaddr.Adapter]) -> list[str]:
    """The interface names of ``config.interfaces`` that ``adapters`` lack (not up yet: a V2I
    link comes up later, and the address watch binds to it then). Raises ConfigError for an
    entry that is neither an IP address, nor a present interface, nor a well-formed interface
    name (1-15 characters, no '/' or white space, not '.' or '..'): a typo, not a late link."""
    if config.interfaces == "all":
        return []
    present = {name for a in adapters for name in (a.name, a.nice_name)}
    missing = [e for e in config.interfaces if not _is_ip(e) and e not in present]
    for entry in missing:
        if not _IFNAME_RE.fullmatch(entry) or entry in (".", ".."):
            raise ConfigError(
                f"mdns.interfaces: {entry!r} is neither an IP address nor an interface name "
                "(1-15 characters, no '/' or spaces)"
            )
    return missing


def host_networks(adapters: Sequence[ifaddr.Adapter]) -> tuple[Network, ...]:
    """The networks the host's interface addresses are on (loopback's included), from each
    address and its prefix length: what "a network this host shares" means to
    :func:`nearest_first`."""
    networks: dict[Network, None] = {}
    for ip in (ip for a in adapters for ip in a.ips):
        with contextlib.suppress(ValueError):  # a prefix the platform did not report
            host = _ifaddr_ip(ip.ip).split("%", 1)[0]
            networks[ipaddress.ip_interface(f"{host}/{ip.network_prefix}").network] = None
    return tuple(networks)


def host_addresses(adapters: Sequence[ifaddr.Adapter]) -> frozenset[str]:
    """Every IP address of the host's interfaces (IPv6 without scope): what "local" means to
    :func:`drop_foreign_loopback`."""
    return frozenset(_ifaddr_ip(ip.ip).split("%", 1)[0] for a in adapters for ip in a.ips)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_unicast(host: str) -> bool:
    """True for an IP literal a peer can listen on and we can dial: not unspecified, multicast
    or broadcast, nor an IPv6 link-local address without its ``%scope`` (connect() refuses)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    broadcast = ip.version == 4 and int(ip) == 0xFFFFFFFF
    unscoped = isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local and not ip.scope_id
    return not (ip.is_unspecified or ip.is_multicast or broadcast or unscoped)


def _ifaddr_ip(ip: str | tuple[str, int, int]) -> str:
    return ip if isinstance(ip, str) else ip[0]


def _version_matches(ip: str, version: str) -> bool:
    family = ipaddress.ip_address(ip).version
    return version == "both" or family == (4 if version == "v4" else 6)


def advertised_addresses(
    config: MdnsConfig, adapters: Sequence[ifaddr.Adapter] | None = None, *, strict: bool = True
) -> tuple[str, ...]:
    """The addresses to put in A/AAAA records when the advert names none.

    The chosen interfaces' addresses; for ``"all"`` every non-loopback address of
    ``ip_version`` (loopback only if nothing else exists). IPv6 link-local addresses are left out.
    ``adapters`` and ``strict`` as for :func:`resolve_interfaces`.
    """
    adapters = ifaddr.get_adapters() if adapters is None else adapters
    chosen = resolve_interfaces(config, adapters, strict=strict)
    if isinstance(chosen, InterfaceChoice):
        every = [_ifaddr_ip(ip.ip) for a in adapters for ip in a.ips]
        usable = [ip for ip in every if _version_matches(ip, config.ip_version)]
        chosen = [ip for ip in usable if not ipaddress.ip_address(ip).is_loopback] or usable
    routable = [ip for ip in chosen if not ipaddress.ip_address(ip).is_link_local]
    return tuple(routable)[:MAX_ADDRESSES]


# --- The discovery source -----------------------------------------------------------------------


class MdnsDiscovery(SourceBase):
    """Advertises our node by mDNS and reports the peers of our fleet that advertise theirs.

    ``advert`` describes our node; if its ``addresses`` are empty they are filled from the chosen
    interfaces (see ``self.advert`` after ``start``) and follow them while the source runs
    (``MdnsConfig.address_check_interval``). ``adapters`` reads the host's interfaces. The
    concurrency rules of :mod:`meshinfer.discovery.base` apply; every callback runs on the loop.
    """

    name = "mdns"

    def __init__(
        self,
        advert: PeerAdvert,
        sink: EventSink,
        config: MdnsConfig | None = None,
        *,
        adapters: AdapterSource = ifaddr.get_adapters,
    ) -> None:
        if not all(_is_ip(host) for host in advert.addresses):
            raise ConfigError(f"mdns: advertised addresses must be IP literals: {advert.addresses}")
        super().__init__(advert.node_id, advert.fleet_id, sink)
        self.advert = advert
        self.config = config or MdnsConfig()
        self.directory.max_peers = self.config.max_peers
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._broadcasts: list[asyncio.Future[Any]] = []  # zeroconf's repeated announcements
        self._names: dict[str, str] = {}  # lower-case service name -> node id
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._announce_handle: asyncio.TimerHandle | None = None
        self._last_announce = float("-inf")
        self._adapters = adapters
        self._follow_interfaces = not advert.addresses  # our addresses come from the interfaces
        self._local_addresses: frozenset[str] = frozenset()  # this host's, for peers' loopback
        self._local_networks: tuple[Network, ...] = ()  # this host's, to order peers' addresses
        self._address_watch: asyncio.Task[None] | None = None

    @property
    def service_name(self) -> str:
        """Our service instance name, ``<instance_label>._meshinfer._tcp.local.``."""
        return f"{instance_label(self.advert.node_id, self.advert.fleet_id)}.{SERVICE_TYPE}"

    async def _start(self) -> None:
        adapters = self._adapters()
        self._read_host(adapters)
        missing = missing_interfaces(self.config, adapters)  # ConfigError: not a name
        if missing:
            log.warning(
                "mdns: no interface %s yet; discovery starts on it when it comes up",
                ", ".join(missing),
            )
        if self._follow_interfaces:
            addresses = advertised_addresses(self.config, adapters, strict=False)
            self.advert = replace(self.advert, addresses=addresses)
        self._zc = AsyncZeroconf(
            interfaces=resolve_interfaces(self.config, adapters, strict=False),
            ip_version=_IP_VERSIONS[self.config.ip_version],
        )
        zc = self._zc.zeroconf
        await zc.async_wait_for_start()
        if self._closed:  # aclose ran meanwhile and closed zeroconf: make nothing more on it
            raise LocalProtocolError("mdns: aclose() was called while start() ran")
        # Browse before announcing, so that answers to our announcement are heard.
        self._browser = AsyncServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_service_change])
        self._info = self._service_info()
        broadcast = await self._zc.async_register_service(
            self._info, cooperating_responders=self.config.fast_register
        )
        await self._own_broadcast(broadcast, "start")
        if self.config.address_check_interval is not None:
            watch = asyncio.get_running_loop().create_task(self._watch_addresses(adapters))
            watch.add_done_callback(_log_watch_failure)
            self._address_watch = watch

    async def update(self, advert: PeerAdvert) -> None:
        """Advertise a changed advert (roles, port, addresses...); peers report ``updated``.

        Empty ``addresses`` keep ours (still following the interfaces, if they did); given ones
        stop that. Node id and fleet id cannot change (another node): LocalProtocolError.
        """
        if (advert.node_id, advert.fleet_id) != (self.advert.node_id, self.advert.fleet_id):
            raise LocalProtocolError("mdns: update() cannot change node id or fleet id")
        if self._zc is None or self._closed:
            raise LocalProtocolError("mdns: update() needs a started, open source")
        self._follow_interfaces = self._follow_interfaces and not advert.addresses
        await self._publish(advert)

    async def _publish(self, advert: PeerAdvert) -> None:
        assert self._zc is not None
        if not advert.addresses:
            advert = replace(advert, addresses=self.advert.addresses)
        self.advert = advert
        self._info = self._service_info()
        broadcast = await self._zc.async_update_service(self._info)
        await self._own_broadcast(broadcast, "update")

    async def _watch_addresses(self, adapters: Sequence[ifaddr.Adapter]) -> None:
        """Look at the host's addresses every ``address_check_interval`` s; follow changes."""
        assert self.config.address_check_interval is not None
        seen = _address_snapshot(adapters)
        while True:
            await asyncio.sleep(self.config.address_check_interval)
            try:
                adapters = await asyncio.to_thread(self._adapters)
                if _address_snapshot(adapters) != seen:
                    seen = _address_snapshot(adapters)
                    await self._follow_addresses(adapters)
            except Exception:  # adapter churn, a socket that would not bind: try next time
                log.exception("mdns: following the host's address change failed")
            try:
                self._check_peer_addresses()
            except Exception:  # our bug: the watch goes on
                log.exception("mdns: checking peers' addresses failed")

    def _check_peer_addresses(self) -> None:
        """Read each reported peer again from zeroconf's cache, where records expire by TTL:
        an address whose record expired is dropped (``updated``; ``lost`` with none left).
        zeroconf's browser reports a record that arrives, never one that expires, so a lost
        address goodbye (or a peer gone without one) left the address listed for good. An
        address record past :data:`REFRESH_AT` of its TTL is asked for first, so a peer that
        is still there keeps it."""
        assert self._zc is not None
        zc, now = self._zc.zeroconf, current_time_millis()
        query = DNSOutgoing(_QUERY_FLAGS)
        for name in list(self._names):
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            advert = None
            if info.load_from_cache(zc, now) and info.port is not None and info.server:
                with contextlib.suppress(MalformedAdvert):  # an address left that is not usable
                    advert = advert_from_service(
                        name, info, self._local_addresses, local_networks=self._local_networks
                    )
            if advert is None:
                self._forget(name)
                continue
            self.directory.sight(advert, self._now())  # reports only a change
            for type_ in _ADDRESS_TYPES:
                records = zc.cache.get_all_by_details(info.server, type_, _CLASS_IN)
                if any(_near_end(record, now) for record in records):
                    query.add_question(DNSQuestion(info.server, type_, _CLASS_IN))
        if query.questions:
            zc.async_send(query)

    async def _follow_addresses(self, adapters: Sequence[ifaddr.Adapter]) -> None:
        """Match zeroconf's sockets and (if derived from them) our addresses to ``adapters``.

        Our records are updated first, so that zeroconf's re-announcement on the sockets it
        opens carries the new addresses."""
        assert self._zc is not None
        self._read_host(adapters)
        if self._follow_interfaces:
            addresses = advertised_addresses(self.config, adapters, strict=False)
            if addresses and addresses != self.advert.addresses:
                log.info("mdns: our addresses are now %s", ", ".join(addresses))
                self._send_address_goodbyes(set(self.advert.addresses) - set(addresses))
                await self._publish(replace(self.advert, addresses=addresses))
        chosen = resolve_interfaces(self.config, adapters, strict=False)
        if isinstance(chosen, InterfaceChoice):
            await self._zc.zeroconf.async_update_interfaces()  # zeroconf rescans on its own
        elif chosen:
            await self._zc.zeroconf.async_update_interfaces(chosen)
        else:
            log.warning("mdns: no address left on %s; keeping the sockets", self.config.interfaces)

    def _read_host(self, adapters: Sequence[ifaddr.Adapter]) -> None:
        """Take this host's addresses and networks (for peers' adverts) from ``adapters``."""
        self._local_addresses = host_addresses(adapters)
        self._local_networks = host_networks(adapters)

    def _send_address_goodbyes(self, gone: set[str]) -> None:
        """Multicast TTL 0 for our address records of ``gone``: peers drop them from their cache
        at once. zeroconf's update does not: a cache-flush leaves a record younger than 1 s,
        and a peer re-reads our service only when a record arrives, not when one expires."""
        assert self._zc is not None and self._info is not None
        if not gone:
            return
        hosts = [host.split("%", 1)[0] for host in sorted(gone)]
        old = AsyncServiceInfo(
            SERVICE_TYPE, self.service_name, server=self._info.server, parsed_addresses=hosts
        )
        out = DNSOutgoing(_RESPONSE_FLAGS)
        for record in old.dns_addresses(override_ttl=0):
            out.add_answer_at_time(record, 0)
        self._zc.zeroconf.async_send(out)

    async def _own_broadcast(self, broadcast: Awaitable[Any], step: str) -> None:
        """Keep zeroconf's announcement task, to cancel on close. If ``aclose`` ran while
        ``step`` awaited zeroconf, it missed this task: cancel it here, and raise."""
        future = asyncio.ensure_future(broadcast)
        if self._closed:
            await _cancel_all([future])
            raise LocalProtocolError(f"mdns: aclose() was called while {step}() ran")
        self._broadcasts = [*_unfinished(self._broadcasts), future]
        self._last_announce = self._now()

    def _service_info(self) -> AsyncServiceInfo:
        label = instance_label(self.advert.node_id, self.advert.fleet_id)
        return AsyncServiceInfo(
            SERVICE_TYPE,
            self.service_name,
            port=self.advert.port,
            properties=txt_for_advert(self.advert),
            server=f"{label}.local.",
            parsed_addresses=[a.split("%", 1)[0] for a in self.advert.addresses],
        )

    def _on_service_change(
        self,
        zeroconf: object,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """zeroconf browser callback (on the loop): resolve added/updated, forget removed.

        It must never raise: zeroconf would leave the browser's pending changes uncleared, and
        one hostile service name would then hide every later peer.
        """
        if self._closed or self._zc is None:
            return
        try:
            self._on_change(name, state_change)
        except BadTypeInNameException as exc:  # a name zeroconf itself refuses to resolve
            self.directory.malformed(f"service name {name!r}: {exc}", self._now())
        except Exception:
            self.stats.ignored_malformed += 1
            log.exception("mdns: handling %s of %r failed", state_change, name)

    def _on_change(self, name: str, state_change: ServiceStateChange) -> None:
        assert self._zc is not None
        if state_change is ServiceStateChange.Removed:
            self._forget(name)
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if info.load_from_cache(self._zc.zeroconf) and info.port is not None:
            self._accept(name, info)
        elif name.lower() in self._resolving:
            return
        elif len(self._resolving) >= self.config.max_resolving:
            self.stats.unresolved += 1
            busy = len(self._resolving)
            log.debug("mdns: %d services being resolved; not asking for %r", busy, name)
        else:
            self._spawn_resolve(name, info)

    def _spawn_resolve(self, name: str, info: AsyncServiceInfo) -> None:
        key = name.lower()
        task = asyncio.get_running_loop().create_task(self._resolve(name, info))
        self._resolving[key] = task
        task.add_done_callback(lambda t: self._resolved(key, t))

    async def _resolve(self, name: str, info: AsyncServiceInfo) -> None:
        assert self._zc is not None
        timeout_ms = self.config.resolve_timeout * 1000
        complete = await info.async_request(self._zc.zeroconf, timeout_ms)
        if self._closed:
            return
        if complete and info.port is not None:
            self._accept(name, info)
        else:
            self.stats.unresolved += 1

    def _resolved(self, key: str, task: asyncio.Task[None]) -> None:
        self._resolving.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("mdns: resolving %s failed", key, exc_info=task.exception())

    def _accept(self, name: str, info: AsyncServiceInfo) -> None:
        try:
            advert = advert_from_service(
                name, info, self._local_addresses, local_networks=self._local_networks
            )
        except MalformedAdvert as exc:
            # Ignored, not taken as a goodbye: any host can publish a broken TXT record under
            # a peer's name. The peer stays found until its own goodbye or its records expire.
            self.directory.malformed(exc, self._now())
            return
        event = self.directory.sight(advert, self._now())
        # Only names of reported peers: not ours, not another fleet's node of a peer's id.
        if self.directory.reports(advert) and advert.node_id in self.directory.peers:
            self._names[name.lower()] = advert.node_id
        if event is not None and event.kind == "found" and self.config.reciprocal_announce:
            self._announce_soon()

    def _forget(self, name: str) -> None:
        node_id = self._names.pop(name.lower(), None)
        if node_id is not None:
            self.directory.lose(node_id, self._now())

    def _announce_soon(self) -> None:
        if self._announce_handle is not None:
            return
        delay = max(0.0, self._last_announce + self.config.reannounce_interval - self._now())
        loop = asyncio.get_running_loop()
        self._announce_handle = loop.call_later(delay, self._announce_now)

    def _announce_now(self) -> None:
        self._announce_handle = None
        if self._closed or self._zc is None or self._info is None:
            return
        zc = self._zc.zeroconf
        zc.async_send(zc.generate_service_broadcast(self._info, None))
        self._last_announce = self._now()

    async def _stop(self) -> None:
        if self._announce_handle is not None:
            self._announce_handle.cancel()
        watch = [self._address_watch] if self._address_watch is not None else []
        await _cancel_all([*watch, *self._resolving.values(), *self._broadcasts])
        if self._browser is not None:
            await _logged("cancel browser", self._browser.async_cancel())
        if self._zc is not None:
            await _logged("send goodbyes", self._zc.async_unregister_all_services())
            await _logged("close zeroconf", self._zc.async_close())


def _address_snapshot(adapters: Sequence[ifaddr.Adapter]) -> frozenset[tuple[str, str, int]]:
    return frozenset(
        (a.name, str(_ifaddr_ip(ip.ip)), ip.network_prefix) for a in adapters for ip in a.ips
    )


def _near_end(record: Any, now: float) -> bool:
    """Whether a cached record is past :data:`REFRESH_AT` of its TTL and not yet expired."""
    return 0 < record.get_remaining_ttl(now) <= record.ttl * (1 - REFRESH_AT)


def _log_watch_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("mdns: the address watch stopped", exc_info=task.exception())


async def _cancel_all(futures: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel ``futures`` and wait for them; a finished one's error is retrieved (never
    reported by asyncio as unretrieved) and dropped: shutdown goes on."""
    for future in futures:
        future.cancel()
    await asyncio.gather(*futures, return_exceptions=True)


def _unfinished(futures: Sequence[asyncio.Future[Any]]) -> list[asyncio.Future[Any]]:
    """The futures still running; a finished one's error is retrieved and logged here."""
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is not None:
            log.warning("mdns: an announcement failed: %s", future.exception())
    return [f for f in futures if not f.done()]


async def _logged(step: str, awaitable: Any) -> None:
    """Await one shutdown step; log its failure and go on with the next step."""
    try:
        await awaitable
    except Exception:
        log.exception("mdns: %s failed during shutdown", step)
