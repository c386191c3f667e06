"""Work sharing and result replay (session 36 review): what a kept result counts against the
replay budget when a helper peer chose its text, and a held item re-assigned with other work."""

from __future__ import annotations

import dataclasses
import gc
import tracemalloc

import numpy as np

from meshinfer.proto.tasks_wire import MAX_ID_LEN, MAX_TIMINGS, TaskAssign, TaskResult, Tensor
from node.replay import ENTRY_OVERHEAD, ResultReplay
from tests.test_executor_sharing import KEEPING, Net, item, soon


def _helpers_result(i: int) -> tuple[TaskAssign, TaskResult]:
    """Item ``i`` and a result for it as a helper peer may relay it: every name as long as the
    decoder lets through, and as many timings, each a string of its own (decoded per message)."""
    item_id = f"{i:08d}".ljust(MAX_ID_LEN, "i")
    name = f"{i:08d}".ljust(MAX_ID_LEN, "n")
    timings = {f"{i:08d}-{j:02d}".ljust(64, "t"): 0.5 + j for j in range(MAX_TIMINGS)}
    output = Tensor.from_array(np.full((1, 1), i, dtype=np.float32))
    result = TaskResult(item_id, 1, output, name, name.replace("n", "e"), name.replace("n", "d"),
                        timings)  # fmt: skip
    return item(item_id), result


def test_a_helpers_long_names_and_timings_count_against_the_replay_budget():
    """A result relayed from a helper carries its ids, engine, device and timings: up to ~4 KiB
    of objects an entry. Counted as the usual ~700 bytes, a 1 MiB budget held ~7 MiB; what the
    store holds (tracemalloc) stays near what it counts, and the budget keeps fewer of them."""
    replay = ResultReplay(1 << 30, keep_s=60)
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(400):
            replay.keep("coord", *_helpers_result(i), now=1.0)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held <= 1.5 * replay.bytes, (held, replay.bytes)
    small = ResultReplay(64 * 1024, keep_s=60)
    for i in range(64):
        small.keep("coord", *_helpers_result(i), now=1.0)
    assert small.bytes <= 64 * 1024 and len(small) < 64 * 1024 // (4 * ENTRY_OVERHEAD)


def test_a_nodes_own_result_still_counts_its_output_plus_the_entry_overhead():
    """The usual result (short ids, three timings) is counted as before: its text is within the
    allowance."""
    replay = ResultReplay(1 << 20, keep_s=60)
    timings = {"queue_s": 0.001, "infer_s": 0.002, "total_s": 0.003}
    item_id = "5f0c6e1e-8a41-4c1b-9b7e-3c7f2f1d9a10/17"
    output = Tensor.from_array(np.zeros((1, 4), dtype=np.float32))
    result = TaskResult(item_id, 1, output, "vehicle-12", "NumpyEngine", "cpu", timings)
    replay.keep("coord", item(item_id), result, 0.0)
    assert replay.bytes == 16 + ENTRY_OVERHEAD


async def test_a_held_item_re_assigned_with_other_work_does_not_take_its_answer():
    """Item ids are ``task/n`` and clients choose task ids: coord-2 may send an item id coord's
    item runs under here, for other work. coord must get its own result, and coord-2 never a
    result computed from coord's input."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        await net.assign("coord", "x")
        await soon(lambda: executor.backlog == 1)
        zeros = Tensor.from_array(np.zeros((1, 8), dtype=np.float32))
        other = dataclasses.replace(item("x", attempt=2), input=zeros)
        await net.nodes["coord-2"].peers.request("w", other)
        await soon(lambda: "x" in executor._reply or net.nodes["coord-2"].answers())
        net.gate.set()
        await soon(lambda: net.nodes["coord-2"].answers() or net.nodes["coord"].answers())
        theirs = [m for _, m in net.nodes["coord-2"].got if isinstance(m, TaskResult)]
        assert theirs == [], "coord-2 got the result of coord's work"
        await soon(lambda: ("TaskResult", "x", 1, "w") in net.nodes["coord"].answers())
