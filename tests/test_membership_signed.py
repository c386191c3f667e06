"""Signed membership records: XEdDSA by the Noise static key, proven by the fleet certificate.

Layers: the signature scheme against libsodium's own key conversion (Hypothesis); the record
authenticator with hostile proofs; the SWIM core refusing forged and invented members; and
real nodes over TCP and Noise, where one fleet member tries to announce another's departure and
to invent members, and where a node learns a member only through a relay.
"""

from __future__ import annotations

import os
import random

import msgpack
import nacl.bindings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.proto import xeddsa
from meshinfer.proto.identity import FleetAuthority, NodeIdentity
from meshinfer.proto.membership import Membership, MembershipConfig, MemberStatus
from meshinfer.proto.membership_auth import CertifiedRecordAuthenticator
from meshinfer.proto.membership_wire import (
    AliveRecord,
    Gossip,
    LeftRecord,
    NodeState,
    PushPull,
    encode_packet,
    encode_record,
    signed_body,
)
from meshinfer.proto.messages import Gossip as GossipMessage
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.fleet import make_fleet
from meshinfer.testing.virtual_network import MembershipCluster
from tests.helpers import seed_of, until

NOW = 1.8e9
keys = st.binary(min_size=32, max_size=32)


# --- the signature scheme ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(private=keys, message=st.binary(max_size=300), nonce=st.binary(min_size=64, max_size=64))
def test_an_xeddsa_signature_verifies_with_the_x25519_public_key(private, message, nonce):
    public = nacl.bindings.crypto_scalarmult_base(private)
    key = xeddsa.XEdDSAKey(private)
    # the Edwards key the signer uses is the one libsodium maps back to the Montgomery key
    assert nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(key.edwards_public) == public
    assert xeddsa.edwards_public(public) == key.edwards_public
    signature = key.sign(message, nonce)
    assert xeddsa.verify(public, message, signature)


@settings(max_examples=40, deadline=None)
@given(private=keys, other=keys, message=st.binary(min_size=1, max_size=100), data=st.data())
def test_an_xeddsa_signature_fails_for_any_other_message_key_or_bit(private, other, message, data):
    public = nacl.bindings.crypto_scalarmult_base(private)
    signature = xeddsa.XEdDSAKey(private).sign(message, bytes(64))
    bit = data.draw(st.integers(0, 8 * len(signature) - 1))
    flipped = bytearray(signature)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert not xeddsa.verify(public, message, bytes(flipped))
    assert not xeddsa.verify(public, message + b"!", signature)
    other_public = nacl.bindings.crypto_scalarmult_base(other)
    if other_public != public:
        assert not xeddsa.verify(other_public, message, signature)


def test_fresh_nonces_give_different_signatures_that_all_verify():
    private = bytes(range(32))
    public = nacl.bindings.crypto_scalarmult_base(private)
    key = xeddsa.XEdDSAKey(private)
    one, two = key.sign(b"m", b"\x01" * 64), key.sign(b"m", b"\x02" * 64)
    assert one != two
    assert xeddsa.verify(public, b"m", one) and xeddsa.verify(public, b"m", two)


@pytest.mark.parametrize(
    "public",
    [
        (2**255 - 19).to_bytes(32, "little"),  # u = p: not canonical
        (2**255 - 20).to_bytes(32, "little"),  # u = p - 1: u + 1 has no inverse
        b"\x01" * 31,  # too short
    ],
)
def test_keys_without_an_edwards_form_verify_nothing(public):
    assert xeddsa.edwards_public(public) is None
    assert not xeddsa.verify(public, b"m", bytes(64))


def test_a_signing_key_and_a_nonce_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match="32 bytes"):
        xeddsa.XEdDSAKey(b"short")
    with pytest.raises(ValueError, match="64 random bytes"):
        xeddsa.XEdDSAKey(bytes(32)).sign(b"m", b"n")


# --- the record authenticator ------------------------------------------------------------------


def enrolled(authority: FleetAuthority, node_id: str, serial: int) -> NodeIdentity:
    return authority.enroll(node_id, ["vehicle"], now=NOW, lifetime_s=3600, serial=serial)


def authenticator(identity: NodeIdentity, trust=None, **kw) -> CertifiedRecordAuthenticator:
    kw.setdefault("random_bytes", os.urandom)
    return CertifiedRecordAuthenticator(
        identity.certificate, identity.static_private, trust or identity.trust, **kw
    )


@pytest.fixture(scope="module")
def authority() -> FleetAuthority:
    return FleetAuthority.create("signed-fleet")


