"""In-memory transport specifics: exact backpressure, latency on a virtual clock, severed links,
addressing; plus the virtual-clock test loop itself. The shared contract is in
``tests/test_transport_conformance.py``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.errors import StreamClosed, TransportError
from meshinfer.testing.transport_conformance import echo, read_exactly, settle
from meshinfer.testing.virtual_clock import VirtualClockDeadlock, VirtualClockLoop
from meshinfer.transport.base import Address, LinkKind, Stream
from meshinfer.transport.memory import MemoryListener, MemoryNetwork, MemoryTransport


def on_virtual_clock(scenario: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(scenario)


async def accepted_pair(
    network: MemoryNetwork, server_host: str = "rsu", client_host: str = "car"
) -> tuple[MemoryListener, Stream, Stream]:
    queue: asyncio.Queue[Stream] = asyncio.Queue()
    listener = await MemoryTransport(network, host=server_host).listen(
        Address(server_host, 0), queue.put
    )
    client = await MemoryTransport(network, host=client_host).dial(listener.address)
    return listener, client, await queue.get()


# --- backpressure ----------------------------------------------------------------------------


async def test_writer_waits_exactly_when_the_peer_buffer_is_full() -> None:
    network = MemoryNetwork(buffer_limit=1000)
    listener, client, server = await accepted_pair(network)
    await client.write(bytes(1000))  # fits exactly: does not wait
    blocked = asyncio.create_task(client.write(b"y" * 10))
    await settle(blocked)
    assert await server.read(1) == b"\0"
    await asyncio.wait_for(blocked, 1)
    assert await read_exactly(server, 999) == bytes(999)
    assert await read_exactly(server, 10) == b"y" * 10
    for stream in (client, server):
        await stream.aclose()
    await listener.aclose()


async def test_a_large_write_is_delivered_in_order_through_a_small_buffer() -> None:
    network = MemoryNetwork(buffer_limit=100)
    listener, client, server = await accepted_pair(network)
    payload = bytes(range(256)) * 40
    writer = asyncio.create_task(client.write(payload))
    assert await read_exactly(server, len(payload), max_bytes=77) == payload
    await writer
    for stream in (client, server):
        await stream.aclose()
    await listener.aclose()


async def test_written_bytearray_is_copied() -> None:
    listener, client, server = await accepted_pair(MemoryNetwork())
    data = bytearray(b"abc")
    await client.write(data)
    data[:] = b"xyz"
    assert await server.read() == b"abc"
    for stream in (client, server):
        await stream.aclose()
    await listener.aclose()


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=0, max_size=3000), max_size=25),
    read_sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=10),
    limit=st.integers(1, 4096),
    latency=st.sampled_from([0.0, 0.001, 0.5]),
)
def test_any_writes_arrive_intact_through_any_reads(
    pieces: list[bytes], read_sizes: list[int], limit: int, latency: float
) -> None:
    async def scenario() -> bytes:
        network = MemoryNetwork(buffer_limit=limit, latency=latency)
        listener, client, server = await accepted_pair(network)

        async def send() -> None:
            for piece in pieces:
                await client.write(piece)
            await client.aclose()

        async def receive() -> bytes:
            out = bytearray()
            for i in range(10**6):
                data = await server.read(read_sizes[i % len(read_sizes)])
                if not data:
                    return bytes(out)
                assert len(data) <= read_sizes[i % len(read_sizes)]
                out += data
            raise AssertionError("no EOF")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(send())
            received = tg.create_task(receive())
        await server.aclose()
        await listener.aclose()
        assert network.stream_count == 0
        return received.result()

    assert on_virtual_clock(scenario()) == b"".join(pieces)


# --- latency on the virtual clock ------------------------------------------------------------


def test_latency_delays_dial_data_and_eof_by_exact_virtual_time() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        network = MemoryNetwork(latency=10.0)
        transport = MemoryTransport(network, host="car")
        listener = await transport.listen(Address("rsu", 7000), echo)
        start = loop.time()
        stream = await transport.dial(Address("rsu", 7000))
        assert loop.time() - start == 20.0  # a dial takes one round trip
        start = loop.time()
        await stream.write(b"ping")
        assert await stream.read() == b"ping"
        assert loop.time() - start == 20.0  # there and back
        network.latency = 1.0
        start = loop.time()
        await stream.write(b"again")
        assert await stream.read() == b"again"
        assert loop.time() - start == 2.0
        await stream.aclose()
        await listener.aclose(cancel_handlers=True)

    on_virtual_clock(scenario())


def test_eof_arrives_one_latency_after_close_and_after_the_data() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        network = MemoryNetwork(latency=3.0)
        listener, client, server = await accepted_pair(network)
        await client.write(b"last words")
        await client.aclose()
        closed_at = loop.time()
        assert await server.read() == b"last words"
        assert await server.read() == b""
        assert loop.time() - closed_at == 3.0
        await server.aclose()
        await listener.aclose()

    on_virtual_clock(scenario())


def test_dial_timeout_shorter_than_the_round_trip_raises() -> None:
    async def scenario() -> float:
        network = MemoryNetwork(latency=5.0)
        transport = MemoryTransport(network)
        listener = await transport.listen(Address("rsu", 0), echo)
        start = asyncio.get_running_loop().time()
        with pytest.raises(TransportError, match="timed out"):
            await transport.dial(listener.address, timeout=1.5)
        await listener.aclose()
        return asyncio.get_running_loop().time() - start

    assert on_virtual_clock(scenario()) == 1.5


# --- severed links ---------------------------------------------------------------------------


async def test_sever_breaks_every_stream_of_a_host_and_only_those() -> None:
    network = MemoryNetwork()
    accepted: asyncio.Queue[Stream] = asyncio.Queue()
    listener = await MemoryTransport(network, host="rsu").listen(Address("rsu", 0), accepted.put)
    car_client = await MemoryTransport(network, host="car-1").dial(listener.address)
    other_client = await MemoryTransport(network, host="car-2").dial(listener.address)
    car_server, other_server = await accepted.get(), await accepted.get()
    pending = asyncio.create_task(car_client.read())
    await settle(pending)
    await car_client.write(b"in flight")  # buffered at the server, lost with the link

    assert network.sever("car-1") == 2
    assert await asyncio.wait_for(pending, 1) == b""
    assert await car_server.read() == b""
    for stream in (car_client, car_server):
        with pytest.raises(StreamClosed):
            await stream.write(b"x")

    await other_client.write(b"fine")  # car-2's link is untouched
    assert await other_server.read() == b"fine"
    reconnect = await MemoryTransport(network, host="car-1").dial(listener.address)
    await (await accepted.get()).aclose()
    for stream in (car_client, car_server, other_client, other_server, reconnect):
        await stream.aclose()
    await listener.aclose()
    assert network.stream_count == 0


async def test_sever_wakes_a_writer_blocked_on_backpressure() -> None:
    network = MemoryNetwork(buffer_limit=10)
    listener, client, server = await accepted_pair(network)
    blocked = asyncio.create_task(client.write(bytes(100)))
    await settle(blocked)
    network.sever("rsu")
    with pytest.raises(StreamClosed):
        await asyncio.wait_for(blocked, 1)
    for stream in (client, server):
        await stream.aclose()
    await listener.aclose()


# --- addressing and listeners ----------------------------------------------------------------


async def test_port_zero_assigns_distinct_free_ports_and_taken_addresses_are_refused() -> None:
    network = MemoryNetwork()
    transport = MemoryTransport(network, LinkKind.V2I, host="rsu")
    first = await transport.listen(Address("rsu", 0), echo)
    second = await transport.listen(Address("rsu", 0), echo)
    assert first.address.port != second.address.port
    assert 0 not in (first.address.port, second.address.port)
    with pytest.raises(TransportError, match="in use"):
        await transport.listen(first.address, echo)
    with pytest.raises(TransportError, match="host name"):
        await transport.listen(Address("", 0), echo)
    await first.aclose()
    again = await transport.listen(first.address, echo)  # free once closed
    for listener in (second, again):
        await listener.aclose()


async def test_dial_to_nothing_is_refused_with_the_address_named() -> None:
    with pytest.raises(TransportError, match="nowhere:9: connection refused"):
        await MemoryTransport(MemoryNetwork()).dial(Address("nowhere", 9))


async def test_unnamed_transports_get_distinct_host_names() -> None:
    network = MemoryNetwork()
    assert MemoryTransport(network).host != MemoryTransport(network).host


async def test_handler_failure_is_logged_and_cancel_handlers_closes_streams(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parked = asyncio.Event()

    async def handler(stream: Stream) -> None:
        if await stream.read(4) == b"fail":
            raise RuntimeError("deliberate handler failure")
        parked.set()
        await asyncio.Event().wait()

    network = MemoryNetwork()
    transport = MemoryTransport(network)
    listener = await transport.listen(Address("rsu", 0), handler)
    failing = await transport.dial(listener.address)
    with caplog.at_level(logging.ERROR, logger="meshinfer.transport"):
        await failing.write(b"fail")
        assert await asyncio.wait_for(failing.read(), 1) == b""
    assert "deliberate handler failure" in caplog.text
    parked_stream = await transport.dial(listener.address)
    await parked_stream.write(b"wait")
    await parked.wait()
    await listener.aclose(cancel_handlers=True)
    assert listener.handler_count == 0
    assert await parked_stream.read() == b""
    for stream in (failing, parked_stream):
        await stream.aclose()
    assert network.stream_count == 0


def test_invalid_network_settings_are_rejected() -> None:
    with pytest.raises(ValueError):
        MemoryNetwork(latency=-1)
    with pytest.raises(ValueError):
        MemoryNetwork(buffer_limit=0)


# --- the virtual clock loop ------------------------------------------------------------------


def test_virtual_clock_jumps_to_timers_without_waiting() -> None:
    async def scenario() -> tuple[float, list[str]]:
        order: list[str] = []

        async def after(delay: float, name: str) -> None:
            await asyncio.sleep(delay)
            order.append(name)

        await asyncio.gather(after(3600, "hour"), after(60, "minute"), after(86400, "day"))
        return asyncio.get_running_loop().time(), order

    now, order = on_virtual_clock(scenario())
    assert order == ["minute", "hour", "day"]
    assert now == pytest.approx(86400)


def test_virtual_clock_reports_a_deadlock() -> None:
    async def wait_for_each_other() -> None:
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=lambda: VirtualClockLoop(deadlock_after=0.05)) as runner:
        with pytest.raises(VirtualClockDeadlock):
            runner.run(wait_for_each_other())
        stuck = asyncio.all_tasks(runner.get_loop())
        assert [task.get_coro().__qualname__ for task in stuck] == [
            "test_virtual_clock_reports_a_deadlock.<locals>.wait_for_each_other"
        ]
        for task in stuck:  # end the deadlocked task rather than leave it to the loop's close
            task.cancel()
        runner.run(asyncio.wait(stuck))
