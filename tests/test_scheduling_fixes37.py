"""Round robin keeps its turn per placement class (model, requirements): items of classes
eligible on different nodes, queued in turn, each go round their own nodes instead of going
back to the same node after the other class moved the one cursor; the burst placer does the
same as :func:`~meshinfer.proto.scheduling.choose`; the cursors kept are bounded. And a
contact time is not cut short by the rounding of the figures where a vehicle is on the edge
of range heading in, or where the coverage of two units meets."""

from __future__ import annotations

import copy
import math
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.inference.base import ModelRef
from meshinfer.proto.contact import contact_time
from meshinfer.proto.scheduling import BurstPlacer, NodeView, SchedulerState, choose, eligible
from meshinfer.proto.tasks import WorkItem
from meshinfer.proto.tasks_wire import Tensor

A, B = ("a", "1"), ("b", "1")
TENSOR = Tensor.from_array(np.zeros((1, 2), np.float32))
IDS = [f"veh-{i}" for i in range(6)]


def make_item(model, params=None) -> WorkItem:
    return WorkItem("t/0", "t", ModelRef(*model), TENSOR, params or {})


def serving(node_id, *models, gpu=False):
    return NodeView(node_id, models=frozenset(models), has_gpu=gpu)


def test_round_robin_spreads_a_model_whose_items_alternate_with_another_models():
    # node-2 serves both: b's items move the cursor there, and a's used to go on to node-3
    # every time (29 of 30), never to node-1 or node-2
    nodes = [serving("node-1", A), serving("node-2", A, B), serving("node-3", A)]
    state, rng, got = SchedulerState(), random.Random(0), Counter()
    for _ in range(30):
        got[choose("round_robin", nodes, make_item(A), rng=rng, state=state)] += 1
        assert choose("round_robin", nodes, make_item(B), rng=rng, state=state) == "node-2"
    assert got == {"node-1": 10, "node-2": 10, "node-3": 10}


def test_round_robin_spreads_items_whose_requirements_differ():
    # GPU items fit node-3 only; the others all three, and used to stay on node-1
    nodes = [serving("node-1", A), serving("node-2", A), serving("node-3", A, gpu=True)]
    gpu_item, any_item = make_item(A, {"requires_gpu": True}), make_item(A)
    state, rng = SchedulerState(), random.Random(0)
    placer, placer_state = BurstPlacer(nodes, {}), SchedulerState()
    got, placed = Counter(), Counter()
    for _ in range(30):
        got[choose("round_robin", nodes, any_item, rng=rng, state=state)] += 1
        choose("round_robin", nodes, gpu_item, rng=rng, state=state)
        placed[placer.choose("round_robin", any_item, rng=rng, state=placer_state)] += 1
        placer.choose("round_robin", gpu_item, rng=rng, state=placer_state)
    assert got == placed == {"node-1": 10, "node-2": 10, "node-3": 10}


@st.composite
def fleets(draw):
    ids = draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=6, unique=True))
    return [
        NodeView(
            node_id,
            models=frozenset(draw(st.lists(st.sampled_from([A, B]), min_size=1, max_size=2))),
            has_gpu=draw(st.booleans()),
        )
        for node_id in ids
    ]


classes = st.sampled_from(
    [make_item(A), make_item(B), make_item(A, {"requires_gpu": True}), make_item(B, {"x": 1})]
)


@settings(max_examples=200, deadline=None)
@given(nodes=fleets(), order=st.lists(classes, max_size=40), seed=st.integers(0, 2**32),
       start=st.none() | st.sampled_from(IDS))  # fmt: skip
def test_each_class_goes_round_its_own_nodes_in_turn_by_choose_and_the_placer(
    nodes, order, seed, start
):
    state = SchedulerState(rr_cursor=start)
    placer, placer_state = BurstPlacer(nodes, {}), copy.deepcopy(state)
    rng, placer_rng = random.Random(seed), random.Random(seed)
    last: dict[tuple, str] = {}
    for item in order:
        got = choose("round_robin", nodes, item, rng=rng, state=state)
        assert placer.choose("round_robin", item, rng=placer_rng, state=placer_state) == got
        assert (placer_state.rr_cursor, placer_state.rr_cursors) == (
            state.rr_cursor,
            state.rr_cursors,
        )
        ids = sorted(n.node_id for n in eligible(nodes, item, frozenset()))
        if not ids:
            assert got is None
            continue
        key = (item.model.model_id, item.params.get("requires_gpu") is True)
        if key in last:  # the class's next node after its own last one, wrapping
            after = [i for i in ids if i > last[key]]
            assert got == (after or ids)[0]
        last[key] = got


def test_the_cursors_kept_per_class_are_bounded():
    # requirements come from submitted specs: a class per distinct min_gpu_memory
    nodes = [NodeView("node-1", models=frozenset([A]), has_gpu=True, free_gpu_memory=1 << 40)]
    state, rng = SchedulerState(), random.Random(0)
    placer, placer_state = BurstPlacer(nodes, {}), SchedulerState()
    for need in range(3000):
        item = make_item(A, {"min_gpu_memory": need})
        assert choose("round_robin", nodes, item, rng=rng, state=state) == "node-1"
        assert placer.choose("round_robin", item, rng=rng, state=placer_state) == "node-1"
    assert len(state.rr_cursors) == len(placer_state.rr_cursors) == 1024
    assert (A, (False, 2999, None)) in state.rr_cursors  # the classes used last are kept
    assert (A, (False, 0, None)) not in state.rr_cursors


def test_a_vehicle_on_the_edge_of_range_heading_in_stays_in_range_across_it():
    # on the circle but for the rounding of its coordinates: about 1 in 20 used to be out of
    # range now (a few ulps out), contact 0, and kept off by contact_aware
    rng = random.Random(3)
    for _ in range(200):
        angle = rng.uniform(0, 2 * math.pi)
        edge = (300 * math.cos(angle), 300 * math.sin(angle))
        inward = (-10 * math.cos(angle), -10 * math.sin(angle))
        assert contact_time(edge, inward, [(0.0, 0.0)], 300.0) == pytest.approx(60.0), edge
        outward = (-inward[0], -inward[1])
        assert contact_time(edge, outward, [(0.0, 0.0)], 300.0) == pytest.approx(0.0, abs=1e-9)


def test_a_hand_over_where_two_units_coverage_just_meets_keeps_the_contact():
    # units 2 R apart along the road: their ranges touch; the rounding used to leave a gap of
    # an ulp between them in about 2 of 5 layouts, the contact ending at the first unit's edge
    rng = random.Random(5)
    for _ in range(200):
        ox, oy = rng.uniform(-1e4, 1e4), rng.uniform(-1e4, 1e4)
        angle = rng.uniform(0, 2 * math.pi)
        d = (math.cos(angle), math.sin(angle))
        units = [(ox, oy), (ox + 600 * d[0], oy + 600 * d[1])]
        got = contact_time((ox, oy), (10 * d[0], 10 * d[1]), units, 300.0)
        assert got == pytest.approx(90.0), units
    # a real gap, however small against the range (a millimetre), still ends it
    units = [(0.0, 0.0), (600.001, 0.0)]
    assert contact_time((0.0, 0.0), (10.0, 0.0), units, 300.0) == pytest.approx(30.0)