def test_a_proof_verifies_only_for_its_author(authority):
    alice, bob = enrolled(authority, "alice", 1), enrolled(authority, "bob", 2)
    checker = authenticator(bob)
    body = signed_body(LeftRecord("alice", 3))
    proof = authenticator(alice).sign(body)
    assert checker.verify("alice", body, proof)
    assert not checker.verify("bob", body, proof)  # the certificate names alice
    assert not checker.verify("alice", body + b"x", proof)
    # bob attaches alice's certificate to his own signature: the key does not match
    assert not checker.verify(
        "alice", body, msgpack.packb([alice.certificate.to_bytes(), bytes(64)])
    )
    bobs_signature = msgpack.unpackb(authenticator(bob).sign(body))[1]
    assert not checker.verify(
        "alice", body, msgpack.packb([alice.certificate.to_bytes(), bobs_signature])
    )


def test_a_certificate_of_another_fleet_or_a_revoked_one_proves_nothing(authority):
    alice = enrolled(authority, "alice", 1)
    stranger = enrolled(FleetAuthority.create("signed-fleet"), "alice", 1)  # same names, new key
    body = signed_body(LeftRecord("alice", 0))
    assert not authenticator(alice).verify("alice", body, authenticator(stranger).sign(body))
    revoked = {alice.certificate.serial}
    checker = authenticator(alice, revoked=lambda cert: cert.serial in revoked)
    proof = authenticator(alice).sign(body)
    assert not checker.verify("alice", body, proof)
    revoked.clear()  # the list is read at each call
    assert checker.verify("alice", body, proof)


@settings(max_examples=200, deadline=None)
@given(
    proof=st.one_of(
        st.binary(max_size=700),
        st.lists(st.binary(max_size=600), max_size=3).map(msgpack.packb),
        st.tuples(st.binary(max_size=600), st.binary(min_size=64, max_size=64)).map(
            lambda t: msgpack.packb(list(t))
        ),
    )
)
def test_any_malformed_proof_is_refused_without_raising(authority, proof):
    checker = authenticator(enrolled(authority, "bob", 2))
    assert checker.verify("alice", b"body", proof) is False


def test_the_authenticator_refuses_a_certificate_for_another_key(authority):
    alice, bob = enrolled(authority, "alice", 1), enrolled(authority, "bob", 2)
    with pytest.raises(ValueError, match="does not bind"):
        CertifiedRecordAuthenticator(
            alice.certificate, bob.static_private, alice.trust, random_bytes=os.urandom
        )


# --- the SWIM core -----------------------------------------------------------------------------


def state_of(identity: NodeIdentity, port: int = 1) -> NodeState:
    return NodeState("127.0.0.1", port, identity.static_public, ("vehicle",))


def core(identity: NodeIdentity) -> Membership:
    return Membership(
        identity.node_id,
        state_of(identity),
        MembershipConfig.test(),
        random.Random(1),
        0.0,
        authenticator=authenticator(identity),
    )


def test_the_core_takes_signed_relayed_records_and_refuses_forged_and_invented_ones(authority):
    a, b, x = (enrolled(authority, n, s) for s, n in enumerate(["a", "b", "x"], 1))
    node_a, node_b = core(a), core(b)
    # b's own table, relayed by x, teaches a about b: the proof travels with the record
    node_a.handle_packet("x", encode_packet(PushPull(), node_b.table.encoded_table()), 1.0)
    assert node_a.member("b").status is MemberStatus.ALIVE
    x_signs = authenticator(x)
    left = LeftRecord("b", 5)
    ghost = AliveRecord("ghost", 0, 1, state_of(x))
    forged = [
        LeftRecord("b", 5, x_signs.sign(signed_body(left))),  # x's proof on b's departure
        LeftRecord("b", 5),  # no proof at all
        AliveRecord("ghost", 0, 1, state_of(x), x_signs.sign(signed_body(ghost))),
        AliveRecord("ghost-2", 0, 1, state_of(x)),
    ]
    node_a.handle_packet("x", encode_packet(Gossip(), [encode_record(r) for r in forged]), 2.0)
    assert node_a.member("b").status is MemberStatus.ALIVE
    assert node_a.member("ghost") is None and node_a.member("ghost-2") is None
    assert node_a.counters.impersonations_refused == 4


def test_a_flood_of_invented_members_adds_none(authority):
    a = enrolled(authority, "a", 1)
    node = core(a)
    fakes = [encode_record(AliveRecord(f"fake-{i}", 0, 1, state_of(a))) for i in range(500)]
    node.handle_packet("h", encode_packet(PushPull(), fakes), 1.0)
    assert node.live_members() == [] and node.counters.impersonations_refused == 500


class CountingAuthenticator(CertifiedRecordAuthenticator):
    checks = 0

    def verify(self, node_id: str, body: bytes, signature: bytes) -> bool:
        self.checks += 1
        return super().verify(node_id, body, signature)


