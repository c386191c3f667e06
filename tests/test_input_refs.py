"""Inputs by reference: a coordinator and real node daemons (TCP, Noise, mDNS, SQLite) in this
process. An input a node keeps goes to it again as its sha256 alone; a reference the node no
longer holds is answered ``INPUT_NOT_CACHED`` and the same attempt goes again with the bytes.
The same answer to an item sent with its bytes is an ordinary retryable failure."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from types import SimpleNamespace

import numpy as np

import coordinator.input_refs
import coordinator.runs
from coordinator.input_refs import InputRefs
from coordinator.runs import ItemRun, TaskRun
from coordinator.service import CoordinatorConfig, CoordinatorStats
from meshinfer.inference.base import ModelRef
from meshinfer.inference.cache import content_digest
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.tasks_wire import (
    FailureKind,
    TaskAssign,
    TaskFailed,
    Tensor,
    TensorRef,
    by_reference,
    encode_params,
)
from node.http import node_families, node_status
from tests.helpers import until
from tests.test_coordinator_service import DIGITS, Mesh, hold_inference, spec

#: Small enough for the digits inputs below (20 rows of 64 float32: 5,120 bytes).
CONFIG = CoordinatorConfig(item_timeout_s=5.0, input_ref_min_bytes=4096)


def _large_frame() -> np.ndarray:
    """1,024 rows of digits: 256 KiB, large enough to be hashed in a worker thread."""
    return np.tile(load_digits_holdout()[0][:64], (16, 1))


class ForgetfulNode:
    """Stands in for a daemon's executor: answers every item ``INPUT_NOT_CACHED``, even one
    that came with its bytes (as a node that lost them before running it, or a buggy one)."""

    def __init__(self, daemon) -> None:
        self.peers = daemon.mesh.peers
        self.assigns: list[TaskAssign] = []
        self.peers.on(TaskAssign, self._on_assign)

    def _on_assign(self, peer: str, msg: TaskAssign) -> None:
        self.assigns.append(msg)
        code = int(FailureKind.INPUT_NOT_CACHED)
        self.peers.send(peer, TaskFailed(msg.item_id, msg.attempt, code, "input lost", True))

    def sends(self) -> list[tuple[int, bool]]:
        """(attempt, by reference) of each item received, in order."""
        return [(msg.attempt, msg.input_ref is not None) for msg in self.assigns]


async def _labels(c, task) -> list[int]:
    return await _labels_of(c, await c.submit(task))


async def _labels_of(c, task_id: str) -> list[int]:
    record = await c.wait(task_id, timeout=10)
    assert record.state.value == "succeeded", record.summary.error
    assert [i.attempt for i in record.items] == [1] * len(record.items)  # nothing was retried
    return c.result_of(record)["labels"]


@asynccontextmanager
async def after_a_first_task(tmp_path, config=CONFIG):
    """One node that ran a first task ("a") on a 20-row frame, so it holds that input: yields
    the coordinator, the node daemon, the frame and the task's labels."""
    frame = load_digits_holdout()[0][:20]
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        c = mesh.coordinator
        yield c, mesh.daemons["node-0"], frame, await _labels(c, spec("a", "single", frame))


