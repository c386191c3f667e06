"""The one nearest-rank percentile rule (meshinfer/percentiles.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshinfer.percentiles import nearest_rank


def test_the_rank_is_exact_where_a_float_product_is_a_hair_over():
    values = [float(v) for v in range(1, 101)]
    assert 0.07 * 100 > 7  # (ceil of it is 8)
    assert nearest_rank(values, 7) == 7.0
    assert nearest_rank(values, 99) == 99.0 and nearest_rank(values, 100) == 100.0
    assert nearest_rank(values, 0) == 1.0


@given(st.lists(st.floats(allow_nan=False), min_size=1, max_size=200), st.integers(0, 100))
def test_a_value_that_occurred_with_at_least_q_percent_at_or_below_it(values, q):
    p = nearest_rank(values, q)
    assert p in values
    at_or_below = sum(v <= p for v in values)
    assert at_or_below * 100 >= q * len(values)
    below = sum(v < p for v in values)  # the smallest such value: fewer than q% lie below it
    if q == 0:
        assert below == 0
    else:
        assert below * 100 < q * len(values)
