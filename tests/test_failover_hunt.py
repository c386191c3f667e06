"""Faults found hunting in retries, scheduling policies and metrics, pinned down.

Scheduling policies given degenerate gossiped figures (NaN, negative, infinite or huge loads,
RTTs, GPU memory, runtimes) never raise, choose only eligible nodes, deterministically, and
agree with :func:`unplaced_reason`. The Prometheus text stays valid whatever the metrics are
fed (one HELP and TYPE per family, NaN observations in no finite bucket, no counter at NaN,
nothing of a collector that failed half-way). A host sensor that raises does not make the
telemetry collector raise. The coordinator's retry backoff does not overflow. A node that
flaps (lost, back, lost) is given up on, and reachable again, once each time.
"""

from __future__ import annotations

import math
import random
import sys
import types
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from coordinator.failover import Reachability
from meshinfer.errors import LocalProtocolError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.membership import MemberEvent, MemberEventKind
from meshinfer.proto.scheduling import (
    NodeView,
    Policy,
    SchedulerState,
    choose,
    eligible,
    load_ratio,
    unplaced_reason,
)
from meshinfer.proto.tasks import WorkItem
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime import telemetry
from meshinfer.runtime.metrics import MetricsRegistry, family
from meshinfer.runtime.telemetry import TelemetryCollector
from tests.helpers import until
from tests.test_coordinator_failover import FakePeers

MODEL = ("digits", "1")


def make_item(params=None, rows=1) -> WorkItem:
    tensor = Tensor.from_array(np.zeros((rows, 2), np.float32))
    return WorkItem("t/0", "t", ModelRef(*MODEL), tensor, params or {})


# --- scheduling: degenerate gossiped figures ---------------------------------------------------

odd_numbers = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 10**400, -(10**400)])
counts = st.integers(-3, 6) | odd_numbers
seconds = st.none() | st.floats(0.0, 2.0) | odd_numbers


@st.composite
def odd_views(draw, node_id):
    return NodeView(
        node_id=node_id,
        alive=draw(st.booleans()),
        models=frozenset([MODEL]) if draw(st.booleans()) else frozenset(),
        has_gpu=draw(st.booleans()),
        free_gpu_memory=draw(st.none() | st.integers(-1, 8 << 30) | odd_numbers),
        queue_depth=draw(counts),
        capacity=draw(counts),
        rtt_s=draw(seconds),
        contact_s=draw(seconds),
    )


@st.composite
def odd_fleets(draw):
    count = draw(st.integers(0, 6))
    return [draw(odd_views(f"veh-{i}")) for i in range(count)]


odd_params = st.fixed_dictionaries(
    {},
    optional={
        "requires_gpu": st.booleans(),
        "min_gpu_memory": st.integers(-1, 4 << 30),
        "expected_runtime_s": st.floats(allow_nan=True) | st.integers(-5, 5),
    },
)


@pytest.mark.parametrize("policy", list(Policy))
@settings(max_examples=150, deadline=None)
@given(
    nodes=odd_fleets(),
    params=odd_params,
    rows=st.sampled_from([1, 64]),
    runtime=st.none() | st.floats(allow_nan=True),
    seed=st.integers(0, 2**32),
)
def test_policies_never_raise_on_degenerate_figures(policy, nodes, params, rows, runtime, seed):
    """Never an exception; only an eligible node; the same node again from the same seed and
    state; and "its turn" as the reason exactly when a node is chosen."""
    item = make_item(params, rows)
    state = SchedulerState()
    if runtime is not None:
        state.observe_runtime(MODEL, runtime)
    allowed = {n.node_id for n in eligible(nodes, item, frozenset())}
    twin = SchedulerState(runtime_s=dict(state.runtime_s))
    reason = unplaced_reason(policy, nodes, item, state=state)
    chosen = choose(policy, nodes, item, rng=random.Random(seed), state=state)
    again = choose(policy, nodes, item, rng=random.Random(seed), state=twin)
    assert chosen is None or chosen in allowed
    assert chosen == again
    assert (chosen is not None) == (reason == "waiting for its turn to be dispatched")


@pytest.mark.parametrize("policy", list(Policy))
def test_a_nan_rtt_or_unbounded_load_does_not_raise(policy):
    """Were ValueError (a NaN RTT first: latency found no node at the lowest RTT), IndexError
    (infinite depth over infinite capacity: a NaN load tied with nothing) and OverflowError (a
    depth, or for contact_aware an RTT, beyond any float)."""
    sane = NodeView("veh-b", models=frozenset([MODEL]), rtt_s=0.01)
    odd_rtts = [
        NodeView("veh-a", models=frozenset([MODEL]), rtt_s=rtt, contact_s=5.0)
        for rtt in (math.nan, -1.0, math.inf, 10**400)
    ]
    odd_loads = [
        NodeView("veh-a", models=frozenset([MODEL]), queue_depth=math.inf, capacity=math.inf),
        NodeView("veh-a", models=frozenset([MODEL]), queue_depth=10**400),
    ]
    for odd in odd_rtts + odd_loads:
        chosen = choose(policy, [odd, sane], make_item(), rng=random.Random(1),
                        state=SchedulerState())  # fmt: skip
        if policy is Policy.LATENCY or (odd in odd_loads and policy is Policy.LEAST_LOADED):
            assert chosen == "veh-b", odd  # an unusable RTT is none; such a load the highest
        else:
            assert chosen in ("veh-a", "veh-b")


