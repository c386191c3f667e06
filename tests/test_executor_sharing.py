"""Work sharing in the node's task executor (node/work_sharing.py): which peer an item is passed to,
what happens when it cannot be sent, and whom a held item answers.

Real peer tables and Noise sessions, over the in-memory transport (and real TCP on loopback
where the transport matters), a real NumPy engine and batcher whose forward passes wait for a
gate. Membership is a stand-in table (:class:`Members`): each test sets exactly the status,
roles, models and gossiped queue depth that the executor reads for each peer.

The worker ``w`` runs one item at a time; with ``offload_queue_depth = 3`` the first three items
from a coordinator stay on ``w`` (held by the gate), so ``w``'s backlog is 3 and a peer that
gossips a smaller load can be passed the next ones.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field, replace

import pytest

from meshinfer.inference.base import ModelRef
from meshinfer.inference.batching import BatcherConfig, DynamicBatcher
from meshinfer.inference.cache import content_digest
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import ModelRegistry, synthetic_model
from meshinfer.inference.synthetic import SyntheticSpec, sample_inputs
from meshinfer.proto.identity import NodeIdentity
from meshinfer.proto.membership import (
    Member,
    MemberEvent,
    MemberEventKind,
    MemberStatus,
    NodeState,
)
from meshinfer.proto.membership_wire import AliveRecord, ModelInfo
from meshinfer.proto.messages import AppData, Message
from meshinfer.proto.tasks_wire import (
    FailureKind,
    TaskAccepted,
    TaskAssign,
    TaskCancel,
    TaskFailed,
    TaskResult,
    Tensor,
    by_reference,
    encode_params,
)
from meshinfer.runtime.endpoint import SessionListener
from meshinfer.runtime.peers import PeerTable
from meshinfer.runtime.session import Admission, Session, SessionConfig
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.memory import MemoryNetwork, MemoryTransport
from meshinfer.transport.tcp import TcpTransport
from node.config import ExecutorSection
from node.executor import TaskExecutor
from tests.helpers import dial_again, until

MODEL = SyntheticSpec(8, 1)
REF: ModelRef = MODEL.ref
GOSSIPED = (ModelInfo(REF.model_id, REF.version),)
COORDINATORS = ("coord", "coord-2")
VEHICLES = ("w", "v", "b", "c", "d")
#: One item runs at a time; the first three from a coordinator stay (see the module docstring).
SHARING = ExecutorSection(max_concurrent=1, offload_queue_depth=3, input_cache_mib=1)
KEEPING = ExecutorSection(max_concurrent=1, offload_queue_depth=1000, input_cache_mib=1)
WAIT_S = 5.0  # how long a message that must come may take (a failing test waits this long)


class Members:
    """Stands in for the node's ``MembershipService`` (``core.live_members()``,
    ``core.member()``, ``subscribe``): a table the test writes."""

    def __init__(self) -> None:
        self.core = self
        self.table: dict[str, Member] = {}
        self.subscribers: list = []

    def set(
        self,
        node_id: str,
        *,
        depth: int = 0,
        status: MemberStatus = MemberStatus.ALIVE,
        roles: tuple[str, ...] = ("vehicle",),
        models: tuple[ModelInfo, ...] = GOSSIPED,
    ) -> None:
        state = NodeState(roles=roles, models=models, queue_depth=depth)
        self.table[node_id] = Member(node_id, status, 1, AliveRecord(node_id, 1, 1, state), 0.0)

    def member(self, node_id: str) -> Member | None:
        return self.table.get(node_id)

    def live_members(self) -> list[Member]:
        return [m for m in self.table.values() if m.is_live]

    def subscribe(self, callback) -> None:
        self.subscribers.append(callback)


@dataclass
class WorkerMesh:
    """What the executor uses of a ``MeshNode``."""

    node_id: str
    peers: PeerTable
    admission: Admission
    membership: Members
    revocation_sync: None = None


@dataclass
class Endpoint:
    """One node's peer table (and listener), keeping every task message it receives."""

    peers: PeerTable
    listener: SessionListener | None
    got: list[tuple[str, Message]] = field(default_factory=list)

    def keep(self, peer: str, msg: Message) -> None:
        self.got.append((peer, msg))

    def assigned(self) -> list[str]:
        return [m.item_id for _, m in self.got if isinstance(m, TaskAssign)]

    def cancels(self) -> list[str]:
        return [m.item_id for _, m in self.got if isinstance(m, TaskCancel)]

    def answers(self) -> list[tuple[str, str, int, str]]:
        """(type, item, attempt, sender) of each TaskResult and TaskFailed received."""
        return [
            (type(m).__name__, m.item_id, m.attempt, peer)
            for peer, m in self.got
            if isinstance(m, TaskResult | TaskFailed)
        ]

    def failure(self, item_id: str) -> TaskFailed | None:
        failed = [m for _, m in self.got if isinstance(m, TaskFailed) and m.item_id == item_id]
        return failed[-1] if failed else None


