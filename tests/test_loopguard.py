"""The loop guard (tests/loopguard.py) can fail: leaks, CPU-bound and sleeping callbacks and
blocking calls are found; awaited tasks, preemption, garbage collection and non-blocking
sockets are not findings. The last tests run an inner pytest to see a test fail end to end.

Each scenario runs on its own ``asyncio.Runner`` inside ``GUARD.sink.captured()``, so what the
guard finds goes to the test instead of failing it; limits are lowered where that saves time.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.loopguard import (
    GUARD,
    Allowance,
    BlockedLoop,
    Finding,
    GuardLimits,
    LeakedTask,
    LoopGuardPlugin,
)

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def limits(cpu_s: float, blocked_s: float) -> Iterator[None]:
    saved = GUARD.meter.limits
    GUARD.meter.limits = GuardLimits(cpu_limit_s=cpu_s, blocked_limit_s=blocked_s)
    try:
        yield
    finally:
        GUARD.meter.limits = saved


def run_guarded(scenario: Coroutine[Any, Any, Any], loop_factory=None) -> list[Finding]:
    """Run ``scenario`` on a fresh runner, close it, and return what the guard found."""
    with GUARD.sink.captured() as findings, asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario)
    return findings


def burn_cpu(seconds: float) -> None:
    """Spin on this thread's CPU clock (not the wall clock) for ``seconds``."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


async def sleep_forever() -> None:
    await asyncio.Event().wait()


def guard_in_asyncio() -> bool:
    """Whether the guard's probes are in asyncio now (as the session's plugin puts them)."""
    handle_run, runner_close = asyncio.events.Handle._run, asyncio.Runner.close
    return hasattr(handle_run, "__loopguard__") and hasattr(runner_close, "__wrapped__")


@pytest.fixture(autouse=True)
def guard_installed() -> Iterator[bool]:
    """These tests drive the guard directly, also in a session run with LOOPGUARD=off: it is
    installed for each test. Yields whether it was in place before, i.e. the session's."""
    by_session = guard_in_asyncio()
    installed_here = not GUARD.installed
    GUARD.install()
    yield by_session
    if installed_here:
        GUARD.uninstall()


def test_the_suite_runs_under_the_guard(request: pytest.FixtureRequest, guard_installed) -> None:
    """The plugin of tests/conftest.py installed the guard for the session (before this
    module's fixture could); with LOOPGUARD=off there is neither plugin nor guard."""
    plugin = request.config.pluginmanager.get_plugin("loopguard")
    if os.environ.get("LOOPGUARD") == "off":
        assert plugin is None
        assert not guard_installed, "LOOPGUARD=off, yet the guard was installed"
    else:
        assert isinstance(plugin, LoopGuardPlugin)
        assert guard_installed, "the session runs without the loop guard"


