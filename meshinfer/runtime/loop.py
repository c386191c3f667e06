"""Running a daemon: the event loop (uvloop when installed) and the signal-driven lifecycle.

A daemon serves until something asks it to stop: SIGTERM or SIGINT, or, with
``--exit-with-parent``, its launcher going away (nobody is left to stop it). The parent watch
decides how to look at its first look: a daemon whose parent is the launcher watches for being
re-parented; one started through something in between (``timeout``, ``sudo``, ``sh -c``,
``strace -f``) watches whether the launcher's pid is still alive. The first stop runs the
daemon's graceful drain; a second signal during the drain abandons it for a plain close.
A daemon may also have a fatal fault to stop on (the coordinator's journal failed to sync):
it stops as on SIGTERM, and the process exits non-zero for its supervisor to restart it.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol

from meshinfer.errors import log_failure  # (its home is errors: every layer logs with it)
from meshinfer.runtime.log_lines import OneLineFormatter

log = logging.getLogger(__name__)

PARENT_CHECK_S = 0.5
"""How often a daemon watching its parent (``--exit-with-parent``) looks whether it is gone."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Daemon(Protocol):
    """What :func:`serve_until_signalled` runs (the node daemon and the coordinator daemon)."""

    node_id: str

    async def start(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


def pop_timer(timers: dict[str, asyncio.TimerHandle], key: str) -> None:
    """Cancel and forget ``key``'s timer in ``timers``, if it has one."""
    timer = timers.pop(key, None)
    if timer is not None:
        timer.cancel()


def replace_timer(
    timers: dict[str, asyncio.TimerHandle], key: str, timer: asyncio.TimerHandle
) -> None:
    """Cancel ``key``'s timer in ``timers``, if any, and keep ``timer`` in its place."""
    pop_timer(timers, key)
    timers[key] = timer


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
    """Await each close step in turn (None is skipped); an error is logged and the rest run.
    Cancelled, it closes the coroutines among the steps not run yet (none is left "never
    awaited") and raises; what they would have closed is the caller's to close."""
    pending = iter(steps)
    try:
        for step in pending:
            if step is None:
                continue
            try:
                await step
            except Exception:
                log.exception("error while closing")
    finally:
        for step in pending:  # (empty after a full run)
            if inspect.iscoroutine(step):
                step.close()


def new_runner() -> asyncio.Runner:
    """An :class:`asyncio.Runner` on uvloop if it is installed (it is a dependency on Linux).
    An uvloop that is installed but broken (its import, or making its loop, fails) is a
    warning, and the runner falls back to asyncio's own loop: slower, but the daemon serves."""
    try:
        import uvloop
    except ModuleNotFoundError as exc:
        if exc.name == "uvloop":  # not installed (not a dependency off Linux): no warning
            return asyncio.Runner()
        return _without_uvloop(exc)
    except Exception as exc:  # (an ImportError of its extension module included)
        return _without_uvloop(exc)
    return asyncio.Runner(loop_factory=lambda: _uvloop_or_asyncio(uvloop.new_event_loop))


def _without_uvloop(exc: Exception) -> asyncio.Runner:
    log.warning("uvloop is installed but cannot be imported (%s): running on asyncio's loop", exc)
    return asyncio.Runner()


def _uvloop_or_asyncio(new_uvloop: Callable[[], asyncio.AbstractEventLoop]) -> Any:
    """A new uvloop loop, or asyncio's (with a warning) where uvloop fails to make one."""
    try:
        return new_uvloop()
    except Exception as exc:
        log.warning("uvloop cannot make an event loop (%s): running on asyncio's loop", exc)
        return asyncio.new_event_loop()


def run_main(main: Coroutine[Any, Any, int], log_level: str) -> int:
    """Configure logging to stderr and run ``main`` on :func:`new_runner`; its exit code."""
    handler = logging.StreamHandler()  # (stderr) one line per record, whatever a peer sent
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=log_level, handlers=[handler])
    with new_runner() as runner:
        return runner.run(main)


