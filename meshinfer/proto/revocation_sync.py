"""Who asks whom for revocation entries, when, and which answers count (sans-I/O).

The decisions of the revocation exchange (:mod:`meshinfer.proto.revocation_wire`), kept apart
from the node that drives them (:mod:`meshinfer.runtime.revocations`: files, threads, sessions).
Time (``now``) and randomness (``rng``) are passed in; nothing here reads a clock or does I/O.

:class:`RevocationExchange` holds a node's list as answers need it (entries in sequence order,
in the very bytes the authority signed) and the state of its questions and answers:

asking
    :meth:`~RevocationExchange.question` picks, among the live members that gossip a higher
    list version than ours, one at random to ask -- at most one question per ``patience``
    seconds, except :meth:`~RevocationExchange.next_page` right after an answer that filled a
    page. A member that fell short of the version it claimed (or sent a bad entry) is not
    asked again until it claims another version.
answering
    :meth:`~RevocationExchange.answer` gives the next page above the asker's version (up to
    this node's own version: entries held above a gap would be refused), at most
    once per ``answer_interval`` seconds to one peer, unless it asks for the page after the
    one it got (it moved on).
    A member's shortfall is forgotten once it no longer claims that version among the live
    members (it left, died or claims another; one that comes back claiming it is asked once
    more): what is kept is bounded by the live members.
taking answers
    :meth:`~RevocationExchange.take` drops an answer nobody asked for, one that came after
    ``patience`` or one longer than a page, and leaves out the entries we hold already; the
    caller verifies the rest, merges what verified up to the first gap in sequence numbers
    (:func:`up_to_gap`) and reports with :meth:`~RevocationExchange.checked`; an answer cut
    short at a bad entry, at a gap or by the list's entry limit counts as bad.
taking notices
    :meth:`~RevocationExchange.notice` lets a peer's
    :class:`~meshinfer.proto.revocation_wire.RevocationNotice` (the entry that revokes this
    node, sent by a peer that cuts it off) be checked at most once per ``answer_interval``
    seconds per peer: each costs a signature check.

Versions compare the highest sequence numbers only: the authority numbers its entries 1, 2,
3... and every list it writes holds all of them. (A list that lacks some, put together by hand,
counts as the version below its first gap: :attr:`RevocationExchange.version`.)
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshinfer.proto.identity import RevocationEntry, RevocationList
from meshinfer.proto.revocation_wire import MAX_OFFER_ENTRIES, RevocationsOffer, RevocationsWanted

__all__ = ["PAGE_ENTRIES", "Answer", "Question", "RevocationExchange", "up_to_gap"]

#: The most entries one answer carries (~130 bytes each); a longer list goes in pages.
PAGE_ENTRIES = 256
assert PAGE_ENTRIES <= MAX_OFFER_ENTRIES  # (a page must decode at the receiver)
#: Beyond this many peers answered recently, the ones answered longer ago are forgotten.
_ANSWERED_KEPT = 64


@dataclass(frozen=True, slots=True)
class Question:
    """A question put to ``node`` at ``at``, when it claimed version ``claimed``."""

    node: str
    at: float
    claimed: int


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer worth checking: the ``fresh`` entries (not held yet, each once), whether it
    filled a page (``full``: there may be more), and the question it answers."""

    question: Question
    fresh: tuple[bytes, ...]
    full: bool


