"""The node's work per request on its event loop, and a work-sharing answer (session 27).

* An item passed to a peer, cancelled by its coordinator, then lost with that peer, is answered
  CANCELLED (not PEER_LOST, which asks for a re-run).
* A batch the batcher checked for NaN and infinity (request by request, so a bad one fails
  alone) is not checked again by the NumPy engine; a direct caller's batch still is. Large
  outputs are checked in the batcher's worker thread.
* A big input is neither cast nor hashed on the node's loop: the batcher converts it in its
  worker thread, and the input cache hashes it in its own, keeping its operations in message
  order (the coordinator's mirror of the cache depends on it).

Real peer tables and Noise sessions over the in-memory transport (the work-sharing tests'
:class:`~tests.test_executor_sharing.Net`), a real NumPy engine and batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading

import numpy as np
import pytest

from meshinfer.errors import InferenceError, NonFiniteInputError
from meshinfer.inference import batching, numpy_engine
from meshinfer.inference import cache as cache_module
from meshinfer.inference.batching import INLINE_MAX_BYTES, BatcherConfig, DynamicBatcher
from meshinfer.inference.cache import (
    KEEP_OFF_LOOP_BYTES,
    ContentCache,
    InputMirror,
    OrderedInputs,
    Send,
    content_digest,
)
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import ModelRegistry, synthetic_model
from meshinfer.inference.synthetic import SyntheticSpec, sample_inputs
from meshinfer.proto.membership import MemberEventKind
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
from tests.test_batching import EchoEngine
from tests.test_executor_sharing import (
    KEEPING,
    MODEL,
    REF,
    WAIT_S,
    Net,
    WorkerMesh,
    passed_to_b,
    soon,
)
from tests.test_sharing_faults import declare

#: One item at a time, never passed on, and an input cache that holds several MiB.
KEEPS = ExecutorSection(max_concurrent=1, offload_queue_depth=1000, input_cache_mib=16)
#: A model wide enough that one request of its rows is several MiB (a batch of 8,192 rows).
WIDE = SyntheticSpec(256, 1)
ROWS = 8192


class RecordingBatcher(DynamicBatcher):
    """A real batcher that notes the dtype of each request it is given, and on which thread
    each one is converted to the model's dtype and checked."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.given: list[np.dtype] = []
        self.converted: list[tuple[int, int]] = []  # (request bytes, thread id)

    async def submit(self, inputs, **kwargs):
        self.given.append(inputs.dtype)
        return await super().submit(inputs, **kwargs)

    def _model_input(self, batch, dtype):
        self.converted.append((batch.nbytes, threading.get_ident()))
        return super()._model_input(batch, dtype)


@contextlib.asynccontextmanager
async def wide_worker(config=KEEPING):
    """The work-sharing tests' ``Net`` (gate open), and ``w``'s executor serving :data:`WIDE`
    through a :class:`RecordingBatcher` that takes requests of :data:`ROWS` rows."""
    engine = NumpyEngine(ModelRegistry((synthetic_model(WIDE),)), max_batch_size=ROWS)
    batcher = RecordingBatcher(
        engine, WIDE.ref, BatcherConfig(max_batch_size=ROWS, max_queue_delay_s=0.0)
    )
    async with Net() as net:
        net.gate.set()
        await engine.load(WIDE.ref)
        await batcher.start()
        mesh = WorkerMesh("w", net.w, net.w.admission, net.members)
        executor = TaskExecutor(mesh, {WIDE.ref: batcher}, config)
        executor.start()
        net.executors.append(executor)
        try:
            yield net, executor, batcher
        finally:
            await executor.aclose()
            await batcher.aclose()
            await engine.aclose()


def wide_item(item_id: str, inputs: np.ndarray, **fields) -> TaskAssign:
    return TaskAssign(
        item_id, f"task-{item_id}", WIDE.ref.model_id, WIDE.ref.version,
        Tensor.from_array(inputs), encode_params({}), None, 0, 1, **fields,
    )  # fmt: skip


