"""Configuration of the SWIM/Lifeguard membership core, with presets and the derived formulas.

One frozen :class:`MembershipConfig` per node. Three presets:

* :meth:`MembershipConfig.lan` -- wired or Wi-Fi LAN, the defaults of the literature (memberlist's
  LAN profile): 1 s probes, 200 ms gossip to 3 nodes, 30 s push-pull.
* :meth:`MembershipConfig.v2v` -- lossy, short-lived vehicle-to-vehicle radio: a tighter probe
  timeout (radio round trips are a few ms, a reply that is late is usually lost), longer
  suspicion (loss causes many failed probes that must be refuted before they turn into deaths),
  more retransmissions and more frequent anti-entropy.
* :meth:`MembershipConfig.test` -- fast timers for unit tests under a virtual clock.

The formulas that scale with the cluster size ``n`` (live members, this node included) are
methods here so the core, the tests and the benchmark share one definition.

``max_members`` bounds the table. ALIVE records are relayed self-claims, so one hostile member
(it holds a fleet certificate) could otherwise invent members without end: a single push-pull of
~130,000 made-up records once held the event loop for ~4 s and left them all to be probed. A
vehicle fleet's size is known in advance, so the cap sits well above it; every preset keeps the
default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from meshinfer.errors import ConfigError
from meshinfer.proto.membership_wire import MAX_PACKET_BYTES, MAX_RECORDS

#: The largest ``max_members``: a whole table must fit in one decodable packet.
MAX_MEMBERS = MAX_RECORDS // 2

#: Below this many nodes push-pull runs at the configured interval; above it the interval grows
#: with log2(n / threshold) so the anti-entropy traffic per node stays bounded.
PUSH_PULL_SCALE_THRESHOLD = 32


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """Timers and limits of one membership core. All durations are seconds.

    Read every field's comment for its default and the formula it feeds. Each field must hold
    its declared type (an ``int`` field an integer, a ``float`` one a finite number), else
    :class:`~meshinfer.errors.ConfigError`.
    """

    #: Period of the failure detector: every ``probe_interval`` (times the local health
    #: multiplier, see ``awareness_max_multiplier``) a node pings the next member of a shuffled
    #: round robin. Detection of a crash takes about one interval plus the suspicion timeout.
    probe_interval: float = 1.0
    #: How long to wait for the direct ack before asking ``indirect_checks`` others to ping the
    #: target. Must fit twice into ``probe_interval``: the indirect probes need the rest of the
    #: interval. Set it to the 99th percentile of the round-trip time.
    probe_timeout: float = 0.5
    #: k of SWIM: how many members relay a ping-req when the direct probe timed out. More relays
    #: make a false suspicion less likely under loss (failure odds ~ p_direct * p_relay**k).
    indirect_checks: int = 3
    #: Suspicion timeout base: ``min = suspicion_mult * max(1, log10(n)) * probe_interval``.
    #: Also sets how many independent confirmations shrink it: ``k = suspicion_mult - 2``.
    suspicion_mult: int = 4
    #: Lifeguard: a fresh suspicion starts at ``max = suspicion_max_timeout_mult * min`` and
    #: shrinks towards ``min`` as independent confirmations ``C`` arrive:
    #: ``timeout = max(min, max - (max - min) * log(C + 1) / log(k + 1))``.
    suspicion_max_timeout_mult: int = 6
    #: Each broadcast update is sent ``retransmit_mult * ceil(log10(n + 1))`` times (piggybacked
    #: or gossiped) before it leaves the queue; enough for an epidemic to reach every node whp.
    retransmit_mult: int = 4
    #: Period of the gossip round: every ``gossip_interval`` a node with queued updates sends them
    #: to ``gossip_nodes`` random members (nothing is sent when the queue is empty).
    gossip_interval: float = 0.2
    #: Gossip fanout per round. The epidemic reaches all n nodes in about
    #: ``log(n) / (fanout / 2 * (1 - loss))`` rounds.
    gossip_nodes: int = 3
    #: Dead (not left) members still receive gossip for this long, so a falsely declared node
    #: hears of its death and refutes it.
    gossip_to_the_dead_time: float = 30.0
    #: Period of full-state anti-entropy with one random member. Above 32 nodes it is multiplied
    #: by ``ceil(log2(n) - log2(32)) + 1`` (see :meth:`push_pull_period`). 0 disables it.
    push_pull_interval: float = 30.0
    #: Anti-entropy (push-pull and reconnect) starts with a digest of the table, a few bytes
    #: per member, and then sends only the records the two sides hold differently (three
    #: packets instead of two whole tables). False sends whole tables, for a fleet that still
    #: has nodes that do not know digest packets (they refuse and count them). Joins always
    #: send whole tables. The daemons' TOML key: ``[membership] push_pull_digests``.
    push_pull_digests: bool = True
    #: Period of reconnect attempts: a push-pull with one random dead (not left) member, so the
    #: two halves of a healed partition find each other again. 0 disables it.
    reconnect_interval: float = 10.0
    #: Period of join retries while no seed has answered our join.
    join_retry_interval: float = 1.0
    #: Byte budget of one packet (ping, ack, gossip...). Piggybacked updates are packed up to it;
    #: 1400 fits an Ethernet/802.11 MTU after IP/UDP/Noise overhead. At most one Noise message
    #: (65535 bytes): receivers refuse a longer packet.
    packet_budget: int = 1400
    #: Lifeguard local health: a node that misses acks and nacks (its own links or CPU are the
    #: problem) scales its probe interval and timeout by ``score + 1``, up to this multiplier.
    awareness_max_multiplier: int = 8
    #: A dead or left member is forgotten this long after its death (the FORGOTTEN event); after
    #: that its node id may come back with any incarnation. Must be >= gossip_to_the_dead_time.
    dead_node_reclaim_time: float = 120.0
    #: A relay sends a nack when the target has not acked within this fraction of probe_timeout.
    nack_fraction: float = 0.8
    #: With signed records whose certificates expire (the daemons'), every this many seconds a
    #: node looks again at the certificate proving each live member's newest record, and
    #: declares dead those expired beyond the clock skew: such a member can sign no record
    #: anyone takes, and its record would otherwise be held and relayed at its last version for
    #: ever, refused by every node that lacks it. A certificate expires at one instant for the
    #: whole fleet, so every node reaches the same verdict within this period (give or take the
    #: difference of their clocks). 0 never looks.
    certificate_check_interval: float = 10.0
    #: Most members one table holds, this node included, in any status (the dead and left until
    #: they are forgotten). ALIVE records of node ids not in a full table are refused and counted
    #: (``members_refused``); known members are never evicted for them, and forgetting the dead
    #: frees room. Set it well above the fleet, the same on every node: a packet is read up to
    #: :meth:`max_packet_records` records. At 4096 a full table holds ~6 MB, and the longest
    #: packet read (8192 records) costs ~0.1 s of CPU: ~10 us a record to decode, ~10 us more
    #: per new member (a push-pull of 130,000 made-up members took ~4 s before the cap).
    #: The daemons' TOML key: ``[membership] max_members``.
    max_members: int = 4096

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            _check_type(item.name, item.type, value)
            if value < 0 or (value == 0 and item.name not in _MAY_BE_ZERO):
                raise ConfigError(f"membership.{item.name} must be positive, got {value!r}")
        if 2 * self.probe_timeout > self.probe_interval:
            raise ConfigError("membership.probe_timeout must be at most half of probe_interval")
        if self.suspicion_mult < 2 or self.nack_fraction >= 1:
            raise ConfigError("membership.suspicion_mult must be >= 2 and nack_fraction < 1")
        if self.dead_node_reclaim_time < self.gossip_to_the_dead_time:
            raise ConfigError("membership.dead_node_reclaim_time < gossip_to_the_dead_time")
        if not 256 <= self.packet_budget <= MAX_PACKET_BYTES:  # a longer packet is refused
            raise ConfigError(f"membership.packet_budget must be in 256..{MAX_PACKET_BYTES} bytes")
        if not 2 <= self.max_members <= MAX_MEMBERS:
            raise ConfigError(f"membership.max_members must be in 2..{MAX_MEMBERS}")

    # --- presets --------------------------------------------------------------------------

    @classmethod
    def lan(cls) -> MembershipConfig:
        """Wired/Wi-Fi LAN: the classic SWIM/Lifeguard defaults (memberlist's LAN profile)."""
        return cls()

    @classmethod
    def v2v(cls) -> MembershipConfig:
        """Vehicle-to-vehicle radio: lossy, short round trips, frequent repair."""
        return cls(
            probe_timeout=0.3,
            suspicion_mult=5,
            retransmit_mult=5,
            push_pull_interval=15.0,
            reconnect_interval=5.0,
            gossip_to_the_dead_time=15.0,
            dead_node_reclaim_time=60.0,
        )

    @classmethod
    def test(cls) -> MembershipConfig:
        """Fast timers for tests on a virtual clock (detection in a few seconds)."""
        return cls(
            probe_interval=0.5,
            probe_timeout=0.2,
            suspicion_mult=3,
            suspicion_max_timeout_mult=4,
            retransmit_mult=3,
            gossip_interval=0.1,
            push_pull_interval=5.0,
            reconnect_interval=2.0,
            join_retry_interval=0.5,
            gossip_to_the_dead_time=10.0,
            dead_node_reclaim_time=60.0,
        )

    # --- derived formulas -----------------------------------------------------------------

    def retransmit_limit(self, n: int) -> int:
        """How many times one update is sent: ``retransmit_mult * ceil(log10(n + 1))``."""
        return self.retransmit_mult * math.ceil(math.log10(max(1, n) + 1))

    def suspicion_min_timeout(self, n: int) -> float:
        """``suspicion_mult * max(1, log10(n)) * probe_interval``."""
        return self.suspicion_mult * max(1.0, math.log10(max(1, n))) * self.probe_interval

    def suspicion_max_timeout(self, n: int) -> float:
        """``suspicion_max_timeout_mult * suspicion_min_timeout(n)``."""
        return self.suspicion_max_timeout_mult * self.suspicion_min_timeout(n)

    def suspicion_confirmations(self, n: int) -> int:
        """k: independent confirmations expected: ``suspicion_mult - 2``, 0 if n is too small."""
        k = self.suspicion_mult - 2
        return 0 if n - 2 < k else k

    def max_packet_records(self) -> int:
        """Records read from one packet: ``2 * max_members``, a whole table at the cap (each
        member's ALIVE record plus a status record when it is not alive), so an honest node joins
        a full fleet with one push-pull; the rest of a longer packet is dropped unread."""
        return 2 * self.max_members

    def push_pull_period(self, n: int) -> float:
        """``push_pull_interval``, times ``ceil(log2(n) - log2(32)) + 1`` above 32 nodes."""
        if n <= PUSH_PULL_SCALE_THRESHOLD:
            return self.push_pull_interval
        multiplier = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
        return self.push_pull_interval * multiplier


def _check_type(name: str, annotation: object, value: object) -> None:
    """A field's value must be of its declared type: a bool for ``bool`` fields, an int (not a
    bool) for ``int`` ones, and a finite int or float for ``float`` ones (a NaN passes every
    comparison the checks make, and an infinite timer or reclaim time never fires)."""
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        what = {"bool": "true or false", "int": "an integer"}.get(kind, "a finite number")
        raise ConfigError(f"membership.{name} must be {what}, got {value!r}")


_MAY_BE_ZERO = frozenset(
    {
        "indirect_checks",
        "push_pull_interval",
        "reconnect_interval",
        "nack_fraction",
        "push_pull_digests",
        "certificate_check_interval",
    }
)
