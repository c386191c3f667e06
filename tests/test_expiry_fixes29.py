"""Certificates that end while in use: a session cut for an expired certificate, and a member
whose certificate is revoked after its record was accepted.

Sessions are real (in-memory transport and TCP on loopback, ``Pair`` of tests/test_session.py)
with the admission's wall clock injected; membership is the sans-I/O core with real fleet
certificates and XEdDSA proofs.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace

import msgpack
import pytest

from meshinfer.errors import RemoteProtocolError
from meshinfer.proto import messages
from meshinfer.proto.identity import (
    DEFAULT_CLOCK_SKEW_S,
    FleetAuthority,
    NodeIdentity,
    RevocationList,
)
from meshinfer.proto.membership import Membership, MembershipConfig, MemberStatus
from meshinfer.proto.membership_auth import CertifiedRecordAuthenticator
from meshinfer.proto.membership_table import MemberEventKind
from meshinfer.proto.membership_wire import (
    AliveRecord,
    Gossip,
    NodeState,
    PushPull,
    encode_packet,
    encode_record,
    signed_body,
)
from meshinfer.proto.messages import AppData, Close, CloseCode
from meshinfer.runtime.endpoint import SessionListener, dial
from meshinfer.runtime.session import Admission
from meshinfer.testing.fleet import make_fleet
from tests.helpers import until
from tests.test_session import Pair
from tests.test_session_expiry28 import FrozenClock

# --- a session cut for an expired certificate --------------------------------------------------


async def test_expiry_close_has_its_own_code_and_its_receiver_ends_the_session_lost(
    transport_and_addr,
):
    """bravo judges alpha's certificate expired: it closes with CERTIFICATE_EXPIRED (not
    ADMISSION_REFUSED, which answers a handshake), and alpha, whose messages sent meanwhile
    bravo dropped unread, ends the session as lost (so its owners' recovery runs), as for an
    idle timeout."""
    transport, addr = transport_and_addr
    fleet = make_fleet(None, ["alpha", "bravo"])
    not_after = fleet.identities["alpha"].certificate.not_after
    clock = FrozenClock(not_after + DEFAULT_CLOCK_SKEW_S - 0.2)
    admission = Admission(fleet.identities["bravo"], fleet.revocations, wallclock=clock)
    accepted = []

    async def handler(session):
        accepted.append(session)
        await session.wait_closed()

    async with SessionListener(transport, admission, handler) as listener:
        bound = await listener.start(addr)
        async with await dial(transport, bound, fleet.admission("alpha")) as client:
            await until(lambda: accepted)
            server = accepted[0]
            await client.send(AppData(topic="up", payload=b"before"))
            assert (await server.recv()).payload == b"before"
            clock.now = not_after + DEFAULT_CLOCK_SKEW_S + 0.01
            await until(lambda: not server.is_open, timeout=5.0)
            assert server.lost and server.close_code == CloseCode.CERTIFICATE_EXPIRED
            await until(lambda: not client.is_open, timeout=5.0)
            assert client.close_code == CloseCode.CERTIFICATE_EXPIRED
            assert client.lost
            assert "certificate of alpha" in client.close_reason
            assert "expired at" in client.close_reason


async def test_a_close_code_the_receiver_does_not_know_ends_the_session_closed(
    transport_and_addr,
):
    """What an older peer makes of CERTIFICATE_EXPIRED: a code it does not know (here one no
    version knows) is decoded, ends the session as closed (PROTOCOL_ERROR, the reason kept),
    not lost, and breaks nothing else."""
    fleet = make_fleet(None, ["alpha", "bravo"])
    async with Pair(*transport_and_addr, fleet) as pair:
        client = await pair.dial()
        server = await pair.accepted.get()
        await client.aclose(999, "a newer peer's reason")  # type: ignore[arg-type]
        await until(lambda: not server.is_open, timeout=5.0)
        assert server.close_code == CloseCode.PROTOCOL_ERROR and not server.lost
        assert server.close_reason == "peer closed: a newer peer's reason"
        again = await pair.dial()  # the listener serves on
        other = await pair.accepted.get()
        await again.send(AppData(topic="up", payload=b"still here"))
        assert (await other.recv()).payload == b"still here"


@pytest.mark.parametrize("code", [6, 999, 0xFFFF])  # 6: CERTIFICATE_EXPIRED
def test_close_decodes_any_16_bit_code(code):
    wire = messages.encode(Close(code, "certificate expired"))
    assert messages.decode(wire) == Close(code, "certificate expired")


def test_close_refuses_a_code_over_16_bits():
    with pytest.raises(RemoteProtocolError, match="out of range"):
        messages.decode(msgpack.packb([4, 0x10000, "x"]))


def test_the_expiry_code_is_appended():
    assert [c.value for c in CloseCode] == list(range(len(CloseCode)))
    assert CloseCode.CERTIFICATE_EXPIRED == 6


# --- a member whose certificate is revoked after its record was accepted ------------------------

NOW = 1.8e9


@pytest.fixture(scope="module")
def authority() -> FleetAuthority:
    return FleetAuthority.create("fixes29-fleet")


def enrolled(authority: FleetAuthority, node_id: str, serial: int) -> NodeIdentity:
    return authority.enroll(node_id, ["vehicle"], serial=serial, now=NOW, lifetime_s=3600.0)


def signer(identity: NodeIdentity, **kw) -> CertifiedRecordAuthenticator:
    return CertifiedRecordAuthenticator(
        identity.certificate, identity.static_private, identity.trust, random_bytes=os.urandom, **kw
    )


def state_of(identity: NodeIdentity) -> NodeState:
    return NodeState("127.0.0.1", 1, identity.static_public, roles=("vehicle",))


def alive(identity: NodeIdentity, incarnation: int = 0) -> AliveRecord:
    record = AliveRecord(identity.node_id, incarnation, 1, state_of(identity))
    proof = signer(identity).sign(signed_body(record))
    return replace(record, signature=proof)


CHECK = MembershipConfig.test().certificate_check_interval


def node_of(identity: NodeIdentity, auth: CertifiedRecordAuthenticator) -> Membership:
    config, rng = MembershipConfig.test(), random.Random(1)
    return Membership(identity.node_id, state_of(identity), config, rng, 0.0, authenticator=auth)


def announce_list(node: Membership, version: int, now: float) -> None:
    """What RevocationSync._merge does once a merged list is in force."""
    state = node.local_member.record.state
    node.update_local_state(replace(state, revocation_version=version), now)


def test_a_member_revoked_after_its_record_was_accepted_is_declared_dead(authority):
    """b's record is held; then b's certificate is revoked and the local state announces the
    newer list: at the next certificate check b is declared dead, counted ``revoked``, and its
    refutation under the revoked certificate does not bring it back; d, not revoked, stays;
    b re-enrolled comes back."""
    a, b, d = (enrolled(authority, n, s) for s, n in enumerate(["a", "b", "d"], 30))
    revocations = [RevocationList(a.trust.fleet_id)]
    auth = signer(a, wallclock=lambda: NOW, revoked=lambda c: revocations[0].is_revoked(c))
    node_a = node_of(a, auth)
    records = [encode_record(alive(b)), encode_record(alive(d))]
    node_a.handle_packet("d", encode_packet(PushPull(), records), 1.0)
    node_a.drain_events()
    assert node_a.member("b").is_live and node_a.member("d").is_live

    revocations[0] = authority.revoke(revocations[0], now=NOW, serial=b.certificate.serial)
    announce_list(node_a, revocations[0].version, 2.0)
    assert node_a.member("b").is_live  # the runtime's session cut, naming the revocation, first
    node_a.tick(CHECK)
    assert node_a.member("b").status is MemberStatus.DEAD
    assert node_a.member("d").is_live
    dead = [e.member.node_id for e in node_a.drain_events() if e.kind is MemberEventKind.DEAD]
    assert dead == ["b"]
    assert auth.refusals == {"revoked": 1}
    node_a.tick(2 * CHECK)  # judged once
    assert auth.refusals == {"revoked": 1}

    refute = encode_packet(Gossip(), [encode_record(alive(b, incarnation=1))])
    node_a.handle_packet("b", refute, 2 * CHECK)
    assert node_a.member("b").status is MemberStatus.DEAD

    again = authority.enroll("b", ["vehicle"], serial=40, now=NOW, lifetime_s=3600.0)
    back = encode_packet(Gossip(), [encode_record(alive(again, 2))])
    node_a.handle_packet("b", back, 2 * CHECK)
    assert node_a.member("b").status is MemberStatus.ALIVE


def test_held_records_are_verified_again_only_after_a_newer_list(authority):
    """An ordinary state update, or a check with the same list, costs no signature check per
    member; a newer list costs one each, at the next check."""
    a, b = enrolled(authority, "a", 50), enrolled(authority, "b", 51)
    auth = signer(a, wallclock=lambda: NOW)
    node_a = node_of(a, auth)
    node_a.handle_packet("b", encode_packet(PushPull(), [encode_record(alive(b))]), 1.0)
    calls = []
    verify = auth.verify
    auth.verify = lambda *args: calls.append(args[0]) or verify(*args)  # type: ignore[method-assign]
    state = node_a.local_member.record.state
    node_a.update_local_state(replace(state, port=2), 2.0)
    node_a.tick(CHECK)
    assert calls == [] and node_a.member("b").is_live
    announce_list(node_a, 1, CHECK + 1)
    assert calls == []
    node_a.tick(2 * CHECK)
    assert calls == ["b"] and node_a.member("b").is_live
