"""Session 36 review of the simulation harness: seeds past what JSON and int() hold, error lines
that echo a huge value, and cluster helpers that spun at one virtual instant for ever."""

from __future__ import annotations

import json

import pytest

from meshinfer.errors import ConfigError
from meshinfer.proto.membership import MembershipConfig
from meshinfer.testing.virtual_network import MembershipCluster
from simulations.cli import main
from simulations.membership import MembershipScenario

MAX_SEED = 2**64 - 1
TINY = ["membership", "--nodes", "3", "--joins", "0", "--crash", "0", "--duration", "1"]


def _error_line(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main([*TINY, *args]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and out.out == "", out.err[:300]
    return lines[0]


def test_a_seed_of_thousands_of_digits_is_out_of_range_not_called_a_negative(capsys) -> None:
    """Old code: int() refuses over 4300 digits and the line said "must be an integer >= 0"
    about a positive number, echoing all 5000 digits."""
    line = _error_line(capsys, "--seed", "9" * 5000)
    assert "--seed" in line and "2**64 - 1" in line and ">= 0" not in line
    assert len(line) < 300 and "5,000 characters" in line


def test_a_seed_past_64_bits_is_refused_and_the_largest_is_echoed_exactly(capsys) -> None:
    """Old code: 2**64 ran (a JSON reader keeping 64-bit integers at best misreads it)."""
    assert "--seed" in _error_line(capsys, "--seed", str(2**64))
    assert main([*TINY, "--seed", str(MAX_SEED), "--json", "--no-timing"]) == 0
    assert json.loads(capsys.readouterr().out)["scenario"]["seed"] == 2**64 - 1


@pytest.mark.parametrize("flag", ["--nodes", "--loss", "--duration", "--latency-ms"])
def test_an_error_line_cuts_a_huge_value_short(capsys, flag) -> None:
    """Old code: the one error line held every one of the 5000 characters given."""
    line = _error_line(capsys, flag, "7" * 5000)
    assert flag in line and len(line) < 300 and "5,000 characters" in line


@pytest.mark.parametrize("field", ["seed", "nodes", "joins"])
def test_a_scenario_with_a_huge_integer_is_a_config_error(field) -> None:
    """Old code: a seed of 5000 digits was accepted and the run failed later with ValueError
    (str() of it); a huge count failed in formatting the ConfigError itself (ValueError)."""
    with pytest.raises(ConfigError, match=f"scenario {field}"):
        MembershipScenario(**{"nodes": 3, "duration": 1.0, field: 10**5000})


def test_scenario_seed_range_is_0_to_2_64_minus_1() -> None:
    assert MembershipScenario(nodes=3, seed=MAX_SEED).seed == 2**64 - 1
    with pytest.raises(ConfigError, match="seed"):
        MembershipScenario(nodes=3, seed=MAX_SEED + 1)


@pytest.mark.parametrize(
    ("poll", "linger"), [(0.0, 30.0), (-1.0, 30.0), (float("nan"), 30.0), (0.1, float("nan"))]
)
def test_leave_refuses_a_poll_that_would_spin_at_one_instant(poll, linger) -> None:
    """Old code: poll 0 re-scheduled its check at the same instant for ever, so the next
    run_for never returned; a NaN linger never gave up."""
    cluster = MembershipCluster(MembershipConfig.test(), seed=1)
    ids = cluster.warm_start(2)
    with pytest.raises(ValueError, match="leave"):
        cluster.leave(ids[0], poll=poll, linger=linger)
    cluster.run_for(1.0)  # nothing left scheduled that spins


def test_leave_with_sane_times_still_stops_the_node() -> None:
    cluster = MembershipCluster(MembershipConfig.test(), seed=1)
    ids = cluster.warm_start(3)
    cluster.leave(ids[0], poll=0.1, linger=5.0)
    cluster.run_for(6.0)
    assert ids[0] not in cluster.up()


def test_run_until_refuses_a_step_too_small_to_move_the_clock() -> None:
    """Old code: at t = 10 a step of 1e-20 left the clock at 10, so the deadline never came."""
    cluster = MembershipCluster(MembershipConfig.test(), seed=1)
    cluster.warm_start(2)
    cluster.run_for(10.0)
    calls = 0

    def never() -> bool:
        nonlocal calls
        calls += 1
        assert calls < 10_000, "run_until spins without moving the clock"
        return False

    with pytest.raises(ValueError, match="step"):
        cluster.run_until(never, timeout=1.0, step=1e-20)
    assert cluster.run_until(never, timeout=1.0, step=0.5) is False
    assert cluster.now == pytest.approx(11.0)
