"""A telemetry reading hung for good does not hold the process's exit (thirty-fifth session)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

HUNG = textwrap.dedent(
    """
    import asyncio, threading
    from meshinfer.runtime.telemetry import GpuSample, TelemetryCollector

    class WedgedGpu:  # an NVML call to a wedged GPU: it never returns
        available = True
        def sample(self):
            threading.Event().wait()
        def close(self):  # NVML's shutdown waits on the hung call
            threading.Event().wait()

    async def main():
        collector = TelemetryCollector(gpu=False, sample_timeout_s=0.2)
        collector._nvml = WedgedGpu()
        try:
            await collector.sample()
        except TimeoutError:
            print("timed out", flush=True)
        collector.close()
        print("closed", flush=True)

    asyncio.run(main())
    """
)


def test_a_hung_gpu_reading_does_not_hold_the_exit() -> None:
    # was: close() called NVML's shutdown on the caller's thread (it waited on the hung call),
    # and the executor's worker thread, hung, was joined at interpreter exit: never exited
    try:
        done = subprocess.run(
            [sys.executable, "-c", HUNG], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the process never exited: {exc.stdout!r}") from None
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["timed", "out", "closed"]
