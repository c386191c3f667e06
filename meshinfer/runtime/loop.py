"""Running a daemon: the event loop (uvloop when installed) and the signal-driven lifecycle."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol

from meshinfer.errors import MeshInferError


class Daemon(Protocol):
    """What :func:`serve_until_signalled` runs (the node daemon and the coordinator daemon)."""

    node_id: str

    async def start(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


def log_failure(log: logging.Logger, what: str) -> Callable[[asyncio.Task[Any]], None]:
    """A done-callback that logs how a background task failed (no task fails silently): a
    warning for a :class:`MeshInferError` (a peer, the input, the network), an error with its
    traceback for anything else (our bug). A cancelled task did not fail."""

    def logged(task: asyncio.Task[Any]) -> None:
        if task.cancelled() or (exc := task.exception()) is None:
            return
        level = logging.WARNING if isinstance(exc, MeshInferError) else logging.ERROR
        log.log(level, "%s failed: %s", what, exc, exc_info=exc)

    return logged


class Steps:
    """The short background steps of one component (STYLE.md 9: each has an owner, and a
    failure is logged by :func:`log_failure`). :meth:`aclose` waits until none is left, steps
    spawned meanwhile included, then drops (closes unrun) any spawned later."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._logged = log_failure(log, what)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, step: Coroutine[Any, Any, Any]) -> None:
        """Run ``step`` as a task of its own on the running loop (dropped once closed)."""
        if self._closed:
            step.close()
            return
        task = asyncio.get_running_loop().create_task(step)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._logged)

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        """Wait for every step under way, then refuse new ones. Idempotent."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._closed = True


async def close_in_order(steps: Iterable[Awaitable[Any] | None], log: logging.Logger) -> None:
    """Await each close step in turn (None is skipped); an error is logged and the rest run."""
    for step in steps:
        if step is None:
            continue
        try:
            await step
        except Exception:
            log.exception("error while closing")


def new_runner() -> asyncio.Runner:
    """An :class:`asyncio.Runner` on uvloop if it can be imported (it is a dependency on Linux)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run_main(main: Coroutine[Any, Any, int], log_level: str) -> int:
    """Configure logging to stderr and run ``main`` on :func:`new_runner`; its exit code."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with new_runner() as runner:
        return runner.run(main)


async def serve_until_signalled(daemon: Daemon, graceful: Callable[[], Awaitable[None]]) -> int:
    """Start ``daemon``, print ``READY {facts}``, and on SIGTERM/SIGINT run ``graceful``.

    A second signal during ``graceful`` abandons it for a plain ``aclose``. Prints
    ``STOPPED <node id>`` at the end; returns the exit code (0).
    """
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue[int]()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    try:
        facts = await daemon.start()
    except BaseException:
        await daemon.aclose()
        raise
    print("READY " + json.dumps(facts), flush=True)
    await signals.get()
    stop = loop.create_task(graceful())
    second = loop.create_task(signals.get())
    done, _ = await asyncio.wait({stop, second}, return_when=asyncio.FIRST_COMPLETED)
    if second in done:
        stop.cancel()
        await daemon.aclose()
    else:
        second.cancel()
    print(f"STOPPED {daemon.node_id}", flush=True)
    return 0
