"""Membership scenarios: the project's real SWIM/Lifeguard cores on the virtual network.

A :class:`MembershipScenario` runs :class:`~meshinfer.proto.membership.Membership` cores as a
:class:`~meshinfer.testing.virtual_network.MembershipCluster` in virtual time (nothing sleeps),
in four phases:

1. *warm start* -- ``nodes`` nodes that already know each other (a converged fleet), then
   ``settle`` seconds so their probe and gossip timers run at their random phases;
2. *joins* -- ``joins`` new nodes join one after another, each through a random running node.
   The next join starts once 99.9 % of the other running nodes know the previous joiner (or
   ``join_timeout`` seconds passed). A join's *dissemination time* runs from the join call to
   the JOINED event of the ``ceil(0.999 * others)``-th running node;
3. *crashes* -- ``crashes`` random running nodes (founders or joiners) stop at one instant;
4. *observation* -- the fleet runs ``duration`` more seconds. For every crash: the time to the
   first DEAD declaration by any node, and until every running node had declared it DEAD (one
   that held it DEAD already, from a false death not refuted by then, counts from the crash).

Over the whole run a DEAD declaration about a node that is running is a *false death*; the load
is every packet the cores sent divided by the node-seconds of uptime. All randomness comes from
generators seeded by ``seed``, so a scenario gives the same :class:`MembershipReport` every time
(only its ``cpu_seconds`` and ``wall_seconds`` differ). The scenario's own draws (seed nodes,
victims), the cores' generators and the network's loss and latency draws are separate streams:
scenarios that differ only in loss or latency start the same cores and crash the same victims
(common random numbers), so comparing them does not add the variance of unrelated draws.

Figures are rounded half up (a tie away from zero) on their shortest decimal form, the JSON to 6
decimals and the table the JSON's figures further: 12.75 s shows as 12.8 and 0.125 s as 0.13
(Python's ``round`` and ``format`` round a tie to even and work on the binary value).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any

from meshinfer.errors import ConfigError
from meshinfer.percentiles import nearest_rank
from meshinfer.proto.membership import (
    Member,
    MemberEvent,
    MemberEventKind,
    MembershipConfig,
    MemberStatus,
)
from meshinfer.testing.virtual_network import MembershipCluster

#: Membership presets a scenario may name.
PRESETS: dict[str, Callable[[], MembershipConfig]] = {
    "lan": MembershipConfig.lan,
    "v2v": MembershipConfig.v2v,
    "test": MembershipConfig.test,
}
#: Share of the other running nodes that must know a joiner for its dissemination to count.
DISSEMINATION_TARGET = 0.999
MAX_NODES = 2000
MAX_JOINS = 500
MAX_LOSS = 0.5
MAX_LATENCY = 10.0
MAX_DURATION = 86_400.0
#: Largest seed: the JSON echoes it, and JSON readers keep 64-bit integers at best (and Python
#: itself reads no integer of more than 4300 digits).
MAX_SEED = 2**64 - 1
#: Cap on the size of one run in node-seconds of simulated uptime, as :func:`run_size` estimates
#: it. Without loss a CPU second simulates about 5,000 node-seconds in a fleet of 2000 and 20,000
#: in one of 50, so the cap keeps a run within about 5 to 15 CPU minutes; heavy loss costs more
#: (at 50 % loss about 700 node-seconds per CPU second). 2000 nodes for one simulated day would
#: be 173 million node-seconds: ten hours or more.
MAX_NODE_SECONDS = 5_000_000
#: What a run at the cap costs, as the CLI's help and its refusal say it.
CAP_COST = "5 to 15 CPU minutes without loss"
#: Seconds :func:`run_size` counts for each join (one spreads in about a second without loss).
JOIN_ESTIMATE = 1.0
#: Default seconds a warm-started fleet runs before the joins, for its timers to reach their phases.
SETTLE = 2.0
#: Granularity (virtual seconds) at which a join phase checks whether it is done.
JOIN_POLL = 0.05


@dataclass(frozen=True, slots=True)
class MembershipScenario:
    """One membership run. Durations and latencies are (virtual) seconds."""

    nodes: int
    preset: str = "lan"
    loss: float = 0.0  # probability that one packet is dropped
    latency: tuple[float, float] = (0.001, 0.005)  # one-way delay, uniform in [low, high]
    crashes: int = 0
    joins: int = 0
    duration: float = 60.0  # observation time after the crashes
    seed: int = 1
    settle: float = SETTLE
    join_timeout: float = 60.0

    def __post_init__(self) -> None:
        counts = (self.nodes, self.crashes, self.joins, self.seed)
        _check(
            all(isinstance(n, int) and not isinstance(n, bool) for n in counts),
            "nodes/crashes/joins/seed",
            "integers",
            counts,
        )
        # random.Random(-n) draws what random.Random(n) does: two seeds, one run
        _check(0 <= self.seed <= MAX_SEED, "seed", "from 0 to 2**64 - 1", self.seed)
        _check(2 <= self.nodes <= MAX_NODES, "nodes", f"from 2 to {MAX_NODES}", self.nodes)
        _check(self.preset in PRESETS, "preset", f"one of {', '.join(PRESETS)}", self.preset)
        _check(0 <= self.loss <= MAX_LOSS, "loss", f"from 0 to {MAX_LOSS}", self.loss)
        low, high = self.latency
        _check(0 <= low <= high <= MAX_LATENCY, "latency", "0 <= low <= high <= 10", self.latency)
        _check(0 <= self.joins <= MAX_JOINS, "joins", f"from 0 to {MAX_JOINS}", self.joins)
        most = self.nodes + self.joins - 1
        _check(
            0 <= self.crashes <= most,
            "crashes",
            f"from 0 to nodes + joins - 1 = {most}",
            self.crashes,
        )
        _check(0 < self.duration <= MAX_DURATION, "duration", "in (0, 86400]", self.duration)
        _check(
            0 <= self.settle < math.inf and 0 < self.join_timeout < math.inf,
            "settle/join_timeout",
            "finite, settle >= 0 and join_timeout > 0",
            (self.settle, self.join_timeout),
        )
        size = run_size(self.nodes, self.joins, self.duration, self.settle)
        _check(size <= MAX_NODE_SECONDS, "size", f"at most {MAX_NODE_SECONDS:,} node-seconds", size)

    @property
    def config(self) -> MembershipConfig:
        """The membership configuration of every node (the named preset)."""
        return PRESETS[self.preset]()


def run_size(nodes: int, joins: int, duration: float, settle: float = SETTLE) -> float:
    """Estimated node-seconds of a run, ``(nodes + joins) * (settle + joins + duration)`` (each
    join counted as :data:`JOIN_ESTIMATE` seconds); :data:`MAX_NODE_SECONDS` caps it."""
    return (nodes + joins) * (settle + joins * JOIN_ESTIMATE + duration)


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"scenario {name} must be {expected}, got {_shown(value)}")


def _shown(value: object) -> str:
    """``repr(value)``, cut short: an integer of thousands of digits has no repr (ValueError)."""
    try:
        text = repr(value)
    except ValueError:
        return "an integer of more than 4300 digits"
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


@dataclass(frozen=True, slots=True)
class JoinOutcome:
    """How one join spread. ``seconds`` is None when 99.9 % was not reached in time."""

    node: str
    seconds: float | None
    known_by: int  # running nodes that knew the joiner when its phase ended
    others: int  # running nodes other than the joiner


@dataclass(frozen=True, slots=True)
class CrashOutcome:
    """How one crash was detected, in seconds after it; None when it did not happen in time."""

    node: str
    first_dead: float | None
    all_live: float | None
    known_by: int  # running nodes that declared it DEAD by the end
    observers: int  # running nodes after the crashes


@dataclass(frozen=True, slots=True)
class MembershipReport:
    """Everything one scenario measured."""

    scenario: MembershipScenario
    simulated: float  # virtual seconds, all phases
    join_phase: float
    joins: tuple[JoinOutcome, ...]
    crashes: tuple[CrashOutcome, ...]
    false_deaths: int  # DEAD events (one per observer) about running nodes
    falsely_dead_nodes: int
    live_suspicions: int  # SUSPECT events (one per observer) about running nodes
    suspected_nodes: int
    packets: int
    bytes: int
    lost: int  # packets dropped by the random loss
    node_seconds: float
    cpu_seconds: float
    wall_seconds: float

    @property
    def packets_per_node_second(self) -> float:
        """Packets sent per running node per virtual second."""
        return self.packets / self.node_seconds

    @property
    def bytes_per_node_second(self) -> float:
        """Bytes sent per running node per virtual second."""
        return self.bytes / self.node_seconds

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready document (None for a figure that never happened)."""
        return report_document(self)


