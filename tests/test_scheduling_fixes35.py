"""Scheduling and contact prediction against what a peer may gossip.

Contact time (:func:`~meshinfer.proto.contact.contact_time`) is checked against a brute-force
simulation of the vehicle driving past the roadside units, and at speeds whose square leaves
the floats (it used to give "unknown" there, even for a vehicle out of range or leaving at
once). Every policy is a pure function of the views, the item, the rng and the scheduler
state, chooses only an eligible node whatever figures a peer gossips, agrees with the burst
placer, and ``unplaced_reason`` says an item waits for its turn exactly when ``choose`` would
place it."""

from __future__ import annotations

import copy
import math
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from meshinfer.proto.contact import contact_time
from meshinfer.proto.scheduling import (
    BurstPlacer,
    NodeView,
    Policy,
    choose,
    eligible,
    unplaced_reason,
)
from tests.test_scheduling_fixes32 import IDS, MODELS, items, states

# --- contact time -----------------------------------------------------------------------------

R = 300.0
coordinate = st.floats(-1500.0, 1500.0) | st.sampled_from([0.0, 300.0, -300.0])
component = st.floats(0.01, 60.0) | st.floats(-60.0, -0.01) | st.just(0.0)  # (see below)
points = st.lists(coordinate, min_size=2, max_size=3).map(tuple)
velocities = st.lists(component, min_size=2, max_size=3).map(tuple)


def _xyz(v):
    return [*map(float, v), *[0.0] * (3 - len(v))]


def _nearest(p, v, t, units) -> float:
    """How far from the nearest unit the vehicle is at ``t`` (straight line, constant speed)."""
    at = [a + b * t for a, b in zip(_xyz(p), _xyz(v), strict=True)]
    return min(math.dist(at, _xyz(u)) for u in units)


@settings(max_examples=300, deadline=None)
@given(
    p=points,
    v=velocities,
    units=st.lists(points, min_size=1, max_size=4),
    along=st.booleans(),
    radio_range=st.floats(50.0, 600.0),
)
def test_contact_time_agrees_with_a_brute_force_drive_past_the_units(
    p, v, units, along, radio_range
):
    if along:  # parallel: the units on the vehicle's line of travel (a road of hand-overs)
        units = [tuple(a + b * k for a, b in zip(_xyz(p), _xyz(v), strict=True)) for k in
                 (-7.0, 0.5, 8.0, 15.0)]  # fmt: skip
    speed = math.hypot(*v)
    t = contact_time(p, v, units, radio_range)
    if speed == 0:
        assert t is None  # not moving: counts as staying
        return
    assert t is not None and t >= 0
    tol = 1e-7 * (radio_range + 2000.0 + speed * t)
    now = _nearest(p, v, 0.0, units)
    if now > radio_range + tol:
        assert t == 0.0  # out of range of every unit now
    if now < radio_range - tol:
        assert t > 0
    # drive on in small steps: in range of some unit at every step before the contact time...
    horizon = 2 * radio_range * (len(units) + 1) / speed
    steps = 2000
    dt = horizon / steps
    trace = [(k * dt, _nearest(p, v, k * dt, units)) for k in range(steps + 1)]
    assert all(d <= radio_range + tol for at, d in trace if at < t)
    # ...and out of range of every unit just after it (the first step out of range is at most
    # a step later, unless a gap between two units' ranges fell between two steps)
    assert t < horizon
    assert _nearest(p, v, t + min(dt, 1e-3), units) >= radio_range - tol
    first_out = next(at for at, d in trace if d > radio_range)
    if first_out > t + dt:  # the simulation stepped over a gap: it must be narrower than a step
        gap = [_nearest(p, v, t + dt * k / 64, units) for k in range(1, 65)]
        assert any(d > radio_range - tol for d in gap)


@settings(max_examples=300, deadline=None)
@given(p=points, v=velocities, unit=points, e=st.integers(-1000, 1000))
def test_contact_time_scales_with_the_speed_over_all_the_floats(p, v, unit, e):
    """The same way at 2**e times the speed takes 2**-e times as long: a speed whose square
    underflows or overflows (beyond about 1e154 m/s, or below 1e-154) is no reason to call
    the contact unknown."""
    assume(max(map(abs, v)) > 1e-3)
    base = contact_time(p, v, [unit], R)
    scaled = contact_time(p, tuple(math.ldexp(c, e) for c in v), [unit], R)
    assert base is not None
    if base == 0:
        assert scaled == 0.0  # out of range now, however fast or slow
    elif math.ldexp(base, -e) > 1e300:  # (near the end of the floats: unknown is fine)
        assert scaled is None or scaled == pytest.approx(math.ldexp(base, -e), rel=1e-9)
    else:
        assert scaled == pytest.approx(math.ldexp(base, -e), rel=1e-9)


@pytest.mark.parametrize(
    ("position", "velocity", "unit", "expected"),
    [
        ((1000.0, 0.0), (1e-200, 0.0), (0.0, 0.0), 0.0),  # out of range, crawling
        ((1000.0, 0.0), (1e200, 0.0), (0.0, 0.0), 0.0),  # out of range, impossibly fast
        ((0.0, 0.0), (1e200, 0.0), (0.0, 0.0), 3e-198),  # in range, leaving at once
        ((0.0, 0.0), (1e-160, 0.0), (0.0, 0.0), 3e162),  # (its square is a subnormal float)
        ((1e300, 0.0), (-1e299, 0.0), (1e300, 0.0), 3e-297),  # huge coordinates, huge speed
        ((1e15, 0.0), (1.0, 0.0), (1e15 + 100, 0.0), 400.0),
    ],
)
def test_contact_time_at_speeds_whose_square_leaves_the_floats(position, velocity, unit, expected):
    got = contact_time(position, velocity, [unit], R)
    assert got == pytest.approx(expected, rel=1e-12, abs=0.0)


