"""State that a long-running node or coordinator must not keep growing: each test drives many
events through the real object and checks that what it holds stays bounded, or is emptied.

The revocation exchange's shortfalls (meshinfer/proto/revocation_sync.py), the coordinator's
reachability bookkeeping (coordinator/failover.py), the node executor's slot waiters and its
kept results (node/executor.py, node/replay.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from types import SimpleNamespace

from coordinator.failover import Reachability
from meshinfer.proto.membership import MemberEvent, MemberEventKind
from meshinfer.proto.revocation_wire import RevocationsOffer
from meshinfer.proto.tasks_wire import FailureKind, TaskCancel, TaskResult
from meshinfer.runtime.revocations import CutOff
from node.executor import _Slots
from node.replay import ResultReplay
from tests.helpers import until
from tests.test_coordinator_failover import FakePeers, node_ids_kept
from tests.test_executor_sharing import KEEPING, Net, soon
from tests.test_result_replay import answer, keep
from tests.test_revocation_exchange import PATIENCE, exchange


def ids_kept(obj: object, prefix: str) -> set[str]:
    """The ids starting with ``prefix`` among the keys and members of ``obj``'s containers."""
    kept: set[str] = set()
    for value in vars(obj).values():
        if isinstance(value, dict | set | list):
            kept |= {k for k in value if isinstance(k, str) and k.startswith(prefix)}
    return kept


# --- the revocation exchange -----------------------------------------------------------------


def test_shortfalls_of_members_that_left_are_forgotten_and_a_live_one_is_not_asked_again():
    """Hundreds of members each claim a version and answer nothing, then leave: the exchange
    keeps only the shortfall of the member still live, which it still does not ask again."""
    ours, rng = exchange(0), random.Random(0)
    stays = "m-stays"
    now = 0.0
    for member in (stays, *(f"m-{i}" for i in range(300))):
        now += PATIENCE
        asking = ours.question({member: 5, stays: 5}, now, rng)
        assert asking is not None and asking[0] == member
        ours.asked(member, 5, now)
        short = ours.take(member, RevocationsOffer(()), now + 0.1)
        assert ours.checked(short, bad=False) is False  # short of its claim
    now += PATIENCE
    assert ours.question({stays: 5}, now, rng) is None  # (no loop: it is not asked again)
    assert ids_kept(ours, "m-") == {stays}
    assert ours.question({stays: 6}, now + PATIENCE, rng) is not None  # (claims another)


# --- the coordinator's reachability ----------------------------------------------------------


class Peers(FakePeers):
    """:class:`FakePeers` whose dials succeed once ``dialled`` is set unless ``failing``, and
    whose sessions with the nodes in ``revoked_carriers`` are being cut."""

    def __init__(self, *, failing: bool = True) -> None:
        super().__init__()
        self.failing = failing
        self.revoked_carriers: set[str] = set()

    async def request(self, node: str, msg) -> None:
        if self.failing:
            await super().request(node, msg)
        self.dials += 1

    def carrier_revoked(self, node: str) -> bool:
        return node in self.revoked_carriers


def reachability(peers: FakePeers, members: dict[str, object], **kw):
    """A started :class:`Reachability` over ``peers``, with membership knowing ``members``:
    ``(reach, counts, lost, resent, cut_off)``, ``cut_off(cut)`` telling it of a cut."""
    counts = SimpleNamespace(sessions_lost=0, sessions_closed=0, redials_ok=0)
    lost: list[str] = []
    resent: list[str] = []
    cut_listeners: list = []
    membership = SimpleNamespace(core=SimpleNamespace(member=members.get))
    sync = SimpleNamespace(on_cut_off=cut_listeners.append)
    mesh = SimpleNamespace(peers=peers, revocation_sync=sync, membership=membership)
    reach = Reachability(
        mesh, counts, redial_timeout_s=5.0, on_lost=lambda node, _why: lost.append(node),
        on_back=lambda: None, on_resend=resent.append, **kw,
    )  # fmt: skip
    reach.start()
    return reach, counts, lost, resent, lambda cut: [f(cut) for f in cut_listeners]


