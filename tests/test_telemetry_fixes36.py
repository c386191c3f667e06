"""Session 36: telemetry readings that are garbage, the exposition read strictly, aggregation
properties (weighted averages between their inputs, an early majority final)."""

from __future__ import annotations

import math
import re
import sys
import threading
import types

import msgpack
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from meshinfer.errors import ConfigError
from meshinfer.proto.aggregation import AggregationConfig, Aggregator, Mode
from meshinfer.proto.membership_wire import NodeState, _state, encode_state
from meshinfer.runtime import telemetry
from meshinfer.runtime.metrics import MetricsRegistry
from meshinfer.runtime.telemetry import TelemetryCollector, TelemetrySnapshot
from node.daemon import NodeDaemon
from tests.test_telemetry import fake_nvml, make_stats

# --- telemetry: garbage readings -------------------------------------------------------------

GARBAGE = [math.nan, math.inf, -1.0, 1e300, 150.0]


def _round_trips(snap: TelemetrySnapshot) -> None:
    assert TelemetrySnapshot.from_wire(msgpack.unpackb(msgpack.packb(snap.to_wire()))) == snap


@pytest.mark.parametrize("garbage", GARBAGE, ids=["nan", "inf", "negative", "huge", "over-100"])
def test_a_garbage_host_reading_keeps_the_last_one(monkeypatch, garbage, caplog) -> None:
    collector = TelemetryCollector(gpu=False, min_cpu_interval_s=0.0)
    try:
        good = collector.collect()
        memory = types.SimpleNamespace(percent=garbage, available=garbage)
        monkeypatch.setattr(telemetry.psutil, "cpu_percent", lambda interval: garbage)
        monkeypatch.setattr(telemetry.psutil, "virtual_memory", lambda: memory)
        monkeypatch.setattr(telemetry.psutil, "getloadavg", lambda: (-garbage, 0.0, 0.0))
        snap = collector.collect()
    finally:
        collector.close()
    assert (snap.cpu_percent, snap.memory_percent) == (good.cpu_percent, good.memory_percent)
    assert snap.memory_available_bytes == good.memory_available_bytes
    _round_trips(snap)  # (a NaN, a negative or a huge figure made it one no peer takes)
    assert "telemetry: cpu_percent failed" in caplog.text  # logged, as a sensor that raises


def _garbage_nvml() -> types.ModuleType:
    """fake_nvml's two GPUs, the first reading garbage for every figure (the second reads
    used 2000 of 8000 bytes at 60 C, no power or utilisation)."""
    nvml = fake_nvml()
    read_memory, read_temp = nvml.nvmlDeviceGetMemoryInfo, nvml.nvmlDeviceGetTemperature
    good_util, good_power = nvml.nvmlDeviceGetUtilizationRates, nvml.nvmlDeviceGetPowerUsage
    nvml.nvmlDeviceGetMemoryInfo = lambda h: (  # type: ignore[attr-defined]
        types.SimpleNamespace(used=0, total=2**64 - 1) if h == 0 else read_memory(h)
    )
    nvml.nvmlDeviceGetTemperature = lambda h, s: -273 if h == 0 else read_temp(h, s)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: (  # type: ignore[attr-defined]
        types.SimpleNamespace(gpu=math.nan) if h == 0 else good_util(h)
    )
    nvml.nvmlDeviceGetPowerUsage = lambda h: math.inf if h == 0 else good_power(h)  # type: ignore[attr-defined]
    return nvml


