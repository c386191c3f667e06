"""The ``DiscoverySource`` delegate interface: how a node learns which peers it could dial.

A source reports what it sees as :class:`DiscoveryEvent` values handed to one *sink* callable
given at construction. Implementations: :mod:`meshinfer.discovery.mdns` (multicast DNS on the
local links) and :mod:`meshinfer.discovery.static` (a configured seed list, for hosts where
multicast is off: roadside units, the coordinator).

Concurrency rules (every source follows them):

* ``start`` and ``aclose`` are coroutines that run on the event loop. ``start`` is called once;
  ``aclose`` may be called any number of times, from any task, also without ``start``; each call
  returns once the source is stopped (an ``aclose`` during ``start`` makes ``start`` raise
  LocalProtocolError, as ``start`` after ``aclose`` does). A caller cancelled during ``aclose``
  leaves the stop running to its end (sockets closed, goodbyes said); the next call waits for it.
  Entering the source as an async context manager calls ``start``; leaving it calls ``aclose``.
* The sink is called on the loop's thread, synchronously, from inside the source's own callbacks.
  It must return quickly and never block; to do async work (dial a session) it schedules a task
  or puts the event on a queue (:class:`EventQueue` does the latter). An exception raised by the
  sink is logged and counted in ``stats.sink_errors``; it never reaches the source.
* For one node id, events come in the order ``found``, any number of ``updated``, ``lost``; after
  ``lost`` a node may be ``found`` again. A ``found`` may repeat for a node already found (a
  static source re-announcing its seeds): consumers treat ``found`` as idempotent.
* Adverts for our own node id are never reported. Adverts naming another fleet, and adverts that
  cannot be parsed, are ignored and counted in ``stats``.
* ``DiscoveryEvent.at`` is the loop time (``loop.time()``) when the source saw the change; with
  ``source.started_at`` it gives "time from start to peer found".

Discovery is only a hint: nothing here is authenticated. The session handshake proves that the
peer holds the advertised static key and a valid fleet certificate. In particular ``lost`` may be
forged (an mDNS goodbye is one unsigned packet that any host on the link can send): a consumer
must not end a session or mark a member dead on it. ``MeshNode`` ignores ``lost``; the failure
detector of membership decides who is dead, and a peer's next announcement reports it ``found``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Literal, Protocol, Self, runtime_checkable

from meshinfer.closing import OneClose
from meshinfer.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from meshinfer.proto.identity import key_fingerprint
from meshinfer.transport.base import Address, LinkKind

log = logging.getLogger(__name__)

STATIC_KEY_LEN = 32  # an X25519 public key
MAX_NODE_ID_BYTES = 128
MAX_FLEET_ID_BYTES = 64
MAX_ROLES = 16
MAX_ROLES_CHARS = 200  # ",".join(roles) must fit one TXT string (255 bytes) with its key
MAX_ADDRESSES = 16
#: Seconds between two looks at this host's interface addresses: the default of mDNS's
#: (``MdnsConfig``), a node's (``MeshNodeOptions``) and the daemons' ``[discovery]
#: address_check_interval``.
ADDRESS_CHECK_INTERVAL = 5.0
_ROLE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

EventKind = Literal["found", "updated", "lost"]


class MalformedAdvert(RemoteProtocolError):
    """A peer's advertisement (TXT record, SRV/address records) could not be parsed."""


@dataclass(frozen=True, slots=True)
class PeerAdvert:
    """What a peer says about itself: enough to dial it and to run an IK handshake.

    ``static_key`` is the peer's 32-byte X25519 public key; ``addresses`` are IPv4/IPv6 literals
    (mDNS) or host names (static seeds), ``port`` the session listener's TCP port, ``link`` an
    optional hint of the link kind it is reachable over. Construction validates every field and
    raises :class:`~meshinfer.errors.ConfigError` naming the bad one.
    """

    node_id: str
    fleet_id: str
    static_key: bytes
    roles: tuple[str, ...]
    protocol_version: int
    addresses: tuple[str, ...]
    port: int
    link: LinkKind | None = None

    def __post_init__(self) -> None:
        problem = advert_problem(self)
        if problem is not None:
            raise ConfigError(f"peer advert {self.node_id!r}: {problem}")

    @property
    def fingerprint(self) -> str:
        """:func:`key_fingerprint` of ``static_key``."""
        return key_fingerprint(self.static_key)

    def dial_addresses(self) -> tuple[Address, ...]:
        """The transport addresses to try, in advertised order."""
        return tuple(Address(host, self.port) for host in self.addresses)


