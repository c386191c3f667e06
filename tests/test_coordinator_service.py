"""The coordinator with real node daemons (in this process): real TCP, Noise, mDNS, SQLite.

Multi-process variants (SIGKILL of nodes and of the coordinator) are in
``test_coordinator_processes.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import secrets
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from coordinator import runs
from coordinator.journal import Journal, TaskRecord, UnknownTaskError
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.errors import ConfigError
from meshinfer.identity_files import NodeDirectory, replace_file
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.membership_table import MemberStatus
from meshinfer.proto.messages import Gossip
from meshinfer.proto.tasks import Pattern, Stage, TaskSpec
from meshinfer.proto.tasks_wire import FailureKind, TaskAccepted, TaskFailed, Tensor
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.runtime.revocations import RevocationSyncConfig
from meshinfer.testing.cluster import LocalCluster
from node.config import load_config
from node.daemon import NodeDaemon
from tests.helpers import until

DIGITS = ModelRef("digits-mlp", "1")


class Mesh:
    """A coordinator and ``n`` node daemons, all in this process."""

    def __init__(self, tmp, n=2, config=None, extra="", options=None, http=False):
        # a fleet of its own: loopback mDNS reaches every process on this host, and two test
        # runs' nodes of one fleet id (node-0...) would find, and dial, each other
        self.cluster = LocalCluster(tmp, fleet_id=f"coord-test-{secrets.token_hex(4)}")
        self.names = [f"node-{i}" for i in range(n)]
        http_section = f"[http]\nenabled = {str(http).lower()}\n"
        self.configs = [
            self.cluster.add_node(name, extra=http_section + extra) for name in self.names
        ]
        coord_dir = self.cluster.enroll("coord", roles=("coordinator",))
        self.coord_ident = NodeDirectory(coord_dir).load()
        self.coord_dir = coord_dir
        self.tmp = tmp
        self.config = config or CoordinatorConfig(item_timeout_s=5.0)
        self.options = options or {}  # more MeshNodeOptions for the coordinator's node
        self.daemons: dict[str, NodeDaemon] = {}

    async def __aenter__(self):
        for name, cfg in zip(self.names, self.configs, strict=True):
            daemon = NodeDaemon(load_config(cfg), rng=random.Random(name))
            await daemon.start()
            self.daemons[name] = daemon
        opts = MeshNodeOptions(
            mdns=MdnsConfig.loopback(), membership=MembershipConfig.test(), **self.options
        )
        revocations = NodeDirectory(self.coord_dir).revocations(self.coord_ident.trust)
        self.mesh = MeshNode(self.coord_ident, revocations, opts)
        await self.mesh.start()
        self.coordinator = Coordinator(self.mesh, self.tmp / "journal.db", self.config)
        await self.coordinator.start()
        await until(lambda: len(self._with_models()) == len(self.names))
        return self

    def _with_models(self):
        return [n for n in self.coordinator.nodes() if n["models"] and n["status"] == "alive"]

    async def __aexit__(self, *exc):
        await self.coordinator.aclose()
        await self.mesh.aclose()
        for daemon in self.daemons.values():
            await daemon.aclose()


def hold_inference(
    daemon: NodeDaemon, gate: asyncio.Event | None = None, *, only: str | None = None
) -> asyncio.Event:
    """Make ``daemon``'s engine wait for ``gate`` (a new event if None; returned) before each
    inference (of model ``only``, if given): its items stay running until the test sets it."""
    if gate is None:
        gate = asyncio.Event()
    original = daemon.engine.infer

    async def held(ref, batch):
        if only is None or ref.model_id == only:
            await gate.wait()
        return await original(ref, batch)

    daemon.engine.infer = held
    return gate


def set_draining(mesh: Mesh, draining: bool) -> None:
    """Every node refuses new items with SHUTTING_DOWN (still gossiping its models), or not."""
    for daemon in mesh.daemons.values():
        daemon.executor._draining = draining


async def restarted_as_if_accepted_ago(mesh: Mesh, seconds: float) -> Coordinator:
    """Close ``mesh``'s coordinator, move every task's acceptance ``seconds`` back in its
    journal, and start a new coordinator on it (the mesh's from then on)."""
    await mesh.coordinator.aclose()
    with sqlite3.connect(mesh.tmp / "journal.db") as db:
        db.execute("UPDATE tasks SET created_at = created_at - ?", (seconds,))
    db.close()
    mesh.coordinator = Coordinator(mesh.mesh, mesh.tmp / "journal.db", mesh.config)
    await mesh.coordinator.start()
    return mesh.coordinator


def spec(task_id, pattern, x, models=(DIGITS,), **kw) -> TaskSpec:
    return TaskSpec(task_id, Pattern(pattern), Tensor.from_array(x), tuple(models), **kw)


async def test_single_task_returns_the_models_answer(tmp_path):
    x, _y = load_digits_holdout()
    async with Mesh(tmp_path) as mesh:
        c = mesh.coordinator
        task_id = await c.submit(spec("one", "single", x[:5]))
        record = await c.wait(task_id, timeout=10)
        assert record.state.value == "succeeded"
        result = c.result_of(record)
        engine = mesh.daemons["node-0"].engine
        expected = np.argmax(await engine.infer(DIGITS, x[:5]), axis=1)
        assert result["labels"] == expected.tolist()


async def test_batch_is_sharded_across_nodes_and_accurate(tmp_path):
    x, y = load_digits_holdout()
    async with Mesh(tmp_path, n=3) as mesh:
        c = mesh.coordinator
        task_id = await c.submit(spec("batch", "batch", x, shard_size=20, policy="round_robin"))
        record = await c.wait(task_id, timeout=20)
        assert record.state.value == "succeeded", record.summary.error
        labels = np.array(c.result_of(record)["labels"])
        assert labels.shape == y.shape
        assert (labels == y).mean() >= 0.95
        workers = {i.node for i in record.items}
        assert workers == set(mesh.names)  # round robin used every node


async def test_a_batch_larger_than_the_nodes_slots_waits_without_rescheduling_every_item(
    tmp_path,
):
    x, y = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=30, max_in_flight_per_node=2)
    async with Mesh(tmp_path, n=2, config=config) as mesh:
        c = mesh.coordinator
        choose, tries = c._choose, []

        def counting(run, entry):  # and the per-node counts kept in step with the items
            tries.append(entry.item.item_id)
            assert c._busy == Counter(i.node for _, i in c._items.values() if i.node)
            assert max(c._busy.values(), default=0) <= 2
            return choose(run, entry)

        c._choose = counting
        task_id = await c.submit(spec("wide", "batch", x[:120], shard_size=1))
        record = await c.wait(task_id, timeout=60)
        assert record.state.value == "succeeded", record.summary.error
        assert (np.array(c.result_of(record)["labels"]) == y[:120]).mean() >= 0.9
        # each of the 120 items is tried once, plus a few retries per freed slot; retrying
        # every parked item on every result would take thousands
        assert len(tries) <= 3 * 120, len(tries)
        assert not c._busy and not c._parked and (await c.stats())["parked_items"] == 0