class Net:
    """Coordinators ``coord`` and ``coord-2``, vehicles ``w`` (the worker under test), ``v``,
    ``b``, ``c``, ``d``, each with a listener; every node knows every other's address. No
    session exists until a test opens one (:meth:`connect`). Membership lists both
    coordinators from the start."""

    def __init__(
        self,
        kind: str = "memory",
        *,
        worker_sends: SessionConfig | None = None,
        worker_outbox: int = 256,
    ) -> None:
        self.kind = kind
        self.worker_outbox = worker_outbox
        self.memory = MemoryNetwork()
        self.fleet = make_fleet(None, VEHICLES)
        for name in COORDINATORS:
            self.fleet.enroll(name, ("coordinator",))
        self.worker_sends = worker_sends
        self.nodes: dict[str, Endpoint] = {}
        self.members = Members()
        self.gate = asyncio.Event()
        self.executors: list[TaskExecutor] = []
        self.engine = NumpyEngine(ModelRegistry((synthetic_model(MODEL),)))
        self.batcher = DynamicBatcher(
            self.engine, REF, BatcherConfig(max_queue_delay_s=0.0, dispatch_when_idle=True)
        )

    async def __aenter__(self) -> Net:
        for name in COORDINATORS:
            self.members.set(name, roles=("coordinator",), models=())
        for name in (*VEHICLES, *COORDINATORS):
            self.nodes[name] = await self.endpoint(name, self.fleet.identities[name])
        for node in self.nodes.values():
            self.teach(node.peers)
        await self.engine.load(REF)
        infer = self.engine.infer

        async def held(ref, batch):
            await self.gate.wait()
            return await infer(ref, batch)

        self.engine.infer = held
        await self.batcher.start()
        return self

    async def __aexit__(self, *exc) -> None:
        self.gate.set()
        for executor in self.executors:
            await executor.aclose()
        await self.batcher.aclose()
        await self.engine.aclose()
        for node in self.nodes.values():
            await node.peers.aclose()
            if node.listener is not None:
                await node.listener.aclose()

    async def endpoint(self, name: str, identity: NodeIdentity, *, listen: bool = True):
        """A node's peer table (listening unless told not to); ``w``'s own messages go to its
        executor, everyone else's are kept in :attr:`Endpoint.got`."""
        transport = (
            MemoryTransport(self.memory, host=name) if self.kind == "memory" else TcpTransport()
        )
        admission = Admission(identity, self.fleet.revocations)
        config = self.worker_sends if name == "w" else None
        outbox = self.worker_outbox if name == "w" else 256
        peers = PeerTable(name, transport, admission, config=config, outbox_limit=outbox)
        listener = None
        if listen:
            listener = SessionListener(transport, admission, peers.serve_inbound)
            host = name if self.kind == "memory" else "127.0.0.1"
            await listener.start(Address(host, 0))
        node = Endpoint(peers, listener)
        if name != "w":
            for kind in (TaskAssign, TaskResult, TaskFailed, TaskAccepted, TaskCancel):
                peers.on(kind, node.keep)
        return node

    def teach(self, peers: PeerTable) -> None:
        """Let ``peers`` dial every listening node."""
        for name, node in self.nodes.items():
            if node.listener is not None:
                key = self.fleet.identities[name].static_public
                peers.learn(name, node.listener.address, key)

    @property
    def w(self) -> PeerTable:
        return self.nodes["w"].peers

    def worker(
        self, config: ExecutorSection = SHARING, *, seed: int = 0, model: bool = True
    ) -> TaskExecutor:
        """Start an executor on ``w`` (with the model unless told not to; ``rng`` seeded)."""
        mesh = WorkerMesh("w", self.w, self.w.admission, self.members)
        batchers = {REF: self.batcher} if model else {}
        executor = TaskExecutor(mesh, batchers, config, rng=random.Random(seed))
        executor.start()
        self.executors.append(executor)
        return executor

    async def connect(self, a: str, b: str) -> None:
        """Open a session from ``a`` to ``b`` (``a`` dials)."""
        await self.nodes[a].peers.request(b, AppData(topic="hello", payload=b""))

    async def assign(self, sender: str, item_id: str, attempt: int = 1, rows: int = 1) -> None:
        await self.nodes[sender].peers.request("w", item(item_id, attempt, rows))

    async def fill(self, executor: TaskExecutor, n: int = 3) -> None:
        """Give ``w`` ``n`` items from ``coord`` that stay there (held by the gate)."""
        for i in range(n):
            await self.assign("coord", f"held-{len(self.executors)}-{i}")
        await soon(lambda: executor.backlog == n)

    async def loaded_worker(self, *dialled: str) -> TaskExecutor:
        """``w``, having dialled each of ``dialled``, with an executor holding three items."""
        for name in dialled:
            await self.connect("w", name)
        executor = self.worker()
        await self.fill(executor)
        return executor

    def assigned(self, *names: str) -> dict[str, list[str]]:
        return {name: self.nodes[name].assigned() for name in names}

    def holder(self, item_id: str) -> str | None:
        """Which of b and c was passed ``item_id``, if one was."""
        return next((n for n, ids in self.assigned("b", "c").items() if item_id in ids), None)


async def soon(predicate) -> None:
    """Wait until ``predicate`` holds, for at most :data:`WAIT_S`."""
    await until(predicate, timeout=WAIT_S)


def item(item_id: str, attempt: int = 1, rows: int = 1) -> TaskAssign:
    x = sample_inputs(MODEL, rows)
    return TaskAssign(
        item_id, f"task-{item_id}", REF.model_id, REF.version, Tensor.from_array(x),
        encode_params({}), None, 0, attempt,
    )  # fmt: skip


# --- which peer: load, ties, liveness, sessions, certificates ---------------------------------


