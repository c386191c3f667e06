"""``MeshNode``: one node's networking, composed: sessions, peers, membership, discovery.

Lifecycle (explicit and idempotent, STYLE.md 8)::

    start():  listener up -> membership timer and revocation sync running (see
              :mod:`meshinfer.runtime.revocations`) -> discovery advertising and browsing
              (readiness = listening; ``wait_joined`` = a seed or discovered peer answered;
              called before the start made the membership, it raises RuntimeError)
    leave():  graceful: announce LEFT, wait until gossiped, then aclose()
    aclose(): discovery goodbyes -> revocation sync and membership stopped -> listener closed
              -> sessions closed

Each close step runs even when one before it fails (logged). A second ``start`` waits for the
first; ``aclose`` during a start stops it where it is (that ``start`` raises RuntimeError) and
closes what it started; a start that fails, or whose caller is cancelled, closes what it started;
a ``start`` after ``aclose`` raises RuntimeError. ``aclose`` called again, or concurrently, waits
for the first close to end; one whose caller is cancelled goes on closing.

Discovery events (mDNS, static seeds) teach the peer table where a node listens and its static
key (the peer table holds one address per node: an advert's first; the mDNS source lists first
those on a network this host shares, :func:`~meshinfer.discovery.addresses.nearest_first`), then ask
membership to push-pull with it (a join). Membership teaches the peer table the addresses of
every member it hears of, so nodes found only through gossip are dialled too.
Applications add handlers for their own message types on :attr:`MeshNode.peers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nacl.utils
import psutil

from meshinfer import PROTOCOL_VERSION
from meshinfer.discovery.base import ADDRESS_CHECK_INTERVAL, DiscoveryEvent, PeerAdvert
from meshinfer.discovery.mdns import MdnsConfig, MdnsDiscovery
from meshinfer.discovery.static import StaticDiscovery, StaticSeed, checked_seeds
from meshinfer.errors import ConfigError, log_stopped
from meshinfer.proto.identity import NodeIdentity, RevocationList
from meshinfer.proto.membership import MembershipConfig, NodeState
from meshinfer.proto.membership_auth import CertifiedRecordAuthenticator
from meshinfer.runtime.endpoint import ListenerLimits, SessionListener
from meshinfer.runtime.membership_service import MembershipService
from meshinfer.runtime.outbox_size import OUTBOX_BYTES
from meshinfer.runtime.peers import PeerTable
from meshinfer.runtime.revocations import RevocationSync, RevocationSyncConfig
from meshinfer.runtime.session import Admission, SessionConfig, SessionMetrics
from meshinfer.transport.base import Address, LinkKind, Transport
from meshinfer.transport.tcp import TcpTransport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeshNodeOptions:
    """How a node joins the mesh (built from the daemon's TOML, or directly in tests)."""

    listen: Address = Address("127.0.0.1", 0)
    advertise_host: str = ""
    link: LinkKind = LinkKind.WAN
    mdns: MdnsConfig | None = field(default_factory=MdnsConfig.loopback)
    seeds: Sequence[StaticSeed] = ()
    membership: MembershipConfig = field(default_factory=MembershipConfig.lan)
    session: SessionConfig = field(default_factory=SessionConfig)
    limits: ListenerLimits = field(default_factory=ListenerLimits)
    #: The most bytes of messages queued for one peer (:class:`PeerTable`'s ``outbox_bytes``;
    #: the daemons' ``[session] outbox_mib``).
    outbox_bytes: int = OUTBOX_BYTES
    #: the revocation list file to watch for news and to write merged lists to (the identity
    #: directory's ``revocations.bin``; None: the list lives in memory only)
    revocations_file: Path | None = None
    revocations: RevocationSyncConfig = field(default_factory=RevocationSyncConfig)
    #: Sign this node's membership records and take others' only with their author's proof
    #: (:class:`~meshinfer.proto.membership_auth.CertifiedRecordAuthenticator`). Off only for
    #: tests of the unsigned core over real sessions: a signing node refuses unsigned records.
    signed_records: bool = True
    #: Seconds between two looks at the address this host routes from, for a node listening on
    #: every interface with no ``advertise_host`` (a V2I link comes up, DHCP gives a new lease):
    #: on a change its gossiped state and its mDNS advert name the new one. None: never again.
    address_check_interval: float | None = ADDRESS_CHECK_INTERVAL

    def __post_init__(self) -> None:
        # checked here, not when discovery starts (after the listener: a ConfigError then)
        object.__setattr__(self, "seeds", checked_seeds(self.seeds))
        bound = self.outbox_bytes
        if isinstance(bound, bool) or not isinstance(bound, int) or bound <= 0:
            raise ConfigError(f"outbox_bytes must be a positive integer, got {bound!r}")


EVERY_INTERFACE = ("0.0.0.0", "::")
"""Listen hosts that are no address a peer can dial (a listener on every interface)."""


def outbound_address() -> str:
    """The IPv4 address peers on other hosts most likely reach this one at: the source address
    of the route off this host (a UDP socket's connect only looks the route up; nothing is
    sent), else the first non-loopback IPv4 address of an interface that is up, else
    127.0.0.1 (a host with no network: only loopback peers can reach it anyway)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))  # a documentation address (RFC 5737): a route lookup
        host = probe.getsockname()[0]
        if not ipaddress.ip_address(host).is_loopback and host != "0.0.0.0":
            return host
    for address in _up_addresses((socket.AF_INET,)):
        if not ipaddress.ip_address(address.address).is_loopback:
            return address.address
    return "127.0.0.1"


def _up_addresses(families: tuple[int, ...]) -> Iterator[Any]:
    """The addresses (psutil's ``snicaddr``) of ``families`` on this host's interfaces that
    are up."""
    up = {name for name, stats in psutil.net_if_stats().items() if stats.isup}
    for name, addresses in psutil.net_if_addrs().items():
        if name in up:
            yield from (a for a in addresses if a.family in families)


class MeshNode:
    """A node's place in the mesh. Run on one event loop; see the module docstring."""

    def __init__(
        self,
        identity: NodeIdentity,
        revocations: RevocationList,
        options: MeshNodeOptions | None = None,
        *,
        transport: Transport | None = None,
        rng: random.Random | None = None,
        outbound: Callable[[], str] = outbound_address,
    ) -> None:
        self.identity = identity
        self._find_outbound = outbound  # (called in a worker thread)
        self.options = options or MeshNodeOptions()
        self.admission = Admission(identity, revocations)
        self.transport = transport or TcpTransport(self.options.link)
        self.metrics = SessionMetrics()
        self.rng = rng or random.Random()
        self.peers = PeerTable(
            identity.node_id,
            self.transport,
            self.admission,
            config=self.options.session,
            metrics=self.metrics,
            outbox_bytes=self.options.outbox_bytes,
            rng=self.rng,  # (the dial backoff's jitter)
        )
        self.listener = SessionListener(
            self.transport,
            self.admission,
            self.peers.serve_inbound,
            config=self.options.session,
            limits=self.options.limits,
            metrics=self.metrics,
        )
        self.membership: MembershipService | None = None
        self.revocation_sync: RevocationSync | None = None
        self.discovery: list[MdnsDiscovery | StaticDiscovery] = []
        self.address: Address | None = None
        self.ready = asyncio.Event()
        self._closed = False
        self._outbound: str | None = None
        self._outbound_watch: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None  # the start, once asked for
        self._closing: asyncio.Task[None] | None = None  # the close, once asked for

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def advertised_host(self) -> str:
        """The host peers are told to dial (gossip, mDNS): ``advertise_host``, else the listen
        host; for a listener on every interface, the address this host routes from."""
        if self._outbound is not None:  # looked up at the start
            return self._outbound
        host = self.options.advertise_host or self.options.listen.host
        return "127.0.0.1" if host in (*EVERY_INTERFACE, "") else host

    def initial_state(self, port: int) -> NodeState:
        return NodeState(
            host=self.advertised_host,
            port=port,
            static_key=self.identity.static_public,
            roles=tuple(sorted(self.identity.certificate.roles)),
            links=(self.options.link.value,),
            revocation_version=self.admission.revocations.version,
        )

    async def start(self) -> None:
        """Listen, start membership, then advertise and browse. Sets :attr:`ready`. Once
        started, a no-op; see the module docstring for a start that fails, is cancelled or
        meets :meth:`aclose`."""
        if self._closed:
            raise RuntimeError(f"node {self.node_id} is closed: it cannot start again")
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        starting, caller = self._starting, asyncio.current_task()
        cancels = caller.cancelling() if caller is not None else 0  # (one swallowed before)
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            if caller is None or caller.cancelling() <= cancels:  # aclose() stopped the start
                raise RuntimeError(f"node {self.node_id} was closed during its start") from None
            await asyncio.shield(self.aclose())  # our caller was cancelled: the start goes too
            raise
        except BaseException:
            await asyncio.shield(self.aclose())
            raise

    async def _start(self) -> None:
        self.address = await self.listener.start(self.options.listen)
        if (self.options.advertise_host or self.options.listen.host) in EVERY_INTERFACE:
            self._outbound = await asyncio.to_thread(self._find_outbound)
        self.membership = MembershipService(
            self.peers,
            self.initial_state(self.address.port),
            self.options.membership,
            rng=self.rng,
            authenticator=self._record_authenticator(),
        )
        self.membership.start()
        self.revocation_sync = RevocationSync(
            self.admission, self.peers, self.membership, store=self.options.revocations_file,
            config=self.options.revocations, rng=self.rng,
        )  # fmt: skip
        self.revocation_sync.start()
        await self._start_discovery(self.address.port)
        interval = self.options.address_check_interval
        if self._outbound is not None and interval is not None:
            self._outbound_watch = asyncio.create_task(self._watch_outbound(interval))
            # it stops only when cancelled; should it die, the node keeps serving at the
            # address it has, and nobody would hear of it but for the log
            self._outbound_watch.add_done_callback(
                log_stopped(
                    log,
                    f"node {self.node_id}: the watch of its address",
                    lambda: f"it stays at {self._outbound}",
                )
            )
        self.ready.set()
        log.info("node %s listening on %s", self.node_id, self.address)

    def _record_authenticator(self) -> CertifiedRecordAuthenticator | None:
        """Membership records proven by fleet certificates (see :mod:`membership_auth`)."""
        if not self.options.signed_records:
            return None
        identity, admission = self.identity, self.admission
        return CertifiedRecordAuthenticator(
            identity.certificate,
            identity.static_private,
            identity.trust,
            random_bytes=nacl.utils.random,
            revoked=lambda cert: admission.revocations.is_revoked(cert),
            cache_entries=2 * self.options.membership.max_members,
            wallclock=lambda: admission.wallclock(),
            clock_skew=self.options.session.clock_skew,
        )

    async def _start_discovery(self, port: int) -> None:
        opts = self.options
        if opts.mdns is not None:
            advert = PeerAdvert(
                node_id=self.node_id,
                fleet_id=self.identity.trust.fleet_id,
                static_key=self.identity.static_public,
                roles=tuple(sorted(self.identity.certificate.roles)),
                protocol_version=PROTOCOL_VERSION,
                addresses=(self.advertised_host,),
                port=port,
                link=opts.link,
            )
            self.discovery.append(MdnsDiscovery(advert, self._on_discovered, opts.mdns))
        if opts.seeds:
            self.discovery.append(
                StaticDiscovery(
                    list(opts.seeds),
                    self._on_discovered,
                    own_node_id=self.node_id,
                    fleet_id=self.identity.trust.fleet_id,
                    reannounce_interval=5.0,
                )
            )
        for source in self.discovery:
            await source.start()

    async def _watch_outbound(self, interval: float) -> None:
        """Every ``interval`` s, look up the address this host routes from again; on a change,
        tell the mesh (gossiped state, mDNS advert): peers dial the new one."""
        while True:
            await asyncio.sleep(interval)
            try:
                host = await asyncio.to_thread(self._find_outbound)
                if host != self._outbound:
                    await self._move_to(host)
            except Exception:  # an interface going away mid-look: try next time
                log.exception("node %s: following its address failed", self.node_id)

    async def _move_to(self, host: str) -> None:
        log.info("node %s: its address is now %s (was %s)", self.node_id, host, self._outbound)
        self._outbound = host
        if self.membership is not None:
            self.membership.update_state(replace(self.membership.state, host=host))
        for source in self.discovery:
            if isinstance(source, MdnsDiscovery):
                await source.update(replace(source.advert, addresses=(host,)))

    def _on_discovered(self, event: DiscoveryEvent) -> None:
        if event.kind == "lost" or self.membership is None:
            return  # membership, not discovery, decides who is dead
        advert = event.advert
        addresses = advert.dial_addresses()  # the source's order: the one to dial first
        if not addresses:
            return
        self.peers.learn(advert.node_id, addresses[0], advert.static_key)
        member = self.membership.core.member(advert.node_id)
        if member is None or not member.is_live:
            self.membership.join([advert.node_id])

    async def wait_joined(self) -> None:
        """Wait until a seed or a discovered peer answered. RuntimeError before the start has
        made the membership (await :meth:`start` first), and once the node closed unjoined."""
        if self.membership is None:
            raise RuntimeError(
                f"node {self.node_id} has not started its membership: await start() first"
            )
        await self.membership.wait_joined()

    def live_members(self) -> list[str]:
        return self.membership.live_members() if self.membership else []

    async def leave(self, timeout: float = 2.0) -> None:
        """Graceful: announce LEFT so peers do not wait for a failure detector, then close.
        Discovery says its goodbyes (mDNS: three, 125 ms apart) meanwhile: its ``lost`` events
        are not what membership goes by. A leave whose caller is cancelled still closes the
        node (in a task of its own, as :meth:`aclose` does; a later ``aclose`` waits for it)."""
        if self.membership is not None and not self._closed:
            try:
                await asyncio.gather(
                    self.membership.leave(timeout),
                    *(source.aclose() for source in self.discovery),
                    return_exceptions=True,  # (each is best effort; aclose below finishes the job)
                )
            except asyncio.CancelledError:  # else LEFT was announced by a node left running
                self._begin_close()
                raise
        await self.aclose()

    async def aclose(self) -> None:
        """Abrupt but orderly shutdown (no leave announcement). Idempotent: every call waits
        until the one close has ended (it goes on when a caller is cancelled)."""
        await asyncio.shield(self._begin_close())

    def _begin_close(self) -> asyncio.Task[None]:
        """The one close of this node, started on the first call."""
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        return self._closing

    async def _close(self) -> None:
        if self._starting is not None:  # a start under way stops where it is
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._outbound_watch is not None:  # a failure was logged by its done-callback
            self._outbound_watch.cancel()
            await asyncio.gather(self._outbound_watch, return_exceptions=True)
        for source in self.discovery:  # best effort, as leave()'s goodbyes: said, not raised
            try:
                await source.aclose()
            except Exception as exc:
                what = type(source).__name__
                log.warning(
                    "node %s: closing its discovery (%s) failed: %r", self.node_id, what, exc
                )
        sync, membership = self.revocation_sync, self.membership
        steps = (
            ("its revocation sync", sync.aclose if sync is not None else None),
            ("its membership", membership.aclose if membership is not None else None),
            ("its listener", self.listener.aclose),
            ("its sessions", self.peers.aclose),
        )
        for what, close in steps:
            try:
                if close is not None:
                    await close()
            except Exception:  # the rest still close
                log.exception("node %s: closing %s failed", self.node_id, what)

    async def __aenter__(self) -> MeshNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