#: One item at a time per node: what else is submitted waits parked.
ONE_SLOT = CoordinatorConfig(item_timeout_s=30, max_in_flight_per_node=1)


async def take_the_only_slot(mesh: Mesh, x: np.ndarray) -> tuple[asyncio.Event, str]:
    """Submit task "busy", held on node-0 until the returned gate is set."""
    c = mesh.coordinator
    gate = hold_inference(mesh.daemons["node-0"])
    busy = await c.submit(spec("busy", "single", x[:1]))
    await until(lambda: sum(c._busy.values()) == 1)
    return gate, busy


async def test_a_parked_class_that_fits_nowhere_holds_back_no_other_task(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=ONE_SLOT) as mesh:
        c = mesh.coordinator
        gate, busy = await take_the_only_slot(mesh, x)
        gpu = spec("gpu", "single", x[:1], priority=10, params={"requires_gpu": True})
        await c.submit(gpu)  # first in line, but no node has a GPU
        low = await c.submit(spec("low", "single", x[:1], priority=0))
        await until(lambda: sum(map(len, c._parked.values())) == 2)
        model = f"{DIGITS.model_id}@{DIGITS.version}"
        no_gpu = f"no live node serving {model} (1) has what the item asks for: a GPU"
        assert list(c.waiting("gpu").values()) == [no_gpu]
        full = "every node that can run it (1) has its limit of items in flight"
        assert list(c.waiting(low).values()) == [full]
        assert c.waiting(busy) == {}  # on a node
        gate.set()
        assert (await c.wait(busy, timeout=10)).state.value == "succeeded"
        assert (await c.wait(low, timeout=10)).state.value == "succeeded"
        assert (await c.get("gpu")).state.value == "pending"  # still waiting for a GPU node
        assert (await c.stats())["parked_items"] == 1
        assert list(c.waiting("gpu").values()) == [no_gpu] and c.waiting(low) == {}


async def test_a_timeout_as_the_result_arrives_loses_neither_the_result_nor_the_journal(
    tmp_path,
):
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=30, running_mark_delay_s=60.0)  # no overdue mark
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        c = mesh.coordinator
        accept, fired = c._accept_result, []

        async def racing(peer, msg):  # the item's timer falls due in the result's loop turn
            if not fired:
                fired.append(msg.item_id)
                c._on_timeout(msg.item_id, msg.attempt)
            await accept(peer, msg)

        c._accept_result = racing
        record = await c.wait(await c.submit(spec("race", "single", x[:1])), timeout=15)
        assert fired and record.state.value == "succeeded", record.summary.error
        history = [e.kind for e in await c._db.run("history", "race")]
        assert history[:4] == ["submitted", "dispatched", "retry", "result"]
        assert (await c.stats())["journal_counters"] == {}  # nothing refused or ignored


async def test_closing_while_a_result_is_being_journaled_waits_for_it(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1) as mesh:
        c = mesh.coordinator
        accept, arrived, release = c._accept_result, asyncio.Event(), asyncio.Event()

        async def held(peer, msg):  # the result is in; its journaling is still under way
            arrived.set()
            await release.wait()
            await accept(peer, msg)

        c._accept_result = held
        await c.submit(spec("late", "single", x[:1]))
        await asyncio.wait_for(arrived.wait(), 15)
        closing = asyncio.create_task(c.aclose())
        await asyncio.sleep(0.05)
        assert not closing.done()  # it waits for the result's journaling
        release.set()
        await asyncio.wait_for(closing, 15)
    journal = Journal(tmp_path / "journal.db")
    try:
        record = journal.get("late")
    finally:
        journal.close()
    assert record.state.value == "succeeded" and record.items[0].result is not None


async def test_the_scheduler_sees_a_nodes_gossiped_models_change(tmp_path):
    async with Mesh(tmp_path, n=1) as mesh:
        c, membership = mesh.coordinator, mesh.daemons["node-0"].mesh.membership

        def models_seen():
            return {m for view in c._views() for m in view.models}

        state = membership.state
        assert models_seen() == {(m.model_id, m.version) for m in state.models}
        extra = replace(state.models[0], model_id="other-model")
        membership.update_state(replace(state, models=(*state.models, extra)))
        await until(lambda: ("other-model", "1") in models_seen())
        membership.update_state(replace(membership.state, models=(extra,)))
        await until(lambda: models_seen() == {("other-model", "1")})


