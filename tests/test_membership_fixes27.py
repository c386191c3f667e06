"""Signed membership records bound to their certificate, and the membership TOML keys.

* A record's proof must vouch for the record's whole claim: an ALIVE record announcing a Noise
  static key other than the one its author's certificate binds is refused (a member could
  otherwise steer its peers' IK dials to a key no certificate vouches for), and, given the
  admission's wall clock, a record proven by a certificate outside its validity window (with the
  session handshake's clock-skew tolerance) is refused too. Real certificates from the fleet
  authority; Hypothesis over states and clock readings; the SWIM core; real nodes over TCP.
* ``[membership] push_pull_digests`` and ``max_members`` are keys of the node's and the
  coordinator's files, validated like the others and passed to the mesh.
"""

from __future__ import annotations

import os
import random
import time
import tomllib
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import config as coord_config
from meshinfer.errors import AdmissionError, ConfigError
from meshinfer.proto.identity import (
    DEFAULT_CLOCK_SKEW_S,
    FleetAuthority,
    NodeIdentity,
    RevocationList,
    admit,
)
from meshinfer.proto.membership import Membership, MembershipConfig, MemberStatus
from meshinfer.proto.membership_auth import CertifiedRecordAuthenticator
from meshinfer.proto.membership_wire import (
    AliveRecord,
    Gossip,
    LeftRecord,
    ModelInfo,
    NodeState,
    PushPull,
    encode_packet,
    encode_record,
    signed_body,
)
from meshinfer.proto.messages import Gossip as GossipMessage
from meshinfer.runtime.mesh_metrics import mesh_families
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.runtime.startup import mesh_options
from meshinfer.testing.fleet import DAY, make_fleet
from meshinfer.testing.virtual_network import MembershipCluster
from node import config as node_config
from tests.helpers import seed_of, until

NOW = 1.8e9
LIFETIME = 3600.0
keys = st.binary(min_size=32, max_size=32)


@pytest.fixture(scope="module")
def authority() -> FleetAuthority:
    return FleetAuthority.create("fixes27-fleet")


def enrolled(authority: FleetAuthority, node_id: str, serial: int) -> NodeIdentity:
    return authority.enroll(node_id, ["vehicle"], now=NOW, lifetime_s=LIFETIME, serial=serial)


def signer(identity: NodeIdentity, **kw) -> CertifiedRecordAuthenticator:
    kw.setdefault("random_bytes", os.urandom)
    return CertifiedRecordAuthenticator(
        identity.certificate, identity.static_private, identity.trust, **kw
    )


def state_of(identity: NodeIdentity, **kw) -> NodeState:
    kw.setdefault("static_key", identity.static_public)
    return NodeState("127.0.0.1", 1, roles=("vehicle",), **kw)


def signed(author: CertifiedRecordAuthenticator, record: AliveRecord | LeftRecord):
    proof = author.sign(signed_body(record))
    if isinstance(record, LeftRecord):
        return LeftRecord(record.node_id, record.incarnation, proof)
    return AliveRecord(record.node_id, record.incarnation, record.version, record.state, proof)


def accepts(checker: CertifiedRecordAuthenticator, record: AliveRecord | LeftRecord) -> bool:
    return checker.verify(record.node_id, signed_body(record), record.signature)


# --- the record's static key is the certificate's ----------------------------------------------


def test_a_record_announcing_a_key_its_certificate_does_not_bind_is_refused(authority):
    alice, bob = enrolled(authority, "alice", 1), enrolled(authority, "bob", 2)
    checker, alice_signs = signer(bob), signer(alice)
    own = signed(alice_signs, AliveRecord("alice", 0, 1, state_of(alice)))
    keyless = signed(alice_signs, AliveRecord("alice", 0, 2, state_of(alice, static_key=b"")))
    stolen = signed(alice_signs, AliveRecord("alice", 0, 3, state_of(bob)))  # bob's Noise key
    assert accepts(checker, own) and accepts(checker, keyless)
    assert not accepts(checker, stolen)  # a true signature by alice, on a false claim
    assert checker.refusals == {"key-mismatch": 1}
    # her departure carries no state, so no key to check
    assert accepts(checker, signed(alice_signs, LeftRecord("alice", 4)))