class RevocationExchange:
    """The revocation exchange of one node; see the module docstring. ``patience``: the pace
    of questions and how long an answer is awaited; ``answer_interval``: the least time
    between two answers to one peer (both seconds)."""

    def __init__(self, listed: RevocationList, *, patience: float, answer_interval: float) -> None:
        self.patience = patience
        self.answer_interval = answer_interval
        self._asked_at: float | None = None  # when a member was last asked
        self._awaiting: dict[str, Question] = {}  # members asked that have not answered
        self._shortfall: dict[str, int] = {}  # member -> the version it claimed and fell short of
        self._answered: dict[str, tuple[float, int]] = {}  # peer -> last answer: when, have
        self._noticed: dict[str, float] = {}  # peer -> when its last notice was taken
        self._held: frozenset[RevocationEntry] = frozenset()
        self._sequences: list[int] = []  # of the entries held, in sequence order
        self._encoded: list[bytes] = []  # the same entries, as the authority signed them
        self._known: set[bytes] = set()
        self._version = 0
        self._unbroken = 0  # how many of ``_sequences`` the version covers (1..version, no gap)
        self.hold(listed)

    @property
    def version(self) -> int:
        """The version of the list held: the highest sequence number up to which it holds
        every entry, 1, 2, 3... (0: empty, or entry 1 missing). That is its highest sequence
        number but for a list with a gap (a list file put together by hand, or cut short):
        gossiping the highest would tell every member it holds entries it lacks, and nobody
        would ever be asked for them; at the version below the gap, a member with the whole
        list is asked for what lies above it."""
        return self._version

    def hold(self, listed: RevocationList) -> None:
        """The list in force is now ``listed``. A node's list only grows (merges are unions),
        mostly by entries above its version (a peer's page, the operator's newer file): those
        are encoded and appended, so such a merge costs what it added (and set operations in C
        over the list), not a sort and a look-up of every entry. Any other list is taken whole
        (sorted, every entry encoded)."""
        fresh = sorted(listed.entries - self._held, key=_order)
        top = self._sequences[-1] if self._sequences else 0
        if not self._held <= listed.entries or (fresh and fresh[0].sequence <= top):
            fresh = sorted(listed.entries, key=_order)
            self._sequences, self._encoded, self._known = [], [], set()
            self._version, self._unbroken = 0, 0
        for entry in fresh:
            raw = entry.to_bytes()
            self._sequences.append(entry.sequence)
            self._encoded.append(raw)
            self._known.add(raw)
        self._held = listed.entries
        sequences, at, version = self._sequences, self._unbroken, self._version
        while at < len(sequences) and sequences[at] <= version + 1:  # (each entry passed once)
            version = max(version, sequences[at])
            at += 1
        self._unbroken, self._version = at, version

    # --- asking ------------------------------------------------------------------------------

    def question(
        self, claims: Mapping[str, int], now: float, rng: random.Random
    ) -> tuple[str, RevocationsWanted] | None:
        """Whom to ask, and what, given the live members' gossiped versions (``claims``); None
        while the last question is younger than ``patience`` or no member is worth asking.
        Call :meth:`asked` once the question is sent."""
        self._awaiting = {n: q for n, q in self._awaiting.items() if now - q.at < self.patience}
        self._forget_shortfalls(claims)
        if self._asked_at is not None and now - self._asked_at < self.patience:
            return None
        return self._pick(claims, rng)

    def next_page(
        self, node: str, claims: Mapping[str, int], rng: random.Random
    ) -> tuple[str, RevocationsWanted] | None:
        """The question for the page after ``node``'s full answer, at once (None if ``node``
        no longer claims more than we hold)."""
        return self._pick({n: v for n, v in claims.items() if n == node}, rng)

    def _forget_shortfalls(self, claims: Mapping[str, int]) -> None:
        """Forget the shortfalls that no longer matter: of members not live any more (left,
        died, forgotten) or that claim another version or one we hold by now."""
        shortfall = self._shortfall
        if any(claims.get(n) != v or v <= self._version for n, v in shortfall.items()):
            self._shortfall = {
                n: v for n, v in shortfall.items() if claims.get(n) == v and v > self._version
            }

    def _pick(self, claims: Mapping[str, int], rng: random.Random):
        worth = sorted(
            n for n, v in claims.items() if v > self._version and self._shortfall.get(n) != v
        )
        if not worth:
            return None
        node = rng.choice(worth)
        return node, RevocationsWanted(have=self._version)

    def asked(self, node: str, claimed: int, now: float) -> None:
        """The question to ``node`` (claiming ``claimed``) went out at ``now``."""
        self._asked_at = now
        self._awaiting[node] = Question(node, now, claimed)

    # --- answering ---------------------------------------------------------------------------

    def answer(self, peer: str, wanted: RevocationsWanted, now: float) -> RevocationsOffer | None:
        """The page to send ``peer`` for ``wanted``; None (drop it) if ``peer`` was answered
        within ``answer_interval`` and did not move on to a later version."""
        last = self._answered.get(peer)
        if last is not None and now - last[0] < self.answer_interval and wanted.have <= last[1]:
            return None
        if len(self._answered) > _ANSWERED_KEPT:  # only the recent ones matter
            self._answered = {
                p: a for p, a in self._answered.items() if now - a[0] < self.answer_interval
            }
        self._answered[peer] = (now, wanted.have)
        start = bisect.bisect_right(self._sequences, wanted.have)
        end = min(start + PAGE_ENTRIES, self._unbroken)  # (entries above a gap would be refused)
        return RevocationsOffer(tuple(self._encoded[start:end]))

    # --- taking notices ----------------------------------------------------------------------

    def notice(self, peer: str, now: float) -> bool:
        """Whether to check a notice from ``peer`` now (then counted as taken); False (drop it
        unread) if one from ``peer`` was taken within ``answer_interval``."""
        last = self._noticed.get(peer)
        if last is not None and now - last < self.answer_interval:
            return False
        if len(self._noticed) > _ANSWERED_KEPT:  # only the recent ones matter
            self._noticed = {
                p: t for p, t in self._noticed.items() if now - t < self.answer_interval
            }
        self._noticed[peer] = now
        return True

    # --- taking answers ----------------------------------------------------------------------

    def take(self, peer: str, offer: RevocationsOffer, now: float) -> Answer | None:
        """What of ``peer``'s offer to check; None (drop it unread) if nobody asked ``peer``,
        the answer came after ``patience``, or it is longer than a page."""
        question = self._awaiting.pop(peer, None)
        late = question is None or now - question.at >= self.patience
        if late or len(offer.entries) > PAGE_ENTRIES:
            return None
        fresh = tuple(raw for raw in dict.fromkeys(offer.entries) if raw not in self._known)
        return Answer(question, fresh, full=len(offer.entries) == PAGE_ENTRIES)

    def checked(self, answer: Answer, *, bad: bool) -> bool:
        """``answer`` was checked (``bad``: an entry failed verification) and what verified
        merged: True to ask its node for the next page at once. A node that still left us
        short of what it claimed is not asked again until it claims another version."""
        if not bad and answer.full:
            return True
        if self._version < answer.question.claimed:
            self._shortfall[answer.question.node] = answer.question.claimed
        return False


def up_to_gap(
    version: int, entries: Iterable[RevocationEntry]
) -> tuple[list[RevocationEntry], bool]:
    """The ``entries`` (verified, from a peer's answer) that extend a list of ``version``
    without a gap in sequence numbers, in sequence order, and whether any were left out above
    a gap. The authority numbers its entries 1, 2, 3... and versions compare the highest
    sequence only, so merging an entry above a gap would raise this node's version past
    entries it never got, and no member would ever be asked for them again: a peer that
    answered only the newest entry (a bug, or one shielding a revoked friend) could keep
    those revocations from this node for good."""
    kept: list[RevocationEntry] = []
    top = version
    for entry in sorted(entries, key=_order):
        if entry.sequence > top + 1:
            return kept, True
        kept.append(entry)
        top = max(top, entry.sequence)
    return kept, False


def _order(entry: RevocationEntry) -> tuple[int, bytes]:
    return entry.sequence, entry.signature
