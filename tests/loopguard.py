"""The loop guard: a test fails when it leaks an asyncio task or blocks its event loop.

STYLE rule 11. Three probes feed one sink of findings; the pytest plugin
(:class:`LoopGuardPlugin`, registered by ``tests/conftest.py``) drains the sink after each
phase of each test (setup, call, teardown) and fails the phase that produced any.

Task leaks
    ``asyncio.Runner.close`` is wrapped. Every loop the suite runs goes through a Runner
    (pytest-asyncio's, ``asyncio.run``, the runners tests and ``run_check`` build, on asyncio,
    uvloop or the virtual clock), and ``close()`` cancels what is still pending *silently*. The
    wrapper lists those tasks first: each is a finding. A loop that outlives a test (a
    module-scoped loop) is also checked at the end of the test's teardown, for tasks created
    since the test's call began. The guard sets a task factory on each loop a Runner runs, so
    that a finding can say where its task was created.

A callback that burns the loop's CPU
    ``asyncio.events.Handle._run`` (every callback and task step on the pure-Python loops;
    uvloop's handles are C and go unmetered) is wrapped: the loop thread's
    ``/proc/self/task/<tid>/schedstat`` is read before the callback (one ``pread``, about a
    microsecond), the wall clock before and after. A callback whose *wall* time passes the
    smallest limit (rare) is then measured: its time on the CPU, less gen-2 garbage
    collection, above ``cpu_limit_s`` is a finding. On-CPU time does not grow when a noisy VM
    preempts the test process, so preemption cannot trip it. Without schedstat the thread's
    CPU clock (``time.thread_time``) is read instead, and the next probe is off.

A callback that waits
    The same measurement gives the callback's time neither on a CPU nor queued for one
    (schedstat's run-queue delay): time asleep in a syscall or on a lock. Above
    ``blocked_limit_s`` it is a finding. A call that blocks by nature, made inside a callback,
    is a finding whatever its length: ``time.sleep`` (wrapped: Python 3.11 has no audit event
    for it), and through an audit hook a DNS lookup, ``connect`` on a blocking socket,
    ``os.system``.

The limits (:class:`GuardLimits`) and why they are where they are: see its docstring.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import ipaddress
import json
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest

_ROOT = Path(__file__).resolve().parent.parent
_ASYNCIO_DIR = str(Path(asyncio.__file__).parent)
_THIS_FILE = str(Path(__file__).resolve())


@dataclass(frozen=True)
class GuardLimits:
    """Thresholds of the blocked-loop probes.

    ``cpu_limit_s``: on-CPU seconds one callback may hold the loop thread. 0.2 s is about a
    thousand times the heaviest work the runtime does inline on purpose (a NumPy forward pass
    of at most 2^18 multiply-adds: tens of microseconds), and 2.5 times the heaviest
    legitimate callback a survey of the whole suite found (LOOPGUARD_REPORT with 50 ms
    limits): 77 ms for a test's single 64 MiB ``TcpStream.write``, which asyncio copies into
    its buffer. That leaves room for a CI CPU twice as slow. Full collections are subtracted;
    CPU time of a thread does not grow while a busy 2-core VM runs someone else, so the limit
    need not cover noise.

    ``blocked_limit_s``: seconds one callback may spend asleep (neither on a CPU nor queued
    for one). A second is far above any wait a loop callback should have, and above the
    stalls a slow CI disk gives one small synchronous write; ``time.sleep`` and the other
    calls of the audit hook are flagged at any length regardless.
    """

    cpu_limit_s: float = 0.2
    blocked_limit_s: float = 1.0

    @property
    def wall_gate_s(self) -> float:
        """Callbacks shorter than this on the wall clock cannot pass either limit."""
        return min(self.cpu_limit_s, self.blocked_limit_s)


# --- findings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeakedTask:
    """A task still pending when its loop was about to close (or when its test ended)."""

    task: str
    coroutine: str
    created_at: str
    waiting_at: str
    when: str

    def describe(self) -> str:
        """One line for a test report."""
        return (
            f"task leaked ({self.when}): {self.task} running {self.coroutine}, "
            f"created at {self.created_at}, waiting at {self.waiting_at}"
        )


@dataclass(frozen=True)
class BlockedLoop:
    """A callback that held its loop: on the CPU, asleep, or in a call that blocks."""

    callback: str
    cause: str
    seconds: float
    limit_s: float
    where: str

    def describe(self) -> str:
        """One line for a test report."""
        if not self.limit_s:
            return f"loop blocked: {self.callback} blocked {self.cause}{self.where}"
        return (
            f"loop blocked: {self.callback} spent {self.seconds * 1000:.0f} ms {self.cause} "
            f"(limit {self.limit_s * 1000:.0f} ms){self.where}"
        )


Finding = LeakedTask | BlockedLoop


class FindingSink:
    """Where the probes put findings, from any thread; :meth:`captured` diverts them."""

    def __init__(self) -> None:
        self._lists: list[list[Finding]] = [[]]

    def record(self, finding: Finding) -> None:
        """Keep ``finding`` for whoever drains or captures now."""
        self._lists[-1].append(finding)

    def drain(self) -> list[Finding]:
        """The findings recorded outside any :meth:`captured` block since the last drain."""
        findings, self._lists[0] = self._lists[0], []
        return findings

    @contextmanager
    def captured(self) -> Iterator[list[Finding]]:
        """Collect the findings of the block into the yielded list instead (for tests of the
        guard, and for a test that provokes a leak or a block on purpose and asserts it)."""
        mine: list[Finding] = []
        self._lists.append(mine)
        try:
            yield mine
        finally:
            self._lists.remove(mine)


# --- describing tasks and callbacks ---------------------------------------------------------


def _site(frame: FrameType | None) -> str:
    if frame is None:
        return "?"
    path = Path(frame.f_code.co_filename)
    shown = path.relative_to(_ROOT) if path.is_relative_to(_ROOT) else path
    return f"{shown}:{frame.f_lineno} in {frame.f_code.co_name}"


def _caller_outside_asyncio() -> FrameType | None:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith((_ASYNCIO_DIR, _THIS_FILE)):
        frame = frame.f_back
    return frame


def _innermost_frame(coro: object) -> FrameType | None:
    """The innermost frame outside asyncio that a coroutine chain is suspended in (following
    ``await`` inwards)."""
    found = None
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None and not frame.f_code.co_filename.startswith(_ASYNCIO_DIR):
            found = frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return found


def _coroutine_name(task: asyncio.Task) -> str:
    coro = task.get_coro()
    return f"{getattr(coro, '__qualname__', type(coro).__name__)}()"


def _callback_name(handle: asyncio.Handle) -> str:
    callback = handle._callback
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return f"a step of task {owner.get_name()} ({_coroutine_name(owner)})"
    target = getattr(callback, "func", callback)
    return f"callback {getattr(target, '__qualname__', repr(target))}"


def _callback_where(handle: asyncio.Handle) -> str:
    owner = getattr(handle._callback, "__self__", None)
    if isinstance(owner, asyncio.Task) and not owner.done():
        return f"; the step ended at {_site(_innermost_frame(owner.get_coro()))}"
    return ""


# --- the task-leak probe --------------------------------------------------------------------


class TaskLedger:
    """Where each task of the loops the guard adopted was created, and the leak checks."""

    def __init__(self, sink: FindingSink) -> None:
        self._sink = sink
        self._origins: weakref.WeakKeyDictionary[asyncio.Task, str] = weakref.WeakKeyDictionary()
        self.open_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._reported: weakref.WeakSet[asyncio.Task] = weakref.WeakSet()

    def adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Note ``loop`` as open and have its new tasks remember where they were created."""
        if loop in self.open_loops or loop.is_closed():
            return
        self.open_loops.add(loop)
        if loop.get_task_factory() is None:
            loop.set_task_factory(self._make_task)

    def _make_task(self, loop: asyncio.AbstractEventLoop, coro, **kwargs) -> asyncio.Task:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        self._origins[task] = _site(_caller_outside_asyncio())
        return task

    def pending(self) -> dict[asyncio.AbstractEventLoop, set[asyncio.Task]]:
        """The pending tasks of every adopted loop still open and not running."""
        return {
            loop: asyncio.all_tasks(loop)
            for loop in list(self.open_loops)
            if not loop.is_closed() and not loop.is_running()
        }

    def report_pending(self, loop: asyncio.AbstractEventLoop, when: str, *, since=()) -> None:
        """Record each pending task of ``loop`` not in ``since`` as leaked (once per task)."""
        leaked = asyncio.all_tasks(loop) - set(since) - set(self._reported)
        for task in sorted(leaked, key=asyncio.Task.get_name):
            self._reported.add(task)
            self._sink.record(self._describe(task, when))

    def _describe(self, task: asyncio.Task, when: str) -> LeakedTask:
        return LeakedTask(
            task=task.get_name(),
            coroutine=_coroutine_name(task),
            created_at=self._origins.get(task, "? (made before the guard saw its loop)"),
            waiting_at=_site(_innermost_frame(task.get_coro())),
            when=when,
        )