small_states = st.builds(
    NodeState,
    host=st.text(max_size=20),
    port=st.integers(0, 65535),
    roles=st.lists(st.text(max_size=8), max_size=3).map(tuple),
    models=st.lists(st.builds(ModelInfo, st.text(max_size=8), st.text(max_size=4)), max_size=2).map(
        tuple
    ),
    gpu_free_mb=st.integers(0, 2**40),
    revocation_version=st.integers(0, 2**63 - 1),
    later=st.lists(st.binary(max_size=4).map(msgpack.packb), max_size=2).map(tuple),
)


@settings(max_examples=60, deadline=None)
@given(state=small_states, key=st.sampled_from(["own", "none", "other", "random"]), random_key=keys)
def test_any_state_is_accepted_exactly_when_it_announces_the_certified_key_or_none(
    authority, state, key, random_key
):
    alice, bob = enrolled(authority, "alice", 1), enrolled(authority, "bob", 2)
    announced = {
        "own": alice.static_public,
        "none": b"",
        "other": bob.static_public,
        "random": random_key,
    }[key]
    record = signed(signer(alice), AliveRecord("alice", 7, 9, replace(state, static_key=announced)))
    checker = signer(bob)
    assert accepts(checker, record) is (announced in (b"", alice.static_public))
    assert set(checker.refusals) <= {"key-mismatch"}


@settings(max_examples=150, deadline=None)
@given(state=small_states, garbage=st.binary(max_size=200), cut=st.integers(0, 400))
def test_the_announced_key_is_read_from_any_signed_body_and_nothing_else_raises(
    state, garbage, cut
):
    from meshinfer.proto.membership_auth import claimed_static_key

    body = signed_body(AliveRecord("n", 1, 2, state))
    assert claimed_static_key(body) == state.static_key
    assert claimed_static_key(signed_body(LeftRecord("n", 1))) == b""
    for data in (garbage, body[:cut], body[:cut] + garbage, body + garbage[:1]):
        key = claimed_static_key(data)  # never raises
        assert key is None or isinstance(key, bytes)
    assert claimed_static_key(garbage) is None or garbage.startswith(b"meshinfer-member-v1\0")


# --- the certificate is valid at the injected wall clock --------------------------------------


def test_records_of_an_expired_or_not_yet_valid_certificate_are_refused(authority):
    alice, bob = enrolled(authority, "alice", 1), enrolled(authority, "bob", 2)
    clock = [NOW]
    checker = signer(bob, wallclock=lambda: clock[0], clock_skew=300.0)
    record = signed(signer(alice), AliveRecord("alice", 0, 1, state_of(alice)))
    for at, ok in [
        (NOW - 300.0, True),  # within the skew allowance on both sides
        (NOW + LIFETIME + 300.0, True),
        (NOW - 301.0, False),
        (NOW + LIFETIME + 301.0, False),
    ]:
        clock[0] = at
        assert accepts(checker, record) is ok, at
    assert checker.refusals == {"not-yet-valid": 1, "expired": 1}
    # no clock (a virtual one): validity is not judged here
    assert accepts(signer(bob), record)


@settings(max_examples=120, deadline=None)
@given(
    offset=st.floats(-2 * LIFETIME, 2 * LIFETIME, allow_nan=False),
    skew=st.sampled_from([0.0, DEFAULT_CLOCK_SKEW_S, 300.0]),
)
def test_a_relayed_record_is_judged_valid_exactly_as_a_session_handshake_would_be(
    authority, offset, skew
):
    alice, bob = enrolled(authority, "alice", 1), enrolled(authority, "bob", 2)
    at = NOW + offset
    checker = signer(bob, wallclock=lambda: at, clock_skew=skew)
    record = signed(signer(alice), LeftRecord("alice", 3))
    try:
        admit(
            alice.certificate.to_bytes(),
            proven_static=alice.static_public,
            trust=alice.trust,
            revocations=RevocationList(alice.trust.fleet_id),
            now=at,
            clock_skew=skew,
        )
        admitted = True
    except AdmissionError as exc:
        assert exc.reason in ("expired", "not-yet-valid")
        admitted = False
    assert accepts(checker, record) is admitted


# --- the SWIM core -----------------------------------------------------------------------------


def core(identity: NodeIdentity, **kw) -> Membership:
    return Membership(
        identity.node_id,
        state_of(identity),
        MembershipConfig.test(),
        random.Random(1),
        0.0,
        authenticator=signer(identity, **kw),
    )