def test_loads_beyond_floats_are_the_highest():
    assert load_ratio(NodeView("a", queue_depth=10**400)) == math.inf
    assert load_ratio(NodeView("a", queue_depth=math.inf, capacity=math.inf)) == math.inf
    assert load_ratio(NodeView("a", queue_depth=3, capacity=4)) == 0.75


def test_capability_with_a_nan_free_gpu_memory_still_chooses():
    """Was ValueError: the most free memory came out NaN, and no node had it."""
    nodes = [
        NodeView("veh-a", models=frozenset([MODEL]), has_gpu=True, free_gpu_memory=math.nan),
        NodeView("veh-b", models=frozenset([MODEL]), has_gpu=True, free_gpu_memory=1 << 30),
    ]
    chosen = choose(Policy.CAPABILITY, nodes, make_item(rows=64), rng=random.Random(1),
                    state=SchedulerState())  # fmt: skip
    assert chosen == "veh-b"
    asks = make_item({"min_gpu_memory": 1})  # NaN memory meets no requirement
    assert eligible(nodes, asks, frozenset()) == [nodes[1]]


@pytest.mark.parametrize("bad", [math.inf, math.nan, -1.0])
def test_one_bad_runtime_observation_does_not_poison_contact_aware(bad):
    """An infinite observation made the moving average NaN at the next one (inf + a*(x-inf)),
    and a NaN one for good: every moving node was then too short-lived for contact_aware."""
    state = SchedulerState()
    state.observe_runtime(MODEL, 0.1)
    state.observe_runtime(MODEL, bad)
    state.observe_runtime(MODEL, 0.1)
    assert state.expected_runtime(MODEL) == pytest.approx(0.1)
    moving = NodeView("veh-a", models=frozenset([MODEL]), contact_s=10.0)
    for params in ({}, {"expected_runtime_s": bad}):
        chosen = choose(Policy.CONTACT_AWARE, [moving], make_item(params),
                        rng=random.Random(1), state=state)  # fmt: skip
        assert chosen == "veh-a"


def test_thousands_of_nodes_every_policy_chooses():
    nodes = [
        NodeView(f"veh-{i:05}", models=frozenset([MODEL]), queue_depth=i % 7, capacity=4)
        for i in range(5000)
    ]
    for policy in Policy:
        assert choose(policy, nodes, make_item(), rng=random.Random(3), state=SchedulerState())


# --- Prometheus text ---------------------------------------------------------------------------


def type_lines(text: str) -> Counter[str]:
    return Counter(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE "))


def test_a_nan_observation_lands_in_no_bucket():
    """It landed in the first bucket (bisect of NaN): a NaN latency passed for 0.1 s or less;
    then in +Inf only, its sum NaN for good; now it is refused and nothing is recorded."""
    registry = MetricsRegistry()
    latency = registry.histogram("rpc_seconds", "RPC latency.", buckets=[0.1, 1.0])
    with pytest.raises(LocalProtocolError, match="finite"):
        latency.observe(math.nan)
    latency.observe(0.5)
    samples = {
        (s.name, s.labels.get("le")): s.value
        for fam in text_string_to_metric_families(registry.render())
        for s in fam.samples
    }
    assert samples[("rpc_seconds_bucket", "0.1")] == 0
    assert samples[("rpc_seconds_bucket", "1.0")] == 1
    assert samples[("rpc_seconds_bucket", "+Inf")] == 1
    assert samples[("rpc_seconds_count", None)] == 1
    assert samples[("rpc_seconds_sum", None)] == 0.5


def test_a_counter_refuses_nan():
    """inc(NaN) passed the ``amount < 0`` check and left the counter at NaN for good."""
    counter = MetricsRegistry().counter("frames_total", "Frames.")
    with pytest.raises(LocalProtocolError, match="only goes up"):
        counter.inc(math.nan)
    counter.inc(2)
    assert counter.labels().value == 2


@pytest.mark.parametrize("bucket", [math.nan, -math.inf])
def test_histogram_bounds_must_be_finite(bucket):
    with pytest.raises(LocalProtocolError, match="distinct finite buckets"):
        MetricsRegistry().histogram("h_seconds", "H.", buckets=[bucket, 1.0])


def test_a_collector_failing_half_way_is_left_out_whole():
    """A generator collector's families yielded before it raised were rendered all the same."""
    registry = MetricsRegistry()
    registry.gauge("alive", "Still here.").set(1)

    def half_way():
        yield family("half_done", "gauge", "Yielded before the failure.", [({}, 1.0)])
        raise RuntimeError("collector bug")

    registry.add_collector(half_way)
    text = registry.render()
    assert "half_done" not in text
    assert "alive 1.0" in text


def test_families_of_one_name_render_as_one_group():
    """Two sources of one family name gave two HELP and TYPE lines: invalid text, which a
    Prometheus server refuses whole. Their samples are merged; a clash of kinds is left out."""
    registry = MetricsRegistry()
    registry.gauge("meshinfer_queue", "Queued.", ["model"]).labels("a@1").set(3)
    registry.add_collector(
        lambda: [family("meshinfer_queue", "gauge", "Queued.", [({"model": "b@1"}, 4.0)])]
    )
    registry.add_collector(lambda: [family("meshinfer_queue", "counter", "Clash.", [({}, 1.0)])])
    text = registry.render()
    assert type_lines(text) == {"meshinfer_queue": 1}
    (fam,) = text_string_to_metric_families(text)
    assert fam.type == "gauge"
    assert sorted(s.labels["model"] for s in fam.samples) == ["a@1", "b@1"]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a_total", "b", "c_seconds"]),
            st.sampled_from(["counter", "gauge"]),
            st.text(max_size=8),
            st.floats(allow_nan=True, allow_infinity=True),
        ),
        max_size=8,
    )
)
def test_any_mix_of_collected_families_renders_valid_text(parts):
    registry = MetricsRegistry()
    for name, kind, label, value in parts:
        registry.add_collector(lambda n=name, k=kind, v=label, x=value: [
            family(n, k, f"{n}.", [({"v": v}, x)])
        ])  # fmt: skip
    text = registry.render()
    assert all(count == 1 for count in type_lines(text).values())
    names = [fam.name for fam in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))


