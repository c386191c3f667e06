"""What a peer that holds a valid fleet certificate must not be able to do.

The unauthenticated listener is tested in ``test_listener_abuse.py`` and the decoders are fuzzed
in ``test_messages.py``, ``test_membership_wire.py`` and ``test_framing.py``; here the attacker
passed admission (or is finishing its handshake), so what it sends is well formed and comes
over its own session.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import numpy as np
import pytest

from meshinfer.errors import HandshakeError
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto import framing
from meshinfer.proto.membership import Membership, MemberStatus
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_wire import (
    MAX_COUNTER,
    AliveRecord,
    DeadRecord,
    Gossip,
    LeftRecord,
    NodeState,
    SuspectRecord,
    decode_packet,
    encode_packet,
    encode_record,
)
from meshinfer.proto.messages import AppData, Ping, Pong
from meshinfer.proto.tasks_wire import TaskResult, Tensor
from meshinfer.runtime.endpoint import SessionListener, dial
from meshinfer.runtime.session import DISPATCH_BATCH, SessionMetrics, accept, connect
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpTransport
from tests.helpers import until
from tests.test_coordinator_service import DIGITS, Mesh, hold_inference, spec

# --- membership: claims that would leave a live member unable to refute ----------------------


def _core(node_id: str, peers: list[str]) -> Membership:
    known = [AliveRecord(p, 0, 1, NodeState(host=f"{p}.local", port=7946)) for p in peers]
    state = NodeState(host=f"{node_id}.local", port=7946)
    return Membership(
        node_id, state, MembershipConfig.test(), random.Random(3), 0.0, known_members=known
    )


def _gossip(*records) -> bytes:
    return encode_packet(Gossip(), [encode_record(r) for r in records])


def _sent_records(m: Membership) -> list:
    """Every record of every packet ``m`` wants to send (each packet must decode)."""
    return [r for out in m.drain_packets() for r in decode_packet(out.data).records]


def _sent_records_after_tick(m: Membership) -> list:
    """:func:`_sent_records` once ``m`` ran its next timers (its gossip among them)."""
    m.tick(m.next_deadline())
    return _sent_records(m)


def test_a_relayed_claim_above_the_members_own_incarnation_is_lowered_to_it() -> None:
    """A hostile member accuses ``a`` at the top incarnation: a relay that took it as it is
    would need ``a`` to refute above the top, which no decoder accepts (``a`` dead for good).
    It is a claim at ``a``'s own incarnation instead: plain SWIM gossip, refutable."""
    relay = _core("b", ["a", "h"])
    relay.handle_packet("h", _gossip(SuspectRecord("a", MAX_COUNTER, "h")), 1.0)
    member = relay.member("a")
    assert member.status is MemberStatus.SUSPECT and member.incarnation == 0
    assert SuspectRecord("a", 0, "h") in _sent_records_after_tick(relay)
    relay.handle_packet("h", _gossip(DeadRecord("a", 9, "h")), 1.1)
    assert relay.member("a").incarnation == 0 and relay.counters.claims_ahead == 2
    refutation = AliveRecord("a", 1, 1, NodeState(host="a.local", port=7946))
    relay.handle_packet("a", _gossip(refutation), 1.2)
    assert relay.member("a").status is MemberStatus.ALIVE


def test_a_claim_about_self_that_cannot_be_refuted_in_range_is_ignored() -> None:
    """Told directly that it is dead or suspect above its own incarnation, a node refutes one
    above its own number, not the claim's (a liar's top number would leave it unable to refute
    again); its own record at the top cannot be outbid and is ignored (every peer would refuse
    an ALIVE record above it); one just below the top is outbid at the top, and even a leave
    from the top stays decodable."""
    a = _core("a", ["b", "h"])
    a.handle_packet("h", _gossip(DeadRecord("a", MAX_COUNTER, "h")), 1.0)
    assert a.incarnation == 1 and a.counters.claims_ahead == 1
    a.handle_packet("h", _gossip(AliveRecord("a", MAX_COUNTER, 1, NodeState())), 1.0)
    assert a.incarnation == 1 and a.counters.claims_ahead == 2
    a.handle_packet("h", _gossip(SuspectRecord("a", MAX_COUNTER - 1, "h")), 1.1)
    assert a.incarnation == 2 and a.counters.claims_ahead == 3
    a.handle_packet("h", _gossip(AliveRecord("a", MAX_COUNTER - 1, 1, NodeState())), 1.2)
    assert a.incarnation == MAX_COUNTER
    assert AliveRecord("a", MAX_COUNTER, 1, a.local_state) in _sent_records_after_tick(a)
    a.leave(2.0)
    assert any(isinstance(r, LeftRecord) for r in _sent_records(a))


