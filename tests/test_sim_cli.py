"""``meshinfer-sim membership``: the real membership cores in virtual time, driven from the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshinfer.errors import ConfigError
from meshinfer.proto.membership import MembershipConfig, MemberStatus
from meshinfer.proto.membership_wire import DeadRecord, Gossip, encode_packet, encode_record
from simulations.cli import main
from simulations.membership import MembershipRun, MembershipScenario, run_membership, summary

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--nodes", 20, "--preset", "test", "--crash", 2, "--joins", 2, "--duration", 15)


def run(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    code = main(["membership", *map(str, args)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def run_json(capsys: pytest.CaptureFixture[str], *args: object) -> dict[str, Any]:
    return json.loads(run(capsys, *args, "--json"))


def without_timing(doc: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in doc.items() if key != "timing"}


def test_report_shape_and_sane_values_without_loss(capsys) -> None:
    doc = run_json(capsys, *SMALL, "--seed", 3)
    assert doc["scenario"] == {
        "nodes": 20,
        "preset": "test",
        "loss": 0.0,
        "latency_ms": [1.0, 5.0],
        "crashes": 2,
        "joins": 2,
        "duration": 15.0,
        "seed": 3,
        "settle": 2.0,
        "join_timeout": 60.0,
    }
    joins, crashes = doc["joins"], doc["crashes"]
    assert joins["count"] == joins["reached"] == 2
    for index, join in enumerate(joins["per_join"]):
        assert join["others"] == 20 + index and join["known_by"] == join["others"]
        assert 0 < join["seconds"] <= joins["max_s"]
    assert 0 < joins["median_s"] <= joins["max_s"] <= doc["join_phase_s"]
    config = MembershipConfig.test()
    bound = 2 * config.probe_interval + config.suspicion_max_timeout(22) + 2.0
    assert crashes["count"] == crashes["detected"] == crashes["known_by_all"] == 2
    for crash in crashes["per_crash"]:
        assert crash["known_by"] == crash["observers"] == 20
        assert config.suspicion_min_timeout(20) <= crash["first_dead_s"] <= crash["all_live_s"]
        assert crash["all_live_s"] <= bound
    assert crashes["first_dead"]["median_s"] <= crashes["all_live"]["p99_s"]
    assert doc["false_deaths"] == {
        "declarations": 0,
        "nodes": 0,
        "suspect_declarations": 0,
        "suspected_nodes": 0,
    }
    assert doc["simulated_s"] == pytest.approx(2.0 + doc["join_phase_s"] + 15.0)
    load = doc["load"]
    assert load["lost"] == 0 and load["bytes"] > load["packets"] > 0
    assert 20 * doc["simulated_s"] <= load["node_seconds"] <= 22 * doc["simulated_s"]
    assert load["packets_per_node_s"] == pytest.approx(load["packets"] / load["node_seconds"])
    assert doc["timing"]["cpu_s"] >= 0 and doc["timing"]["wall_s"] > 0


def test_same_seed_gives_the_same_report_and_another_seed_does_not(capsys) -> None:
    args = (*SMALL, "--loss", 0.1)
    first = run_json(capsys, *args, "--seed", 7)
    again = run_json(capsys, *args, "--seed", 7)
    other = run_json(capsys, *args, "--seed", 8)
    assert without_timing(first) == without_timing(again)
    assert without_timing(first)["load"] != without_timing(other)["load"]


def test_loss_drops_about_that_share_of_packets(capsys) -> None:
    doc = run_json(capsys, "--nodes", 20, "--preset", "test", "--loss", 0.2, "--duration", 20)
    load = doc["load"]
    assert load["packets"] > 2000
    assert load["lost"] / load["packets"] == pytest.approx(0.2, abs=0.03)
    assert doc["false_deaths"]["suspect_declarations"] > 0, "20 % loss makes some probes fail"


def test_dissemination_runs_from_the_join_call_to_the_last_node_needed(capsys) -> None:
    """With a fixed 50 ms delay the seed node knows a joiner after exactly one hop; the rest of
    the fleet needs at least one more."""
    args = ("--nodes", 10, "--preset", "test", "--latency-ms", "50,50", "--crash", 0)
    joins = run_json(capsys, *args, "--joins", 3, "--duration", 1)["joins"]
    assert joins["reached"] == 3
    for join in joins["per_join"]:
        assert join["seconds"] >= 0.1 - 1e-9 and join["known_by"] == join["others"]


def test_heavy_loss_makes_false_deaths_and_they_are_counted(capsys) -> None:
    args = ("--nodes", 10, "--preset", "test", "--loss", 0.5, "--crash", 0, "--joins", 0)
    doc = run_json(capsys, *args, "--duration", 30)
    false = doc["false_deaths"]
    assert false["declarations"] >= false["nodes"] >= 1
    assert false["suspect_declarations"] > false["declarations"]
    assert false["suspected_nodes"] >= false["nodes"]


def test_a_shorter_run_is_a_prefix_that_reports_detection_in_progress(capsys) -> None:
    args = ("--nodes", 20, "--preset", "test", "--crash", 1, "--joins", 0, "--seed", 3)
    full = run_json(capsys, *args, "--duration", 15)["crashes"]["per_crash"][0]
    assert full["first_dead_s"] < full["all_live_s"]
    midway = (full["first_dead_s"] + full["all_live_s"]) / 2
    cut = run_json(capsys, *args, "--duration", midway)["crashes"]
    crash = cut["per_crash"][0]
    assert crash["node"] == full["node"] and crash["first_dead_s"] == full["first_dead_s"]
    assert 1 <= crash["known_by"] < crash["observers"] == 19
    assert crash["all_live_s"] is None and cut["all_live"]["median_s"] is None
    assert cut["detected"] == 1 and cut["known_by_all"] == 0


def test_test_preset_detects_crashes_sooner_than_lan(capsys) -> None:
    common = ("--nodes", 15, "--crash", 2, "--joins", 0, "--duration", 40, "--seed", 4)
    fast = run_json(capsys, *common, "--preset", "test")["crashes"]
    slow = run_json(capsys, *common, "--preset", "lan")["crashes"]
    assert fast["known_by_all"] == slow["known_by_all"] == 2
    for figure in ("first_dead", "all_live"):
        assert fast[figure]["median_s"] < slow[figure]["median_s"]
        assert fast[figure]["p99_s"] < slow[figure]["p99_s"]


def test_crash_not_detected_within_the_duration_is_reported_as_never(capsys) -> None:
    doc = run_json(capsys, "--nodes", 5, "--crash", 2, "--joins", 0, "--duration", 1)
    crashes = doc["crashes"]
    assert crashes["detected"] == crashes["known_by_all"] == 0
    assert crashes["first_dead"] == {"median_s": None, "p99_s": None}
    assert all(c["first_dead_s"] is None and c["known_by"] == 0 for c in crashes["per_crash"])
    table = run(capsys, "--nodes", 5, "--crash", 2, "--joins", 0, "--duration", 1)
    assert "(0/2 detected)" in table and "never" in table


def test_table_shows_a_dash_not_never_when_nothing_was_measured(capsys) -> None:
    args = ("--nodes", 3, "--preset", "test", "--joins", 0, "--crash", 0, "--duration", 1)
    table = run(capsys, *args)
    assert "never" not in table, "no join or crash happened, so none was missed"
    assert "(0/0 reached)" in table and "(0/0 detected)" in table and "(0/0 complete)" in table


@pytest.mark.parametrize(("loss", "shown"), [(0.0005, "0.05%"), (0.0004, "0.04%"), (0.25, "25.0%")])
def test_table_header_shows_the_loss_that_was_simulated(capsys, loss, shown) -> None:
    table = run(capsys, "--nodes", 3, "--preset", "test", "--loss", loss, "--duration", 1)
    assert f", loss {shown}, " in table.splitlines()[0]


def test_table_shows_the_figures_of_the_json_report(capsys) -> None:
    doc = run_json(capsys, *SMALL, "--seed", 9)
    table = run(capsys, *SMALL, "--seed", 9)
    assert table.startswith("membership: 20 nodes, preset test, loss 0.0%, latency 1-5 ms, seed 9")
    assert f"median {doc['joins']['median_s']:6.2f} s" in table
    assert f"p99 {doc['crashes']['all_live']['p99_s']:6.2f} s" in table
    for crash in doc["crashes"]["per_crash"]:
        row = next(line for line in table.splitlines() if line.startswith(crash["node"] + " "))
        first, last = f"{crash['first_dead_s']:.2f}", f"{crash['all_live_s']:.2f}"
        assert row.split() == [crash["node"], first, "s", last, "s", "20/20"]
    assert "(2/2 reached)" in table and "(2/2 complete)" in table


BAD_ARGUMENTS = [
    (("--nodes", "1"), "--nodes"),
    (("--nodes", "2001"), "--nodes"),
    (("--nodes", "many"), "--nodes"),
    (("--preset", "wan"), "--preset"),
    (("--loss", "0.6"), "--loss"),
    (("--loss", "-0.1"), "--loss"),
    (("--loss", "nan"), "--loss"),
    (("--latency-ms", "5,1"), "--latency-ms"),
    (("--latency-ms", "3"), "--latency-ms"),
    (("--latency-ms", "a,b"), "--latency-ms"),
    (("--crash", "-1"), "--crash"),
    (("--nodes", "5", "--joins", "1", "--crash", "6"), "--crash"),
    (("--joins", "-2"), "--joins"),
    (("--duration", "0"), "--duration"),
    (("--duration", "inf"), "--duration"),
    (("--seed", "x"), "--seed"),
    (("--seed", "-7"), "--seed"),  # random.Random(-7) is random.Random(7)
    (("--bogus",), "--bogus"),
]


@pytest.mark.parametrize(("args", "named"), BAD_ARGUMENTS)
def test_bad_argument_exits_2_with_one_line_naming_it(capsys, args, named) -> None:
    assert main(["membership", *args]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and named in lines[0], out.err
    assert out.out == ""


def test_scenario_rejects_out_of_range_fields() -> None:
    with pytest.raises(ConfigError, match="crashes"):
        MembershipScenario(nodes=3, crashes=3)
    with pytest.raises(ConfigError, match="latency"):
        MembershipScenario(nodes=3, latency=(0.01, 0.001))
    report = run_membership(MembershipScenario(nodes=3, duration=1.0))
    assert report.simulated == pytest.approx(3.0) and report.crashes == ()


@pytest.mark.parametrize(
    "bad",
    [
        {"settle": math.inf},  # would run forever
        {"join_timeout": math.inf},
        {"settle": math.nan},
        {"nodes": 3.5},  # TypeError deep in the run
        {"crashes": 1.5},
        {"joins": True},
        {"seed": -7},
        {"seed": 1.5},
    ],
)
def test_scenario_rejects_endless_times_and_non_integer_counts(bad) -> None:
    with pytest.raises(ConfigError, match="scenario"):
        MembershipScenario(**{"nodes": 3, "duration": 1.0, **bad})


def test_summary_treats_missing_figures_as_infinitely_late() -> None:
    assert summary([2.0, None, 1.0], "max") == {"median_s": 2.0, "max_s": None}
    assert summary([3.0, 1.0, 2.0], "p99") == {"median_s": 2.0, "p99_s": 3.0}
    assert summary([], "p99") == {"median_s": None, "p99_s": None}
    assert summary([1.0, None, None], "p99") == {"median_s": None, "p99_s": None}


def test_module_entry_point_runs_as_a_process_and_matches_in_process(capsys) -> None:
    args = ["membership", *map(str, SMALL), "--loss", "0.05", "--seed", "11", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}
    command = [sys.executable, "-m", "simulations.cli"]
    done = subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert without_timing(json.loads(done.stdout)) == without_timing(run_json(capsys, *args[1:-1]))
    refused = subprocess.run(
        [*command, "membership", "--loss", "0.9"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "meshinfer-sim membership: error: argument --loss: must be a number in [0, 0.5], "
        "got '0.9' (see --help)"
    ]


def test_a_crashed_node_some_held_dead_already_is_known_to_them_from_the_crash() -> None:
    """An observer that holds the victim DEAD from a false death not refuted yet does not
    declare it again after the crash: it counts as knowing from the crash on, so the crash can
    still be known by all."""
    scenario = MembershipScenario(nodes=6, crashes=1, preset="test", settle=5.0, duration=10.0)
    run = MembershipRun(scenario)
    run.warm_start()
    cluster = run.cluster
    victim, observer = "n0001", "n0002"
    incarnation = cluster.membership(observer).member(victim).incarnation
    forged = DeadRecord(victim, incarnation, accuser="n0003")
    cluster.network.inject("n0003", observer, encode_packet(Gossip(), [encode_record(forged)]))
    cluster.run_until(
        lambda: cluster.membership(observer).member(victim).status is MemberStatus.DEAD,
        timeout=1.0,
        step=0.001,
    )
    run.rng.sample = lambda population, k: [victim]  # this victim, crashed before it refutes
    (outcome,) = run.crash_and_observe()
    assert run.watch.dead[victim][observer] == pytest.approx(cluster.now - 10.0)
    assert outcome.known_by == outcome.observers == 5
    assert outcome.all_live is not None and outcome.all_live >= outcome.first_dead >= 0