async def test_a_task_past_its_deadline_fails_with_a_reason_wherever_its_items_are(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        sent = []
        send = c.mesh.peers.send
        c.mesh.peers.send = lambda node, msg, **kw: sent.append(msg) or send(node, msg, **kw)
        nowhere = spec(
            "nowhere", "single", x[:1], models=(ModelRef("no-such-model", "1"),), deadline_s=0.3
        )  # fmt: skip  (no node serves it: parked)
        stuck = spec("stuck", "batch", x[:2], shard_size=1, deadline_s=0.5)  # held on the node
        patient = spec("patient", "single", x[:1])  # no deadline: waits for the gate
        for each in (nowhere, stuck, patient):
            await c.submit(each)
        unserved = "no live, reachable node serves model no-such-model@1"
        for task_id, error in (
            ("nowhere", f"deadline of 0.3 s passed with 0 of 1 items done; 1 of them waiting: "
                        f"{unserved}"),
            ("stuck", "deadline of 0.5 s passed with 0 of 2 items done; 2 of them running on "
                      "node-0"),
        ):  # fmt: skip
            record = await c.wait(task_id, timeout=10)
            assert record.state.value == "failed"
            assert record.summary.error == error
        stats = daemon.executor.stats  # both stuck items ended there: told, or by their deadline
        await until(lambda: stats.cancelled + stats.failed["deadline_exceeded"] == 2)
        assigned = [m for m in sent if getattr(m, "task_id", None) == "stuck"]
        assert assigned and all(0 < m.deadline_s <= 0.5 for m in assigned)  # what was left
        assert "nowhere" not in c._runs and "nowhere/0" not in c._items  # forgotten here
        gate.set()
        assert (await c.wait("patient", timeout=10)).state.value == "succeeded"


async def test_a_task_whose_deadline_passed_while_the_coordinator_was_down_fails_on_recovery(
    tmp_path,
):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1) as mesh:
        c = mesh.coordinator
        unserved = (ModelRef("no-such-model", "1"),)
        await c.submit(spec("late", "single", x[:1], models=unserved, deadline_s=60))
        await c.submit(spec("in-time", "single", x[:1], models=unserved, deadline_s=600))
        c = await restarted_as_if_accepted_ago(mesh, 120)
        record = await c.wait("late", timeout=10)
        assert record.state.value == "failed" and "deadline of 60 s" in record.summary.error
        assert (await c.get("in-time")).state.value == "pending"  # 480 s left: still waiting


async def test_a_task_naming_no_deadline_gets_the_coordinators_default(tmp_path):
    x, _ = load_digits_holdout()
    unserved = (ModelRef("no-such-model", "1"),)
    config = CoordinatorConfig(item_timeout_s=5.0, default_deadline_s=0.3)
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        c = mesh.coordinator
        await c.submit(spec("defaulted", "single", x[:1], models=unserved))
        await c.submit(spec("own", "single", x[:1], models=unserved, deadline_s=600))
        record = await c.wait("defaulted", timeout=10)
        assert record.state.value == "failed"
        assert record.summary.error.startswith("deadline of 0.3 s passed with 0 of 1 items done")
        assert record.spec.deadline_s == 0.3  # journaled with the budget it ran under
        assert (await c.get("own")).state.value == "pending"  # its own budget: 600 s
        assert await c.submit(spec("defaulted", "single", x[:1], models=unserved)) == "defaulted"
        ok = await c.wait(await c.submit(spec("served", "single", x[:1], deadline_s=30)), 10)
        assert ok.state.value == "succeeded"


async def test_a_node_that_left_is_listed_without_its_stale_queue_depth(tmp_path):
    async with Mesh(tmp_path) as mesh:
        await mesh.daemons.pop("node-1").aclose()

        def listed():
            return {n["node_id"]: n for n in mesh.coordinator.nodes()}

        await until(lambda: listed()["node-1"]["status"] in ("left", "dead"))
        assert listed()["node-1"]["queue_depth"] is None
        assert listed()["node-0"]["queue_depth"] == 0


async def test_answers_about_an_item_count_only_from_the_node_it_was_sent_to(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=ONE_SLOT) as mesh:
        c = mesh.coordinator
        gate, busy = await take_the_only_slot(mesh, x)
        parked = await c.submit(spec("parked", "single", x[:1]))
        await until(lambda: sum(map(len, c._parked.values())) == 1)
        # as a send of attempt 1 before a coordinator restart would answer (recovery sends
        # attempt 1 again): the item waits for a slot here, so this is not about its send
        c._on_failed("node-0", TaskFailed("parked/0", 1, FailureKind.OVERLOADED, "draining", True))
        assert c.stats_.retries == 0 and c._items["parked/0"][1].attempt == 1
        gate.set()
        for task_id in (busy, parked):
            record = await c.wait(task_id, timeout=15)
            assert record.state.value == "succeeded", record.summary.error
        assert (await c.stats())["journal_counters"] == {}


async def test_an_item_queued_twice_goes_out_once(tmp_path):
    # A stale queue entry (a retry's timer, a hashed input's callback for a task id pruned and
    # submitted again) must not send an item that is already out a second time.
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2) as mesh:
        c = mesh.coordinator
        gates = [hold_inference(daemon) for daemon in mesh.daemons.values()]
        try:
            task_id = await c.submit(spec("twice", "single", x[:1]))
            await until(lambda: c._items["twice/0"][1].node is not None)
            c._queue("twice/0", 0)
            await until(lambda: c._ready.empty())
            await asyncio.sleep(0.05)  # a second send would be on its way by now
            accepted = sum(d.executor.stats.accepted for d in mesh.daemons.values())
            assert c.stats_.dispatched == 1 and accepted == 1
        finally:
            for gate in gates:
                gate.set()
        assert (await c.wait(task_id, timeout=10)).state.value == "succeeded"


def test_a_large_batch_plans_and_settles_in_linear_work(monkeypatch):
    from coordinator.runs import ItemRun, TaskRun

    checks = []
    started = TaskRun._started
    monkeypatch.setattr(TaskRun, "_started", lambda run, i: checks.append(i) or started(run, i))
    n = 3000
    batch = spec("big", "batch", np.zeros((n, 4), dtype=np.float32), shard_size=1)
    run = TaskRun(batch, default_aggregation="all", now=0.0)
    items = run.ready()
    for item in items:
        run.items[item.item_id] = ItemRun(item)
    out = Tensor.from_array(np.zeros((1, 2), dtype=np.float32))
    for item in items:  # as the service does: a result, then whatever is ready now
        assert not run.done
        run.record_result(item.item_id, out, "node", 0.0)
        assert run.ready() == []
    assert run.done and run.outcome.outputs[0].shape == (n, 2)
    assert len(checks) <= 3 * n  # a rescan per result would be n * n / 2