async def test_items_passed_on_in_a_burst_spread_over_equally_idle_peers():
    """Gossip says b and c are idle (and will for up to a second): each item passed counts
    against its peer, so four items land two and two, not all on the first one found."""
    async with Net() as net:
        net.members.set("b")
        net.members.set("c")
        executor = await net.loaded_worker("b", "c")
        for i in range(4):
            await net.assign("coord", f"burst-{i}")
        await soon(lambda: executor.stats.offloaded == 4)
        await soon(lambda: sum(map(len, net.assigned("b", "c").values())) == 4)
        assert sorted(map(len, net.assigned("b", "c").values())) == [2, 2]
        assert executor.backlog == 3  # nothing more ran here


async def test_an_answered_item_no_longer_counts_against_its_peer():
    """b gossips a depth of 2, w's backlog is 3: b can take one item (2 + 1 is not below 3).
    Once b answers it, b can take the next; while it counted, the next ran on w."""
    async with Net() as net:
        net.members.set("b", depth=2)
        executor = await net.loaded_worker("b")
        await net.assign("coord", "first")
        await soon(lambda: net.nodes["b"].assigned() == ["first"])
        result = TaskResult("first", 1, Tensor.from_array(sample_inputs(MODEL, 1)), "b", "", "", {})
        await net.nodes["b"].peers.request("w", result)
        await soon(lambda: ("TaskResult", "first", 1, "w") in net.nodes["coord"].answers())
        await net.assign("coord", "second")
        await soon(lambda: executor.stats.offloaded == 2)
        assert net.nodes["b"].assigned() == ["first", "second"] and executor.backlog == 3


async def test_a_tie_between_peers_is_broken_by_the_injected_rng():
    """Equally loaded peers: which one gets an item follows the executor's ``random.Random``
    (so nodes seeded differently do not all pick the same peer), the same seed the same one."""
    async with Net() as net:
        net.members.set("b")
        net.members.set("c")
        await net.connect("w", "b")
        await net.connect("w", "c")
        picks: list[str] = []
        for i, seed in enumerate((*range(6), *range(6))):
            executor = net.worker(seed=seed)
            await net.fill(executor)
            item_id = f"tie-{i}"
            await net.assign("coord", item_id)
            await soon(lambda i=item_id: net.holder(i))
            picks.append(net.holder(item_id))
            await executor.aclose()  # its held items are cancelled: the next one starts empty
        assert set(picks[:6]) == {"b", "c"}
        assert picks[6:] == picks[:6]  # the same seeds again: the same peers


async def test_a_node_without_the_model_passes_the_item_on_even_with_an_empty_queue():
    async with Net() as net:
        net.members.set("b", depth=7)  # busy, but it has the model and w does not
        await net.connect("w", "b")
        executor = net.worker(model=False)
        await net.assign("coord", "no-model-here")
        await soon(lambda: net.nodes["b"].assigned() == ["no-model-here"])
        assert executor.stats.failed["model_not_found"] == 0


async def test_only_alive_members_with_an_open_session_are_passed_items():
    """c is idle but SUSPECT (it may be dead, or just restarted); d is idle and ALIVE but has
    no session with w (an item would wait on a dial that may fail, with nobody told): the
    item goes to b, busier but ALIVE and connected."""
    async with Net() as net:
        net.members.set("b", depth=2)
        net.members.set("c", status=MemberStatus.SUSPECT)
        net.members.set("d")
        executor = await net.loaded_worker("b", "c")
        await net.assign("coord", "one")
        await soon(lambda: executor.stats.offloaded == 1)
        await soon(lambda: net.nodes["b"].assigned() == ["one"])
        assert net.assigned("c", "d") == {"c": [], "d": []}


async def test_no_item_goes_over_a_session_whose_certificate_was_just_revoked():
    """Between a revocation reaching w's list and the session with b being cut, the session
    is still open (and the one the peer table would send over): b gets nothing meanwhile."""
    async with Net() as net:
        net.members.set("b")
        net.members.set("c", depth=1)
        executor = await net.loaded_worker("b", "c")
        net.fleet.revoke("b")
        net.w.admission.revocations = net.fleet.revocations  # merged; the cut has not run yet
        assert net.w.session("b") is not None
        await net.assign("coord", "after-revocation")
        await soon(lambda: executor.stats.offloaded == 1)
        await soon(lambda: net.nodes["c"].assigned() == ["after-revocation"])
        assert net.nodes["b"].assigned() == []


async def test_a_peer_is_skipped_only_while_its_revoked_session_is_the_one_sent_over():
    """b re-enrolled: it has a session with w under its old certificate (the oldest, which the
    peer table sends over) and one under its new one. Once the old serial is revoked, b gets
    nothing until that session is gone; then it is passed items again, over the good one."""
    async with Net() as net:
        net.members.set("b")
        net.members.set("c", depth=1)
        await net.connect("w", "c")
        old = net.fleet.identities["b"]
        new = net.fleet.enroll("b")
        stale = await net.endpoint("b", old, listen=False)
        fresh = await net.endpoint("b", new, listen=False)
        net.nodes["b-old"], net.nodes["b-new"] = stale, fresh  # closed with the rest
        for count, node in enumerate((stale, fresh), 1):
            net.teach(node.peers)
            await node.peers.request("w", AppData(topic="hello", payload=b""))
            await soon(lambda n=count: sum(s.peer_id == "b" for s in net.w.open_sessions()) == n)
        assert net.w.session("b").peer.serial == old.certificate.serial  # the one sent over
        executor = net.worker()
        await net.fill(executor)
        revoked = net.fleet.authority.revoke(
            net.fleet.revocations, now=time.time(), serial=old.certificate.serial
        )
        net.w.admission.revocations = revoked
        await net.assign("coord", "while-cut")
        await soon(lambda: net.nodes["c"].assigned() == ["while-cut"])
        await stale.peers.aclose()  # the cut completes
        await soon(lambda: net.w.session("b").peer.serial == new.certificate.serial)
        await net.assign("coord", "after-cut")
        await soon(lambda: fresh.assigned() == ["after-cut"])
        assert stale.assigned() == []