def add_parent_watch_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--exit-with-parent [PID]`` to a daemon's command (read it with
    :func:`watched_parent`)."""
    parser.add_argument(
        "--exit-with-parent",
        nargs="?",
        const=0,
        type=_pid,
        metavar="PID",
        help="stop (draining, as on SIGTERM) once the process that started this one is gone,"
        " for launchers and test harnesses that may die without stopping it; PID: the"
        " launcher's pid (this daemon need not be its direct child: one started through"
        " timeout, sudo or sh -c watches whether PID is alive), so that a launcher dying"
        " before this daemon got to look is noticed too (default: the parent at start)",
    )


def watched_parent(option: int | None) -> int | None:
    """The parent pid to watch for a ``--exit-with-parent`` value: None without the option,
    this process's parent now for the bare flag, else the pid given."""
    if option is None:
        return None
    return option or os.getppid()


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (one this process may not signal included); a zombie
    (exited, not yet reaped by its parent) does not."""
    import psutil  # here: the daemons read their parent before anything slow is imported

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # never was, or reaped (a ZombieProcess where one is refused)
        return False
    except psutil.Error:  # e.g. not allowed to look: it exists
        return True


def _pid(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a process id (a positive integer), got {text!r}"
        )
    return pid


async def serve_until_signalled(
    daemon: Daemon,
    graceful: Callable[[], Awaitable[None]],
    parent_pid: int | None = None,
    *,
    current_parent: Callable[[], int] = os.getppid,
    pid_alive: Callable[[int], bool] = pid_alive,
    on_ready: Callable[[], None] | None = None,
    fatal: Callable[[], Awaitable[object]] | None = None,
) -> int:
    """Start ``daemon``, print ``READY {facts}``, and on SIGTERM/SIGINT run ``graceful``.

    With ``parent_pid`` (the launcher), also run ``graceful`` once it is gone, looked at every
    :data:`PARENT_CHECK_S` from before the start: if ``current_parent()`` (the parent process
    id) is ``parent_pid`` at the first look, once it no longer is (the parent died and this
    process was re-parented); else once ``pid_alive(parent_pid)`` is false (this process was
    started through something in between, or the launcher was gone already). A second signal
    during ``graceful`` abandons it for a plain ``aclose``, and so does a ``graceful`` that raises
    (logged; exit code 1). A stop during the start cancels it and closes what started, without
    ``READY`` (a join or a model load that hangs needs no SIGKILL). Prints ``STOPPED <node id>``
    at the end; returns the exit code (0 after a clean stop). Cancelled from outside, at any
    point, it cancels the start or the drain under way, closes the daemon (``aclose``) and
    raises, without ``STOPPED``. The signal handlers are removed on every way out. ``on_ready``
    runs once the daemon started, before ``READY`` is printed (e.g.
    :func:`~meshinfer.runtime.heap.settle_heap`); should it or that line fail, the daemon is
    closed and the error raised.

    ``fatal``, awaited from before the start, returns (what went wrong) once the daemon cannot
    go on: then it stops as on a signal (cancelling the start, or running ``graceful``), and
    the exit code is 1, also when that happens during a drain (which it does not cut short).
    """
    loop = asyncio.get_running_loop()
    stops = asyncio.Queue[str]()
    watch: asyncio.Task[None] | None = None
    failed: asyncio.Future[object] | None = None
    try:  # (the handlers go on every way out, a failure while setting up included)
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stops.put_nowait, sig.name)
        if parent_pid is not None:
            watched = _watch_parent(parent_pid, current_parent, pid_alive, stops)
            watch = loop.create_task(watched)
            watch.add_done_callback(log_failure(log, "the parent watch"))
        if fatal is not None:
            failed = asyncio.ensure_future(fatal())
            failed.add_done_callback(log_failure(log, "the fatal watch"))  # (its end is fatal)
        return await _serve(daemon, graceful, stops, watch, failed, on_ready)
    finally:
        try:
            await _cancelled(watch, failed)
        finally:  # (also when that wait is cut short)
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)


async def _watch_parent(
    parent_pid: int,
    current_parent: Callable[[], int],
    pid_alive: Callable[[int], bool],
    stops: asyncio.Queue[str],
) -> None:
    # nothing to await: a child learns of its parent's death only by being re-parented, and of
    # another process's death only by looking
    if current_parent() == parent_pid:
        while (parent_now := current_parent()) == parent_pid:  # noqa: ASYNC110
            await asyncio.sleep(PARENT_CHECK_S)
        how = f"re-parented to {parent_now}"
    else:
        while pid_alive(parent_pid):  # noqa: ASYNC110
            await asyncio.sleep(PARENT_CHECK_S)
        how = "no longer running"
    log.warning("parent process %d is gone (%s): stopping as on SIGTERM", parent_pid, how)
    stops.put_nowait("parent gone")


async def _serve(
    daemon: Daemon,
    graceful: Callable[[], Awaitable[None]],
    stops: asyncio.Queue[str],
    watch: asyncio.Task[None] | None,
    failed: asyncio.Task[object] | None,
    on_ready: Callable[[], None] | None,
) -> int:
    loop = asyncio.get_running_loop()
    starting = loop.create_task(daemon.start())
    first = loop.create_task(stops.get())
    stoppers = {first} if failed is None else {first, failed}
    try:
        await asyncio.wait({starting, *stoppers}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled from outside: the start goes too
        await _cancelled(first)
        await _cancelled(starting)
        await daemon.aclose()
        raise
    if not starting.done():  # a stop during the start (a join or a model load that hangs)
        log.info("stopping during the start-up (%s): closing what started", _why(first, failed))
        await _cancelled(first)
        await _cancelled(starting)
        await daemon.aclose()
        _announce(f"STOPPED {daemon.node_id}")
        return _exit_code(failed, 0)
    try:
        facts = starting.result()
    except BaseException:  # the start failed: close what it started, and raise its error
        await _cancelled(first)
        await daemon.aclose()
        raise
    ready = _ready(facts, on_ready)
    code = await _serve_ready(daemon, graceful, stops, watch, first, failed, ready)
    _announce(f"STOPPED {daemon.node_id}")
    return _exit_code(failed, code)


async def _serve_ready(
    daemon: Daemon,
    graceful: Callable[[], Awaitable[None]],
    stops: asyncio.Queue[str],
    watch: asyncio.Task[None] | None,
    first: asyncio.Task[str],
    failed: asyncio.Task[object] | None,
    ready: Callable[[], None],
) -> int:
    """Say the started ``daemon`` is ``ready``, serve until a stop, then drain it; 0, or 1 for
    a drain that failed. Cancelled from outside (or ``ready`` failing), it cancels the drain
    under way and closes the daemon at once."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Task[None] | None = None
    second: asyncio.Task[str] | None = None
    try:
        ready()
        stoppers = {first} if failed is None else {first, failed}
        await asyncio.wait(stoppers, return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping (%s)", _why(first, failed))
        await _cancelled(watch)  # only a signal cuts the drain short
        stop = loop.create_task(graceful())
        # a signal during the drain cuts it short (the first one, after a fatal stop)
        second = loop.create_task(stops.get()) if first.done() else first
        done, _ = await asyncio.wait({stop, second}, return_when=asyncio.FIRST_COMPLETED)
        if second in done:
            log.warning("%s while draining: closing at once", second.result())
            await _cancelled(stop)
            await daemon.aclose()
            return 0
        await _cancelled(second)
        failure = stop.exception()
        if failure is None:
            log.info("stopped" if _ended(failed) else "stopped cleanly")
            return 0
        log.error("the drain failed; closing at once", exc_info=failure)  # a bug in the drain
        await daemon.aclose()
        return 1
    except BaseException:  # cancelled from outside: no drain is left without an owner
        await _cancelled(stop, second, first)
        await daemon.aclose()
        raise


def _ready(facts: dict[str, Any], on_ready: Callable[[], None] | None) -> Callable[[], None]:
    """What makes a started daemon ready: ``on_ready``, then the ``READY {facts}`` line."""

    def ready() -> None:
        if on_ready is not None:
            on_ready()
        _announce("READY " + json.dumps(facts))

    return ready


def _ended(failed: asyncio.Task[object] | None) -> bool:
    """Whether the fatal watch ``failed`` ended (the daemon cannot go on)."""
    return failed is not None and failed.done() and not failed.cancelled()


def _why(first: asyncio.Task[str], failed: asyncio.Task[object] | None) -> str:
    """Why the daemon stops: a signal (or its parent gone), or what its fatal watch says."""
    if first.done() and not first.cancelled():
        return first.result()
    assert failed is not None and _ended(failed)
    exc = failed.exception()  # (logged by its done-callback)
    return f"fatal: {failed.result() if exc is None else exc}"


def _exit_code(failed: asyncio.Task[object] | None, code: int) -> int:
    """``code``, or 1 if the fatal watch ended meanwhile (a drain does not make it clean)."""
    return 1 if _ended(failed) else code


async def _cancelled(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel each of ``tasks`` (None: nothing) and wait until all have ended (their outcomes
    retrieved, also when this wait is cancelled)."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    if running:
        await asyncio.gather(*running, return_exceptions=True)


def _announce(line: str) -> None:
    """Print a lifecycle line (``READY``, ``STOPPED``) on stdout. A reader that is gone (the
    parent died) is no error: stdout goes to /dev/null from then on."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