# --- sessions: a flood of control messages -----------------------------------------------------


async def test_a_ping_flood_is_answered_in_turns_that_leave_the_loop_to_others(
    transport_and_addr,
):
    """A peer packs thousands of pings in each record (an honest ``send_many`` does): every
    one is answered, the session stays up, and the reader hands the loop to other tasks at
    least every ``DISPATCH_BATCH`` messages (it answered a whole read's worth in one step:
    tens of thousands of pongs, a loop blocked for half a second per 256 KiB read)."""
    transport, bind = transport_and_addr
    fleet = make_fleet(None, ["alpha", "bravo"])
    metrics = SessionMetrics()
    listener = SessionListener(transport, fleet.admission("bravo"), _idle, metrics=metrics)
    addr = await listener.start(bind)
    attacker = await dial(transport, addr, fleet.admission("alpha"))
    await attacker.ping()  # the server's session is open
    pongs = _count_pongs(attacker)
    watch = StepWatch(lambda: metrics.messages_received)
    try:
        sent = 0
        for _ in range(4):  # 4 x 8192 pings, packed ~13000 to a record
            sent += await attacker.send_many([Ping(nonce=i) for i in range(8192)])
        await until(lambda: pongs["n"] == sent)
        assert attacker.is_open and metrics.protocol_errors == 0
    finally:
        await watch.stop()
        await attacker.aclose()
        await listener.aclose()
    assert 0 < watch.largest <= 2 * DISPATCH_BATCH, watch.largest


async def _idle(session) -> None:
    await session.wait_closed()


def _count_pongs(session) -> Counter[str]:
    """Count (under ``"n"``) the Pongs ``session`` receives (it ignores those it did not ask
    for)."""
    pongs: Counter[str] = Counter()
    dispatch = session._dispatch

    async def counting(msg) -> None:
        if isinstance(msg, Pong):
            pongs["n"] += 1
        await dispatch(msg)

    session._dispatch = counting
    return pongs


class StepWatch:
    """A task that takes a turn on every pass of the loop and records the most ``count()``
    grew between two of its turns: what other tasks did in one pass."""

    def __init__(self, count) -> None:
        self.count = count
        self.largest = 0
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        last = self.count()
        while True:
            await asyncio.sleep(0)
            now = self.count()
            self.largest = max(self.largest, now - last)
            last = now

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


# --- sessions: what comes right behind the handshake -------------------------------------------


class ChoppedStream:
    """A stream whose reads return at most ``size`` bytes (a slow link's segments)."""

    def __init__(self, stream, size: int) -> None:
        self._stream, self._size = stream, size

    async def read(self, max_bytes: int = 65536) -> bytes:
        return await self._stream.read(min(max_bytes, self._size))

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@pytest.mark.parametrize("segment", [None, 1000])
async def test_messages_sent_right_behind_the_last_handshake_record_arrive(
    transport_and_addr, segment
):
    """An XX dialler's first messages go out right behind its last handshake message and may
    arrive in the same read (whole: over 8 KiB of them got the handshake refused as "too
    large"), or cut anywhere (a record begun in the handshake's last read was dropped, and
    the session died of the next one's bad decryption)."""
    transport, bind = transport_and_addr
    fleet = make_fleet(None, ["alpha", "bravo"])
    received: asyncio.Queue = asyncio.Queue()

    async def serve(stream) -> None:
        if segment is not None:
            stream = ChoppedStream(stream, segment)
        async with await accept(stream, fleet.admission("bravo")) as session:
            async for msg in session:
                await received.put(msg.payload)

    listener = await transport.listen(bind, serve)
    try:
        stream = await transport.dial(listener.address)
        async with await connect(stream, fleet.admission("alpha")) as client:
            payloads = [bytes([i]) * 3000 * i for i in range(1, 8)]
            await client.send_many([AppData(topic="t", payload=p) for p in payloads])
            async with asyncio.timeout(10):
                assert [await received.get() for _ in payloads] == payloads
    finally:
        await listener.aclose()


