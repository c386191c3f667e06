"""Many membership cores on the virtual-time network: convergence, detection, loss, churn."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshinfer.proto.membership import MemberEventKind, MembershipConfig, MemberStatus
from meshinfer.proto.membership_auth import Ed25519RecordAuthenticator
from meshinfer.proto.membership_wire import AliveRecord, Gossip, encode_packet, encode_record
from meshinfer.testing.virtual_network import MembershipCluster, VirtualNetwork

CONFIG = MembershipConfig.test()


def joined_cluster(n: int, *, seed: int = 1, loss: float = 0.0) -> MembershipCluster:
    cluster = MembershipCluster(CONFIG, seed=seed, loss=loss)
    cluster.join_all(n)
    assert cluster.run_until(cluster.converged, timeout=30)
    return cluster


def events(cluster: MembershipCluster, kind: str, subject: str, since: float = 0.0):
    return [e for e in cluster.log if e.kind == kind and e.subject == subject and e.at >= since]


def status_everywhere(cluster: MembershipCluster, subject: str) -> set[MemberStatus | None]:
    return {
        (cluster.membership(o).member(subject) or _Missing).status
        for o in cluster.up()
        if o != subject
    }


class _Missing:
    status = None


def test_fifty_nodes_converge_after_joining_through_one_seed() -> None:
    cluster = MembershipCluster(CONFIG, seed=3)
    ids = cluster.join_all(50)
    assert cluster.run_until(cluster.converged, timeout=30)
    assert cluster.now < 30
    view = cluster.view(ids[17])
    assert sorted(view) == sorted(ids) and {s for s, _, _ in view.values()} == {MemberStatus.ALIVE}
    address = cluster.membership(ids[3]).address_of(ids[40])
    assert address is not None and address[0] == cluster.membership(ids[40]).local_state.host


def test_crashed_nodes_are_declared_dead_by_all_within_the_lifeguard_bound() -> None:
    cluster = joined_cluster(50)
    victims = ["n0007", "n0031"]
    crash_at = cluster.now
    for victim in victims:
        cluster.crash(victim)
    n = 50
    bound = 2 * CONFIG.probe_interval + CONFIG.suspicion_max_timeout(n) + 2.0
    assert cluster.run_until(
        lambda: all(status_everywhere(cluster, v) == {MemberStatus.DEAD} for v in victims),
        timeout=bound,
    ), f"not every node declared the crash within {bound:.1f}s"
    for victim in victims:
        first = min(e.at for e in events(cluster, "dead", victim, crash_at))
        # nobody may cut the suspicion shorter than the Lifeguard minimum
        assert first - crash_at >= CONFIG.suspicion_min_timeout(n)


def test_no_false_deaths_under_ten_percent_loss_for_three_minutes() -> None:
    cluster = MembershipCluster(CONFIG, seed=5, loss=0.1)
    cluster.warm_start(50)
    cluster.run_for(180.0)
    suspicions = [e for e in cluster.log if e.kind == "suspect"]
    deaths = [e for e in cluster.log if e.kind in ("dead", "left")]
    assert suspicions, "10% loss should make some probes fail"
    assert deaths == []
    cluster.network.loss = 0.0
    assert cluster.run_until(cluster.converged, timeout=30)


def test_graceful_leave_is_seen_as_left_by_everyone() -> None:
    cluster = joined_cluster(30, seed=2)
    start = cluster.now
    cluster.leave("n0011")
    assert cluster.run_until(
        lambda: status_everywhere(cluster, "n0011") == {MemberStatus.LEFT}, timeout=10
    )
    assert not cluster.network.is_up("n0011")
    cluster.run_for(20.0)
    assert events(cluster, "dead", "n0011", start) == []
    assert len(events(cluster, "left", "n0011", start)) == 29


def test_restarted_node_rejoins_with_a_higher_incarnation() -> None:
    cluster = joined_cluster(30, seed=4)
    cluster.crash("n0005")
    assert cluster.run_until(
        lambda: status_everywhere(cluster, "n0005") == {MemberStatus.DEAD}, timeout=20
    )
    dead_incarnation = cluster.membership("n0000").member("n0005").incarnation
    restarted = cluster.restart("n0005", seeds=["n0012"])
    assert restarted.incarnation == 0
    assert cluster.run_until(cluster.converged, timeout=20)
    assert restarted.incarnation > dead_incarnation
    for observer in cluster.up():
        assert cluster.live_view(observer)["n0005"][0] == restarted.incarnation


def test_partition_heals_after_both_sides_declared_each_other_dead() -> None:
    cluster = joined_cluster(20, seed=6)
    left, right = cluster.up()[:10], cluster.up()[10:]
    cluster.network.partition(left, right)
    assert cluster.run_until(
        lambda: status_everywhere(cluster, right[0]) >= {MemberStatus.DEAD}, timeout=30
    )
    cluster.run_for(CONFIG.gossip_to_the_dead_time + 5)  # long past gossip to the dead
    cluster.network.heal()
    assert cluster.run_until(cluster.converged, timeout=30)


def test_state_update_reaches_every_node() -> None:
    cluster = joined_cluster(40, seed=8)
    node = cluster.membership("n0009")
    new_state = replace(node.local_state, queue_depth=12, position=(48.1, 11.5))
    cluster.network.call("n0009", lambda core, now: core.update_local_state(new_state, now))
    assert cluster.run_until(cluster.converged, timeout=3)
    for observer in cluster.up():
        assert cluster.membership(observer).member("n0009").state == new_state
    assert len(events(cluster, "updated", "n0009")) == 39


def test_signed_fleet_refuses_a_member_impersonating_another() -> None:
    keys = {f"n{i:04d}": nacl.signing.SigningKey.generate() for i in range(12)}
    public = {n: bytes(k.verify_key) for n, k in keys.items()}
    cluster = MembershipCluster(
        CONFIG,
        seed=9,
        authenticator_for=lambda n: Ed25519RecordAuthenticator(keys[n], public.get),
    )
    cluster.join_all(12)
    assert cluster.run_until(cluster.converged, timeout=30)
    victim = cluster.membership("n0001")
    hijack = AliveRecord("n0001", 9, 9, replace(victim.local_state, host="203.0.113.66"))
    forged = encode_packet(Gossip(), [encode_record(hijack)])
    for observer in cluster.up():
        if observer not in ("n0001", "n0002"):
            cluster.network.inject("n0002", observer, forged)
    cluster.run_for(5.0)
    refused = sum(cluster.membership(o).counters.impersonations_refused for o in cluster.up())
    assert refused == 10
    for observer in cluster.up():
        assert cluster.membership(observer).member("n0001").state.host != "203.0.113.66"
    assert cluster.converged()


# --- random fault sequences --------------------------------------------------------------------

SIZE = 5
nodes = st.integers(0, SIZE - 1)
operations = st.one_of(
    st.tuples(st.just("advance"), st.floats(0.1, 4.0)),
    st.tuples(st.just("crash"), nodes),
    st.tuples(st.just("restart"), nodes),
    st.tuples(st.just("leave"), nodes),
    st.tuples(st.just("update"), nodes),
    st.tuples(st.just("partition"), st.lists(st.booleans(), min_size=SIZE, max_size=SIZE)),
    st.tuples(st.just("heal"), st.none()),
    st.tuples(st.just("loss"), st.sampled_from([0.0, 0.1, 0.3])),
)


def _apply(cluster: MembershipCluster, ids: list[str], operation) -> None:
    kind, arg = operation
    network = cluster.network
    if kind == "advance":
        cluster.run_for(arg)
    elif kind == "crash" and len(cluster.up()) > 2:
        cluster.crash(ids[arg])
    elif kind == "restart" and not network.is_up(ids[arg]):
        cluster.restart(ids[arg], seeds=cluster.up()[:2])
    elif kind == "leave" and network.is_up(ids[arg]) and len(cluster.up()) > 2:
        cluster.leave(ids[arg])
    elif kind == "update" and network.is_up(ids[arg]):
        core = cluster.membership(ids[arg])
        if core.local_member.status is MemberStatus.LEFT:
            return
        state = replace(core.local_state, queue_depth=core.local_state.queue_depth + 1)
        network.call(ids[arg], lambda c, now: c.update_local_state(state, now))
    elif kind == "partition":
        network.partition([i for i, side in zip(ids, arg, strict=True) if side],
                          [i for i, side in zip(ids, arg, strict=True) if not side])  # fmt: skip
    elif kind == "heal":
        network.heal()
    elif kind == "loss":
        network.loss = arg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**16), st.lists(operations, max_size=12))
def test_random_faults_keep_incarnation_rules_and_converge_after_quiescence(seed, ops) -> None:
    cluster = MembershipCluster(CONFIG, seed=seed)
    ids = cluster.join_all(SIZE)
    history: dict[tuple[str, int, str], tuple[str, int]] = {}

    def check(at: float, observer: str, event) -> None:
        key = (observer, cluster.network.generation(observer), event.member.node_id)
        kind, incarnation = event.kind, event.member.incarnation
        previous = history.get(key)
        if (
            previous
            and previous[0] in ("dead", "left")
            and kind
            in (
                MemberEventKind.ALIVE,
                MemberEventKind.JOINED,
            )
        ):
            assert incarnation > previous[1], f"{observer} revived {key[2]} at {incarnation}"
        if kind is MemberEventKind.FORGOTTEN:
            history.pop(key, None)
        elif kind in (MemberEventKind.DEAD, MemberEventKind.LEFT):
            history[key] = (kind.value, incarnation)
        elif kind in (MemberEventKind.ALIVE, MemberEventKind.JOINED):
            history[key] = ("alive", incarnation)

    cluster.hooks.append(check)
    for operation in ops:
        _apply(cluster, ids, operation)
    cluster.network.heal()
    cluster.network.loss = 0.0
    cluster.run_for(CONFIG.probe_interval)  # let leaving nodes finish their announcement
    for node_id in ids:
        if not cluster.network.is_up(node_id):
            cluster.restart(node_id, seeds=cluster.up()[:2])
    assert cluster.run_until(cluster.converged, timeout=40), {o: cluster.view(o) for o in ids}


@pytest.mark.parametrize("preset", [MembershipConfig.lan(), MembershipConfig.v2v()])
def test_presets_converge_and_detect_in_a_small_fleet(preset) -> None:
    cluster = MembershipCluster(preset, seed=11)
    cluster.join_all(10)
    assert cluster.run_until(cluster.converged, timeout=30)
    cluster.crash("n0004")
    bound = 2 * preset.probe_interval + preset.suspicion_max_timeout(10) + 2.0
    assert cluster.run_until(
        lambda: status_everywhere(cluster, "n0004") == {MemberStatus.DEAD}, timeout=bound
    )


def test_same_seed_gives_the_same_event_trace() -> None:
    def trace(seed: int) -> list:
        cluster = MembershipCluster(CONFIG, seed=seed, loss=0.1)
        cluster.join_all(12)
        cluster.run_for(5.0)
        cluster.crash("n0003")
        cluster.run_for(15.0)
        return cluster.log

    first = trace(21)
    assert first == trace(21)
    assert first != trace(22)


# --- the virtual clocks themselves ------------------------------------------------------------


class _OverdueCore:
    """A core that, once a packet arrived, asks for a tick at time 0 (already past)."""

    def __init__(self) -> None:
        self.deadline = math.inf
        self.ticks: list[float] = []

    def handle_packet(self, from_node: str, data: bytes, now: float) -> None:
        self.deadline = 0.0

    def tick(self, now: float) -> None:
        self.ticks.append(now)
        self.deadline = math.inf

    def next_deadline(self) -> float:
        return self.deadline

    def drain_packets(self) -> list[tuple[str, bytes]]:
        return []

    def drain_events(self) -> list:
        return []


def test_network_clock_never_goes_back_for_an_overdue_timer_or_callback() -> None:
    network = VirtualNetwork(random.Random(1), latency=(0.5, 0.5))
    core = _OverdueCore()
    network.add("a", core)
    network.run_for(5.0)
    network.inject("b", "a", b"ping")
    seen: list[tuple[float, float]] = []
    network.schedule(1.0, lambda now: seen.append((now, network.now)))
    network.run_for(1.0)
    assert seen == [(5.0, 5.0)]
    assert core.ticks == [5.5] and network.now == 6.0


def test_virtual_clock_loop_runs_timers_at_a_late_start_time() -> None:
    """Past 2**24 s one ulp of the clock exceeds asyncio's 1 ns resolution; timers must still
    run there instead of the loop spinning at one instant (run in a process: it would hang)."""
    code = (
        "import asyncio\n"
        "from meshinfer.testing.virtual_clock import VirtualClockLoop\n"
        "async def main():\n"
        "    loop = asyncio.get_running_loop()\n"
        "    start = loop.time()\n"
        "    await asyncio.sleep(1.5)\n"
        "    print(loop.time() - start)\n"
        "with asyncio.Runner(loop_factory=lambda: VirtualClockLoop(start=1e9)) as runner:\n"
        "    runner.run(main())\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1.5"]
