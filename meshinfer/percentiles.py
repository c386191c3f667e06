"""Nearest-rank percentiles, the one rule the demo, the simulator and the benchmarks report by.

The nearest-rank p-th percentile of n values is the smallest value with at least p% of them at
or below it: always a value that occurred (p99 of fewer than 100 is the largest), never an
interpolation between two.
"""

from __future__ import annotations

from collections.abc import Iterable


def nearest_rank(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (``q`` in 0..100) of a non-empty collection
    (an infinity sorts last). The rank is worked out in integers for an integer ``q`` (a float
    product such as 0.07 * 100 is a hair over 7)."""
    ordered = sorted(values)
    rank = -(-q * len(ordered) // 100)  # ceil(q% of n)
    return ordered[min(len(ordered) - 1, max(0, int(rank) - 1))]
