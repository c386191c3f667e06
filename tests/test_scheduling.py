"""Scheduling policies: the eligibility invariants for every policy, then each policy's promise."""

import collections
import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.inference.base import ModelRef
from meshinfer.proto.scheduling import (
    NodeView,
    Policy,
    SchedulerConfig,
    SchedulerState,
    choose,
    load_ratio,
    unplaced_reason,
)
from meshinfer.proto.tasks import WorkItem
from meshinfer.proto.tasks_wire import Tensor

MODELS = [("digits", "1"), ("digits", "2"), ("yolo", "1")]
NODE_IDS = [f"veh-{i}" for i in range(8)]


def exact_load(node: NodeView) -> Fraction:
    """The load ratio as an exact fraction: the oracle for the policies' float comparisons."""
    return Fraction(node.queue_depth, max(1, node.capacity))


@st.composite
def node_views(draw, node_id):
    return NodeView(
        node_id=node_id,
        alive=draw(st.booleans()),
        models=frozenset(draw(st.lists(st.sampled_from(MODELS), max_size=3))),
        roles=frozenset(draw(st.lists(st.sampled_from(["worker", "rsu"]), max_size=2))),
        has_gpu=draw(st.booleans()),
        free_gpu_memory=draw(st.none() | st.integers(0, 8).map(lambda g: g << 30)),
        queue_depth=draw(st.integers(0, 6)),
        capacity=draw(st.integers(0, 4)),
        rtt_s=draw(st.none() | st.sampled_from([0.001, 0.005, 0.02, 0.1])),
        contact_s=draw(st.none() | st.floats(0.0, 2.0)),
    )


@st.composite
def fleets(draw, min_size=0):
    ids = draw(st.lists(st.sampled_from(NODE_IDS), min_size=min_size, unique=True))
    return [draw(node_views(node_id)) for node_id in ids]


requirements = st.fixed_dictionaries(
    {},
    optional={
        "requires_gpu": st.booleans(),
        "min_gpu_memory": st.sampled_from([1 << 30, 4 << 30]),
        "requires_role": st.sampled_from(["worker", "rsu"]),
        "expected_runtime_s": st.floats(0.0, 1.0),
    },
)


def make_item(model=MODELS[0], rows=1, params=None) -> WorkItem:
    tensor = Tensor.from_array(np.zeros((rows, 2), np.float32))
    return WorkItem("t/0", "t", ModelRef(*model), tensor, params or {})


items = st.builds(
    make_item, st.sampled_from(MODELS), st.sampled_from([1, 8, 32, 128]), requirements
)


def expected_eligible(nodes, item, exclude) -> set[str]:
    """The eligibility rule, spelled out independently of the implementation."""
    params, model = item.params, (item.model.model_id, item.model.version)
    out = set()
    for n in nodes:
        if not n.alive or n.node_id in exclude or model not in n.models:
            continue
        if params.get("requires_gpu") and not n.has_gpu:
            continue
        need = params.get("min_gpu_memory")
        if need is not None and (n.free_gpu_memory or 0) < need:
            continue
        if "requires_role" in params and params["requires_role"] not in n.roles:
            continue
        out.add(n.node_id)
    return out


# --- invariants shared by every policy -----------------------------------------------------------


@pytest.mark.parametrize("policy", list(Policy))
@settings(max_examples=100, deadline=None)
@given(
    nodes=fleets(),
    item=items,
    exclude=st.frozensets(st.sampled_from(NODE_IDS), max_size=3),
    seed=st.integers(0, 2**32),
    calls=st.integers(1, 4),
)
def test_every_policy_picks_only_eligible_nodes(policy, nodes, item, exclude, seed, calls):
    allowed = expected_eligible(nodes, item, exclude)
    rng, state = random.Random(seed), SchedulerState()
    for _ in range(calls):
        chosen = choose(policy, nodes, item, exclude=exclude, rng=rng, state=state)
        if chosen is None:
            # only contact_aware may refuse while eligible nodes exist (they all leave too soon)
            assert not allowed or policy == Policy.CONTACT_AWARE
        else:
            assert chosen in allowed


