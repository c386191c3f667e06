"""Evidence for a claim above this node's incarnation is asked for again when it did not come.

* A restarted node asked the sender of a claim above its incarnation for evidence (its own
  older signed record) once per claimed incarnation. When that exchange never came back (the
  sender crashed, a packet was lost), later claims at the same incarnation, honest ones from
  other members included, asked nothing: the node waited for the periodic push-pull, and the
  suspicion ran out first (the node was declared dead everywhere).
* A liar's claim at ``MAX_COUNTER`` took the highest incarnation for good: no honest claim
  below it asked for evidence again.

Now a claim above the node's incarnation asks again at most once per ``probe_interval``.
The member table reads its members through the store's queries only.

Real tables and cores on the virtual-time network; no mocks.
"""

from __future__ import annotations

import random
from dataclasses import replace

import nacl.signing

from meshinfer.proto.membership import Membership, MemberStatus
from meshinfer.proto.membership_auth import Ed25519RecordAuthenticator
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_table import MemberTable
from meshinfer.proto.membership_wire import (
    MAX_COUNTER,
    AliveRecord,
    DeadRecord,
    Digest,
    Gossip,
    NodeState,
    SuspectRecord,
    decode_packet,
    encode_packet,
    encode_record,
)
from meshinfer.testing.virtual_network import MembershipCluster

CONFIG = MembershipConfig.test()
STEP = CONFIG.probe_interval


def _state(name: str) -> NodeState:
    return NodeState(host=f"{name}.local", port=7946, static_key=bytes(32))


def _table() -> MemberTable:
    local = AliveRecord("a", 0, 1, _state("a"))
    table = MemberTable(local, CONFIG, random.Random(1), 0.0)
    table.add_known([AliveRecord(p, 0, 1, _state(p)) for p in ("b", "c", "d")], 0.0)
    return table


def _gossip(*records) -> bytes:
    return encode_packet(Gossip(), [encode_record(r) for r in records])


# --- the table asks again --------------------------------------------------------------------


def test_a_liars_top_claim_does_not_stop_later_asks() -> None:
    table = _table()
    table.apply(SuspectRecord("a", MAX_COUNTER, "liar"), 1.0)
    assert table.ask_evidence
    table.ask_evidence = False
    table.apply(SuspectRecord("a", 5, "b"), 1.0 + STEP / 2)  # within the interval: not yet
    assert not table.ask_evidence
    table.apply(SuspectRecord("a", 5, "b"), 1.0 + STEP)
    assert table.ask_evidence


def test_asks_again_at_most_once_per_probe_interval() -> None:
    table = _table()
    asked = []
    for step in range(40):  # a claim every tenth of an interval, at one incarnation
        table.apply(DeadRecord("a", 10**6, "liar"), 1.0 + step * STEP / 10)
        asked.append(table.ask_evidence)
        table.ask_evidence = False
    assert sum(asked) == 4 and asked[0]
    assert table.local.incarnation == 40  # each refuted at its own + 1, as before


def test_a_claim_at_or_below_own_incarnation_asks_nothing() -> None:
    table = _table()
    table.apply(SuspectRecord("a", 3, "b"), 1.0)
    table.ask_evidence = False
    table.apply(SuspectRecord("a", table.local.incarnation, "b"), 1.0 + 2 * STEP)
    assert not table.ask_evidence


def test_the_core_asks_the_later_claims_sender() -> None:
    known = [AliveRecord(p, 0, 1, _state(p)) for p in ("b", "c")]
    m = Membership("a", _state("a"), CONFIG, random.Random(3), 0.0, known_members=known)
    m.handle_packet("b", _gossip(SuspectRecord("a", 5, "b")), 1.0)
    m.handle_packet("c", _gossip(SuspectRecord("a", 5, "c")), 1.0 + STEP)
    digests = [
        o.to_node for o in m.drain_packets() if isinstance(decode_packet(o.data).header, Digest)
    ]
    assert digests == ["b", "c"]


# --- in a fleet: the first exchange never comes back -----------------------------------------


def _keys(n: int) -> dict[str, nacl.signing.SigningKey]:
    return {f"n{i:04d}": nacl.signing.SigningKey(bytes([i + 1]) * 32) for i in range(n)}


def _everyone_sees(cluster: MembershipCluster, subject: str, incarnation: int) -> bool:
    for observer in cluster.up():
        if observer == subject:
            continue
        member = cluster.membership(observer).member(subject)
        if member is None or member.status is not MemberStatus.ALIVE:
            return False
        if member.incarnation != incarnation:
            return False
    return True


def test_restarted_node_survives_a_lost_evidence_exchange() -> None:
    config = replace(CONFIG, push_pull_interval=600.0)  # no periodic exchange brings it
    keys = _keys(5)
    public = {node: bytes(key.verify_key) for node, key in keys.items()}
    cluster = MembershipCluster(
        config,
        seed=21,
        authenticator_for=lambda node: Ed25519RecordAuthenticator(keys[node], public.get),
    )
    ids = cluster.warm_start(5)
    subject, accuser, gone = ids[0], ids[1], ids[4]
    old = 40  # the copies of the claim alone (each refuted at i + 1) cannot climb past it

    def bump(core: Membership, now: float) -> None:
        for _ in range(old):
            core.table.refute(core.incarnation, now)

    cluster.network.call(subject, bump)
    assert cluster.run_until(lambda: _everyone_sees(cluster, subject, old), timeout=10)
    cluster.run_for(5.0)  # the news of it retired from every broadcast queue
    peer = cluster.membership(accuser)
    known = [m.record for m in peer.members() if m.node_id != subject] + [peer.local_member.record]
    cluster.crash(subject)
    cluster.crash(gone)
    restarted = cluster.start_node(subject, known=known)
    start = cluster.now
    # A claim at the old incarnation from a member that is gone: the digest sent to ask it for
    # evidence is never answered.
    cluster.network.inject(gone, subject, _gossip(SuspectRecord(subject, old, gone)))
    cluster.run_for(0.05)
    assert restarted.counters.claims_ahead == 1 and restarted.incarnation == 1
    cluster.network.call(accuser, lambda c, now: c.table.suspect(subject, now))  # SUSPECT(old)
    assert cluster.run_until(
        lambda: (
            restarted.incarnation > old and _everyone_sees(cluster, subject, restarted.incarnation)
        ),
        timeout=config.suspicion_min_timeout(5),
    )
    deaths = [e for e in cluster.log if e.subject == subject and e.kind == "dead" and e.at > start]
    assert not deaths
