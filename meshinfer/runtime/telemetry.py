"""Node telemetry: host and GPU load and engine queues, as snapshots and as metric families.

Three parts:

* :class:`TelemetryCollector` samples CPU, memory and load average (psutil), GPU utilisation,
  memory, temperature and power (NVML via ``pynvml`` from ``nvidia-ml-py``; all None when the
  library or a GPU is absent) and folds in the batchers' :class:`BatcherStats`. ``collect`` blocks
  briefly (psutil/NVML syscalls); on the loop use ``await collector.sample(...)``, which runs it
  on the collector's own worker thread (always the same one: psutil keeps the CPU reading's
  baseline per thread).
* :class:`TelemetrySnapshot` is the compact, frozen result, gossiped in node state
  (:meth:`~TelemetrySnapshot.to_wire` / :meth:`~TelemetrySnapshot.from_wire`).
* :func:`snapshot_families` and :func:`batcher_families` turn telemetry into metric families
  for :meth:`~meshinfer.runtime.metrics.MetricsRegistry.add_collector` (the Prometheus
  registry lives in :mod:`meshinfer.runtime.metrics`).

Concurrency: the collector serialises its own samples with a lock, so ``sample`` may overlap itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import psutil

from meshinfer.errors import RemoteProtocolError
from meshinfer.inference.batching import BatcherStats
from meshinfer.runtime.metrics import (
    MetricFamily,
    Sample,
    family,
    histogram_samples,
)

log = logging.getLogger(__name__)

# --- snapshots ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TelemetrySnapshot:
    """One sample of a node's load. GPU fields are None without NVML or a GPU.

    GPU figures are summed over devices (memory, power), averaged (utilisation) or the maximum
    (temperature); ``gpu_memory_free_max_bytes`` is the free memory of the one device with the
    most (what a task that must fit on one GPU can have: the sum over devices is not). Engine
    figures come from the node's batchers: total queue depth, mean batch size over all batches
    so far, and the worst model's recent p50/p99 latency.
    """

    cpu_percent: float
    memory_percent: float
    memory_available_bytes: int
    load_average_1m: float | None = None
    gpu_count: int = 0
    gpu_utilization_percent: float | None = None
    gpu_memory_used_bytes: int | None = None
    gpu_memory_total_bytes: int | None = None
    gpu_temperature_c: float | None = None
    gpu_power_w: float | None = None
    queue_depth: int = 0
    mean_batch_size: float | None = None
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    gpu_memory_free_max_bytes: int | None = None

    def to_wire(self) -> dict[str, int | float]:
        """A msgpack-ready dict with short keys (:data:`WIRE_KEYS`); None fields are left out."""
        return {key: v for name, key in WIRE_KEYS.items() if (v := getattr(self, name)) is not None}

    @classmethod
    def from_wire(cls, doc: object) -> TelemetrySnapshot:
        """Decode a peer's :meth:`to_wire` dict. Unknown keys are ignored (newer peers).

        Raises RemoteProtocolError if a field is missing, of the wrong type, or out of range.
        """
        if not isinstance(doc, Mapping):
            raise RemoteProtocolError(f"telemetry must be a map, got {type(doc).__name__}")
        return cls(**{name: _wire_field(doc, name, key) for name, key in WIRE_KEYS.items()})


WIRE_KEYS = {
    "cpu_percent": "cpu",
    "memory_percent": "mem",
    "memory_available_bytes": "mem_free",
    "load_average_1m": "load1",
    "gpu_count": "gpus",
    "gpu_utilization_percent": "gpu_util",
    "gpu_memory_used_bytes": "gpu_mem",
    "gpu_memory_total_bytes": "gpu_mem_total",
    "gpu_temperature_c": "gpu_temp",
    "gpu_power_w": "gpu_watts",
    "queue_depth": "queue",
    "mean_batch_size": "batch",
    "latency_p50_s": "p50",
    "latency_p99_s": "p99",
    "gpu_memory_free_max_bytes": "gpu_free_max",
}
"""Snapshot field -> key in the gossiped map. Append only; never reuse a key."""

_WIRE_INTS = {"memory_available_bytes", "gpu_count", "gpu_memory_used_bytes"}
_WIRE_INTS |= {"gpu_memory_total_bytes", "queue_depth", "gpu_memory_free_max_bytes"}
_WIRE_REQUIRED = {"cpu_percent", "memory_percent", "memory_available_bytes"}
_WIRE_DEFAULTS = {"gpu_count": 0, "queue_depth": 0}


def _wire_field(doc: Mapping[Any, Any], name: str, key: str) -> int | float | None:
    if key not in doc:
        if name in _WIRE_REQUIRED:
            raise RemoteProtocolError(f"telemetry lacks {key!r} ({name})")
        return _WIRE_DEFAULTS.get(name)
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RemoteProtocolError(f"telemetry {key!r} ({name}) is not a number: {value!r}")
    if name in _WIRE_INTS and not isinstance(value, int):
        raise RemoteProtocolError(f"telemetry {key!r} ({name}) is not an integer: {value!r}")
    if not math.isfinite(value) or value < 0 or value > 2**63:
        raise RemoteProtocolError(f"telemetry {key!r} ({name}) out of range: {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class GpuSample:
    """NVML figures for all devices together (see :class:`TelemetrySnapshot`)."""

    count: int = 0
    utilization_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    memory_free_max_bytes: int | None = None  # the one device with the most free


class NvmlProbe:
    """Reads GPU figures through NVML; inert (``available`` False) if NVML cannot start."""

    def __init__(self) -> None:
        self.available = False
        self.reason = ""
        self.failing = False  # the last sample failed (warned once)
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors
            self.reason = f"NVML unavailable: {exc!r}"
            return
        self._nvml = pynvml
        self.available = True

    def sample(self) -> GpuSample:
        """Figures summed/averaged over every device; fields NVML cannot read are None."""
        if not self.available:
            return GpuSample()
        try:
            sample = self._sample_devices()
        # a GPU fell off the bus (NVMLError), or a binding that does not fit the driver raised
        # something else: report no figures, never raise (the node's telemetry loop logged an
        # ERROR); warned once until it reads again (it was every second)
        except Exception as exc:
            if not self.failing:
                log.warning("NVML sample failed, no GPU figures until it reads again: %r", exc)
            self.failing = True
            return GpuSample()
        self.failing = False
        return sample

    def _sample_devices(self) -> GpuSample:
        nvml = self._nvml
        # a device whose handle cannot be had (fallen off the bus, not ours in this container)
        # is left out; the others are still read (it cost every GPU's figures)
        count = int(_figure(nvml.nvmlDeviceGetCount(), MAX_GPUS))
        found = [self._read(lambda i: nvml.nvmlDeviceGetHandleByIndex(i), i) for i in range(count)]
        handles = [h for h in found if h is not None]
        utils = [
            self._read(lambda h: _figure(nvml.nvmlDeviceGetUtilizationRates(h).gpu, 100), h)
            for h in handles
        ]
        memory = [
            self._read(lambda h: _device_memory(nvml.nvmlDeviceGetMemoryInfo(h)), h)
            for h in handles
        ]
        temps = [
            self._read(
                lambda h: _figure(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)), h
            )
            for h in handles
        ]
        power_mw = [
            self._read(lambda h: _figure(nvml.nvmlDeviceGetPowerUsage(h)), h) for h in handles
        ]
        return GpuSample(
            count=len(handles),
            utilization_percent=_mean(utils),
            memory_used_bytes=_total([m[0] if m else None for m in memory]),
            memory_total_bytes=_total([m[1] if m else None for m in memory]),
            temperature_c=_maximum(temps),
            power_w=None if (mw := _total(power_mw)) is None else mw / 1000.0,
            memory_free_max_bytes=_maximum_int(
                [max(0, m[1] - m[0]) if m else None for m in memory]
            ),
        )

    def _read(self, read: Callable[[Any], Any], handle: Any) -> Any:
        try:
            return read(handle)
        # not supported on this device, transient, a binding without that call (an
        # AttributeError), or garbage (a ValueError of :func:`_figure`): that one figure of that
        # one device is left out, not every GPU's
        except Exception:
            return None

    def close(self) -> None:
        """Shut NVML down. Idempotent; a failing shutdown (a driver gone) is logged."""
        if self.available:
            self.available = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:  # an NVMLError, or a binding's own: on the way out
                log.warning("NVML shutdown failed: %r", exc)


MAX_GPUS = 1024
"""A device count NVML gives beyond this is garbage (no GPU figures, as for a failed sample):
each device is read in turn, and a count of billions held the worker for good."""
MAX_DEVICE_BYTES = 2**60
"""A GPU's memory (total or used) beyond one exbibyte is a garbage reading: that device's
memory figures are left out. (Its free memory is gossiped in MiB, which peers take up to
2**40: a bigger one made every peer refuse this node's state.)"""


def _figure(value: Any, high: float = 2**63) -> Any:
    """``value`` if it is a real number in ``0..high``, else ValueError: a sensor's garbage
    (NaN, an infinity, a negative or huge number, a string), read as a failed reading. So a
    snapshot is one that :meth:`TelemetrySnapshot.from_wire` takes."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= high:
        raise ValueError(f"a reading of {value!r} is not a number in 0..{high}")
    return value


def _device_memory(info: Any) -> tuple[int, int]:
    """``(used, total)`` bytes of one device's NVML memory info, checked (:func:`_figure`)."""
    used, total = (int(_figure(n, MAX_DEVICE_BYTES)) for n in (info.used, info.total))
    return used, total


def _known(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _mean(values: Iterable[float | None]) -> float | None:
    known = _known(values)
    return float(sum(known)) / len(known) if known else None


def _total(values: Iterable[float | None]) -> Any:
    known = _known(values)
    return sum(known) if known else None


def _maximum(values: Iterable[float | None]) -> float | None:
    known = _known(values)
    return float(max(known)) if known else None


def _maximum_int(values: Iterable[int | None]) -> int | None:
    known = _known(values)
    return int(max(known)) if known else None


class TelemetryCollector:
    """Samples host, GPU and engine figures into :class:`TelemetrySnapshot`.

    CPU percent is psutil's non-blocking ``cpu_percent(interval=None)``: the share of CPU time
    since the previous reading *on the same thread* (psutil keeps one baseline per thread). It
    is primed on construction on the collector's own worker thread, where :meth:`sample` always
    runs :meth:`collect` (a shared pool's threads each had a baseline of their own: a sample on
    a thread's first use read 0, later ones spanned whatever time since that thread's last
    use). Call :meth:`collect` from one thread only, or use :meth:`sample`. A reading less than
    ``min_cpu_interval_s`` (real time) after the last one reuses that value, because very short
    intervals give noise. Construction starts NVML (it may take a moment: do it at startup,
    or in a thread). Call :meth:`close` to release NVML.

    A host sensor that raises (psutil on a host where ``/proc`` is not readable, say) never
    makes :meth:`collect` raise: its figures stay at their last reading (0 before the first),
    and the failure is logged once until the sensor reads again. A reading that is garbage (not
    a finite number, negative, a percent over 100, a GPU's memory over
    :data:`MAX_DEVICE_BYTES`) is such a failure (a GPU figure is left out, as when NVML
    raises), so a snapshot passes :meth:`TelemetrySnapshot.from_wire`. The node's telemetry
    loop, which also gossips its queue depth, must not die of it. Nor must it hang on a sensor that
    never returns (an NVML call to a wedged GPU): :meth:`sample` gives up after
    ``sample_timeout_s``.
    """

    def __init__(
        self, *, gpu: bool = True, min_cpu_interval_s: float = 0.5, sample_timeout_s: float = 10.0
    ) -> None:
        self._lock = threading.Lock()
        self._nvml = NvmlProbe() if gpu else None
        self._min_cpu_interval_s = min_cpu_interval_s
        self._failing: set[str] = set()  # host sensors whose last reading failed
        self._worker = _DaemonWorker("meshinfer-telemetry")
        self._closed = False
        self._sample_timeout_s = sample_timeout_s
        self._reading: Future[TelemetrySnapshot] | None = None  # the worker's, while under way
        # primes psutil (its first reading is 0) on the thread that :meth:`sample` reads on
        self._worker.submit(self._read, "cpu_percent", _cpu_percent, 0.0).result()
        self._cpu_read_at = time.monotonic()  # real time: CPU shares are about real seconds
        self._cpu_percent = 0.0
        self._memory = (0.0, 0)  # (percent, available bytes) as last read
        self._load: float | None = None  # one-minute load average as last read

    @property
    def gpu_available(self) -> bool:
        """True if NVML started and GPU fields will be filled."""
        return self._nvml is not None and self._nvml.available

    def collect(self, engine_stats: Iterable[BatcherStats] = ()) -> TelemetrySnapshot:
        """Sample everything now. Blocks briefly: off the loop, use :meth:`sample`."""
        with self._lock:
            self._memory = self._read("virtual_memory", _memory, self._memory)
            self._load = self._read("getloadavg", _load_average, self._load)
            gpu = self._nvml.sample() if self._nvml is not None else GpuSample()
            return TelemetrySnapshot(
                cpu_percent=self._cpu(),
                memory_percent=self._memory[0],
                memory_available_bytes=self._memory[1],
                load_average_1m=self._load,
                gpu_count=gpu.count,
                gpu_utilization_percent=gpu.utilization_percent,
                gpu_memory_used_bytes=gpu.memory_used_bytes,
                gpu_memory_total_bytes=gpu.memory_total_bytes,
                gpu_temperature_c=gpu.temperature_c,
                gpu_power_w=gpu.power_w,
                gpu_memory_free_max_bytes=gpu.memory_free_max_bytes,
                **_engine_figures(tuple(engine_stats)),
            )

    async def sample(self, engine_stats: Iterable[BatcherStats] = ()) -> TelemetrySnapshot:
        """:meth:`collect` on the collector's worker thread, so the loop never blocks (after
        :meth:`close`, on a thread of the loop's pool). Runs on the loop.

        Raises TimeoutError if the host and GPU reading takes over ``sample_timeout_s`` (a hung
        NVML call): the caller keeps its last snapshot. That reading goes on on the worker, and
        the next call waits for it rather than queueing one more behind it (they piled up, one
        a second). Calls that overlap share one reading (one cancelled leaves it to the
        others); each gets its own engine figures.
        """
        engine = _engine_figures(tuple(engine_stats))
        try:
            host = await asyncio.wait_for(self._host_reading(), self._sample_timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"telemetry: reading host and GPU figures took over {self._sample_timeout_s} s"
                " (a hung NVML or /proc read?); it goes on in the background"
            ) from None
        return replace(host, **engine)

    def _host_reading(self) -> Awaitable[TelemetrySnapshot]:
        if self._closed:
            return asyncio.to_thread(self.collect)
        if self._reading is None or self._reading.done():
            self._reading = self._worker.submit(self.collect)
        # shielded: a caller cancelled (or timed out) while the shared reading still waited
        # for the worker cancelled that reading, and every other caller on it got a
        # CancelledError of nobody's asking. (The shield drops what it guards once its caller
        # has gone: a reading that fails after that is retrieved here, not an ERROR line.)
        reading = asyncio.wrap_future(self._reading)
        reading.add_done_callback(_retrieved)
        return asyncio.shield(reading)

    def _cpu(self) -> float:
        now = time.monotonic()
        if now - self._cpu_read_at >= self._min_cpu_interval_s:
            self._cpu_percent = self._read("cpu_percent", _cpu_percent, self._cpu_percent)
            self._cpu_read_at = now
        return self._cpu_percent

    def _read(self, sensor: str, read: Callable[[], Any], last: Any) -> Any:
        """``read()``, or ``last`` if the sensor raises (logged once until it reads again)."""
        try:
            value = read()
        except Exception as exc:  # psutil.Error, OSError, a /proc it cannot parse: any failure
            if sensor not in self._failing:
                log.warning("telemetry: %s failed, keeping its last reading: %r", sensor, exc)
                self._failing.add(sensor)
            return last
        self._failing.discard(sensor)
        return value

    def close(self) -> None:
        """Release NVML and the worker thread, after any sample under way (never waited for:
        NVML's shutdown waits on a hung call, so it runs on the worker, after it). No GPU
        figure is read from here on. Idempotent."""
        self._closed = True
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            self._worker.submit(nvml.close)
        self._worker.shutdown()


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _DaemonWorker:
    """One daemon thread running the calls submitted to it, in order. A ThreadPoolExecutor's
    thread is joined at interpreter exit: a call hung for good on it (NVML on a wedged GPU)
    held the daemon's exit after everything else had closed. This one is left behind."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple] | None]
        self._jobs = queue.SimpleQueue()
        self._shut = False
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, call: Callable[..., Any], *args: Any) -> Future[Any]:
        if self._shut:
            raise RuntimeError("submit after shutdown")
        future: Future[Any] = Future()
        self._jobs.put((future, call, args))
        return future

    def shutdown(self) -> None:
        """The thread ends once the calls submitted so far have run. Idempotent."""
        if not self._shut:
            self._shut = True
            self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, call, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call(*args))
                except BaseException as exc:  # handed to whoever waits on the future
                    future.set_exception(exc)


def _cpu_percent() -> float:
    return float(_figure(psutil.cpu_percent(interval=None), 100))


def _memory() -> tuple[float, int]:
    memory = psutil.virtual_memory()
    return float(_figure(memory.percent, 100)), int(_figure(memory.available))


def _load_average() -> float | None:
    try:
        load = psutil.getloadavg()[0]
    except (AttributeError, OSError):  # a platform without one: no figure, quietly
        return None
    return float(_figure(load))


def _engine_figures(stats: tuple[BatcherStats, ...]) -> dict[str, Any]:
    batches = sum(s.batches for s in stats)
    samples = sum(size * count for s in stats for size, count in s.batch_sizes)
    return {
        "queue_depth": sum(s.queue_depth for s in stats),
        "mean_batch_size": samples / batches if batches else None,
        "latency_p50_s": _maximum(s.latency_p50_s for s in stats),
        "latency_p99_s": _maximum(s.latency_p99_s for s in stats),
    }


# --- telemetry as metric families -------------------------------------------------------------

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_SNAPSHOT_GAUGES = (
    ("cpu_percent", "meshinfer_node_cpu_percent", "Host CPU utilisation, percent."),
    ("memory_percent", "meshinfer_node_memory_percent", "Host memory in use, percent."),
    ("memory_available_bytes", "meshinfer_node_memory_available_bytes", "Available memory."),
    ("load_average_1m", "meshinfer_node_load_average_1m", "One-minute load average."),
    ("gpu_count", "meshinfer_gpu_count", "GPUs visible through NVML."),
    ("gpu_utilization_percent", "meshinfer_gpu_utilization_percent", "Mean GPU utilisation."),
    ("gpu_memory_used_bytes", "meshinfer_gpu_memory_used_bytes", "GPU memory in use."),
    ("gpu_memory_total_bytes", "meshinfer_gpu_memory_total_bytes", "Total GPU memory."),
    ("gpu_temperature_c", "meshinfer_gpu_temperature_celsius", "Hottest GPU temperature."),
    ("gpu_power_w", "meshinfer_gpu_power_watts", "GPU power draw, all devices."),
    (
        "gpu_memory_free_max_bytes",
        "meshinfer_gpu_memory_free_max_bytes",
        "Free memory of the GPU with the most free (what one task can have).",
    ),
)


def snapshot_families(snapshot: TelemetrySnapshot) -> list[MetricFamily]:
    """Gauges for every field of ``snapshot`` that is set (GPU gauges vanish without a GPU)."""
    families = []
    for field_name, metric, help in _SNAPSHOT_GAUGES:
        value = getattr(snapshot, field_name)
        if value is not None:
            families.append(family(metric, "gauge", help, [({}, value)]))
    return families


def batcher_families(stats: Iterable[BatcherStats]) -> list[MetricFamily]:
    """Queue depth, request outcomes, batch-size and latency histograms, labelled by model."""
    depth, outcomes, sizes, latencies = [], [], [], []
    for s in stats:
        model = (("model", s.model),)
        depth.append(Sample("meshinfer_batcher_queue_depth", model, s.queue_depth))
        for outcome in ("completed", "failed", "expired", "rejected", "cancelled"):
            labels = (*model, ("outcome", outcome))
            outcomes.append(Sample("meshinfer_batcher_requests_total", labels, getattr(s, outcome)))
        sizes += histogram_samples("meshinfer_batcher_batch_size", model, *_batch_sizes(s))
        latencies += histogram_samples(
            "meshinfer_batcher_latency_seconds",
            model,
            [*s.latency_buckets, (math.inf, s.latency_count)],
            s.latency_sum_s,
        )
    return [
        MetricFamily("meshinfer_batcher_queue_depth", "gauge", "Requests waiting.", (*depth,)),
        MetricFamily(
            "meshinfer_batcher_requests_total", "counter", "Requests by outcome.", (*outcomes,)
        ),
        MetricFamily(
            "meshinfer_batcher_batch_size", "histogram", "Samples per engine call.", (*sizes,)
        ),
        MetricFamily(
            "meshinfer_batcher_latency_seconds",
            "histogram",
            "Submit-to-result latency.",
            (*latencies,),
        ),
    ]


def _batch_sizes(stats: BatcherStats) -> tuple[list[tuple[float, int]], int]:
    cumulative = [
        (float(bound), sum(c for size, c in stats.batch_sizes if size <= bound))
        for bound in BATCH_SIZE_BUCKETS
    ]
    total = sum(size * count for size, count in stats.batch_sizes)
    return [*cumulative, (math.inf, stats.batches)], total
