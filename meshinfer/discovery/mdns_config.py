"""How the mDNS source uses the network: :class:`MdnsConfig` and its presets, and the mapping
of its ``interfaces`` onto the host's adapters (what zeroconf binds to, what we advertise).

No sockets, and no read of the host: the adapters are always passed in
(:class:`MdnsDiscovery` reads those up, :func:`~meshinfer.discovery.addresses.up_adapters`, in a
worker thread, as that read blocks). :class:`MdnsConfig` is also importable from
:mod:`meshinfer.discovery.mdns`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import ifaddr
from zeroconf import InterfaceChoice, IPVersion

from meshinfer.discovery.addresses import ifaddr_ip, is_ip, version_matches
from meshinfer.discovery.base import ADDRESS_CHECK_INTERVAL, MAX_ADDRESSES
from meshinfer.errors import ConfigError

IP_VERSIONS = {"v4": IPVersion.V4Only, "v6": IPVersion.V6Only, "both": IPVersion.All}
"""zeroconf's ``ip_version`` for each ``MdnsConfig.ip_version``."""
GOODBYE_INTERVAL = 0.125
"""Seconds between two goodbyes on close (zeroconf's ``_UNREGISTER_TIME``)."""
MAX_GOODBYES = 3
"""Most goodbyes a close sends (zeroconf's count): more only delays the close."""
_IFNAME_RE = re.compile(r"[^\s/]{1,15}")  # Linux: IFNAMSIZ 16 with the NUL; no '/' or spaces


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
      The same look re-reads each reported peer from zeroconf's cache (an address whose record
      expired is dropped: ``updated``, or ``lost`` with none left), so ``None`` turns that off
      too: a peer's address then stays listed after its record expires (a lost goodbye) until
      the peer announces again, and a peer gone without goodbyes is ``lost`` only when its PTR
      record expires (zeroconf's default TTL: 75 minutes) rather than its address records
      (2 minutes). The daemons' ``[discovery] address_check_interval = 0`` means ``None``.
    * ``goodbyes``: how many times the goodbye (our records with TTL 0) is multicast on close,
      ``GOODBYE_INTERVAL`` apart (1 to 3). zeroconf sends 3, for lossy links; a close waits
      for the last one. The ``loopback()`` preset sends 1: the kernel hands loopback
      multicast to every member socket without loss, so the repeats only delay the close.
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
    goodbyes: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.interfaces, list):  # from TOML
            object.__setattr__(self, "interfaces", tuple(self.interfaces))
        if self.interfaces == ("all",):
            object.__setattr__(self, "interfaces", "all")
        if self.ip_version not in IP_VERSIONS:
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
        if type(self.goodbyes) is not int or not 1 <= self.goodbyes <= MAX_GOODBYES:
            raise ConfigError(f"mdns.goodbyes: must be an integer from 1 to {MAX_GOODBYES}")

    @classmethod
    def lan(cls) -> MdnsConfig:
        """Every interface, IPv4, fast registration, RFC-paced reciprocal announcements."""
        return cls()

    @classmethod
    def loopback(cls) -> MdnsConfig:
        """127.0.0.1 only, for tests and several nodes on one host; faster re-announcements,
        one goodbye on close."""
        return cls(interfaces=("127.0.0.1",), reannounce_interval=0.1, goodbyes=1)

    @classmethod
    def zeroconf_default(cls, interfaces: str | tuple[str, ...] = "all") -> MdnsConfig:
        """zeroconf's own behaviour (probing, no reciprocal announcement): the baseline."""
        return cls(interfaces=interfaces, fast_register=False, reciprocal_announce=False)


AdapterSource = Callable[[], Sequence[ifaddr.Adapter]]
"""Where :class:`MdnsDiscovery` reads the host's interfaces and addresses: those up
(:func:`~meshinfer.discovery.addresses.up_adapters`; tests pass a fake). Called in a worker
thread after start."""


def resolve_interfaces(
    config: MdnsConfig, adapters: Sequence[ifaddr.Adapter], *, strict: bool = True
) -> InterfaceChoice | list[str]:
    """Map ``config.interfaces`` to what zeroconf takes: InterfaceChoice.All or IP strings.

    ``adapters`` are the host's (:func:`~meshinfer.discovery.addresses.up_adapters`, read by the
    caller: it blocks, so off the loop). An interface name not among them is a ConfigError if
    ``strict`` (at start), else it has no addresses (gone since start).
    """
    if config.interfaces == "all":
        return InterfaceChoice.All
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
            ips = [ifaddr_ip(ip.ip) for ip in adapter.ips]
            return [ip for ip in ips if version_matches(ip, version)]
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
    missing = [e for e in config.interfaces if not is_ip(e) and e not in present]
    for entry in missing:
        if not _IFNAME_RE.fullmatch(entry) or entry in (".", ".."):
            raise ConfigError(
                f"mdns.interfaces: {entry!r} is neither an IP address nor an interface name "
                "(1-15 characters, no '/' or spaces)"
            )
    return missing


def advertised_addresses(
    config: MdnsConfig, adapters: Sequence[ifaddr.Adapter], *, strict: bool = True
) -> tuple[str, ...]:
    """The addresses to put in A/AAAA records when the advert names none.

    The chosen interfaces' addresses; for ``"all"`` every non-loopback address of
    ``ip_version`` (loopback only if nothing else exists). IPv6 link-local addresses are left out.
    ``adapters`` and ``strict`` as for :func:`resolve_interfaces`.
    """
    chosen = resolve_interfaces(config, adapters, strict=strict)
    if isinstance(chosen, InterfaceChoice):
        every = [ifaddr_ip(ip.ip) for a in adapters for ip in a.ips]
        usable = [ip for ip in every if version_matches(ip, config.ip_version)]
        chosen = [ip for ip in usable if not ipaddress.ip_address(ip).is_loopback] or usable
    routable = [ip for ip in chosen if not ipaddress.ip_address(ip).is_link_local]
    return tuple(routable)[:MAX_ADDRESSES]