# --- the blocked-loop probes ----------------------------------------------------------------


class _ThreadMeter:
    """The callback meter's state for one thread that runs loop callbacks."""

    def __init__(self) -> None:
        self.current: asyncio.Handle | None = None
        self.gc_cpu_s = 0.0
        self._gc_started = 0.0
        try:
            path = f"/proc/self/task/{threading.get_native_id()}/schedstat"
            self.fd = os.open(path, os.O_RDONLY)
        except OSError:
            self.fd = -1

    def read(self) -> bytes | int:
        """A raw, unparsed sample of this thread's CPU clock (cheap; parse with :meth:`cpu`)."""
        return os.pread(self.fd, 64, 0) if self.fd >= 0 else time.thread_time_ns()

    @staticmethod
    def cpu(sample: bytes | int) -> tuple[float, float | None]:
        """(seconds on a CPU, seconds queued for one or None if the kernel does not say: no
        schedstat, or a kernel that does not account run-queue delay and reports 0)."""
        if isinstance(sample, int):
            return sample / 1e9, None
        on_cpu, queued, slices = (int(field) for field in sample.split()[:3])
        unaccounted = queued == 0 and slices > 10
        return on_cpu / 1e9, None if unaccounted else queued / 1e9

    def on_gc(self, phase: str) -> None:
        """Count the CPU of a full collection run inside a callback (not the callback's)."""
        if phase == "start":
            self._gc_started = time.thread_time()
        else:
            self.gc_cpu_s += time.thread_time() - self._gc_started

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


