"""Encrypted session throughput and latency versus a bare msgpack + ChaCha20-Poly1305 loop.

In one run, on loopback TCP:

(a) the ceiling: the same messages msgpack-encoded and sealed with pynacl's IETF
    ChaCha20-Poly1305 behind a 4-byte length, through bare asyncio streams, no session logic;
(b) meshinfer: two enrolled nodes, a Noise XX session over ``TcpTransport``, ``AppData`` messages.

Prints one-way messages/s and MB/s at 1 KiB and 64 KiB, round-trip p50/p99 at 1 KiB, and the
ratios (b)/(a). Usage::

    python bench/bench_session.py [--seconds 2] [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import msgpack
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshinfer.proto.messages import AppData
from meshinfer.runtime.endpoint import SessionListener, dial
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpTransport

KEY = bytes(range(32))
_LEN = struct.Struct(">I")
_NONCE = struct.Struct("<4xQ")
#: Round trips made before the timed ones in each latency case, not recorded (first reads and
#: writes of a fresh connection, allocator and cache warm-up).
WARMUP_ROUNDS = 50


# --- (a) the ceiling -------------------------------------------------------------------------


class _Sealer:
    def __init__(self) -> None:
        self.n = 0

    def seal(self, obj: object) -> bytes:
        ct = crypto_aead_chacha20poly1305_ietf_encrypt(
            msgpack.packb(obj), b"", _NONCE.pack(self.n), KEY
        )
        self.n += 1
        return _LEN.pack(len(ct)) + ct

    def open(self, ct: bytes) -> object:
        pt = crypto_aead_chacha20poly1305_ietf_decrypt(ct, b"", _NONCE.pack(self.n), KEY)
        self.n += 1
        return msgpack.unpackb(pt)


async def _bare_read(reader: asyncio.StreamReader, opener: _Sealer) -> object:
    (n,) = _LEN.unpack(await reader.readexactly(4))
    return opener.open(await reader.readexactly(n))


async def bare_pair():
    got: asyncio.Queue = asyncio.Queue()

    async def on_conn(r, w):
        await got.put((r, w))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cr, cw = await asyncio.open_connection("127.0.0.1", port)
    sr, sw = await got.get()
    return server, (cr, cw), (sr, sw)


async def bare_oneway(size: int, seconds: float) -> tuple[float, float]:
    server, (cr, cw), (sr, sw) = await bare_pair()
    payload = b"x" * size
    count = max(200, int(seconds * (200_000 if size <= 2048 else 8_000)))

    async def receiver():
        opener = _Sealer()
        for _ in range(count):
            await _bare_read(sr, opener)
        sw.write(b"!")
        await sw.drain()

    task = asyncio.create_task(receiver())
    sealer = _Sealer()
    t0 = time.perf_counter()
    for _ in range(count):
        cw.write(sealer.seal([1, "bench", payload]))
        await cw.drain()
    await cr.readexactly(1)
    elapsed = time.perf_counter() - t0
    await task
    cw.close()
    sw.close()
    server.close()
    return count / elapsed, count * size / elapsed / 1e6


async def bare_rtt(size: int, rounds: int) -> list[float]:
    server, (cr, cw), (sr, sw) = await bare_pair()
    payload = b"x" * size

    async def echo():
        opener, sealer = _Sealer(), _Sealer()
        for _ in range(WARMUP_ROUNDS + rounds):
            msg = await _bare_read(sr, opener)
            sw.write(sealer.seal(msg))
            await sw.drain()

    task = asyncio.create_task(echo())
    sealer, opener = _Sealer(), _Sealer()
    samples = []
    for _ in range(WARMUP_ROUNDS + rounds):
        t0 = time.perf_counter()
        cw.write(sealer.seal([1, "bench", payload]))
        await cw.drain()
        await _bare_read(cr, opener)
        samples.append(time.perf_counter() - t0)
    await task
    cw.close()
    sw.close()
    server.close()
    return samples[WARMUP_ROUNDS:]


# --- (b) meshinfer sessions -------------------------------------------------------------------


async def mesh_pair(tmp: Path):
    fleet = make_fleet(tmp, ["alpha", "bravo"])
    accepted: asyncio.Queue = asyncio.Queue()
    done = asyncio.Event()

    async def handler(session):
        await accepted.put(session)
        await done.wait()

    transport = TcpTransport()
    listener = SessionListener(transport, fleet.admission("bravo"), handler)
    addr = await listener.start(Address("127.0.0.1", 0))
    client = await dial(transport, addr, fleet.admission("alpha"))
    server_side = await accepted.get()
    return listener, client, server_side, done


async def mesh_oneway(size: int, seconds: float, tmp: Path) -> tuple[float, float]:
    listener, client, server, done = await mesh_pair(tmp)
    payload = b"x" * size
    count = max(200, int(seconds * (200_000 if size <= 2048 else 8_000)))

    async def receiver():
        for _ in range(count):
            await server.recv()
        await server.send(AppData(topic="ack", payload=b""))

    task = asyncio.create_task(receiver())
    msg = AppData(topic="bench", payload=payload)
    t0 = time.perf_counter()
    for _ in range(count):
        await client.send(msg)
    await client.recv()
    elapsed = time.perf_counter() - t0
    await task
    done.set()
    await client.aclose()
    await listener.aclose()
    return count / elapsed, count * size / elapsed / 1e6


async def mesh_rtt(size: int, rounds: int, tmp: Path) -> list[float]:
    listener, client, server, done = await mesh_pair(tmp)
    payload = b"x" * size

    async def echo():
        for _ in range(WARMUP_ROUNDS + rounds):
            await server.send(await server.recv())

    task = asyncio.create_task(echo())
    msg = AppData(topic="bench", payload=payload)
    samples = []
    for _ in range(WARMUP_ROUNDS + rounds):
        t0 = time.perf_counter()
        await client.send(msg)
        await client.recv()
        samples.append(time.perf_counter() - t0)
    await task
    done.set()
    await client.aclose()
    await listener.aclose()
    return samples[WARMUP_ROUNDS:]


def row(label: str, ceiling: float, mesh: float, fmt: str) -> None:
    print(f"{label:<22}{ceiling:>16{fmt}}{mesh:>16{fmt}}{mesh / ceiling:>8.2f}")


def pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1): the smallest sample with at least ``q`` of them
    at or below it (of fewer than 100 samples, p99 is the largest)."""
    s = sorted(samples)
    return s[max(0, math.ceil(q * len(s)) - 1)]


