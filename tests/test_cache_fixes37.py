"""Session 37 review of the input cache (meshinfer.inference.cache) and the coordinator's
inputs by reference (coordinator.input_refs): a node served an input by reference to any member
(only a coordinator's keep_input was kept: another member could run models on a coordinator's
kept input knowing its digest alone, and its gets reordered the cache behind the mirror); and the
budget line the node and its mirror share."""

from __future__ import annotations

import hashlib

from meshinfer.inference.cache import ContentCache, InputMirror, OrderedInputs, Send, content_digest
from meshinfer.proto.tasks_wire import TaskFailed, TaskResult, by_reference
from tests.test_executor_fixes28 import KEEPS
from tests.test_executor_sharing import Net, item, soon


async def test_a_reference_from_a_member_that_is_not_a_coordinator_is_not_served():
    async with Net() as net:
        net.gate.set()
        executor = net.worker(KEEPS)
        kept = item("kept")
        digest = executor.inputs.put(kept.input.data)  # as a coordinator's keep_input leaves it
        assert digest == hashlib.sha256(kept.input.data).hexdigest()
        await net.nodes["v"].peers.request("w", by_reference(item("from-v"), digest))
        kinds = TaskResult | TaskFailed
        await soon(lambda: any(isinstance(m, kinds) for _, m in net.nodes["v"].got))
        answers = [m for _, m in net.nodes["v"].got if isinstance(m, kinds)]
        assert all(isinstance(m, TaskFailed) for m in answers), answers
        assert executor.inputs.stats.hits == 0  # the coordinator's mirror order untouched


async def test_an_input_the_size_of_the_budget_is_kept_and_one_byte_more_goes_inline():
    """The node's keep and the coordinator's mirror draw the budget line at the same byte, on
    the loop and through the hashing thread alike (a mismatch would cost a miss per send)."""
    for off_loop in (1 << 20, 0):  # on the loop; every input through the hashing thread
        cache = ContentCache(100)
        inputs, mirror = OrderedInputs(cache, off_loop_bytes=off_loop), InputMirror(100)
        fits, over = b"f" * 100, b"o" * 101
        assert mirror.send(content_digest(over), len(over)) is Send.INLINE
        assert mirror.send(content_digest(fits), len(fits)) is Send.KEEP
        inputs.keep(over)
        inputs.keep(fits)
        await inputs.settled()
        assert cache.digests() == mirror.digests() == (content_digest(fits),)
        await inputs.aclose()
