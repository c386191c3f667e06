"""The benchmarks that run in well under a second at their smallest settings still run: a
bench whose stand-ins drift from the code it times fails here, not when someone measures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("policy", ["least_loaded", "round_robin", "contact_aware"])
def test_bench_placement_runs_at_its_smallest(policy):
    argv = [sys.executable, "bench/bench_placement.py", "--members", "2", "--burst", "4"]
    done = subprocess.run(
        [*argv, "--policy", policy], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "burst placer" in done.stdout