def answer(net: Net, item_id: str) -> TaskResult | TaskFailed | None:
    """The coordinator's answer to ``item_id``, once it has one."""
    answers = net.nodes["coord"].got
    kinds = TaskResult | TaskFailed
    return next((m for _, m in answers if isinstance(m, kinds) and m.item_id == item_id), None)


# --- an item cancelled, then its helper lost ---------------------------------------------------


@pytest.mark.parametrize("loss", ["dead", "session lost"])
async def test_an_item_passed_on_cancelled_then_its_helper_lost_is_answered_cancelled(loss):
    """w passed p to b, the coordinator cancelled p (the cancel went to b), then b is lost
    before answering: the coordinator hears CANCELLED, not a retryable PEER_LOST that would
    have it run p again."""
    async with Net() as net:
        executor = await passed_to_b(net)
        await net.nodes["coord"].peers.request("w", TaskCancel("p", "no longer wanted"))
        await soon(lambda: net.nodes["b"].cancels() == ["p"])
        if loss == "dead":
            declare(net, "b", MemberEventKind.DEAD)
        else:
            (session,) = net.nodes["b"].peers.open_sessions("w")
            await session.stream.aclose()
        coord = net.nodes["coord"]
        await soon(lambda: coord.failure("p") is not None)
        failed = coord.failure("p")
        assert (failed.code, failed.retryable) == (FailureKind.CANCELLED, False)
        assert "cancelled" in failed.message and executor.stats.handed_back == 0
        assert [a for a in coord.answers() if a[1] == "p"] == [("TaskFailed", "p", 1, "w")]


# --- a big input is not cast on the loop -----------------------------------------------------


async def test_a_big_input_reaches_its_batcher_as_sent_and_is_converted_off_the_loop():
    """A float16 input of 4 MiB: the node used to cast it to float32 on its loop (a copy of
    8 MiB) before the batcher converted it to the model's dtype again. Now the batcher is given
    the wire's float16 and converts it in its worker thread; the answer is the same."""
    inputs = sample_inputs(WIDE, ROWS).astype(np.float16)
    assert inputs.nbytes > INLINE_MAX_BYTES
    async with wide_worker() as (net, _executor, batcher):
        await net.nodes["coord"].peers.request("w", wide_item("big", inputs))
        await soon(lambda: answer(net, "big") is not None)
        result = answer(net, "big")
        assert isinstance(result, TaskResult), result
        assert batcher.given == [np.dtype(np.float16).newbyteorder("<")]
        loop_thread = threading.get_ident()
        assert batcher.converted and all(t != loop_thread for _, t in batcher.converted)
        expected = await batcher.engine.infer(WIDE.ref, inputs.astype(np.float32))
        np.testing.assert_allclose(result.output.to_array(), expected, rtol=1e-5, atol=1e-6)


async def test_a_small_input_is_still_converted_on_the_loop_and_answered():
    """The hot path: a small int32 input is converted by the batcher on the loop (no thread
    hand-off), as the model's float32."""
    inputs = np.arange(2 * WIDE.width, dtype=np.int32).reshape(2, -1) % 3
    async with wide_worker() as (net, _executor, batcher):
        await net.nodes["coord"].peers.request("w", wide_item("small", inputs))
        await soon(lambda: answer(net, "small") is not None)
        assert isinstance(answer(net, "small"), TaskResult)
        assert [t for _, t in batcher.converted] == [threading.get_ident()]


# --- a big input to keep is hashed off the loop, in message order -------------------------------


