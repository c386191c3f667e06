"""The revocation exchange's decisions, pure: who is asked and when, paging, pacing of answers,
which answers count. (The exchange between running nodes: test_revocation_sync.py.)"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.proto import revocation_sync
from meshinfer.proto.identity import RevocationList
from meshinfer.proto.revocation_sync import PAGE_ENTRIES, RevocationExchange
from meshinfer.proto.revocation_wire import RevocationsOffer, RevocationsWanted
from meshinfer.testing.fleet import make_fleet

PATIENCE, INTERVAL = 5.0, 0.05

#: One authority's list of 2.5 pages of entries, numbered 1..N (signed once for the module).
_FLEET = make_fleet(node_ids=())
for _i in range(PAGE_ENTRIES * 5 // 2):
    _FLEET.revoke(f"veh-{_i}")
FULL_LIST = _FLEET.revocations
N = len(FULL_LIST.entries)
BY_SEQUENCE = sorted(FULL_LIST.entries, key=lambda e: e.sequence)


def up_to(version: int) -> RevocationList:
    """The authority's list as it was at ``version``."""
    return RevocationList(FULL_LIST.fleet_id, BY_SEQUENCE[:version])


def exchange(version: int = 0) -> RevocationExchange:
    return RevocationExchange(up_to(version), patience=PATIENCE, answer_interval=INTERVAL)


def wire(version_from: int, version_to: int) -> tuple[bytes, ...]:
    return tuple(e.to_bytes() for e in BY_SEQUENCE[version_from:version_to])


# --- asking ----------------------------------------------------------------------------------


def test_only_a_member_ahead_is_asked_and_at_most_once_per_patience():
    ours = exchange(3)
    rng = random.Random(1)
    assert ours.version == 3
    assert ours.question({"a": 3, "b": 1}, 0.0, rng) is None  # nobody ahead
    node, wanted = ours.question({"a": 3, "b": 7}, 0.0, rng)
    assert (node, wanted) == ("b", RevocationsWanted(have=3))
    ours.asked(node, 7, 0.0)
    assert ours.question({"b": 7}, PATIENCE - 0.01, rng) is None  # too soon
    assert ours.question({"b": 7}, PATIENCE, rng) == ("b", RevocationsWanted(have=3))


@settings(max_examples=50, deadline=None)
@given(
    claims=st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 12)),
    ours=st.integers(0, 12),
    seed=st.integers(0, 2**32),
)
def test_the_member_asked_is_always_one_that_claims_more(claims, ours, seed):
    asking = exchange(ours).question(claims, 0.0, random.Random(seed))
    ahead = {n for n, v in claims.items() if v > ours}
    assert (asking is None) == (not ahead)
    if asking is not None:
        assert asking[0] in ahead and asking[1] == RevocationsWanted(have=ours)


def test_a_member_short_of_its_claim_is_not_asked_again_until_it_claims_another():
    ours, rng = exchange(0), random.Random(0)
    ours.asked("a", 5, 0.0)
    answer = ours.take("a", RevocationsOffer(wire(0, 2)), 1.0)  # only 2 of the 5 it claims
    ours.hold(up_to(2))  # what verified was merged
    assert ours.checked(answer, bad=False) is False
    assert ours.question({"a": 5}, 10.0, rng) is None
    assert ours.question({"a": 6}, 10.0, rng) == ("a", RevocationsWanted(have=2))


def test_a_full_page_asks_for_the_next_at_once_unless_an_entry_was_bad():
    ours, rng = exchange(0), random.Random(0)
    ours.asked("a", N, 0.0)
    answer = ours.take("a", RevocationsOffer(wire(0, PAGE_ENTRIES)), 0.1)
    assert answer.full
    ours.hold(up_to(PAGE_ENTRIES))
    assert ours.checked(answer, bad=False) is True
    assert ours.question({"a": N}, 0.2, rng) is None  # the pace holds for other questions...
    assert ours.next_page("a", {"a": N, "b": N}, rng) == (  # ...not for the next page
        "a",
        RevocationsWanted(have=PAGE_ENTRIES),
    )
    ours.asked("a", N, 0.2)
    bad = ours.take("a", RevocationsOffer(wire(PAGE_ENTRIES, 2 * PAGE_ENTRIES)), 0.3)
    assert ours.checked(bad, bad=True) is False  # stopped at a bad entry: short of N
    assert ours.next_page("a", {"a": N}, rng) is None


# --- answering -------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(have=st.integers(0, N + 3), version=st.integers(0, N))
def test_an_answer_is_the_page_above_what_the_asker_has(have, version):
    offer = exchange(version).answer("peer", RevocationsWanted(have=have), 0.0)
    start = min(have, version)
    assert offer.entries == wire(start, min(version, start + PAGE_ENTRIES))


@settings(max_examples=20, deadline=None)
@given(version=st.integers(0, N))
def test_walking_the_pages_from_zero_yields_every_entry_once_in_order(version):
    theirs, have, got, now = exchange(version), 0, [], 0.0
    while True:
        page = theirs.answer("peer", RevocationsWanted(have=have), now).entries
        got += page
        if len(page) < PAGE_ENTRIES:
            break
        have, now = have + len(page), now + 0.001  # the next page comes at once
    assert tuple(got) == wire(0, version)


def test_a_peer_asking_the_same_again_too_soon_is_not_answered():
    theirs, ask = exchange(10), RevocationsWanted(have=2)
    assert theirs.answer("p", ask, 0.0) is not None
    assert theirs.answer("p", ask, INTERVAL / 2) is None  # the same question, too soon
    assert theirs.answer("q", ask, INTERVAL / 2) is not None  # another peer
    assert theirs.answer("p", RevocationsWanted(have=3), INTERVAL / 2) is not None  # moved on
    assert theirs.answer("p", ask, INTERVAL / 2 + INTERVAL) is not None  # later


def test_many_peers_answered_long_ago_are_forgotten():
    theirs = exchange(1)
    for i in range(200):
        theirs.answer(f"p{i}", RevocationsWanted(have=0), float(i))
    # bounded memory is the point: past the bound only the peers of the last interval stay
    assert len(theirs._answered) <= revocation_sync._ANSWERED_KEPT + 2


# --- taking answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked_at", "at", "entries", "why"),
    [
        (None, 1.0, 1, "nobody asked"),
        (0.0, PATIENCE, 1, "too late"),
        (0.0, 1.0, PAGE_ENTRIES + 1, "longer than a page"),
    ],
)
def test_an_answer_nobody_is_waiting_for_is_dropped(asked_at, at, entries, why):
    ours = exchange(0)
    if asked_at is not None:
        ours.asked("a", N, asked_at)
    assert ours.take("a", RevocationsOffer(wire(0, entries)), at) is None, why


def test_an_answer_is_taken_once_and_what_we_hold_is_left_out():
    ours = exchange(3)
    ours.asked("a", 6, 0.0)
    repeated = wire(0, 6) + wire(4, 5)  # three we hold, one twice
    answer = ours.take("a", RevocationsOffer(repeated), 0.5)
    assert answer.fresh == wire(3, 6) and not answer.full
    assert answer.question.node == "a" and answer.question.claimed == 6
    assert ours.take("a", RevocationsOffer(repeated), 0.6) is None  # answered already
