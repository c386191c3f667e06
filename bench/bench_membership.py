"""SWIM/Lifeguard membership on the virtual network: dissemination, detection, false deaths, load.

Run: ``python bench/bench_membership.py [--quick] [--seed 1] [--records unsigned signed]
[--anti-entropy whole digest]``.

Every scenario starts a converged fleet of N nodes (LAN preset: 1 s probes, gossip every 200 ms
to 3 nodes) on :class:`~meshinfer.testing.virtual_network.VirtualNetwork` with 1-5 ms latency
and the given random packet loss, then measures, in virtual time:

(a) *dissemination*: a new node joins; time from the first node knowing of it until 99.9 % of the
    fleet does (median of several joins), next to the epidemic model's prediction (the baseline):
    the smallest integer x with ``1 / (1 + (N+1) e^(-(fanout/2)(1-loss)x)) >= 0.999``, times the
    gossip interval; the ratio is measured / model.
(b) *detection*: several nodes crash at once; for every (crashed node, live observer) pair the
    time until the observer declares it dead: median and p99 (and the median of the first
    declaration of each crash).
(c) *false deaths*: 10 simulated minutes at 10 % loss with no crash, counting DEAD events
    (goal 0). N = 50 and 200 only: N = 1000 would take about ten minutes of CPU.
(d) *load*: packets and bytes sent per node per second over a quiet window (no joins, no
    crashes; at 10 % loss the window still has the suspicions and refutations loss causes), the
    share of push-pull anti-entropy in the bytes ("pp%") and the bytes without it ("B-pp").
    ``--anti-entropy whole digest`` runs each row with both anti-entropy exchanges (whole tables,
    the baseline, and digests first), in the same run.

The printed "wall" column is the CPU time the simulation took in this process.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace

from meshinfer.percentiles import nearest_rank
from meshinfer.proto.identity import FleetAuthority
from meshinfer.proto.membership import MemberEventKind, MembershipConfig
from meshinfer.proto.membership_auth import CertifiedRecordAuthenticator
from meshinfer.proto.membership_wire import PacketKind
from meshinfer.testing.fleet import ThrowawayFleet
from meshinfer.testing.virtual_network import MembershipCluster

TARGET = 0.999
ANTI_ENTROPY = (PacketKind.PUSH_PULL, PacketKind.DIGEST, PacketKind.DIGEST_REPLY)


def model_seconds(n: int, fanout: int, loss: float, interval: float) -> float:
    """Epidemic model: rounds until ``TARGET`` of n nodes know, times the gossip interval."""
    rounds = 0
    while 1 / (1 + (n + 1) * math.exp(-(fanout / 2) * (1 - loss) * rounds)) < TARGET:
        rounds += 1
    return rounds * interval


@dataclass
class Row:
    n: int
    loss: float
    spread: float
    model: float
    detect_median: float
    detect_p99: float
    first_median: float
    packets: float
    bytes: float
    push_pull_share: float
    wall: float


class FleetSigners:
    """Each simulated node's record authenticator, enrolled in one throw-away fleet on demand
    (what node daemons run: certificate + XEdDSA proofs, checked with the fleet's trust; without
    the daemon's revocation look and wall-clock validity check, which virtual time has no use
    for: ``bench_signed_records.py`` times those)."""

    def __init__(self) -> None:
        self.fleet = ThrowawayFleet(FleetAuthority.create("bench-fleet"))
        self.signers: dict[str, CertifiedRecordAuthenticator] = {}

    def __call__(self, node_id: str) -> CertifiedRecordAuthenticator:
        if node_id not in self.signers:
            identity = self.fleet.enroll(node_id)
            self.signers[node_id] = CertifiedRecordAuthenticator(
                identity.certificate,
                identity.static_private,
                identity.trust,
                random_bytes=os.urandom,
            )
        return self.signers[node_id]


class Scenario:
    """One fleet: warm start, quiet window, joins, crashes."""

    def __init__(
        self, n: int, loss: float, seed: int, signed: bool = False, digests: bool = True
    ) -> None:
        self.config = replace(MembershipConfig.lan(), push_pull_digests=digests)
        self.n = n
        signers = FleetSigners() if signed else None
        self.cluster = MembershipCluster(
            self.config, seed=seed, loss=loss, keep_log=False, authenticator_for=signers
        )
        self.known: dict[str, dict[str, float]] = {}  # subject -> observer -> first JOINED
        self.dead: dict[str, dict[str, float]] = {}  # subject -> observer -> first DEAD
        self.sent = {"packets": 0, "bytes": 0, "push_pull": 0}
        self.cluster.hooks.append(self._on_event)
        self.cluster.network.on_send = self._on_send

    def _on_event(self, at: float, observer: str, event) -> None:
        subject = event.member.node_id
        if event.kind is MemberEventKind.JOINED and subject in self.known:
            self.known[subject].setdefault(observer, at)
        elif event.kind is MemberEventKind.DEAD and subject in self.dead:
            self.dead[subject].setdefault(observer, at)

    def _on_send(self, src: str, dst: str, data: bytes) -> None:
        self.sent["packets"] += 1
        self.sent["bytes"] += len(data)
        if data[2] in ANTI_ENTROPY:
            self.sent["push_pull"] += len(data)

    def load(self, window: float) -> tuple[float, float, float]:
        """Packets and bytes per node per second, and the push-pull byte share, over a window."""
        before = dict(self.sent)
        self.cluster.run_for(window)
        packets, size, push_pull = (
            self.sent[k] - before[k] for k in ("packets", "bytes", "push_pull")
        )
        return packets / self.n / window, size / self.n / window, push_pull / max(1, size)

    def spread(self, joins: int) -> list[float]:
        """Seconds from the first node knowing of a new member until 99.9 % know, per join."""
        cluster, times = self.cluster, []
        for index in range(joins):
            subject = f"joiner{index}"
            self.known[subject] = {}
            seed = cluster.rng.choice(cluster.up())
            cluster.start_node(subject, seeds=[seed])
            need = math.ceil(TARGET * (len(cluster.up()) - 1))
            cluster.run_until(
                lambda s=subject, k=need: len(self.known[s]) >= k, timeout=60, step=0.05
            )
            firsts = sorted(self.known[subject].values())
            times.append(firsts[need - 1] - firsts[0] if len(firsts) >= need else math.inf)
            cluster.run_for(5.0)  # let the queues drain before the next join
        return times

    def detect(self, crashes: int) -> tuple[list[float], list[float]]:
        """Crash ``crashes`` nodes at once: all (crash, observer) detection times, and the first
        declaration time of each crash."""
        cluster = self.cluster
        victims = cluster.rng.sample([n for n in cluster.up() if n.startswith("n")], crashes)
        for victim in victims:
            self.dead[victim] = {}
            cluster.crash(victim)
        start = cluster.now
        live = set(cluster.up())
        done = lambda: all(live <= set(self.dead[v]) for v in victims)  # noqa: E731
        cluster.run_until(done, timeout=180, step=0.5)
        pairs = [at - start for v in victims for o, at in self.dead[v].items() if o in live]
        missing = sum(len(live - set(self.dead[v])) for v in victims)
        pairs += [math.inf] * missing
        firsts = [min(self.dead[v].values(), default=math.inf) - start for v in victims]
        return pairs, firsts


def run_scenario(
    n: int, loss: float, seed: int, quick: bool, signed: bool = False, digests: bool = True
) -> Row:
    started = time.process_time()
    scenario = Scenario(n, loss, seed, signed, digests)
    scenario.cluster.warm_start(n)
    scenario.cluster.run_for(2.0)
    packets, size, share = scenario.load(10.0 if quick else 20.0)
    spreads = scenario.spread(2 if quick else 3)
    pairs, firsts = scenario.detect(3 if n <= 50 else 5)
    config = scenario.config
    return Row(
        n,
        loss,
        statistics.median(spreads),
        model_seconds(n, config.gossip_nodes, loss, config.gossip_interval),
        statistics.median(pairs),
        nearest_rank(pairs, 99),
        statistics.median(firsts),
        packets,
        size,
        share,
        time.process_time() - started,
    )


def false_deaths(n: int, minutes: float, seed: int) -> tuple[int, int, int, float]:
    """DEAD events, suspicions and refutations in ``minutes`` at 10 % loss without crashes."""
    started = time.process_time()
    cluster = MembershipCluster(MembershipConfig.lan(), seed=seed, loss=0.1, keep_log=False)
    deaths = [0]

    def on_event(at: float, observer: str, event) -> None:
        deaths[0] += event.kind is MemberEventKind.DEAD

    cluster.hooks.append(on_event)
    ids = cluster.warm_start(n)
    cluster.run_for(minutes * 60)
    cores = [cluster.membership(i) for i in ids]
    suspicions = sum(c.counters.suspicions for c in cores)
    refutations = sum(c.counters.refutations for c in cores)
    return deaths[0], suspicions, refutations, time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 50, 200 and shorter runs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--records",
        nargs="+",
        choices=("unsigned", "signed"),
        default=["unsigned"],
        help="run (a), (b) and (d) with these records; signed: as node daemons (certificate +"
        " XEdDSA proof, ~2.5x the bytes), compared with unsigned when both are given",
    )
    parser.add_argument(
        "--anti-entropy",
        nargs="+",
        choices=("whole", "digest"),
        default=["digest"],
        help="push-pull exchanges: digest (the default: a digest, then only the records that "
        "differ) and/or whole (both tables in full), compared when both are given",
    )
    args = parser.parse_args()
    sizes = (50, 200) if args.quick else (50, 200, 1000)
    total = time.process_time()
    print(f"# {' '.join(sys.argv)}  (LAN preset, gossip 200 ms, fanout 3, latency 1-5 ms)")
    header = (
        f"{'N':>5} {'loss':>5} {'records':>8} {'a-e':>6} | "
        f"{'spread':>7} {'model':>6} {'ratio':>6} | "
        f"{'det.med':>7} {'det.p99':>7} {'first':>6} | {'pkt/n/s':>7} {'B/n/s':>7} {'pp%':>5} "
        f"{'B-pp':>6} | {'wall':>6}"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        rows = [(lo, r, a) for lo in (0.0, 0.1) for r in args.records for a in args.anti_entropy]
        for loss, records, exchange in rows:
            r = run_scenario(
                n, loss, args.seed, args.quick, records == "signed", exchange == "digest"
            )
            print(
                f"{r.n:>5} {r.loss:>5.0%} {records:>8} {exchange:>6} | "
                f"{r.spread:>6.2f}s {r.model:>5.2f}s "
                f"{r.spread / r.model:>6.2f} | {r.detect_median:>6.2f}s {r.detect_p99:>6.2f}s "
                f"{r.first_median:>5.2f}s | {r.packets:>7.2f} {r.bytes:>7.0f} "
                f"{r.push_pull_share:>5.0%} {r.bytes * (1 - r.push_pull_share):>6.0f} | "
                f"{r.wall:>5.1f}s",
                flush=True,
            )
    minutes = 2.0 if args.quick else 10.0
    print(f"\n(c) false deaths over {minutes:g} simulated minutes at 10% loss, no crashes")
    print(f"{'N':>5} | {'deaths':>6} {'suspicions':>10} {'refutations':>11} | {'wall':>6}")
    for n in (50, 200):
        deaths, suspicions, refutations, wall = false_deaths(n, minutes, args.seed)
        print(
            f"{n:>5} | {deaths:>6} {suspicions:>10} {refutations:>11} | {wall:>5.1f}s", flush=True
        )
    print(f"\ntotal CPU {time.process_time() - total:.1f}s")


if __name__ == "__main__":
    main()