# --- telemetry on a host whose sensors fail ---------------------------------------------------


def test_a_raising_memory_sensor_keeps_its_last_reading(monkeypatch, caplog):
    """``psutil.virtual_memory`` raising made ``collect`` raise, which ends the node daemon's
    telemetry loop for good: its gossiped queue depth went stale from then on."""
    collector = TelemetryCollector(gpu=False, min_cpu_interval_s=0.0)
    first = collector.collect()

    def broken():
        raise OSError("/proc/meminfo: permission denied")

    monkeypatch.setattr(telemetry.psutil, "virtual_memory", broken)
    snaps = [collector.collect(), collector.collect()]
    assert all(s.memory_available_bytes == first.memory_available_bytes for s in snaps)
    assert caplog.text.count("virtual_memory failed") == 1  # once, not every second


def test_a_raising_cpu_sensor_fails_neither_the_start_nor_a_sample(monkeypatch):
    def broken(interval=None):
        raise RuntimeError("no /proc/stat")

    monkeypatch.setattr(telemetry.psutil, "cpu_percent", broken)
    collector = TelemetryCollector(gpu=False, min_cpu_interval_s=0.0)
    assert collector.collect().cpu_percent == 0.0


def test_a_failing_nvml_shutdown_does_not_raise_from_close(monkeypatch):
    """The node daemon's ``aclose`` promises to log errors, not raise them: a GPU fallen off
    the bus made NVML's shutdown raise out of it."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def shutdown():
        raise NVMLError("GPU is lost")

    nvml.NVMLError = NVMLError
    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = shutdown
    nvml.nvmlDeviceGetCount = lambda: 0
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    collector = TelemetryCollector()
    assert collector.gpu_available
    collector.close()
    collector.close()
    assert not collector.gpu_available


# --- the coordinator's retries ----------------------------------------------------------------


# --- a node that flaps ------------------------------------------------------------------------


async def test_a_flapping_node_is_given_up_on_and_back_once_each_time():
    """Lost (no answer: given up on, out of scheduling), back (a new session: in again), lost
    again: given up on once more. Each loss re-dispatches once; nothing is kept of it once
    membership forgets it."""
    peers = FakePeers()
    peers.dialled.set()  # dials fail at once
    member = SimpleNamespace(node_id="veh-a", incarnation=0)
    counts = SimpleNamespace(sessions_lost=0, sessions_closed=0, redials_ok=0)
    lost: list[str] = []
    resent: list[str] = []
    membership = SimpleNamespace(core=SimpleNamespace(member=lambda _node: member))
    mesh = SimpleNamespace(peers=peers, revocation_sync=None, membership=membership)
    reach = Reachability(
        mesh, counts, redial_timeout_s=5.0, on_lost=lambda node, _why: lost.append(node),
        on_back=lambda: None, on_resend=resent.append,
    )  # fmt: skip
    reach.start()
    try:
        for round_ in (1, 2, 3):
            session = peers.open("veh-a")
            assert reach.reachable(member)
            session.end(lost=True)
            await until(lambda r=round_: len(lost) == r)
            assert not reach.reachable(member)
        assert lost == ["veh-a"] * 3 and resent == [] and counts.sessions_lost == 3
        reach.on_member(MemberEvent(MemberEventKind.FORGOTTEN, member, at=0.0))
        assert reach.reachable(member)
    finally:
        await reach.aclose()
