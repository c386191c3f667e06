"""Session 30: which node may answer an item's attempt is asked of the item's run
(``ItemRun.sent_to`` / ``may_answer`` / ``nodes_of``), a passed deadline's error of the task's
(``TaskRun.deadline_error``); ``Coordinator.nodes()`` and ``waiting()`` read what placement keeps
of each member without writing it, so a member's position age starts where the dispatcher first
reads it, whether or not someone asked before; an idle ``OrderedInputs.fetch_cached``."""

from __future__ import annotations

import asyncio

import pytest

from coordinator import service
from coordinator.runs import ItemRun, TaskRun
from meshinfer.inference.base import ModelRef
from meshinfer.inference.cache import ContentCache, OrderedInputs, content_digest
from meshinfer.inference.registry import load_digits_holdout
from tests.helpers import until
from tests.test_contact_aware import STAYING, road
from tests.test_coordinator_service import Mesh, spec


def _item_run(attempt: int = 1) -> ItemRun:
    x, _ = load_digits_holdout()
    run = TaskRun(spec("t", "single", x[:1]), default_aggregation="all", now=0.0)
    return ItemRun.at_attempt(run.ready()[0], attempt, refused=1)


def test_an_item_run_says_who_may_answer_which_attempt():
    entry = _item_run(2)
    assert (entry.attempt, entry.item.attempt, entry.refused) == (2, 2, 1)
    entry.sent.update({(1, "b"), (1, "a"), (2, "c")})
    entry.node = "c"
    assert entry.sent_to(2, "c") and not entry.sent_to(1, "a") and not entry.sent_to(2, "a")
    assert entry.may_answer(1, "a") and entry.may_answer(2, "c") and not entry.may_answer(1, "c")
    assert entry.nodes_of(1) == "a, b" and entry.nodes_of(3) == ""
    entry.next_attempt()
    assert (entry.attempt, entry.item.attempt) == (3, 3)
    assert not entry.sent_to(2, "c")  # (its node is the service's to move)


def test_the_deadline_error_is_a_method_of_the_run_only():
    """The old module-level name (``service._deadline_passed``, kept for tests) is gone."""
    x, _ = load_digits_holdout()
    run = TaskRun(spec("d", "single", x[:1], deadline_s=2.0), default_aggregation="all", now=0.0)
    assert run.deadline_error() == "deadline of 2 s passed with 0 of 1 items done"
    assert not hasattr(service, "_deadline_passed")


async def test_asking_for_the_nodes_starts_no_members_position_age(tmp_path):
    """``road`` waits for its members through ``nodes()``: each was first seen there. Before
    the thirtieth session that started the age of its position; then the dispatcher's first
    read did (a member never read counted as current). A position is now aged from when
    membership received it: neither an ask nor the placement restarts it, and a read keeps
    nothing."""
    async with road(tmp_path, STAYING, STAYING) as mesh:
        c, loop = mesh.coordinator, asyncio.get_running_loop()
        asked_at = loop.time()
        c.nodes()
        assert c._sets_of == {}  # a read keeps nothing
        await until(lambda: loop.time() > asked_at + 0.5)
        x, _ = load_digits_holdout()
        record = await c.wait(await c.submit(spec("placed", "single", x[:1])), 10)
        assert record.state.value == "succeeded", record.summary.error
        contact = {n["node_id"]: n["contact_s"] for n in c.nodes()}
        # aged from its arrival, before the first ask (40 s left then): not from the placement
        assert contact["staying"] <= 40.0 - (loop.time() - asked_at) + 2e-3


async def test_asking_why_items_wait_keeps_nothing_of_the_members(tmp_path):
    """``waiting()`` reads the members' views as placement would, without keeping them: a
    member the dispatcher has not read (as after a new gossip) is not taken as read then."""
    async with Mesh(tmp_path, n=1) as mesh:
        c = mesh.coordinator
        x, _ = load_digits_holdout()
        unserved = spec("parked", "single", x[:1], models=(ModelRef("no-such-model", "1"),))
        await c.submit(unserved)
        await until(lambda: c._parked and "node-0" in c._sets_of)
        c._sets_of.clear()  # (as if node-0 were first seen after the dispatcher read)
        why = c.waiting("parked")
        assert list(why) == ["parked/0"] and "no-such-model" in why["parked/0"]
        assert c._sets_of == {}
        assert await c.cancel("parked")


def test_an_idle_fetch_cached_serves_at_once_and_leaves_nothing_queued():
    async def run() -> None:
        cache = ContentCache(1 << 10)
        ordered = OrderedInputs(cache, off_loop_bytes=64)
        data = b"x" * 32
        ordered.keep(data)
        assert ordered.fetch_cached(content_digest(data)) == data
        assert ordered.fetch_cached(content_digest(b"absent")) is None  # nothing done
        assert not ordered.busy  # (a get queued behind nothing would never be taken)
        assert (cache.stats.hits, cache.stats.misses) == (1, 0)
        await ordered.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("attempt", [1, 3])
def test_an_item_run_at_its_first_attempt_keeps_the_planned_item(attempt):
    x, _ = load_digits_holdout()
    planned = TaskRun(spec("p", "single", x[:1]), default_aggregation="all", now=0.0).ready()[0]
    entry = ItemRun.at_attempt(planned, attempt)
    assert (entry.item is planned) == (attempt == 1) and entry.item.attempt == attempt
