"""SWIM membership with Lifeguard suspicion: the sans-I/O core.

Theory of operation
-------------------
A :class:`Membership` is one node's view of the fleet. The driver (the asyncio membership
service, or :mod:`meshinfer.testing.virtual_network`) feeds it:

* ``handle_packet(from_node, data, now)`` -- a packet from a peer; ``from_node`` is the node id
  the session layer authenticated, never a field of the packet;
* ``tick(now)`` -- at (or after) :meth:`Membership.next_deadline`;
* ``join(seeds, now)``, ``leave(now)``, ``update_local_state(state, now)``;

and takes out :meth:`~Membership.drain_packets` (``(to_node, bytes)``) and
:meth:`~Membership.drain_events` (:class:`MemberEvent`). Time and randomness come in; nothing is
read from globals.

Four periodic activities run off the timers, each first scheduled at a random phase:

``probe`` (every ``probe_interval``, scaled by local health)
    Ping the next member of a shuffled round robin; without an ack after ``probe_timeout`` ask
    ``indirect_checks`` relays (ping-req) and ping it once more directly; without any ack by the
    end of the round, suspect it (:mod:`membership_probe`, :mod:`membership_suspicion`).
    The ack's delay is this node's measured round trip to the member (:meth:`Membership.rtt`).
    Missing nacks lower local health. A ping to a suspect carries its suspicion (Lifeguard's
    buddy system); any other ping echoes one suspicion this node holds, so a node that missed
    a refutation is corrected by whoever saw it.
``gossip`` (every ``gossip_interval``)
    Send queued updates to ``gossip_nodes`` random members (live, or recently dead). Updates also
    ride on every ping, ack, ping-req and nack up to ``packet_budget`` (:mod:`membership_gossip`).
``push-pull`` (every ``push_pull_period(n)``)
    Anti-entropy with one random live member; both sides merge. With ``push_pull_digests`` (the
    default) it takes three packets: a digest of this node's table (a few bytes per member), a
    reply with the records the digest lacked or listed otherwise plus the ids whose records the
    replier wants, and those records (see "Digests" in :mod:`membership_store`). Otherwise
    both sides send their whole tables (two packets).
``reconnect`` (every ``reconnect_interval``)
    The same exchange with one random *dead* member, so a partition heals once its links are
    back.
``certificate check`` (every ``certificate_check_interval``, with signed records only)
    Declare dead the live members whose newest record's certificate has expired, or (once the
    local state announced a newer revocation list) was revoked since (see "Expired
    certificates" and "Revoked certificates" in :mod:`membership_table`).

Joining is a whole-table push-pull marked ``join`` to the seeds, retried until one answers; its
answer carries this node's own record from an earlier life, if the seed holds one, which a
restarted node outbids. A claim about this node above its incarnation that arrives in any other
packet starts an anti-entropy exchange with its sender for the same evidence: at once for a
claim above any asked about, else again at most once per ``probe_interval`` while such claims
keep coming ("Claims above this node's incarnation" in :mod:`membership_table`).
Leaving marks this node LEFT at a higher incarnation and keeps gossiping until the news is out
(:attr:`Membership.leave_announced`). The rules for applying records, including refutation,
the impersonation rule and the table cap (``max_members``), live in :mod:`membership_table`; a
packet is read up to ``max_packet_records()`` records (:mod:`membership_config`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import NamedTuple

from meshinfer.proto.membership_auth import RecordAuthenticator
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_probe import ProbeOrder, ProbeRound, RelayedProbe, RoundTrips
from meshinfer.proto.membership_table import (
    Member,
    MemberEvent,
    MemberEventKind,
    MembershipCounters,
    MemberStatus,
    MemberTable,
)
from meshinfer.proto.membership_wire import (
    Ack,
    AliveRecord,
    Digest,
    DigestEntry,
    DigestReply,
    Gossip,
    Header,
    Nack,
    NodeState,
    Ping,
    PingReq,
    PushPull,
    Record,
    decode_packet,
    encode_header,
    encode_packet,
)

__all__ = [
    "Member",
    "MemberEvent",
    "MemberEventKind",
    "MemberStatus",
    "Membership",
    "MembershipConfig",
    "MembershipCounters",
    "NodeState",
    "Outbound",
]

INF = float("inf")


class Outbound(NamedTuple):
    """A packet to send: the driver delivers ``data`` to ``to_node`` (best effort)."""

    to_node: str
    data: bytes


class Membership:
    """One node's SWIM/Lifeguard membership state machine (sans-I/O)."""

    def __init__(
        self,
        node_id: str,
        state: NodeState,
        config: MembershipConfig,
        rng: random.Random,
        now: float,
        *,
        authenticator: RecordAuthenticator | None = None,
        incarnation: int = 0,
        known_members: Iterable[AliveRecord] = (),
    ) -> None:
        """Start alive at ``incarnation`` with state version 1.

        ``known_members`` seeds the table without events or broadcasts (a warm start from a
        snapshot, or a pre-converged simulation); normally start empty and :meth:`join`.
        """
        self.config = config
        self._rng = rng
        self.counters = MembershipCounters()
        local = AliveRecord(node_id, incarnation, 1, state)
        self.table = MemberTable(local, config, rng, now, authenticator, self.counters)
        self._order = ProbeOrder(rng)
        self.table.on_new_member = self._order.add
        self.table.add_known(known_members, now)
        self._outbox: list[Outbound] = []
        self._seq = rng.randrange(1 << 32)
        self._probe: ProbeRound | None = None
        self._rtts = RoundTrips()
        self._relayed: dict[int, RelayedProbe] = {}
        self._seeds: tuple[str, ...] = ()
        self._joined = False
        self._next_probe = now + rng.uniform(0, config.probe_interval)
        self._next_gossip = now + rng.uniform(0, config.gossip_interval)
        n = self.table.live_count()
        self._next_push_pull = _phase(now, rng, config.push_pull_period(n))
        self._next_reconnect = _phase(now, rng, config.reconnect_interval)
        self._next_join = INF
        check = config.certificate_check_interval
        self._next_certificate_check = (
            now + check if check and self.table.checks_certificates else INF
        )

    # --- queries ---------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.table.local_id

    @property
    def local_member(self) -> Member:
        """This node's own entry (its incarnation, state record and status)."""
        return self.table.local

    @property
    def incarnation(self) -> int:
        """This node's current incarnation."""
        return self.table.local.incarnation

    @property
    def local_state(self) -> NodeState:
        """The state this node gossips about itself."""
        return self.table.local.record.state

    @property
    def joined(self) -> bool:
        """Whether a seed answered our join (always False before :meth:`join`)."""
        return self._joined

    @property
    def has_left(self) -> bool:
        """Whether :meth:`leave` was called."""
        return self.table.has_left

    @property
    def leave_announced(self) -> bool:
        """After :meth:`leave`: the LEFT news was sent its full number of times, or there is
        no live member to tell (nothing would ever send it)."""
        return self.table.leave_announced() or (self.has_left and not self.live_members())

    @property
    def health_score(self) -> int:
        """Lifeguard local health score (0 = healthy); timers scale by ``score + 1``."""
        return self.table.health.score

    def member(self, node_id: str) -> Member | None:
        """What this node knows about ``node_id`` (``local_member`` for itself)."""
        return self.table.local if node_id == self.node_id else self.table.get(node_id)

    def members(self) -> list[Member]:
        """Every member this node knows of, in any status, this node excluded."""
        return self.table.members()

    def live_members(self) -> list[Member]:
        """Alive and suspect members, this node excluded."""
        return [m for m in self.table.members() if m.is_live]

    def rtt(self, node_id: str) -> float | None:
        """The smoothed round trip of this node's probes to a live member, in seconds (None:
        not live, or no probe of it answered yet); see :class:`RoundTrips`."""
        member = self.table.get(node_id)
        return self._rtts.get(node_id) if member is not None and member.is_live else None

    def address_of(self, node_id: str) -> tuple[str, int, bytes] | None:
        """``(host, port, static_key)`` to dial ``node_id``, if known."""
        member = self.member(node_id)
        if member is None:
            return None
        state = member.state
        return (state.host, state.port, state.static_key)

    # --- outputs ---------------------------------------------------------------------------

    def drain_packets(self) -> list[Outbound]:
        """Packets to send, oldest first; the queue is emptied."""
        out, self._outbox = self._outbox, []
        return out

    def drain_events(self) -> list[MemberEvent]:
        """Membership events, oldest first; the queue is emptied."""
        out, self.table.events = self.table.events, []
        return out

    def next_deadline(self) -> float:
        """When :meth:`tick` must run next (``inf`` when nothing is scheduled)."""
        probe = self._probe
        deadlines = [self._next_gossip, self._next_join, self.table.reap_at]
        if not self.table.has_left:
            deadlines += [self._next_probe, self._next_push_pull, self._next_reconnect]
            deadlines.append(self._next_certificate_check)
        if probe is not None:
            deadlines.append(probe.round_deadline if probe.indirect_sent else probe.ack_deadline)
        if self._relayed:
            deadlines.append(min(r.nack_at for r in self._relayed.values()))
        deadlines.append(self.table.next_suspicion_deadline())
        return min(deadlines)

    # --- inputs: API -----------------------------------------------------------------------

    def join(self, seeds: Iterable[str], now: float) -> None:
        """Join through ``seeds`` (node ids the driver can reach): push-pull with each, retried
        every ``join_retry_interval`` until one answers."""
        self._seeds = tuple(s for s in seeds if s != self.node_id)
        self._joined = False
        self._next_join = now
        self._join_tick(now)

    def leave(self, now: float) -> None:
        """Leave gracefully: announce LEFT (also pushed at once to ``gossip_nodes`` members).
        Keep feeding the core until :attr:`leave_announced`, then stop it."""
        if self.table.has_left:
            return
        self.table.leave(now)
        self._probe = None
        self._next_join = INF
        self._gossip_tick(now)

    def update_local_state(self, state: NodeState, now: float) -> None:
        """Publish a new local state (next version), disseminated like any update.

        Raises :class:`LocalProtocolError` after :meth:`leave` or when the state is too large.
        """
        self.table.update_local_state(state, now)

    # --- inputs: packets -------------------------------------------------------------------

    def handle_packet(self, from_node: str, data: bytes, now: float) -> None:
        """Process one packet from the authenticated peer ``from_node``.

        Raises :class:`~meshinfer.proto.membership_wire.MembershipProtocolError` (a
        RemoteProtocolError) for a malformed packet; nothing of it is applied then.
        Impersonation attempts are dropped and counted, the rest of the packet is applied.
        Only the first ``config.max_packet_records()`` records are read (``packets_truncated``
        counts the longer packets), and a full table refuses new members (``members_refused``).
        """
        packet = decode_packet(data, self.config.max_packet_records())
        self.counters.packets_in += 1
        self.counters.bytes_in += len(data)
        self.counters.packets_truncated += packet.truncated
        header = packet.header
        if isinstance(header, PushPull):
            self._on_push_pull(from_node, header, packet.records, now)
            return
        if isinstance(header, Digest):
            self._on_digest(from_node, packet.entries, packet.truncated)
            return
        if isinstance(header, DigestReply):
            self._on_digest_reply(from_node, header, packet.records, now)
            return
        for record in packet.records:
            self.table.apply(record, now)
        self._send_corrections(from_node)
        if self.table.ask_evidence:  # see "Claims above this node's incarnation"
            self.table.ask_evidence = False
            self._anti_entropy(from_node)
        self._on_header(from_node, header, now)

    def _send_corrections(self, to_node: str) -> None:
        """Send the refutations of the stale claims just received back to their sender, in
        gossip packets within ``packet_budget`` each (one record alone may exceed it): one
        packet of them all could exceed one Noise message, which the sender would refuse."""
        corrections, self.table.corrections = self.table.corrections, []
        room = self.config.packet_budget - len(encode_header(Gossip()))
        chunk: list[bytes] = []
        size = 0
        for data in dict.fromkeys(corrections):
            if chunk and size + len(data) > room:
                self._send(to_node, Gossip(), first=chunk)
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        if chunk:
            self._send(to_node, Gossip(), first=chunk)

    def _on_header(self, sender: str, header: Header, now: float) -> None:
        if isinstance(header, Ping):
            if header.target != self.node_id:
                self.counters.misdirected_pings += 1
                return
            self._send(sender, Ack(header.seq))
        elif isinstance(header, Ack):
            self._on_ack(sender, header.seq, now)
        elif isinstance(header, PingReq):
            self._on_ping_req(sender, header, now)
        elif isinstance(header, Nack):
            probe = self._probe
            if probe is not None and probe.seq == header.seq and sender in probe.relays:
                probe.nacks.add(sender)

    def _on_ack(self, sender: str, seq: int, now: float) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            if not probe.acknowledges(sender):
                self.counters.impersonations_refused += 1
                return
            self._probe = None
            self.table.health.apply(-1)
            self._rtts.observe(probe.target, now - probe.sent_at)
            return
        relayed = self._relayed.get(seq)
        if relayed is None:
            self.counters.late_acks += 1
        elif relayed.target != sender:
            self.counters.impersonations_refused += 1
        else:
            del self._relayed[seq]
            self._send(relayed.requester, Ack(relayed.request_seq))

    def _on_ping_req(self, sender: str, request: PingReq, now: float) -> None:
        if request.target in (sender, self.node_id):
            return
        seq = self._next_seq()
        nack_at = now + self.config.nack_fraction * self.config.probe_timeout
        self._relayed[seq] = RelayedProbe(sender, request.seq, request.target, nack_at)
        self._send(request.target, Ping(seq, request.target))

    def _on_push_pull(
        self, sender: str, header: PushPull, records: tuple[Record, ...], now: float
    ) -> None:
        self.counters.push_pulls += 1
        incarnation = self.table.local.incarnation
        self.table.merge(records, now)
        self.table.corrections.clear()  # the table we send back (or sent) carries them
        self.table.ask_evidence = False  # the sender's table held all it knows about us
        if not header.response:
            self._send_table(sender, PushPull(join=header.join, response=True))
            return
        if self.table.local.incarnation != incarnation:  # the answer held a claim we refuted
            self._emit(sender, encode_packet(Gossip(), [self.table.local_bytes]))
        if header.join and sender in self._seeds:
            self._joined = True
            self._next_join = INF

    def _on_digest(self, sender: str, entries: tuple[DigestEntry, ...], truncated: bool) -> None:
        self.counters.digests += 1
        records, wants = self.table.reconcile(entries, truncated=truncated)
        self._emit(sender, encode_packet(DigestReply(tuple(wants)), records))

    def _on_digest_reply(
        self, sender: str, header: DigestReply, records: tuple[Record, ...], now: float
    ) -> None:
        self.table.merge(records, now)
        self.table.ask_evidence = False  # the reply held the sender's records about us
        corrections, self.table.corrections = self.table.corrections, []
        back = self.table.records_for(header.wants[: self.config.max_packet_records()])
        back += [data for data in dict.fromkeys(corrections) if data not in back]
        if back:
            self._emit(sender, encode_packet(PushPull(response=True), back))

    # --- inputs: timers --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        self._relay_tick(now)
        self._probe_round_tick(now)
        self.table.expire_suspicions(now)
        if not self.table.has_left:
            if now >= self._next_probe and self._probe is None:
                self._start_probe(now)
            if now >= self._next_push_pull:
                self._push_pull_tick(now)
            if now >= self._next_reconnect:
                self._reconnect_tick(now)
            if now >= self._next_certificate_check:
                self._next_certificate_check = now + self.config.certificate_check_interval
                self.table.expire_certificates(now)
        if now >= self._next_gossip:
            self._gossip_tick(now)
        if now >= self._next_join:
            self._join_tick(now)
        if now >= self.table.reap_at:
            self.table.reap(now)
            if len(self._rtts) > self.table.live_count():  # some member may be gone for good
                self._rtts.keep_only({m.node_id for m in self.table.members()})

    def _relay_tick(self, now: float) -> None:
        for seq in [s for s, r in self._relayed.items() if r.nack_at <= now]:
            relayed = self._relayed.pop(seq)
            self._send(relayed.requester, Nack(relayed.request_seq))

    def _start_probe(self, now: float) -> None:
        health, config = self.table.health, self.config
        self._next_probe = now + health.scale(config.probe_interval)
        target = self._order.next(self.table.is_probeable, self.table.live_ids)
        if target is None:
            return
        seq = self._next_seq()
        ack_deadline = now + health.scale(config.probe_timeout)
        self._probe = ProbeRound(seq, target, now, ack_deadline, self._next_probe)
        self.counters.probes += 1
        self._send(target, Ping(seq, target), first=self.table.suspicion_notice(target))

    def _probe_round_tick(self, now: float) -> None:
        probe = self._probe
        if probe is None:
            return
        if not probe.indirect_sent and now >= probe.ack_deadline:
            self._send_ping_reqs(probe)
        if now >= probe.round_deadline:
            self._probe = None
            self.counters.probe_failures += 1
            self.table.health.apply(probe.missed_nacks())
            self.table.suspect(probe.target, now)

    def _send_ping_reqs(self, probe: ProbeRound) -> None:
        probe.indirect_sent = True
        target = probe.target
        relays = self.table.sample(
            self.config.indirect_checks,
            lambda m: m.status is MemberStatus.ALIVE and m.node_id != target,
        )
        probe.relays = tuple(relays)
        self.counters.indirect_probes += len(relays)
        for relay in relays:
            self._send(relay, PingReq(probe.seq, target))
        # A second direct ping next to the relayed ones (memberlist's fallback probe): under
        # random loss, a lost ping or ack is far likelier than a dead target.
        self._send(target, Ping(probe.seq, target), first=self.table.suspicion_notice(target))

    def _gossip_tick(self, now: float) -> None:
        self._next_gossip = now + self.config.gossip_interval
        if not len(self.table.broadcasts):
            return
        dead_after = now - self.config.gossip_to_the_dead_time
        # While this node leaves, those that left just before it hear it too: a fleet stopping
        # at once would otherwise leave the first to go sending its LEFT, its full number of
        # times, to members already gone (they gossip only to the live).
        leaving = self.table.has_left
        targets = self.table.sample(
            self.config.gossip_nodes,
            lambda m: (
                m.is_live
                or (m.status is MemberStatus.DEAD and m.since > dead_after)
                or (leaving and m.status is MemberStatus.LEFT and m.since > dead_after)
            ),
        )
        for target in targets:
            if not self._send(target, Gossip(), require_records=True):
                break

    def _push_pull_tick(self, now: float) -> None:
        period = self.config.push_pull_period(self.table.live_count())
        self._next_push_pull = now + period
        targets = self.table.sample(1, lambda m: m.status is MemberStatus.ALIVE)
        if targets:
            self._anti_entropy(targets[0])

    def _reconnect_tick(self, now: float) -> None:
        self._next_reconnect = now + self.config.reconnect_interval
        targets = self.table.sample(1, lambda m: m.status is MemberStatus.DEAD)
        if targets:
            self._anti_entropy(targets[0])

    def _anti_entropy(self, to_node: str) -> None:
        if self.config.push_pull_digests:
            self._emit(to_node, encode_packet(Digest(), self.table.digest()))
        else:
            self._send_table(to_node, PushPull())

    def _join_tick(self, now: float) -> None:
        if self._joined or not self._seeds or self.table.has_left:
            self._next_join = INF
            return
        self._next_join = now + self.config.join_retry_interval
        for seed in self._seeds:
            self._send_table(seed, PushPull(join=True))

    # --- sending ---------------------------------------------------------------------------

    def _send(
        self,
        to_node: str,
        header: Header,
        *,
        require_records: bool = False,
        first: list[bytes] | None = None,
    ) -> bool:
        """Send ``header`` with ``first`` records, then queued updates up to the budget."""
        head = encode_header(header)
        records = first or []
        room = self.config.packet_budget - len(head)
        left = room - sum(len(r) for r in records)
        limit = self.table.retransmit_limit()
        records += self.table.broadcasts.take(left, limit, packet_room=room)
        if require_records and not records:
            return False
        self._emit(to_node, head + b"".join(records))
        return True

    def _send_table(self, to_node: str, header: PushPull) -> None:
        self._emit(to_node, encode_packet(header, self.table.encoded_table()))

    def _emit(self, to_node: str, data: bytes) -> None:
        self.counters.packets_out += 1
        self.counters.bytes_out += len(data)
        self._outbox.append(Outbound(to_node, data))

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & ((1 << 63) - 1)
        return self._seq


def _phase(now: float, rng: random.Random, interval: float) -> float:
    """First run of a periodic task: a random phase within its interval (inf if disabled)."""
    return now + rng.uniform(0, interval) if interval > 0 else INF
