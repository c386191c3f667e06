"""Telemetry: host/GPU sampling, snapshot wire decoding, and the Prometheus text exposition.

Rendered text is parsed back with ``prometheus_client.parser`` (a test-only dependency).
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import types

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from meshinfer.errors import LocalProtocolError, RemoteProtocolError
from meshinfer.inference.batching import LATENCY_BUCKETS_S, BatcherStats
from meshinfer.runtime import metrics, telemetry
from meshinfer.runtime.metrics import MetricsRegistry
from meshinfer.runtime.telemetry import (
    WIRE_KEYS,
    TelemetryCollector,
    TelemetrySnapshot,
    batcher_families,
    snapshot_families,
)

GPU_FIELDS = (
    "gpu_utilization_percent",
    "gpu_memory_used_bytes",
    "gpu_memory_total_bytes",
    "gpu_temperature_c",
    "gpu_power_w",
)


def parse(text: str) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def make_stats(model: str, batch_sizes: dict[int, int], depth: int = 0) -> BatcherStats:
    latencies = (0.002, 0.02, 0.2)
    buckets = tuple((b, sum(lat <= b for lat in latencies)) for b in LATENCY_BUCKETS_S)
    return BatcherStats(
        model=model,
        queue_depth=depth,
        queued_samples=depth,
        in_flight_batches=0,
        submitted=10,
        completed=7,
        failed=1,
        expired=1,
        rejected=1,
        cancelled=0,
        batches=sum(batch_sizes.values()),
        batch_sizes=tuple(sorted(batch_sizes.items())),
        latency_buckets=buckets,
        latency_count=3,
        latency_sum_s=sum(latencies),
        latency_p50_s=0.02,
        latency_p99_s=0.2,
    )


# --- collector ----------------------------------------------------------------------------------


def test_collect_reports_host_figures_and_gpu_consistently() -> None:
    collector = TelemetryCollector()
    try:
        snap = collector.collect()
    finally:
        collector.close()
    assert 0.0 <= snap.cpu_percent <= 100.0
    assert 0.0 < snap.memory_percent < 100.0
    assert snap.memory_available_bytes > 0
    assert snap.load_average_1m is not None and snap.load_average_1m >= 0
    gpu_values = [getattr(snap, name) for name in GPU_FIELDS]
    if collector.gpu_available and snap.gpu_count:
        assert all(v is not None for v in gpu_values[1:3]), gpu_values
    else:
        assert gpu_values == [None] * len(GPU_FIELDS)
        assert snap.gpu_count == 0


def test_missing_nvml_means_none_fields_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = types.ModuleType("pynvml")

    def fail() -> None:
        raise OSError("NVML Shared Library Not Found")

    broken.nvmlInit = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    collector = TelemetryCollector()
    snap = collector.collect()
    collector.close()
    assert not collector.gpu_available
    assert [getattr(snap, name) for name in GPU_FIELDS] == [None] * len(GPU_FIELDS)


def fake_nvml() -> types.ModuleType:
    """Two fake GPUs; the second cannot report power or utilisation."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def unsupported(handle: int) -> None:
        if handle == 1:
            raise NVMLError("Not Supported")

    def utilization(handle: int) -> types.SimpleNamespace:
        unsupported(handle)
        return types.SimpleNamespace(gpu=40)

    def power(handle: int) -> int:
        unsupported(handle)
        return 150_000  # milliwatts

    nvml.NVMLError = NVMLError  # type: ignore[attr-defined]
    nvml.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = utilization  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetPowerUsage = power  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        used=1000 * (h + 1), total=8000
    )
    nvml.nvmlDeviceGetTemperature = lambda h, sensor: 50 + 10 * h  # type: ignore[attr-defined]
    return nvml


def test_gpu_figures_are_aggregated_over_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    collector = TelemetryCollector()
    snap = collector.collect()
    collector.close()
    assert collector.gpu_available is False  # closed
    assert snap.gpu_count == 2
    assert snap.gpu_utilization_percent == 40.0  # the unsupported device is left out
    assert (snap.gpu_memory_used_bytes, snap.gpu_memory_total_bytes) == (3000, 16000)
    assert snap.gpu_temperature_c == 60.0
    assert snap.gpu_power_w == 150.0


def test_cpu_percent_is_cached_between_close_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([0.0, 12.5, 50.0, 75.0])
    monkeypatch.setattr(telemetry.psutil, "cpu_percent", lambda interval: next(readings))
    collector = TelemetryCollector(gpu=False, min_cpu_interval_s=0.0)
    assert collector.collect().cpu_percent == 12.5
    assert collector.collect().cpu_percent == 50.0
    slow = TelemetryCollector(gpu=False, min_cpu_interval_s=3600.0)
    assert slow.collect().cpu_percent == slow.collect().cpu_percent == 0.0  # primed, cached