# --- an item that cannot be sent is handed back -----------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "tcp"])
async def test_an_offloaded_item_the_peer_table_cannot_send_is_handed_back(kind):
    """w may send messages of at most 2 KiB on the sessions it dials (it receives bigger ones
    from the coordinator): the peer table drops the item it passes b as too large, after
    ``_offload`` returned. The coordinator hears at once (PEER_LOST, retryable), not at its
    attempt timeout, and b's load counts the item no longer."""
    async with Net(kind, worker_sends=SessionConfig(max_message_size=2048)) as net:
        net.members.set("b", depth=2)  # it can take one item at a time (w's backlog is 3)
        executor = await net.loaded_worker("b")
        await net.assign("coord", "too-large", rows=64)  # 64 x 8 float32: 2 KiB of input alone
        coord = net.nodes["coord"]
        await soon(lambda: coord.failure("too-large") is not None)
        failed = coord.failure("too-large")
        assert (failed.code, failed.retryable, failed.attempt) == (FailureKind.PEER_LOST, True, 1)
        assert "not sent" in failed.message and executor.stats.handed_back == 1
        await net.assign("coord", "small")  # b's load is 0 again: it gets the next one
        await soon(lambda: net.nodes["b"].assigned() == ["small"])
        assert executor.stats.offloaded == 2


async def test_an_item_the_peer_table_refuses_at_once_runs_here():
    """w's outbox takes nothing (as one that is full): the item it would pass b cannot even be
    queued, so it runs on w after all instead of being handed back. (b dialled w: w has a
    session with b without sending anything.)"""
    async with Net(worker_outbox=0) as net:
        net.members.set("b")
        await net.connect("b", "w")
        executor = net.worker()
        await net.fill(executor)
        await net.assign("coord", "stays")
        await soon(lambda: executor.backlog == 4)
        assert (executor.stats.offloaded, executor.stats.handed_back) == (0, 0)
        assert net.nodes["b"].assigned() == []


async def test_a_draining_node_waits_for_what_it_passed_on_then_hands_back_the_rest():
    """SIGTERM's drain: an item b answers within the drain's timeout is relayed; one still
    unanswered at the end is handed back (its answer would have nowhere to go)."""
    async with Net() as net:
        net.members.set("b")
        executor = await net.loaded_worker("b")
        await net.assign("coord", "answered")
        await net.assign("coord", "silent")
        await soon(lambda: net.nodes["b"].assigned() == ["answered", "silent"])
        net.gate.set()  # w's own items finish
        drain = asyncio.create_task(executor.drain(timeout=3.0))
        await soon(lambda: executor.backlog == 0)  # the drain now waits for b's answers
        result = TaskResult(
            "answered", 1, Tensor.from_array(sample_inputs(MODEL, 1)), "b", "", "", {}
        )
        await net.nodes["b"].peers.request("w", result)
        await drain
        coord = net.nodes["coord"]
        await soon(lambda: coord.failure("silent") is not None)
        assert ("TaskResult", "answered", 1, "w") in coord.answers()
        assert coord.failure("answered") is None
        failed = coord.failure("silent")
        assert (failed.code, failed.retryable) == (FailureKind.PEER_LOST, True)
        assert "stopping" in failed.message


async def test_a_drain_returns_once_its_hand_backs_are_written():
    """The node closes its peer table right after the drain (the peer table drops what is
    still queued): the hand-backs of an item waiting for a slot and of one passed to a silent
    b reach the coordinator all the same. w's session with coord is gone when the drain
    starts, so they wait for a re-dial."""
    async with Net() as net:
        net.members.set("b")
        executor = await net.loaded_worker("b")  # three held items from coord, w over its depth
        await net.assign("coord", "passed")
        await soon(lambda: net.nodes["b"].assigned() == ["passed"])
        await net.w.disconnect("coord", "the link dropped")
        await executor.drain(timeout=0.05)
        await net.w.aclose()
        coord = net.nodes["coord"]
        for item_id in ("passed", "held-1-1", "held-1-2"):  # held-1-0 runs (one slot)
            await soon(lambda item_id=item_id: coord.failure(item_id) is not None)
            assert coord.failure(item_id).retryable


async def test_an_answer_relayed_during_a_drain_is_written_before_it_returns():
    """b answers the item w (without the model) passed it while w drains, its session with
    coord gone (so the relay waits for a re-dial); w closes its peer table right after: coord
    gets the result."""
    async with Net() as net:
        net.members.set("b")
        await net.connect("w", "b")
        executor = net.worker(model=False)
        await net.assign("coord", "answered")
        await soon(lambda: net.nodes["b"].assigned() == ["answered"])
        await net.w.disconnect("coord", "the link dropped")
        drain = asyncio.create_task(executor.drain(timeout=3.0))
        output = Tensor.from_array(sample_inputs(MODEL, 1))
        result = TaskResult("answered", 1, output, "b", "", "", {})
        await net.nodes["b"].peers.request("w", result)
        await drain  # b answered: nothing passed on is left
        await net.w.aclose()
        coord = net.nodes["coord"]
        await soon(lambda: ("TaskResult", "answered", 1, "w") in coord.answers())


