"""Adversarial review of the coordinator's failover and run bookkeeping (session 38).

Fakes of the peer table and its sessions (``tests.test_coordinator_failover``) pin down the
probe's rules; a real coordinator and node daemons in this process
(``tests.test_coordinator_service.Mesh``: real TCP on loopback, a real SQLite journal) the
retries, each race set up by calling the coordinator's handlers in the order under test.
"""

from __future__ import annotations

from coordinator.service import CoordinatorConfig
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.tasks_wire import FailureKind, TaskFailed
from tests.helpers import until
from tests.test_coordinator_failover import FakePeers, fake_reachability
from tests.test_coordinator_service import Mesh, hold_inference, spec


async def test_a_session_opened_during_the_probe_and_lost_again_is_no_answer():
    """A node's only session is lost; while the probe's dial waits, the node dials in (a new
    session opens) and that session is lost too, before the probe ends. No session with the
    node is left open and the dial fails: the node answered nothing, so its items move
    (before: any session opened meanwhile counted as an answer, even one already lost, whose
    loss starts no probe of its own while the node is under probe: the node's items were
    sent again into a dial that fails, and it stayed schedulable, dead, until membership
    said so; one still open is an answer: test_coordinator_failover)."""
    peers = FakePeers()
    reach, counts, lost, resent = fake_reachability(peers, redial_timeout_s=5.0)
    try:
        peers.open("veh-a").end(lost=True)
        await until(lambda: peers.dials == 1)  # the probe dials (and waits on it)
        peers.open("veh-a").end(lost=True)  # opened and lost while the node is under probe
        await until(lambda: counts.sessions_lost == 2)
        peers.dialled.set()  # the dial fails
        await until(lambda: bool(lost or resent))
        assert (lost, resent) == (["veh-a"], [])
        assert counts.redials_ok == 0
    finally:
        await reach.aclose()


async def test_an_item_refused_on_every_attempt_says_so_when_it_gives_up(tmp_path):
    """Every attempt of an item is refused (the node is overloaded): past the refusals that do
    not count, it fails, and its reason must not say that the others failed."""
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(
        item_timeout_s=30.0, max_attempts=1, retry_backoff_s=0.0, retry_backoff_max_s=0.01
    )
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        gate = hold_inference(mesh.daemons["node-0"])
        try:
            c = mesh.coordinator
            task_id = await c.submit(spec("refused", "single", x[:1]))
            entry = c._items["refused/0"][1]
            for attempt in (1, 2):
                await until(lambda a=attempt: entry.node is not None and entry.attempt == a)
                busy = TaskFailed("refused/0", attempt, FailureKind.OVERLOADED, "busy", True)
                c._on_failed(entry.node, busy)
            record = await c.wait(task_id, timeout=10)
        finally:
            gate.set()
    assert record.state.value == "failed"
    error = record.summary.error or ""
    # before: "gave up after 2 attempts (1 refused)", as if the other attempt had failed
    assert "gave up after 2 attempts (1 refusal not counted); last: node-0: busy" in error, error