async def test_a_repeated_input_goes_by_reference_and_gives_the_same_answer(tmp_path):
    x, _ = load_digits_holdout()
    frame = x[:20]
    async with Mesh(tmp_path, n=1, config=CONFIG) as mesh:
        c, node = mesh.coordinator, mesh.daemons["node-0"]
        assert node.mesh.membership.state.input_cache_mb == 256  # the default, gossiped
        first = await _labels(c, spec("a", "single", frame))
        assert (c.stats_.inputs_by_reference, node.executor.inputs.stats.items) == (0, 1)
        second = await _labels(c, spec("b", "single", frame))
        assert second == first
        assert c.stats_.inputs_by_reference == 1
        assert c.stats_.input_bytes_saved == frame.nbytes
        assert node.executor.inputs.stats.hits == 1
        other = await _labels(c, spec("c", "single", x[20:40]))  # new bytes: sent, and kept
        assert other != first and c.stats_.inputs_by_reference == 1
        assert c.stats_.input_cache_misses == 0
        stats = await c.stats()
        assert stats["inputs_by_reference"] == 1 and stats["input_bytes_saved"] == frame.nbytes
        cache = node_status(node)["executor"]["input_cache"]
        assert (cache["items"], cache["hits"], cache["budget_bytes"]) == (2, 1, 256 << 20)
        metrics = {(f.name, sample.labels): sample.value for f in node_families(node)
                   for sample in f.samples}  # fmt: skip
        assert metrics[("meshinfer_input_cache_lookups_total", (("result", "hit"),))] == 1
        assert metrics[("meshinfer_input_cache_bytes", ())] == frame.nbytes * 2


async def test_a_parallel_tasks_models_share_one_copy_of_the_input(tmp_path):
    x, _ = load_digits_holdout()
    models = (DIGITS, ModelRef("synthetic-mlp", "w64-d2"))
    extra = '[inference]\nmodels = ["digits-mlp@1", "synthetic-mlp@w64-d2"]\n'
    async with Mesh(tmp_path, n=1, config=CONFIG, extra=extra) as mesh:
        c, node = mesh.coordinator, mesh.daemons["node-0"]
        task = spec("par", "parallel", x[:20], models=models, aggregation="all")
        record = await c.wait(await c.submit(task), timeout=15)
        assert record.state.value == "succeeded", record.summary.error
        assert len(c.result_of(record)["aggregation"]["sources"]) == 2
        assert c.stats_.inputs_by_reference == 1  # the second model's item named the first's
        assert node.executor.inputs.stats.hits == 1


async def test_a_reference_the_node_no_longer_holds_is_sent_again_with_the_bytes(tmp_path):
    async with after_a_first_task(tmp_path) as (c, node, frame, first):
        assert node.executor.inputs.discard(content_digest(frame.tobytes()))  # e.g. evicted
        assert await _labels(c, spec("b", "single", frame)) == first  # attempt 1 still
        assert node.executor.stats.failed["input_not_cached"] == 1
        assert (c.stats_.input_cache_misses, c.stats_.retries) == (1, 0)
        assert c.stats_.input_bytes_saved == 0  # b's reference missed: its bytes went after all
        assert await _labels(c, spec("c", "single", frame)) == first
        assert c.stats_.inputs_by_reference == 2  # b's first send and c's
        assert node.executor.inputs.stats.hits == 1  # c's: the bytes went again with b


async def test_a_node_without_an_input_cache_and_small_inputs_get_the_bytes(tmp_path):
    x, _ = load_digits_holdout()
    extra = "[executor]\ninput_cache_mib = 0\n"
    async with Mesh(tmp_path, n=1, config=CONFIG, extra=extra) as mesh:
        c, node = mesh.coordinator, mesh.daemons["node-0"]
        assert node.mesh.membership.state.input_cache_mb == 0
        for task_id in ("a", "b"):
            await _labels(c, spec(task_id, "single", x[:20]))
        assert c.stats_.inputs_by_reference == 0 and len(node.executor.inputs) == 0
    async with Mesh(tmp_path / "small", n=1, config=CONFIG) as mesh:
        c, node = mesh.coordinator, mesh.daemons["node-0"]
        for task_id in ("a", "b"):
            await _labels(c, spec(task_id, "single", x[:10]))  # 2,560 bytes: under 4 KiB
        assert c.stats_.inputs_by_reference == 0 and len(node.executor.inputs) == 0