# --- observing the fleet -----------------------------------------------------------------------


@dataclass
class FleetWatch:
    """Collects, from the cluster's event hook, what the report needs."""

    is_up: Callable[[str], bool]
    joined: dict[str, dict[str, float]] = field(default_factory=dict)  # joiner -> observer -> at
    dead: dict[str, dict[str, float]] = field(default_factory=dict)  # victim -> observer -> at
    false_deaths: int = 0
    falsely_dead: set[str] = field(default_factory=set)
    live_suspicions: int = 0
    suspected: set[str] = field(default_factory=set)
    up_since: dict[str, float] = field(default_factory=dict)
    node_seconds: float = 0.0

    def on_event(self, at: float, observer: str, event: MemberEvent) -> None:
        """The :class:`MembershipCluster` hook: one membership event seen by ``observer``."""
        subject, kind = event.member.node_id, event.kind
        if kind is MemberEventKind.JOINED and subject in self.joined:
            self.joined[subject].setdefault(observer, at)
        elif kind is MemberEventKind.DEAD and subject in self.dead:
            self.dead[subject].setdefault(observer, at)
        elif kind is MemberEventKind.DEAD and self.is_up(subject):
            self.false_deaths += 1
            self.falsely_dead.add(subject)
        elif kind is MemberEventKind.SUSPECT and self.is_up(subject):
            self.live_suspicions += 1
            self.suspected.add(subject)

    def started(self, node_id: str, at: float) -> None:
        """``node_id`` runs from ``at``."""
        self.up_since[node_id] = at

    def stopped(self, node_id: str, at: float) -> None:
        """``node_id`` stopped at ``at``."""
        self.node_seconds += at - self.up_since.pop(node_id)

    def uptime(self, now: float) -> float:
        """Node-seconds of uptime until ``now``."""
        return self.node_seconds + sum(now - since for since in self.up_since.values())


