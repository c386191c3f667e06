"""Faults found in session 33's review of work sharing (node/work_sharing.py) and of the peer
table (meshinfer/runtime/peers.py): answers from a helper that are not relayed are logged; a node
whose certificate grants the coordinator role passes nothing on (its helper would take the item
for a coordinator's and could pass it on again); a node membership forgets while a session with
it is open does not stay in the peer table's addresses for ever.

Real peer tables and Noise sessions over the in-memory transport and real TCP on loopback (the
:class:`~tests.test_executor_sharing.Net` of the work-sharing tests and the
:class:`~tests.test_peers.Pair` of the peer-table tests), a real NumPy engine and batcher held
by a gate, and a stand-in membership table.
"""

from __future__ import annotations

import logging

import pytest

from meshinfer.proto.messages import AppData
from meshinfer.proto.tasks_wire import FailureKind, TaskFailed
from tests.helpers import until
from tests.test_executor_sharing import Net, passed_to_b, soon
from tests.test_peers import Pair
from tests.test_sharing_faults import output

# --- answers from a helper that are not relayed ---------------------------------------------


async def test_an_answer_not_relayed_is_logged_with_why(caplog: pytest.LogCaptureFixture):
    """w passed p to b. c's result for p (p went to b), b's for an attempt w never passed and
    b's for an item w never passed on are each dropped, with a line saying why; b's own answer
    is relayed, and a second one after it is dropped, logged too."""
    caplog.set_level(logging.INFO, logger="node.executor")
    async with Net() as net:
        executor = await passed_to_b(net)
        await net.connect("c", "w")
        await net.nodes["c"].peers.request("w", output("p", "c"))
        stale = TaskFailed("p", 7, int(FailureKind.INFERENCE_ERROR), "x", retryable=False)
        await net.nodes["b"].peers.request("w", stale)
        await net.nodes["b"].peers.request("w", output("nobody", "b"))
        await net.nodes["b"].peers.request("w", output("p", "b"))
        await soon(lambda: executor.stats.relayed == 1)
        await net.nodes["b"].peers.request("w", output("p", "b"))
        await soon(lambda: len(ignored(caplog)) == 4)
        lines = ignored(caplog)
        assert "result of p (attempt 1) from c not relayed: it was passed to b" in lines[0]
        assert (
            "failure of p (attempt 7) from b not relayed: it was passed on as attempt 1"
            in (lines[1])
        )
        assert "result of nobody (attempt 1) from b not relayed: not passed on" in lines[2]
        assert "result of p (attempt 1) from b not relayed: not passed on" in lines[3]
        assert [a for a in net.nodes["coord"].answers() if a[1] == "p"] == [
            ("TaskResult", "p", 1, "w")
        ]


def ignored(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not relayed" in r.getMessage()]


# --- one hop: a node with the coordinator role passes nothing on ------------------------------


async def test_a_node_whose_certificate_grants_the_coordinator_role_passes_nothing_on():
    """w's certificate grants it the coordinator role besides its vehicle one. b, idle, would
    take w's item for a coordinator's, free to pass it on again (back towards w: a cycle only
    the answer timers end). So w, loaded, runs the item itself."""
    net = Net()
    net.fleet.enroll("w", ("vehicle", "coordinator"))
    async with net:
        net.members.set("b")
        executor = await net.loaded_worker("b")
        assert "coordinator" in net.nodes["b"].peers.roles("w")  # what b would go by
        await net.assign("coord", "p")
        await soon(lambda: executor.backlog == 4)
        assert executor.stats.offloaded == 0 and net.nodes["b"].assigned() == []
        net.gate.set()
        await soon(lambda: ("TaskResult", "p", 1, "w") in net.nodes["coord"].answers())


# --- the peer table forgets a node forgotten while connected ------------------------------------


async def test_a_node_forgotten_while_connected_is_dropped_once_its_session_ends(
    transport_and_addr,
):
    """Membership forgets bravo while alpha has a session with it: the session goes on carrying
    messages, and bravo is not in ``addresses`` any more (membership, which learns a node only
    when its address is not known, sees it as new if it comes back); once the session ends,
    nothing of bravo is left and a send to it is refused at once (the table kept its address
    for ever before)."""
    transport, addr = transport_and_addr
    async with Pair(transport, addr) as pair:
        alpha = pair.alpha
        await alpha.request("bravo", AppData(topic="t", payload=b"1"))
        alpha.forget("bravo")
        assert "bravo" not in alpha.addresses
        await alpha.request("bravo", AppData(topic="t", payload=b"2"))
        assert await pair.received(2) == [b"1", b"2"]
        await pair.bravo.disconnect("alpha")
        await until(lambda: alpha.open_sessions("bravo") == [] and alpha.connected == [], 5.0)
        await until(lambda: "bravo" not in alpha._sessions, 5.0)
        assert "bravo" not in alpha.addresses and alpha._parked == {}
        assert not alpha.send("bravo", AppData(topic="t", payload=b"3"))


async def test_a_node_learnt_again_while_connected_is_kept_after_its_session_ends(
    transport_and_addr,
):
    transport, addr = transport_and_addr
    async with Pair(transport, addr) as pair:
        alpha = pair.alpha
        await alpha.request("bravo", AppData(topic="t", payload=b"1"))
        known = alpha.addresses["bravo"]
        alpha.forget("bravo")
        alpha.learn("bravo", known.address, known.static_key)
        assert await pair.received(1) == [b"1"]
        await pair.bravo.disconnect("alpha")
        await until(lambda: "bravo" not in alpha._sessions, 5.0)
        assert alpha.addresses["bravo"] == known
        await alpha.request("bravo", AppData(topic="t", payload=b"2"))  # dialled anew
        assert await pair.received(1) == [b"2"]


async def test_a_node_forgotten_with_no_session_is_forgotten_at_once(transport_and_addr):
    transport, addr = transport_and_addr
    async with Pair(transport, addr) as pair:
        pair.alpha.forget("bravo")
        assert "bravo" not in pair.alpha.addresses
        assert not pair.alpha.send("bravo", AppData(topic="t", payload=b"1"))
