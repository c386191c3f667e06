"""A bounded executor: blocking NumPy/CuPy work off the event loop, with a cap on jobs in flight.

``await executor.run(fn, *args)`` waits for one of ``max_in_flight`` slots, hands ``fn`` to a
private thread pool and awaits its result. The slot is given back when the *thread job* ends,
not when the awaiting task ends: a caller cancelled while its job runs in a thread cannot push
the number of running jobs over the cap. A job cancelled before it started never runs.

``run`` and ``aclose`` are coroutines that run on the event loop; ``fn`` runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from meshinfer.errors import LocalProtocolError

T = TypeVar("T")


class BoundedExecutor:
    """A thread pool that never has more than ``max_in_flight`` jobs submitted at once.

    ``initializer`` runs once in each worker thread (e.g. to select a CUDA device).
    """

    def __init__(
        self,
        max_workers: int = 1,
        *,
        max_in_flight: int | None = None,
        name: str = "meshinfer-engine",
        initializer: Callable[[], None] | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self.max_in_flight = max_workers if max_in_flight is None else max_in_flight
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=name, initializer=initializer
        )
        self._slots: asyncio.Semaphore | None = None
        self._jobs: set[concurrent.futures.Future[Any]] = set()
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Number of jobs submitted to the thread pool and not yet finished."""
        return len(self._jobs)

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has been called."""
        return self._closed

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread once a slot is free; return its result."""
        if self._closed:
            raise LocalProtocolError("executor is closed")
        slots = self._semaphore()
        await slots.acquire()
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[T] = loop.create_future()
        try:
            if self._closed:
                raise LocalProtocolError("executor is closed")
            job = self._pool.submit(fn, *args)
        except BaseException:
            slots.release()
            raise
        self._jobs.add(job)
        job.add_done_callback(functools.partial(self._job_done, loop, outcome, slots))
        try:
            return await outcome
        except asyncio.CancelledError:
            job.cancel()  # only stops a job that has not started; a running one keeps its slot
            raise

    def _semaphore(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_in_flight)
        return self._slots

    def _job_done(
        self,
        loop: asyncio.AbstractEventLoop,
        outcome: asyncio.Future[Any],
        slots: asyncio.Semaphore,
        job: concurrent.futures.Future[Any],
    ) -> None:
        """In the worker thread (or the loop, for a cancelled job): one wake-up of the loop."""
        try:
            loop.call_soon_threadsafe(self._settle, outcome, slots, job)
        except RuntimeError:  # the loop is closed: nobody waits for the outcome any more
            self._jobs.discard(job)

    def _settle(
        self,
        outcome: asyncio.Future[Any],
        slots: asyncio.Semaphore,
        job: concurrent.futures.Future[Any],
    ) -> None:
        """On the loop: give the slot back and pass the job's result or error to the caller."""
        self._jobs.discard(job)
        slots.release()
        if outcome.done():
            return
        if job.cancelled():  # dropped from the queue by aclose()
            outcome.set_exception(LocalProtocolError("executor closed before the job ran"))
        elif (error := job.exception()) is not None:
            outcome.set_exception(error)
        else:
            outcome.set_result(job.result())

    async def aclose(self) -> None:
        """Refuse new jobs, cancel queued ones and wait for running ones. Idempotent: every
        call waits for the jobs still running (a call after a cancelled one too)."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=False, cancel_futures=True)
        # (a job leaves _jobs on the loop, after its end: those just cancelled are still here)
        pending = [asyncio.wrap_future(job) for job in list(self._jobs)]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def __aenter__(self) -> BoundedExecutor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
