"""Faults found reviewing host and GPU telemetry and the Prometheus exposition (session 33).

No GPU here: the NVML cases use the fake ``pynvml`` module of ``tests.test_telemetry``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter
from types import SimpleNamespace

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshinfer.runtime import telemetry
from meshinfer.runtime.mesh_metrics import mesh_families
from meshinfer.runtime.metrics import MetricsRegistry, family
from tests.test_membership_flood import _core, _small
from tests.test_telemetry import fake_nvml

# --- CPU percent: psutil keeps its baseline per thread ----------------------------------------


def test_sampled_cpu_percent_spans_the_time_since_the_last_sample(monkeypatch) -> None:
    """``sample`` ran ``collect`` on whichever thread of the loop's pool was free, and psutil
    measures from that thread's own last reading: a thread's first sample read 0 (or the
    share since whenever that thread last read)."""
    kind = type(psutil.cpu_times())
    clock = {"user": 1e9, "idle": 9e9}  # cumulative seconds, 10 % busy since boot

    def cpu_times(percpu: bool = False) -> object:
        return kind(**{**dict.fromkeys(kind._fields, 0.0), **clock})

    monkeypatch.setattr(telemetry.psutil, "cpu_times", cpu_times)
    collector = telemetry.TelemetryCollector(gpu=False, min_cpu_interval_s=0.0)

    async def two_samples() -> list[float]:
        clock.update(user=clock["user"] + 50, idle=clock["idle"] + 50)
        first = await collector.sample()
        clock.update(user=clock["user"] + 30, idle=clock["idle"] + 10)
        return [first.cpu_percent, (await collector.sample()).cpu_percent]

    try:
        assert asyncio.run(two_samples()) == [50.0, 75.0]
    finally:
        collector.close()


async def test_a_closed_collector_still_samples() -> None:
    collector = telemetry.TelemetryCollector(gpu=False)
    collector.close()
    collector.close()  # idempotent
    assert (await collector.sample()).memory_available_bytes > 0


# --- NVML: one device failing ----------------------------------------------------------------


def test_a_gpu_whose_handle_fails_leaves_the_other_gpus_figures(monkeypatch) -> None:
    """A GPU fallen off the bus (its handle raises) cost every GPU's figures, and the node
    gossiped no free GPU memory."""
    nvml = fake_nvml()

    def handle(index: int) -> int:
        if index == 1:
            raise nvml.NVMLError("GPU is lost")
        return index

    nvml.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    collector = telemetry.TelemetryCollector()
    try:
        snap = collector.collect()
    finally:
        collector.close()
    assert snap.gpu_count == 1
    assert (snap.gpu_memory_used_bytes, snap.gpu_memory_total_bytes) == (1000, 8000)
    assert (snap.gpu_utilization_percent, snap.gpu_power_w) == (40.0, 150.0)


def test_a_binding_without_one_call_leaves_the_other_figures(monkeypatch) -> None:
    """An nvidia-ml-py without ``nvmlDeviceGetPowerUsage`` (an AttributeError, read before the
    per-device guard) cost the memory figures too."""
    nvml = fake_nvml()
    del nvml.nvmlDeviceGetPowerUsage
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    collector = telemetry.TelemetryCollector()
    try:
        snap = collector.collect()
    finally:
        collector.close()
    assert snap.gpu_power_w is None
    assert (snap.gpu_count, snap.gpu_memory_total_bytes) == (2, 16000)


# --- the exposition: what a collector yields is checked -------------------------------------


def _registry(*families: object) -> MetricsRegistry:
    registry = MetricsRegistry()
    registry.gauge("alive", "Still here.", ["k"]).labels("a").set(1)
    registry.add_collector(lambda: list(families))
    return registry


def _render(*families: object) -> str:
    return _registry(*families).render()


def test_a_family_with_a_value_of_none_is_left_out_not_the_page(caplog) -> None:
    """A value of None made ``render`` raise: ``/metrics`` answered 500."""
    bad = family("meshinfer_x", "gauge", "X.", [({}, None)])  # type: ignore[list-item]
    good = family("meshinfer_y", "gauge", "Y.", [({}, 2)])
    with caplog.at_level(logging.ERROR, logger="meshinfer.runtime.metrics"):
        registry = _registry(bad, good)
        text = registry.render()
        assert registry.render() == text  # (logged once, not at every scrape)
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names == {"alive", "meshinfer_y"}
    assert len([r for r in caplog.records if "meshinfer_x" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    "bad",
    [
        family("meshinfer_x", "gauge", "X.", [({"bad-label": "v"}, 1)]),
        family("meshinfer-x", "gauge", "X.", [({}, 1)]),
        family("meshinfer_x", "summary?", "X.", [({}, 1)]),
        family("meshinfer_x", "gauge", "X.", [({"a": "1"}, 1), ({"a": "1"}, 2)]),
    ],
    ids=["label-name", "metric-name", "kind", "series-twice"],
)
def test_a_family_the_text_format_cannot_hold_is_left_out(bad) -> None:
    text = _render(bad)
    parsed = list(text_string_to_metric_families(text))  # (raised on the bad line)
    assert [f.name for f in parsed] == ["alive"]
    assert "meshinfer" not in text


def test_a_series_given_twice_is_written_once() -> None:
    """A collector's series that a registered metric of its name had already was written
    twice (a duplicate series: Prometheus drops it, OpenMetrics parsers refuse the page)."""
    twice = family("alive", "gauge", "Still here.", [({"k": "a"}, 5), ({"k": "b"}, 6)])
    lines = [line for line in _render(twice).splitlines() if not line.startswith("#")]
    assert lines == ['alive{k="a"} 1.0', 'alive{k="b"} 6.0']


# --- mesh families: members by status ----------------------------------------------------------


def test_members_by_status_lists_every_status_at_zero_too() -> None:
    """Only statuses some member had were written: once the last suspect recovered, the
    series vanished (no data, not 0)."""
    stats = SimpleNamespace(verified=0, abandoned=0, dropped=Counter(), from_revoked=Counter())
    mesh = SimpleNamespace(
        metrics=SimpleNamespace(
            handshake_failures={},
            handshakes_ok=0,
            protocol_errors=0,
            messages_received=0,
            messages_sent=0,
            records_received=0,
            records_sent=0,
        ),
        peers=SimpleNamespace(connected=(), stats=stats),
        membership=SimpleNamespace(core=_core(_small(8))),  # a real membership core
        revocation_sync=None,
    )
    (members,) = [f for f in mesh_families(mesh) if f.name == "meshinfer_members"]
    by_status = {dict(s.labels)["status"]: s.value for s in members.samples}
    assert by_status["suspect"] == by_status["dead"] == by_status["left"] == 0
    assert by_status["alive"] >= 1


def test_families_the_caller_computed_are_checked_as_a_collectors_are(caplog) -> None:
    """The coordinator's /metrics appended its own and its mesh's families unchecked after the
    registry's page (``render_family`` each): a bad one made it answer 500, and one repeating a
    registered name wrote a second TYPE line. They go through ``render(extra)`` now."""
    bad = family("meshinfer_x", "gauge", "X.", [({}, None)])  # type: ignore[list-item]
    again = family("alive", "gauge", "Alive again.", [({"node": "n"}, 1)])
    good = family("meshinfer_y", "gauge", "Y.", [({}, 2)])
    with caplog.at_level(logging.ERROR, logger="meshinfer.runtime.metrics"):
        text = _registry().render([bad, again, good])
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(parsed) == {"alive", "meshinfer_y"}
    assert len(parsed["alive"].samples) == 2  # merged under one TYPE line
    assert text.count("# TYPE alive ") == 1
