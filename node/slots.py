"""The executor's run slots: at most ``max_concurrent`` items of a node run at once, the rest
wait for a slot in order of priority, at most :data:`MAX_WAITING` of them (see :class:`Slots`).

Concurrency: every method runs on the node's event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from meshinfer.errors import OverloadedError

#: How many items may wait for a slot at once (the batcher's default ``max_queue``): one more is
#: refused with OverloadedError. Each holds its input (up to a message's size), and what a peer
#: sends faster than the slots free would otherwise be held without bound: the batcher's own
#: queue, which answers "overloaded", is only reached with a slot.
MAX_WAITING = 1024


class Slots:
    """``limit`` slots for items to run in, given to waiters highest priority first (in order
    of arrival within one priority); at most ``max_waiting`` wait, and :meth:`acquire` refuses
    one more (OverloadedError: retryable, the item runs elsewhere). A waiter cancelled after it
    was given a slot passes the slot on; one cancelled before stays in the heap until popped, or
    until the cancelled ones are more than half of it (then they are all dropped): a heap of
    waiters whose deadlines passed while every slot stayed busy is not kept."""

    def __init__(self, limit: int, max_waiting: int = MAX_WAITING) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.free = limit
        self.waiting = 0  # waiters not given a slot yet and not cancelled
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # (-priority, n, fut)
        self._arrivals = itertools.count()
        self._gone = 0  # waiters in the heap that were cancelled before being given a slot

    async def acquire(self, priority: int) -> None:
        """Wait for a slot (``priority``: larger first); OverloadedError at once if
        ``max_waiting`` items wait already."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        if self.waiting >= self.max_waiting:
            raise OverloadedError(
                f"this node is full: {self.waiting} items wait for one of its {self.limit} run"
                f" slots (at most {self.max_waiting} may wait); retry later or on another node"
            )
        given: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._arrivals), given))
        self.waiting += 1
        try:
            await given
        except asyncio.CancelledError:
            if given.done() and not given.cancelled():  # given a slot, then cancelled
                self.release()
            else:
                given.cancel()  # (cancelled with its task already: a stale entry either way)
                self.waiting -= 1
                self._left()
            raise

    def _left(self) -> None:
        """A waiter was cancelled in the heap: drop every cancelled one once they are most."""
        self._gone += 1
        if 2 * self._gone > len(self._waiters):
            self._waiters = [w for w in self._waiters if not w[2].done()]
            heapq.heapify(self._waiters)
            self._gone = 0

    def release(self) -> None:
        while self._waiters:
            _, _, given = heapq.heappop(self._waiters)
            if not given.done():  # (a cancelled waiter's future is done: skipped)
                given.set_result(None)
                self.waiting -= 1
                return
            self._gone -= 1
        self.free += 1