async def test_sample_runs_off_the_loop_thread() -> None:
    collector = TelemetryCollector(gpu=False)
    threads: list[int] = []
    original = collector.collect

    def recording_collect(stats: tuple = ()) -> TelemetrySnapshot:
        threads.append(threading.get_ident())
        return original(stats)

    collector.collect = recording_collect  # type: ignore[method-assign]
    snap = await collector.sample([make_stats("a@1", {4: 2}, depth=3)])
    assert threads and threads[0] != threading.get_ident()
    assert snap.queue_depth == 3


def test_engine_figures_fold_batcher_stats() -> None:
    collector = TelemetryCollector(gpu=False)
    stats = [make_stats("a@1", {4: 2}, depth=3), make_stats("b@1", {1: 1, 10: 1}, depth=2)]
    snap = collector.collect(stats)
    assert snap.queue_depth == 5
    assert snap.mean_batch_size == pytest.approx((8 + 1 + 10) / 4)
    assert (snap.latency_p50_s, snap.latency_p99_s) == (0.02, 0.2)
    assert collector.collect().mean_batch_size is None


# --- wire form ----------------------------------------------------------------------------------

optional_float = st.none() | st.floats(0, 1e6, allow_nan=False)
optional_int = st.none() | st.integers(0, 2**40)
snapshots = st.builds(
    TelemetrySnapshot,
    cpu_percent=st.floats(0, 100),
    memory_percent=st.floats(0, 100),
    memory_available_bytes=st.integers(0, 2**40),
    load_average_1m=optional_float,
    gpu_count=st.integers(0, 8),
    gpu_utilization_percent=optional_float,
    gpu_memory_used_bytes=optional_int,
    gpu_memory_total_bytes=optional_int,
    gpu_temperature_c=optional_float,
    gpu_power_w=optional_float,
    queue_depth=st.integers(0, 10_000),
    mean_batch_size=optional_float,
    latency_p50_s=optional_float,
    latency_p99_s=optional_float,
)


@settings(max_examples=200)
@given(snapshots)
def test_snapshot_survives_the_wire(snapshot: TelemetrySnapshot) -> None:
    wire = msgpack.unpackb(msgpack.packb(snapshot.to_wire()))
    assert TelemetrySnapshot.from_wire(wire) == snapshot


wire_values = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from([*WIRE_KEYS.values(), "extra"]) | st.text(max_size=4),
        wire_values,
        max_size=16,
    )
    | wire_values
)
def test_from_wire_accepts_or_raises_remote_protocol_error(doc: object) -> None:
    try:
        snap = TelemetrySnapshot.from_wire(doc)
    except RemoteProtocolError:
        return
    assert snap.cpu_percent >= 0 and isinstance(snap.memory_available_bytes, int)


def test_from_wire_names_the_bad_field() -> None:
    good = TelemetrySnapshot(1.0, 2.0, 3).to_wire()
    with pytest.raises(RemoteProtocolError, match="queue_depth"):
        TelemetrySnapshot.from_wire({**good, "queue": 1.5})
    with pytest.raises(RemoteProtocolError, match="cpu_percent"):
        TelemetrySnapshot.from_wire({"mem": 1.0, "mem_free": 1})
    with pytest.raises(RemoteProtocolError, match="out of range"):
        TelemetrySnapshot.from_wire({**good, "gpu_watts": math.inf})
    assert set(good) == {"cpu", "mem", "mem_free", "gpus", "queue"}


# --- Prometheus exposition ---------------------------------------------------------------------


def test_counter_and_gauge_render_with_help_type_and_labels() -> None:
    registry = MetricsRegistry()
    sent = registry.counter("meshinfer_frames_sent_total", "Frames sent.", ["link"])
    peers = registry.gauge("meshinfer_peers", "Connected peers.")
    sent.labels("v2v").inc()
    sent.labels(link="v2i").inc(3)
    peers.set(4)
    peers.dec()
    text = registry.render()
    assert text.splitlines()[:2] == [
        "# HELP meshinfer_frames_sent_total Frames sent.",
        "# TYPE meshinfer_frames_sent_total counter",
    ]
    assert 'meshinfer_frames_sent_total{link="v2i"} 3.0\n' in text
    assert "meshinfer_peers 3.0\n" in text
    assert text.endswith("\n")
    values = sample_values(text)
    assert values[("meshinfer_frames_sent_total", (("link", "v2v"),))] == 1.0
    assert parse(text)["meshinfer_peers"].type == "gauge"


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    registry = MetricsRegistry()
    latency = registry.histogram("rpc_seconds", "RPC latency.", ["peer"], buckets=[0.1, 1.0])
    for value in (0.05, 0.1, 0.5, 7.0):
        latency.labels("a").observe(value)
    text = registry.render()
    assert 'rpc_seconds_bucket{peer="a",le="0.1"} 2.0' in text  # 0.1 falls in le="0.1"
    assert 'rpc_seconds_bucket{peer="a",le="1.0"} 3.0' in text
    assert 'rpc_seconds_bucket{peer="a",le="+Inf"} 4.0' in text
    values = sample_values(text)
    assert values[("rpc_seconds_count", (("peer", "a"),))] == 4.0
    assert values[("rpc_seconds_sum", (("peer", "a"),))] == pytest.approx(7.65)
    assert parse(text)["rpc_seconds"].type == "histogram"