async def main_async(args) -> None:
    print(f"python {sys.version.split()[0]}, loop={args.loop}, seconds/case={args.seconds}")
    print(f"{'case':<22}{'ceiling':>16}{'meshinfer':>16}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmpdir:
        for i, size in enumerate((1024, 65536)):
            tmp = Path(tmpdir) / f"f{i}"
            bare = await bare_oneway(size, args.seconds)
            mesh = await mesh_oneway(size, args.seconds, tmp)
            label = f"{size // 1024} KiB"
            row(label + " msgs/s", bare[0], mesh[0], ",.0f")
            row(label + " MB/s", bare[1], mesh[1], ",.1f")
        rounds = args.rounds
        bare_s = await bare_rtt(1024, rounds)
        mesh_s = await mesh_rtt(1024, rounds, Path(tmpdir) / "rtt")
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            b, m = pct(bare_s, q) * 1e6, pct(mesh_s, q) * 1e6
            row(f"1 KiB RTT {name} (us)", b, m, ",.1f")
        mean_us = statistics.mean(bare_s) * 1e6
        print(
            f"(RTT over {rounds} round trips each after {WARMUP_ROUNDS} not timed; "
            f"mean ceiling {mean_us:.1f} us)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="approximate seconds per case")
    ap.add_argument("--rounds", type=int, default=5000, help="round trips for the latency case")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = ap.parse_args()
    if args.seconds <= 0 or args.rounds < 1:
        ap.error("--seconds must be > 0 and --rounds at least 1")
    if args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main_async(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