def test_contact_time_beyond_any_float_or_of_a_nan_position_is_unknown():
    assert contact_time((0.0, 0.0), (5e-324, 0.0), [(0.0, 0.0)], R) is None  # 6e325 s
    assert contact_time((math.nan, 0.0), (1.0, 0.0), [(0.0, 0.0)], R) is None  # (was 0.0)
    assert contact_time((0.0, 0.0), (math.nan, 0.0), [(0.0, 0.0)], R) is None
    # a unit whose position is not a finite number is as good as no position
    assert contact_time((0.0, 0.0), (10.0, 0.0), [(math.nan, 0.0), (0.0, 0.0)], R) == 30.0
    assert contact_time((0.0, 0.0), (10.0, 0.0), [(math.inf, 0.0), (0.0, 0.0)], R) == 30.0
    # an infinitely far vehicle is out of range
    assert contact_time((math.inf, 0.0), (10.0, 0.0), [(0.0, 0.0)], R) == 0.0


# --- policies over what peers gossip ----------------------------------------------------------

ODD_FLOATS = [math.nan, math.inf, -math.inf, -1.0, 1e308, 0.0, -0.0]
ODD_INTS = [True, False, -3, 0, 10**400, 2**63]
numbers = st.sampled_from(ODD_FLOATS + ODD_INTS) | st.integers(0, 6) | st.floats(0.0, 3.0)


@st.composite
def odd_views(draw, node_id):
    return NodeView(
        node_id=node_id,
        alive=draw(st.booleans()),
        models=frozenset(draw(st.lists(st.sampled_from(MODELS), max_size=3))),
        roles=frozenset(draw(st.lists(st.sampled_from(["worker", "rsu"]), max_size=2))),
        has_gpu=draw(st.booleans()),
        free_gpu_memory=draw(st.none() | numbers | st.sampled_from([1 << 30, 4 << 30])),
        queue_depth=draw(numbers),
        capacity=draw(numbers),
        rtt_s=draw(st.none() | numbers),
        contact_s=draw(st.none() | numbers),
    )


@st.composite
def odd_fleets(draw):
    ids = draw(st.lists(st.sampled_from(IDS), max_size=7, unique=True))
    return [draw(odd_views(node_id)) for node_id in ids]


@settings(max_examples=400, deadline=None)
@given(
    policy=st.sampled_from(list(Policy)),
    nodes=odd_fleets(),
    item=items,
    exclude=st.frozensets(st.sampled_from(IDS)),
    state=states,
    seed=st.integers(0, 2**32),
    order=st.randoms(use_true_random=False),
)
def test_every_policy_is_a_pure_function_choosing_an_eligible_node(
    policy, nodes, item, exclude, state, seed, order
):
    before = copy.deepcopy(state)
    first_state, again_state = copy.deepcopy(state), copy.deepcopy(state)
    first = choose(policy, nodes, item, exclude=exclude, rng=random.Random(seed),
                   state=first_state)  # fmt: skip
    shuffled = list(nodes)
    order.shuffle(shuffled)  # the views are a set: their order does not matter
    again = choose(policy, shuffled, item, exclude=exclude, rng=random.Random(seed),
                   state=again_state)  # fmt: skip
    assert first == again
    assert (first_state.rr_cursor, first_state.affinity) == (
        again_state.rr_cursor,
        again_state.affinity,
    )
    allowed = {n.node_id for n in eligible(nodes, item, exclude)}
    assert first is None or first in allowed
    if policy is not Policy.CONTACT_AWARE:
        assert (first is None) == (not allowed)  # only contact_aware may leave one unplaced
    if policy not in (Policy.ROUND_ROBIN, Policy.MODEL_AFFINITY):  # these remember a choice
        assert first_state == before
    assert first_state.runtime_s == before.runtime_s and first_state.config == before.config


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from(list(Policy)),
    nodes=odd_fleets(),
    item=items,
    in_flight=st.dictionaries(st.sampled_from(IDS), st.integers(1, 4)),
    limit=st.none() | st.integers(0, 3),
    exclude=st.frozensets(st.sampled_from(IDS)),
    state=states,
    seed=st.integers(0, 2**32),
)
def test_the_burst_placer_and_unplaced_reason_agree_with_choose_on_odd_figures(
    policy, nodes, item, in_flight, limit, exclude, state, seed
):
    placer = BurstPlacer(nodes, in_flight, limit=limit)
    ours, theirs = copy.deepcopy(state), copy.deepcopy(state)
    full = placer.full()
    expected = choose(policy, placer.views(), item, exclude=exclude | full,
                      rng=random.Random(seed), state=theirs)  # fmt: skip
    got = placer.choose(policy, item, exclude=exclude, rng=random.Random(seed), state=ours)
    assert got == expected
    assert (ours.rr_cursor, ours.affinity) == (theirs.rr_cursor, theirs.affinity)
    # the reason a person is shown: waiting for its turn exactly when it would be placed
    why = unplaced_reason(policy, placer.views(), item, full=full, state=copy.deepcopy(state))
    placed = choose(policy, placer.views(), item, exclude=full, rng=random.Random(seed),
                    state=copy.deepcopy(state))  # fmt: skip
    assert (why == "waiting for its turn to be dispatched") == (placed is not None), why