class HashSpy:
    """Stands in for ``cache.content_digest`` (and calls it): notes the size and thread of each
    hash, and holds a big one while :attr:`release` is clear (for up to :data:`WAIT_S`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, data: bytes) -> str:
        self.calls.append((len(data), threading.get_ident()))
        if len(data) > KEEP_OFF_LOOP_BYTES:
            self.release.wait(WAIT_S)
        return content_digest(data)


@pytest.fixture
def hashes(monkeypatch) -> HashSpy:
    spy = HashSpy()
    monkeypatch.setattr(cache_module, "content_digest", spy)
    return spy


async def test_a_big_input_to_keep_is_hashed_off_the_loop_and_found_by_the_next_reference(hashes):
    """A 2 MiB input the coordinator asks the node to keep is hashed in a worker thread (it
    took the loop about a millisecond per MiB), and an item naming it by reference right after
    finds it: the cache still sees the two in the order they came."""
    inputs = sample_inputs(WIDE, ROWS // 2).astype(np.float16)
    kept = wide_item("kept", inputs, keep_input=True)
    digest = content_digest(kept.input.data)
    async with wide_worker(KEEPS) as (net, executor, _batcher):
        coord = net.nodes["coord"].peers
        await coord.request("w", kept)
        await coord.request("w", by_reference(wide_item("by-ref", inputs), digest))
        await soon(lambda: answer(net, "kept") and answer(net, "by-ref"))
        assert isinstance(answer(net, "kept"), TaskResult)
        assert isinstance(answer(net, "by-ref"), TaskResult), answer(net, "by-ref")
        np.testing.assert_array_equal(
            answer(net, "kept").output.to_array(), answer(net, "by-ref").output.to_array()
        )
        big = [thread for size, thread in hashes.calls if size == len(kept.input.data)]
        assert big and threading.get_ident() not in big
        assert executor.inputs.stats.hits == 1 and digest in executor.inputs


async def test_references_wait_for_an_input_being_hashed_and_one_cancelled_meanwhile_is_not_run(
    hashes,
):
    """While the big input is being hashed (held here), two items name it by reference; the
    coordinator cancels the second. Once it is stored, the first runs on it and the second is
    answered CANCELLED without running."""
    inputs = sample_inputs(WIDE, ROWS // 2).astype(np.float16)
    kept = wide_item("kept", inputs, keep_input=True)
    digest = content_digest(kept.input.data)
    hashes.release.clear()
    async with wide_worker(KEEPS) as (net, executor, _batcher):
        coord = net.nodes["coord"].peers
        await coord.request("w", kept)
        for item_id in ("first", "second"):
            await coord.request("w", by_reference(wide_item(item_id, inputs), digest))
        await coord.request("w", TaskCancel("second", "no longer wanted"))
        await soon(lambda: executor.stats.cancelled == 1)  # (so both wait behind the hash)
        assert answer(net, "first") is None and answer(net, "second") is None
        hashes.release.set()
        await soon(lambda: all(answer(net, i) for i in ("kept", "first", "second")))
        assert isinstance(answer(net, "first"), TaskResult)
        failed = answer(net, "second")
        assert isinstance(failed, TaskFailed) and failed.code == FailureKind.CANCELLED
        assert executor.stats.completed == 2 and executor.inputs.stats.hits == 2


async def test_a_node_closing_while_an_input_is_hashed_drops_what_waits_and_answers_nothing(
    hashes,
):
    inputs = sample_inputs(WIDE, ROWS // 2).astype(np.float16)
    kept = wide_item("kept", inputs, keep_input=True)
    digest = content_digest(kept.input.data)
    hashes.release.clear()
    async with wide_worker(KEEPS) as (net, executor, _batcher):
        coord = net.nodes["coord"].peers
        await coord.request("w", kept)
        await coord.request("w", by_reference(wide_item("waits", inputs), digest))
        await soon(lambda: executor.input_order.busy and len(hashes.calls) == 1)
        closing = asyncio.ensure_future(executor.aclose())
        hashes.release.set()
        await closing
        assert digest not in executor.inputs and not executor.input_order.busy
        assert answer(net, "waits") is None


def test_an_ordered_cache_ends_as_its_mirror_says_whatever_is_hashed_in_the_thread():
    """Random keeps and fetches, some hashed in the thread (over 64 bytes here), some on the
    loop, some behind others: every fetch finds what the coordinator's mirror said it would
    (a reference) and the cache ends holding what the mirror holds, in the same LRU order."""
    rng = random.Random(27)
    contents = [bytes([i]) * rng.choice((16, 48, 100, 300)) for i in range(12)]

    async def run() -> None:
        cache = ContentCache(700)
        ordered, mirror = OrderedInputs(cache, off_loop_bytes=64), InputMirror(700)
        found: list[tuple[bool, bool]] = []
        for _ in range(300):
            data = rng.choice(contents)
            digest = content_digest(data)
            if mirror.send(digest, len(data)) is Send.REF:
                ordered.fetch(digest, lambda got, d=data: found.append((True, got == d)))
            else:
                ordered.keep(data)
            if rng.random() < 0.1:
                await ordered.settled()
        await ordered.settled()
        assert found and all(hit for _, hit in found)
        assert cache.digests() == mirror.digests()
        await ordered.aclose()

    asyncio.run(run())


# --- NaN and infinity: checked once, and large outputs off the loop ------------------------------


async def test_a_batch_from_the_batcher_is_not_checked_again_but_a_direct_callers_is(monkeypatch):
    """The batcher checks each request (a NaN row fails its own request, clearly); the engine
    used to check the joined batch again. It no longer does for the batch the batcher hands
    it, but still checks a batch given to ``infer`` directly."""
    engine_checks: list[int] = []
    check = numpy_engine.finite_float32

    def counted(batch):
        engine_checks.append(len(batch))
        return check(batch)

    monkeypatch.setattr(numpy_engine, "finite_float32", counted)
    engine = NumpyEngine(ModelRegistry((synthetic_model(MODEL),)))
    await engine.load(REF)
    async with DynamicBatcher(engine, REF, BatcherConfig(max_queue_delay_s=0.0)) as batcher:
        x = sample_inputs(MODEL, 4)
        through_batcher = await batcher.submit(x)
        assert engine_checks == []
        bad = x.copy()
        bad[2, 0] = np.nan
        with pytest.raises(NonFiniteInputError, match=r"1 of 4 rows .*\(first: \[2\]\)"):
            await batcher.submit(bad)
        with pytest.raises(NonFiniteInputError, match=r"1 of 4 rows"):
            await engine.infer(REF, bad)
        np.testing.assert_array_equal(await engine.infer(REF, x), through_batcher)
        assert engine_checks == [4, 4]
    await engine.aclose()


class NaNForBigInputs(EchoEngine):
    """Returns its batch, with NaN in each row whose first value is above 1."""

    async def infer(self, ref, batch):
        out = batch.astype(np.float32, copy=True)
        out[batch[:, 0] > 1] = np.nan
        return out


async def test_large_outputs_are_checked_off_the_loop_and_fail_only_their_request(monkeypatch):
    threads: list[int] = []
    finite_rows = batching._finite_rows

    def noted(outputs):
        threads.append(threading.get_ident())
        return finite_rows(outputs)

    monkeypatch.setattr(batching, "_finite_rows", noted)
    engine = NaNForBigInputs()
    async with DynamicBatcher(engine, REF, BatcherConfig(max_queue_delay_s=0.0)) as batcher:
        wide = np.ones((64, 8192), np.float32)  # 2 MiB in, 2 MiB out
        wide[5, 0] = 2.0
        with pytest.raises(InferenceError, match=r"NaN or infinity .* on 1 of the request's 64"):
            await batcher.submit(wide)
        small = await batcher.submit(np.ones((2, 3), np.float32))
        assert small.shape == (2, 3)
    loop_thread = threading.get_ident()
    assert len(threads) == 2 and threads[0] != loop_thread and threads[1] == loop_thread
