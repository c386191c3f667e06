"""Faults found reviewing telemetry and the Prometheus registry (session 34).

No GPU here: the NVML cases use the fake ``pynvml`` module of ``tests.test_telemetry``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshinfer.errors import LocalProtocolError
from meshinfer.runtime import telemetry
from meshinfer.runtime.metrics import MetricFamily, MetricsRegistry, Sample, family
from meshinfer.runtime.telemetry import TelemetrySnapshot, snapshot_families
from tests.test_telemetry import fake_nvml, make_stats

# --- names: a trailing newline passed the charset check ----------------------------------------


def test_a_name_ending_in_a_newline_is_refused() -> None:
    """``^...$`` matched before a final newline: the name passed and split its line."""
    registry = MetricsRegistry()
    with pytest.raises(LocalProtocolError, match="invalid metric name"):
        registry.gauge("meshinfer_x\n", "X.")
    with pytest.raises(LocalProtocolError, match="invalid label name"):
        registry.gauge("meshinfer_y", "Y.", ["model\n"])


@pytest.mark.parametrize(
    "bad",
    [
        family("meshinfer_x\n", "gauge", "X.", [({}, 1)]),
        family("meshinfer_x", "gauge", "X.", [({"model\n": "m"}, 1)]),
    ],
    ids=["metric-name", "label-name"],
)
def test_a_collector_name_ending_in_a_newline_is_left_out(bad: MetricFamily) -> None:
    registry = MetricsRegistry()
    registry.gauge("alive", "Still here.").set(1)
    registry.add_collector(lambda: [bad])
    text = registry.render()
    assert [f.name for f in text_string_to_metric_families(text)] == ["alive"]
    assert "meshinfer_x" not in text


# --- values that would poison a series for good --------------------------------------------------


@pytest.mark.parametrize("amount", [math.inf, math.nan, -1.0])
def test_a_counter_refuses_an_amount_it_could_never_come_back_from(amount: float) -> None:
    counter = MetricsRegistry().counter("meshinfer_x_total", "X.")
    counter.inc(2)
    with pytest.raises(LocalProtocolError, match="only goes up"):
        counter.inc(amount)
    counter.inc()
    assert counter.labels().value == 3.0


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_histogram_refuses_a_value_that_would_poison_its_sum(value: float) -> None:
    registry = MetricsRegistry()
    latency = registry.histogram("meshinfer_x_seconds", "X.", buckets=[0.1, 1.0])
    latency.observe(0.5)
    with pytest.raises(LocalProtocolError, match="finite"):
        latency.observe(value)
    latency.observe(0.05)
    values = {
        s.name: s.value
        for f in text_string_to_metric_families(registry.render())
        for s in f.samples
        if s.name != "meshinfer_x_seconds_bucket"
    }
    assert values == {"meshinfer_x_seconds_sum": 0.55, "meshinfer_x_seconds_count": 2.0}


# --- a collector's histogram buckets -----------------------------------------------------------


def _histogram(buckets: list[tuple[str, float]], count: float | None = None) -> MetricFamily:
    model = (("model", "m@1"),)
    samples = [Sample("h_bucket", (*model, ("le", le)), n) for le, n in buckets]
    total = buckets[-1][1] if count is None else count
    samples += [Sample("h_sum", model, 1.0), Sample("h_count", model, total)]
    return MetricFamily("h", "histogram", "H.", tuple(samples))


@pytest.mark.parametrize(
    "bad",
    [
        _histogram([("1.0", 1), ("0.5", 2), ("+Inf", 3)]),
        _histogram([("0.5", 1), ("1.0", 2)]),
        _histogram([("0.5", 2), ("1.0", 1), ("+Inf", 3)]),
        _histogram([("NaN", 1), ("+Inf", 1)]),
        _histogram([("one", 1), ("+Inf", 1)]),
        _histogram([("0.5", 1), ("+Inf", 2)], count=5),
        _histogram([("0.5", -1), ("+Inf", 2)]),
        _histogram([("0.5", math.nan), ("+Inf", 2)]),
    ],
    ids=["unsorted", "no-inf", "falling", "nan-bound", "word", "count", "negative", "nan-count"],
)
def test_a_collector_histogram_that_is_not_one_is_left_out(bad: MetricFamily, caplog) -> None:
    good = _histogram([("0.5", 1), ("1.0", 1), ("+Inf", 2)])
    registry = MetricsRegistry()
    registry.add_collector(lambda: [bad])
    with caplog.at_level(logging.ERROR, logger="meshinfer.runtime.metrics"):
        assert registry.render() == ""
    assert any("'h' left out" in r.getMessage() for r in caplog.records)
    good_text = MetricsRegistry().render([good])
    (parsed,) = text_string_to_metric_families(good_text)
    assert len(parsed.samples) == 5


# --- GPU free memory: what one device has, not the sum -----------------------------------------


def _two_gpus_half_used() -> TelemetrySnapshot:
    """Two 8 GiB GPUs, 4 GiB used on each: 8 GiB free in all, 4 GiB on either."""
    gib = 1 << 30
    return TelemetrySnapshot(
        1.0,
        2.0,
        3,
        gpu_count=2,
        gpu_memory_used_bytes=8 * gib,
        gpu_memory_total_bytes=16 * gib,
        gpu_memory_free_max_bytes=4 * gib,
    )


def test_the_snapshot_has_the_free_memory_of_the_freest_gpu(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())  # 8000 each, 1000 and 2000 used
    collector = telemetry.TelemetryCollector()
    try:
        snap = collector.collect()
    finally:
        collector.close()
    assert snap.gpu_memory_free_max_bytes == 7000  # not 13000, the sum
    assert TelemetrySnapshot.from_wire(snap.to_wire()) == snap
    (gauge,) = [f for f in snapshot_families(snap) if "free_max" in f.name]
    assert gauge.samples[0].value == 7000


def test_the_gossiped_free_gpu_memory_is_one_devices() -> None:
    from node.daemon import NodeDaemon

    daemon = SimpleNamespace(snapshot=_two_gpus_half_used())
    assert NodeDaemon._gpu_free_mb(daemon) == 4096  # type: ignore[arg-type]


# --- a hung sensor: sample gives up, and does not queue behind it --------------------------------


async def test_a_hung_nvml_call_times_the_sample_out_and_is_not_queued_again(monkeypatch) -> None:
    """A hung NVML call stalled ``sample`` (and the node's telemetry loop, which also gossips
    its queue depth) for good."""
    nvml = fake_nvml()
    release, reads = threading.Event(), []

    def hung_count() -> int:
        reads.append(1)
        release.wait(30)
        return 2

    nvml.nvmlDeviceGetCount = hung_count  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    collector = telemetry.TelemetryCollector(sample_timeout_s=0.2)
    try:
        with pytest.raises(TimeoutError, match="hung NVML"):
            await collector.sample()
        with pytest.raises(TimeoutError):
            await collector.sample()
        assert len(reads) == 1  # the second waited for the reading under way
        release.set()
        stats = [make_stats("a@1", {4: 2}, depth=3)]
        a, b = await asyncio.gather(collector.sample(stats), collector.sample())
        assert (a.gpu_count, a.queue_depth, b.queue_depth) == (2, 3, 0)
    finally:
        release.set()
        collector.close()