@pytest.mark.parametrize("loop_factory", [None, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_task_pending_at_loop_close_is_a_leak_naming_its_coroutine_and_origin(
    loop_factory,
) -> None:
    async def scenario() -> None:
        asyncio.get_running_loop().create_task(sleep_forever(), name="forgotten")
        await asyncio.sleep(0)

    findings = run_guarded(scenario(), loop_factory)

    assert len(findings) == 1
    leak = findings[0]
    assert isinstance(leak, LeakedTask)
    assert leak.task == "forgotten"
    assert leak.coroutine == "sleep_forever()"
    assert leak.created_at.startswith("tests/test_loopguard.py:")
    assert leak.created_at.endswith("in scenario")
    assert "in sleep_forever" in leak.waiting_at


def test_tasks_awaited_or_cancelled_and_awaited_are_not_leaks() -> None:
    async def scenario() -> None:
        done = asyncio.create_task(asyncio.sleep(0))
        cancelled = asyncio.create_task(sleep_forever())
        await done
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)

    assert run_guarded(scenario()) == []


def test_a_task_left_on_a_loop_that_outlives_the_test_is_a_leak() -> None:
    """A module-scoped loop does not close at the end of the test that leaked on it."""
    runner = asyncio.Runner()
    with GUARD.sink.captured() as findings:
        runner.run(asyncio.sleep(0))
        before = GUARD.snapshot()
        runner.run(_spawn(sleep_forever()))
        GUARD.report_new(before)
        leaked_while_open = list(findings)
        runner.close()

    assert [f.coroutine for f in leaked_while_open] == ["sleep_forever()"]
    assert "after its test" in leaked_while_open[0].when
    assert findings == leaked_while_open  # not reported again as the loop closed


async def _spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task:
    task = asyncio.create_task(coro)
    await asyncio.sleep(0)
    return task


def test_a_callback_that_burns_cpu_past_the_limit_is_found() -> None:
    async def scenario() -> None:
        burn_cpu(0.08)

    with limits(cpu_s=0.04, blocked_s=10):
        findings = run_guarded(scenario())

    assert len(findings) == 1
    block = findings[0]
    assert isinstance(block, BlockedLoop)
    assert block.cause == "on the CPU"
    assert 0.07 < block.seconds < 1
    assert "scenario()" in block.callback


def test_plain_callbacks_are_measured_too() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.call_soon(lambda: (burn_cpu(0.06), done.set_result(None)))
        await done

    with limits(cpu_s=0.03, blocked_s=10):
        findings = run_guarded(scenario())

    assert [f.callback for f in findings] == [
        "callback test_plain_callbacks_are_measured_too.<locals>.scenario.<locals>.<lambda>"
    ]


def test_cpu_under_the_limit_split_across_steps_is_no_finding() -> None:
    async def scenario() -> None:
        for _ in range(4):
            burn_cpu(0.02)
            await asyncio.sleep(0)

    with limits(cpu_s=0.04, blocked_s=10):
        assert run_guarded(scenario()) == []


def test_preemption_does_not_count() -> None:
    """The loop thread shares one CPU with a busy process: its callback takes about twice its
    CPU time on the wall clock, which a wall-clock guard would flag; the time it spent queued
    for the CPU is not time asleep either."""
    seen: dict[str, float] = {}

    async def scenario() -> None:
        start = time.perf_counter()
        burn_cpu(0.06)
        seen["wall"] = time.perf_counter() - start

    with limits(cpu_s=0.09, blocked_s=0.03), one_cpu_shared_with_a_hog():
        findings = run_guarded(scenario())

    assert seen["wall"] > 0.09, "the hog did not preempt the loop; nothing was tested"
    assert findings == []


@contextmanager
def one_cpu_shared_with_a_hog() -> Iterator[None]:
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    hog = subprocess.Popen(
        [sys.executable, "-c", "print(flush=True)\nwhile True: pass"], stdout=subprocess.PIPE
    )
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        os.sched_setaffinity(0, {cpu})  # this thread only
        assert hog.stdout.readline() == b"\n"
        yield
    finally:
        os.sched_setaffinity(0, saved)
        hog.kill()
        hog.wait()


def test_time_sleep_in_a_callback_is_found_at_any_length() -> None:
    async def scenario() -> None:
        time.sleep(0.001)  # noqa: ASYNC251 -- the finding this test is about

    findings = run_guarded(scenario())

    assert [f.cause for f in findings] == ["in time.sleep(0.001)"]
    assert "test_loopguard.py" in findings[0].where


def test_time_sleep_off_the_loop_is_fine() -> None:
    async def scenario() -> None:
        await asyncio.to_thread(time.sleep, 0.001)

    assert run_guarded(scenario()) == []


def test_a_callback_asleep_past_the_limit_is_found() -> None:
    """A wait that is not time.sleep (a lock, an event, a future's result) is found by the
    time the loop thread spent neither on a CPU nor queued for one."""

    async def scenario() -> None:
        threading.Event().wait(0.12)

    with limits(cpu_s=10, blocked_s=0.06):
        findings = run_guarded(scenario())

    assert [f.cause for f in findings] == ["asleep (blocking I/O, a lock, or a wait)"]
    assert findings[0].seconds > 0.06


def test_connect_on_a_blocking_socket_is_found_and_asyncio_connect_is_not() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()

        async def blocking() -> None:
            socket.create_connection(address).close()

        async def nonblocking() -> None:
            _, writer = await asyncio.open_connection(*address)
            writer.close()
            await writer.wait_closed()

        assert run_guarded(nonblocking()) == []
        findings = run_guarded(blocking())

    assert [f.cause for f in findings] == ["in connect() on a blocking socket"]


def test_a_dns_lookup_on_the_loop_is_found_but_a_numeric_address_is_not() -> None:
    async def scenario() -> None:
        socket.getaddrinfo("127.0.0.1", 80)
        socket.getaddrinfo("localhost", 80)

    findings = run_guarded(scenario())

    assert [f.cause for f in findings] == ["in a DNS lookup (socket.getaddrinfo)"]


def test_a_full_garbage_collection_inside_a_callback_is_not_its_cpu() -> None:
    heap = [[i] for i in range(600_000)]  # ~40 ms to collect
    took: dict[str, float] = {}

    async def scenario() -> None:
        start = time.thread_time()
        gc.collect()
        took["gc"] = time.thread_time() - start

    with limits(cpu_s=0.005, blocked_s=10):
        findings = run_guarded(scenario())

    assert took["gc"] > 0.005, "the collection was too quick to test anything"
    assert findings == []
    del heap


def test_an_allowance_covers_only_its_tests_and_findings() -> None:
    leak = LeakedTask("Task-1", "Coordinator._tick()", "a.py:1 in f", "a.py:2 in g", "closing")
    allowance = Allowance("tests/test_x.py::test_a", r"running Coordinator\._tick\(\)", "§1")

    assert allowance.covers("tests/test_x.py::test_a[tcp]", leak)
    assert not allowance.covers("tests/test_x.py::test_b", leak)
    assert not allowance.covers("tests/test_x.py::test_a", BlockedLoop("cb", "x", 1, 0.2, ""))


INNER_TESTS = """
import asyncio
import time


async def test_leaks() -> None:
    asyncio.create_task(asyncio.Event().wait())


async def test_burns_the_loop() -> None:
    start = time.thread_time()
    while time.thread_time() - start < 0.25:
        pass


async def test_clean() -> None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
"""

INNER_MODULE_LOOP_TESTS = """
import asyncio

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_leaks_on_the_module_loop() -> None:
    asyncio.create_task(asyncio.Event().wait())


async def test_clean_on_the_same_loop() -> None:
    await asyncio.sleep(0)
"""

INNER_CONFTEST = """
from tests.loopguard import GUARD, LoopGuardPlugin


def pytest_configure(config):
    config.pluginmanager.register(LoopGuardPlugin(GUARD), "loopguard")
"""


def test_a_suite_with_the_plugin_fails_the_leaking_and_blocking_tests(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS, test_module_loop=INNER_MODULE_LOOP_TESTS)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=4, failed=1, errors=2)  # a leak fails its test's teardown
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks *",
            "*task leaked (still pending as its loop closed)*running Event.wait()*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_on_the_module_loop*",
            "*task leaked (left pending after its test)*running Event.wait()*",
        ]
    )
    result.stdout.fnmatch_lines(["*test_burns_the_loop*", "*on the CPU (limit 200 ms)*"])


