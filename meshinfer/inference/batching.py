"""A dynamic batcher in front of one model on one :class:`InferenceEngine`.

Callers ``await batcher.submit(inputs)`` with one sample or a small batch. A dispatcher task
collects waiting requests into one batch -- until ``max_batch_size`` samples are waiting or
``max_queue_delay_s`` has passed since the oldest waiting request arrived -- runs a single
``engine.infer`` and hands each caller its own rows of the result. Higher priorities are served
first (a heap ordered by ``(-priority, arrival)``: FIFO within a priority).

Request lifecycle (``_State``)::

    QUEUED --taken into a batch--> DISPATCHED --engine returns/fails--> future done
    QUEUED --deadline passes-----> EXPIRED    (DeadlineExceededError; never reaches the engine)
    QUEUED --submitter cancelled-> CANCELLED  (dropped from the queue)
    QUEUED --batcher closes------> CLOSED     (InferenceError naming the batcher)

Only QUEUED requests count towards the queue bound; the heap drops the others lazily when they
surface (and is compacted when they pile up), so memory stays bounded by ``max_queue_size``.
Priorities are strict: under sustained higher-priority load, lower priorities wait.

Bad input fails its own request only. Before a request joins the queue it is checked against
the model's input tensor (the ``input_spec`` given, else the one the engine reports through its
optional ``input_spec(ref)`` method), converted to the model's floating dtype (so float64 and
float32 requests share batches) and checked for NaN and infinity *as that dtype* (a float64
1e300 is infinite as float32). Outputs are checked too: a request whose rows of the result hold
NaN or infinity (inputs too large for the model) fails with an InferenceError saying so, while
the other requests of its batch get their answers. A batch never holds more rows than the
engine's ``capacity().max_batch_size`` (read at :meth:`DynamicBatcher.start`).

Concurrency: everything here runs on one event loop and reads time only from ``loop.time()``,
so the batcher runs unchanged on a virtual-time loop. Not thread-safe. Converting and checking
a request larger than :data:`INLINE_MAX_BYTES`, joining a batch that large, and checking outputs
that large, run in the batcher's one worker thread, never on the loop. The engine is told which
batch it was handed checked (:data:`~meshinfer.inference.base.CHECKED_BATCH`), so that it need
not check it again.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import heapq
import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from meshinfer.closing import OneClose
from meshinfer.errors import (
    BatchShapeError,
    ConfigError,
    DeadlineExceededError,
    InferenceError,
    LocalProtocolError,
    NonFiniteInputError,
    OverloadedError,
)
from meshinfer.inference.base import CHECKED_BATCH, InferenceEngine, ModelRef, TensorSpec
from meshinfer.inference.executor import BoundedExecutor
from meshinfer.inference.mlp import check_finite

log = logging.getLogger(__name__)
T = TypeVar("T")

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds of the end-to-end latency histogram kept in :class:`BatcherStats`."""

