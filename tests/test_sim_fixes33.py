"""Session 33 review of the simulation harness: virtual clock, virtual network, meshinfer-sim."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from meshinfer.errors import LocalProtocolError
from meshinfer.testing.virtual_network import VirtualNetwork
from simulations.cli import main

ROOT = Path(__file__).resolve().parents[1]


class _RecordingCore:
    """A core that records the packets it gets and asks for a tick at ``deadline``."""

    def __init__(self, deadline: float = math.inf) -> None:
        self.deadline = deadline
        self.got: list[tuple[str, bytes]] = []
        self.ticks: list[float] = []

    def handle_packet(self, from_node: str, data: bytes, now: float) -> None:
        self.got.append((from_node, data))

    def tick(self, now: float) -> None:
        self.ticks.append(now)
        self.deadline = math.inf

    def next_deadline(self) -> float:
        return self.deadline

    def drain_packets(self) -> list[tuple[str, bytes]]:
        return []

    def drain_events(self) -> list:
        return []


def _on_virtual_clock_in_a_process(body: str) -> str:
    """Run ``body`` (the inside of ``async def main()``) on a VirtualClockLoop in a process, so
    that a loop that hangs fails the test instead of hanging it."""
    main_function = "async def main():\n" + "".join(f"    {line}\n" for line in body.splitlines())
    code = (
        "import asyncio, math\n"
        "from meshinfer.testing.virtual_clock import VirtualClockLoop, VirtualClockDeadlock\n"
        f"{main_function}"
        "try:\n"
        "    factory = lambda: VirtualClockLoop(deadlock_after=0.05)\n"
        "    with asyncio.Runner(loop_factory=factory) as r:\n"
        "        print(r.run(main()))\n"
        "except VirtualClockDeadlock:\n"
        "    print('deadlock')\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=15
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the virtual clock loop hung")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# --- virtual clock -------------------------------------------------------------------------------


def test_a_task_that_sleeps_forever_alone_is_a_deadlock_not_a_hang() -> None:
    """Old code: a timer at infinity was approached a day at a time, for ever."""
    assert _on_virtual_clock_in_a_process("await asyncio.sleep(math.inf)") == "deadlock"


def test_a_timer_far_in_the_future_is_reached_in_one_jump() -> None:
    """Old code: asyncio's one-day cap on the select timeout made 1e15 s take 1e10 loop turns."""
    body = (
        "loop = asyncio.get_running_loop()\n"
        "start = loop.time()\n"
        "await asyncio.sleep(1e15)\n"
        "return loop.time() - start >= 1e15"
    )
    assert _on_virtual_clock_in_a_process(body) == "True"


# --- virtual network -----------------------------------------------------------------------------


def test_packets_in_flight_when_a_partition_is_made_are_cut_in_both_directions() -> None:
    network = VirtualNetwork(random.Random(1), latency=(1.0, 1.0))
    a, b, c = _RecordingCore(), _RecordingCore(), _RecordingCore()
    for node_id, core in (("a", a), ("b", b), ("c", c)):
        network.add(node_id, core)
    network.inject("a", "b", b"a->b")
    network.inject("b", "a", b"b->a")
    network.inject("a", "c", b"a->c")  # c is on a's side: not cut
    network.run_for(0.5)
    network.partition(["a", "c"], ["b"])
    network.run_for(1.0)
    assert a.got == [] and b.got == [] and c.got == [("a", b"a->c")]
    assert network.stats.cut == 2 and network.stats.delivered == 1


def test_a_nan_schedule_is_refused_and_later_callbacks_still_run() -> None:
    """Old code: the NaN entry sat at the heap's top and run_until stopped there for good."""
    network = VirtualNetwork(random.Random(1))
    seen: list[float] = []
    with pytest.raises(ValueError, match="NaN"):
        network.schedule(math.nan, seen.append)
    network.schedule(1.0, seen.append)
    network.run_for(2.0)
    assert seen == [1.0]


def test_a_core_asking_for_a_tick_at_nan_is_a_local_error_not_silence() -> None:
    network = VirtualNetwork(random.Random(1))
    with pytest.raises(LocalProtocolError, match="NaN"):
        network.add("a", _RecordingCore(deadline=math.nan))


@pytest.mark.parametrize(
    "settings",
    [
        {"latency": (-1.0, -1.0)},
        {"latency": (0.5, 0.1)},
        {"latency": (0.0, math.inf)},
        {"latency": (math.nan, 1.0)},
        {"loss": -0.1},
        {"loss": 1.5},
        {"loss": math.nan},
    ],
)
def test_network_refuses_latency_and_loss_out_of_range(settings) -> None:
    """Old code: a negative delay turned the clock back; NaN loss silently meant none."""
    with pytest.raises(ValueError):
        VirtualNetwork(random.Random(1), **settings)
    network = VirtualNetwork(random.Random(1))
    ((name, value),) = settings.items()
    with pytest.raises(ValueError):
        setattr(network, name, value)


# --- meshinfer-sim -------------------------------------------------------------------------------


def test_minus_zero_loss_and_latency_are_reported_as_zero(capsys) -> None:
    """Old code: the table said "loss -0.0%, latency -0-0 ms" and the JSON -0.0."""
    tiny = ["membership", "--nodes", "2", "--joins", "0", "--crash", "0", "--duration", "0.5"]
    args = [*tiny, "--loss", "-0", "--latency-ms=-0,-0"]
    assert main(args) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "loss 0.0%, latency 0-0 ms" in header
    assert main([*args, "--json"]) == 0
    scenario = json.loads(capsys.readouterr().out)["scenario"]
    assert math.copysign(1, scenario["loss"]) == 1
    assert all(math.copysign(1, value) == 1 for value in scenario["latency_ms"])