def test_unknown_policy_names_are_refused():
    with pytest.raises(ValueError, match="fastest"):
        choose("fastest", [], make_item(), rng=random.Random(0), state=SchedulerState())


def test_policies_accept_their_string_values():
    node = NodeView("a", models=frozenset(MODELS))
    for policy in Policy:
        chosen = choose(
            policy.value, [node], make_item(), rng=random.Random(0), state=SchedulerState()
        )
        assert chosen == "a"


# --- round robin ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 8), calls=st.integers(1, 40), seed=st.integers(0, 1000))
def test_round_robin_spreads_evenly(count, calls, seed):
    nodes = [NodeView(f"n{i}", models=frozenset(MODELS)) for i in range(count)]
    random.Random(seed).shuffle(nodes)
    state, rng = SchedulerState(), random.Random(seed)
    picks = [
        choose(Policy.ROUND_ROBIN, nodes, make_item(), rng=rng, state=state) for _ in range(calls)
    ]
    tally = collections.Counter(picks)
    assert max(tally.values()) - min(tally.get(n.node_id, 0) for n in nodes) <= 1
    assert len(set(picks[:count])) == min(count, calls)


def test_round_robin_continues_after_a_node_leaves():
    nodes = [NodeView(f"n{i}", models=frozenset(MODELS)) for i in range(3)]
    state, rng = SchedulerState(), random.Random(0)
    assert choose(Policy.ROUND_ROBIN, nodes, make_item(), rng=rng, state=state) == "n0"
    assert choose(Policy.ROUND_ROBIN, nodes, make_item(), rng=rng, state=state) == "n1"
    remaining = [nodes[0], nodes[2]]
    assert choose(Policy.ROUND_ROBIN, remaining, make_item(), rng=rng, state=state) == "n2"
    assert choose(Policy.ROUND_ROBIN, remaining, make_item(), rng=rng, state=state) == "n0"


# --- least loaded / latency / capability ---------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(nodes=fleets(min_size=1), item=items, seed=st.integers(0, 2**32))
def test_least_loaded_never_picks_a_busier_node(nodes, item, seed):
    chosen = choose(
        Policy.LEAST_LOADED, nodes, item, rng=random.Random(seed), state=SchedulerState()
    )
    allowed = [n for n in nodes if n.node_id in expected_eligible(nodes, item, frozenset())]
    if chosen is not None:
        ratio = exact_load(next(n for n in nodes if n.node_id == chosen))
        assert all(ratio <= exact_load(n) for n in allowed)


def test_load_ratios_of_equal_fractions_tie():
    assert load_ratio(NodeView("a", queue_depth=1, capacity=2)) == load_ratio(
        NodeView("b", queue_depth=3, capacity=6)
    )
    assert load_ratio(NodeView("c", queue_depth=5, capacity=0)) == 5.0


def test_least_loaded_breaks_ties_with_the_rng():
    nodes = [
        NodeView(f"n{i}", models=frozenset(MODELS), queue_depth=1, capacity=2) for i in range(4)
    ]
    picks = {
        choose(
            Policy.LEAST_LOADED, nodes, make_item(), rng=random.Random(seed), state=SchedulerState()
        )
        for seed in range(40)
    }
    assert picks == {"n0", "n1", "n2", "n3"}


@settings(max_examples=120, deadline=None)
@given(nodes=fleets(min_size=1), item=items, seed=st.integers(0, 2**32))
def test_latency_picks_the_lowest_measured_rtt(nodes, item, seed):
    chosen = choose(Policy.LATENCY, nodes, item, rng=random.Random(seed), state=SchedulerState())
    allowed = [n for n in nodes if n.node_id in expected_eligible(nodes, item, frozenset())]
    measured = [n.rtt_s for n in allowed if n.rtt_s is not None]
    if chosen is not None and measured:
        assert next(n for n in nodes if n.node_id == chosen).rtt_s == min(measured)