def test_label_values_and_help_are_escaped() -> None:
    registry = MetricsRegistry()
    gauge = registry.gauge("odd", 'Help with \\ backslash\nand "newline".', ["path"])
    gauge.labels('C:\\dir\n"quoted"').set(1)
    text = registry.render()
    assert '# HELP odd Help with \\\\ backslash\\nand "newline".' in text
    assert 'odd{path="C:\\\\dir\\n\\"quoted\\""} 1.0' in text
    family = parse(text)["odd"]
    assert family.documentation == 'Help with \\ backslash\nand "newline".'
    assert family.samples[0].labels == {"path": 'C:\\dir\n"quoted"'}


@settings(max_examples=200)
@given(st.text(max_size=30), st.floats(allow_nan=False) | st.just(math.inf))
def test_any_label_value_parses_back(value: str, number: float) -> None:
    registry = MetricsRegistry()
    registry.gauge("g", "A gauge.", ["v"]).labels(value).set(number)
    (sample,) = parse(registry.render())["g"].samples
    assert sample.labels == {"v": value}
    assert sample.value == number


def test_special_values_render_as_prometheus_spells_them() -> None:
    assert [metrics.format_value(v) for v in (math.inf, -math.inf, math.nan, 2)] == [
        "+Inf",
        "-Inf",
        "NaN",
        "2.0",
    ]


def test_misuse_is_a_local_protocol_error() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("ok_total", "Fine.", ["a"])
    with pytest.raises(LocalProtocolError, match="invalid metric name"):
        registry.gauge("bad-name", "x")
    with pytest.raises(LocalProtocolError, match="invalid label name"):
        registry.gauge("g", "x", ["__reserved"])
    with pytest.raises(LocalProtocolError, match="invalid label name"):
        registry.histogram("h", "x", ["le"])
    with pytest.raises(LocalProtocolError, match="already registered"):
        registry.counter("ok_total", "Again.")
    with pytest.raises(LocalProtocolError, match="takes labels"):
        counter.labels("x", "y")
    with pytest.raises(LocalProtocolError, match=r"use \.labels"):
        counter.inc()
    with pytest.raises(LocalProtocolError, match="only goes up"):
        counter.labels("x").inc(-1)


def test_failing_collector_is_left_out_and_the_rest_renders() -> None:
    registry = MetricsRegistry()
    registry.gauge("alive", "Still here.").set(1)

    def broken() -> list:
        raise RuntimeError("collector bug")

    registry.add_collector(broken)
    registry.add_collector(lambda: snapshot_families(TelemetrySnapshot(5.0, 6.0, 7)))
    values = sample_values(registry.render())
    assert values[("alive", ())] == 1.0
    assert values[("meshinfer_node_cpu_percent", ())] == 5.0


def test_snapshot_families_leave_out_absent_gpu() -> None:
    names = {f.name for f in snapshot_families(TelemetrySnapshot(1.0, 2.0, 3))}
    assert "meshinfer_node_cpu_percent" in names
    assert not any(
        name.startswith("meshinfer_gpu_") and name != "meshinfer_gpu_count" for name in names
    )
    with_gpu = TelemetrySnapshot(1.0, 2.0, 3, gpu_count=1, gpu_temperature_c=61.0)
    assert "meshinfer_gpu_temperature_celsius" in {f.name for f in snapshot_families(with_gpu)}


def test_batcher_families_parse_back_per_model() -> None:
    registry = MetricsRegistry()
    stats = [make_stats("digits-mlp@1", {1: 2, 64: 3}, depth=5), make_stats("x@2", {3: 1})]
    registry.add_collector(lambda: batcher_families(stats))
    text = registry.render()
    values = sample_values(text)
    model = ("model", "digits-mlp@1")
    assert values[("meshinfer_batcher_queue_depth", (model,))] == 5.0
    assert values[("meshinfer_batcher_requests_total", (model, ("outcome", "failed")))] == 1.0
    assert values[("meshinfer_batcher_batch_size_bucket", (("le", "1.0"), model))] == 2.0
    assert values[("meshinfer_batcher_batch_size_bucket", (("le", "32.0"), model))] == 2.0
    assert values[("meshinfer_batcher_batch_size_bucket", (("le", "+Inf"), model))] == 5.0
    assert values[("meshinfer_batcher_batch_size_sum", (model,))] == 2 + 64 * 3
    assert values[("meshinfer_batcher_latency_seconds_count", (model,))] == 3.0
    assert values[("meshinfer_batcher_latency_seconds_bucket", (("le", "0.005"), model))] == 1.0
    assert parse(text)["meshinfer_batcher_latency_seconds"].type == "histogram"


def test_collector_can_run_concurrently_from_threads() -> None:
    collector = TelemetryCollector(gpu=False)

    async def both() -> list[TelemetrySnapshot]:
        return await asyncio.gather(collector.sample(), collector.sample())

    snaps = asyncio.run(both())
    assert len(snaps) == 2 and all(s.memory_available_bytes > 0 for s in snaps)
