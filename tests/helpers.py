"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Poll ``predicate`` (a cheap read of state the test cannot be told about) until it holds;
    TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
