"""One certificate validity rule (``NodeCertificate.validity_problem``), the ALIVE body layout
``claimed_static_key`` reads, ``judges_validity`` in the authenticator protocol, and revocation
lists built by merge/since through the constructor."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random

import msgpack
import nacl.signing
import pytest

from meshinfer.errors import AdmissionError, ConfigError, LocalProtocolError
from meshinfer.fleetcli import _status
from meshinfer.proto.identity import (
    DEFAULT_CLOCK_SKEW_S,
    FleetAuthority,
    RevocationList,
    admit,
)
from meshinfer.proto.membership import Membership
from meshinfer.proto.membership_auth import (
    CertifiedRecordAuthenticator,
    Ed25519RecordAuthenticator,
    claimed_static_key,
)
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_wire import (
    ALIVE_BODY_FIELDS,
    ALIVE_BODY_STATE,
    LEFT_BODY_FIELDS,
    SIGNED_BODY_DOMAIN,
    STATE_STATIC_KEY,
    AliveRecord,
    LeftRecord,
    NodeState,
    signed_body,
)
from meshinfer.runtime.session import SessionConfig
from meshinfer.runtime.startup import check_validity

NOW = 1_700_000_000.0
LIFE = 3600.0
AUTHORITY = FleetAuthority.create("fixes30-fleet", seed=bytes(range(32)))
IDENTITY = AUTHORITY.enroll(
    "car-1", ["vehicle"], now=NOW, lifetime_s=LIFE, serial=1, static_private=bytes([7] * 32)
)
CERT = IDENTITY.certificate
EMPTY = RevocationList(AUTHORITY.fleet_id)


def edges(skew: float) -> list[float]:
    """Times on and either side of both ends of CERT's window widened by ``skew``."""
    low, high = CERT.not_before - skew, CERT.not_after + skew
    return [
        *(math.nextafter(low, -math.inf), low, math.nextafter(low, math.inf)),
        *(math.nextafter(high, -math.inf), high, math.nextafter(high, math.inf)),
        low - 1000.0,
        NOW + LIFE / 2,
        high + 1000.0,
    ]


def expected(now: float, skew: float) -> str | None:
    if now < CERT.not_before - skew:
        return "not-yet-valid"
    return "expired" if now > CERT.not_after + skew else None


# --- the rule --------------------------------------------------------------------------------


@pytest.mark.parametrize("skew", [0.0, 1.5, DEFAULT_CLOCK_SKEW_S])
def test_validity_problem_is_inclusive_at_both_ends(skew):
    for now in edges(skew):
        problem = CERT.validity_problem(now, skew)
        assert problem == expected(now, skew), (now, skew)
        assert (CERT.seconds_left(now, skew) < 0) == (problem == "expired")


@pytest.mark.parametrize(("now", "skew"), [(math.nan, 0.0), (NOW, math.nan), (math.nan, math.nan)])
def test_a_nan_time_or_skew_is_never_valid(now, skew):
    with pytest.raises(AdmissionError):  # (the old rule let any certificate in)
        admit(
            CERT.to_bytes(),
            proven_static=CERT.static_public,
            trust=AUTHORITY.trust,
            revocations=EMPTY,
            now=now,
            clock_skew=skew,
        )
    assert CERT.validity_problem(now, skew) is not None


def record_authenticator(clock: list[float], skew: float) -> CertifiedRecordAuthenticator:
    return CertifiedRecordAuthenticator(
        CERT,
        IDENTITY.static_private,
        AUTHORITY.trust,
        random_bytes=os.urandom,
        wallclock=lambda: clock[0],
        clock_skew=skew,
    )


@pytest.mark.parametrize("skew", [0.0, DEFAULT_CLOCK_SKEW_S])
def test_every_caller_judges_by_the_one_rule(skew, caplog):
    """admit (its reasons and texts), records' verify and expired, sessions' certificate_left
    rule, daemon start-up and fleet status (both with no skew) agree at every edge."""
    clock = [NOW]
    auth = record_authenticator(clock, skew)
    record = AliveRecord("car-1", 0, 1, NodeState("127.0.0.1", 1, CERT.static_public))
    body = signed_body(record)
    proof = auth.sign(body)
    texts = {"not-yet-valid": "certificate starts later", "expired": "certificate has expired"}
    for now in edges(skew):
        want = expected(now, skew)
        clock[0] = now
        try:
            admit(
                CERT.to_bytes(),
                proven_static=CERT.static_public,
                trust=AUTHORITY.trust,
                revocations=EMPTY,
                now=now,
                clock_skew=skew,
            )
            reason = None
        except AdmissionError as exc:
            reason = exc.reason
            assert str(exc).endswith(f"node 'car-1' {texts[exc.reason]}"), str(exc)
        assert reason == want
        refusals = dict(auth.refusals)
        assert auth.verify("car-1", body, proof) == (want is None)
        if want is not None:
            assert auth.refusals[want] == refusals.get(want, 0) + 1
        assert auth.expired(proof) == (want == "expired")
    for now in edges(0.0):
        want = expected(now, 0.0)
        assert _status(CERT, AUTHORITY.trust, EMPTY, now) == (want or "valid")
        caplog.clear()
        if want == "expired":
            with pytest.raises(ConfigError, match="expired at"):
                check_validity(IDENTITY, "here", now=now)
        else:
            with caplog.at_level(logging.WARNING, logger="meshinfer.runtime.startup"):
                check_validity(IDENTITY, "here", now=now)
            assert ("valid only from" in caplog.text) == (want == "not-yet-valid")


