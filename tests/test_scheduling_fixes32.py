"""The burst placer (:class:`~meshinfer.proto.scheduling.BurstPlacer`) places every item as
:func:`~meshinfer.proto.scheduling.choose` over the views with the same in-flight counts does:
the same node, the same draws from the rng, the same scheduler state after; and the dispatch
loop uses it within a burst with the same choices as the per-item path."""

from __future__ import annotations

import copy
import math
import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.service import CoordinatorConfig
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.scheduling import (
    BurstPlacer,
    NodeView,
    Policy,
    SchedulerConfig,
    SchedulerState,
    choose,
)
from meshinfer.proto.tasks import WorkItem
from meshinfer.proto.tasks_wire import Tensor
from tests.test_coordinator_service import Mesh, spec

MODELS = [("digits", "1"), ("digits", "2"), ("yolo", "1")]
IDS = [f"veh-{i}" for i in range(10)]
ODD = [math.nan, math.inf, -math.inf, -1.0, 10**400]

depths = st.integers(0, 6) | st.sampled_from([-2, *ODD])
capacities = st.integers(0, 4) | st.sampled_from(ODD)
seconds = st.none() | st.sampled_from([0.001, 0.005, 0.02]) | st.floats(0.0, 2.0)
seconds |= st.sampled_from(ODD)


@st.composite
def views(draw, node_id):
    return NodeView(
        node_id=node_id,
        alive=draw(st.booleans()),
        models=frozenset(draw(st.lists(st.sampled_from(MODELS), max_size=3))),
        roles=frozenset(draw(st.lists(st.sampled_from(["worker", "rsu"]), max_size=2))),
        has_gpu=draw(st.booleans()),
        free_gpu_memory=draw(st.none() | st.sampled_from([0, 1 << 30, 4 << 30, math.nan])),
        queue_depth=draw(depths),
        capacity=draw(capacities),
        rtt_s=draw(seconds),
        contact_s=draw(seconds),
    )


@st.composite
def fleets(draw):
    ids = draw(st.lists(st.sampled_from(IDS), max_size=8, unique=True))
    if ids and draw(st.integers(0, 9)) == 0:  # now and then a node id twice
        ids.append(ids[0])
    return [draw(views(node_id)) for node_id in ids]


params = st.fixed_dictionaries(
    {},
    optional={
        "requires_gpu": st.booleans(),
        "min_gpu_memory": st.sampled_from([1 << 30, 4 << 30]),
        "requires_role": st.sampled_from(["worker", "rsu"]),
        "expected_runtime_s": st.floats(0.0, 1.0) | st.sampled_from([math.nan, -1.0]),
    },
)


def make_item(model, rows, params) -> WorkItem:
    tensor = Tensor.from_array(np.zeros((rows, 2), np.float32))
    return WorkItem("t/0", "t", ModelRef(*model), tensor, params)


items = st.builds(make_item, st.sampled_from(MODELS), st.sampled_from([1, 32, 64]), params)
places = st.tuples(
    st.just("place"), st.sampled_from(list(Policy)), items, st.frozensets(st.sampled_from(IDS))
)
sets = st.tuples(st.just("set"), st.sampled_from(IDS), st.integers(0, 5))
states = st.builds(
    SchedulerState,
    config=st.builds(SchedulerConfig, gpu_batch_rows=st.sampled_from([32, 64])),
    rr_cursor=st.none() | st.sampled_from(IDS),
    affinity=st.dictionaries(st.sampled_from(MODELS), st.sampled_from(IDS)),
    runtime_s=st.dictionaries(st.sampled_from(MODELS), st.floats(0.0, 1.0)),
)


def reference_views(nodes, in_flight):
    """The views as the per-item path gives them to ``choose`` (``Dispatch._views``)."""
    return [
        replace(v, queue_depth=n) if (n := in_flight.get(v.node_id, 0)) > v.queue_depth else v
        for v in nodes
    ]


