"""Peer discovery from a configured seed list, for links where multicast is off.

Roadside units and the coordinator are reached over routed networks where mDNS does not travel;
a node is configured with their addresses, node ids and static keys instead. A seed is written as
one string (in a TOML list or on the command line)::

    NODE_ID@HOST:PORT?key=HEX64[&roles=a,b][&link=v2i][&pv=1][&fleet=FLEET]
    NODE_ID@HOST:PORT[?roles=a,b...]#HEX64
    rsu-17@10.20.0.17:7400?key=3b6a...c1&roles=rsu,relay&link=v2i
    coord@[fd00::10]:7400#9f00...42

``key`` (or the ``#`` fragment) is the seed's 32-byte X25519 static public key in hex (the IK
handshake needs it), ``fleet`` defaults to our own fleet, ``pv`` to our protocol version. Node ids
in seed strings cannot contain ``?`` or ``#``.

:class:`StaticDiscovery` reports every seed as ``found`` at start, and again every
``reannounce_interval`` seconds if one is given (a hint to redial seeds that went away), under
the rules of :mod:`meshinfer.discovery.base`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from meshinfer import PROTOCOL_VERSION
from meshinfer.discovery.addresses import is_ip, is_unicast
from meshinfer.discovery.base import EventSink, PeerAdvert, SourceBase
from meshinfer.errors import ConfigError, log_stopped
from meshinfer.transport.base import LinkKind

log = logging.getLogger(__name__)

_HEX_KEY_RE = re.compile(r"[0-9a-fA-F]{64}")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_QUERY_KEYS = frozenset({"key", "roles", "link", "pv", "fleet"})


@dataclass(frozen=True, slots=True)
class StaticSeed:
    """A peer we are told about: where it listens, who it is, and its Noise static key.

    Validated on construction (:class:`~meshinfer.errors.ConfigError` names the bad field).
    """

    node_id: str
    host: str
    port: int
    static_key: bytes
    fleet_id: str
    roles: tuple[str, ...] = ()
    protocol_version: int = PROTOCOL_VERSION
    link: LinkKind | None = None
    advert: PeerAdvert = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        advert = PeerAdvert(
            node_id=self.node_id,
            fleet_id=self.fleet_id,
            static_key=self.static_key,
            roles=self.roles,
            protocol_version=self.protocol_version,
            addresses=(self.host,),
            port=self.port,
            link=self.link,
        )
        object.__setattr__(self, "advert", advert)

    def __str__(self) -> str:
        """The seed in the string form :func:`parse_seed` reads."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"key={self.static_key.hex()}&pv={self.protocol_version}&fleet={self.fleet_id}"
        query += f"&roles={','.join(self.roles)}" if self.roles else ""
        query += f"&link={self.link.value}" if self.link else ""
        return f"{self.node_id}@{host}:{self.port}?{query}"


def parse_seed(text: str, *, fleet_id: str) -> StaticSeed:
    """Parse one seed string (format in the module docstring); ``fleet_id`` is the default fleet.

    Raises :class:`~meshinfer.errors.ConfigError` naming the entry and what is wrong with it.
    """
    try:
        return _parse_seed(text, fleet_id)
    except ConfigError as exc:
        raise ConfigError(f"static seed {text!r}: {exc}") from None


def parse_seeds(entries: Iterable[str], *, fleet_id: str) -> tuple[StaticSeed, ...]:
    """Parse a seed list, and check it (:func:`checked_seeds`: one seed per node id, each at
    an address a peer can listen on)."""
    return checked_seeds(parse_seed(entry, fleet_id=fleet_id) for entry in entries)


def checked_seeds(seeds: Iterable[StaticSeed]) -> tuple[StaticSeed, ...]:
    """``seeds`` as a tuple, if fit to dial: ConfigError if two have one node id (which one to
    dial, with which key, would be a guess: a seed list names each node once), or if one's
    host is an IP literal no peer listens on (unspecified, multicast, broadcast, IPv6
    link-local without its scope: :func:`~meshinfer.discovery.addresses.is_unicast`, the
    rule mDNS applies to a peer's addresses; 0.0.0.0 dialled this host)."""
    seeds = tuple(seeds)
    seen: set[str] = set()
    for seed in seeds:
        if seed.node_id in seen:
            raise ConfigError(f"static seeds: node id {seed.node_id!r} appears twice")
        if is_ip(seed.host) and not is_unicast(seed.host):
            raise ConfigError(
                f"static seed {seed.node_id!r}: {seed.host} is no address a peer listens on"
            )
        seen.add(seed.node_id)
    return seeds