@pytest.mark.parametrize("skew", [-1.0, math.nan, math.inf])
def test_the_record_authenticator_refuses_a_skew_out_of_range(skew):
    with pytest.raises(ValueError, match="clock_skew"):
        record_authenticator([NOW], skew)


@pytest.mark.parametrize("skew", [-1.0, math.nan])
def test_session_config_refuses_a_skew_out_of_range(skew):
    with pytest.raises(ValueError):
        SessionConfig(clock_skew=skew)


# --- the ALIVE body layout -------------------------------------------------------------------


def test_the_named_positions_are_where_signed_body_puts_them():
    key = bytes(range(32))
    body = signed_body(AliveRecord("n", 3, 4, NodeState("h", 5, key, roles=("rsu",))))
    fields = msgpack.unpackb(body[len(SIGNED_BODY_DOMAIN) :])
    assert len(fields) == ALIVE_BODY_FIELDS
    assert fields[ALIVE_BODY_STATE][STATE_STATIC_KEY] == key == claimed_static_key(body)
    left = msgpack.unpackb(signed_body(LeftRecord("n", 3))[len(SIGNED_BODY_DOMAIN) :])
    assert len(left) == LEFT_BODY_FIELDS


# --- judges_validity in the protocol ---------------------------------------------------------


def membership(authenticator) -> Membership:
    state = NodeState("127.0.0.1", 1, CERT.static_public)
    config, rng = MembershipConfig.test(), random.Random(1)
    return Membership("car-1", state, config, rng, 0.0, authenticator=authenticator)


def test_judges_validity_is_part_of_every_authenticator():
    plain = Ed25519RecordAuthenticator(nacl.signing.SigningKey(bytes(32)), lambda node: None)
    assert plain.judges_validity is False and plain.expired(b"anything") is False
    assert membership(plain).table.checks_certificates is False
    assert membership(None).table.checks_certificates is False
    without_clock = CertifiedRecordAuthenticator(
        CERT, IDENTITY.static_private, AUTHORITY.trust, random_bytes=os.urandom
    )
    assert membership(without_clock).table.checks_certificates is False
    assert membership(record_authenticator([NOW], 0.0)).table.checks_certificates is True


# --- revocation lists built without the full check -------------------------------------------


def revoked(count: int) -> RevocationList:
    revocations = EMPTY
    for serial in range(count):
        revocations = AUTHORITY.revoke(revocations, now=NOW, serial=serial)
    return revocations


def test_merged_and_since_lists_hold_what_the_constructor_sets():
    five = revoked(5)
    plain = RevocationList(AUTHORITY.fleet_id, five.entries)
    built = {
        "merge": revoked(2).merge(five),
        "since": five.since(2),
        "revoke": AUTHORITY.revoke(five, now=NOW, node_id="car-1"),
    }
    for how, made in built.items():
        for each in (plain, made):
            _ = each.version, each.is_revoked(CERT)  # fill the caches on both
        assert vars(made).keys() == vars(plain).keys(), how
        assert type(made.entries) is frozenset, how
    assert built["merge"] == plain


@dataclasses.dataclass(frozen=True)
class TaggedRevocations(RevocationList):
    """A list with a later field (what a new field of RevocationList would be)."""

    tag: str = "untagged"

    def __post_init__(self, entries_checked: object) -> None:
        super().__post_init__(entries_checked)
        object.__setattr__(self, "seen", True)  # (an attribute __post_init__ derives)


def test_a_later_field_is_set_on_a_list_built_without_the_full_check():
    five = revoked(5)
    made = TaggedRevocations._of_checked(AUTHORITY.fleet_id, five.entries, 5)
    assert made.tag == "untagged" and made.seen and made.version == 5
    assert made.entries is five.entries  # (no copy, no pass over the entries)


def test_the_constructor_still_checks_entries_of_another_fleet():
    other = FleetAuthority.create("other-fleet", seed=bytes(range(1, 33)))
    theirs = other.revoke(RevocationList(other.fleet_id), now=NOW, serial=1)
    with pytest.raises(LocalProtocolError, match="different fleets"):
        RevocationList(AUTHORITY.fleet_id, theirs.entries)
    with pytest.raises(LocalProtocolError, match="different fleets"):
        dataclasses.replace(revoked(1).since(0), entries=theirs.entries)
