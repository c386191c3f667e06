"""Session 28 fixes to the node's executor (node/executor.py) and the parts it drives.

* One cancelled item counts once in ``stats.cancelled``, though it runs here while a retry of
  it waits behind an input being hashed, and however often its cancel comes.
* A result's output is joined and packed for the wire in the batcher's worker thread when it is
  big (never on the loop), in the engine's own dtype where the wire carries it.
* An item naming by reference an input the cache holds already does not wait behind another
  input being hashed; the cache still ends as the coordinator's mirror of it says.
* A kept result is never answered from past its time, sweep or no sweep.
* A session lost while the executor closes (waiting for an input's hash) sends nothing again.

Real peer tables and Noise sessions over the in-memory transport (the work-sharing tests'
:class:`~tests.test_executor_sharing.Net`), real batchers and engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import replace

import numpy as np
import pytest

import node.executor as executor_module
from meshinfer.inference.base import ModelRef
from meshinfer.inference.batching import INLINE_MAX_BYTES, BatcherConfig, DynamicBatcher
from meshinfer.inference.cache import KEEP_OFF_LOOP_BYTES, content_digest
from meshinfer.inference.synthetic import sample_inputs
from meshinfer.proto.messages import AppData
from meshinfer.proto.tasks_wire import (
    FailureKind,
    TaskAssign,
    TaskCancel,
    TaskFailed,
    TaskResult,
    Tensor,
    by_reference,
    encode_params,
)
from node.config import ExecutorSection
from node.executor import TaskExecutor
from node.replay import ResultReplay
from tests.test_batching import EchoEngine
from tests.test_executor_sharing import (
    KEEPING,
    MODEL,
    WAIT_S,
    Net,
    WorkerMesh,
    b_dials_again,
    item,
    passed_to_b,
    soon,
)
from tests.test_node_loop_fixes27 import answer, hashes  # noqa: F401 (a fixture)

#: One item at a time, never passed on, and an input cache of 4 MiB.
KEEPS = ExecutorSection(max_concurrent=1, offload_queue_depth=1000, input_cache_mib=4)


def big_keep(item_id: str) -> TaskAssign:
    """An item whose input (288 KiB, hashed in the cache's thread) the node is asked to keep,
    for a model nobody has: it is answered MODEL_NOT_FOUND once kept (or while hashed)."""
    inputs = np.zeros((9216, 8), np.float32)
    assert inputs.nbytes > KEEP_OFF_LOOP_BYTES
    x = Tensor.from_array(inputs)
    return TaskAssign(item_id, f"task-{item_id}", "nope", "1", x, encode_params({}), None, 0, 1,
                      keep_input=True)  # fmt: skip


# --- a cancelled item counts once ----------------------------------------------------------------


async def test_an_item_running_with_a_retry_waiting_for_its_input_counts_one_cancel(hashes):  # noqa: F811
    """x runs here (held by the gate); the coordinator's retry of x names its input by reference
    while a big input is hashed (held), so it waits; then x is cancelled, twice. Both the run
    and the waiting retry end CANCELLED; the item counted one cancel (it counted two, and a
    cancel repeated before the task ended counted again)."""
    hashes.release.clear()
    async with Net() as net:
        executor = net.worker(KEEPING)
        coord = net.nodes["coord"]
        x = item("x")
        await coord.peers.request("w", x)
        await soon(lambda: executor.backlog == 1)
        await coord.peers.request("w", big_keep("k"))
        await soon(lambda: executor.input_order.busy)
        retry = by_reference(item("x", attempt=2), content_digest(x.input.data))
        await coord.peers.request("w", retry)
        for _ in range(2):
            await coord.peers.request("w", TaskCancel("x", "no longer wanted"))
        await soon(lambda: coord.failure("x") is not None)  # the run, cancelled
        assert executor.stats.cancelled == 1
        hashes.release.set()
        await soon(lambda: len([a for a in coord.answers() if a[1] == "x"]) == 2)
        assert {f.code for _, f in coord.got if getattr(f, "item_id", "") == "x"} == {
            FailureKind.CANCELLED
        }
        assert executor.stats.cancelled == 1 and executor.stats.completed == 0


# --- a result's output: off the loop when big, in the engine's dtype ----------------------------


ECHO = ModelRef("echo", "1")


class TypedEcho(EchoEngine):
    """Echoes ``2x + 1`` as ``dtype`` (labels: the argmax of each row, as int64)."""

    def __init__(self, dtype: str) -> None:
        super().__init__()
        self.dtype = dtype

    async def infer(self, ref, batch):
        out = await super().infer(ref, batch)
        if self.dtype == "labels":
            return np.argmax(out, axis=1).astype(np.int64)
        return out.astype(self.dtype)


@contextlib.asynccontextmanager
async def echo_worker(dtype: str = "float32"):
    """``w``'s executor serving :data:`ECHO` through a real batcher on a :class:`TypedEcho`."""
    batcher = DynamicBatcher(TypedEcho(dtype), ECHO, BatcherConfig(max_queue_delay_s=0.0))
    async with Net() as net:
        net.gate.set()
        await batcher.start()
        mesh = WorkerMesh("w", net.w, net.w.admission, net.members)
        executor = TaskExecutor(mesh, {ECHO: batcher}, KEEPING)
        executor.start()
        net.executors.append(executor)
        try:
            yield net, executor
        finally:
            await executor.aclose()
            await batcher.aclose()


def echo_item(item_id: str, inputs: np.ndarray) -> TaskAssign:
    x = Tensor.from_array(inputs)
    return TaskAssign(item_id, f"task-{item_id}", "echo", "1", x, encode_params({}), None, 0, 1)


async def result_of(net: Net, msg: TaskAssign) -> TaskResult:
    await net.nodes["coord"].peers.request("w", msg)
    await soon(lambda: answer(net, msg.item_id) is not None)
    result = answer(net, msg.item_id)
    assert isinstance(result, TaskResult), result
    return result


async def test_a_big_output_is_joined_and_packed_off_the_loop_and_a_small_one_on_it(monkeypatch):
    """An item of 100 rows of 8,192 floats runs as two batcher requests (64 rows at most); its
    3.2 MiB of output used to be joined and packed on the loop. Now both happen in the
    batcher's worker thread; a small output is still packed on the loop (no thread hop)."""
    threads: dict[str, list] = {"join": [], "pack": []}  # join: (bytes, thread)
    wire_tensor = getattr(executor_module, "_wire_tensor", None)
    concatenate = np.concatenate

    def packed(output):
        threads["pack"].append(threading.get_ident())
        return wire_tensor(output)

    def joined(parts):
        threads["join"].append((sum(np.asarray(p).nbytes for p in parts), threading.get_ident()))
        return concatenate(parts)

    monkeypatch.setattr(executor_module, "_wire_tensor", packed, raising=False)
    monkeypatch.setattr(executor_module.np, "concatenate", joined)
    inputs = np.arange(100 * 8192, dtype=np.float32).reshape(100, 8192) % 7
    assert inputs.nbytes > INLINE_MAX_BYTES
    async with echo_worker() as (net, _executor):
        big = await result_of(net, echo_item("big", inputs))
        np.testing.assert_array_equal(big.output.to_array(), inputs * 2 + 1)
        small = await result_of(net, echo_item("small", inputs[:2, :4]))
        np.testing.assert_array_equal(small.output.to_array(), inputs[:2, :4] * 2 + 1)
    loop = threading.get_ident()
    joins = [thread for size, thread in threads["join"] if size == inputs.nbytes]
    assert len(joins) == 1 and joins[0] != loop  # (the small item: one piece, no join)
    assert len(threads["pack"]) == 2 and threads["pack"][0] != loop
    assert threads["pack"][1] == loop


@pytest.mark.parametrize(
    ("dtype", "wire"),
    [("labels", "int64"), ("float16", "float16"), ("float64", "float32"), ("int16", "int64")],
)
async def test_an_output_keeps_the_engines_dtype_where_the_wire_carries_it(dtype, wire):
    """Labels stay int64 (a float32 cast lost labels over 2**24, and their type), float16 stays
    float16; float64, which the wire lacks, goes as float32, int16 as int64."""
    inputs = np.array([[1.0, 5.0, 2.0], [3.0, 0.0, -1.0]], np.float32)
    async with echo_worker(dtype) as (net, _executor):
        result = await result_of(net, echo_item("x", inputs))
    assert result.output.dtype == wire
    expected = np.argmax(inputs, axis=1) if dtype == "labels" else inputs * 2 + 1
    np.testing.assert_array_equal(result.output.to_array(), expected)


async def test_an_output_dtype_no_wire_dtype_holds_fails_its_item_clearly():
    async with echo_worker("complex64") as (net, executor):
        await net.nodes["coord"].peers.request("w", echo_item("x", np.ones((1, 2), np.float32)))
        await soon(lambda: answer(net, "x") is not None)
    failed = answer(net, "x")
    assert isinstance(failed, TaskFailed) and failed.code == FailureKind.INFERENCE_ERROR
    assert "complex64 cannot be sent" in failed.message and not failed.retryable
    assert executor.stats.failed["inference_error"] == 1


# --- a reference to a cached input does not wait behind a hash ----------------------------------


async def test_a_reference_to_a_cached_input_runs_while_another_input_is_hashed(hashes):  # noqa: F811
    """``a``'s small input is kept; a big input is being hashed (held); ``b`` names a's input by
    reference: it is answered at once (it waited for the hash). The cache's get for ``b`` still
    takes effect in its turn: the cache ends [big, a] (least recently used first), as the
    coordinator's mirror says, not [a, big]."""
    hashes.release.clear()
    async with Net() as net:
        net.gate.set()
        executor = net.worker(KEEPS)
        coord = net.nodes["coord"].peers
        a = item("a")
        await coord.request("w", replace(a, keep_input=True))
        await soon(lambda: answer(net, "a") is not None)
        kept = big_keep("k")
        await coord.request("w", kept)
        await soon(lambda: executor.input_order.busy)
        await coord.request("w", by_reference(item("b"), content_digest(a.input.data)))
        await soon(lambda: answer(net, "b") is not None)
        assert executor.input_order.busy  # (the hash is still held)
        assert isinstance(answer(net, "b"), TaskResult)
        np.testing.assert_array_equal(
            answer(net, "b").output.to_array(), answer(net, "a").output.to_array()
        )
        assert executor.inputs.stats.hits == 0  # the get is not done yet: it is in its turn
        hashes.release.set()
        await executor.input_order.settled()
        big, small = content_digest(kept.input.data), content_digest(a.input.data)
        assert executor.inputs.digests() == (big, small) and executor.inputs.stats.hits == 1


async def test_a_retry_by_reference_does_not_pass_an_earlier_assignment_that_waits(hashes):  # noqa: F811
    """x (attempt 1) names an input being hashed and waits; its retry (attempt 2) names an input
    the cache holds. The retry waits too, so x runs once, for attempt 1, and the retry, which
    names other work than the x held, is refused (a retry resolved first would have run x
    with its input and had attempt 1 refused: see test_worksharing_fixes36)."""
    hashes.release.clear()
    async with Net() as net:
        net.gate.set()
        executor = net.worker(KEEPS)
        coord = net.nodes["coord"].peers
        a = item("a")
        await coord.request("w", replace(a, keep_input=True))
        await soon(lambda: answer(net, "a") is not None)
        kept = big_keep("k")
        await coord.request("w", kept)
        first = replace(item("x"), input=kept.input)  # (8 wide, as the model: it runs)
        await coord.request("w", by_reference(first, content_digest(kept.input.data)))
        await coord.request("w", by_reference(item("x", 2), content_digest(a.input.data)))
        assert answer(net, "x") is None
        hashes.release.set()
        await soon(lambda: ("TaskResult", "x", 1, "w") in net.nodes["coord"].answers())
        await executor.input_order.settled()
        answers = [a for a in net.nodes["coord"].answers() if a[1] == "x"]
        assert answers == [("TaskFailed", "x", 2, "w"), ("TaskResult", "x", 1, "w")]
        assert executor.stats.accepted == 2  # a and x


# --- a kept result is never answered past its time ------------------------------------------------


def test_a_kept_result_is_refused_from_its_time_on_without_a_sweep():
    """The executor's sweep of expired results runs up to a second late; a lookup itself refuses
    one from ``keep_s`` after it was kept on (the window is exact)."""
    replay = ResultReplay(1 << 20, keep_s=10.0)
    x = item("x")
    output = Tensor.from_array(sample_inputs(MODEL, 1))
    replay.keep("coord", x, TaskResult("x", 1, output, "w", "", "", {}), now=100.0)
    assert replay.answer("coord", x, now=109.999) is not None
    assert replay.answer("coord", x, now=110.0) is None and "x" not in replay


# --- nothing is sent again once the executor closes ----------------------------------------------


def _watches(executor: TaskExecutor) -> int:
    return sum(1 for t in executor._watchers if t.get_coro().__qualname__.endswith("._watch"))


async def test_a_session_lost_while_the_executor_closes_sends_nothing_again(hashes):  # noqa: F811
    """w passed p to b, and b dialled again; w's executor closes, waiting for an input's hash
    (held); meanwhile the session p went over is lost. The executor used to send p again over
    the one left, its send's outcome awaited by nobody (a failure of it would be logged as
    "Future exception was never retrieved"). Now it sends nothing."""
    async with Net() as net:
        executor = await passed_to_b(net)
        b, first = net.nodes["b"], await b_dials_again(net)
        hashes.release.clear()
        await net.nodes["coord"].peers.request("w", big_keep("k"))
        await soon(lambda: executor.input_order.busy)
        closing = asyncio.ensure_future(executor.aclose())
        try:
            await soon(lambda: not executor.input_order.busy)  # closing: waits for the hash
            watches = _watches(executor)
            await first.stream.aclose()  # lost, as w sees it; b's second session stays
            await soon(lambda: _watches(executor) == watches - 1)
            heard = asyncio.Event()
            b.peers.on(AppData, lambda _peer, _msg: heard.set())
            await net.w.request("b", AppData(topic="after", payload=b""))  # behind any resend
            async with asyncio.timeout(WAIT_S):
                await heard.wait()
            assert b.assigned() == ["p"] and executor.stats.passed_again == 0
        finally:
            hashes.release.set()
            await closing