def test_the_core_keeps_a_members_certified_key_against_a_relayed_record_with_another(authority):
    a, b, x = (enrolled(authority, n, s) for s, n in enumerate(["a", "b", "x"], 1))
    node_a = core(a)
    b_signs = signer(b)
    first = signed(b_signs, AliveRecord("b", 0, 1, state_of(b)))
    node_a.handle_packet("x", encode_packet(PushPull(), [encode_record(first)]), 1.0)
    assert node_a.member("b").state.static_key == b.static_public
    # b (or anyone replaying b's proof) announces x's key in a newer record: not taken
    steer = signed(b_signs, AliveRecord("b", 0, 2, state_of(b, static_key=x.static_public)))
    ghost = signed(signer(x), AliveRecord("x", 0, 1, state_of(x, static_key=b.static_public)))
    packet = encode_packet(Gossip(), [encode_record(steer), encode_record(ghost)])
    node_a.handle_packet("x", packet, 2.0)
    assert node_a.member("b").state.static_key == b.static_public
    assert node_a.member("b").version == 1 and node_a.member("x") is None
    assert node_a.counters.impersonations_refused == 2


def test_the_core_refuses_the_departure_and_the_joins_of_an_expired_certificate(authority):
    a, b, c = (enrolled(authority, n, s) for s, n in enumerate(["a", "b", "c"], 1))
    clock = [NOW]
    node_a = core(a, wallclock=lambda: clock[0], clock_skew=DEFAULT_CLOCK_SKEW_S)
    alive_b = signed(signer(b), AliveRecord("b", 0, 1, state_of(b)))
    node_a.handle_packet("c", encode_packet(PushPull(), [encode_record(alive_b)]), 1.0)
    assert node_a.member("b").status is MemberStatus.ALIVE
    clock[0] = NOW + LIFETIME + DEFAULT_CLOCK_SKEW_S + 1
    left_b = signed(signer(b), LeftRecord("b", 1))
    alive_c = signed(signer(c), AliveRecord("c", 0, 1, state_of(c)))
    packet = encode_packet(Gossip(), [encode_record(left_b), encode_record(alive_c)])
    node_a.handle_packet("c", packet, 2.0)
    assert node_a.member("b").status is MemberStatus.ALIVE and node_a.member("c") is None
    assert node_a.counters.impersonations_refused == 2


# --- real nodes over TCP and Noise -------------------------------------------------------------


def options(**kw) -> MeshNodeOptions:
    return MeshNodeOptions(membership=MembershipConfig.test(), mdns=None, **kw)


async def started(fleet, names: list[str]) -> list[MeshNode]:
    hub = MeshNode(fleet.identities[names[0]], fleet.revocations, options())
    await hub.start()
    nodes = [hub]
    try:
        for name in names[1:]:
            node = MeshNode(
                fleet.identities[name], fleet.revocations, options(seeds=[seed_of(hub)])
            )
            nodes.append(node)
            await node.start()
        await until(lambda: all(len(n.live_members()) == len(names) - 1 for n in nodes))
    except BaseException:
        for node in nodes:
            await node.aclose()
        raise
    return nodes


async def test_a_member_cannot_announce_another_members_noise_key_to_a_running_node():
    fleet = make_fleet(None, ["car-a", "car-b", "car-x"])
    nodes = await started(fleet, ["car-a", "car-b", "car-x"])
    hub, b, x = nodes
    try:
        core_a = hub.membership.core
        now = core_a.member("car-x").record
        forged = signed(
            signer(x.identity),
            AliveRecord(
                "car-x",
                now.incarnation,
                now.version + 1000,
                replace(now.state, static_key=b.identity.static_public),
            ),
        )
        x.peers.send("car-a", GossipMessage(encode_packet(Gossip(), [encode_record(forged)])))
        await until(
            lambda: (
                core_a.counters.impersonations_refused >= 1
                or core_a.member("car-x").version == forged.version
            ),
            timeout=10,
        )
        assert core_a.member("car-x").state.static_key == x.identity.static_public
        assert core_a.member("car-x").status is MemberStatus.ALIVE
        refused = {
            dict(sample.labels)["reason"]: sample.value
            for family in mesh_families(hub)
            if family.name == "meshinfer_membership_records_refused_total"
            for sample in family.samples
        }
        assert refused == {"key-mismatch": 1}  # on the node's /metrics
    finally:
        for node in nodes:
            await node.aclose()


