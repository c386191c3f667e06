"""Coordinator bookkeeping found in the session-36 review's follow-ups.

Real coordinator and node daemons in this process (``tests.test_coordinator_service.Mesh``,
real TCP on loopback, a real SQLite journal).
"""

from __future__ import annotations

from coordinator.service import CoordinatorConfig
from meshinfer.inference.registry import load_digits_holdout
from tests.helpers import until
from tests.test_coordinator_service import Mesh, hold_inference, spec


async def test_an_item_failing_for_good_when_its_node_is_lost_is_not_counted_re_dispatched(
    tmp_path,
):
    """``redispatched_after_death`` ("items re-sent after their node died or left") counted
    an item on its last attempt too, which fails instead of going anywhere."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2, config=CoordinatorConfig(max_attempts=1)) as mesh:
        gates = [hold_inference(d) for d in mesh.daemons.values()]
        try:
            c = mesh.coordinator
            task_id = await c.submit(spec("last", "single", x[:1]))
            entry = c._items["last/0"][1]
            await until(lambda: entry.node is not None)
            c._redispatch_from(entry.node, "node declared dead")
            record = await c.wait(task_id, timeout=10)
        finally:
            for gate in gates:
                gate.set()
        assert record.state.value == "failed"
        assert "gave up after 1 attempts" in record.summary.error
        assert c.stats_.redispatched_after_death == 0
        assert c.stats_.retries == 0
