"""The transport conformance suite against TCP (default loop and uvloop) and the in-memory
transport (default loop and a virtual-time loop)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import uvloop

from meshinfer.testing import transport_conformance as conformance
from meshinfer.testing.transport_conformance import TransportSetup
from meshinfer.testing.virtual_clock import VirtualClockLoop
from meshinfer.transport.base import Address, LinkKind
from meshinfer.transport.memory import MemoryNetwork, MemoryTransport
from meshinfer.transport.tcp import TcpTransport


@asynccontextmanager
async def tcp_setup() -> AsyncIterator[TransportSetup]:
    yield TransportSetup(TcpTransport(LinkKind.WAN), Address("127.0.0.1", 0))


@asynccontextmanager
async def memory_setup() -> AsyncIterator[TransportSetup]:
    network = MemoryNetwork()
    server = MemoryTransport(network, LinkKind.V2I, host="rsu-1")
    client = MemoryTransport(network, LinkKind.V2V, host="car-1")
    yield TransportSetup(server, Address("rsu-1", 0), dialer=client)
    assert network.stream_count == 0, "a stream was left open"


@asynccontextmanager
async def memory_with_latency_setup() -> AsyncIterator[TransportSetup]:
    network = MemoryNetwork(latency=0.02, buffer_limit=256 * 1024)
    transport = MemoryTransport(network, host="car-2")
    yield TransportSetup(transport, Address("car-2", 0))
    assert network.stream_count == 0, "a stream was left open"


LoopFactory = Callable[[], asyncio.AbstractEventLoop] | None
VARIANTS: dict[str, tuple[conformance.TransportFactory, LoopFactory]] = {
    "tcp-asyncio": (tcp_setup, None),
    "tcp-uvloop": (tcp_setup, uvloop.new_event_loop),
    "memory-asyncio": (memory_setup, None),
    "memory-virtual-clock": (memory_setup, VirtualClockLoop),
    "memory-latency-virtual-clock": (memory_with_latency_setup, VirtualClockLoop),
}


@pytest.mark.parametrize("check", conformance.ALL_CHECKS, ids=lambda c: c.__name__[6:])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conformance(variant: str, check: conformance.Check) -> None:
    factory, loop_factory = VARIANTS[variant]
    conformance.run_check(check, factory, loop_factory=loop_factory)


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("variant", ["tcp-asyncio", "memory-virtual-clock"])
def test_ordered_and_complete_other_seeds(variant: str, seed: int) -> None:
    factory, loop_factory = VARIANTS[variant]

    async def check(f: conformance.TransportFactory) -> None:
        await conformance.check_ordered_and_complete(f, seed=seed, total=512 * 1024)

    conformance.run_check(check, factory, loop_factory=loop_factory)


def test_suite_catches_a_transport_that_buffers_without_bound() -> None:
    """The backpressure check fails against a memory network with an effectively unbounded
    buffer: the suite can tell a broken transport from a good one."""

    @asynccontextmanager
    async def unbounded() -> AsyncIterator[TransportSetup]:
        network = MemoryNetwork(buffer_limit=1 << 40)
        yield TransportSetup(MemoryTransport(network, host="a"), Address("a", 0))

    with pytest.raises(AssertionError, match="buffered for a peer that never reads"):
        conformance.run_check(conformance.check_backpressure, unbounded)


def test_run_all_on_the_running_loop() -> None:
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        runner.run(conformance.run_all(memory_setup))