def test_a_push_pull_listing_many_versions_of_a_member_costs_one_signature_check(authority):
    a, x = enrolled(authority, "a", 1), enrolled(authority, "x", 2)
    checker = CountingAuthenticator(
        a.certificate, a.static_private, a.trust, random_bytes=os.urandom
    )
    node = Membership("a", state_of(a), MembershipConfig.test(), random.Random(1), 0.0,
                      authenticator=checker)  # fmt: skip
    x_signs = authenticator(x)
    versions = []
    for version in range(1, 301):
        record = AliveRecord("x", 0, version, state_of(x, port=version))
        versions.append(
            AliveRecord("x", 0, version, record.state, x_signs.sign(signed_body(record)))
        )
    random.Random(7).shuffle(versions)
    node.handle_packet("x", encode_packet(PushPull(), [encode_record(r) for r in versions]), 1.0)
    assert node.member("x").record.version == 300 and node.member("x").record.state.port == 300
    assert checker.checks == 1


# --- real nodes over TCP and Noise -------------------------------------------------------------


def options(**kw) -> MeshNodeOptions:
    return MeshNodeOptions(membership=MembershipConfig.test(), mdns=None, **kw)


async def test_a_fleet_member_cannot_announce_anothers_departure_or_invent_members():
    fleet = make_fleet(None, ["car-a", "car-b", "car-x"])
    hub = MeshNode(fleet.identities["car-a"], fleet.revocations, options())
    await hub.start()
    others = [
        MeshNode(fleet.identities[n], fleet.revocations, options(seeds=[seed_of(hub)]))
        for n in ("car-b", "car-x")
    ]
    nodes = [hub, *others]
    try:
        for node in others:
            await node.start()
        await until(lambda: all(len(n.live_members()) == 2 for n in nodes), timeout=20)
        a, x = hub, others[1]
        core_a = a.membership.core
        incarnation = core_a.member("car-b").incarnation
        x_signs = authenticator(x.identity)  # the forger holds its own key and certificate
        left = LeftRecord("car-b", incarnation + 1)
        ghost = AliveRecord("ghost", 0, 1, x.membership.state)
        forged = [
            LeftRecord("car-b", incarnation + 1, x_signs.sign(signed_body(left))),
            AliveRecord("ghost", 0, 1, x.membership.state, x_signs.sign(signed_body(ghost))),
        ]
        payload = encode_packet(Gossip(), [encode_record(r) for r in forged])
        x.peers.send("car-a", GossipMessage(payload))
        await until(lambda: core_a.counters.impersonations_refused >= 2, timeout=10)
        assert core_a.member("car-b").status is MemberStatus.ALIVE
        assert core_a.member("ghost") is None
        assert sorted(a.live_members()) == ["car-b", "car-x"]
    finally:
        for node in nodes:
            await node.aclose()


async def test_a_node_learns_a_member_it_never_met_through_a_relay():
    # car-1 and car-2 know only the roadside unit; each learns the other from its gossip, so
    # the record it takes was relayed, and its proof checked against the fleet's trust alone
    fleet = make_fleet(None, ["rsu", "car-1", "car-2"])
    rsu = MeshNode(fleet.identities["rsu"], fleet.revocations, options())
    await rsu.start()
    cars = [
        MeshNode(fleet.identities[n], fleet.revocations, options(seeds=[seed_of(rsu)]))
        for n in ("car-1", "car-2")
    ]
    try:
        for car in cars:
            await car.start()
        await until(lambda: all(len(n.live_members()) == 2 for n in [rsu, *cars]), timeout=20)
        for car in cars:
            other = cars[1] if car is cars[0] else cars[0]
            record = car.membership.core.member(other.node_id).record
            proof = msgpack.unpackb(record.signature)
            assert proof[0] == other.identity.certificate.to_bytes()
            assert car.membership.core.counters.impersonations_refused == 0
    finally:
        for node in [rsu, *cars]:
            await node.aclose()


def test_a_simulated_fleet_warm_starts_and_gossips_with_signed_records(authority):
    # the simulator's converged start signs each node's record as its core would, so the
    # researchers' harness runs the daemons' authenticator too (bench_membership --records)
    signers: dict[str, CertifiedRecordAuthenticator] = {}

    def signer(node_id: str) -> CertifiedRecordAuthenticator:
        if node_id not in signers:
            signers[node_id] = authenticator(enrolled(authority, node_id, 100 + len(signers)))
        return signers[node_id]

    cluster = MembershipCluster(MembershipConfig.test(), seed=3, authenticator_for=signer)
    ids = cluster.warm_start(6)
    cluster.start_node("late", seeds=[ids[0]])
    assert cluster.run_until(
        lambda: all(len(cluster.membership(n).live_members()) == 6 for n in ids), timeout=30
    )
    for node_id in ids:
        core_ = cluster.membership(node_id)
        assert core_.member("late").status is MemberStatus.ALIVE
        assert core_.counters.impersonations_refused == 0
        assert all(m.record.signature for m in core_.live_members())
