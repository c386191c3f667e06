"""Placement cost per dispatched item as the fleet grows: the members' views read once per
dispatch burst against once per item.

The coordinator's dispatch loop places each ready item by its policy over views of the live,
reachable members (:meth:`coordinator.service_dispatch.Dispatch._views`). Reading a member's view
(its gossiped state, contact estimate, RTT, revocation check) costs microseconds; the loop now
reads them once for the items queued together (``_burst_views``) and adds only its own
in-flight counts per item. This bench runs the real ``Dispatch`` methods over ``N`` members
(stand-in membership, reachability and certificate objects that answer at once: no mesh, so
only the placement code is timed, and the real lookups would only add to the per-item read)
and prints, per ``N``, the microseconds per item of ``Dispatch._choose`` (and ``_assign``, as a
send does) with the views read per item (the path outside a burst), read once per burst (that
read timed too) with ``_views()`` + ``choose`` per item (the baseline), and as the dispatch loop
now places a burst (``_read_burst``: that read, then a ``BurstPlacer`` from the burst's second
item on, its build timed too), and the baseline's ratio to each. CPU time of this process, best
of five. Usage::

    python bench/bench_placement.py [--members 1 16 128 1024] [--burst 64] [--policy least_loaded]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from coordinator.service_dispatch import Dispatch
from meshinfer.inference.base import ModelRef
from meshinfer.proto.membership_table import MemberStatus
from meshinfer.proto.membership_wire import ModelInfo, NodeState
from meshinfer.proto.scheduling import Policy, SchedulerState
from meshinfer.proto.tasks import Pattern, TaskSpec, plan
from meshinfer.proto.tasks_wire import Tensor

MODEL = ModelRef("m", "1")
_ROW = np.zeros((1, 4), np.float32)


class _Placer(Dispatch):
    """The dispatch mixin over ``n`` stand-in members (the state it reads, nothing else)."""

    def __init__(self, n: int) -> None:
        rng, arrived = random.Random(n), time.monotonic()
        members = [
            SimpleNamespace(
                node_id=f"node-{i:05d}",
                status=MemberStatus.ALIVE,
                state=NodeState(
                    host="127.0.0.1",
                    port=7000 + i,
                    roles=("worker",),
                    models=(ModelInfo(MODEL.model_id, MODEL.version),),
                    queue_depth=rng.randrange(4),
                    links=("v2v", "v2i"),
                    position=(rng.uniform(0, 5000), rng.uniform(0, 5000)),
                    velocity=(rng.uniform(-20, 20), rng.uniform(-20, 20)),
                ),
                position_at=arrived,  # (membership's record of when the state came)
            )
            for i in range(n)
        ]
        core = SimpleNamespace(live_members=lambda: members, rtt=lambda node_id: 0.002)
        self.mesh = SimpleNamespace(membership=SimpleNamespace(core=core))
        self._reach = SimpleNamespace(reachable=lambda member: True)
        self._certificates = SimpleNamespace(revoked=lambda node_id: False)
        self._loop = SimpleNamespace(time=time.monotonic)
        self.config = SimpleNamespace(
            node_capacity=4, radio_range_m=300.0, max_in_flight_per_node=32
        )
        self._busy: Counter[str] = Counter()
        self._sets_of = {}
        self._burst_views = self._burst_placer = None


def _per_item_us(placer: _Placer, burst: int, policy: str, how: str) -> float:
    """CPU microseconds per item to place a burst of ``burst`` items (best of five), the views
    read per ``item``, once per ``burst``, or as the dispatch loop does (``placer``)."""
    item = plan(TaskSpec("t", Pattern.SINGLE, Tensor.from_array(_ROW), (MODEL,)))[0]
    run = SimpleNamespace(spec=SimpleNamespace(policy=policy))
    rng, state = random.Random(0), SchedulerState()
    placer.rng, placer.scheduler = rng, state
    best = float("inf")
    placer._view_bases()  # what is kept of each member's gossip, as a running coordinator has it
    for _ in range(5):
        placer._busy.clear()
        placer._burst_views = placer._burst_placer = None
        entries = [SimpleNamespace(item=item, tried=set(), last=None, node=None)
                   for _ in range(burst)]  # fmt: skip
        start = time.process_time()
        if how == "burst":  # the one read of the burst is timed with it
            placer._burst_views = placer._view_bases()
        for entry in entries:
            if how == "placer":
                placer._read_burst()
            placer._assign(entry, placer._choose(run, entry))  # as a send does
        best = min(best, time.process_time() - start)
    placer._burst_views = placer._burst_placer = None
    return best / burst * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--members", type=int, nargs="+", default=[1, 16, 128, 1024])
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--policy", default="least_loaded", choices=[p.value for p in Policy])
    args = parser.parse_args()
    if min(args.members) < 1 or args.burst < 1:
        parser.error("--members values and --burst must be at least 1")
    print(f"placement per item, burst of {args.burst}, policy {args.policy} (CPU us, best of 5)")
    print(
        f"{'members':>8} {'read per item':>14} {'read per burst':>15} {'ratio':>7}"
        f" {'burst placer':>13} {'ratio':>7}"
    )
    for n in args.members:
        placer = _Placer(n)
        per_item = _per_item_us(placer, args.burst, args.policy, "item")
        per_burst = _per_item_us(placer, args.burst, args.policy, "burst")
        placed = _per_item_us(placer, args.burst, args.policy, "placer")
        print(
            f"{n:>8} {per_item:>14.1f} {per_burst:>15.1f} {per_item / per_burst:>6.2f}x"
            f" {placed:>13.1f} {per_burst / placed:>6.2f}x"
        )


if __name__ == "__main__":
    main()