async def test_a_node_answers_bad_references_without_running_anything(tmp_path):
    x, _ = load_digits_holdout()
    frame = Tensor.from_array(x[:20])
    async with Mesh(tmp_path, n=1, config=CONFIG) as mesh:
        node = mesh.daemons["node-0"]
        executor = node.executor
        plain = TaskAssign("t/0", "t", "digits-mlp", "1", frame, encode_params({}), None, 0, 1)
        digest = content_digest(frame.data)
        send = mesh.mesh.peers.send
        # a reference to bytes the node never saw
        assert send(node.node_id, by_reference(plain, digest))
        await until(lambda: executor.stats.failed["input_not_cached"] == 1)
        # kept, then named with a shape its bytes do not fit
        executor.inputs.put(frame.data)
        misfit = TensorRef(digest, "float32", (10, 64))
        wrong = replace(by_reference(plain, digest), input_ref=misfit)
        assert send(node.node_id, wrong)
        await until(lambda: executor.stats.failed["bad_input"] == 1)
        assert executor.stats.accepted == 0 and executor.stats.completed == 0
        assert executor.inputs.get(digest) == frame.data  # the cache is intact


async def test_an_item_named_by_reference_is_offloaded_with_its_bytes(tmp_path):
    x, _ = load_digits_holdout()
    frame, other = x[:20], x[20:40]
    extra = "[executor]\nmax_concurrent = 1\noffload_queue_depth = 1\n"
    async with Mesh(tmp_path, n=2, config=CONFIG, extra=extra) as mesh:
        c = mesh.coordinator
        gates = {name: hold_inference(d) for name, d in mesh.daemons.items()}

        def busy() -> set[str]:
            return {n["node_id"] for n in c.nodes() if n["in_flight"]}

        held = await c.submit(spec("a", "single", frame, policy="round_robin"))  # kept there
        await until(lambda: len(busy()) == 1)
        (first,) = busy()
        (second,) = set(mesh.names) - {first}
        gates[second].set()
        await _labels(c, spec("b", "single", other, policy="round_robin"))  # on `second`
        # round robin sends c to `first` by reference; its backlog (a, held) makes it offload
        # c to `second`, which never saw this frame: it must get the bytes
        labels = await _labels(c, spec("c", "single", frame, policy="round_robin"))
        gates[first].set()
        assert await _labels_of(c, held) == labels
        first_ex, second_ex = mesh.daemons[first].executor, mesh.daemons[second].executor
        assert first_ex.stats.offloaded == 1 and first_ex.inputs.stats.hits == 1
        assert c.stats_.inputs_by_reference == 1 and c.stats_.input_cache_misses == 0
        assert second_ex.stats.failed["input_not_cached"] == 0