def _parse_seed(text: str, default_fleet: str) -> StaticSeed:
    if not isinstance(text, str):
        raise ConfigError("a seed must be a string")
    rest, hash_sign, fragment = text.strip().partition("#")
    head, _, query = rest.partition("?")
    node_id, at, hostport = head.rpartition("@")
    if not at or not node_id:
        raise ConfigError("expected NODE_ID@HOST:PORT?key=HEX or NODE_ID@HOST:PORT#HEX")
    host, port = _split_hostport(hostport)
    options = _parse_query(query)
    if hash_sign:
        if "key" in options:
            raise ConfigError("give the key once: key= or #HEX, not both")
        options["key"] = fragment
    return StaticSeed(
        node_id=node_id,
        host=host,
        port=port,
        static_key=_parse_key(options.get("key")),
        fleet_id=options.get("fleet", default_fleet),
        roles=tuple(options["roles"].split(",")) if options.get("roles") else (),
        protocol_version=_parse_int("pv", options.get("pv", str(PROTOCOL_VERSION))),
        link=_parse_link(options.get("link")),
    )


def _split_hostport(hostport: str) -> tuple[str, int]:
    if hostport.startswith("["):
        host, bracket, port = hostport[1:].partition("]:")
        if not bracket or ":" not in host:
            raise ConfigError("an IPv6 host is written [ADDRESS]:PORT")
    else:
        host, colon, port = hostport.rpartition(":")
        if not colon or ":" in host:
            raise ConfigError("expected HOST:PORT (IPv6 as [ADDRESS]:PORT)")
    return host, _parse_int("port", port)


def _parse_query(query: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in query.split("&") if query else ():
        name, equals, value = item.partition("=")
        if not equals or name not in _QUERY_KEYS:
            raise ConfigError(f"unknown option {item!r} (known: {', '.join(sorted(_QUERY_KEYS))})")
        if name in options:
            raise ConfigError(f"option {name!r} given twice")
        options[name] = value
    return options


def _parse_key(value: str | None) -> bytes:
    if value is None or not _HEX_KEY_RE.fullmatch(value):
        raise ConfigError("key= must be the 32-byte static public key as 64 hex digits")
    return bytes.fromhex(value)


def _parse_int(name: str, value: str) -> int:
    if not _PORT_RE.fullmatch(value):
        raise ConfigError(f"{name} must be a decimal number, got {value!r}")
    return int(value)


def _parse_link(value: str | None) -> LinkKind | None:
    if value is None:
        return None
    try:
        return LinkKind(value)
    except ValueError:
        kinds = ", ".join(k.value for k in LinkKind)
        raise ConfigError(f"link= must be one of {kinds}, got {value!r}") from None


class StaticDiscovery(SourceBase):
    """Reports a fixed list of seeds as found; see the module docstring. A list
    :func:`checked_seeds` refuses (two seeds with one node id...) is a ConfigError.

    ``own_node_id`` and ``fleet_id`` filter the list like any other source (our own entry is
    skipped, other fleets are counted and skipped). Runs on the loop.
    """

    name = "static"

    def __init__(
        self,
        seeds: Sequence[StaticSeed],
        sink: EventSink,
        *,
        own_node_id: str,
        fleet_id: str,
        reannounce_interval: float | None = None,
    ) -> None:
        if reannounce_interval is not None and not reannounce_interval > 0:
            raise ConfigError("static.reannounce_interval: must be > 0 seconds, or None")
        super().__init__(own_node_id, fleet_id, sink)
        self.seeds = checked_seeds(seeds)
        self.reannounce_interval = reannounce_interval
        self._reannouncer: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        self._announce(repeat=False)
        if self.reannounce_interval is not None:
            loop = asyncio.get_running_loop()
            self._reannouncer = loop.create_task(self._reannounce(), name="static-reannounce")
            self._reannouncer.add_done_callback(
                log_stopped(log, "static discovery: the re-announce task", self._kept)
            )

    def replace_seeds(self, seeds: Sequence[StaticSeed]) -> None:
        """Swap in a new seed list (a config reload): reports lost, found and updated seeds.
        A list :func:`checked_seeds` refuses is a ConfigError, and the list in force stays."""
        self.seeds = checked_seeds(seeds)
        if self._started_at is None or self._closed:
            return
        # A seed now of another fleet is not kept: its node id is not this fleet's node.
        kept = {seed.node_id for seed in self.seeds if self.directory.reports(seed.advert)}
        for node_id in [n for n in self.directory.peers if n not in kept]:
            self.directory.lose(node_id, self._now())
        self._announce(repeat=False)

    def _kept(self) -> str:
        """What stays when the re-announce task has stopped for good (for its log line)."""
        return f"its {len(self.seeds)} seeds stay found but are re-announced no more"

    def _announce(self, *, repeat: bool) -> None:
        now = self._now()
        for seed in self.seeds:
            self.directory.sight(seed.advert, now, repeat=repeat)

    async def _reannounce(self) -> None:
        assert self.reannounce_interval is not None
        while True:
            await asyncio.sleep(self.reannounce_interval)
            self._announce(repeat=True)

    async def _stop(self) -> None:
        if self._reannouncer is not None:
            self._reannouncer.cancel()
            await asyncio.gather(self._reannouncer, return_exceptions=True)