async def test_an_item_passed_on_and_never_answered_is_handed_back_after_its_deadline():
    """b never answers (its answer was lost on the way): a second after the item's deadline
    w hands it back, and b's load no longer counts it."""
    async with Net() as net:
        net.members.set("b", depth=2)
        await net.loaded_worker("b")
        lost = replace(item("lost"), deadline_s=0.2)
        await net.nodes["coord"].peers.request("w", lost)
        await soon(lambda: net.nodes["b"].assigned() == ["lost"])
        coord = net.nodes["coord"]
        await soon(lambda: coord.failure("lost") is not None)
        failed = coord.failure("lost")
        assert (failed.code, failed.retryable) == (FailureKind.PEER_LOST, True)
        assert "has not answered" in failed.message
        await net.assign("coord", "next")  # b can take one again
        await soon(lambda: net.nodes["b"].assigned() == ["lost", "next"])


# --- one hop; the latest assignment ----------------------------------------------------------


async def test_an_item_from_a_peer_runs_here_and_is_never_passed_on_again():
    """An item v (a vehicle) passed to w runs on w even though w is over its offload depth and
    c is idle; an item from the coordinator at that moment goes to c."""
    config = ExecutorSection(max_concurrent=1, offload_queue_depth=1, input_cache_mib=1)
    async with Net() as net:
        net.members.set("v", models=())
        net.members.set("c")
        await net.connect("w", "c")
        executor = net.worker(config)
        await net.assign("coord", "from-coord")  # backlog 0 < 1: stays
        await soon(lambda: executor.backlog == 1)
        await net.assign("v", "from-peer")  # backlog 1 >= 1, but one hop only
        await soon(lambda: executor.backlog == 2)
        await net.assign("coord", "from-coord-too")  # backlog 2 >= 1: passed on
        await soon(lambda: net.nodes["c"].assigned() == ["from-coord-too"])
        net.gate.set()
        await soon(lambda: ("TaskResult", "from-peer", 1, "w") in net.nodes["v"].answers())
        assert net.nodes["c"].assigned() == ["from-coord-too"]


async def test_a_held_item_answers_its_latest_assignment():
    """coord assigned x (attempt 1), then coord-2 re-assigned it (attempt 2: the coordinator's
    retry, from elsewhere): w runs it once and answers coord-2, attempt 2, only."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        await net.assign("coord", "x")
        await soon(lambda: executor.running == 1)
        await net.assign("coord-2", "x", attempt=2)
        await net.assign("coord", "y")
        net.gate.set()
        await soon(lambda: ("TaskResult", "y", 1, "w") in net.nodes["coord"].answers())
        await soon(lambda: net.nodes["coord-2"].answers() == [("TaskResult", "x", 2, "w")])
        assert net.nodes["coord"].answers() == [("TaskResult", "y", 1, "w")]  # x's came first
        assert executor.stats.accepted == 2  # x once


async def test_an_item_passed_on_and_assigned_again_stays_with_its_peer():
    """coord's item went to b; coord-2 then assigns it again (attempt 2): w does not pass it
    on again (nor run it), and b's answer to attempt 1 reaches coord-2 as attempt 2's."""
    async with Net() as net:
        net.members.set("b")
        net.members.set("c")
        executor = await net.loaded_worker("b", "c")
        await net.assign("coord", "p")
        await soon(lambda: net.holder("p") is not None)
        holder = net.holder("p")
        await net.assign("coord-2", "p", attempt=2)
        await net.assign("coord", "q")  # a message after it: the reassignment was handled
        await soon(lambda: net.holder("q") is not None)
        assert [net.holder("p")] == [n for n in ("b", "c") if "p" in net.nodes[n].assigned()]
        assert executor.stats.offloaded == 2 and executor.backlog == 3
        output = Tensor.from_array(sample_inputs(MODEL, 1))
        await net.nodes[holder].peers.request("w", TaskResult("p", 1, output, holder, "", "", {}))
        await soon(lambda: net.nodes["coord-2"].answers() == [("TaskResult", "p", 2, "w")])
        assert all(a[1] != "p" for a in net.nodes["coord"].answers())


async def test_an_item_passed_on_and_assigned_again_is_handed_back_to_the_latest_sender():
    async with Net() as net:
        net.members.set("b")
        await net.loaded_worker("b")
        await net.assign("coord", "p")
        await soon(lambda: net.nodes["b"].assigned() == ["p"])
        await net.assign("coord-2", "p", attempt=2)
        await net.assign("coord-2", "q")
        await soon(lambda: net.nodes["b"].assigned() == ["p", "q"])
        dead = MemberEvent(MemberEventKind.DEAD, net.members.member("b"), at=0.0)
        for subscriber in net.members.subscribers:
            subscriber(dead)
        await soon(lambda: net.nodes["coord-2"].failure("p") is not None)
        failed = net.nodes["coord-2"].failure("p")
        assert (failed.code, failed.attempt) == (FailureKind.PEER_LOST, 2)
        assert net.nodes["coord"].failure("p") is None


async def passed_to_b(net: Net) -> TaskExecutor:
    """``w`` (loaded), having passed coord's item ``p`` to b."""
    net.members.set("b")
    executor = await net.loaded_worker("b")
    await net.assign("coord", "p")
    await soon(lambda: net.nodes["b"].assigned() == ["p"])
    return executor


