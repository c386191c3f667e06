"""Membership building blocks: config formulas, the broadcast queue, Lifeguard timers."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.errors import ConfigError
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_gossip import BroadcastQueue, UpdateFamily
from meshinfer.proto.membership_probe import ProbeOrder
from meshinfer.proto.membership_suspicion import LocalHealth, SuspicionTimer

# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["lan", "v2v", "test"])
def test_presets_are_valid_and_fit_a_packet(preset) -> None:
    config = getattr(MembershipConfig, preset)()
    assert 2 * config.probe_timeout <= config.probe_interval
    assert config.packet_budget <= 1400 and config.gossip_nodes == 3


def test_lan_formulas_match_the_documented_values() -> None:
    lan = MembershipConfig.lan()
    assert lan.retransmit_limit(1000) == 4 * 4  # 4 * ceil(log10(1001))
    assert lan.retransmit_limit(9) == 4
    assert lan.suspicion_min_timeout(1000) == pytest.approx(12.0)  # 4 * log10(1000) * 1 s
    assert lan.suspicion_min_timeout(5) == pytest.approx(4.0)  # log10 term floored at 1
    assert lan.suspicion_max_timeout(1000) == pytest.approx(72.0)
    assert lan.suspicion_confirmations(1000) == 2
    assert lan.suspicion_confirmations(3) == 0  # n - 2 < k
    assert lan.push_pull_period(32) == 30.0
    assert lan.push_pull_period(1000) == 30.0 * (math.ceil(math.log2(1000) - 5) + 1)


@pytest.mark.parametrize(
    "changes",
    [
        {"probe_interval": 0.0},
        {"probe_timeout": 0.8},  # more than half the probe interval
        {"suspicion_mult": 1},
        {"gossip_nodes": -1},
        {"packet_budget": 100},
        {"dead_node_reclaim_time": 5.0},  # shorter than gossip to the dead
    ],
)
def test_invalid_config_is_refused(changes) -> None:
    with pytest.raises(ConfigError):
        MembershipConfig(**changes)


# --- broadcast queue ---------------------------------------------------------------------------


def test_queue_sends_least_transmitted_newest_first_and_retires_at_the_limit() -> None:
    queue = BroadcastQueue()
    queue.enqueue("a", UpdateFamily.RECORD, b"A" * 10)
    queue.enqueue("b", UpdateFamily.RECORD, b"B" * 10)
    assert queue.take(15, limit=2) == [b"B" * 10]  # newest first; A does not fit any more
    assert queue.take(15, limit=2) == [b"A" * 10]  # now the least transmitted
    assert queue.take(100, limit=2) == [b"B" * 10, b"A" * 10]
    assert len(queue) == 0 and queue.take(100, limit=2) == []


def test_newer_update_about_a_node_replaces_the_queued_one() -> None:
    queue = BroadcastQueue()
    queue.enqueue("a", UpdateFamily.STATUS, b"suspect-0")
    queue.enqueue("a", UpdateFamily.STATUS, b"dead-0")
    queue.enqueue("a", UpdateFamily.RECORD, b"alive-1")
    assert sorted(queue.take(100, limit=5)) == [b"alive-1", b"dead-0"]
    queue.drop("a", UpdateFamily.STATUS)
    assert not queue.has("a", UpdateFamily.STATUS) and queue.has("a", UpdateFamily.RECORD)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 5), st.binary(max_size=50))), st.data())
def test_queue_respects_budget_and_sends_each_latest_update_limit_times(updates, data) -> None:
    queue, limit, latest = BroadcastQueue(), 3, {}
    for index, (node, noise) in enumerate(updates):
        payload = f"n{node}:{index}:".encode() + noise  # unique per update
        queue.enqueue(f"n{node}", UpdateFamily.RECORD, payload)
        latest[f"n{node}"] = payload
    sent: dict[bytes, int] = {}
    while len(queue):
        budget = data.draw(st.integers(70, 400))
        chosen = queue.take(budget, limit)
        assert chosen and sum(map(len, chosen)) <= budget
        for payload in chosen:
            sent[payload] = sent.get(payload, 0) + 1
    assert sent == {payload: limit for payload in latest.values()}


# --- Lifeguard ---------------------------------------------------------------------------------


def test_suspicion_timeout_follows_the_lifeguard_formula() -> None:
    timer = SuspicionTimer(100.0, 10.0, 60.0, k=3, accusers={"b"})
    assert timer.deadline == pytest.approx(160.0)
    expected = {1: 60 - 50 * math.log(2) / math.log(4), 2: 60 - 50 * math.log(3) / math.log(4)}
    for count, accuser in enumerate(["c", "d"], start=1):
        assert timer.confirm(accuser)
        assert timer.deadline == pytest.approx(100.0 + expected[count])
    assert not timer.confirm("c")  # an accuser counts once
    assert timer.confirm("e") and timer.deadline == pytest.approx(110.0)
    assert not timer.confirm("f")  # beyond k nothing changes
    assert timer.deadline == pytest.approx(110.0)


def test_local_health_scales_timeouts_and_stays_in_range() -> None:
    health = LocalHealth(max_multiplier=8)
    health.apply(-3)
    assert health.score == 0 and health.scale(0.5) == 0.5
    health.apply(20)
    assert health.score == 7 and health.scale(0.5) == 4.0
    health.apply(-1)
    assert health.score == 6


def test_probe_order_visits_every_member_once_per_pass() -> None:
    current = [f"n{i}" for i in range(10)]
    order = ProbeOrder(random.Random(3))
    first_pass = [order.next(lambda n: True, current.copy) for _ in range(5)]
    current.append("new")
    order.add("new")  # joins the rest of this pass
    first_pass += [order.next(lambda n: True, current.copy) for _ in range(6)]
    assert sorted(first_pass) == sorted(current)
    second_pass = [order.next(lambda n: n != "n3", current.copy) for _ in range(10)]
    assert sorted(second_pass) == sorted(m for m in current if m != "n3")
    assert ProbeOrder(random.Random(1)).next(lambda n: True, list) is None