async def test_a_handshake_record_too_large_is_refused_before_it_is_read_whole():
    """The bound on handshake records holds however they come: a length over it is refused
    once that many bytes are in, without waiting for the rest."""
    transport = TcpTransport()
    fleet = make_fleet(None, ["alpha", "bravo"])
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def serve(stream) -> None:
        try:
            await accept(stream, fleet.admission("bravo"))
        except HandshakeError as exc:
            outcome.set_result(str(exc))

    listener = await transport.listen(Address("127.0.0.1", 0), serve)
    try:
        stream = await transport.dial(listener.address)
        await stream.write(framing.encode_record(b"\x01" * 60000)[:9000])
        async with asyncio.timeout(5):
            assert await outcome == "handshake record too large"
        await stream.aclose()
    finally:
        await listener.aclose()


# --- tasks: answers from a peer the item was never sent to -------------------------------------


async def test_a_result_from_a_node_the_item_was_never_sent_to_is_not_accepted(tmp_path):
    """``node-1`` holds a valid certificate but was sent nothing: its made-up answer for the
    item ``node-0`` runs must not become the task's result."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2) as mesh:
        c = mesh.coordinator
        honest = await mesh.daemons["node-0"].engine.infer(DIGITS, x[:1])
        forged = np.zeros_like(honest)
        forged[0, (int(np.argmax(honest)) + 1) % forged.shape[1]] = 1.0
        gates = [hold_inference(daemon) for daemon in mesh.daemons.values()]
        task_id = await c.submit(spec("forged", "single", x[:1]))
        entry = c._items["forged/0"][1]
        await until(lambda: entry.journaled == 1)  # the journal knows attempt 1 went out
        runner = entry.node
        hostile = next(name for name in mesh.names if name != runner)
        lie = TaskResult(
            "forged/0", 1, Tensor.from_array(forged), hostile, "numpy", "cpu", {"total_s": 0.0}
        )
        handled = _notice(mesh.mesh.peers, TaskResult)
        await mesh.daemons[hostile].mesh.peers.request(mesh.coord_ident.node_id, lie)
        await handled.wait()
        await until(lambda: "forged/0" not in c._answered)  # judged (and journaled, if taken)
        for gate in gates:
            gate.set()
        record = await c.wait(task_id, timeout=15)
        assert record.state.value == "succeeded"
        assert c.result_of(record)["labels"] == [int(np.argmax(honest))]
        assert c.stats_.foreign_results == 1 and c.stats_.completed_by_node[hostile] == 0


def _notice(peers, message_type) -> asyncio.Event:
    """An event set once ``peers`` handed a ``message_type`` to its handler."""
    handled = asyncio.Event()
    handler = peers._handlers[message_type]

    def noticed(peer, msg) -> None:
        handler(peer, msg)
        handled.set()

    peers.on(message_type, noticed)
    return handled


async def test_a_result_naming_a_node_no_member_has_is_credited_to_its_sender(tmp_path):
    """The node the item went to answers it but names a made-up node as the one that ran it:
    the answer counts (it came from the node the attempt was sent to), the credit goes to the
    sender, in the stats and in the task document, and no series for the made-up id appears."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2) as mesh:
        c = mesh.coordinator
        output = await mesh.daemons["node-0"].engine.infer(DIGITS, x[:1])
        gates = [hold_inference(daemon) for daemon in mesh.daemons.values()]
        task_id = await c.submit(spec("claimed", "single", x[:1]))
        entry = c._items["claimed/0"][1]
        await until(lambda: entry.journaled == 1)
        runner = entry.node
        claim = TaskResult(
            "claimed/0", 1, Tensor.from_array(output), "ghost-9", "numpy", "cpu", {"total_s": 0.0}
        )
        handled = _notice(mesh.mesh.peers, TaskResult)
        await mesh.daemons[runner].mesh.peers.request(mesh.coord_ident.node_id, claim)
        await handled.wait()
        record = await c.wait(task_id, timeout=15)
        for gate in gates:
            gate.set()
        assert record.state.value == "succeeded"
        assert c.stats_.completed_by_node == Counter({runner: 1})
        assert [item.node for item in record.items] == [runner]
        assert not any(n["node_id"] == "ghost-9" for n in c.nodes())