def test_items_sharing_an_input_hash_it_once(monkeypatch):
    hashed = []
    digest = runs.content_digest
    monkeypatch.setattr(runs, "content_digest", lambda d: hashed.append(d) or digest(d))
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    models = (DIGITS, ModelRef("a", "1"), ModelRef("b", "1"))
    for pattern, kw, distinct in (("parallel", {}, 1), ("batch", {"shard_size": 1}, 3)):
        hashed.clear()
        task = spec(pattern, pattern, x, models[: 3 if distinct == 1 else 1], **kw)
        run = runs.TaskRun(task, default_aggregation="all", now=0.0)
        items = run.ready()
        assert len(items) == 3
        digests = [run.digest_of(i.to_message().input.data) for i in items * 2]
        assert digests == [hashlib.sha256(i.input.data).hexdigest() for i in items * 2]
        assert len(hashed) == len(set(digests)) == distinct


async def test_every_policy_completes_a_task(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path) as mesh:
        c = mesh.coordinator
        for policy in ("round_robin", "least_loaded", "capability", "latency", "model_affinity",
                       "contact_aware"):  # fmt: skip
            record = await c.wait(await c.submit(spec(policy, "single", x[:3], policy=policy)), 10)
            assert record.state.value == "succeeded", (policy, record.summary.error)


