"""Session 35: the test infrastructure itself -- the transport conformance suite catches broken
transports, the virtual clock runs equal-deadline timers in order, and the Triton test server
cleans up after a failed or dead start."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from meshinfer.errors import StreamClosed, TransportError
from meshinfer.testing import transport_conformance as conformance
from meshinfer.testing.transport_conformance import TransportSetup
from meshinfer.testing.triton_server import READY_LINE, TritonServerError, TritonServerProcess
from meshinfer.testing.virtual_clock import VirtualClockLoop
from meshinfer.transport.base import Address, Stream
from meshinfer.transport.memory import MemoryNetwork, MemoryTransport

# --- deliberately broken transports: wrappers around the in-memory one ------------------------


class BrokenStream:
    """A memory stream with one fault switched on (``fault``)."""

    def __init__(self, inner: Stream, fault: str) -> None:
        self.inner, self.fault = inner, fault
        self.link = inner.link
        self.local_address, self.remote_address = inner.local_address, inner.remote_address
        self._held: bytes | None = None  # "drop_last_on_close": the last write, not yet sent
        self._closed = False

    async def read(self, max_bytes: int = 65536) -> bytes:
        if self.fault == "oversize_read" and max_bytes >= 1:
            max_bytes = max(max_bytes, 4096)  # ignores a small max_bytes
        return await self.inner.read(max_bytes)

    async def write(self, data: bytes) -> None:
        if self.fault == "silent_write_after_close" and self._closed:
            return  # never raises on a closed stream
        if self.fault == "reorder" and len(data) > 1:
            half = len(data) // 2
            await self.inner.write(data[half:])
            await self.inner.write(data[:half])
            return
        if self.fault == "drop_last_on_close":
            held, self._held = self._held, bytes(data)
            if held is not None:
                await self.inner.write(held)
            return
        await self.inner.write(data)

    async def aclose(self) -> None:
        self._closed = True
        self._held = None  # the last write is lost
        await self.inner.aclose()

    def abort(self) -> None:
        self._closed = True
        self.inner.abort()


class BrokenTransport:
    def __init__(self, inner: MemoryTransport, fault: str) -> None:
        self.inner, self.fault = inner, fault
        self.link = inner.link

    async def dial(self, address: Address, *, timeout: float | None = None) -> BrokenStream:
        try:
            stream = await self.inner.dial(address, timeout=timeout)
        except TransportError as exc:
            if self.fault == "raw_refusal":
                raise ConnectionRefusedError(
                    "refused (a builtin error, not TransportError)"
                ) from exc
            raise
        return BrokenStream(stream, self.fault)

    async def listen(self, address: Address, handler):
        async def wrapped(stream: Stream) -> None:
            await handler(BrokenStream(stream, self.fault))

        return await self.inner.listen(address, wrapped)


def broken(fault: str):
    @asynccontextmanager
    async def setup() -> AsyncIterator[TransportSetup]:
        network = MemoryNetwork()
        transport = BrokenTransport(MemoryTransport(network, host="h"), fault)
        yield TransportSetup(transport, Address("h", 0))  # type: ignore[arg-type]

    return setup


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        ("reorder", conformance.check_ordered_and_complete),
        ("drop_last_on_close", conformance.check_eof_after_peer_close),
        ("silent_write_after_close", conformance.check_write_after_close_raises),
        ("oversize_read", conformance.check_ordered_and_complete),
        ("raw_refusal", conformance.check_dial_nothing_raises),
    ],
)
def test_suite_catches_a_broken_transport(fault: str, check: conformance.Check) -> None:
    """Each fault fails its check with an AssertionError (the suite's way of saying "breaks the
    contract"). Old code: a read handing out more than ``max_bytes`` passed every check, and a
    dial failing with a builtin error escaped as that error instead of a failed check."""

    async def small(factory: conformance.TransportFactory) -> None:
        if check is conformance.check_ordered_and_complete:
            await check(factory, total=64 * 1024)
        else:
            await check(factory)

    with pytest.raises(AssertionError):
        conformance.run_check(small, broken(fault), loop_factory=VirtualClockLoop)


def test_the_wrappers_themselves_pass_when_no_fault_is_on() -> None:
    """The broken transports only fail for their fault: with none on, the same checks pass."""

    async def checks(factory: conformance.TransportFactory) -> None:
        await conformance.check_ordered_and_complete(factory, total=64 * 1024)
        await conformance.check_eof_after_peer_close(factory)
        await conformance.check_write_after_close_raises(factory)
        await conformance.check_dial_nothing_raises(factory)

    conformance.run_check(checks, broken("none"), loop_factory=VirtualClockLoop)


def test_expect_raises_names_the_wrong_exception() -> None:
    async def refuse() -> None:
        raise ConnectionRefusedError("nope")

    with pytest.raises(AssertionError, match="expected TransportError, got ConnectionRefusedError"):
        asyncio.run(conformance.expect_raises(TransportError, refuse()))


def test_a_timeout_error_from_the_check_is_not_called_a_deadlock() -> None:
    """Old code: any TimeoutError out of a check read "took over 30s (deadlock?)", even one raised
    at once by the transport under test."""

    async def raises_timeout(factory: conformance.TransportFactory) -> None:
        raise TimeoutError("the transport's own dial timeout")

    with pytest.raises(TimeoutError, match="the transport's own dial timeout"):
        conformance.run_check(raises_timeout, broken("none"), loop_factory=VirtualClockLoop)

    async def own_timeout() -> None:
        raise TimeoutError("inner")

    async def main() -> None:
        with pytest.raises(TimeoutError, match="inner"):
            await conformance.within(5, own_timeout(), "something")

    asyncio.run(main())


def test_a_real_deadlock_is_still_reported_as_one() -> None:
    async def hangs(factory: conformance.TransportFactory) -> None:
        await asyncio.sleep(60)

    with pytest.raises(AssertionError, match=r"took over 1s \(deadlock\?\)"):
        conformance.run_check(hangs, broken("none"), loop_factory=VirtualClockLoop, time_limit=1)


# --- virtual clock --------------------------------------------------------------------------


def test_timers_with_equal_deadlines_run_in_the_order_scheduled() -> None:
    """Old code: eight ``call_at(5.0)`` ran as 0, 2, 6, 5, 7, 1, 3, 4 (heap order)."""

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        out: list[object] = []
        for i in range(8):
            loop.call_at(5.0, out.append, i)
        loop.call_at(5.0, out.append, "cancelled").cancel()
        loop.call_later(5.0, out.append, "call_later")  # same instant, scheduled last
        loop.call_at(4.0, out.append, "earlier")
        await asyncio.sleep(10)
        return out

    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        assert runner.run(main()) == ["earlier", *range(8), "call_later"]


def test_sleepers_waking_at_one_instant_resume_in_order() -> None:
    async def main() -> list[int]:
        woke: list[int] = []

        async def sleeper(i: int) -> None:
            await asyncio.sleep(1.0)
            woke.append(i)

        async with asyncio.TaskGroup() as tg:
            for i in range(20):
                tg.create_task(sleeper(i))
        return woke

    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        assert runner.run(main()) == list(range(20))


# --- Triton test server: start failures and dead servers clean up ------------------------------


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _wait_dead(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


class FakeServer(TritonServerProcess):
    """Runs ``script`` (Python) in place of the Triton server, the way ``_spawn`` runs it: own
    process group, log file, the ready fd passed as ``sys.argv[1]``."""

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script

    def _spawn(self, ready_fd: int) -> subprocess.Popen[bytes]:
        assert self.log_path is not None
        with open(self.log_path, "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-c", self.script, str(ready_fd)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(ready_fd,),
                start_new_session=True,
            )


# the child starts a grandchild in its group (as PyTriton starts tritonserver), writes its pid
# to the log, reports ready, then exits by itself: a server that dies on its own
DIES_AFTER_READY = f"""
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("grandchild", child.pid, flush=True)
os.write(int(sys.argv[1]), {READY_LINE!r})
"""


def test_spawn_failure_is_a_clear_error_and_leaks_nothing(monkeypatch) -> None:
    """Old code: a raw FileNotFoundError, the ready pipe's read end left open and the temporary
    folder left behind."""
    server = TritonServerProcess()
    monkeypatch.setattr(sys, "executable", "/nonexistent/python-for-meshinfer-test")
    before = _open_fds()
    with pytest.raises(TritonServerError, match="could not start the server"):
        server.start(timeout_s=5)
    assert _open_fds() == before
    assert server.log_path is not None and not server.log_path.parent.exists()
    assert not server.running


def test_a_server_that_exits_during_startup_says_so() -> None:
    server = FakeServer("import sys; print('boom: no models'); sys.exit(3)")
    before = _open_fds()
    with pytest.raises(TritonServerError, match=r"(?s)exited during startup.*boom: no models"):
        server.start(timeout_s=10)
    assert _open_fds() == before
    assert not server.running
    assert server.log_path is not None and not server.log_path.parent.exists()


def test_a_server_never_ready_times_out_and_is_stopped() -> None:
    server = FakeServer("import time; print('loading', flush=True); time.sleep(60)")
    with pytest.raises(TritonServerError, match=r"(?s)not ready after 0.5 s.*loading"):
        server.start(timeout_s=0.5)
    assert not server.running and server._process is None


def test_start_after_the_server_died_by_itself_reaps_what_it_left() -> None:
    """Old code: ``start`` saw ``running`` False and started anew, leaving the dead server's
    process group (tritonserver, here a sleeping grandchild) and its folder behind."""
    server = FakeServer(DIES_AFTER_READY)
    grandchildren: list[int] = []
    try:
        server.start(timeout_s=10)
        first = server._process
        assert first is not None
        first.wait(10)
        assert server.log_path is not None
        old_folder = server.log_path.parent
        grandchild = int(server.log_tail().split()[-1])
        grandchildren.append(grandchild)
        assert _alive(grandchild)
        server.start(timeout_s=10)
        grandchildren.append(int(server.log_tail().split()[-1]))
        assert _wait_dead(grandchild), "the dead server's grandchild still runs"
        assert not old_folder.exists()
    finally:
        server.stop(timeout_s=5)
        for pid in grandchildren:  # whatever a failure here left running
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert all(_wait_dead(pid) for pid in grandchildren)


def test_free_ports_are_distinct() -> None:
    server = TritonServerProcess()
    assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3


def test_stream_closed_is_what_a_silent_wrapper_hides() -> None:
    """Sanity: the plain memory stream raises StreamClosed after aclose (what the
    "silent_write_after_close" fault suppresses)."""

    async def main() -> None:
        network = MemoryNetwork()
        transport = MemoryTransport(network, host="x")
        listener = await transport.listen(Address("x", 0), conformance.echo)
        stream = await transport.dial(listener.address)
        await stream.aclose()
        with pytest.raises(StreamClosed):
            await stream.write(b"late")
        await listener.aclose()

    asyncio.run(main())


def test_an_assertion_inside_a_task_group_comes_out_as_an_assertion_error() -> None:
    """Old code: a failed assertion in one of a check's tasks reached the caller wrapped in an
    ExceptionGroup, not as the AssertionError the suite promises."""

    async def fails_in_a_task(factory: conformance.TransportFactory) -> None:
        async def bad() -> None:
            raise AssertionError("bytes arrived reordered")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(bad())

    with pytest.raises(AssertionError, match="bytes arrived reordered"):
        conformance.run_check(fails_in_a_task, broken("none"))