def test_a_gpus_garbage_figures_are_left_out_and_the_gossip_stays_valid(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _garbage_nvml())
    collector = TelemetryCollector(gpu=True)
    try:
        snap = collector.collect()
    finally:
        collector.close()
    assert snap.gpu_count == 2
    assert (snap.gpu_memory_used_bytes, snap.gpu_memory_total_bytes) == (2000, 8000)
    assert snap.gpu_memory_free_max_bytes == 6000  # (was 2**64 - 1: the garbage device's)
    assert (snap.gpu_temperature_c, snap.gpu_utilization_percent, snap.gpu_power_w) == (
        60.0,
        None,
        None,
    )
    _round_trips(snap)
    # the free memory a node gossips (MiB) is one every peer's decoder takes (2**44 MiB was
    # refused: the node's whole state record with it)
    free_mb = NodeDaemon._gpu_free_mb(types.SimpleNamespace(snapshot=snap))  # type: ignore[arg-type]
    state = NodeState(host="h", port=1, gpu_free_mb=free_mb)
    assert _state(msgpack.unpackb(encode_state(state))).gpu_free_mb == free_mb


async def test_a_garbage_device_count_is_no_reading_not_a_hung_worker(monkeypatch) -> None:
    nvml = fake_nvml()
    nvml.nvmlDeviceGetCount = lambda: 10**12  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    collector = TelemetryCollector(gpu=True, sample_timeout_s=10.0)
    try:
        snap = await collector.sample()  # (read a handle 10**12 times on the worker before)
    finally:
        collector.close()
    assert snap.gpu_count == 0 and snap.gpu_memory_free_max_bytes is None


def _telemetry_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "meshinfer-telemetry"}


async def test_without_nvml_no_gpu_figures_and_close_ends_the_thread() -> None:
    # (the real path here: no pynvml installed, or no driver; no fake module)
    before = _telemetry_threads()
    collector = TelemetryCollector(gpu=True)
    (thread,) = _telemetry_threads() - before
    snap = await collector.sample()
    assert not collector.gpu_available
    assert snap.gpu_count == 0 and snap.gpu_memory_total_bytes is None
    _round_trips(snap)
    collector.close()
    collector.close()  # idempotent
    thread.join(timeout=10)
    assert not thread.is_alive()
    _round_trips(await collector.sample())  # after close: on the loop's pool, still a snapshot


# --- the exposition, read strictly -----------------------------------------------------------

_SAMPLE_LINE = re.compile(
    r'(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*",?)*)\})?'
    r" (?P<value>[-+]?(Inf|NaN|[0-9.eE+-]+))"
)


def _strict_families(text: str) -> dict[str, str]:
    """Name -> kind, checking every line: HELP then TYPE once per family, each sample line
    well formed and of the family just declared."""
    assert text.endswith("\n")
    kinds: dict[str, str] = {}
    helped: set[str] = set()
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helped, f"HELP twice for {name}"
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helped and name not in kinds, line
            kinds[name], current = kind, name
        else:
            match = _SAMPLE_LINE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            suffixes = ("_bucket", "_sum", "_count") if kinds[current] == "histogram" else ("",)
            assert match["name"] in {current + s for s in suffixes}, line
    return kinds


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=20), st.text(max_size=20))
def test_a_whole_page_with_odd_label_values_reads_back_strictly(model: str, node: str) -> None:
    registry = MetricsRegistry()
    registry.counter("meshinfer_x_total", "Things.", ["node"]).labels(node).inc(3)
    registry.histogram("meshinfer_y_seconds", "Latency.", ["node"]).labels(node).observe(0.2)
    stats = [make_stats(model, {1: 2, 3: 1}), make_stats(model + "2", {2048: 1})]
    registry.add_collector(lambda: telemetry.batcher_families(stats))
    snap = TelemetrySnapshot(cpu_percent=1.0, memory_percent=2.0, memory_available_bytes=3)
    registry.add_collector(lambda: telemetry.snapshot_families(snap))
    text = registry.render()
    kinds = _strict_families(text)
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert kinds["meshinfer_batcher_requests_total"] == "counter"
    models = {s.labels["model"] for s in parsed["meshinfer_batcher_queue_depth"].samples}
    assert models == {model, model + "2"}
    for name in ("meshinfer_y_seconds", "meshinfer_batcher_batch_size"):
        by_series: dict[tuple, list] = {}
        for s in parsed[name].samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            by_series.setdefault(key, []).append(s)
        for samples in by_series.values():
            buckets = [s for s in samples if s.name.endswith("_bucket")]
            counts = [s.value for s in buckets]
            assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
            (count,) = [s.value for s in samples if s.name.endswith("_count")]
            assert count == counts[-1]