async def test_latency_policy_sends_work_to_the_node_its_probes_measured_closest(tmp_path):
    """node-1 sits behind a slow link (its membership packets from the coordinator wait 80 ms
    before they are handled, as a far radio hop would): the coordinator's own probes measure
    it, ``nodes`` reports it, and the latency policy keeps every item on node-0."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path) as mesh:
        c, far = mesh.coordinator, mesh.daemons["node-1"]
        membership, loop = far.mesh.membership, asyncio.get_running_loop()
        handle = membership._on_gossip  # the handler the node's peer table routes Gossip to

        def slow_link(peer, msg):
            if peer == "coord":
                loop.call_later(0.08, handle, peer, msg)
            else:
                handle(peer, msg)

        far.mesh.peers.on(Gossip, slow_link)
        rtt = mesh.mesh.membership.core.rtt
        await until(lambda: (rtt("node-1") or 0) > 0.05 and rtt("node-0") is not None, 15)
        assert rtt("node-0") < 0.05
        listed = {n["node_id"]: n["rtt_ms"] for n in c.nodes()}
        assert listed["node-1"] > 50 > listed["node-0"]
        for i in range(6):
            record = await c.wait(await c.submit(spec(f"t{i}", "single", x[:2], policy="latency")))
            assert record.state.value == "succeeded"
        assert c.stats_.completed_by_node == Counter({"node-0": 6})


async def test_retention_deletes_ended_tasks_from_the_journal_and_keeps_live_ones(tmp_path, caplog):
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(retention_s=0.3, prune_interval_s=0.05)
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        c = mesh.coordinator
        prune, failures = c.journal.prune, []

        def flaky_prune(*args, **kwargs):  # the first try fails as a busy disk would
            if not failures:
                failures.append(1)
                raise sqlite3.OperationalError("disk I/O error (injected)")
            return prune(*args, **kwargs)

        c.journal.prune = flaky_prune
        gate = hold_inference(mesh.daemons["node-0"])
        done = await c.submit(spec("done", "single", x[:2]))
        await c.cancel(done)
        held = await c.submit(spec("held", "single", x[:2]))

        async def pruned() -> bool:
            try:
                await c.get(done)
            except UnknownTaskError:
                return True
            return False

        async with asyncio.timeout(20):
            while not await pruned():
                await asyncio.sleep(0.05)
        assert (await c.stats())["journal_counters"]["pruned_tasks"] == 1
        assert failures and "prune failed, retrying later" in caplog.text
        assert (await c.get(held)).state.value != "cancelled"  # live: kept however old
        gate.set()
        assert (await c.wait(held, timeout=10)).state.value == "succeeded"


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("default_policy", "fastest"),
        ("default_aggregation", "median"),
        ("max_attempts", 0),
        ("item_timeout_s", 0.0),
        ("prune_interval_s", 0.0),
        ("retry_backoff_s", -0.1),
        ("redial_timeout_s", -1.0),
        ("running_mark_delay_s", -1.0),
        ("retention_s", -1.0),
        ("input_ref_min_bytes", -1),
        ("default_deadline_s", -1.0),
        ("default_deadline_s", float("inf")),
        ("item_timeout_s", float("nan")),
        ("retry_backoff_max_s", 0.0),
        ("node_capacity", 0),
        ("max_in_flight_per_node", 0),
        ("journal_synchronous", "OFF"),
    ],
)
def test_a_bad_knob_is_a_config_error_naming_it(key, bad):
    with pytest.raises(ConfigError, match=key):
        CoordinatorConfig(**{key: bad})


async def test_retention_zero_keeps_every_task_and_runs_no_prune(tmp_path):
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(retention_s=0, prune_interval_s=0.01)
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        c, calls = mesh.coordinator, []
        prune = c.journal.prune
        c.journal.prune = lambda *a, **kw: calls.append(a) or prune(*a, **kw)
        done = await c.submit(spec("kept", "single", x[:1]))
        assert (await c.wait(done, timeout=10)).state.value == "succeeded"
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "coordinator-prune"]
        await asyncio.sleep(0.2)  # twenty prune intervals: nothing may happen in them
        assert calls == [] and (await c.get(done)).state.value == "succeeded"


@pytest.mark.parametrize("mark_delay", [0.0, 60.0], ids=["dispatch-journaled", "not-yet"])
async def test_cancel_reaches_the_node(tmp_path, mark_delay):
    x, _ = load_digits_holdout()
    slow = CoordinatorConfig(item_timeout_s=30, running_mark_delay_s=mark_delay)
    async with Mesh(tmp_path, n=1, config=slow) as mesh:
        c = mesh.coordinator
        daemon = mesh.daemons["node-0"]
        gate = hold_inference(daemon)  # the item runs until cancelled
        task_id = await c.submit(spec("cancel-me", "single", x[:2]))
        await until(lambda: daemon.executor.running == 1)
        # the journal has the dispatch once its result is overdue (at once here), or not yet
        journaled = "dispatched" if mark_delay == 0 else "pending"
        async with asyncio.timeout(10):
            while (await c.get(task_id)).items[0].state.value != journaled:
                await asyncio.sleep(0.02)
        assert await c.cancel(task_id)
        await until(lambda: daemon.executor.stats.cancelled == 1)
        record = await c.get(task_id)
        assert record.state.value == "cancelled"
        assert not await c.cancel(task_id)  # already ended
        gate.set()


async def test_cancel_of_a_task_that_ends_meanwhile_answers_false(tmp_path, monkeypatch):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1) as mesh:
        c = mesh.coordinator
        gate = hold_inference(mesh.daemons["node-0"])
        task_id = await c.submit(spec("ends-first", "single", x[:2]))
        read_live = await c.get(task_id)
        gate.set()
        assert (await c.wait(task_id, 10)).state.value == "succeeded"

        async def stale_get(_task_id: str):  # cancel read the task just before it ended
            return read_live

        monkeypatch.setattr(c, "get", stale_get)
        assert not await c.cancel(task_id)
        monkeypatch.undo()
        assert (await c.get(task_id)).state.value == "succeeded"


def hold_commits(coordinator: Coordinator, fail: bool = False) -> threading.Event:
    """Make the coordinator's journal wait, in each group that has a submit, between running
    the calls and their ``COMMIT`` until the returned event is set; ``fail``: the COMMIT then
    fails (as on a full disk) and the group rolls back."""
    release = threading.Event()
    journal = coordinator.journal
    original = journal.commit_group

    def held(calls, before_commit=None, **kw):
        if before_commit is None:  # no submit in this group
            return original(calls, **kw)

        def hold(outcomes):
            before_commit(outcomes)
            assert release.wait(10), "the test never released the commit"
            if fail:
                raise OSError("disk full (injected)")

        return original(calls, before_commit=hold, **kw)

    journal.commit_group = held
    return release


async def test_items_go_out_while_the_submit_commits_and_are_acknowledged_after(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        release = hold_commits(c)
        submit = asyncio.create_task(c.submit(spec("early", "single", x[:2])))
        await until(lambda: daemon.executor.stats.completed == 1)  # ran before the COMMIT
        assert not submit.done()  # not acknowledged before it is durable
        release.set()
        assert await submit == "early"
        record = await c.wait("early", timeout=10)
        assert record.state.value == "succeeded" and record.items[0].attempt == 1


async def test_a_submit_whose_commit_fails_is_refused_and_its_items_called_back(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=CoordinatorConfig(item_timeout_s=30)) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        release = hold_commits(c, fail=True)
        submit = asyncio.create_task(c.submit(spec("lost", "single", x[:2])))
        await until(lambda: daemon.executor.running == 1)  # dispatched before the COMMIT
        release.set()
        with pytest.raises(OSError, match="disk full"):
            await submit
        await until(lambda: daemon.executor.stats.cancelled == 1)  # called back
        assert "lost" not in c._runs and not c._items
        with pytest.raises(UnknownTaskError):
            await c.get("lost")  # nothing journaled
        gate.set()


async def test_only_an_item_still_running_after_the_notice_delay_is_reported_accepted(tmp_path):
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=30, running_mark_delay_s=0.0)
    extra = "[executor]\naccepted_notice_ms = 100.0\n"
    async with Mesh(tmp_path, n=1, config=config, extra=extra) as mesh:
        c = mesh.coordinator
        accepted: list[str] = []
        handler = c._on_accepted

        def counting(peer, msg):
            accepted.append(msg.item_id)
            handler(peer, msg)

        c.mesh.peers.on(TaskAccepted, counting)
        quick = await c.wait(await c.submit(spec("quick", "single", x[:1])), timeout=10)
        assert quick.state.value == "succeeded" and accepted == []  # its result came first

        gate = hold_inference(mesh.daemons["node-0"])
        task_id = await c.submit(spec("slow", "single", x[:1]))
        await until(lambda: accepted == ["slow/0"])  # told once the item outlived the delay
        async with asyncio.timeout(10):  # the journal marks it running
            while (await c.get(task_id)).items[0].state.value != "running":
                await asyncio.sleep(0.02)
        gate.set()
        assert (await c.wait(task_id, timeout=10)).state.value == "succeeded"


async def test_node_error_is_retried_on_another_node(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2) as mesh:
        c = mesh.coordinator
        broken = mesh.daemons["node-0"]

        async def fail(ref, batch):
            from meshinfer.errors import OverloadedError

            raise OverloadedError("simulated overload")

        broken.engine.infer = fail
        ids = [await c.submit(spec(f"r{i}", "single", x[i : i + 1], policy="round_robin"))
               for i in range(4)]  # fmt: skip
        for task_id in ids:
            record = await c.wait(task_id, timeout=15)
            assert record.state.value == "succeeded", record.summary.error
            assert record.items[0].node == "node-1"
        assert c.stats_.retries >= 1


async def test_attempts_refused_by_draining_nodes_do_not_count_against_max_attempts(tmp_path):
    """Both nodes refuse the item (they drain) as often as max_attempts allows; once they take
    work again the task succeeds: a refusal is not a failed attempt."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2, config=CoordinatorConfig(max_attempts=3)) as mesh:
        c = mesh.coordinator
        set_draining(mesh, True)
        task_id = await c.submit(spec("refused", "single", x[:1]))
        await until(lambda: c.stats_.refusals == 3)  # as many as max_attempts go uncounted
        set_draining(mesh, False)  # the next attempt runs, wherever it goes
        record = await c.wait(task_id, timeout=15)
        assert record.state.value == "succeeded", record.summary.error
        assert record.items[0].attempt > 3  # more attempts than max_attempts, yet no failure
        assert (await c.stats())["refusals"] == 3