async def test_nodes_given_up_on_that_membership_does_not_know_are_not_kept():
    """Many nodes membership does not know lose their session and answer no dial: each is
    re-dispatched, none is kept (none is ever scheduled); a member given up on is."""
    peers = Peers()
    peers.dialled.set()  # dials fail at once
    member = SimpleNamespace(node_id="veh-member", incarnation=3)
    reach, _, lost, _, _ = reachability(peers, {"veh-member": member})
    try:
        for i in range(100):
            peers.open(f"veh-{i}").end(lost=True)
        peers.open("veh-member").end(lost=True)
        await until(lambda: len(lost) == 101)
        assert node_ids_kept(reach) == {"veh-member"} and not reach.reachable(member)
    finally:
        await reach.aclose()


async def test_a_revoked_node_is_kept_out_until_membership_forgets_it():
    """Cut off with no good session left: out of scheduling whatever membership says, until it
    forgets the node (then nothing is kept of it); a node membership does not know, cut off,
    leaves nothing."""
    peers = Peers()
    member = SimpleNamespace(node_id="veh-r", incarnation=1)
    reach, _, lost, _, cut_off = reachability(peers, {"veh-r": member})
    try:
        for node in ("veh-r", *(f"veh-stranger-{i}" for i in range(50))):
            cut_off(CutOff(node, serial=7, still_connected=False, carried_sends=True))
        assert len(lost) == 51 and node_ids_kept(reach) == {"veh-r"}
        back = SimpleNamespace(node_id="veh-r", incarnation=99)
        reach.on_member(MemberEvent(MemberEventKind.ALIVE, back, at=0.0))
        assert not reach.reachable(back)  # (a higher incarnation is not enough)
        reach.on_member(MemberEvent(MemberEventKind.FORGOTTEN, member, at=0.0))
        assert node_ids_kept(reach) == set() and reach.reachable(back)
    finally:
        await reach.aclose()


async def probed_during_a_cut(peers: Peers, **kw):
    """``veh-a`` loses a session and answers the re-dial while the session its items go over
    is being cut: its items wait for the cut (``(reach, resent)``)."""
    peers.revoked_carriers.add("veh-a")
    reach, counts, _, resent, _ = reachability(peers, {}, **kw)
    peers.open("veh-a").end(lost=True)
    peers.dialled.set()
    await until(lambda: counts.redials_ok == 1)
    assert resent == [] and node_ids_kept(reach) == {"veh-a"}
    return reach, resent


async def test_a_node_waiting_for_a_cut_that_never_comes_is_not_kept():
    """The session being cut closed otherwise (no cut comes): once ``cut_wait_s`` passed, the
    node's items go again over the session still open with it, and nothing is kept."""
    peers = Peers(failing=False)
    reach, resent = await probed_during_a_cut(peers, cut_wait_s=0.05)
    try:
        peers.open("veh-a")  # a good session stays
        peers.revoked_carriers.clear()  # (the one being cut closed without a cut)
        await until(lambda: resent == ["veh-a"])
        assert node_ids_kept(reach) == set()
    finally:
        await reach.aclose()


async def test_a_node_left_with_no_session_after_a_cut_that_never_came_is_dropped():
    peers = Peers(failing=False)
    reach, resent = await probed_during_a_cut(peers, cut_wait_s=0.05)
    try:
        peers.revoked_carriers.clear()
        await until(lambda: node_ids_kept(reach) == set())
        assert resent == []  # (no session to send them over: left to their timeout)
    finally:
        await reach.aclose()


async def test_a_node_whose_cut_is_slow_waits_on_and_aclose_stops_the_wait():
    peers = Peers(failing=False)
    reach, resent = await probed_during_a_cut(peers, cut_wait_s=0.01)
    try:
        timer = reach._resend_after_cut["veh-a"]
        await until(lambda: reach._resend_after_cut.get("veh-a") not in (None, timer))
        assert resent == []  # still being cut: looked at again later
    finally:
        await reach.aclose()
    assert node_ids_kept(reach) == set()