def advert_problem(advert: PeerAdvert) -> str | None:
    """Say what is wrong with ``advert`` (first problem found), or ``None`` if it is valid."""
    checks = (
        _text_problem("node_id", advert.node_id, MAX_NODE_ID_BYTES),
        _text_problem("fleet_id", advert.fleet_id, MAX_FLEET_ID_BYTES),
        _key_problem(advert.static_key),
        _roles_problem(advert.roles),
        _int_problem("protocol_version", advert.protocol_version, 1, 0xFFFF),
        _addresses_problem(advert.addresses),
        _int_problem("port", advert.port, 1, 0xFFFF),
        _link_problem(advert.link),
    )
    return next((p for p in checks if p is not None), None)


def _link_problem(link: object) -> str | None:
    return None if link is None or isinstance(link, LinkKind) else "link: not a LinkKind"


def _text_problem(name: str, value: object, max_bytes: int) -> str | None:
    if not isinstance(value, str) or not value:
        return f"{name}: must be a non-empty string"
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        return f"{name}: longer than {max_bytes} bytes"
    if not value.isprintable() or value != value.strip():
        return f"{name}: must be printable, without surrounding spaces"
    return None


def _key_problem(key: object) -> str | None:
    if not isinstance(key, bytes) or len(key) != STATIC_KEY_LEN:
        return f"static_key: must be {STATIC_KEY_LEN} bytes"
    return None


def _roles_problem(roles: object) -> str | None:
    if not isinstance(roles, tuple) or len(roles) > MAX_ROLES:
        return f"roles: must be a tuple of at most {MAX_ROLES} roles"
    if not all(isinstance(r, str) and _ROLE_RE.fullmatch(r) for r in roles):
        return "roles: each role is 1-32 of [a-z0-9_-], starting with a letter or digit"
    if len(set(roles)) != len(roles) or len(",".join(roles)) > MAX_ROLES_CHARS:
        return f"roles: duplicates, or longer than {MAX_ROLES_CHARS} characters together"
    return None


def _int_problem(name: str, value: object, low: int, high: int) -> str | None:
    if type(value) is not int or not low <= value <= high:
        return f"{name}: must be an integer in [{low}, {high}]"
    return None


def _addresses_problem(addresses: object) -> str | None:
    if not isinstance(addresses, tuple) or len(addresses) > MAX_ADDRESSES:
        return f"addresses: must be a tuple of at most {MAX_ADDRESSES} hosts"
    bad = [a for a in addresses if not is_host(a)]
    return f"addresses: not an IP address or host name: {bad[0]!r}" if bad else None


def is_host(value: object) -> bool:
    """True for an IPv4/IPv6 literal (a ``%scope`` allowed) or an RFC 1123 host name: the
    form of a host. Whether a peer can listen on an IP literal is
    :func:`~meshinfer.discovery.addresses.is_unicast`, which mDNS and the seed lists apply.

    A name whose last label is all digits is neither (RFC 3696 section 2): the resolver would
    read ``10.0.7`` as the IPv4 address 10.0.0.7, and ``999.0.0.1`` resolves to nothing.
    """
    if not isinstance(value, str) or not value or len(value) > 253:
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        labels = value.removesuffix(".").split(".")
        valid = all(_HOST_LABEL_RE.fullmatch(label) for label in labels)
        return valid and not labels[-1].isdigit()
    return True