@pytest.mark.parametrize(
    ("code", "runs_here"),
    [
        (FailureKind.SHUTTING_DOWN, True),
        (FailureKind.OVERLOADED, True),
        (FailureKind.MODEL_NOT_FOUND, True),
        (FailureKind.INFERENCE_ERROR, False),  # it ran there and failed: the coordinator decides
    ],
)
async def test_an_item_a_peer_refuses_runs_here_instead(code, runs_here):
    """b refuses the item w passed it (it never ran there): w, which has the model and is not
    draining, runs it itself instead of sending the refusal back to the coordinator."""
    async with Net() as net:
        executor = await passed_to_b(net)
        refusal = TaskFailed("p", 1, int(code), "no", retryable=True)
        await net.nodes["b"].peers.request("w", refusal)
        net.gate.set()
        coord = net.nodes["coord"]
        await soon(lambda: any(a[1] == "p" for a in coord.answers()))
        expected = ("TaskResult", "p", 1, "w") if runs_here else ("TaskFailed", "p", 1, "w")
        assert [a for a in coord.answers() if a[1] == "p"] == [expected]
        assert executor.stats.taken_back == int(runs_here)


async def test_an_item_passed_on_keeps_counting_down_its_deadline_when_sent_again_or_run_here():
    """An item with a 30 s deadline, passed to b: sent to b again after a lost session, and
    then run here after b refuses it, it has only what is left of those 30 s (its deadline
    counts from when it came to w, as the coordinator's does)."""
    async with Net() as net:
        net.members.set("b")
        executor = await net.loaded_worker("b")
        deadlines: list[float] = []
        infer = executor._infer

        async def noted(ref, batch, priority, deadline):
            if deadline is not None:  # (the three items w holds have none)
                deadlines.append(deadline - asyncio.get_running_loop().time())
            return await infer(ref, batch, priority, deadline)

        executor._infer = noted
        await net.nodes["coord"].peers.request("w", replace(item("p"), deadline_s=30.0))
        b = net.nodes["b"]
        await soon(lambda: b.assigned() == ["p"])
        await asyncio.sleep(0.3)
        first = await b_dials_again(net)
        await first.stream.aclose()  # lost: w sends the item again over b's other session
        await soon(lambda: b.assigned() == ["p", "p"])
        resent = [m for _, m in b.got if isinstance(m, TaskAssign)][1]
        assert 0 < resent.deadline_s <= 29.7
        await asyncio.sleep(0.3)
        refusal = TaskFailed("p", 1, int(FailureKind.OVERLOADED), "no", retryable=True)
        await b.peers.request("w", refusal)
        await soon(lambda: executor.stats.taken_back == 1)
        net.gate.set()  # (w runs one item at a time: the three it holds go first)
        await soon(lambda: deadlines)
        assert 0 < deadlines[0] <= 29.4
        await soon(lambda: any(a[1] == "p" for a in net.nodes["coord"].answers()))


async def b_dials_again(net: Net) -> Session:
    """b dials w again: a second session, w still sends over the first, which is returned."""
    b = net.nodes["b"]
    (first,) = b.peers.open_sessions("w")
    await dial_again(b.peers, "w")
    await soon(lambda: len(net.w.open_sessions("b")) == 2)
    return first


async def test_an_item_passed_to_a_peer_whose_only_session_is_lost_is_handed_back():
    async with Net() as net:
        executor = await passed_to_b(net)
        (session,) = net.nodes["b"].peers.open_sessions("w")
        await session.stream.aclose()  # b is gone without a word (a reset, as w sees it)
        await soon(lambda: net.nodes["coord"].failure("p") is not None)
        failed = net.nodes["coord"].failure("p")
        assert (failed.code, failed.retryable) == (FailureKind.PEER_LOST, True)
        assert "session lost" in failed.message and executor.stats.handed_back == 1


async def test_an_item_passed_on_is_sent_again_when_its_session_is_lost_and_another_stays():
    """b dialled w too (a second session), then the first one, which w passed the item over,
    is lost: the item may never have reached b, so w sends it again over the one left, and
    relays b's one answer."""
    async with Net() as net:
        executor = await passed_to_b(net)
        b, first = net.nodes["b"], await b_dials_again(net)
        await first.stream.aclose()  # lost, as w sees it; b's second session stays
        await soon(lambda: b.assigned() == ["p", "p"])
        assert executor.stats.passed_again == 1 and executor.stats.handed_back == 0
        output = Tensor.from_array(sample_inputs(MODEL, 1))
        await b.peers.request("w", TaskResult("p", 1, output, "b", "numpy", "cpu", {}))
        coord = net.nodes["coord"]
        await soon(lambda: coord.answers())
        assert coord.answers() == [("TaskResult", "p", 1, "w")] and coord.failure("p") is None


async def test_a_lost_session_that_carried_nothing_sends_nothing_again():
    """b dialled w too, and that second session, which w never sent anything over (w sends
    over the oldest), is lost: the item passed over the first is not sent again."""
    async with Net() as net:
        executor = await passed_to_b(net)
        b = net.nodes["b"]
        heard = asyncio.Event()
        b.peers.on(AppData, lambda _peer, _msg: heard.set())
        first = await b_dials_again(net)
        (second,) = [s for s in b.peers.open_sessions("w") if s is not first]
        await second.stream.aclose()  # lost, as w sees it
        await soon(lambda: len(net.w.open_sessions("b")) == 1)
        await net.w.request("b", AppData(topic="after", payload=b""))  # behind any resend
        async with asyncio.timeout(WAIT_S):
            await heard.wait()
        assert b.assigned() == ["p"] and executor.stats.passed_again == 0