# --- the node executor: slot waiters ---------------------------------------------------------


async def test_cancelled_waiters_do_not_pile_up_while_every_slot_is_busy():
    """One item holds the only slot; a hundred more wait for it and are cancelled by the
    coordinator: the waiters are dropped, not kept until the slot frees, and the slot still
    goes to the next item once it does."""
    async with Net() as net:
        executor = net.worker(KEEPING)
        await net.assign("coord", "busy")
        await soon(lambda: executor.running == 1)
        n = 100
        for i in range(n):
            await net.assign("coord", f"w-{i}")
        await soon(lambda: len(executor._slots._waiters) == n)
        for i in range(n):
            await net.nodes["coord"].peers.request("w", TaskCancel(f"w-{i}"))
        await soon(lambda: executor.backlog == 1)
        assert len(executor._slots._waiters) <= 1
        cancelled = [
            a for a in net.nodes["coord"].answers() if a[0] == "TaskFailed" and a[1] != "busy"
        ]
        assert len(cancelled) == n
        assert net.nodes["coord"].failure("w-0").code == int(FailureKind.CANCELLED)
        await net.assign("coord", "next")
        net.gate.set()
        await soon(lambda: ("TaskResult", "next", 1, "w") in net.nodes["coord"].answers())
        assert ("TaskResult", "busy", 1, "w") in net.nodes["coord"].answers()


async def test_slots_go_by_priority_after_cancelled_waiters_are_dropped():
    slots = _Slots(1)
    await slots.acquire(0)
    order: list[int] = []

    async def waiter(priority: int) -> None:
        await slots.acquire(priority)
        order.append(priority)
        slots.release()

    doomed = [asyncio.create_task(slots.acquire(3)) for _ in range(20)]
    kept = [asyncio.create_task(waiter(p)) for p in (1, 2, 0, 2)]
    await until(lambda: len(slots._waiters) == 24)
    for task in doomed:
        task.cancel()
    await asyncio.gather(*doomed, return_exceptions=True)
    assert len(slots._waiters) == 4
    slots.release()
    await asyncio.gather(*kept)
    assert order == [2, 2, 1, 0] and slots.free == 1 and slots._waiters == []


# --- kept results ----------------------------------------------------------------------------


def test_reading_the_store_drops_what_expired():
    replay = ResultReplay(1 << 20, keep_s=10)
    for i in range(50):
        keep(replay, f"old-{i}", 0.0)
    keep(replay, "new", 5.0)
    assert answer(replay, "new", 11.0) is not None
    assert len(replay) == 1
    assert replay.expire(11.0) == 15.0
    assert replay.expire(15.0) is None and len(replay) == 0 and replay.bytes == 0


async def test_an_idle_node_drops_its_kept_results_once_they_expire():
    """A node answers an item, then gets nothing more: its kept result is dropped once its
    time is up (not held until the next result is kept), and stopping the node cancels the
    sweep's timer."""
    async with Net() as net:
        config = dataclasses.replace(KEEPING, result_replay_s=0.2)
        executor = net.worker(config)
        net.gate.set()
        await net.assign("coord", "x")
        await soon(lambda: ("TaskResult", "x", 1, "w") in net.nodes["coord"].answers())
        await soon(lambda: len(executor.replay) == 0)
        assert executor.replay.bytes == 0 and executor._replay_sweep is None


async def test_stopping_the_executor_cancels_the_sweep_of_kept_results():
    async with Net() as net:
        executor = net.worker(KEEPING)  # (results kept for a minute)
        net.gate.set()
        await net.assign("coord", "x")
        await soon(lambda: len(executor.replay) == 1)
        sweep = executor._replay_sweep
        assert sweep is not None
        await executor.aclose()
        assert sweep.cancelled() and executor._replay_sweep is None
        assert isinstance(net.nodes["coord"].got[-1][1], TaskResult)
