"""Fleet identity: certificates, admission reasons, revocation lists, prologue, decoder fuzzing."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshinfer.errors import (
    AdmissionError,
    ConfigError,
    IdentityError,
    LocalProtocolError,
    RemoteProtocolError,
)
from meshinfer.proto.identity import (
    CERT_DOMAIN,
    DEFAULT_CLOCK_SKEW_S,
    MAX_CERTIFICATE_BYTES,
    MAX_REVOCATION_ENTRIES,
    REVOCATION_DOMAIN,
    FleetAuthority,
    NodeCertificate,
    NodeIdentity,
    RevocationEntry,
    RevocationError,
    RevocationList,
    admit,
    key_fingerprint,
    prologue,
    static_public_key,
)

NOW = 1_700_000_000.0
DAY = 86_400.0
FLEET = "fleet-a"
AUTHORITY = FleetAuthority.create(FLEET, seed=bytes(range(32)))
IMPOSTOR = FleetAuthority.create(FLEET, seed=bytes(range(1, 33)))  # same fleet id, other key
TRUST = AUTHORITY.trust
EMPTY = RevocationList(FLEET)
STATIC_PRIVATE = bytes([7] * 32)
STATIC = static_public_key(STATIC_PRIVATE)
OTHER_STATIC = static_public_key(bytes([9] * 32))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def issue(authority: FleetAuthority = AUTHORITY, **overrides: object) -> NodeCertificate:
    fields: dict[str, object] = {
        "node_id": "car-1",
        "static_public": STATIC,
        "roles": {"vehicle"},
        "not_before": NOW,
        "not_after": NOW + DAY,
        "serial": 1,
    }
    fields.update(overrides)
    return authority.sign(**fields)  # type: ignore[arg-type]


def admit_at(
    cert: NodeCertificate | bytes,
    *,
    now: float = NOW + 60,
    proven: bytes = STATIC,
    revocations: RevocationList = EMPTY,
    **options: object,
) -> NodeCertificate:
    data = cert.to_bytes() if isinstance(cert, NodeCertificate) else cert
    return admit(
        data, proven_static=proven, trust=TRUST, revocations=revocations, now=now, **options
    )  # type: ignore[arg-type]


def refusal(cert: NodeCertificate | bytes, **kwargs: object) -> str:
    with pytest.raises(AdmissionError) as info:
        admit_at(cert, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, RemoteProtocolError)
    return info.value.reason


# --- certificates ------------------------------------------------------------------------------


def test_valid_certificate_is_admitted_and_returned() -> None:
    cert = issue(roles={"vehicle", "rsu"})
    admitted = admit_at(cert, required_roles=frozenset({"rsu"}))
    assert admitted == cert
    assert admitted.roles == frozenset({"vehicle", "rsu"})


@pytest.mark.parametrize("not_before", [NOW, int(NOW), NOW + 0.25])
def test_certificate_round_trip(not_before: float) -> None:
    cert = issue(not_before=not_before, not_after=int(NOW) + 10 * DAY)
    decoded = NodeCertificate.from_bytes(cert.to_bytes())
    assert decoded == cert
    assert decoded.to_bytes() == cert.to_bytes()
    assert decoded.not_before == float(not_before)


def test_fingerprint_is_short_hex_of_the_static_key() -> None:
    a, b = issue(), issue(static_public=OTHER_STATIC)
    assert len(a.fingerprint) == 16
    int(a.fingerprint, 16)
    assert a.fingerprint == key_fingerprint(STATIC) == issue(serial=9).fingerprint
    assert a.fingerprint != b.fingerprint


@pytest.mark.parametrize("node_id", ["a", "A" * 64, "car-1.eu_west", "0", "...", ".a", "a.."])
def test_valid_node_ids(node_id: str) -> None:
    assert issue(node_id=node_id).node_id == node_id


@pytest.mark.parametrize(
    "node_id", ["", "a" * 65, "car 1", "car/1", "café", "car\n", ".", "..", None, 7]
)
def test_invalid_node_ids_are_refused(node_id: object) -> None:
    with pytest.raises(ConfigError, match="node id"):
        issue(node_id=node_id)


@pytest.mark.parametrize(
    "overrides",
    [
        {"roles": set()},
        {"roles": {"vehicle", "tank"}},
        {"static_public": b"short"},
        {"not_after": NOW - 1},
        {"not_before": float("nan")},
        {"serial": -1},
        {"serial": True},
    ],
)
def test_invalid_certificate_fields_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        issue(**overrides)


# --- admission: every reason, each test fails if its check is removed --------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\xc4\x00", b"\x91" * 5000, b"x" * (MAX_CERTIFICATE_BYTES + 1)],
    ids=["empty", "reserved-byte", "truncated", "deep-nesting", "oversized"],
)
def test_malformed_bytes(data: bytes) -> None:
    assert refusal(data) == "malformed"


def test_truncated_and_extended_certificates_are_malformed() -> None:
    data = issue().to_bytes()
    assert refusal(data[:-1]) == "malformed"
    assert refusal(data + b"\x00") == "malformed"


def _signed_raw_certificate(fields: list[object]) -> bytes:
    body = msgpack.packb(fields)
    return msgpack.packb([body, AUTHORITY.signing_key.sign(CERT_DOMAIN + body).signature])


def test_non_canonical_but_validly_signed_body_is_malformed() -> None:
    """Integer times or unsorted roles would give one certificate two encodings."""
    fields = [FLEET, 1, "car-1", STATIC, ["vehicle"], NOW, NOW + DAY]
    assert admit_at(_signed_raw_certificate(fields)).serial == 1
    integer_times = [FLEET, 1, "car-1", STATIC, ["vehicle"], int(NOW), int(NOW + DAY)]
    assert refusal(_signed_raw_certificate(integer_times)) == "malformed"
    unsorted_roles = [FLEET, 1, "car-1", STATIC, ["vehicle", "rsu"], NOW, NOW + DAY]
    assert refusal(_signed_raw_certificate(unsorted_roles)) == "malformed"


def test_wrong_fleet() -> None:
    # Signed by our own authority key, so only the fleet-id check can refuse it.
    other_fleet = FleetAuthority("fleet-b", AUTHORITY.signing_key)
    assert refusal(issue(authority=other_fleet)) == "wrong-fleet"


def test_bad_signature_from_another_authority() -> None:
    assert refusal(issue(authority=IMPOSTOR)) == "bad-signature"


def test_bad_signature_after_tampering() -> None:
    cert = issue()
    flipped = bytes([cert.signature[0] ^ 1]) + cert.signature[1:]
    assert refusal(dataclasses.replace(cert, signature=flipped)) == "bad-signature"
    assert refusal(dataclasses.replace(cert, roles=frozenset({"coordinator"}))) == "bad-signature"
    assert refusal(dataclasses.replace(cert, not_after=NOW + 1000 * DAY)) == "bad-signature"


def test_key_mismatch() -> None:
    assert refusal(issue(), proven=OTHER_STATIC) == "key-mismatch"


def test_not_yet_valid_with_skew_tolerance() -> None:
    cert = issue(not_before=NOW + 1000)
    assert admit_at(cert, now=NOW + 1000 - DEFAULT_CLOCK_SKEW_S + 1) == cert
    assert refusal(cert, now=NOW + 1000 - DEFAULT_CLOCK_SKEW_S - 1) == "not-yet-valid"
    assert refusal(cert, now=NOW + 999, clock_skew=0.0) == "not-yet-valid"


def test_expired_with_skew_tolerance() -> None:
    cert = issue()
    assert admit_at(cert, now=NOW + DAY + DEFAULT_CLOCK_SKEW_S - 1) == cert
    assert refusal(cert, now=NOW + DAY + DEFAULT_CLOCK_SKEW_S + 1) == "expired"
    assert refusal(cert, now=NOW + DAY + 1, clock_skew=0.0) == "expired"


def test_revoked_by_serial() -> None:
    revocations = AUTHORITY.revoke(EMPTY, now=NOW + 10, serial=1, reason="key lost")
    assert refusal(issue(serial=1), revocations=revocations) == "revoked"
    assert admit_at(issue(serial=2), revocations=revocations).serial == 2


def test_revoked_by_node_id_covers_earlier_certificates_only() -> None:
    revocations = AUTHORITY.revoke(EMPTY, now=NOW + 10, node_id="car-1")
    assert refusal(issue(serial=1), revocations=revocations) == "revoked"
    assert refusal(issue(serial=2, not_before=NOW + 10), revocations=revocations) == "revoked"
    reissued = issue(serial=3, not_before=NOW + 11)
    assert admit_at(reissued, now=NOW + 60, revocations=revocations) == reissued
    assert admit_at(issue(node_id="car-2"), revocations=revocations).node_id == "car-2"


def test_missing_role() -> None:
    cert = issue(roles={"vehicle"})
    assert refusal(cert, required_roles=frozenset({"rsu"})) == "missing-role"
    assert refusal(cert, required_roles=frozenset({"vehicle", "rsu"})) == "missing-role"
    assert admit_at(cert, required_roles=frozenset({"vehicle"})) == cert


def test_revocations_of_another_fleet_are_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        admit_at(issue(), revocations=RevocationList("fleet-b"))


# --- prologue ----------------------------------------------------------------------------------


def test_prologue_binds_fleet_and_version() -> None:
    base = prologue(FLEET, 1)
    assert base == prologue(FLEET, 1)
    assert base != prologue("fleet-b", 1)
    assert base != prologue(FLEET, 2)
    assert FLEET.encode() in base


FLEET_IDS = st.from_regex(r"[a-z0-9.]{1,8}", fullmatch=True).filter(lambda f: f not in (".", ".."))


@given(
    st.tuples(FLEET_IDS, st.integers(0, 2**32 - 1)),
    st.tuples(FLEET_IDS, st.integers(0, 2**32 - 1)),
)
@settings(max_examples=300)
def test_prologue_is_injective(a: tuple[str, int], b: tuple[str, int]) -> None:
    assert (prologue(*a) == prologue(*b)) == (a == b)


@pytest.mark.parametrize("fleet_id, version", [("", 1), ("a b", 1), (FLEET, -1), (FLEET, 2**32)])
def test_prologue_refuses_bad_input(fleet_id: str, version: int) -> None:
    with pytest.raises(ConfigError):
        prologue(fleet_id, version)


# --- node identity -----------------------------------------------------------------------------


def test_enrolled_identity_is_admitted_by_peers() -> None:
    identity = AUTHORITY.enroll("rsu-7", ["rsu"], now=NOW, lifetime_s=DAY, serial=5)
    assert identity.node_id == "rsu-7"
    assert identity.static_public == static_public_key(identity.static_private)
    cert = admit_at(identity.certificate, proven=identity.static_public)
    assert cert.serial == 5


def test_identity_refuses_mismatched_parts() -> None:
    cert = issue()
    assert NodeIdentity.from_parts(STATIC_PRIVATE, cert, TRUST).certificate == cert
    with pytest.raises(IdentityError, match="static key does not match"):
        NodeIdentity.from_parts(bytes([9] * 32), cert, TRUST)
    with pytest.raises(IdentityError, match="does not verify"):
        NodeIdentity.from_parts(STATIC_PRIVATE, issue(authority=IMPOSTOR), TRUST)
    with pytest.raises(IdentityError, match="does not match the static private key"):
        NodeIdentity("car-1", STATIC_PRIVATE, OTHER_STATIC, cert, TRUST)


# --- revocation lists --------------------------------------------------------------------------


def test_revocation_list_round_trip_and_versions() -> None:
    one = AUTHORITY.revoke(EMPTY, now=NOW, serial=4, reason="stolen")
    two = AUTHORITY.revoke(one, now=NOW + 1, node_id="car-9")
    assert (EMPTY.version, one.version, two.version) == (0, 1, 2)
    decoded = RevocationList.from_bytes(two.to_bytes(), TRUST)
    assert decoded == two
    assert decoded.to_bytes() == two.to_bytes()
    assert RevocationList.from_bytes(EMPTY.to_bytes(), TRUST) == EMPTY
    assert two.since(1) == RevocationList(FLEET, two.entries - one.entries)
    assert one.merge(two.since(one.version)) == two


def test_revocation_entry_names_exactly_one_target() -> None:
    with pytest.raises(ConfigError):
        AUTHORITY.revoke(EMPTY, now=NOW, serial=1, node_id="car-1")
    with pytest.raises(ConfigError):
        AUTHORITY.revoke(EMPTY, now=NOW)


def test_revocation_list_refuses_foreign_or_forged_entries() -> None:
    forged = IMPOSTOR.revoke(EMPTY, now=NOW, serial=1)
    with pytest.raises(RevocationError, match="bad signature"):
        RevocationList.from_bytes(forged.to_bytes(), TRUST)
    foreign = FleetAuthority("fleet-b", AUTHORITY.signing_key).revoke(
        RevocationList("fleet-b"), now=NOW, serial=1
    )
    with pytest.raises(RevocationError, match="fleet-b"):
        RevocationList.from_bytes(foreign.to_bytes(), TRUST)
    (entry,) = foreign.entries
    smuggled = msgpack.packb([1, FLEET, [entry.to_bytes()]])
    with pytest.raises(RevocationError, match="fleet-b"):
        RevocationList.from_bytes(smuggled, TRUST)


def test_revocation_entry_with_tampered_reason_is_refused() -> None:
    (entry,) = AUTHORITY.revoke(EMPTY, now=NOW, serial=1, reason="a").entries
    tampered = dataclasses.replace(entry, reason="b")
    with pytest.raises(RevocationError, match="bad signature"):
        RevocationEntry.from_bytes(tampered.to_bytes(), TRUST)
    assert RevocationEntry.from_bytes(entry.to_bytes(), TRUST) == entry


def test_revocation_list_entry_cap() -> None:
    data = msgpack.packb([1, FLEET, [b""] * (MAX_REVOCATION_ENTRIES + 1)])
    with pytest.raises(RevocationError, match="at most"):
        RevocationList.from_bytes(data, TRUST)


def test_merging_lists_of_different_fleets_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        EMPTY.merge(RevocationList("fleet-b"))


def _entry(
    sequence: int, *, serial: int | None = None, node_id: str | None = None
) -> RevocationEntry:
    draft = RevocationEntry(FLEET, sequence, NOW + sequence, serial, node_id, "", bytes(64))
    signature = AUTHORITY.signing_key.sign(REVOCATION_DOMAIN + draft.body()).signature
    return dataclasses.replace(draft, signature=signature)


POOL = [_entry(s, serial=s % 4) for s in range(1, 7)] + [
    _entry(s, node_id=f"car-{s % 3}") for s in range(3, 9)
]
POOL_CERTS = [
    issue(serial=serial, node_id=f"car-{n}", not_before=NOW + offset)
    for serial in range(5)
    for n in range(3)
    for offset in (0.0, 5.0)
]
revocation_lists = st.frozensets(st.sampled_from(POOL)).map(lambda es: RevocationList(FLEET, es))


@given(revocation_lists, revocation_lists, revocation_lists)
@settings(max_examples=300)
def test_merge_is_commutative_associative_idempotent(
    a: RevocationList, b: RevocationList, c: RevocationList
) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a
    assert a.merge(b).version == max(a.version, b.version)


@given(revocation_lists, revocation_lists, st.sampled_from(POOL_CERTS))
@settings(max_examples=300)
def test_revoked_stays_revoked_after_any_merge(
    a: RevocationList, b: RevocationList, cert: NodeCertificate
) -> None:
    merged = a.merge(b)
    assert merged.is_revoked(cert) == (a.is_revoked(cert) or b.is_revoked(cert))
    assert RevocationList.from_bytes(merged.to_bytes(), TRUST) == merged


# --- decoder fuzzing: only RemoteProtocolError may escape --------------------------------------

VALID_CERT = issue(roles={"vehicle", "rsu", "coordinator"}).to_bytes()
VALID_LIST = AUTHORITY.revoke(
    AUTHORITY.revoke(EMPTY, now=NOW, serial=3, reason="x"), now=NOW, node_id="car-1"
).to_bytes()


def decode_certificate(data: bytes) -> None:
    try:
        cert = NodeCertificate.from_bytes(data)
    except RemoteProtocolError:
        return
    assert cert.to_bytes() == data  # whatever decodes is canonical


def decode_revocations(data: bytes) -> None:
    try:
        revocations = RevocationList.from_bytes(data, TRUST)
    except RemoteProtocolError:
        return
    assert all(e.fleet_id == FLEET for e in revocations.entries)


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        byte = draw(st.integers(0, 255))
        if action == "flip" and data:
            data[position] ^= 1 << (byte % 8)
        elif action == "set" and data:
            data[position] = byte
        elif action == "insert":
            data.insert(position, byte)
        elif action == "delete" and data:
            del data[position]
        elif action == "truncate":
            del data[position:]
    return bytes(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=70),
    lambda inner: st.lists(inner, max_size=8),
    max_leaves=20,
)


def _pack(value: object) -> bytes:
    try:
        return msgpack.packb(value)
    except OverflowError:  # integers msgpack cannot carry
        return msgpack.packb(None)


@given(st.binary(max_size=700))
@FUZZ
def test_fuzz_certificate_random_bytes(data: bytes) -> None:
    decode_certificate(data)


@given(mutated(VALID_CERT))
@FUZZ
def test_fuzz_certificate_mutations(data: bytes) -> None:
    decode_certificate(data)


VALID_CERT_FIELDS = [FLEET, 1, "car-1", STATIC, ["rsu", "vehicle"], NOW, NOW + DAY]
VALID_ENTRY_FIELDS = [FLEET, 1, NOW, 3, None, "reason"]


@st.composite
def partly_valid(draw: st.DrawFn, valid: list[object]) -> list[object]:
    """Valid fields with some replaced by arbitrary msgpack values, to reach every check."""
    return [draw(msgpack_values) if draw(st.booleans()) else value for value in valid]


@given(partly_valid(VALID_CERT_FIELDS), st.binary(min_size=64, max_size=64))
@FUZZ
def test_fuzz_certificate_fields(fields: list[object], signature: bytes) -> None:
    decode_certificate(msgpack.packb([_pack(fields), signature]))


@given(st.binary(max_size=700))
@FUZZ
def test_fuzz_revocation_list_random_bytes(data: bytes) -> None:
    decode_revocations(data)


@given(mutated(VALID_LIST))
@FUZZ
def test_fuzz_revocation_list_mutations(data: bytes) -> None:
    decode_revocations(data)


@given(partly_valid(VALID_ENTRY_FIELDS), st.binary(min_size=64, max_size=64))
@FUZZ
def test_fuzz_revocation_entry_fields(fields: list[object], signature: bytes) -> None:
    entry = msgpack.packb([_pack(fields), signature])
    decode_revocations(msgpack.packb([1, FLEET, [entry]]))


@given(msgpack_values)
@FUZZ
def test_fuzz_revocation_list_structure(value: object) -> None:
    decode_revocations(_pack([1, FLEET, value]))
    decode_revocations(_pack(value))
