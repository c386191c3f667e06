"""The dispatch loop reads the members' views once for the items queued together, and still
counts its own sends within that burst (a least-loaded burst spreads over the nodes)."""

from __future__ import annotations

from collections import Counter

from coordinator.service import CoordinatorConfig
from meshinfer.inference.registry import load_digits_holdout
from tests.test_coordinator_service import Mesh, spec


async def test_a_burst_reads_the_views_once_and_spreads_by_its_own_sends(tmp_path):
    x, y = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=30, default_policy="least_loaded")
    async with Mesh(tmp_path, n=2, config=config) as mesh:
        c = mesh.coordinator
        reads, read = [], c._view_bases
        placed: Counter[str] = Counter()
        choose = c._choose

        def counting_read(*args):
            reads.append(len(c._busy))
            return read(*args)

        def noting_choose(run, entry):
            node = choose(run, entry)
            placed[node] += 1
            return node

        c._view_bases, c._choose = counting_read, noting_choose
        task_id = await c.submit(spec("wide", "batch", x[:16], shard_size=1))
        record = await c.wait(task_id, timeout=60)
        assert record.state.value == "succeeded", record.summary.error
        assert (c.result_of(record)["labels"] == y[:16]).mean() >= 0.9
        # 16 items queued together: read once (a few more if a result ended the burst early)
        assert 1 <= len(reads) < 8, reads
        # the sends within the burst counted as the nodes' load: least-loaded alternates
        assert set(placed) == {"node-0", "node-1"}, placed
        assert abs(placed["node-0"] - placed["node-1"]) <= 2, placed
        assert c._burst_views is None  # the loop waits again: nothing kept while it waits
