"""Session 27 fixes (b): the executor relays what a re-enrolled helper answers over its good
session while an old session of it, under a revoked certificate, is still being cut. (Which of
a discovered peer's addresses is dialled is tested in tests/test_discovery_fixes28.py.)

Real peer tables and Noise sessions over the in-memory transport (the
:class:`~tests.test_executor_sharing.Net` of the work-sharing tests)."""

from __future__ import annotations

import time

from meshinfer.inference.synthetic import sample_inputs
from meshinfer.proto.messages import AppData
from meshinfer.proto.tasks_wire import TaskAccepted, TaskResult, Tensor
from tests.test_executor_sharing import MODEL, Endpoint, Net, soon

# --- an answer over a re-enrolled helper's good session -----------------------------------------


async def reenrolled_b(net: Net) -> tuple[Endpoint, Endpoint]:
    """b re-enrolled: its new certificate's session with w is the oldest (the one w sends
    over), and a process left over under its old certificate dialled w too. Returns (fresh,
    stale)."""
    net.members.set("b")
    old = net.fleet.identities["b"]
    new = net.fleet.enroll("b")
    fresh = await net.endpoint("b", new, listen=False)
    stale = await net.endpoint("b", old, listen=False)
    net.nodes["b-new"], net.nodes["b-old"] = fresh, stale  # closed with the rest
    for count, node in enumerate((fresh, stale), 1):
        net.teach(node.peers)
        await node.peers.request("w", AppData(topic="hello", payload=b""))
        await soon(lambda n=count: len(net.w.open_sessions("b")) == n)
    assert net.w.session("b").peer.serial == new.certificate.serial  # the one sent over
    return fresh, stale


async def test_a_reenrolled_helpers_answer_over_its_good_session_is_relayed_during_a_cut():
    """w passed p to b over b's good session; then b's old serial is revoked (the cut of the
    old session has not run yet). b's TaskAccepted and result, over the good session, reach
    coord: they cannot have come over the revoked session (the peer table drops that)."""
    async with Net() as net:
        fresh, stale = await reenrolled_b(net)
        executor = net.worker()
        await net.fill(executor)
        await net.assign("coord", "p")
        await soon(lambda: fresh.assigned() == ["p"])
        net.w.admission.revocations = net.fleet.authority.revoke(
            net.fleet.revocations, now=time.time(), serial=_old_serial(net, "b")
        )
        assert len(net.w.open_sessions("b")) == 2  # the old one is being cut, not yet closed
        await fresh.peers.request("w", TaskAccepted("p", 1, "b", 0))
        result = TaskResult("p", 1, Tensor.from_array(sample_inputs(MODEL, 1)), "b", "", "", {})
        await fresh.peers.request("w", result)
        coord = net.nodes["coord"]
        await soon(lambda: ("TaskResult", "p", 1, "w") in coord.answers())
        accepted = [m for _, m in coord.got if isinstance(m, TaskAccepted) and m.item_id == "p"]
        assert accepted == [TaskAccepted("p", 1, "b", 0)]
        assert executor.stats.relayed == 1 and executor.stats.handed_back == 0
        assert stale.assigned() == []


def _old_serial(net: Net, node: str) -> int:
    """The serial of the newest open session's certificate of ``node`` at w that is not the
    fleet's current certificate of ``node`` (the old one)."""
    current = net.fleet.identities[node].certificate.serial
    (serial,) = {s.peer.serial for s in net.w.open_sessions(node)} - {current}
    return serial