async def test_an_item_passed_on_then_cancelled_is_not_run_here_when_the_peer_refuses_it():
    async with Net() as net:
        executor = await passed_to_b(net)
        await net.nodes["coord"].peers.request("w", TaskCancel("p", "no longer wanted"))
        refusal = TaskFailed("p", 1, int(FailureKind.OVERLOADED), "busy", retryable=True)
        await net.nodes["b"].peers.request("w", refusal)
        await soon(lambda: net.nodes["coord"].failure("p") is not None)
        assert executor.stats.taken_back == 0 and executor.backlog == 3


async def test_a_cancel_reaches_the_peer_an_item_was_passed_to():
    """The coordinator cancels an item w passed to b: w passes the cancel on (b would run it to
    the end otherwise), and relays b's CANCELLED."""
    async with Net() as net:
        executor = await passed_to_b(net)
        await net.nodes["coord"].peers.request("w", TaskCancel("p", "no longer wanted"))
        b = net.nodes["b"]
        await soon(lambda: b.cancels() == ["p"])
        cancelled = TaskFailed("p", 1, int(FailureKind.CANCELLED), "cancelled", retryable=False)
        await b.peers.request("w", cancelled)
        await soon(lambda: net.nodes["coord"].failure("p") is not None)
        assert net.nodes["coord"].failure("p").code == FailureKind.CANCELLED
        assert executor.stats.taken_back == 0 and b.assigned() == ["p"]


async def test_a_cancel_passed_on_is_sent_again_when_its_session_is_lost_and_another_stays():
    """As an item passed on is sent again over the session left, so is its cancel (instead of
    the item: it is not wanted any more)."""
    async with Net() as net:
        executor = await passed_to_b(net)
        b, first = net.nodes["b"], await b_dials_again(net)
        await net.nodes["coord"].peers.request("w", TaskCancel("p", "no longer wanted"))
        await soon(lambda: b.cancels() == ["p"])
        await first.stream.aclose()  # lost, as w sees it; b's second session stays
        await soon(lambda: b.cancels() == ["p", "p"])
        assert b.assigned() == ["p"] and executor.stats.passed_again == 0


async def test_only_a_coordinator_or_the_items_sender_may_cancel_it():
    """A vehicle of the fleet (v) cannot cancel what w runs for a coordinator: ignored and
    counted (a cancel for an item w does not hold is just ignored). An item a node (b) passed
    to w is b's to cancel. The coordinator's own cancel goes through."""
    async with Net() as net:
        net.members.set("v")
        net.members.set("b")
        executor = net.worker(KEEPING)
        await net.assign("coord", "x")
        await net.assign("b", "from-b")  # passed on by b: runs here, answered to b
        await soon(lambda: executor.backlog == 2)
        v = net.nodes["v"].peers
        await v.request("w", TaskCancel("x", "not mine"))
        await v.request("w", TaskCancel("nothing-here", "unknown: nothing to refuse"))
        await v.request("w", TaskCancel("from-b", "not mine either"))
        await soon(lambda: executor.stats.cancels_refused == 2)
        assert executor.backlog == 2 and executor.stats.cancelled == 0
        await net.nodes["b"].peers.request("w", TaskCancel("from-b", "b's own"))
        await soon(lambda: net.nodes["b"].failure("from-b") is not None)
        assert net.nodes["b"].failure("from-b").code == FailureKind.CANCELLED
        await net.nodes["coord"].peers.request("w", TaskCancel("x", "the coordinator's"))
        await soon(lambda: net.nodes["coord"].failure("x") is not None)
        assert net.nodes["coord"].failure("x").code == FailureKind.CANCELLED
        assert executor.stats.cancelled == 2 and executor.stats.cancels_refused == 2


async def test_a_coordinator_is_known_by_its_certificate_not_by_gossip_or_absence():
    """v, a vehicle membership has not heard of, and c, a vehicle whose gossip claims the
    coordinator role, are neither coordinators: their cancels are refused, and an item c sends
    runs here although w is over its offload depth and b is idle (one hop). coord-2, whose
    certificate names the role but whom membership does not list, may cancel."""
    config = replace(KEEPING, offload_queue_depth=1)
    async with Net() as net:
        del net.members.table["coord-2"]
        net.members.set("c", roles=("coordinator",))
        net.members.set("b")
        await net.connect("w", "b")
        executor = net.worker(config)
        await net.assign("coord", "x")
        await soon(lambda: executor.backlog == 1)
        await net.assign("c", "from-c")  # over the depth, but c is no coordinator: stays here
        await soon(lambda: executor.backlog == 2)
        for sender in ("v", "c"):
            await net.nodes[sender].peers.request("w", TaskCancel("x", "not a coordinator"))
        await soon(lambda: executor.stats.cancels_refused == 2)
        assert executor.stats.cancelled == 0 and net.nodes["b"].assigned() == []
        await net.nodes["coord-2"].peers.request("w", TaskCancel("x", "a coordinator"))
        await soon(lambda: net.nodes["coord"].failure("x") is not None)
        assert net.nodes["coord"].failure("x").code == FailureKind.CANCELLED
        assert executor.stats.cancelled == 1 and executor.stats.cancels_refused == 2