async def test_an_item_sent_with_its_bytes_and_answered_not_cached_is_retried_elsewhere(tmp_path):
    """Not a reference that missed (nothing to resend): an ordinary retry, on another node."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2, config=CONFIG) as mesh:
        c = mesh.coordinator
        forgetful = ForgetfulNode(mesh.daemons["node-0"])  # round robin's first choice
        task = spec("a", "single", x[:20], policy="round_robin")
        record = await c.wait(await c.submit(task), timeout=10)
        assert record.state.value == "succeeded", record.summary.error
        assert forgetful.sends() == [(1, False)]  # the bytes went, and were "not cached"
        assert (record.items[0].node, record.items[0].attempt) == ("node-1", 2)
        assert c.stats_.retries == 1
        assert (c.stats_.input_cache_misses, c.stats_.inputs_by_reference) == (0, 0)


async def test_a_node_that_never_has_the_input_fails_the_item_after_max_attempts(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=CONFIG) as mesh:
        c = mesh.coordinator
        forgetful = ForgetfulNode(mesh.daemons["node-0"])
        record = await c.wait(await c.submit(spec("a", "single", x[:20])), timeout=10)
        assert record.state.value == "failed"
        attempts = CONFIG.max_attempts
        assert f"gave up after {attempts} attempts; last: node-0: input lost" in (
            record.summary.error
        )
        sends = forgetful.sends()
        # each attempt went with the bytes: the node's "not cached" answer to the bytes made
        # the coordinator forget that it keeps them, so no retry named them by reference
        assert sends == [(attempt, False) for attempt in range(1, attempts + 1)]
        assert c.stats_.retries == attempts - 1
        assert c.stats_.input_cache_misses == c.stats_.inputs_by_reference == 0
        assert c.stats_.input_bytes_saved == 0
        # nothing more went for it: the next task's items come after its last on the session
        await c.wait(await c.submit(spec("b", "single", x[:10])), timeout=10)
        assert [m.task_id for m in forgetful.assigns[len(sends) :]] == ["b"] * attempts


async def test_after_a_lost_session_an_input_goes_with_its_bytes_once_more(tmp_path):
    async with after_a_first_task(tmp_path) as (c, node, frame, first):
        lost = node.mesh.peers.session(c.node_id)
        await lost.stream.aclose()  # no Close frame: what was queued on it may be gone
        await until(lambda: c.stats_.sessions_lost == 1)
        assert await _labels(c, spec("b", "single", frame)) == first
        assert c.stats_.inputs_by_reference == 0  # its mirror started again: bytes, kept
        assert await _labels(c, spec("c", "single", frame)) == first
        assert (c.stats_.inputs_by_reference, c.stats_.input_cache_misses) == (1, 0)


async def test_a_reference_the_peer_table_refuses_is_not_counted_and_the_item_goes_again(
    tmp_path,
):
    """The peer table refuses the item that names its input by reference (as a full outbox
    would): nothing was saved, and the retry goes with the bytes (the mirror started again)."""
    async with after_a_first_task(tmp_path) as (c, _, frame, first):
        peers, refused = c.mesh.peers, []
        send = peers.send

        def refusing_send(node, msg, **kw):
            if isinstance(msg, TaskAssign) and msg.input_ref is not None and not refused:
                refused.append(msg.item_id)
                return False
            return send(node, msg, **kw)

        peers.send = refusing_send
        task_id = await c.submit(spec("b", "single", frame))
        record = await c.wait(task_id, timeout=10)
        assert record.state.value == "succeeded" and c.result_of(record)["labels"] == first
        assert refused == ["b/0"] and [i.attempt for i in record.items] == [2]
        assert (c.stats_.inputs_by_reference, c.stats_.input_bytes_saved) == (0, 0)


async def test_a_late_not_cached_answer_to_a_reference_resent_with_its_bytes_is_no_failure(
    tmp_path,
):
    """An item went by reference; its session was lost, and after the re-dial the item went
    again with its bytes (same attempt). The node's INPUT_NOT_CACHED answer to the reference
    (it arrives after the resend) is not taken for a failure of the copy with the bytes: the
    item is not retried, and the node's one result ends it."""
    # The node must count as reachable again (a re-dial) and the item must not time out: at
    # CONFIG's 5 s item timeout and the default 0.25 s re-dial deadline, a loaded machine could
    # retry the item (attempt 2) instead of resending it. Neither deadline is what is tested.
    patient = replace(CONFIG, item_timeout_s=120.0, redial_timeout_s=30.0)
    async with after_a_first_task(tmp_path, patient) as (c, node, frame, first):
        gate = hold_inference(node)
        task_id = await c.submit(spec("b", "single", frame))
        await until(lambda: node.executor.running == 1)
        assert c.stats_.inputs_by_reference == 1
        lost = node.mesh.peers.session(c.node_id)
        await lost.stream.aclose()  # no Close frame
        await until(lambda: c.stats_.resent_after_redial == 1)
        late = TaskFailed("b/0", 1, int(FailureKind.INPUT_NOT_CACHED), "not cached", True)
        await node.mesh.peers.request(c.node_id, late)  # before the result, on the same session
        gate.set()
        record = await c.wait(task_id, timeout=10)
        assert record.state.value == "succeeded" and c.result_of(record)["labels"] == first
        assert [i.attempt for i in record.items] == [1] and c.stats_.retries == 0