_DNS_EVENTS = {
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyaddr",
    "socket.getnameinfo",
}


def _blocking_call(event: str, args: tuple) -> str | None:
    """What an audit event blocks on, if it is a call that blocks by nature (None if not)."""
    if event == "socket.connect":
        timeout = args[0].gettimeout()
        return "in connect() on a blocking socket" if timeout != 0 else None
    if event == "socket.getaddrinfo" and _is_numeric_host(args[0]):
        return None
    if event in _DNS_EVENTS:
        return f"in a DNS lookup ({event})"
    if event == "os.system":
        return "in os.system()"
    return None


def _is_numeric_host(host: object) -> bool:
    if host is None:
        return True
    text = host.decode() if isinstance(host, bytes) else str(host)
    try:
        ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    return True


class CallbackMeter:
    """Wraps ``Handle._run`` and audits blocking calls; records :class:`BlockedLoop`."""

    def __init__(self, sink: FindingSink, limits: GuardLimits) -> None:
        self._sink = sink
        self.limits = limits
        self._local = threading.local()
        os.register_at_fork(after_in_child=self._forget_threads)

    def _forget_threads(self) -> None:
        self._local = threading.local()  # a forked child's threads are not its parent's

    def meter(self) -> _ThreadMeter:
        """This thread's meter (made on first use)."""
        meter = getattr(self._local, "meter", None)
        if meter is None:
            meter = self._local.meter = _ThreadMeter()
        return meter

    def wrap(self, original: Callable[[asyncio.Handle], None]) -> Callable:
        """A metered version of ``Handle._run``."""
        meter_of, clock, judge = self.meter, time.perf_counter, self._judge

        def _run(handle: asyncio.Handle) -> None:
            meter = meter_of()
            before, started, gc_before = meter.read(), clock(), meter.gc_cpu_s
            meter.current = handle
            try:
                original(handle)
            finally:
                meter.current = None
                wall = clock() - started
                if wall > self.limits.wall_gate_s:
                    judge(handle, meter, before, wall, meter.gc_cpu_s - gc_before)

        _run.__loopguard__ = original  # type: ignore[attr-defined]
        return _run

    def _judge(self, handle, meter: _ThreadMeter, before, wall: float, gc_s: float) -> None:
        cpu0, queued0 = meter.cpu(before)
        cpu1, queued1 = meter.cpu(meter.read())
        cpu = cpu1 - cpu0 - gc_s
        name, where = _callback_name(handle), _callback_where(handle)
        if cpu > self.limits.cpu_limit_s:
            self._sink.record(BlockedLoop(name, "on the CPU", cpu, self.limits.cpu_limit_s, where))
        if queued0 is None:
            return
        asleep = wall - (cpu1 - cpu0) - (queued1 - queued0)
        if asleep > self.limits.blocked_limit_s:
            cause = "asleep (blocking I/O, a lock, or a wait)"
            self._sink.record(BlockedLoop(name, cause, asleep, self.limits.blocked_limit_s, where))

    def on_gc(self, phase: str, info: dict) -> None:
        """``gc.callbacks`` entry: full collections inside a callback are not its CPU."""
        if info["generation"] == 2:
            meter = getattr(self._local, "meter", None)
            if meter is not None and meter.current is not None:
                meter.on_gc(phase)

    def on_audit(self, event: str, args: tuple) -> None:
        """Audit hook: a blocking call made inside a loop callback is a finding."""
        if self._in_callback():
            cause = _blocking_call(event, args)
            if cause is not None:
                self._record_call(cause, sys._getframe(2))

    def wrap_sleep(self, original: Callable[[float], None]) -> Callable[[float], None]:
        """``time.sleep`` that is a finding inside a loop callback (Python 3.11 has no audit
        event for it)."""

        def sleep(seconds: float) -> None:
            if seconds > 0 and self._in_callback():
                self._record_call(f"in time.sleep({seconds})", sys._getframe(1))
            original(seconds)

        return sleep

    def _in_callback(self) -> bool:
        meter = getattr(self._local, "meter", None)
        return meter is not None and meter.current is not None

    def _record_call(self, cause: str, caller: FrameType) -> None:
        name = _callback_name(self.meter().current)
        self._sink.record(BlockedLoop(name, cause, 0.0, 0.0, f"; called from {_site(caller)}"))


