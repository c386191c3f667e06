"""How fast a new node and an already-running peer find each other by mDNS, on 127.0.0.1.

For each mode, one peer P keeps running; each trial starts a new node N (zeroconf sockets,
browser, registration: ``MdnsDiscovery.start``) and measures, from the moment N's start began:

* forward: until P reports N found;
* reverse: until N reports P found.

Then N closes (goodbye) and P must report it lost before the next trial. Modes, same run:

* ``zeroconf-default``: zeroconf's default registration (probing), no reciprocal announcement;
* ``fast-register``: no probing (``cooperating_responders=True``), no reciprocal announcement;
* ``fast``: no probing and reciprocal announcement (the meshinfer default, ``MdnsConfig.lan()``).

All use 1 s between reciprocal announcements (RFC 6762 section 14), so trials are spaced 1.1 s.
Prints median and p90 per direction and mode, and the default/fast ratio of medians.

    python bench/bench_discovery.py [--trials 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import uuid
from dataclasses import replace

from meshinfer.discovery.base import DiscoveryEvent, PeerAdvert
from meshinfer.discovery.mdns import MdnsConfig, MdnsDiscovery

LOOPBACK = ("127.0.0.1",)
MODES = {
    "zeroconf-default": MdnsConfig.zeroconf_default(interfaces=LOOPBACK),
    "fast-register": replace(MdnsConfig.lan(), interfaces=LOOPBACK, reciprocal_announce=False),
    "fast": replace(MdnsConfig.lan(), interfaces=LOOPBACK),
}
SPACING = 1.1  # > reannounce_interval, so every trial may use a reciprocal announcement


class Waiter:
    """A sink that resolves a future per (kind, node id) awaited."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, str], asyncio.Future[DiscoveryEvent]] = {}

    def expect(self, kind: str, node_id: str) -> asyncio.Future[DiscoveryEvent]:
        future = asyncio.get_running_loop().create_future()
        self.pending[(kind, node_id)] = future
        return future

    def __call__(self, event: DiscoveryEvent) -> None:
        future = self.pending.pop((event.kind, event.node_id), None)
        if future is not None and not future.done():
            future.set_result(event)


def advert(node_id: str, fleet: str) -> PeerAdvert:
    return PeerAdvert(node_id, fleet, os.urandom(32), ("vehicle",), 1, (), 7000)


async def trial(config: MdnsConfig, fleet: str, peer_sink: Waiter, index: int) -> tuple[float, ...]:
    node_id = f"new-{index}-{uuid.uuid4().hex[:6]}"
    new_sink = Waiter()
    forward = peer_sink.expect("found", node_id)
    reverse = new_sink.expect("found", "peer")
    node = MdnsDiscovery(advert(node_id, fleet), new_sink, config)
    try:
        await node.start()
        async with asyncio.timeout(10):
            found_new, found_peer = await forward, await reverse
    finally:
        lost = peer_sink.expect("lost", node_id)
        await node.aclose()
    async with asyncio.timeout(5):
        await lost
    assert node.started_at is not None
    return found_new.at - node.started_at, found_peer.at - node.started_at


async def run_mode(name: str, config: MdnsConfig, trials: int) -> dict[str, list[float]]:
    fleet = f"bench-{uuid.uuid4().hex[:8]}"
    peer_sink = Waiter()
    results: dict[str, list[float]] = {"forward": [], "reverse": []}
    async with MdnsDiscovery(advert("peer", fleet), peer_sink, config):
        await asyncio.sleep(SPACING)
        for index in range(trials):
            started = asyncio.get_running_loop().time()
            forward, reverse = await trial(config, fleet, peer_sink, index)
            results["forward"].append(forward)
            results["reverse"].append(reverse)
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, SPACING - elapsed))
    return results


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return statistics.median(ordered), p90


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    medians: dict[tuple[str, str], float] = {}
    print(f"mDNS discovery on 127.0.0.1, {args.trials} trials per mode (times in ms)")
    print(f"{'mode':<18} {'direction':<9} {'median':>9} {'p90':>9} {'max':>9}")
    for name, config in MODES.items():
        results = await run_mode(name, config, args.trials)
        for direction, samples in results.items():
            median, p90 = summary(samples)
            medians[(name, direction)] = median
            row = f"{median * 1e3:9.1f} {p90 * 1e3:9.1f} {max(samples) * 1e3:9.1f}"
            print(f"{name:<18} {direction:<9} {row}")
    for direction in ("forward", "reverse"):
        ratio = medians[("zeroconf-default", direction)] / medians[("fast", direction)]
        print(f"ratio zeroconf-default/fast, {direction} median: {ratio:.0f}x")


if __name__ == "__main__":
    asyncio.run(main())