async def refused_everywhere(mesh: Mesh, task_id: str) -> TaskRecord:
    """Submit a one-row task while every node drains; its record once it failed."""
    x, _ = load_digits_holdout()
    set_draining(mesh, True)
    c = mesh.coordinator
    record = await c.wait(await c.submit(spec(task_id, "single", x[:1])), timeout=15)
    assert record.state.value == "failed"
    return record


async def test_once_every_node_had_an_item_it_does_not_go_back_to_the_one_it_just_left(tmp_path):
    async with Mesh(tmp_path, n=2, config=CoordinatorConfig(max_attempts=3)) as mesh:
        c = mesh.coordinator
        await refused_everywhere(mesh, "bounced")  # 3 refusals, then 3 counted attempts
        history = await c._db.run("history", "bounced")
        nodes = [e.detail.split(" to ")[1] for e in history if e.kind == "dispatched"]
        assert len(nodes) == 6 and set(nodes) == {"node-0", "node-1"}
        assert all(a != b for a, b in itertools.pairwise(nodes)), nodes


async def test_a_restarted_coordinator_goes_on_from_the_journaled_refusals(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=CoordinatorConfig(max_attempts=3)) as mesh:
        c = mesh.coordinator
        set_draining(mesh, True)
        await c.submit(spec("refused", "single", x[:1]))
        await until(lambda: c.stats_.refusals >= 2)
        await mesh.daemons.pop("node-0").aclose()  # nowhere to go after the restart: it waits
        await c.aclose()
        with sqlite3.connect(tmp_path / "journal.db") as db:
            journaled = db.execute("SELECT refused FROM items WHERE id = 'refused/0'").fetchone()
        db.close()
        assert journaled[0] >= 2
        mesh.coordinator = c = Coordinator(mesh.mesh, tmp_path / "journal.db", mesh.config)
        await c.start()
        assert c._items["refused/0"][1].refused == journaled[0]
        assert (await c.get("refused")).items[0].refused == journaled[0]


async def test_an_item_every_node_refuses_for_ever_still_fails(tmp_path):
    async with Mesh(tmp_path, n=2, config=CoordinatorConfig(max_attempts=2)) as mesh:
        c = mesh.coordinator
        record = await refused_everywhere(mesh, "never")
        assert "gave up after 4 attempts (2 refusals not counted)" in record.summary.error
        assert "node is draining" in record.summary.error
        assert c.stats_.refusals == 2


async def test_a_failed_attempt_is_journaled_after_its_dispatch_however_quick(tmp_path):
    x, _ = load_digits_holdout()
    never = CoordinatorConfig(item_timeout_s=30, running_mark_delay_s=60.0)  # no overdue mark
    async with Mesh(tmp_path, n=2, config=never) as mesh:
        c = mesh.coordinator
        broken = mesh.daemons["node-0"]

        async def fail(ref, batch):
            from meshinfer.errors import OverloadedError

            raise OverloadedError("simulated overload")

        broken.engine.infer = fail
        task = spec("r", "single", x[:1], policy="round_robin")
        record = await c.wait(await c.submit(task), timeout=15)
        assert record.state.value == "succeeded" and record.items[0].node == "node-1"
        history = [(e.kind, e.detail) for e in await c._db.run("history", "r")]
        kinds = [kind for kind, _ in history]
        # (an overload is a refusal: the history and the item's count say so)
        assert kinds == ["submitted", "dispatched", "refused", "dispatched", "result", "succeeded"]
        assert history[1][1] == "attempt 1 to node-0" and history[3][1] == "attempt 2 to node-1"
        assert record.items[0].refused == 1 and record.items[0].attempt == 2


async def test_an_item_dropped_unwritten_for_want_of_a_session_is_retried_at_once(tmp_path):
    """A TaskAssign queued for a node no session can be had with (here: neither side's dial
    gets through) never reaches it: retried on another node at once, not after its timeout."""
    x, _ = load_digits_holdout()
    slow = CoordinatorConfig(item_timeout_s=60.0)  # longer than this test waits
    async with Mesh(tmp_path, n=2, config=slow) as mesh:
        c, node_0 = mesh.coordinator, mesh.daemons["node-0"]

        async def unreachable(node_id):
            return None

        c.mesh.peers._dial = unreachable  # the coordinator cannot reach node-0 ...
        node_0.mesh.peers._dial = unreachable  # ... nor node-0 the coordinator
        await c.mesh.peers.disconnect("node-0")
        await until(lambda: c.mesh.peers.session("node-0") is None)
        ids = [await c.submit(spec(f"u{i}", "single", x[i : i + 1], policy="round_robin"))
               for i in range(2)]  # fmt: skip
        records = [await c.wait(task_id, timeout=10) for task_id in ids]
        assert all(r.state.value == "succeeded" for r in records)
        retried = [i for r in records for i in r.items if i.attempt == 2]
        assert [i.node for i in retried] == ["node-1"]  # the one sent to node-0
        history = [e.detail for e in await c._db.run("history", retried[0].item_id.split("/")[0])]
        assert any("could not send to node-0: peer" in detail for detail in history)


async def test_task_with_no_capable_node_fails_with_a_reason(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=CoordinatorConfig(max_attempts=2)) as mesh:
        c = mesh.coordinator
        daemon = mesh.daemons["node-0"]

        async def broken(ref, batch):
            raise ValueError("not numbers")

        from meshinfer.errors import InferenceError

        async def bad(ref, batch):
            raise InferenceError("engine exploded")

        daemon.engine.infer = bad
        record = await c.wait(await c.submit(spec("doomed", "single", x[:1])), timeout=10)
        assert record.state.value == "failed"
        assert "engine exploded" in (record.summary.error or "")