@settings(max_examples=120, deadline=None)
@given(nodes=fleets(min_size=1), item=items, seed=st.integers(0, 2**32))
def test_capability_sends_large_batches_to_the_roomiest_gpu(nodes, item, seed):
    state = SchedulerState(SchedulerConfig(gpu_batch_rows=32))
    chosen = choose(Policy.CAPABILITY, nodes, item, rng=random.Random(seed), state=state)
    allowed = [n for n in nodes if n.node_id in expected_eligible(nodes, item, frozenset())]
    gpus = [n for n in allowed if n.has_gpu]
    if chosen is None or item.input.rows < 32 or not gpus:
        return
    node = next(n for n in nodes if n.node_id == chosen)
    assert node.has_gpu
    assert (node.free_gpu_memory or 0) == max(n.free_gpu_memory or 0 for n in gpus)


def test_capability_keeps_small_batches_on_the_least_loaded_node():
    cpu = NodeView("cpu", models=frozenset(MODELS), queue_depth=0, capacity=1)
    gpu = NodeView("gpu", models=frozenset(MODELS), has_gpu=True, free_gpu_memory=8 << 30,
                   queue_depth=3, capacity=4)  # fmt: skip
    args = dict(rng=random.Random(0), state=SchedulerState())
    assert choose(Policy.CAPABILITY, [cpu, gpu], make_item(rows=1), **args) == "cpu"
    assert choose(Policy.CAPABILITY, [cpu, gpu], make_item(rows=64), **args) == "gpu"
    need_gpu = make_item(rows=1, params={"requires_gpu": True})
    assert choose(Policy.CAPABILITY, [cpu, gpu], need_gpu, **args) == "gpu"
    assert choose(Policy.CAPABILITY, [cpu], need_gpu, **args) is None


# --- model affinity ------------------------------------------------------------------------------

AFFINITY_MODELS = [(f"model-{i}", "1") for i in range(24)]


@settings(max_examples=100, deadline=None)
@given(
    count=st.integers(2, 8),
    loads=st.lists(st.integers(0, 3), min_size=8, max_size=8),
    gone=st.integers(0, 7),
)
def test_affinity_is_stable_and_only_a_removed_nodes_models_move(count, loads, gone):
    nodes = [
        NodeView(f"n{i}", models=frozenset(AFFINITY_MODELS), queue_depth=loads[i], capacity=2)
        for i in range(count)
    ]
    state, rng = SchedulerState(), random.Random(0)

    def placement(fleet):
        return {
            m: choose(Policy.MODEL_AFFINITY, fleet, make_item(m), rng=rng, state=state)
            for m in AFFINITY_MODELS
        }

    before = placement(nodes)
    assert placement(nodes) == before  # unchanged fleet: unchanged placement
    fresh = SchedulerState()
    assert {m: choose(Policy.MODEL_AFFINITY, nodes, make_item(m), rng=rng, state=fresh)
            for m in AFFINITY_MODELS} == before  # fmt: skip
    removed = nodes[gone % count].node_id
    after = placement([n for n in nodes if n.node_id != removed])
    for model, node in before.items():
        if node == removed:
            assert after[model] != removed
        else:
            assert after[model] == node


def test_affinity_spreads_models_and_passes_over_saturated_nodes():
    nodes = [NodeView(f"n{i}", models=frozenset(AFFINITY_MODELS), capacity=2) for i in range(4)]
    state, rng = SchedulerState(), random.Random(0)
    spread = {choose(Policy.MODEL_AFFINITY, nodes, make_item(m), rng=rng, state=state)
              for m in AFFINITY_MODELS}  # fmt: skip
    assert len(spread) >= 3  # rendezvous hashing spreads 24 models over 4 nodes
    model = AFFINITY_MODELS[0]
    home = choose(Policy.MODEL_AFFINITY, nodes, make_item(model), rng=rng, state=state)
    busy = [NodeView(n.node_id, models=n.models, capacity=2, queue_depth=2 if n.node_id == home
                     else 0) for n in nodes]  # fmt: skip
    elsewhere = choose(Policy.MODEL_AFFINITY, busy, make_item(model), rng=rng, state=state)
    assert elsewhere != home
    # the model now sticks to where it ran last, even once its first home is free again
    assert choose(Policy.MODEL_AFFINITY, nodes, make_item(model), rng=rng, state=state) == elsewhere