async def test_only_a_coordinator_or_the_items_sender_may_re_assign_it():
    """v, a vehicle, re-assigns coord's item x (which would make w answer v) and then cancels
    it: the re-assignment is refused (a node passing on a retry of x runs it itself instead of
    waiting for its timer), the cancel ignored, both counted; coord still gets x's result."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        await net.assign("coord", "x")
        await soon(lambda: executor.backlog == 1)
        await net.assign("v", "x", attempt=7)
        await net.nodes["v"].peers.request("w", TaskCancel("x", "not mine"))
        await soon(lambda: executor.stats.cancels_refused == 1)
        assert executor.stats.reassigns_refused == 1 and executor.stats.cancelled == 0
        net.gate.set()
        await soon(lambda: net.nodes["coord"].answers() == [("TaskResult", "x", 1, "w")])
        assert net.nodes["v"].answers() == [("TaskFailed", "x", 7, "w")]  # refused, not run
        refusal = net.nodes["v"].failure("x")  # retryable: a node that passed x on runs it
        assert (refusal.code, refusal.retryable) == (FailureKind.OVERLOADED, True)


def confirm_result_late(net: Net, item_id: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the worker's session writes of ``item_id``'s result queue at once but confirm only
    once the second event returned is set; the first is set when the result is queued."""
    queued, written = asyncio.Event(), asyncio.Event()
    request = net.w.request

    async def confirmed_late(node, msg):
        sent = asyncio.ensure_future(request(node, msg))
        if isinstance(msg, TaskResult) and msg.item_id == item_id:
            queued.set()
            await written.wait()
        await sent

    net.w.request = confirmed_late
    return queued, written


async def test_a_cancel_after_the_answer_was_queued_changes_nothing():
    """x's result is queued for coord (its session write not yet confirmed) when coord's
    cancel arrives: too late to cancel, so x completes, counted as completed and not as
    cancelled, and coord gets the result, no CANCELLED."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        queued, written = confirm_result_late(net, "x")
        await net.assign("coord", "x")
        net.gate.set()
        await soon(queued.is_set)
        await net.nodes["coord"].peers.request("w", TaskCancel("x", "too late"))
        await net.assign("coord", "y")  # after the cancel on the same session: it was handled
        await soon(lambda: executor.stats.accepted == 2)
        written.set()
        await soon(lambda: executor.stats.completed == 2)
        assert executor.stats.cancelled == 0
        assert sorted(net.nodes["coord"].answers()) == [
            ("TaskResult", "x", 1, "w"),
            ("TaskResult", "y", 1, "w"),
        ]


async def test_a_draining_node_relays_its_peers_refusal():
    async with Net() as net:
        executor = await passed_to_b(net)
        draining = asyncio.create_task(executor.drain(timeout=WAIT_S))
        await asyncio.sleep(0)
        refusal = TaskFailed("p", 1, int(FailureKind.SHUTTING_DOWN), "draining", retryable=True)
        await net.nodes["b"].peers.request("w", refusal)
        await soon(lambda: net.nodes["coord"].failure("p") is not None)
        assert net.nodes["coord"].failure("p").code == FailureKind.SHUTTING_DOWN
        assert executor.stats.taken_back == 0
        net.gate.set()
        await draining


async def test_a_held_item_cancelled_reports_to_its_latest_assignment():
    async with Net() as net:
        executor = net.worker(KEEPING)
        await net.assign("coord", "x")
        await soon(lambda: executor.running == 1)
        await net.assign("coord-2", "x", attempt=2)
        await net.nodes["coord-2"].peers.request("w", TaskCancel("x", "retried, then cancelled"))
        await soon(lambda: net.nodes["coord-2"].failure("x") is not None)
        failed = net.nodes["coord-2"].failure("x")
        assert (failed.code, failed.attempt) == (FailureKind.CANCELLED, 2)
        await net.assign("coord", "y")
        net.gate.set()
        await soon(lambda: ("TaskResult", "y", 1, "w") in net.nodes["coord"].answers())
        assert net.nodes["coord"].answers() == [("TaskResult", "y", 1, "w")]


async def test_a_refused_reassignment_does_not_take_the_answer():
    """A re-assignment refused on arrival (here: its input by reference is not in w's cache)
    is answered as refused; the running item still answers the assignment it runs under."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        await net.assign("coord", "x")
        await soon(lambda: executor.running == 1)
        again = by_reference(item("x", attempt=2), content_digest(b"never sent"))
        await net.nodes["coord-2"].peers.request("w", again)
        await soon(lambda: net.nodes["coord-2"].failure("x") is not None)
        assert net.nodes["coord-2"].failure("x").code == FailureKind.INPUT_NOT_CACHED
        net.gate.set()
        await soon(lambda: ("TaskResult", "x", 1, "w") in net.nodes["coord"].answers())
        assert net.nodes["coord-2"].answers() == [("TaskFailed", "x", 2, "w")]


async def test_a_reassignment_refused_while_draining_does_not_take_the_answer():
    async with Net() as net:
        executor = net.worker(KEEPING)
        await net.assign("coord", "x")
        await soon(lambda: executor.running == 1)
        draining = asyncio.create_task(executor.drain(timeout=WAIT_S))
        await asyncio.sleep(0)  # drain() refuses new work from its first step on
        await net.assign("coord-2", "x", attempt=2)
        await soon(lambda: net.nodes["coord-2"].failure("x") is not None)
        assert net.nodes["coord-2"].failure("x").code == FailureKind.SHUTTING_DOWN
        net.gate.set()
        await draining
        await soon(lambda: ("TaskResult", "x", 1, "w") in net.nodes["coord"].answers())
        assert net.nodes["coord-2"].answers() == [("TaskFailed", "x", 2, "w")]