@pytest.mark.parametrize("mode", ["first", "all", "majority", "weighted", "ensemble"])
async def test_parallel_aggregations(tmp_path, mode):
    x, _y = load_digits_holdout()
    models = (DIGITS, ModelRef("synthetic-mlp", "w64-d2"))
    extra = '[inference]\nmodels = ["digits-mlp@1", "synthetic-mlp@w64-d2"]\n'
    async with Mesh(tmp_path, n=2, extra=extra) as mesh:
        c = mesh.coordinator
        task = spec(f"par-{mode}", "parallel", x[:20], models=models, aggregation=mode)
        record = await c.wait(await c.submit(task), timeout=15)
        assert record.state.value == "succeeded", record.summary.error
        result = c.result_of(record)
        assert result["aggregation"]["mode"] == mode
        sources = result["aggregation"]["sources"]
        assert len(sources) == (1 if mode == "first" else 2)


async def test_malformed_input_fails_cleanly_and_the_node_keeps_serving(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1) as mesh:
        c = mesh.coordinator
        wrong = np.zeros((2, 10), dtype=np.float32)  # the digits model takes 64 features
        record = await c.wait(await c.submit(spec("bad", "single", wrong)), timeout=10)
        assert record.state.value == "failed"
        assert "64" in (record.summary.error or "") or "shape" in (record.summary.error or "")
        assert mesh.daemons["node-0"].executor.stats.failed["bad_input"] == 1
        good = await c.wait(await c.submit(spec("good", "single", x[:1])), timeout=10)
        assert good.state.value == "succeeded"


def _seen_idle(daemon: NodeDaemon, node: str) -> bool:
    """Whether ``daemon`` could pass an item to ``node`` now as to an idle peer: ALIVE, with a
    session open, and gossiping an empty queue in ``daemon``'s membership view."""
    member = daemon.mesh.membership.core.member(node)
    if member is None or member.status is not MemberStatus.ALIVE:
        return False
    return member.state.queue_depth == 0 and daemon.mesh.peers.session(node) is not None


async def test_deep_queue_offloads_to_a_less_loaded_peer(tmp_path):
    x, _ = load_digits_holdout()
    extra = "[executor]\nmax_concurrent = 1\noffload_queue_depth = 2\n"
    config = CoordinatorConfig(item_timeout_s=120.0)  # o0 and o2 wait on the gate meanwhile
    async with Mesh(tmp_path, n=2, extra=extra, config=config) as mesh:
        c = mesh.coordinator
        busy = mesh.daemons["node-0"]
        gate = hold_inference(busy)
        # Round robin sends every other task to node-0, whose backlog (held by the gate) passes
        # offload_queue_depth, so it forwards further items to node-1 and relays the answers.
        tasks = [spec(f"o{i}", "single", x[i : i + 1], policy="round_robin") for i in range(6)]
        ids = [await c.submit(task) for task in tasks[:4]]  # o0, o2 held on node-0
        for task_id in ids[1::2]:  # o1, o3 run on node-1
            record = await c.wait(task_id, timeout=15)
            assert [i.node for i in record.items] == ["node-1"], record.summary.error
        # node-0 passes o4 on only if node-1's gossiped depth (sampled once a second) is below
        # its own backlog: wait until its view has node-1 idle, not running o1 and o3
        await until(lambda: busy.executor.backlog == 2 and _seen_idle(busy, "node-1"))
        ids.append(await c.submit(tasks[4]))
        await until(lambda: busy.executor.stats.offloaded == 1)
        ids.append(await c.submit(tasks[5]))  # to node-1 once o4 is passed on (its depth then)
        gate.set()
        for task_id in ids:
            record = await c.wait(task_id, timeout=15)
            assert record.state.value == "succeeded", record.summary.error
        assert busy.executor.stats.offloaded >= 1
        assert busy.executor.stats.relayed == busy.executor.stats.offloaded


async def test_items_offloaded_to_a_peer_that_dies_are_handed_back(tmp_path):
    x, _ = load_digits_holdout()
    extra = "[executor]\nmax_concurrent = 1\noffload_queue_depth = 1\n"
    config = CoordinatorConfig(item_timeout_s=120.0)  # the hand-back, not the timeout, must act
    async with Mesh(tmp_path, n=2, extra=extra, config=config) as mesh:
        c = mesh.coordinator
        busy, helper = mesh.daemons["node-0"], mesh.daemons["node-1"]
        busy_gate, never = asyncio.Event(), asyncio.Event()
        original = busy.engine.infer

        async def slow(ref, batch):
            await busy_gate.wait()
            return await original(ref, batch)

        async def stuck(ref, batch):
            await never.wait()

        busy.engine.infer = slow
        tasks = [spec(f"h{i}", "single", x[i : i + 1], policy="round_robin") for i in range(3)]
        ids = [await c.submit(task) for task in tasks[:2]]  # h0 held on node-0, h1 on node-1
        record = await c.wait(ids[1], timeout=15)
        assert [i.node for i in record.items] == ["node-1"], record.summary.error
        helper.engine.infer = stuck  # from now on node-1 keeps what it gets
        try:
            # node-0 (backlog 1) passes h2 on only if node-1's gossiped depth (sampled once a
            # second) is 0: a depth gossiped while h1 ran would keep h2 here
            await until(lambda: busy.executor.backlog == 1 and _seen_idle(busy, "node-1"))
            ids.append(await c.submit(tasks[2]))
            await until(lambda: busy.executor.stats.offloaded == 1)
            await until(lambda: helper.executor.backlog == 1)  # node-1 holds h2
            await helper.mesh.aclose()  # node-1 vanishes holding the offloaded item (no leave)
            busy_gate.set()
            for task_id in ids:
                record = await c.wait(task_id, timeout=30)
                assert record.state.value == "succeeded", record.summary.error
            assert busy.executor.stats.handed_back >= 1
            assert c.stats_.retries >= 1
        finally:
            never.set()  # lets node-1's batcher finish so the daemon can close