@settings(max_examples=400, deadline=None)
@given(
    nodes=fleets(),
    in_flight=st.dictionaries(st.sampled_from(IDS), st.integers(1, 5)),
    limit=st.none() | st.integers(0, 4),
    steps=st.lists(places | sets, max_size=24),
    state=states,
    seed=st.integers(0, 2**32),
)
def test_the_burst_placer_chooses_as_choose_does_over_the_same_views(
    nodes, in_flight, limit, steps, state, seed
):
    placer = BurstPlacer(nodes, in_flight, limit=limit)
    ours, theirs = copy.deepcopy(state), copy.deepcopy(state)
    rng, oracle_rng = random.Random(seed), random.Random(seed)
    counts = Counter(in_flight)
    for step in steps:
        if step[0] == "set":
            _, node, count = step
            counts[node] = count
            placer.set_in_flight(node, count)
            continue
        _, policy, item, exclude = step
        full = {n for n, k in counts.items() if k and limit is not None and k >= limit}
        expected = choose(
            policy,
            reference_views(nodes, counts),
            item,
            exclude=exclude | full,
            rng=oracle_rng,
            state=theirs,
        )
        got = placer.choose(policy, item, exclude=exclude, rng=rng, state=ours)
        assert got == expected
        assert rng.getstate() == oracle_rng.getstate()
        assert (ours.rr_cursor, ours.affinity) == (theirs.rr_cursor, theirs.affinity)
        if got is not None:  # sent there, as the dispatch loop's _assign does
            counts[got] += 1
            placer.set_in_flight(got, counts[got])


def test_an_unknown_policy_is_a_value_error():
    placer = BurstPlacer([NodeView("veh-0", models=frozenset([MODELS[0]]))], {})
    with pytest.raises(ValueError):
        placer.choose("fastest", make_item(MODELS[0], 1, {}), rng=random.Random(0),
                      state=SchedulerState())  # fmt: skip


def test_many_expected_runtimes_in_one_burst_still_choose_as_choose_does():
    """contact_aware keeps an index per expected runtime up to a bound, then asks choose."""
    nodes = [
        NodeView(f"veh-{i}", models=frozenset([MODELS[0]]), contact_s=i / 10, queue_depth=i % 3)
        for i in range(10)
    ]
    placer = BurstPlacer(nodes, {}, limit=2)
    counts: Counter[str] = Counter()
    rng, oracle_rng = random.Random(1), random.Random(1)
    for i in range(40):
        item = make_item(MODELS[0], 1, {"expected_runtime_s": (i % 25) / 100})
        full = {n for n, k in counts.items() if k >= 2}
        expected = choose("contact_aware", reference_views(nodes, counts), item, exclude=full,
                          rng=oracle_rng, state=SchedulerState())  # fmt: skip
        got = placer.choose("contact_aware", item, rng=rng, state=SchedulerState())
        assert got == expected
        if got is not None:
            counts[got] += 1
            placer.set_in_flight(got, counts[got])
            if i % 7 == 0:  # an answer frees a slot
                counts[got] -= 1
                placer.set_in_flight(got, counts[got])


@pytest.mark.parametrize("policy", ["least_loaded", "round_robin"])
async def test_a_burst_is_placed_by_the_placer_as_the_per_item_path_would(tmp_path, policy):
    x, y = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=30, default_policy=policy, max_in_flight_per_node=3)
    async with Mesh(tmp_path, n=3, config=config) as mesh:
        c = mesh.coordinator
        real_choose, by_placer = c._choose, []

        def checking_choose(run, entry):
            placer = c._burst_placer
            if placer is None:
                return real_choose(run, entry)
            rng_state, scheduler = c.rng.getstate(), copy.deepcopy(c.scheduler)
            c._burst_placer = None  # the per-item path, on copies of the rng and state
            expected, expected_state = real_choose(run, entry), c.scheduler
            c._burst_placer, c.scheduler = placer, scheduler
            c.rng.setstate(rng_state)
            node = real_choose(run, entry)
            assert node == expected
            assert c.scheduler.rr_cursor == expected_state.rr_cursor
            by_placer.append(node)
            return node

        c._choose = checking_choose
        task_id = await c.submit(spec("wide", "batch", x[:24], shard_size=1))
        record = await c.wait(task_id, timeout=60)
        assert record.state.value == "succeeded", record.summary.error
        assert (c.result_of(record)["labels"] == y[:24]).mean() >= 0.9
        assert len(by_placer) >= 8, by_placer  # most of the 24 items queued together
        assert None in by_placer or len(set(by_placer)) == 3, by_placer  # spread, then full
        assert c._burst_placer is None and c._burst_views is None  # nothing kept while it waits
