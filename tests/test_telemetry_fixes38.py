"""Session 38: a collector's family that raised out of the page (an integer beyond a float, a
lone surrogate in a label value or HELP, a label name not a str) is left out, the rest still
renders; a cancelled telemetry sample leaves the reading another caller shares alone."""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshinfer.runtime.metrics import MetricFamily, MetricsRegistry, Sample, family
from meshinfer.runtime.telemetry import TelemetryCollector, TelemetrySnapshot


class _Status(enum.Enum):
    UP = "up"


BAD_FAMILIES = {
    "int-beyond-float": family("bad_total", "counter", "Too big.", [({}, 10**400)]),
    "surrogate-label": family("bad", "gauge", "A node id.", [({"node": "n\ud800"}, 1)]),
    "surrogate-help": family("bad", "gauge", "Help \udcff.", [({}, 1)]),
    "label-name-not-str": MetricFamily(
        "bad",
        "gauge",
        "Enum label.",
        (Sample("bad", ((_Status.UP, "x"),), 1),),  # type: ignore[arg-type]
    ),
    "name-not-str": MetricFamily(7, "gauge", "A number.", ()),  # type: ignore[arg-type]
    "not-a-family": ("bad", "gauge"),
}


@pytest.mark.parametrize("bad", BAD_FAMILIES.values(), ids=BAD_FAMILIES.keys())
def test_a_family_that_cannot_be_written_is_left_out_not_the_page(bad, caplog) -> None:
    registry = MetricsRegistry()
    registry.add_collector(lambda: [bad, family("good", "gauge", "Fine: é.", [({"m": "é"}, 2)])])
    with caplog.at_level(logging.ERROR, logger="meshinfer.runtime.metrics"):
        text = registry.render()
        registry.render()  # (logged once)
    body = text.encode()  # (as the daemons answer it: a surrogate raised here)
    assert "bad" not in body.decode()
    parsed = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert [s.value for s in parsed["good"].samples] == [2.0]
    assert [s.labels for s in parsed["good"].samples] == [{"m": "é"}]
    assert len([r for r in caplog.records if "left out" in r.getMessage()]) == 1


def test_an_integer_a_float_holds_still_renders() -> None:
    registry = MetricsRegistry()
    registry.add_collector(lambda: [family("big_total", "counter", "Big.", [({}, 2**1023)])])
    text = registry.render()
    (parsed,) = text_string_to_metric_families(text)
    assert parsed.samples[0].value == float(2**1023)


async def test_a_cancelled_sample_leaves_the_shared_reading_to_the_other_caller() -> None:
    collector = TelemetryCollector(gpu=False, min_cpu_interval_s=0.0)
    gate = threading.Event()
    try:
        busy = collector._worker.submit(gate.wait, 10)  # the worker busy: the reading queued
        first = asyncio.create_task(collector.sample())
        second = asyncio.create_task(collector.sample())
        for _ in range(100):  # both waiting on the one reading, still queued behind `busy`
            if collector._reading is not None:
                break
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert collector._reading is not None and not collector._reading.running()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        assert busy.result(timeout=10)
        snapshot = await asyncio.wait_for(second, 10)
        assert isinstance(snapshot, TelemetrySnapshot)
    finally:
        gate.set()
        collector.close()


async def test_a_reading_that_fails_after_its_caller_timed_out_is_no_error_line(caplog) -> None:
    collector = TelemetryCollector(gpu=False, min_cpu_interval_s=0.0, sample_timeout_s=0.05)
    gate = threading.Event()

    def hung_then_failing(*_: object) -> TelemetrySnapshot:
        gate.wait(10)
        raise RuntimeError("the GPU fell off the bus")

    collector.collect = hung_then_failing  # type: ignore[method-assign]
    try:
        with pytest.raises(TimeoutError):
            await collector.sample()
        reading = collector._reading
        assert reading is not None
        gate.set()
        with pytest.raises(RuntimeError):
            reading.result(timeout=10)
        for _ in range(3):  # the loop runs the chained callbacks
            await asyncio.sleep(0)
        # (the reading holds the loop's futures chained to it; the worker holds it until its
        # next job)
        collector._reading = reading = None
        collector._worker.submit(int).result(timeout=10)
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            gc.collect()
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    finally:
        gate.set()
        collector.close()
