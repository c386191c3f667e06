"""A minimal virtual-time event loop for tests of code that only uses the loop's clock.

:class:`VirtualClockLoop` is a selector loop whose ``time()`` is a counter: whenever nothing is
ready to run, the clock jumps straight to the next timer instead of sleeping. A test of the
in-memory transport with ten seconds of latency therefore runs in microseconds, and every
``loop.time()`` difference is exact. Real file descriptors are still polled (without blocking),
so ``call_soon_threadsafe`` keeps working.

If no timer is due (none is scheduled, or the only ones are at infinity, as
``asyncio.sleep(math.inf)`` makes) and no I/O arrives for ``deadlock_after`` real seconds, the
loop raises :class:`VirtualClockDeadlock`: with a virtual clock, that can only mean every task
waits on every other. A timer far in the future is reached in one jump, not a day at a time.

Timers due at the same instant run in the order they were scheduled (asyncio's heap alone keeps
no order among equal deadlines; on a virtual clock, where many timers share an instant, that
would run them shuffled).

Usage: ``asyncio.Runner(loop_factory=VirtualClockLoop)``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import selectors
from collections.abc import Callable
from contextvars import Context
from typing import Any


class VirtualClockDeadlock(RuntimeError):
    """Every task is waiting, no timer is scheduled and no I/O is ready."""


class _OrderedTimerHandle(asyncio.TimerHandle):
    """A timer that sorts after the timers scheduled before it for the same instant."""

    __slots__ = ("_order",)

    def __init__(
        self,
        when: float,
        callback: Callable[..., Any],
        args: tuple,
        loop: Any,
        context: Context | None,
        order: int,
    ) -> None:
        super().__init__(when, callback, args, loop, context)
        self._order = order

    def __lt__(self, other: object) -> bool:
        if isinstance(other, _OrderedTimerHandle) and self._when == other._when:
            return self._order < other._order
        return super().__lt__(other)


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list:  # type: ignore[override]
        events = super().select(0)
        if events or timeout == 0:
            return events
        # asyncio caps ``timeout`` at one day; jump to the timer itself, not a day at a time
        due = self._loop._next_timer()
        if timeout is None or due == math.inf:  # no timer, or only ones that never fire
            events = super().select(self._loop.deadlock_after)
            if not events:
                raise VirtualClockDeadlock("no timer is due and no task can run")
            return events
        self._loop.advance(max(timeout, due - self._loop.time()))
        return events


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer when nothing is ready."""

    def __init__(self, *, start: float = 0.0, deadlock_after: float = 2.0) -> None:
        self._virtual_now = start
        self.deadlock_after = deadlock_after
        super().__init__(selector=_JumpingSelector(self))
        self._least_resolution = self._clock_resolution
        self._keep_resolution()
        self._timer_order = itertools.count()

    def call_at(
        self, when: float, callback: Callable[..., Any], *args: Any, context: Context | None = None
    ) -> asyncio.TimerHandle:
        """asyncio's ``call_at``, with timers of equal deadline run first scheduled first."""
        if when is None:
            raise TypeError("when cannot be None")
        self._check_closed()  # type: ignore[attr-defined]
        if self.get_debug():
            self._check_thread()  # type: ignore[attr-defined]
            self._check_callback(callback, "call_at")  # type: ignore[attr-defined]
        timer = _OrderedTimerHandle(when, callback, args, self, context, next(self._timer_order))
        if timer._source_traceback:
            del timer._source_traceback[-1]
        heapq.heappush(self._scheduled, timer)  # type: ignore[attr-defined]
        timer._scheduled = True
        return timer

    def time(self) -> float:
        """The virtual clock, in seconds."""
        return self._virtual_now

    def _next_timer(self) -> float:
        """When the earliest timer is due (asyncio drops cancelled ones from the head before it
        selects); inf when there is none or it never fires (``sleep(math.inf)``)."""
        return self._scheduled[0].when() if self._scheduled else math.inf

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (never backwards)."""
        self._virtual_now += max(0.0, seconds)
        self._keep_resolution()

    def _keep_resolution(self) -> None:
        # asyncio runs a timer once ``when < time() + _clock_resolution``; past 2**24 s one ulp
        # of the clock exceeds 1 ns, the sum rounds back to ``time()`` and a timer due now would
        # never run (the loop would spin at that instant forever).
        self._clock_resolution = max(self._least_resolution, math.ulp(self._virtual_now))