async def test_a_node_whose_certificate_is_revoked_gets_no_work_and_its_items_move_at_once(
    tmp_path,
):
    x, _ = load_digits_holdout()
    listed = tmp_path / "coord-revocations.bin"  # the coordinator's list file (operator's copy)
    quick = RevocationSyncConfig(check_interval_s=0.1, ask_timeout_s=0.5)
    options = {"revocations_file": listed, "revocations": quick}
    config = CoordinatorConfig(item_timeout_s=120.0)  # the revocation, not the timeout, must act
    async with Mesh(tmp_path, n=2, config=config, options=options) as mesh:
        c = mesh.coordinator
        never = hold_inference(mesh.daemons["node-0"])  # node-0 keeps what it gets
        ids = [
            await c.submit(spec(f"r{i}", "single", x[i : i + 1], policy="round_robin"))
            for i in range(4)
        ]
        await until(lambda: any(n["node_id"] == "node-0" and n["in_flight"] for n in c.nodes()))
        mesh.cluster.fleet.revoke(now=time.time(), node_id="node-0", reason="stolen")
        replace_file(listed, mesh.cluster.fleet.revocations_bin.read_bytes())  # copied by hand
        try:
            for task_id in [*ids, await c.submit(spec("after", "single", x[:1]))]:
                record = await c.wait(task_id, timeout=15)
                assert record.state.value == "succeeded", record.summary.error
                assert {item.node for item in record.items} == {"node-1"}
            # moved by the coordinator's own cut-off (the fast path), not by membership
            assert c.stats_.redispatched_after_disconnect >= 1
            assert mesh.mesh.revocation_sync.stats.disconnected >= 1
        finally:
            never.set()


async def test_ensemble_of_three_digit_models_votes_by_majority(tmp_path):
    x, y = load_digits_holdout()
    models = tuple(ModelRef(m, "1") for m in ("digits-mlp", "digits-mlp-wide", "digits-mlp-deep"))
    async with Mesh(tmp_path, n=3) as mesh:
        c = mesh.coordinator
        task = spec("vote", "parallel", x, models=models, aggregation="majority")
        record = await c.wait(await c.submit(task), timeout=20)
        assert record.state.value == "succeeded", [(i.item_id, i.error) for i in record.items]
        result = c.result_of(record)
        labels = np.asarray(result["outputs"][0])
        assert labels.shape == y.shape and (labels == y).mean() >= 0.95
        assert len(result["aggregation"]["sources"]) >= 2


async def test_a_parallel_task_at_its_deadline_ends_with_the_outputs_in_by_then(tmp_path):
    x, y = load_digits_holdout()
    models = tuple(ModelRef(m, "1") for m in ("digits-mlp", "digits-mlp-wide", "digits-mlp-deep"))
    async with Mesh(tmp_path, n=1) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon, only="digits-mlp-deep")
        task = spec("vote", "parallel", x, models=models, aggregation="weighted", deadline_s=3.0)
        record = await c.wait(await c.submit(task), timeout=10)
        stats = daemon.executor.stats  # the stuck one ended there: by its deadline or told
        await until(lambda: stats.cancelled + stats.failed["deadline_exceeded"] == 1)
        gate.set()
        assert record.state.value == "succeeded", record.summary.error
        result = c.result_of(record)
        assert result["aggregation"]["partial"] and result["aggregation"]["reason"] == "timeout"
        assert sorted(result["aggregation"]["sources"]) == ["vote/0", "vote/1"]
        assert (np.argmax(result["outputs"][0], axis=-1) == y).mean() >= 0.9


async def test_pipeline_stages_feed_each_other(tmp_path):
    x, _ = load_digits_holdout()
    extra = (
        '[inference]\nmodels = ["digits-mlp@1", "digits-mlp-wide@1", '
        '"synthetic-mlp@w10-d1", "synthetic-mlp@w20-d1"]\n'
    )
    stages = (
        Stage("a", DIGITS),
        Stage("b", ModelRef("digits-mlp-wide", "1")),
        Stage("head", ModelRef("synthetic-mlp", "w20-d1"), after=("a", "b")),
        Stage("tail", ModelRef("synthetic-mlp", "w10-d1"), after=("head",)),
    )
    async with Mesh(tmp_path, n=2, extra=extra) as mesh:
        c = mesh.coordinator
        task = TaskSpec("dag", Pattern.PIPELINE, Tensor.from_array(x[:8]), stages=stages)
        record = await c.wait(await c.submit(task), timeout=20)
        assert record.state.value == "succeeded", record.summary.error
        engine = mesh.daemons["node-0"].engine
        a = await engine.infer(DIGITS, x[:8])
        b = await engine.infer(ModelRef("digits-mlp-wide", "1"), x[:8])
        head = await engine.infer(ModelRef("synthetic-mlp", "w20-d1"), np.concatenate([a, b], 1))
        tail = await engine.infer(ModelRef("synthetic-mlp", "w10-d1"), head)
        np.testing.assert_allclose(c.result_of(record)["outputs"][0], tail, rtol=1e-5, atol=1e-6)


async def test_a_pipeline_item_waits_for_its_stage_and_says_so(tmp_path):
    x, _ = load_digits_holdout()
    nowhere = ModelRef("no-such-model", "1")
    stages = (Stage("first", nowhere), Stage("then", DIGITS, after=("first",)))
    async with Mesh(tmp_path, n=1) as mesh:
        c = mesh.coordinator
        task = TaskSpec("waits", Pattern.PIPELINE, Tensor.from_array(x[:2]), stages=stages)
        await c.submit(task)
        await until(lambda: len(c.waiting("waits")) == 2)
        record = await c.get("waits")
        by_stage = {item.stage: c.waiting("waits")[item.item_id] for item in record.items}
        assert by_stage == {
            "first": "no live, reachable node serves model no-such-model@1",
            "then": "waiting for the pipeline stages it takes its input from",
        }
        await c.cancel("waits")
        assert c.waiting("waits") == {}