INNER_SLOW_TESTS = """
import time


def burn_cpu(seconds):
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


async def test_holds_the_loop_past_the_limit() -> None:
    burn_cpu(0.25)


async def test_holds_the_loop_past_the_survey_limit_only() -> None:
    burn_cpu(0.1)
"""

INNER_SUITE_CONFTEST = """
from tests.conftest import pytest_configure  # the suite's own, which reads LOOPGUARD_REPORT
"""


def test_survey_mode_reports_under_lowered_limits_and_fails_nothing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("LOOPGUARD", raising=False)
    monkeypatch.delenv("LOOPGUARD_REPORT", raising=False)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makeconftest(INNER_SUITE_CONFTEST)
    pytester.makepyfile(test_slow=INNER_SLOW_TESTS)

    guarded = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    report = tmp_path / "survey.jsonl"
    monkeypatch.setenv("LOOPGUARD_REPORT", str(report))
    surveyed = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    guarded.assert_outcomes(passed=1, failed=1)
    blocked = "*loop blocked: *(test_holds_the_loop_past_the_limit()) spent * ms on the CPU"
    guarded.stdout.fnmatch_lines([f"{blocked} (limit 200 ms)*"])
    surveyed.assert_outcomes(passed=2)
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    found = {row["test"]: row for row in rows if row["phase"] == "call"}
    assert sorted(found) == [
        "test_slow.py::test_holds_the_loop_past_the_limit",
        "test_slow.py::test_holds_the_loop_past_the_survey_limit_only",
    ]
    for test, row in found.items():
        assert (row["kind"], row["cause"], row["limit_s"]) == ("BlockedLoop", "on the CPU", 0.05)
        assert test.partition("::")[2] + "()" in row["callback"]
        assert row["seconds"] > 0.05