# --- installing the probes ------------------------------------------------------------------


class LoopGuard:
    """The probes, installed into asyncio for the duration of a test session."""

    def __init__(self, limits: GuardLimits | None = None) -> None:
        self.sink = FindingSink()
        self.ledger = TaskLedger(self.sink)
        self.meter = CallbackMeter(self.sink, limits or GuardLimits())
        self._undo: list[Callable[[], None]] = []
        self._audit_on = self._audit_hooked = False

    @property
    def installed(self) -> bool:
        """Whether the probes are in place."""
        return bool(self._undo)

    def install(self) -> None:
        """Wrap ``Runner.run``/``close`` and ``Handle._run``, hook gc and audit events."""
        if self.installed:
            return
        runner, handle = asyncio.Runner, asyncio.events.Handle
        if hasattr(handle._run, "__loopguard__"):
            raise RuntimeError("another loop guard is installed in this process")
        self._patch(runner, "run", self._wrap_run(runner.run))
        self._patch(runner, "close", self._wrap_close(runner.close))
        self._patch(handle, "_run", self.meter.wrap(handle._run))
        self._patch(time, "sleep", self.meter.wrap_sleep(time.sleep))
        gc.callbacks.append(self.meter.on_gc)
        self._undo.append(lambda: gc.callbacks.remove(self.meter.on_gc))
        if not self._audit_hooked:  # audit hooks cannot be removed: _audit_on gates this one
            sys.addaudithook(self._audit)
            self._audit_hooked = True
        self._audit_on = True
        self._undo.append(lambda: setattr(self, "_audit_on", False))

    def uninstall(self) -> None:
        """Undo :meth:`install` (the audit hook stays, switched off)."""
        while self._undo:
            self._undo.pop()()

    def _patch(self, owner: type, name: str, replacement: object) -> None:
        original = owner.__dict__[name]
        setattr(owner, name, replacement)
        self._undo.append(lambda: setattr(owner, name, original))

    def _audit(self, event: str, args: tuple) -> None:
        if self._audit_on:
            self.meter.on_audit(event, args)

    def _wrap_run(self, original: Callable) -> Callable:
        ledger = self.ledger

        @functools.wraps(original)
        def run(runner: asyncio.Runner, coro, *, context=None):
            try:
                ledger.adopt(runner.get_loop())
            except RuntimeError:
                pass  # a closed runner: the original run says so
            return original(runner, coro, context=context)

        return run

    def _wrap_close(self, original: Callable) -> Callable:
        ledger = self.ledger

        @functools.wraps(original)
        def close(runner: asyncio.Runner) -> None:
            loop = runner._loop
            if loop is not None and not loop.is_closed() and not loop.is_running():
                ledger.report_pending(loop, "still pending as its loop closed")
            original(runner)

        return close

    def snapshot(self) -> dict[asyncio.AbstractEventLoop, set[asyncio.Task]]:
        """The pending tasks of the open loops now (see :meth:`report_new`)."""
        return self.ledger.pending()

    def report_new(self, before: dict[asyncio.AbstractEventLoop, set[asyncio.Task]]) -> None:
        """Tasks pending on a still-open loop that were not in ``before`` are leaks: a loop
        wider than a test (module-scoped) does not close when the test that leaked ends."""
        for loop in self.ledger.pending():
            since = before.get(loop, ())
            self.ledger.report_pending(loop, "left pending after its test", since=since)


