"""Closing an asyncio object once, however many callers ask and whatever happens to them.

An ``aclose()`` whose caller was cancelled half-way (a timeout around it, a second SIGTERM
cutting a drain short) left the object half closed, and a later ``aclose()`` returned at once
on its ``_closed`` flag: batches still running, models loaded, a journal open.
:class:`OneClose` runs the close in a task of its own instead: a cancelled caller leaves it
running, and every call, the first and any later one, waits for that same close to end and
gets its error, if it failed. The outcome is always marked seen, so asyncio logs no "exception
was never retrieved" when every caller was cancelled before it ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class OneClose:
    """The one close of an object: ``await one_close.run(self._close)`` in its ``aclose``."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        """Whether a close was asked for (it may still be running)."""
        return self._task is not None

    async def run(
        self, close: Callable[[], Coroutine[Any, Any, None]], name: str | None = None
    ) -> None:
        """Start ``close()`` on the first call (later calls' ``close`` is not called), then
        wait for it to end; a cancelled caller leaves it running."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(close(), name=name)
            self._task.add_done_callback(_seen)
        await asyncio.shield(self._task)


def _seen(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
