"""What signed membership records cost: size, signing, checking, and a whole table taken in.

Run: ``python bench/bench_signed_records.py [--members 64 512 4096] [--repeat 5]``.

Node daemons sign their own ALIVE and LEFT records and check everyone else's
(:class:`~meshinfer.proto.membership_auth.CertifiedRecordAuthenticator`: the author's fleet
certificate and an XEdDSA signature by its Noise static key). The baseline, measured in the same
run on the same records, is the SWIM core without an authenticator (unsigned records, relays
trusted), so each line prints signed / unsigned:

(a) the encoded size of one ALIVE record of a typical vehicle;
(b) signing one record, and checking one (the certificate already checked, as for every record
    of a member after its first); the baseline of these two is a bare Ed25519 signature of the
    same bytes (libsodium's ``crypto_sign`` / ``crypto_sign_open``), the floor of any signature;
(c) a node joining a fleet of N: one push-pull carrying N members' records, applied to a fresh
    table (every certificate new to it), in microseconds per member;
(d) steady state: one new version of a known member's state (its telemetry changed), applied.

Each figure is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import time
from collections.abc import Callable

from nacl.bindings import crypto_sign, crypto_sign_keypair, crypto_sign_open

from meshinfer.proto.identity import (
    DEFAULT_CLOCK_SKEW_S,
    FleetAuthority,
    NodeIdentity,
    RevocationList,
)
from meshinfer.proto.membership import Membership, MembershipConfig
from meshinfer.proto.membership_auth import CertifiedRecordAuthenticator
from meshinfer.proto.membership_wire import (
    AliveRecord,
    Gossip,
    ModelInfo,
    NodeState,
    PushPull,
    encode_packet,
    encode_record,
    signed_body,
)

NOW = 1.8e9


def state_of(identity: NodeIdentity, port: int = 47001) -> NodeState:
    model = ModelInfo("synthetic-mlp", "w10-d1", bytes(32))
    return NodeState(
        "192.168.100.23", port, identity.static_public, ("vehicle",), (model,), links=("v2v",)
    )


def authenticator(identity: NodeIdentity) -> CertifiedRecordAuthenticator:
    """As a node daemon builds it (:class:`meshinfer.runtime.node.MeshNode`): the revocation list
    in force looked up per certificate (an empty list here, as in most fleets) and each
    certificate's validity judged against a wall clock (inside the enrolment's hour)."""
    revocations = RevocationList(identity.trust.fleet_id)
    return CertifiedRecordAuthenticator(
        identity.certificate,
        identity.static_private,
        identity.trust,
        random_bytes=os.urandom,
        revoked=revocations.is_revoked,
        cache_entries=1 << 16,
        wallclock=lambda: NOW + 60,
        clock_skew=DEFAULT_CLOCK_SKEW_S,
    )


def record(identity: NodeIdentity, version: int, signer: CertifiedRecordAuthenticator | None):
    unsigned = AliveRecord(identity.node_id, 0, version, state_of(identity, 40000 + version))
    if signer is None:
        return unsigned
    return AliveRecord(
        unsigned.node_id, 0, version, unsigned.state, signer.sign(signed_body(unsigned))
    )


def core(identity: NodeIdentity, signed: bool) -> Membership:
    config = dataclasses.replace(MembershipConfig.lan(), max_members=65536)
    auth = authenticator(identity) if signed else None
    return Membership(
        identity.node_id, state_of(identity), config, random.Random(1), 0.0, authenticator=auth
    )


def median_us(run: Callable[[], float], repeat: int) -> float:
    return statistics.median(run() for _ in range(repeat)) * 1e6


def timed(action: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        action()
    return (time.perf_counter() - start) / count


def join(receiver: NodeIdentity, n: int, signed: bool, packet: bytes) -> float:
    """Seconds per member for a fresh node to take in a push-pull of ``n`` members."""
    node = core(receiver, signed)
    start = time.perf_counter()
    node.handle_packet("vehicle-00001", packet, 1.0)
    elapsed = time.perf_counter() - start
    assert len(node.live_members()) == n, "the table was not taken in"
    return elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if min(args.members) < 1 or args.repeat < 1:
        parser.error("--members values and --repeat must be at least 1")
    authority = FleetAuthority.create("bench-fleet")
    largest = max(args.members)
    fleet = [
        authority.enroll(f"vehicle-{i:05d}", ["vehicle"], now=NOW, lifetime_s=3600, serial=i + 1)
        for i in range(largest + 1)
    ]
    receiver, members = fleet[0], fleet[1:]
    signers = {m.node_id: authenticator(m) for m in members}
    print(f"{'figure':48} {'signed':>10} {'unsigned':>10} {'ratio':>7}")

    one, signer = members[0], signers[members[0].node_id]
    signed, plain = record(one, 1, signer), record(one, 1, None)
    size_s, size_p = len(encode_record(signed)), len(encode_record(plain))
    print(f"{'(a) ALIVE record, bytes':48} {size_s:>10} {size_p:>10} {size_s / size_p:>6.2f}x")
    body = signed_body(plain)
    sign_us = median_us(lambda: timed(lambda: signer.sign(body), 500), args.repeat)
    check = authenticator(receiver)
    proof = signer.sign(body)
    verify_us = median_us(
        lambda: timed(lambda: check.verify(one.node_id, body, proof), 500), args.repeat
    )
    public, secret = crypto_sign_keypair()
    signed_body_bytes = crypto_sign(body, secret)
    bare_sign_us = median_us(lambda: timed(lambda: crypto_sign(body, secret), 500), args.repeat)
    bare_open_us = median_us(
        lambda: timed(lambda: crypto_sign_open(signed_body_bytes, public), 500), args.repeat
    )
    for label, ours, bare in (
        ("(b) sign one record, us (unsigned: bare Ed25519)", sign_us, bare_sign_us),
        ("(b) check one record (known cert.), us (ditto)", verify_us, bare_open_us),
    ):
        print(f"{label:48} {ours:>10.1f} {bare:>10.1f} {ours / bare:>6.2f}x")

    for n in args.members:
        tables = {
            flag: encode_packet(
                PushPull(response=True),
                [
                    encode_record(record(m, 1, signers[m.node_id] if flag else None))
                    for m in members[:n]
                ],
            )
            for flag in (True, False)
        }

        pair = {
            flag: median_us(lambda f=flag, t=tables, k=n: join(receiver, k, f, t[f]), args.repeat)
            for flag in tables
        }
        label = f"(c) join a fleet of {n}: push-pull, us per member"
        print(
            f"{label:48} {pair[True]:>10.1f} {pair[False]:>10.1f} {pair[True] / pair[False]:>6.2f}x"
        )

    def update(flag: bool) -> float:
        node = core(receiver, flag)
        member = members[0]
        sign = signers[member.node_id] if flag else None
        first = encode_packet(Gossip(), [encode_record(record(member, 1, sign))])
        node.handle_packet(member.node_id, first, 1.0)
        packets = [
            encode_packet(Gossip(), [encode_record(record(member, v, sign))]) for v in range(2, 402)
        ]
        start = time.perf_counter()
        for packet in packets:
            node.handle_packet(member.node_id, packet, 2.0)
        elapsed = time.perf_counter() - start
        assert node.member(member.node_id).record.version == 401
        return elapsed / len(packets)

    pair = {flag: median_us(lambda f=flag: update(f), args.repeat) for flag in (True, False)}
    label = "(d) a member's new state version applied, us"
    print(f"{label:48} {pair[True]:>10.1f} {pair[False]:>10.1f} {pair[True] / pair[False]:>6.2f}x")


if __name__ == "__main__":
    main()