INLINE_MAX_BYTES = 1 << 20
"""Largest request whose conversion and NaN/infinity check (~25 us), or batch whose joining,
runs on the event loop; bigger ones go to the batcher's worker thread (16 MiB: 1-2 ms)."""


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    """How a :class:`DynamicBatcher` trades latency for throughput.

    * ``max_batch_size`` -- most samples (rows) in one engine call; a single request may not
      exceed it.
    * ``max_queue_delay_s`` -- longest the oldest waiting request waits for company before a
      (possibly partial) batch is sent.
    * ``max_queue_size`` -- most requests waiting (not yet in a batch); more are refused with
      OverloadedError at once.
    * ``priorities`` -- number of priority levels; ``submit(priority=p)`` takes
      ``0 <= p < priorities``, higher first.
    * ``max_concurrent_batches`` -- batches handed to the engine at once. While all are busy,
      requests keep queueing, so batches grow under load.
    * ``latency_window`` -- how many recent latencies the p50/p99 in :class:`BatcherStats` use.
    * ``dispatch_when_idle`` -- while no batch of this batcher is running, send what waits at
      once instead of waiting ``max_queue_delay_s`` for company: a lone request pays no delay,
      and batches still form from what queues while the engine is busy.
    """

    max_batch_size: int = 64
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 1024
    priorities: int = 4
    max_concurrent_batches: int = 1
    latency_window: int = 1024
    dispatch_when_idle: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_size", "priorities", "max_concurrent_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"BatcherConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_queue_delay_s >= 0:
            raise ConfigError(f"BatcherConfig.max_queue_delay_s must be >= 0: {self}")
        if self.latency_window < 1:
            raise ConfigError(f"BatcherConfig.latency_window must be >= 1: {self}")

    @classmethod
    def low_latency(cls) -> BatcherConfig:
        """Small batches, no waiting for company: for interactive, deadline-bound tasks."""
        return cls(max_batch_size=8, max_queue_delay_s=0.0)

    @classmethod
    def throughput(cls) -> BatcherConfig:
        """Large batches and a longer wait: for bulk (sharded) inference."""
        return cls(max_batch_size=256, max_queue_delay_s=0.010, max_queue_size=4096)


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """A snapshot of one batcher's counters, for telemetry and ``/metrics``.

    Counters are cumulative since :meth:`DynamicBatcher.start`. ``batch_sizes`` holds
    ``(samples in batch, batches)`` pairs; ``latency_buckets`` holds cumulative
    ``(upper bound s, requests)`` pairs over :data:`LATENCY_BUCKETS_S` (submit to result).
    """

    model: str
    queue_depth: int
    queued_samples: int
    in_flight_batches: int
    submitted: int
    completed: int
    failed: int
    expired: int
    rejected: int
    cancelled: int
    batches: int
    batch_sizes: tuple[tuple[int, int], ...]
    latency_buckets: tuple[tuple[float, int], ...]
    latency_count: int
    latency_sum_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None

    @property
    def mean_batch_size(self) -> float | None:
        """Average samples per engine call, or None before the first batch."""
        samples = sum(size * count for size, count in self.batch_sizes)
        return samples / self.batches if self.batches else None


class _State(enum.Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    CLOSED = "closed"


@dataclass(eq=False, slots=True)
class _Request:
    inputs: np.ndarray
    single: bool
    priority: int
    enqueued_at: float
    deadline: float | None
    future: asyncio.Future[np.ndarray]
    state: _State = _State.QUEUED
    expiry: asyncio.TimerHandle | None = None
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = int(self.inputs.shape[0])

    @property
    def batch_key(self) -> tuple[tuple[int, ...], np.dtype]:
        """Requests can share a batch only if their sample shapes and dtypes agree."""
        return self.inputs.shape[1:], self.inputs.dtype


@dataclass(slots=True)
class _Counters:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    expired: int = 0
    rejected: int = 0
    cancelled: int = 0
    batches: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))
    latency_count: int = 0
    latency_sum_s: float = 0.0