# --- contact aware -------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(nodes=fleets(min_size=1), item=items, seed=st.integers(0, 2**32))
def test_contact_aware_skips_nodes_leaving_before_the_result_is_back(nodes, item, seed):
    config = SchedulerConfig()
    state = SchedulerState(config)
    chosen = choose(Policy.CONTACT_AWARE, nodes, item, rng=random.Random(seed), state=state)
    runtime = item.params.get("expected_runtime_s", config.default_runtime_s)

    def stays(n):
        rtt = config.default_rtt_s if n.rtt_s is None else n.rtt_s
        return n.contact_s is None or n.contact_s >= (runtime + rtt) * config.contact_safety

    allowed = [n for n in nodes if n.node_id in expected_eligible(nodes, item, frozenset())]
    staying = [n for n in allowed if stays(n)]
    assert (chosen is None) == (not staying)
    if chosen is not None:
        node = next(n for n in staying if n.node_id == chosen)
        assert all(exact_load(node) <= exact_load(n) for n in staying)


def test_contact_aware_learns_runtimes():
    state = SchedulerState(SchedulerConfig(default_runtime_s=0.1, runtime_smoothing=0.5))
    leaving = NodeView("car", models=frozenset(MODELS), contact_s=1.0, rtt_s=0.0)
    args = dict(rng=random.Random(0), state=state)
    assert choose(Policy.CONTACT_AWARE, [leaving], make_item(), **args) == "car"
    state.observe_runtime(MODELS[0], 2.0)
    state.observe_runtime(MODELS[0], 0.0)
    assert state.expected_runtime(MODELS[0]) == pytest.approx(1.0)
    assert choose(Policy.CONTACT_AWARE, [leaving], make_item(), **args) is None
    assert state.expected_runtime(MODELS[1]) == 0.1


# --- why an item is on no node -------------------------------------------------------------------

TURN = "waiting for its turn to be dispatched"


@pytest.mark.parametrize("policy", list(Policy))
@settings(max_examples=100, deadline=None)
@given(
    nodes=fleets(),
    item=items,
    full=st.frozensets(st.sampled_from(NODE_IDS), max_size=4),
    seed=st.integers(0, 2**32),
)
def test_the_unplaced_reason_says_turn_exactly_when_a_node_would_be_chosen(
    policy, nodes, item, full, seed
):
    state = SchedulerState()
    reason = unplaced_reason(policy, nodes, item, full=full, state=state)
    chosen = choose(policy, nodes, item, exclude=full, rng=random.Random(seed), state=state)
    assert (reason == TURN) == (chosen is not None), reason


def test_unplaced_reasons_name_the_first_thing_missing():
    state = SchedulerState()
    gpu = {"requires_gpu": True}
    cpu_node = NodeView("veh-0", models=frozenset({MODELS[0]}))
    gpu_node = NodeView("veh-1", models=frozenset({MODELS[0]}), has_gpu=True)
    dead_node = NodeView("veh-2", alive=False, models=frozenset({MODELS[1]}))
    leaving = NodeView("veh-3", models=frozenset({MODELS[0]}), contact_s=0.01)

    def why(nodes, params=None, model=MODELS[0], policy=Policy.LEAST_LOADED, full=frozenset()):
        item = make_item(model, params=params)
        return unplaced_reason(policy, nodes, item, full=full, state=state)

    assert why([]) == "no live, reachable node serves model digits@1"
    assert why([dead_node], model=MODELS[1]) == "no live, reachable node serves model digits@2"
    assert why([cpu_node], gpu) == (
        "no live node serving digits@1 (1) has what the item asks for: a GPU"
    )
    role = {"requires_role": "rsu", "min_gpu_memory": 1 << 30}
    assert why([cpu_node, gpu_node], role).endswith(
        "(2) has what the item asks for: 1073741824 bytes of free GPU memory, role 'rsu'"
    )
    assert why([leaving], policy=Policy.CONTACT_AWARE) == (
        "no node serving digits@1 is expected to stay in range long enough"
    )
    assert why([leaving]) == TURN  # only contact_aware minds the contact time
    assert why([cpu_node, gpu_node], gpu, full=frozenset({"veh-1"})) == (
        "every node that can run it (1) has its limit of items in flight"
    )
    assert why([cpu_node, gpu_node], gpu, full=frozenset({"veh-0"})) == TURN