class MembershipRun:
    """One scenario being played: the cluster, its watch and the scenario's own random draws."""

    def __init__(self, scenario: MembershipScenario) -> None:
        self.scenario = scenario
        self.cluster = MembershipCluster(
            scenario.config,
            seed=scenario.seed,
            loss=scenario.loss,
            latency=scenario.latency,
            keep_log=False,
        )
        self.rng = random.Random(f"meshinfer-sim/membership/{scenario.seed}")
        self.watch = FleetWatch(self.cluster.network.is_up)
        self.cluster.hooks.append(self.watch.on_event)

    def warm_start(self) -> None:
        """Start the converged fleet and let it settle."""
        for node_id in self.cluster.warm_start(self.scenario.nodes):
            self.watch.started(node_id, self.cluster.now)
        self.cluster.run_for(self.scenario.settle)

    def join(self, index: int) -> JoinOutcome:
        """One new node joins through a random running node; wait until 99.9 % know it."""
        cluster, subject = self.cluster, f"j{index:04d}"
        others = len(cluster.up())
        need = math.ceil(DISSEMINATION_TARGET * others)
        seed_node = self.rng.choice(sorted(cluster.up()))
        known = self.watch.joined.setdefault(subject, {})
        start = cluster.now
        cluster.start_node(subject, seeds=[seed_node])
        self.watch.started(subject, start)
        timeout = self.scenario.join_timeout
        cluster.run_until(lambda: len(known) >= need, timeout=timeout, step=JOIN_POLL)
        firsts = sorted(known.values())
        seconds = firsts[need - 1] - start if len(firsts) >= need else None
        return JoinOutcome(subject, seconds, len(firsts), others)

    def crash_and_observe(self) -> tuple[CrashOutcome, ...]:
        """Crash random running nodes at once, run ``duration`` seconds, time the detection."""
        cluster = self.cluster
        victims = self.rng.sample(sorted(cluster.up()), self.scenario.crashes)
        for victim in victims:
            # a node that holds the victim DEAD already (a false death not refuted yet) will
            # not declare it again: it knows from the crash on
            self.watch.dead[victim] = {
                observer: cluster.now
                for observer in cluster.up()
                if _holds_dead(cluster.membership(observer).member(victim))
            }
            cluster.crash(victim)
            self.watch.stopped(victim, cluster.now)
        start, observers = cluster.now, set(cluster.up())
        cluster.run_for(self.scenario.duration)
        return tuple(self._detection(victim, start, observers) for victim in victims)

    def _detection(self, victim: str, start: float, observers: set[str]) -> CrashOutcome:
        seen = [
            at - start for observer, at in self.watch.dead[victim].items() if observer in observers
        ]
        complete = len(seen) == len(observers)
        return CrashOutcome(
            victim,
            min(seen) if seen else None,
            max(seen) if complete and seen else None,
            len(seen),
            len(observers),
        )


def _holds_dead(member: Member | None) -> bool:
    return member is not None and member.status is MemberStatus.DEAD


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C while :func:`run_membership` played a scenario: how far it had come."""

    def __init__(self, phase: str, simulated: float, cpu_seconds: float) -> None:
        super().__init__(phase, simulated, cpu_seconds)
        self.phase = phase  # "settle", "join 3 of 10" or "after the crashes"
        self.simulated = simulated  # virtual seconds played
        self.cpu_seconds = cpu_seconds

    def __str__(self) -> str:
        return (
            f"interrupted in the {self.phase} phase, {self.simulated:.1f} simulated seconds and "
            f"{self.cpu_seconds:.1f} s of CPU into the run; nothing measured is reported"
        )


def run_membership(scenario: MembershipScenario) -> MembershipReport:
    """Play ``scenario`` and measure it (CPU-bound: about N node-seconds per CPU second).
    Ctrl-C (KeyboardInterrupt) becomes :class:`RunInterrupted`, which says how far it came."""
    cpu, wall = time.process_time(), time.perf_counter()
    run = MembershipRun(scenario)
    phase = "settle"
    try:
        run.warm_start()
        joins_start = run.cluster.now
        joins = []
        for index in range(scenario.joins):
            phase = f"join {index + 1} of {scenario.joins}"
            joins.append(run.join(index))
        join_phase = run.cluster.now - joins_start
        phase = "after the crashes"
        crashes = run.crash_and_observe()
    except KeyboardInterrupt:
        raise RunInterrupted(phase, run.cluster.now, time.process_time() - cpu) from None
    stats, watch, now = run.cluster.network.stats, run.watch, run.cluster.now
    return MembershipReport(
        scenario=scenario,
        simulated=now,
        join_phase=join_phase,
        joins=tuple(joins),
        crashes=crashes,
        false_deaths=watch.false_deaths,
        falsely_dead_nodes=len(watch.falsely_dead),
        live_suspicions=watch.live_suspicions,
        suspected_nodes=len(watch.suspected),
        packets=stats.sent,
        bytes=stats.bytes_sent,
        lost=stats.lost,
        node_seconds=watch.uptime(now),
        cpu_seconds=time.process_time() - cpu,
        wall_seconds=time.perf_counter() - wall,
    )


# --- summaries ---------------------------------------------------------------------------------


def summary(values: Sequence[float | None], top: str) -> dict[str, float | None]:
    """``{"median_s", top + "_s"}`` where None (never happened) counts as infinitely late.

    ``top`` is ``"max"`` or ``"p99"``. A figure is None when there are no values or when it
    falls on a missing one.
    """
    if not values:
        return {"median_s": None, f"{top}_s": None}
    timed = [math.inf if v is None else v for v in values]
    high = max(timed) if top == "max" else nearest_rank(timed, 99)
    return {"median_s": _finite(statistics.median(timed)), f"{top}_s": _finite(high)}


_DECIMAL = Context(prec=400, rounding=ROUND_HALF_UP)  # room for every digit of any float


def decimal_text(value: float, places: int, *, percent: bool = False) -> str:
    """Finite ``value`` (times 100 when ``percent``) with ``places`` decimals, a tie rounded away
    from zero on the shortest decimal form of ``value``: 12.75 -> "12.8", 2.675 -> "2.68"."""
    number = Decimal(repr(value)).scaleb(2 if percent else 0)
    fixed = number.quantize(Decimal(1).scaleb(-places), context=_DECIMAL)
    return str(fixed.copy_abs() if fixed.is_zero() else fixed)  # never "-0.0"


def _finite(value: float) -> float | None:
    return float(decimal_text(value, 6)) if math.isfinite(value) else None


def report_document(report: MembershipReport) -> dict[str, Any]:
    """The JSON document of ``meshinfer-sim membership --json``."""
    scenario = report.scenario
    return {
        "command": "membership",
        "scenario": _scenario_document(scenario),
        "simulated_s": _finite(report.simulated),
        "join_phase_s": _finite(report.join_phase),
        "joins": _joins_document(report.joins),
        "crashes": _crashes_document(report.crashes),
        "false_deaths": {
            "declarations": report.false_deaths,
            "nodes": report.falsely_dead_nodes,
            "suspect_declarations": report.live_suspicions,
            "suspected_nodes": report.suspected_nodes,
        },
        "load": {
            "packets_per_node_s": _finite(report.packets_per_node_second),
            "bytes_per_node_s": _finite(report.bytes_per_node_second),
            "packets": report.packets,
            "bytes": report.bytes,
            "lost": report.lost,
            "node_seconds": _finite(report.node_seconds),
        },
        "timing": {
            "cpu_s": float(decimal_text(report.cpu_seconds, 3)),
            "wall_s": float(decimal_text(report.wall_seconds, 3)),
        },
    }


def _scenario_document(scenario: MembershipScenario) -> dict[str, Any]:
    document = {item.name: getattr(scenario, item.name) for item in fields(scenario)}
    latency_ms = [float(decimal_text(value * 1000, 6)) for value in scenario.latency]
    return {
        ("latency_ms" if k == "latency" else k): (latency_ms if k == "latency" else v)
        for k, v in document.items()
    }


def _joins_document(joins: Sequence[JoinOutcome]) -> dict[str, Any]:
    return {
        "count": len(joins),
        "target": DISSEMINATION_TARGET,
        "reached": sum(j.seconds is not None for j in joins),
        **summary([j.seconds for j in joins], "max"),
        "per_join": [
            {
                "node": j.node,
                "seconds": _finite_or_none(j.seconds),
                "known_by": j.known_by,
                "others": j.others,
            }
            for j in joins
        ],
    }


def _crashes_document(crashes: Sequence[CrashOutcome]) -> dict[str, Any]:
    return {
        "count": len(crashes),
        "detected": sum(c.first_dead is not None for c in crashes),
        "known_by_all": sum(c.all_live is not None for c in crashes),
        "first_dead": summary([c.first_dead for c in crashes], "p99"),
        "all_live": summary([c.all_live for c in crashes], "p99"),
        "per_crash": [
            {
                "node": c.node,
                "first_dead_s": _finite_or_none(c.first_dead),
                "all_live_s": _finite_or_none(c.all_live),
                "known_by": c.known_by,
                "observers": c.observers,
            }
            for c in crashes
        ],
    }


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None else _finite(value)