class DynamicBatcher:
    """Groups concurrent requests for ``ref`` into batches for ``engine``.

    ``input_spec`` (optional) is the model's input tensor: when given, submitted arrays are
    checked against it, and an array with one axis fewer than the spec is taken as a single
    sample (its result comes back without the batch axis). Without it every submission is a
    batch along axis 0, checked against the spec the engine reports for ``ref`` if it does
    (``engine.input_spec(ref)``, optional; the NumPy and CuPy engines have it).

    Use ``async with DynamicBatcher(...) as batcher`` or call :meth:`start` / :meth:`aclose`.
    The batcher does not own the engine: closing it leaves the engine open.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        ref: ModelRef,
        config: BatcherConfig | None = None,
        *,
        input_spec: TensorSpec | None = None,
    ) -> None:
        self.engine = engine
        self.ref = ref
        self.config = config or BatcherConfig()
        self._input_spec = input_spec
        self._heap: list[tuple[int, int, _Request]] = []
        self._arrivals: deque[_Request] = deque()  # arrival order; finds the oldest waiting
        self._sequence = itertools.count()
        self._queued = 0
        self._queued_rows = 0
        self._counters = _Counters()
        self._recent_latencies: deque[float] = deque(maxlen=self.config.latency_window)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._one_close = OneClose()
        self._failure: BaseException | None = None
        self._max_rows = self.config.max_batch_size  # capped by the engine's limit at start()
        self._worker = BoundedExecutor(1, name="meshinfer-batcher")  # big checks and joins

    @property
    def max_request_rows(self) -> int:
        """Most samples one request (and one batch) may hold: ``max_batch_size``, or less if
        the engine takes less (known once started)."""
        return self._max_rows

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the dispatcher task on the running loop. Idempotent while open."""
        if self._closed:
            raise LocalProtocolError(f"batcher for {self.ref} is closed; create a new one")
        if self._dispatcher is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._max_rows = self._engine_row_limit()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.max_concurrent_batches)
        self._dispatcher = self._loop.create_task(
            self._dispatch_forever(), name=f"batcher-{self.ref}"
        )
        self._dispatcher.add_done_callback(self._dispatcher_done)

    def _engine_row_limit(self) -> int:
        limit = self.engine.capacity().max_batch_size
        if not 1 <= limit < self.config.max_batch_size:
            return self.config.max_batch_size
        log.info("batcher for %s: engine %r takes at most %d rows, not max_batch_size=%d",
                 self.ref, self.engine.name, limit, self.config.max_batch_size)  # fmt: skip
        return limit

    async def aclose(self, grace: float = 10.0) -> None:
        """Stop batching: fail waiting requests, let running batches finish. Idempotent.

        A batch still running after ``grace`` seconds (an engine that hangs) is abandoned: its
        callers get an InferenceError, so closing never waits on the engine forever. The close
        runs once, in a task of its own: a caller cancelled while it waits leaves it running,
        and every later call (its ``grace`` unused) waits for that same close to end.
        """
        if not self._one_close.started:
            self._closed = True
            self._fail_queued(
                InferenceError(f"batcher for {self.ref} closed before the request ran")
            )
        await self._one_close.run(lambda: self._close(grace), name=f"batcher-close-{self.ref}")

    async def _close(self, grace: float) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        if self._batch_tasks:
            await self._finish_batches(grace)
        await self._worker.aclose()

    async def _finish_batches(self, grace: float) -> None:
        _, stuck = await asyncio.wait(list(self._batch_tasks), timeout=grace)
        if stuck:
            log.warning("batcher for %s: abandoning %d batch(es) after %.1fs", self.ref,
                        len(stuck), grace)  # fmt: skip
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)

    async def __aenter__(self) -> DynamicBatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has been called."""
        return self._closed

    @property
    def failure(self) -> BaseException | None:
        """Why the dispatcher stopped on its own (a bug: every submit then fails), or None
        while it runs (or it was closed)."""
        return self._failure

    # --- submitting ---------------------------------------------------------------------------

    async def submit(
        self, inputs: np.ndarray, *, priority: int = 0, deadline: float | None = None
    ) -> np.ndarray:
        """Queue ``inputs`` for the next batch and return their outputs. Runs on the loop.

        ``deadline`` is in the running loop's time (``loop.time()``). Raises BatchShapeError at
        once for inputs that are not an array of 1..:attr:`max_request_rows` samples fitting
        the model's input (see the module docstring), or that hold NaN or infinity as the
        model's dtype (NonFiniteInputError): such a request never joins a batch, so it cannot
        fail anyone else's. Raises OverloadedError when the queue is full,
        DeadlineExceededError if the deadline passes before the request is batched,
        InferenceError if the engine fails the batch, gives NaN or infinity for this request's
        rows, or the batcher closes; LocalProtocolError for a priority out of range or a
        deadline that is no time (NaN), before anything is queued or counted.
        """
        self._check_open()
        self._check_priority(priority)
        batch, single, dtype = self._as_batch(inputs)
        if batch.nbytes <= INLINE_MAX_BYTES:
            batch = self._model_input(batch, dtype)
        else:
            self._check_room()  # before the work, not only after it
            batch = await self._off_loop(self._model_input, batch, dtype)
        request = self._enqueue(batch, single, priority, deadline)
        try:
            return await request.future
        except asyncio.CancelledError:
            if self._withdraw(request, _State.CANCELLED):
                self._compact_if_sparse()
            elif request.state is _State.DISPATCHED and request.future.cancelled():
                self._counters.cancelled += 1  # in a batch already: its rows are dropped
            raise  # (answered a moment before the cancel: counted completed or failed only)

    def _enqueue(
        self, batch: np.ndarray, single: bool, priority: int, deadline: float | None
    ) -> _Request:
        self._check_open()  # again: the batcher may have closed while the input was checked
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if deadline is not None:
            try:
                live = deadline > now
            except TypeError:  # not a time (NaN just compares False)
                live = False
            if not live:
                self._refuse_deadline(deadline, now)
        self._check_room()
        request = _Request(batch, single, priority, now, deadline, loop.create_future())
        self._push(request)
        return request

    def _refuse_deadline(self, deadline: object, now: float) -> None:
        """Raise for a deadline not after ``now``: passed, or not a time at all (NaN, a
        string), which no timer may be set for."""
        try:
            passed = deadline <= now  # type: ignore[operator]
        except TypeError:
            passed = False
        if not passed:
            raise LocalProtocolError(f"deadline {deadline!r} is not a time (loop.time() seconds)")
        self._counters.expired += 1
        raise DeadlineExceededError(f"request for {self.ref}: deadline passed before submit")

    def _check_room(self) -> None:
        if self._queued >= self.config.max_queue_size:
            self._counters.rejected += 1
            raise OverloadedError(
                f"batcher for {self.ref} on engine {self.engine.name!r} is full "
                f"({self._queued} requests waiting, max_queue_size="
                f"{self.config.max_queue_size}); retry later or on another node"
            )

    async def in_worker(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the batcher's worker thread, in turn with the batcher's own work
        there: for a caller's work linear in a big array of this model's (the node joins the
        outputs of an item's pieces, and packs a big output for the wire, there). Runs on the
        loop; InferenceError once the batcher is closed."""
        return await self._off_loop(fn, *args)

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the batcher's worker thread (for work linear in a large input)."""
        try:
            return await self._worker.run(fn, *args)
        except LocalProtocolError:  # the worker closed: so did the batcher
            raise InferenceError(f"batcher for {self.ref} closed before the request ran") from None

    def _check_open(self) -> None:
        if self._failure is not None:
            raise InferenceError(f"batcher for {self.ref} stopped: {self._failure!r}")
        if self._closed:
            raise InferenceError(f"batcher for {self.ref} is closed")
        if self._dispatcher is None:
            raise LocalProtocolError(f"batcher for {self.ref} not started: call start() first")

    def _check_priority(self, priority: int) -> None:
        try:
            fits = 0 <= priority < self.config.priorities
        except TypeError:
            fits = False
        if not fits:
            raise LocalProtocolError(
                f"priority {priority} out of range 0..{self.config.priorities - 1}"
            )

    def _as_batch(self, inputs: np.ndarray) -> tuple[np.ndarray, bool, np.dtype | None]:
        """Shape checks (cheap, on the loop): the batch, whether it is a single sample, and the
        floating dtype the model takes, if known."""
        try:
            array = np.asarray(inputs)
        except (ValueError, TypeError) as exc:
            raise BatchShapeError(f"request for {self.ref} is not an array: {exc}") from None
        spec = self._input_spec
        single = spec is not None and array.ndim == len(spec.shape) - 1
        batch = array[np.newaxis] if single else array
        if batch.ndim < 1 or batch.shape[0] < 1:
            raise BatchShapeError(f"request for {self.ref} has no samples (shape {array.shape})")
        if batch.shape[0] > self._max_rows:
            raise BatchShapeError(
                f"request for {self.ref} has {batch.shape[0]} samples, more than the "
                f"{self._max_rows} a batch may hold (max_batch_size="
                f"{self.config.max_batch_size}, engine {self.engine.name!r}); split it"
            )
        spec = spec or self._engine_spec()
        if spec is not None and not _fits_spec(batch, spec):
            raise BatchShapeError(
                f"request for {self.ref}: shape {array.shape} does not fit input "
                f"{spec.name} {spec.shape}"
            )
        dtype = _floating_dtype(spec)
        if dtype is not None and batch.dtype.kind not in "fiub":
            raise BatchShapeError(
                f"request for {self.ref}: dtype {batch.dtype} does not convert to input "
                f"{spec.name} {dtype}"
            )
        return batch, single, dtype

    def _engine_spec(self) -> TensorSpec | None:
        describe = getattr(self.engine, "input_spec", None)
        spec = describe(self.ref) if callable(describe) else None
        return spec if isinstance(spec, TensorSpec) else None

    def _model_input(self, batch: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
        """``batch`` as the model takes it (``dtype``, when known), refused if it holds NaN or
        infinity then. Linear in the batch: on the loop only for small ones."""
        if dtype is not None and batch.dtype != dtype:
            with np.errstate(over="ignore", invalid="ignore"):
                batch = np.ascontiguousarray(batch, dtype=dtype)
        try:
            check_finite(batch)
        except NonFiniteInputError as exc:
            raise NonFiniteInputError(f"request for {self.ref}: {exc} as {batch.dtype}") from None
        return batch

    def _push(self, request: _Request) -> None:
        heapq.heappush(self._heap, (-request.priority, next(self._sequence), request))
        self._arrivals.append(request)
        self._queued += 1
        self._queued_rows += request.rows
        self._counters.submitted += 1
        if request.deadline is not None:
            request.expiry = self._loop.call_at(request.deadline, self._expire_timer, request)
        self._wake.set()

    def _withdraw(self, request: _Request, state: _State) -> bool:
        """Take a QUEUED request out of the queue (it stays in the heap until it surfaces)."""
        if request.state is not _State.QUEUED:
            return False
        request.state = state
        self._queued -= 1
        self._queued_rows -= request.rows
        if request.expiry is not None:
            request.expiry.cancel()
        if state is _State.CANCELLED:
            self._counters.cancelled += 1
        return True

    def _expire_timer(self, request: _Request) -> None:
        self._expire(request)
        self._compact_if_sparse()

    def _expire(self, request: _Request) -> None:
        if self._withdraw(request, _State.EXPIRED):
            self._counters.expired += 1
            _settle(request, DeadlineExceededError(f"request for {self.ref}: deadline passed"))

    def _compact_if_sparse(self) -> None:
        """Drop withdrawn entries once they outnumber the live ones (never during a take)."""
        if len(self._heap) + len(self._arrivals) > 4 * self._queued + 128:
            self._heap = [entry for entry in self._heap if entry[2].state is _State.QUEUED]
            heapq.heapify(self._heap)
            self._arrivals = deque(r for r in self._arrivals if r.state is _State.QUEUED)

    def _fail_queued(self, error: InferenceError) -> None:
        for _, _, request in self._heap:
            if self._withdraw(request, _State.CLOSED):
                self._counters.failed += 1
                _settle(request, error)
        self._heap.clear()
        self._arrivals.clear()

    # --- dispatching --------------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_done)

    async def _next_batch(self) -> list[_Request]:
        while True:
            await self._wait_until_due()
            batch = self._take_batch()
            if batch:
                return batch

    async def _wait_until_due(self) -> None:
        """Return once a full batch is waiting or the oldest request has waited long enough."""
        assert self._wake is not None and self._loop is not None
        while True:
            oldest = self._oldest_waiting()
            if oldest is not None and (
                self._queued_rows >= self._max_rows
                or (self.config.dispatch_when_idle and not self._batch_tasks)
            ):
                return
            self._wake.clear()
            if oldest is None:
                await self._wake.wait()
                continue
            due = oldest.enqueued_at + self.config.max_queue_delay_s
            if self._loop.time() >= due:
                return
            try:
                async with asyncio.timeout_at(due):
                    await self._wake.wait()
            except TimeoutError:
                return

    def _oldest_waiting(self) -> _Request | None:
        while self._arrivals and self._arrivals[0].state is not _State.QUEUED:
            self._arrivals.popleft()
        return self._arrivals[0] if self._arrivals else None

    def _take_batch(self) -> list[_Request]:
        """Pop the highest-priority requests that fit one batch; expire the overdue ones."""
        now = self._loop.time()
        taken: list[_Request] = []
        skipped: list[tuple[int, int, _Request]] = []
        rows, key = 0, None
        while self._heap and rows < self._max_rows:
            request = self._heap[0][2]
            if request.state is not _State.QUEUED or request.future.done():
                heapq.heappop(self._heap)
                self._withdraw(request, _State.CANCELLED)  # submitter cancelled a moment ago
            elif request.deadline is not None and request.deadline <= now:
                heapq.heappop(self._heap)
                self._expire(request)
            elif key is not None and request.batch_key != key:
                skipped.append(heapq.heappop(self._heap))
            elif rows + request.rows > self._max_rows:
                break
            else:
                heapq.heappop(self._heap)
                key = request.batch_key
                rows += request.rows
                self._withdraw(request, _State.DISPATCHED)
                taken.append(request)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        self._compact_if_sparse()
        return taken

    async def _run_batch(self, batch: list[_Request]) -> None:
        batch = [r for r in batch if not r.future.done()]  # cancelled before it started
        if not batch:
            return
        rows = sum(r.rows for r in batch)
        self._counters.batches += 1
        self._counters.batch_sizes[rows] += 1
        try:
            inputs = await self._joined(batch, rows)
            checked = CHECKED_BATCH.set(inputs)
            try:
                outputs = await self.engine.infer(self.ref, inputs)
            finally:
                CHECKED_BATCH.reset(checked)
            self._check_outputs(outputs, rows)
            finite = await self._finite_output_rows(outputs)
            self._deliver(batch, outputs, finite)
        except Exception as exc:
            self._fail_batch(batch, self._batch_error(exc, rows))
        finally:
            self._fail_batch(batch, InferenceError(f"batch for {self.ref} was aborted"))

    async def _joined(self, batch: list[_Request], rows: int) -> np.ndarray:
        """The batch's inputs as one array (joined in the worker thread when large)."""
        if len(batch) == 1:
            return batch[0].inputs
        parts = [r.inputs for r in batch]
        if rows * parts[0][0].nbytes <= INLINE_MAX_BYTES:
            return np.concatenate(parts)
        return await self._off_loop(np.concatenate, parts)

    def _check_outputs(self, outputs: object, rows: int) -> None:
        if not isinstance(outputs, np.ndarray) or outputs.ndim < 1 or outputs.shape[0] != rows:
            shape = getattr(outputs, "shape", type(outputs).__name__)
            raise InferenceError(
                f"engine {self.engine.name!r} returned {shape} for a batch of {rows} samples"
            )

    async def _finite_output_rows(self, outputs: np.ndarray) -> np.ndarray | None:
        """:func:`_finite_rows` of the outputs: in the worker thread when they are large."""
        if outputs.nbytes <= INLINE_MAX_BYTES:
            return _finite_rows(outputs)
        return await self._off_loop(_finite_rows, outputs)

    def _deliver(
        self, batch: list[_Request], outputs: np.ndarray, finite: np.ndarray | None
    ) -> None:
        """Hand each request its rows of ``outputs``; ``finite``: per row, all finite? (None:
        every row is)."""
        offset = 0
        for request in batch:
            span = slice(offset, offset + request.rows)
            part = outputs[offset] if request.single else outputs[span]
            offset += request.rows
            if request.future.done():
                continue
            if finite is not None and not finite[span].all():
                self._fail_batch([request], self._non_finite_output(request, finite[span]))
                continue
            self._record_latency(request)
            self._counters.completed += 1
            request.future.set_result(part)

    def _non_finite_output(self, request: _Request, finite: np.ndarray) -> InferenceError:
        bad = np.flatnonzero(~finite)
        return InferenceError(
            f"engine {self.engine.name!r} gave NaN or infinity for {self.ref} on {bad.size} of "
            f"the request's {request.rows} rows (first: {bad[:4].tolist()}): inputs out of the "
            "range the model handles, or a broken model"
        )

    def _batch_error(self, exc: Exception, rows: int) -> InferenceError:
        if isinstance(exc, InferenceError):
            return exc
        error = InferenceError(
            f"engine {self.engine.name!r} failed a batch of {rows} for {self.ref}: {exc!r}"
        )
        error.__cause__ = exc
        return error

    def _fail_batch(self, batch: list[_Request], error: InferenceError) -> None:
        for request in batch:
            if not request.future.done():
                self._counters.failed += 1
                request.future.set_exception(error)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batch_tasks.discard(task)
        self._slots.release()
        if self.config.dispatch_when_idle and not self._batch_tasks and self._wake is not None:
            self._wake.set()  # idle now: what waits for company goes at once
        if not task.cancelled() and task.exception() is not None:
            log.error("batch task for %s failed", self.ref, exc_info=task.exception())

    def _dispatcher_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() and self._closed:
            return
        self._failure = (
            asyncio.CancelledError() if task.cancelled() else task.exception()
        ) or RuntimeError("dispatcher stopped")
        log.error("batcher dispatcher for %s stopped", self.ref, exc_info=self._failure)
        error = InferenceError(f"batcher for {self.ref} stopped: {self._failure!r}")
        error.__cause__ = self._failure
        self._fail_queued(error)

    # --- statistics ---------------------------------------------------------------------------

    def _record_latency(self, request: _Request) -> None:
        latency = self._loop.time() - request.enqueued_at
        counters = self._counters
        counters.latency_count += 1
        counters.latency_sum_s += latency
        first = bisect.bisect_left(LATENCY_BUCKETS_S, latency)
        if first < len(LATENCY_BUCKETS_S):
            counters.latency_buckets[first] += 1  # made cumulative in stats()
        self._recent_latencies.append(latency)

    def stats(self) -> BatcherStats:
        """A snapshot of queue depth, batch sizes and latencies. Cheap; never blocks."""
        c = self._counters
        recent = sorted(self._recent_latencies)
        return BatcherStats(
            model=str(self.ref),
            queue_depth=self._queued,
            queued_samples=self._queued_rows,
            in_flight_batches=len(self._batch_tasks),
            submitted=c.submitted,
            completed=c.completed,
            failed=c.failed,
            expired=c.expired,
            rejected=c.rejected,
            cancelled=c.cancelled,
            batches=c.batches,
            batch_sizes=tuple(sorted(c.batch_sizes.items())),
            latency_buckets=tuple(
                zip(LATENCY_BUCKETS_S, itertools.accumulate(c.latency_buckets), strict=True)
            ),
            latency_count=c.latency_count,
            latency_sum_s=c.latency_sum_s,
            latency_p50_s=_quantile(recent, 0.50),
            latency_p99_s=_quantile(recent, 0.99),
        )


def _fits_spec(batch: np.ndarray, spec: TensorSpec) -> bool:
    sample_shape = spec.shape[1:]
    if batch.ndim != len(spec.shape):
        return False
    return all(want in (-1, got) for want, got in zip(sample_shape, batch.shape[1:], strict=True))


def _floating_dtype(spec: TensorSpec | None) -> np.dtype | None:
    """The NumPy dtype of ``spec`` if it is a floating one NumPy knows (``float32``), else None."""
    try:
        dtype = np.dtype(spec.dtype) if spec is not None else None
    except TypeError:  # not a NumPy name (e.g. Triton's "FP32")
        return None
    return dtype if dtype is not None and dtype.kind == "f" else None


def _finite_rows(outputs: np.ndarray) -> np.ndarray | None:
    """Per row (first axis) of ``outputs``: all finite? None when every value is (or no float)."""
    if outputs.dtype.kind not in "fc" or outputs.size == 0 or np.isfinite(outputs).all():
        return None
    return np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)


def _settle(request: _Request, error: InferenceError) -> None:
    if not request.future.done():
        request.future.set_exception(error)


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