@dataclass(frozen=True, slots=True)
class DiscoveryEvent:
    """A peer was found, changed its advert, or went away. ``at`` is the loop time seen."""

    kind: EventKind
    advert: PeerAdvert
    at: float
    source: str = ""

    @property
    def node_id(self) -> str:
        return self.advert.node_id


EventSink = Callable[[DiscoveryEvent], None]


@dataclass(slots=True)
class DiscoveryStats:
    """Counters a source keeps; exported as metrics."""

    found: int = 0
    updated: int = 0
    lost: int = 0
    ignored_self: int = 0
    ignored_other_fleet: int = 0
    ignored_malformed: int = 0
    unresolved: int = 0  # mDNS: a service whose SRV/TXT/address records never arrived
    ignored_full: int = 0  # a new peer while ``max_peers`` were reported already
    sink_errors: int = 0


@runtime_checkable
class DiscoverySource(Protocol):
    """Reports peers to the sink given at construction. See the module docstring for the rules."""

    name: str
    stats: DiscoveryStats

    @property
    def started_at(self) -> float | None:
        """Loop time when ``start`` began, ``None`` before."""
        ...

    @property
    def peers(self) -> Mapping[str, PeerAdvert]:
        """The peers currently reported (found and not lost), by node id."""
        ...

    async def start(self) -> None:
        """Begin discovering (and advertising, for sources that advertise)."""
        ...

    async def aclose(self) -> None:
        """Stop; say goodbye where the medium allows it. Idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


MALFORMED_WARNING_S = 60.0
"""Least seconds between two warnings about malformed adverts from one source."""


class PeerDirectory:
    """The peers one source reports, and the filter between what it sees and its sink.

    ``sight`` and ``lose`` turn observations into events (found/updated/lost), drop our own node
    and other fleets, keep the counters, and call the sink. Loop-only; ``now`` is passed in.
    ``max_peers`` (``None``: no limit) bounds how many peers are reported at once: a node id
    sighted beyond it is ignored and counted, so a flood of forged adverts cannot grow memory.
    """

    def __init__(
        self,
        own_node_id: str,
        fleet_id: str,
        sink: EventSink,
        stats: DiscoveryStats,
        source: str,
        max_peers: int | None = None,
    ) -> None:
        self.own_node_id = own_node_id
        self.fleet_id = fleet_id
        self.sink = sink
        self.stats = stats
        self.source = source
        self.peers: dict[str, PeerAdvert] = {}
        self.max_peers = max_peers
        self._warned_at: float | None = None  # the last malformed advert logged as a warning
        self._warned_count = 0  # ignored_malformed then

    def reports(self, advert: PeerAdvert) -> bool:
        """True if ``advert`` is one the sink hears of: another node, of our fleet."""
        return advert.node_id != self.own_node_id and advert.fleet_id == self.fleet_id

    def sight(
        self, advert: PeerAdvert, now: float, *, repeat: bool = False
    ) -> DiscoveryEvent | None:
        """Record that ``advert`` was seen; return the event reported, if any.

        An unchanged advert reports nothing unless ``repeat`` (then ``found`` again).
        """
        if advert.node_id == self.own_node_id:
            self.stats.ignored_self += 1
            return None
        if advert.fleet_id != self.fleet_id:  # node ids are unique per fleet only: not ours
            self.stats.ignored_other_fleet += 1
            return None
        old = self.peers.get(advert.node_id)
        if old == advert and not repeat:
            return None
        if old is None and self.max_peers is not None and len(self.peers) >= self.max_peers:
            self.stats.ignored_full += 1
            log.debug("%s: %d peers reported; ignored %s", self.source, self.max_peers, advert)
            return None
        self.peers[advert.node_id] = advert
        kind: EventKind = "updated" if old is not None and old != advert else "found"
        return self._emit(kind, advert, now)

    def lose(self, node_id: str, now: float) -> DiscoveryEvent | None:
        """Record that ``node_id`` went away; reports ``lost`` only if it was known."""
        advert = self.peers.pop(node_id, None)
        return None if advert is None else self._emit("lost", advert, now)

    def malformed(self, why: object, now: float) -> None:
        """Count an advert that could not be parsed, and say so: a WARNING for the first and
        then at most one per :data:`MALFORMED_WARNING_S` (with how many went by meanwhile),
        DEBUG for the rest (a broken or hostile host on the LAN must not flood the log)."""
        self.stats.ignored_malformed += 1
        if self._warned_at is not None and now - self._warned_at < MALFORMED_WARNING_S:
            log.debug("%s: ignored a malformed advert: %s", self.source, why)
            return
        since = self.stats.ignored_malformed - self._warned_count - 1
        more = f" ({since} more since the last warning)" if self._warned_at is not None else ""
        log.warning("%s: ignored a malformed advert: %s%s", self.source, why, more)
        self._warned_at, self._warned_count = now, self.stats.ignored_malformed

    def _emit(self, kind: EventKind, advert: PeerAdvert, now: float) -> DiscoveryEvent:
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        event = DiscoveryEvent(kind, advert, now, self.source)
        try:
            self.sink(event)
        except Exception:
            self.stats.sink_errors += 1
            log.exception("%s: discovery sink failed on %s %s", self.source, kind, advert.node_id)
        return event


@dataclass(eq=False)
class EventQueue:
    """A sink that queues events, for consumers that prefer ``async for event in queue``.

    Unbounded on purpose: discovery events are few (one per peer change) and the sink must
    never block. Iteration runs until the task is cancelled.
    """

    _queue: asyncio.Queue[DiscoveryEvent] = field(default_factory=asyncio.Queue)

    def __call__(self, event: DiscoveryEvent) -> None:
        self._queue.put_nowait(event)

    async def get(self) -> DiscoveryEvent:
        """Wait for the next event."""
        return await self._queue.get()

    def get_nowait(self) -> DiscoveryEvent | None:
        """The next event if one is queued, else ``None``."""
        return None if self._queue.empty() else self._queue.get_nowait()

    def __aiter__(self) -> EventQueue:
        return self

    async def __anext__(self) -> DiscoveryEvent:
        return await self._queue.get()


class SourceBase:
    """Lifecycle and bookkeeping shared by the sources: ``start`` once, idempotent ``aclose``.

    Subclasses set ``name`` and implement ``_start`` (undone by ``aclose`` if it fails) and
    ``_stop`` (which must cope with a source that never started, or only half started).
    ``max_peers`` bounds the peers reported at once (:class:`PeerDirectory`).
    """

    name = "source"

    def __init__(
        self, own_node_id: str, fleet_id: str, sink: EventSink, max_peers: int | None = None
    ) -> None:
        self.stats = DiscoveryStats()
        self.directory = PeerDirectory(
            own_node_id, fleet_id, sink, self.stats, self.name, max_peers
        )
        self._started_at: float | None = None
        self._closed = False
        self._one_stop = OneClose()

    @property
    def started_at(self) -> float | None:
        return self._started_at

    @property
    def peers(self) -> Mapping[str, PeerAdvert]:
        return MappingProxyType(self.directory.peers)

    @property
    def closed(self) -> bool:
        return self._closed

    async def start(self) -> None:
        """Start the source. Runs on the loop; a second call raises LocalProtocolError."""
        if self._started_at is not None or self._closed:
            raise LocalProtocolError(f"{self.name} discovery: start() called twice or after aclose")
        self._started_at = self._now()
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop the source. Idempotent; safe before ``start``. A call made while another one
        is stopping the source returns when that one is done. The stop runs once, in a task of
        its own (:class:`~meshinfer.closing.OneClose`): a caller cancelled meanwhile (a shutdown
        timeout) does not cut it short, which left zeroconf's sockets and tasks open while later
        calls took the source as closed."""
        self._closed = True
        await self._one_stop.run(self._stop)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError
