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
``address_check_interval`` the host's interfaces are read again (``adapters``, an
:data:`~meshinfer.discovery.mdns_config.AdapterSource`), zeroconf's sockets follow
(``async_update_interfaces``), and an advert whose addresses came from the interfaces is
re-announced, after goodbyes for the addresses gone (zeroconf's browser re-reads a
service when a record arrives, never when one expires, so a peer would keep listing the old one).
The same look reads each reported peer again from zeroconf's cache: an address whose record
expired (its goodbye lost, or the peer gone without one) is dropped (``updated``, or ``lost`` with
none left); a peer's SRV, TXT or address record past ``REFRESH_AT`` (75%) of its TTL, or that
would expire before the next look, is asked for first. Records there that do not parse, or an
SRV record naming a host other than the peer's own ``<label>.local.``, are what anyone on the
link can send: they leave the peer as reported, less the addresses whose own records expired
(discovery only adds addresses). A peer's loopback addresses are kept only while it may be on
this host (:func:`~meshinfer.discovery.addresses.drop_foreign_loopback`), and its addresses are
reported with those on a network this host shares first
(:func:`~meshinfer.discovery.addresses.nearest_first`, on the networks that same look read off
the loop; in a stable order within each group): its consumers dial the first. A reported peer's
static key that changes is reported and logged (:meth:`MdnsDiscovery._note_key_change`).
An interface named in ``MdnsConfig.interfaces`` that is
not there at start (a V2I link not up yet) gets a warning, and zeroconf binds to it when a look
finds it.

Loopback: ``MdnsConfig.loopback()`` binds zeroconf to 127.0.0.1 only. Multicast between several
zeroconf instances (in one process or several) works on Linux even when ``lo`` lacks the
MULTICAST flag: the sockets join the group and set ``IP_MULTICAST_IF`` on 127.0.0.1 explicitly,
with ``IP_MULTICAST_LOOP`` on, so no root setup (``ip link set lo multicast on``) is needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from typing import Any

import ifaddr
from zeroconf import (
    BadTypeInNameException,
    DNSOutgoing,
    InterfaceChoice,
    ServiceStateChange,
    current_time_millis,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshinfer.discovery.addresses import (
    Network,
    address_snapshot,
    host_addresses,
    host_networks,
    is_ip,
    up_adapters,
)
from meshinfer.discovery.base import (
    MALFORMED_WARNING_S,
    DiscoveryEvent,
    EventSink,
    MalformedAdvert,
    PeerAdvert,
    SourceBase,
)
from meshinfer.discovery.mdns_cache import (
    advert_from_service,
    cached_advert,
    drop_expired_addresses,
    live_addresses,
    own_host,
    refresh_questions,
    service_host,
)
from meshinfer.discovery.mdns_config import (  # MdnsConfig: its callers import it from here
    GOODBYE_INTERVAL,
    IP_VERSIONS,
    AdapterSource,
    MdnsConfig,
    advertised_addresses,
    missing_interfaces,
    resolve_interfaces,
)
from meshinfer.discovery.mdns_txt import SERVICE_TYPE, instance_label, txt_for_advert
from meshinfer.errors import ConfigError, LocalProtocolError, MeshInferError, log_stopped

__all__ = ["MdnsConfig", "MdnsDiscovery"]

log = logging.getLogger(__name__)

_RESPONSE_FLAGS = 0x8400  # DNS header QR (a response) | AA (authoritative): RFC 6762 section 18
_QUERY_FLAGS = 0x0000


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
        adapters: AdapterSource = up_adapters,
    ) -> None:
        if not all(is_ip(host) for host in advert.addresses):
            raise ConfigError(f"mdns: advertised addresses must be IP literals: {advert.addresses}")
        config = config or MdnsConfig()
        super().__init__(advert.node_id, advert.fleet_id, sink, config.max_peers)
        self.advert = advert
        self.config = config
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
        self._key_warned: dict[str, float] = {}  # node id -> when its key change was logged

    @property
    def service_name(self) -> str:
        """Our service instance name, ``<instance_label>._meshinfer._tcp.local.``."""
        return f"{instance_label(self.advert.node_id, self.advert.fleet_id)}.{SERVICE_TYPE}"

    async def _start(self) -> None:
        adapters = await asyncio.to_thread(
            self._adapters
        )  # (ifaddr reads the system: off the loop)
        if self._closed:  # aclose ran meanwhile and saw no zeroconf: make none it cannot close
            raise LocalProtocolError("mdns: aclose() was called while start() ran")
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
            ip_version=IP_VERSIONS[self.config.ip_version],
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
            watch.add_done_callback(log_stopped(log, "mdns: the address watch", self._kept))
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
        seen = address_snapshot(adapters)
        while True:
            await asyncio.sleep(self.config.address_check_interval)
            try:
                adapters = await asyncio.to_thread(self._adapters)
                snapshot = address_snapshot(adapters)
                if snapshot != seen:
                    seen = snapshot
                    await self._follow_addresses(adapters)
            except Exception as exc:  # adapter churn, a socket that would not bind: next time
                _log_look_failure("following the host's address change", exc)
            try:
                self._check_peer_addresses()
            except Exception as exc:  # the watch goes on
                _log_look_failure("checking peers' addresses", exc)

    def _kept(self) -> str:
        """What stays when the address watch has stopped for good (for its log line)."""
        addresses = ", ".join(self.advert.addresses) or "no address"
        return f"our advert stays at {addresses}; host and peers' addresses are looked at no more"

    def _check_peer_addresses(self) -> None:
        """Read each reported peer again from zeroconf's cache, where records expire by TTL:
        an address whose record expired is dropped (``updated``; ``lost`` with none left).
        zeroconf's browser reports a record that arrives, never one that expires, so a lost
        address goodbye (or a peer gone without one) left the address listed for good. A
        peer's SRV, TXT or address record past
        :data:`~meshinfer.discovery.mdns_cache.REFRESH_AT` of its TTL, or that would expire
        before the next look, is asked for first, so a
        peer that is still there keeps it; an expired address record is purged
        (:func:`~meshinfer.discovery.mdns_cache.drop_expired_addresses`)."""
        assert self._zc is not None
        zc, now = self._zc.zeroconf, current_time_millis()
        # A record that would expire before the next look is asked for now (with room for a
        # late look): its last quarter of TTL may fall between two looks.
        horizon = 1.5 * (self.config.address_check_interval or 0.0)
        query = DNSOutgoing(_QUERY_FLAGS)
        for name in list(self._names):
            info, host = AsyncServiceInfo(SERVICE_TYPE, name), service_host(name)
            local = self._local_addresses, self._local_networks
            try:
                advert = cached_advert(zc, name, info, now, *local)
            except MalformedAdvert:  # anyone can send such records under its name: no goodbye
                advert = self._less_expired(name, host, now)
            drop_expired_addresses(zc, host, now)
            if advert is None:
                self._forget(name)
                continue
            self._sight(advert)  # reports only a change
            for question in refresh_questions(zc, name, host, now, horizon):
                query.add_question(question)
        if query.questions:
            zc.async_send(query)

    def _less_expired(self, name: str, host: str, now: float) -> PeerAdvert | None:
        """The advert reported for service ``name``, less the addresses whose records (of
        ``host``, its own) expired at ``now``; None when none is left. For a service whose
        cached records do not parse: discovery only adds addresses (admission is by the Noise
        handshake), and forged records must not make a peer ``lost``."""
        assert self._zc is not None
        reported = self.directory.peers.get(self._names[name])
        if reported is None:
            return None
        live = live_addresses(self._zc.zeroconf, host, now)
        kept = tuple(a for a in reported.addresses if a.split("%", 1)[0] in live)
        return replace(reported, addresses=kept) if kept else None

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
        complete = info.load_from_cache(self._zc.zeroconf)
        if (complete and info.port is not None) or not own_host(name, info):
            self._accept(name, info)  # an SRV record naming another host is malformed at once
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
        event = self._sight(advert)
        # Only names of reported peers: not ours, not another fleet's node of a peer's id.
        if self.directory.reports(advert) and advert.node_id in self.directory.peers:
            self._names[name.lower()] = advert.node_id
        if event is not None and event.kind == "found" and self.config.reciprocal_announce:
            self._announce_soon()

    def _sight(self, advert: PeerAdvert) -> DiscoveryEvent | None:
        """Report ``advert`` to the directory, after saying so if it changes the static key of
        a reported peer (:meth:`_note_key_change`)."""
        self._note_key_change(advert)
        return self.directory.sight(advert, self._now())

    def _note_key_change(self, advert: PeerAdvert) -> None:
        """A WARNING when a reported peer's advertised static key changes, then at most one per
        :data:`~meshinfer.discovery.base.MALFORMED_WARNING_S` for that node id (DEBUG between).

        A node re-keyed (re-enrolled, restarted without its goodbye) does this once; two nodes
        announcing one node id (mDNS has no conflict probing here: ``fast_register``), or a
        host forging adverts, flip it on every announcement, and each flip is reported
        ``updated`` and redirects dials until the next one. The change is reported, not pinned:
        a re-keyed node announces its new key with cache-flush records that replace the old
        ones, and would never be reported again; the handshake decides who holds which key.
        """
        old = self.directory.peers.get(advert.node_id)
        if old is None or old.static_key == advert.static_key or not self.directory.reports(advert):
            return
        now, last = self._now(), self._key_warned.get(advert.node_id)
        change = f"{old.fingerprint} -> {advert.fingerprint}"
        if last is not None and now - last < MALFORMED_WARNING_S:
            log.debug("mdns: %s changed its static key again (%s)", advert.node_id, change)
            return
        self._key_warned[advert.node_id] = now
        log.warning(
            "mdns: %s changed its advertised static key (%s): re-keyed, or two nodes (or a "
            "forger) announce this node id; next warning in %.0f s at the earliest",
            advert.node_id,
            change,
            MALFORMED_WARNING_S,
        )

    def _forget(self, name: str) -> None:
        node_id = self._names.pop(name.lower(), None)
        if node_id is not None:
            self._key_warned.pop(node_id, None)
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
            await _logged("send goodbyes", self._goodbyes())
            await _logged("close zeroconf", self._zc.async_close())

    async def _goodbyes(self) -> None:
        """Multicast our records with TTL 0 ``config.goodbyes`` times, ``GOODBYE_INTERVAL``
        apart (zeroconf's ``async_unregister_all_services`` always sends 3). Building the
        goodbye empties zeroconf's registry, so its close sends none of its own."""
        assert self._zc is not None
        zc = self._zc.zeroconf
        out = zc.generate_unregister_all_services()
        for i in range(self.config.goodbyes if out is not None else 0):
            if i:
                await asyncio.sleep(GOODBYE_INTERVAL)
            zc.async_send(out)


def _log_look_failure(step: str, exc: Exception) -> None:
    """One look of the address watch failed; the next one tries again. The network (an
    interface going away mid-look, a socket that would not bind) is a warning; anything else
    is our bug: an error with its traceback."""
    if isinstance(exc, OSError | MeshInferError):
        log.warning("mdns: %s failed (next look in a while): %s", step, exc)
    else:
        log.error("mdns: %s failed", step, exc_info=exc)


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