# --- the coordinator's bookkeeping alone (coordinator.input_refs) ------------------------------


class _Members:
    """What InputRefs reads of membership: a member's incarnation and input cache budget."""

    def __init__(self, **cache_mb: int) -> None:
        self.cache_mb = cache_mb
        self.incarnation = 1

    def member(self, node: str):
        if node not in self.cache_mb:
            return None
        state = SimpleNamespace(input_cache_mb=self.cache_mb[node])
        return SimpleNamespace(state=state, record=SimpleNamespace(incarnation=self.incarnation))

    def live_members(self) -> list:
        return [self.member(node) for node in self.cache_mb]


def _refs(members: _Members, min_bytes: int = 4096) -> tuple[InputRefs, CoordinatorStats]:
    stats = CoordinatorStats()
    mesh = SimpleNamespace(membership=SimpleNamespace(core=members))
    return InputRefs(mesh, min_bytes, stats), stats


def _item_of(x) -> tuple[TaskRun, ItemRun]:
    run = TaskRun(spec("t", "single", x), default_aggregation="all", now=0.0)
    return run, ItemRun(run.ready()[0])


def test_a_reference_is_counted_only_once_its_message_was_queued():
    x, _y = load_digits_holdout()
    refs, stats = _refs(_Members(n=1))
    run, entry = _item_of(x[:20])
    first = refs.message(run, entry, "n", entry.item.to_message())
    assert first.keep_input and first.input_ref is None
    refs.queued(entry)
    again = refs.message(run, entry, "n", entry.item.to_message())
    assert again.input_ref is not None and entry.by_reference
    assert stats.inputs_by_reference == 0  # made, not queued (the peer table refused it)
    refs.queued(entry)
    size = len(entry.item.input.data)
    assert (stats.inputs_by_reference, stats.input_bytes_saved) == (1, size)
    refs.missed("n", entry)  # the node did not hold it: the bytes go after all
    assert (stats.input_cache_misses, stats.input_bytes_saved) == (1, 0)
    assert refs.message(run, entry, "n", entry.item.to_message()).input_ref is None


def test_a_node_restarted_or_forgotten_starts_from_an_empty_mirror():
    x, _y = load_digits_holdout()
    members = _Members(n=1, plain=0)
    refs, _stats = _refs(members)
    run, entry = _item_of(x[:20])
    refs.message(run, entry, "n", entry.item.to_message())
    assert refs.message(run, entry, "n", entry.item.to_message()).input_ref is not None
    members.incarnation += 1  # restarted: its cache is empty
    assert refs.message(run, entry, "n", entry.item.to_message()).input_ref is None
    refs.forget_node("n")  # e.g. its session was lost
    assert refs.message(run, entry, "n", entry.item.to_message()).input_ref is None
    plain = refs.message(run, entry, "plain", entry.item.to_message())  # keeps no inputs
    assert plain.input_ref is None and not plain.keep_input
    small = _item_of(x[:2])  # 512 bytes: under min_bytes
    assert not refs.message(*small, "n", small[1].item.to_message()).keep_input


def _parallel_items_of(x) -> tuple[TaskRun, list[ItemRun]]:
    models = (DIGITS, ModelRef("synthetic-mlp", "w64-d2"))
    task = spec("p", "parallel", x, models=models, aggregation="all")
    run = TaskRun(task, default_aggregation="all", now=0.0)
    return run, [ItemRun(item) for item in run.ready()]


# --- hashing a large input off the loop -------------------------------------------------------


