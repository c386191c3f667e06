"""Raw transport throughput and round-trip time versus bare asyncio streams, on loopback TCP.

In one run, per event loop:

(a) baseline: ``asyncio.open_connection`` / ``start_server`` streams, ``writer.write`` +
    ``await writer.drain()`` per message, the receiver calling ``reader.read(262144)``;
(b) meshinfer ``TcpTransport`` streams, ``await stream.write`` per message and
    ``await stream.read(262144)`` (what the session layer does);
(c) for reference, the in-memory transport (no sockets at all).

Prints one-way messages/s and MB/s at 1 KiB and 64 KiB, 1 KiB round-trip p50, and the ratio
(b)/(a). Usage::

    python bench/bench_transport.py [--seconds 1] [--loop uvloop|asyncio|both]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshinfer.transport.base import Address
from meshinfer.transport.memory import MemoryNetwork, MemoryTransport
from meshinfer.transport.tcp import TcpTransport

READ = 262144


class AsyncioStreamPair:
    """(a): a bare asyncio streams connection, adapted to read/write/aclose."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self, n: int) -> bytes:
        return await self.reader.read(n)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def aclose(self) -> None:
        self.writer.close()


async def asyncio_pair():
    got: asyncio.Queue = asyncio.Queue()

    async def on_conn(r, w):
        await got.put(AsyncioStreamPair(r, w))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = AsyncioStreamPair(*await asyncio.open_connection("127.0.0.1", port))
    return server.close, client, await got.get()


async def transport_pair(transport, address):
    got: asyncio.Queue = asyncio.Queue()
    listener = await transport.listen(address, got.put)
    client = await transport.dial(listener.address)
    return listener.aclose, client, await got.get()


async def make_pair(kind: str):
    if kind == "asyncio":
        return await asyncio_pair()
    if kind == "tcp":
        return await transport_pair(TcpTransport(), Address("127.0.0.1", 0))
    return await transport_pair(MemoryTransport(MemoryNetwork()), Address("bench", 0))


async def oneway(kind: str, size: int, seconds: float) -> tuple[float, float]:
    stop, client, server = await make_pair(kind)
    payload = b"x" * size
    count = max(200, int(seconds * (300_000 if size <= 2048 else 20_000)))
    total = count * size

    async def receiver():
        got = 0
        while got < total:
            got += len(await server.read(READ))
        await server.write(b"!")

    task = asyncio.create_task(receiver())
    t0 = time.perf_counter()
    for _ in range(count):
        await client.write(payload)
    await client.read(1)
    elapsed = time.perf_counter() - t0
    await task
    await client.aclose()
    await server.aclose()
    await _stop(stop)
    return count / elapsed, total / elapsed / 1e6


async def rtt(kind: str, size: int, rounds: int) -> float:
    stop, client, server = await make_pair(kind)
    payload = b"x" * size

    async def echo():
        for _ in range(rounds):
            got = 0
            while got < size:
                data = await server.read(READ)
                got += len(data)
            await server.write(payload)

    task = asyncio.create_task(echo())
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await client.write(payload)
        got = 0
        while got < size:
            got += len(await client.read(READ))
        samples.append(time.perf_counter() - t0)
    await task
    await client.aclose()
    await server.aclose()
    await _stop(stop)
    return statistics.median(samples) * 1e6


async def _stop(stop) -> None:
    result = stop()
    if asyncio.iscoroutine(result):
        await result


async def run(seconds: float) -> list[tuple[str, float, float, float]]:
    rows = []
    for size in (1024, 65536):
        figures = {k: await oneway(k, size, seconds) for k in ("asyncio", "tcp", "memory")}
        label = f"{size // 1024} KiB"
        rows.append((f"{label} msgs/s", *(figures[k][0] for k in ("asyncio", "tcp", "memory"))))
        rows.append((f"{label} MB/s", *(figures[k][1] for k in ("asyncio", "tcp", "memory"))))
    rounds = max(500, int(seconds * 5000))
    rows.append(
        ("1 KiB RTT p50 (us)", *[await rtt(k, 1024, rounds) for k in ("asyncio", "tcp", "memory")])
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--loop", choices=["uvloop", "asyncio", "both"], default="both")
    args = parser.parse_args()
    if not args.seconds > 0:
        parser.error("--seconds must be > 0")
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    for loop_name in loops:
        factory = None
        if loop_name == "uvloop":
            import uvloop

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            rows = runner.run(run(args.seconds))
        print(f"python {sys.version.split()[0]}, loop={loop_name}, seconds/case={args.seconds}")
        print(f"{'case':<22}{'asyncio':>12}{'tcp':>12}{'ratio':>8}{'memory':>12}")
        for name, base, tcp, mem in rows:
            print(f"{name:<22}{base:>12,.1f}{tcp:>12,.1f}{tcp / base:>8.2f}{mem:>12,.1f}")
        print()


if __name__ == "__main__":
    main()
