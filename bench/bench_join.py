"""Time from a node starting to its first encrypted session with an already-running peer.

Real loopback: real mDNS (zeroconf on 127.0.0.1), real TCP, real Noise IK/XX handshakes and
certificate checks. For each trial a fresh node (a new identity) starts next to a running one;
the clock runs from ``MeshNode.start()`` to the first session with that peer opening on the new
node, whichever side dialled. Baseline in the same run: the same with zeroconf's default
registration (conflict probing, ~1.2 s) instead of meshinfer's fast path. Goal: median < 100 ms.

    python bench/bench_join.py [--trials 20]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.proto.membership import MembershipConfig
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.fleet import make_fleet


async def one_trial(fleet, anchor: MeshNode, name: str, mdns: MdnsConfig) -> float:
    ident = fleet.enroll(name)
    opts = MeshNodeOptions(mdns=mdns, membership=MembershipConfig.lan())
    node = MeshNode(ident, fleet.revocations, opts)
    loop = asyncio.get_running_loop()
    first: asyncio.Future[float] = loop.create_future()

    def on_session(peer: str, _session) -> None:
        if peer == anchor.node_id and not first.done():
            first.set_result(loop.time())

    node.peers.on_session(on_session)
    started = loop.time()
    try:
        await node.start()
        async with asyncio.timeout(10):
            return await first - started
    finally:
        await node.aclose()


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of sorted samples: p90 of 10 is the 9th."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def run(trials: int) -> None:
    fleet = make_fleet(None, ["anchor"], fleet_id="bench-join")
    modes = (
        ("fast (meshinfer)", MdnsConfig.loopback()),
        ("zeroconf default", MdnsConfig.zeroconf_default(("127.0.0.1",))),
    )
    results = {}
    for label, mdns in modes:
        opts = MeshNodeOptions(mdns=mdns, membership=MembershipConfig.lan())
        anchor = MeshNode(fleet.identities["anchor"], fleet.revocations, opts)
        await anchor.start()
        samples = []
        try:
            for i in range(trials):
                tag = "f" if label.startswith("fast") else "d"
                samples.append(await one_trial(fleet, anchor, f"new-{tag}{i}", mdns))
        finally:
            await anchor.aclose()
        results[label] = sorted(samples)
    print(f"{'mode':<20}{'median ms':>12}{'p90 ms':>10}{'max ms':>10}  (trials={trials})")
    for label, s in results.items():
        p90 = percentile(s, 0.9)
        print(
            f"{label:<20}{statistics.median(s) * 1e3:>12.1f}{p90 * 1e3:>10.1f}{s[-1] * 1e3:>10.1f}"
        )
    fast, slow = (statistics.median(v) for v in results.values())
    print(f"ratio default/fast (median): {slow / fast:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    trials = ap.parse_args().trials
    if trials < 1:
        ap.error("--trials must be at least 1")
    asyncio.run(run(trials))


if __name__ == "__main__":
    main()
