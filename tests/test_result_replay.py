"""A node answers an item it already answered from the result it kept (node/replay.py), instead
of running it again: the store's bounds, the executor's use of it, and a coordinator that lost
a result with its session getting it again from a real node daemon without a second run."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.errors import ConfigError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks_wire import TaskResult, Tensor, encode_params
from meshinfer.testing.cluster import LocalCluster
from node.config import ExecutorSection
from node.executor import TaskExecutor
from node.replay import ENTRY_OVERHEAD, ResultReplay
from tests.helpers import until
from tests.test_coordinator_failover import (
    TINY_REF,
    X,
    assert_succeeded,
    batch,
    coordinator_for,
    serving,
)
from tests.test_executor_sharing import KEEPING, REF, Net, item, soon

OTHER = ModelRef(REF.model_id, "other-version")


def result(item_id: str, attempt: int = 1, values: int = 4, fill: float = 0.5) -> TaskResult:
    output = Tensor.from_array(np.full((1, values), fill, dtype=np.float32))
    return TaskResult(item_id, attempt, output, "w", "NumpyEngine", "cpu", {"total_s": 0.001})


# --- the store -------------------------------------------------------------------------------


def keep(replay: ResultReplay, item_id: str, now: float, **kw) -> None:
    """Keep ``result(item_id, **kw)`` as coord's answer to :func:`item` ``item_id``."""
    replay.keep("coord", item(item_id), result(item_id, **kw), now)


def answer(replay: ResultReplay, item_id: str, now: float, attempt: int = 2):
    return replay.answer("coord", item(item_id, attempt), now)


def test_a_kept_result_answers_a_later_attempt_of_the_same_work_from_the_same_peer_only():
    replay = ResultReplay(1 << 20, keep_s=10)
    keep(replay, "a", 0.0, fill=0.25)
    again = answer(replay, "a", 1.0, attempt=3)
    assert again is not None and again.attempt == 3 and again.item_id == "a"
    assert again.output.to_array().tolist() == [[0.25] * 4]
    assert answer(replay, "b", 1.0) is None
    same_id = item("a", attempt=3)
    other_work = {
        "model": dataclasses.replace(same_id, model_version=OTHER.version),
        "input": dataclasses.replace(same_id, input=Tensor.from_array(np.zeros((1, 8), "f4"))),
        "params": dataclasses.replace(same_id, params=encode_params({"k": 1})),
    }
    for why, assign in other_work.items():
        assert replay.answer("coord", assign, 1.0) is None, why
    assert replay.answer("coord-2", same_id, 1.0) is None  # another peer
    assert replay.stats.replayed == 1


def test_results_expire_after_keep_s():
    replay = ResultReplay(1 << 20, keep_s=10)
    keep(replay, "old", 0.0)
    keep(replay, "new", 5.0)
    assert answer(replay, "old", 9.9) is not None
    assert answer(replay, "old", 10.0) is None
    assert answer(replay, "new", 10.0) is not None
    keep(replay, "newest", 15.0)  # keeping also drops what expired
    assert len(replay) == 1 and replay.bytes == 16 + ENTRY_OVERHEAD


def test_the_oldest_results_make_room_within_the_budget():
    size = 16 + ENTRY_OVERHEAD  # 4 float32 values
    replay = ResultReplay(3 * size, keep_s=60)
    for i in range(5):
        keep(replay, f"r{i}", float(i))
    assert [answer(replay, f"r{i}", 5.0) is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]
    assert replay.bytes == 3 * size and replay.stats.evicted == 2


def test_a_result_larger_than_the_budget_or_a_zero_setting_keeps_nothing():
    small = ResultReplay(ENTRY_OVERHEAD + 8, keep_s=60)
    keep(small, "big", 0.0, values=4)
    assert len(small) == 0
    for budget, keep_s in ((0, 60.0), (1 << 20, 0.0)):
        off = ResultReplay(budget, keep_s)
        keep(off, "x", 0.0)
        assert answer(off, "x", 0.0) is None
    with pytest.raises(ConfigError):
        ResultReplay(-1, 1.0)
    with pytest.raises(ConfigError):
        ResultReplay(1, float("nan"))


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["keep", "answer"]),
            st.sampled_from(["a", "b", "c", "d", "e"]),
            st.integers(1, 64),  # values in the output
            st.floats(0, 3),  # time step
        ),
        max_size=60,
    ),
    budget_values=st.integers(0, 200),
)
def test_the_store_matches_a_plain_model_of_it(ops, budget_values):
    """Against a list of (stored_at, id, size) in the order kept: the bytes are the sum of what
    is kept and never exceed the budget, and an answer comes exactly for an item whose latest
    result is still kept, unexpired."""
    budget = budget_values * 4 + ENTRY_OVERHEAD
    keep_s = 5.0
    replay = ResultReplay(budget, keep_s)
    model: list[tuple[float, str, int]] = []
    now = 0.0
    for op, item_id, values, step in ops:
        now += step
        model = [e for e in model if now - e[0] < keep_s]
        if op == "keep":
            size = values * 4 + ENTRY_OVERHEAD
            keep(replay, item_id, now, values=values)
            if size <= budget:
                model = [e for e in model if e[1] != item_id]
                while sum(e[2] for e in model) + size > budget:
                    model.pop(0)
                model.append((now, item_id, size))
        else:
            got = answer(replay, item_id, now, attempt=7)
            assert (got is not None) == any(e[1] == item_id for e in model)
            if got is not None:
                assert got.attempt == 7 and got.item_id == item_id
        assert replay.bytes <= budget
    live = [e for e in model if now - e[0] < keep_s]
    assert replay.bytes >= sum(e[2] for e in live)


