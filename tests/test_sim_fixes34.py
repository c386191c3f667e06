"""Session 34 review of the simulation harness: random streams, cluster helpers, rounding, bytes."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from meshinfer.proto.membership import MembershipConfig
from meshinfer.testing.virtual_network import MembershipCluster, VirtualNetwork
from simulations.cli import membership_table
from simulations.membership import CrashOutcome, MembershipReport, MembershipScenario

ROOT = Path(__file__).resolve().parents[1]
TINY = ["membership", "--nodes", "4", "--preset", "test", "--joins", "1", "--crash", "1"]
TINY += ["--duration", "3", "--loss", "0.1", "--seed", "5"]


class _ArrivalCore:
    """A silent core that records when each packet arrived."""

    def __init__(self) -> None:
        self.arrived: dict[bytes, float] = {}
        self.now = 0.0

    def handle_packet(self, from_node: str, data: bytes, now: float) -> None:
        self.arrived[data] = now

    def tick(self, now: float) -> None:
        pass

    def next_deadline(self) -> float:
        return math.inf

    def drain_packets(self) -> list[tuple[str, bytes]]:
        return []

    def drain_events(self) -> list:
        return []


def _arrivals(loss: float) -> dict[bytes, float]:
    network = VirtualNetwork(random.Random(5), loss=loss, latency=(0.001, 0.1))
    receiver = _ArrivalCore()
    network.add("a", _ArrivalCore())
    network.add("b", receiver)
    for index in range(200):
        network.inject("a", "b", b"%d" % index)
    network.run_for(1.0)
    return receiver.arrived


# --- common random numbers across loss levels ----------------------------------------------------


def test_same_traffic_at_two_loss_levels_loses_nested_packets_with_the_same_delays() -> None:
    """Old code: loss and latency shared one stream (and no loss skipped the loss draw), so
    each level drew unrelated delays and lost unrelated packets."""
    none, low, high = _arrivals(0.0), _arrivals(0.1), _arrivals(0.3)
    assert len(none) == 200 and set(high) < set(low) < set(none)
    assert all(low[data] == none[data] for data in low)
    assert all(high[data] == none[data] for data in high)


def test_traffic_and_its_loss_level_do_not_move_the_cores_random_stream() -> None:
    """Old code: the cluster's network drew loss and delays from the generator that seeds each
    core and made-up node state, so a joiner's randomness depended on the loss level."""
    states = []
    for loss in (0.0, 0.3):
        cluster = MembershipCluster(MembershipConfig.test(), seed=3, loss=loss)
        ids = cluster.warm_start(4)
        cluster.run_for(3.0)
        assert cluster.network.stats.sent > 20
        cluster.start_node("joiner", seeds=ids[:1])
        states.append((cluster.rng.getstate(), cluster.membership("joiner").local_member.state))
    assert states[0] == states[1]


# --- cluster helpers -----------------------------------------------------------------------------


def test_a_second_warm_start_gives_new_hosts() -> None:
    """Old code: each warm start numbered its hosts from 10.0.0.0 again."""
    cluster = MembershipCluster(MembershipConfig.test(), seed=1)
    ids = cluster.warm_start(3) + cluster.warm_start(3)
    hosts = [cluster.membership(node_id).local_member.state.host for node_id in ids]
    assert len(set(ids)) == 6 and len(set(hosts)) == 6


def test_join_all_of_none_starts_none_and_a_negative_count_is_refused() -> None:
    """Old code: join_all(0) raised IndexError; a negative count silently started nothing."""
    cluster = MembershipCluster(MembershipConfig.test(), seed=1)
    assert cluster.join_all(0) == [] and cluster.up() == []
    for start in (cluster.join_all, cluster.warm_start):
        with pytest.raises(ValueError, match="count"):
            start(-1)
    with pytest.raises(ValueError, match="spacing"):
        cluster.join_all(2, spacing=math.nan)


def test_a_node_in_two_partition_groups_is_refused() -> None:
    """Old code: the last group silently won."""
    network = VirtualNetwork(random.Random(1))
    with pytest.raises(ValueError, match="'b' is named in two groups"):
        network.partition(["a", "b"], ["b", "c"])


def test_endless_or_nan_run_times_and_a_zero_step_are_refused() -> None:
    """Old code: run_until(NaN) did nothing, run_until(inf) set the clock to infinity, and a
    zero step (or an infinite timeout) looped for ever on a condition that never came true."""
    network = VirtualNetwork(random.Random(1))
    for until in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            network.run_until(until)
    assert network.now == 0.0
    cluster = MembershipCluster(MembershipConfig.test(), seed=1)
    answers = iter([False, False, True])
    with pytest.raises(ValueError, match="step"):
        cluster.run_until(lambda: next(answers), timeout=1.0, step=0.0)
    with pytest.raises(ValueError, match="timeout"):
        cluster.run_until(lambda: next(answers), timeout=math.inf)


# --- the report ----------------------------------------------------------------------------------


def _report(**figures: float) -> MembershipReport:
    crash = CrashOutcome("n0001", figures["first"], figures["all"], 1, 1)
    return MembershipReport(
        MembershipScenario(nodes=2, crashes=1), figures["simulated"], 0.0, (), (crash,),
        0, 0, 0, 0, 1000, 20000, 0, 100.0, 0.125, 0.125,
    )  # fmt: skip


def test_table_rounds_a_tie_half_up_on_the_decimal_figure() -> None:
    """Old code: "%.1f"/"%.2f" round a tie to even and work on the binary value: 12.85 s showed
    as 12.8, 0.125 s as 0.12 and 2.675 s as 2.67."""
    table = membership_table(_report(simulated=12.85, first=0.125, all=2.675))
    assert "simulated 12.9 s" in table
    assert "median   0.13 s  p99   0.13 s" in table
    assert "median   2.68 s  p99   2.68 s" in table
    assert "0.13 s CPU" in table


def test_table_shows_the_json_figure_rounded_not_the_raw_one() -> None:
    """Old code: the header rounded the raw 12.7499996 s to 12.7 while the JSON said 12.75."""
    report = _report(simulated=12.7499996, first=1.0, all=1.0)
    assert report.to_json()["simulated_s"] == 12.75
    assert "simulated 12.8 s" in membership_table(report)


def test_without_timing_the_same_seed_gives_the_same_bytes_in_separate_processes() -> None:
    """Old code: --no-timing was unknown and the output always held the CPU and wall seconds."""
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": hash_seed}
        for extra in ([], ["--json"]):
            command = [sys.executable, "-m", "simulations.cli", *TINY, "--no-timing", *extra]
            done = subprocess.run(command, capture_output=True, env=env, cwd=ROOT, timeout=60)
            assert done.returncode == 0, done.stderr
            outputs.append(done.stdout)
    assert outputs[:2] == outputs[2:]
    assert b"CPU" not in outputs[0] and b"timing" not in outputs[1]