# --- aggregation -----------------------------------------------------------------------------

any_float = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True)
weight = st.floats(1e-300, 1e300)


def _weighted(outputs, weights) -> float:
    sources = [f"s{i}" for i in range(len(outputs))]
    config = AggregationConfig(Mode.WEIGHTED, weights=dict(zip(sources, weights, strict=True)))
    agg = Aggregator(config, sources, now=0.0)
    for source, value in zip(sources, outputs, strict=True):
        agg.add(source, np.array([value]), 0.0)
    return float(agg.result().value[0])


def test_an_average_of_subnormal_outputs_does_not_step_past_them() -> None:
    outputs = [0.0, 1.597499948812809e-40, 0.0, 1.597499948812809e-40]
    weights = [1.0, 7.300825836464392e299, 1.0, 7.42870523268392e299]
    assert _weighted(outputs, weights) <= max(outputs)  # (was one ulp above it)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(any_float, weight), min_size=1, max_size=5))
@example([(0.0, 1.0), (5e-324, 1e300), (0.0, 1.0), (5e-324, 7e299)])
def test_a_weighted_average_of_finite_outputs_lies_between_them(pairs) -> None:
    outputs, weights = zip(*pairs, strict=True)
    value = _weighted(outputs, weights)
    assert math.isfinite(value) and min(outputs) <= value <= max(outputs)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 6), st.integers(1, 3))
def test_a_majority_decided_early_is_the_one_every_vote_gives(data, voters, elements) -> None:
    """Whatever the votes still out are (labels, NaN rows that abstain), a vote decided early
    has the winners the whole vote has."""
    score = st.floats(-2, 2) | st.just(math.nan)
    outputs = [
        np.array(data.draw(st.lists(st.lists(score, min_size=3, max_size=3), min_size=elements,
                                    max_size=elements)))
        for _ in range(voters)
    ]  # fmt: skip
    sources = [f"s{i}" for i in range(voters)]
    early, whole = (Aggregator(AggregationConfig(Mode.MAJORITY), sources, now=0.0) for _ in "ab")
    for source, output in zip(sources, outputs, strict=True):
        whole.add(source, output, 0.0)
        if not early.is_done(0.0):
            early.add(source, output, 0.0)
    assert whole.result().reason == "complete"
    assert np.array_equal(early.result().value, whole.result().value)


def test_an_aggregation_every_source_failed_is_failed_with_no_value() -> None:
    for mode in Mode:
        agg = Aggregator(AggregationConfig(mode), ["a", "b"], now=0.0)
        agg.add_failure("a", 0.0)
        agg.add_failure("b", 0.0)
        result = agg.result()
        assert (result.failed, result.partial, result.value, result.reason) == (
            True,
            False,
            None,
            "exhausted",
        )


@pytest.mark.parametrize(
    "options",
    [
        {"quorum": 1.5},  # (acted as a quorum of 2)
        {"quorum": True},
        {"min_responses": 1.5},  # (acted as 2)
        {"timeout_s": "1"},  # (a TypeError from the comparison)
        {"weights": {"a": "2"}},
        {"weights": {"a": True}},
        {"mode": "nope"},  # (acted as weighted)
    ],
)
def test_options_of_the_wrong_type_are_a_config_error_naming_them(options) -> None:
    config = AggregationConfig(**{"mode": Mode.ENSEMBLE, **options})
    with pytest.raises(ConfigError, match=re.escape(f"aggregation.{next(iter(options))} ")):
        Aggregator(config, ["a", "b"], now=0.0)


def test_options_of_numpy_types_and_a_mode_given_as_its_string_are_taken() -> None:
    config = AggregationConfig("ensemble", quorum=np.int64(1), weights={"a": np.float32(2)})
    agg = Aggregator(config, ["a", "b"], now=0.0)
    agg.add("a", np.array([1.0]), 0.0)
    assert agg.result().reason == "complete"