GUARD = LoopGuard()
"""The process's loop guard (the probes patch asyncio process-wide, so there is one)."""


# --- the pytest plugin ----------------------------------------------------------------------

_hookwrapper = pytest.hookimpl(wrapper=True)
_PENDING_BEFORE_CALL = pytest.StashKey[dict]()


def _fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


@dataclass(frozen=True)
class Allowance:
    """A known finding the guard lets pass: tests whose node id starts with ``test`` may have
    findings whose description matches the regular expression ``match``. ``reason`` says why,
    or where the finding is reported until its owner fixes it."""

    test: str
    match: str
    reason: str

    def covers(self, nodeid: str, finding: Finding) -> bool:
        """Whether this allowance excuses ``finding`` in test ``nodeid``."""
        return (
            nodeid.startswith(self.test) and re.search(self.match, finding.describe()) is not None
        )


class LoopGuardPlugin:
    """Installs :data:`GUARD` for the session and fails each test phase that has findings.

    With ``report_to`` set it fails nothing and appends every finding (under lowered limits)
    to that file as JSON lines instead: a survey of the suite.
    """

    def __init__(
        self, guard: LoopGuard = GUARD, allowances=(), report_to: Path | None = None
    ) -> None:
        self.guard = guard
        self.allowances = tuple(allowances)
        self.report_to = report_to
        self.stray: list[Finding] = []

    def pytest_sessionstart(self) -> None:
        self.guard.install()

    def pytest_sessionfinish(self, session) -> None:
        self.guard.uninstall()
        self.stray += self.guard.sink.drain()
        if self.stray and not self.report_to:
            session.exitstatus = 1

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.stray:
            terminalreporter.section("loop guard: findings outside any test")
            for finding in self.stray:
                terminalreporter.line(finding.describe())

    @_hookwrapper
    def pytest_runtest_setup(self, item):
        self.stray += self.guard.sink.drain()
        return (yield from self._judged(item, "setup"))

    @_hookwrapper
    def pytest_runtest_call(self, item):
        item.stash[_PENDING_BEFORE_CALL] = self.guard.snapshot()
        return (yield from self._judged(item, "call"))

    @_hookwrapper
    def pytest_runtest_teardown(self, item):
        before_call = item.stash.get(_PENDING_BEFORE_CALL, None)  # None: the call never ran
        return (yield from self._judged(item, "teardown", before_call))

    def _judged(self, item, phase: str, check_new=None):
        try:
            result = yield
        except BaseException as exc:
            message = self._verdict(item, phase, check_new)
            if message:
                exc.add_note(message)
            raise
        message = self._verdict(item, phase, check_new)
        if message:
            _fail(message)
        return result

    def _verdict(self, item, phase: str, check_new) -> str:
        if check_new is not None:
            self.guard.report_new(check_new)
        findings = [f for f in self.guard.sink.drain() if not self._allowed(item.nodeid, f)]
        if self.report_to:
            self._write_report(item.nodeid, phase, findings)
            return ""
        return _message(findings)

    def _allowed(self, nodeid: str, finding: Finding) -> bool:
        return any(allowance.covers(nodeid, finding) for allowance in self.allowances)

    def _write_report(self, nodeid: str, phase: str, findings: list[Finding]) -> None:
        with self.report_to.open("a") as out:
            for finding in findings:
                row = {"test": nodeid, "phase": phase, "kind": type(finding).__name__}
                out.write(json.dumps(row | dataclasses.asdict(finding)) + "\n")


def _message(findings: list[Finding]) -> str:
    if not findings:
        return ""
    lines = "\n".join(f"  - {finding.describe()}" for finding in findings)
    return f"loop guard (STYLE rule 11): {len(findings)} finding(s)\n{lines}"