# --- the executor ----------------------------------------------------------------------------


async def answered_once(net: Net, config: ExecutorSection = KEEPING) -> TaskExecutor:
    """``w``'s executor, having run item ``x`` for coord and answered it."""
    executor = net.worker(config)
    net.gate.set()
    await net.assign("coord", "x")
    await soon(lambda: ("TaskResult", "x", 1, "w") in net.nodes["coord"].answers())
    return executor


async def test_an_item_sent_again_after_its_answer_is_answered_without_running_again():
    async with Net() as net:
        executor = await answered_once(net)
        await net.assign("coord", "x", attempt=2)  # e.g. after the coordinator restarted
        await soon(lambda: ("TaskResult", "x", 2, "w") in net.nodes["coord"].answers())
        first, second = (m for _, m in net.nodes["coord"].got if isinstance(m, TaskResult))
        np.testing.assert_array_equal(first.output.to_array(), second.output.to_array())
        assert executor.stats.accepted == 1 and executor.stats.completed == 1
        assert executor.replay.stats.replayed == 1


async def test_a_draining_node_still_answers_an_item_it_already_ran():
    async with Net() as net:
        executor = await answered_once(net)
        draining = asyncio.create_task(executor.drain(timeout=5))
        await asyncio.sleep(0)
        await net.assign("coord", "x", attempt=2)
        await net.assign("coord", "y")  # new work is refused
        await soon(lambda: len(net.nodes["coord"].answers()) == 3)
        await draining
        assert sorted(net.nodes["coord"].answers()) == [
            ("TaskFailed", "y", 1, "w"),
            ("TaskResult", "x", 1, "w"),
            ("TaskResult", "x", 2, "w"),
        ]


async def test_without_a_replay_budget_the_item_runs_again():
    async with Net() as net:
        executor = await answered_once(net, dataclasses.replace(KEEPING, result_replay_mib=0))
        await net.assign("coord", "x", attempt=2)
        await soon(lambda: ("TaskResult", "x", 2, "w") in net.nodes["coord"].answers())
        assert executor.stats.accepted == 2 and executor.replay.stats.replayed == 0


async def test_an_item_sent_again_for_another_model_is_not_answered_from_the_kept_result():
    async with Net() as net:
        executor = await answered_once(net)
        other = dataclasses.replace(item("x", attempt=2), model_version=OTHER.version)
        await net.nodes["coord"].peers.request("w", other)
        await soon(lambda: ("TaskFailed", "x", 2, "w") in net.nodes["coord"].answers())
        assert executor.replay.stats.replayed == 0  # (w does not load that version)


# --- a real node daemon ----------------------------------------------------------------------

NODE = (
    f'[inference]\nmodels = ["{TINY_REF.model_id}@{TINY_REF.version}"]\n'
    "[executor]\nmax_concurrent = 1\noffload_queue_depth = 100000\n"
)


async def test_a_result_lost_with_its_session_is_replayed_not_run_again(tmp_path):
    """The coordinator's first result from the node vanishes with the session it came on (the
    coordinator drops it and closes the socket: a link that broke just then). The coordinator
    re-dials the node and sends its items again; the node answers the lost one from the result
    it kept (so are those it answered meanwhile over the new session: their second answers are
    dropped as duplicates): the task succeeds and the node ran every item once."""
    rows = 12
    async with LocalCluster(tmp_path, fleet_id="replay", preset="lan") as cluster:
        cluster.add_node(X, extra=NODE)
        daemon = await asyncio.to_thread(cluster.start, X)
        mesh, c = await coordinator_for(cluster, tmp_path, redial_timeout_s=2.0)
        try:
            await until(lambda: serving(c, (X,)))
            take = mesh.peers._handlers[TaskResult]
            lost: list[str] = []
            closing: set[asyncio.Task] = set()

            def lose_the_first(peer: str, msg: TaskResult) -> None:
                if lost:
                    take(peer, msg)
                    return
                lost.append(msg.item_id)
                for session in mesh.peers.open_sessions():
                    if session.peer_id == peer:
                        closing.add(asyncio.create_task(session.stream.aclose()))

            mesh.peers.on(TaskResult, lose_the_first)
            spec, x = batch("lost-answer", rows, seed=11)
            await c.submit(spec)
            await assert_succeeded(c, "lost-answer", x)
            await asyncio.gather(*closing)
            assert lost and c.stats_.sessions_lost >= 1 and c.stats_.redials_ok >= 1
            status = await asyncio.to_thread(daemon.get, "/status")
            executor = status["executor"]
            assert executor["completed"] == rows  # nothing ran twice (without replay: ~20)
            assert executor["result_replay"]["replayed"] >= 1
        finally:
            await c.aclose()
            await mesh.aclose()