class _HeldHash:
    """Stands in for ``content_digest`` in the coordinator: each call, in whatever thread runs
    it, waits for ``release`` (a threading.Event) before it hashes."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.finished = threading.Event()
        self.calls = 0

    def __call__(self, data: bytes) -> str:
        self.calls += 1
        self.started.set()
        self.release.wait(10)
        self.finished.set()
        return content_digest(data)


def _hash_that_needs_the_loop(loop: asyncio.AbstractEventLoop, answered: list[bool]):
    """``content_digest`` that, for a large input, has the loop run a callback and waits for it
    (5 s at most) before it hashes; ``answered`` gets whether the loop ran it. Run on the loop
    itself, it blocks the loop and waits in vain."""

    def digest(data: bytes) -> str:
        if len(data) >= _large_frame().nbytes:
            ran = threading.Event()
            loop.call_soon_threadsafe(ran.set)
            answered.append(ran.wait(5))
        return content_digest(data)

    return digest


def _patch_hash(monkeypatch, digest) -> None:
    for module in (coordinator.runs, coordinator.input_refs):
        monkeypatch.setattr(module, "content_digest", digest, raising=False)


async def test_a_large_input_is_hashed_while_the_loop_runs_on_and_then_goes_by_reference(
    tmp_path, monkeypatch
):
    frame = _large_frame()
    answered: list[bool] = []
    async with Mesh(tmp_path, n=1, config=CONFIG) as mesh:
        c, node = mesh.coordinator, mesh.daemons["node-0"]
        _patch_hash(monkeypatch, _hash_that_needs_the_loop(asyncio.get_running_loop(), answered))
        first = await _labels(c, spec("a", "single", frame))
        assert answered == [True]  # the loop ran a callback while the input was hashed
        assert node.executor.inputs.stats.items == 1  # sent with keep_input: its digest was known
        assert await _labels(c, spec("b", "single", frame)) == first
        assert answered == [True, True]
        assert (c.stats_.inputs_by_reference, c.stats_.input_bytes_saved) == (1, frame.nbytes)
        assert node.executor.inputs.stats.hits == 1 and c.stats_.input_cache_misses == 0


async def test_an_item_is_queued_once_its_large_input_is_hashed_in_a_worker_thread(monkeypatch):
    held = _HeldHash()
    _patch_hash(monkeypatch, held)
    refs, _stats = _refs(_Members(n=1))
    run, entry = _item_of(_large_frame())
    data, queued = entry.item.input.data, []
    refs.when_hashed(run, entry, queued.append, "t/0")
    await until(held.started.is_set)  # polled on the loop: it runs while the thread hashes
    assert held.started.is_set() and not held.finished.is_set()
    assert queued == [] and run.known_digest(data) is None
    held.release.set()
    await until(lambda: queued)
    assert queued == ["t/0"] and held.calls == 1
    assert run.known_digest(data) == content_digest(data)
    first = refs.message(run, entry, "n", entry.item.to_message())
    assert first.keep_input and first.input_ref is None
    refs.queued(entry)
    again = refs.message(run, entry, "n", entry.item.to_message())
    assert again.input_ref.digest == content_digest(data) and held.calls == 1


async def test_items_sharing_a_large_input_share_one_hash_and_small_inputs_take_no_thread(
    monkeypatch,
):
    held = _HeldHash()
    held.release.set()
    _patch_hash(monkeypatch, held)
    refs, _stats = _refs(_Members(n=1))
    run, items = _parallel_items_of(_large_frame())
    queued: list[str] = []
    for entry in items:
        refs.when_hashed(run, entry, queued.append, entry.item.item_id)
    await until(lambda: len(queued) == 2)
    assert held.calls == 1 and sorted(queued) == sorted(e.item.item_id for e in items)
    x = load_digits_holdout()[0]
    small = _item_of(x[:20])  # 5,120 bytes: may go by reference, hashed on the loop if so
    refs.when_hashed(*small, queued.append, "small")
    off = _refs(_Members(n=1), min_bytes=0)[0]  # no references at all: nothing to hash
    off.when_hashed(*_item_of(_large_frame()), queued.append, "off")
    assert queued[2:] == ["small", "off"] and held.calls == 1  # at once, no hop to a thread
    assert small[0].known_digest(small[1].item.input.data) is None


async def test_large_inputs_are_queued_in_the_order_asked_and_not_hashed_if_nobody_keeps_any(
    monkeypatch,
):
    """Three large inputs, the first asked hashing longest: their items are queued in the
    order asked (one hashing thread). With no member keeping inputs nothing is hashed."""
    calls = itertools.count()

    def first_slowest(data: bytes) -> str:
        time.sleep(0.03 * (3 - next(calls)))
        return content_digest(data)

    _patch_hash(monkeypatch, first_slowest)
    refs, _stats = _refs(_Members(n=1))
    queued: list[object] = []
    for i in range(3):
        refs.when_hashed(*_item_of(_large_frame()), queued.append, i)
    await until(lambda: len(queued) == 3)
    assert queued == [0, 1, 2]
    nobody = _refs(_Members())[0]
    nobody.when_hashed(*_item_of(_large_frame()), queued.append, "nobody keeps inputs")
    assert queued[3:] == ["nobody keeps inputs"] and next(calls) == 3  # at once, not hashed
    await refs.aclose()


def test_a_large_input_whose_digest_is_not_known_at_its_send_goes_with_its_bytes_unkept():
    refs, _stats = _refs(_Members(n=1))
    run, entry = _item_of(_large_frame())  # not queued through when_hashed
    data = entry.item.input.data
    msg = refs.message(run, entry, "n", entry.item.to_message())
    assert msg == entry.item.to_message()  # the bytes, no keep_input: the node keeps nothing
    assert not entry.by_reference and len(refs.mirror("n")) == 0 and not entry.digest
    run.remember_digest(data, content_digest(data))  # the hash came in later
    assert refs.message(run, entry, "n", entry.item.to_message()).keep_input
    refs.queued(entry)
    assert refs.message(run, entry, "n", entry.item.to_message()).input_ref is not None


async def test_closing_while_an_input_is_hashed_waits_for_the_hash_and_queues_nothing(
    monkeypatch,
):
    held = _HeldHash()
    _patch_hash(monkeypatch, held)
    refs, _stats = _refs(_Members(n=1))
    run, entry = _item_of(_large_frame())
    queued: list[int] = []
    refs.when_hashed(run, entry, queued.append, 1)
    await until(held.started.is_set)
    closing = asyncio.create_task(refs.aclose())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not closing.done()  # the hash under way holds it
    held.release.set()
    await closing
    assert held.finished.is_set() and queued == []  # the thread is done; nothing was queued
    refs.when_hashed(run, entry, queued.append, 2)  # closed: at once, no thread
    assert queued == [2] and held.calls == 1
    await refs.aclose()  # idempotent


async def test_a_task_cancelled_or_a_coordinator_closed_while_hashing_sends_nothing(
    tmp_path, monkeypatch
):
    frame = _large_frame()
    async with Mesh(tmp_path, n=1, config=CONFIG) as mesh:
        c, node = mesh.coordinator, mesh.daemons["node-0"]
        held = _HeldHash()
        _patch_hash(monkeypatch, held)
        task_id = await c.submit(spec("a", "single", frame))  # journaled; its item waits
        await until(held.started.is_set)
        assert c.waiting(task_id) == {"a/0": "its input is being hashed (to be sent by reference)"}
        assert await c.cancel(task_id)
        held.release.set()
        await until(held.finished.is_set)
        await _labels(c, spec("b", "single", frame[:20]))  # after a's item was let go
        assert node.executor.stats.accepted == 1  # b's item alone
        held = _HeldHash()
        _patch_hash(monkeypatch, held)
        await c.submit(spec("c", "single", frame))
        await until(held.started.is_set)
        closing = asyncio.create_task(c.aclose())
        for _ in range(3):
            await asyncio.sleep(0)
        held.release.set()
        await closing
        assert held.finished.is_set() and node.executor.stats.accepted == 1