async def test_a_running_node_refuses_a_relayed_record_of_an_expired_certificate():
    fleet = make_fleet(None, ["car-a", "car-x"])
    expired = fleet.enroll("car-old", now=time.time() - 10 * DAY, lifetime_s=DAY)
    nodes = await started(fleet, ["car-a", "car-x"])
    hub, x = nodes
    try:
        core_a = hub.membership.core
        record = signed(signer(expired), AliveRecord("car-old", 0, 1, state_of(expired)))
        x.peers.send("car-a", GossipMessage(encode_packet(Gossip(), [encode_record(record)])))
        await until(
            lambda: (
                core_a.counters.impersonations_refused >= 1 or core_a.member("car-old") is not None
            ),
            timeout=10,
        )
        assert core_a.member("car-old") is None
    finally:
        for node in nodes:
            await node.aclose()


def test_a_signed_simulated_fleet_converges_without_refused_records(authority):
    signers: dict[str, CertifiedRecordAuthenticator] = {}

    def signer_for(node_id: str) -> CertifiedRecordAuthenticator:
        if node_id not in signers:
            signers[node_id] = signer(enrolled(authority, node_id, 200 + len(signers)))
        return signers[node_id]

    cluster = MembershipCluster(MembershipConfig.test(), seed=5, authenticator_for=signer_for)
    ids = cluster.warm_start(3)
    cluster.start_node("late", seeds=[ids[0]])
    converged = cluster.run_until(
        lambda: all(len(cluster.membership(n).live_members()) == 3 for n in ids), timeout=30
    )
    assert converged
    assert all(cluster.membership(n).counters.impersonations_refused == 0 for n in ids)


# --- [membership] keys of the node's and the coordinator's files -------------------------------


MESH = {"discovery": {"mdns": False}}


def test_the_node_file_takes_the_digest_and_table_cap_keys_and_the_mesh_gets_them(tmp_path):
    config = node_config.config_from_dict(
        {**MESH, "membership": {"preset": "v2v", "push_pull_digests": False, "max_members": 100}}
    )
    mesh = mesh_options(config, "fleet", str(tmp_path)).membership
    assert mesh == replace(MembershipConfig.v2v(), push_pull_digests=False, max_members=100)
    default = mesh_options(node_config.config_from_dict(MESH), "fleet", str(tmp_path))
    assert default.membership == MembershipConfig.lan()


def test_the_coordinator_file_takes_them_too(tmp_path):
    data = {**MESH, "membership": {"push_pull_digests": False, "max_members": 50}}
    mesh = mesh_options(coord_config.config_from_dict(data), "fleet", str(tmp_path)).membership
    assert not mesh.push_pull_digests and mesh.max_members == 50
    with pytest.raises(ConfigError, match=r"coord\.toml: \[membership\] max_members"):
        coord_config.config_from_dict({"membership": {"max_members": 1}}, "coord.toml")


@pytest.mark.parametrize("module", [node_config, coord_config])
def test_the_default_files_list_the_keys_and_read_back(module):
    text = module.render_defaults()
    assert "push_pull_digests = true" in text and "max_members = 4096" in text
    parsed = tomllib.loads(text)["membership"]
    assert parsed["push_pull_digests"] is True and parsed["max_members"] == 4096


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"push_pull_digests": "no"}, r"\[membership\] push_pull_digests: expected bool"),
        ({"push_pull_digests": 0}, r"\[membership\] push_pull_digests: expected bool"),
        ({"max_members": True}, r"\[membership\] max_members: expected int"),
        ({"max_members": 64.0}, r"\[membership\] max_members: expected int"),
        ({"max_member": 64}, r"\[membership\] unknown key 'max_member'"),
    ],
)
def test_an_invalid_membership_key_is_an_error_naming_it(table, named):
    with pytest.raises(ConfigError, match=named):
        node_config.config_from_dict({"membership": table}, "node.toml")


@settings(max_examples=100, deadline=None)
@given(value=st.integers(-(2**70), 2**70) | st.integers(-3, 70000))
def test_any_max_members_is_taken_exactly_in_range_or_refused_naming_the_key(value):
    data = {**MESH, "membership": {"max_members": value}}
    if 2 <= value <= node_config.MAX_MEMBERS:
        config = node_config.config_from_dict(data, "node.toml")
        assert mesh_options(config, "fleet", "/nonexistent").membership.max_members == value
    else:
        with pytest.raises(ConfigError, match=r"^node\.toml: \[membership\] max_members must be"):
            node_config.config_from_dict(data, "node.toml")
