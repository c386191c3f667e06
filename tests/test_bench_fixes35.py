"""The benchmarks' own arithmetic and options (session 35): percentiles by nearest rank, the
measuring window counting what completes in it, the ratios printed against a same-run baseline,
and bad command-line values refused with a usage error before anything starts. No timings."""

from __future__ import annotations

import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from bench import bench_join, bench_session, bench_tasks

ROOT = Path(__file__).resolve().parents[1]


def test_tasks_percentiles_are_nearest_rank():
    figures = bench_tasks.Figures([float(v) for v in range(100, 0, -1)], 1.0)
    assert figures.pct(0.99) == 99.0  # not the largest of 100 samples
    assert figures.pct(0.5) == 50.0
    assert figures.pct(1.0) == 100.0 and figures.pct(0.0) == 1.0
    assert bench_tasks.Figures([1.0, 2.0], 1.0).pct(0.5) == 1.0
    assert bench_tasks.Figures([3.0], 1.0).pct(0.99) == 3.0


def test_session_and_join_percentiles_are_nearest_rank():
    samples = [float(v) for v in range(1, 101)]
    assert bench_session.pct(samples, 0.99) == 99.0
    assert bench_session.pct(samples, 0.5) == 50.0
    # bench_join's p90 of its 10 trials is the 9th, not the largest
    assert bench_join.percentile([float(v) for v in range(1, 11)], 0.9) == 9.0


def test_window_counts_tasks_completed_in_it_whenever_submitted():
    window = bench_tasks.Window(0.0, 1.0)
    window.start, window.end = 10.0, 20.0
    window.record(9.0, 11.0)  # in flight when the window opened: completed inside it
    window.record(12.0, 13.0)
    window.record(5.0, 9.5)  # completed in the warm-up
    window.record(19.0, 21.0)  # completed after the window
    figures = window.figures()
    assert figures.latencies == [1.0, 2.0]
    assert figures.rate == pytest.approx(0.2)


def _options(**over) -> Namespace:
    base = {"seconds": 1.0, "warmup": 0.0, "in_flight": 64, "rounds": 1, "only": None}
    return Namespace(**{**base, **over})


def test_tasks_options_refuse_a_case_the_run_would_not_have():
    assert bench_tasks.bad_options(_options()) is None
    assert bench_tasks.bad_options(_options(only=["FULL/64", "none/1"])) is None
    problem = bench_tasks.bad_options(_options(only=["FULL/65"]))
    assert problem is not None and "FULL/65" in problem and "FULL/64" in problem
    assert bench_tasks.bad_options(_options(in_flight=8, only=["FULL/64"])) is not None
    assert bench_tasks.bad_options(_options(seconds=0.0)) is not None
    assert bench_tasks.bad_options(_options(warmup=-1.0)) is not None
    assert bench_tasks.bad_options(_options(in_flight=0)) is not None
    assert bench_tasks.bad_options(_options(rounds=0)) is not None


def test_tasks_ratios_to_the_no_journal_ceiling():
    rates = {"FULL/64": 3000.0, "none/64": 6000.0, "FULL/1": 700.0, "NORMAL/1": 800.0}
    assert bench_tasks.ceiling_ratios(rates) == ["FULL/64 / none/64 tasks/s x0.50"]
    assert bench_tasks.ceiling_ratios({"FULL/64": 3000.0}) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["bench_tasks.py", "--only", "FULL/65", "--no-ray"],
        ["bench_tasks.py", "--seconds", "0"],
        ["bench_session.py", "--rounds", "0"],
        ["bench_join.py", "--trials", "0"],
        ["bench_discovery.py", "--trials", "0"],
        ["bench_codec.py", "--seconds", "0"],
        ["bench_noise.py", "--seconds", "0"],
        ["bench_transport.py", "--seconds", "0"],
        ["bench_batching.py", "--concurrency", "0", "--requests", "10"],
        ["bench_placement.py", "--members", "2", "--burst", "4", "--policy", "bogus"],
        ["bench_placement.py", "--members", "0", "--burst", "4"],
        ["bench_signed_records.py", "--members", "4", "--repeat", "0"],
        ["bench_batch_scaling.py", "--model", "no-such-model@1"],
        ["bench_batch_scaling.py", "--sizes", "0"],
        ["bench_input_refs.py", "--seconds", "0"],
        ["bench_redispatch.py", "--trials", "0"],
        ["bench_gpu.py", "--batches", "1,x"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_bad_option_values_get_a_usage_error(argv):
    script, *rest = argv
    done = subprocess.run(
        [sys.executable, f"bench/{script}", *rest],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, (done.returncode, done.stdout[-500:], done.stderr[-2000:])
    assert f"{script}: error:" in done.stderr and "Traceback" not in done.stderr


def test_bench_session_runs_at_its_smallest():
    """Its latency cases now make warm-up round trips before the timed ones."""
    argv = [sys.executable, "bench/bench_session.py", "--seconds", "0.001", "--rounds", "1"]
    done = subprocess.run(
        [*argv, "--loop", "asyncio"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "1 KiB RTT p99 (us)" in done.stdout and "not timed" in done.stdout
