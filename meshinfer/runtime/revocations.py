"""Revocations spread by gossip: keeps a node's revocation list in step with the fleet's.

How a revocation reaches every node of a running fleet:

1. the fleet operator runs ``meshinfer fleet revoke`` (the fleet directory's ``revocations.bin``
   grows by one authority-signed entry) and copies that file into the identity directory of
   ANY running node or coordinator;
2. that node sees the file change (it looks every ``check_interval_s``), verifies and merges
   it, and gossips its new list version (``NodeState.revocation_version``, the highest sequence
   number it holds) with its membership state;
3. a node that sees a live member with a higher version than its own asks that member for the
   entries above its version (:class:`~meshinfer.proto.revocation_wire.RevocationsWanted`), in
   pages of at most :data:`~meshinfer.proto.revocation_sync.PAGE_ENTRIES`; it verifies every
   entry against its own trust anchor, merges them (a set union: late, repeated or reordered
   answers are harmless), writes the merged list to its own ``revocations.bin`` (so it survives
   a restart) and gossips the new version in turn.

After every merge the node closes each session whose peer certificate is now revoked, and
checks every session adopted from then on; handshakes refuse revoked peers
(:class:`~meshinfer.runtime.session.Admission` reads the current list). From the moment the
merged list is in force until the close (the list is written down first, and the close may
wait behind the session's writer), such a session carries no application message either way:
the peer table sends what is queued for the peer over the peer's good session if it has one,
else drops it (its requesters told), drops what comes over the revoked one before any handler,
and the session refuses a write that was waiting for its writer
(:attr:`~meshinfer.runtime.session.Session.peer_revoked`); only session control (pings, the
Close) still goes. Sessions are judged one by one: a node id may have two, under an old
certificate revoked by serial (stolen, or left over from before the node was re-enrolled) and
under its new one, which stays up. The :meth:`RevocationSync.on_cut_off` listeners learn of each
closed session as a :class:`CutOff`: whether the node keeps a session under a good certificate,
and whether what this node sent to it went over the closed one (a peer table sends over a node's
oldest open session, until the list in force revokes its certificate).

What a peer can make a node do is bounded (the decisions are the pure
:class:`~meshinfer.proto.revocation_sync.RevocationExchange`; this module drives it). A node
asks at most one question per ``ask_timeout_s``, except for the next page of an answer that
filled one. A member whose answer falls short of the version it claims, or holds a bad entry,
is not asked again until it claims another version; checking an answer stops at its first bad
entry, and merging it at its first gap in sequence numbers (an entry above a gap would raise
this node's version past entries nobody would be asked for again). Answers nobody asked for
(or that come after ``ask_timeout_s``) are dropped unread, and a
node answers each peer at most once per ``answer_interval_s`` unless it asks for the next page.

The list file is only ever replaced whole, and reading or writing it holds one lock: a file the
operator copied in is merged before the node writes its own list over it, and one that lacks
entries in force (an older list copied in) is written over with the list in force, which a
restart reads. A file that does not parse (damaged, or still being copied in) is never written
over: a warning names it, the last good list stays in force, and the file is read again when it
changes. Nor is a file that changed since it was last read (the node reads it first; its bytes
are compared, as a stat cannot tell a change made within the file system's time granularity at
the same size). A file that cannot be read at all (a directory, a FIFO, too large, no
permission) is named in a warning once per problem, not at each look.

The watch is a stat at each look, and a read only when the stat may hide a change. A stamp
(:class:`~meshinfer.atomic_files.FileStamp`) hides changes made within the file system's time
granularity (up to 2 s) of the write that set it, so it is read again at each look until this
node has seen that same stamp for ``STAMP_SETTLE_NS`` (5 s) by its own monotonic clock: the
write that set the stamp came before the look that first saw it, so any write made after that
look plus the granularity gets a new stamp. That holds whatever the offset between this host's
wall clock and the file system's (a network file system's server, a FAT clock set wrong): only
the rates of the two clocks matter, not their readings. (Comparing the stamp's times with this
host's wall clock instead, as before, took a file as settled at once when the host clock ran
more than 5 s ahead of the file system's, and missed a same-size change made within the
granularity; with the host behind, it read the file at each look until the clocks met.) Versions
compare the highest sequence numbers only: the authority numbers its entries 1, 2, 3... and
every list it writes holds all of them, so a list with the same version holds the same entries.
A list that lacks some (a file put together by hand) is in force whole, but gossiped as the
version below its first gap, so that a member with the whole list is asked for the rest (see
:attr:`RevocationExchange.version <meshinfer.proto.revocation_sync.RevocationExchange.version>`).

A list that revokes this node's own certificate, however it came, is said in a warning once, and
the :meth:`RevocationSync.on_self_revoked` listeners are told (peers refuse the node from then on).
Since its peers cut it off as soon as they hold the list, a node that cuts a session for a
revoked certificate tells the peer why, just before the ``Close``: a
:class:`~meshinfer.proto.revocation_wire.RevocationNotice` with the entry that revokes it (only
to a peer whose Hello announced ``revocation-notice``). The receiver checks at most one notice
per peer per ``answer_interval_s``, verifies the entry against its own trust anchor, and merges
it like any list (written down, gossiped, its listeners told) only if it revokes this node's own
certificate; any other entry, however well signed, is refused with a warning: entries about
others come through the paced, paged exchange, and this way a peer can make this node merge
once at most. A single entry above a gap is held as a hand-made file's would be (in force,
the version gossiped below the gap).

Concurrency: everything runs on the node's loop; signature checks and file I/O run in worker
threads.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from meshinfer.atomic_files import STAMP_SETTLE_NS, FileStamp, file_stamp, replace_unchanged
from meshinfer.errors import IdentityError, RevocationError, log_failure
from meshinfer.fleet_dir import parse_revocations, read_revocations
from meshinfer.proto.identity import (
    MAX_REVOCATION_ENTRIES,
    FleetTrust,
    RevocationEntry,
    RevocationList,
)
from meshinfer.proto.membership import MemberEvent
from meshinfer.proto.messages import CloseCode
from meshinfer.proto.revocation_sync import Answer, RevocationExchange, up_to_gap
from meshinfer.proto.revocation_wire import (
    NOTICE_FEATURE,
    RevocationNotice,
    RevocationsOffer,
    RevocationsWanted,
)
from meshinfer.runtime.loop import Steps
from meshinfer.runtime.membership_service import MembershipService
from meshinfer.runtime.peers import PeerTable
from meshinfer.runtime.session import Admission, Session

log = logging.getLogger(__name__)

_log_failure = log_failure(log, "revocation step")
_SETTLE_S = STAMP_SETTLE_NS / 1e9  # how long a stamp is watched before it counts as settled


@dataclass(frozen=True)
class RevocationSyncConfig:
    """``check_interval_s``: how often the list file and the members' versions are looked at
    (a member's newer version is acted on at once, too). ``ask_timeout_s``: the pace of
    questions, and how long an answer is awaited. ``answer_interval_s``: the least time between
    two answers to one peer."""

    check_interval_s: float = 2.0
    ask_timeout_s: float = 5.0
    answer_interval_s: float = 0.05


@dataclass
class RevocationStats:
    """Counters for metrics and tests."""

    checks: int = 0  # looks at the file and the members
    asked: int = 0
    answered: int = 0  # answers to our questions
    merged: int = 0  # merges that added entries (from the file or from peers)
    bad_entries: int = 0  # answers from peers stopped at an entry that failed verification
    gaps: int = 0  # answers from peers cut at a gap in sequence numbers (the rest not merged)
    over_limit: int = 0  # lists not merged: the union would be over MAX_REVOCATION_ENTRIES
    unsolicited: int = 0  # offers nobody asked for, or too late or too long (dropped)
    answers_sent: int = 0
    requests_dropped: int = 0  # questions from a peer answered too recently
    disconnected: int = 0  # sessions closed because the peer's certificate was revoked
    notices_sent: int = 0  # revocation notices sent to peers so cut off
    notices: int = 0  # notices from peers that revoked this node's own certificate
    notices_refused: int = 0  # notices whose entry failed verification or is not this node's
    notices_dropped: int = 0  # notices not checked: too soon after the peer's last, or needless


class _Merged(enum.Enum):
    """What a merge did: the list in force grew, held every entry already, or was left as it
    is because the union would be over ``MAX_REVOCATION_ENTRIES``."""

    GREW = "grew"
    HELD = "held"
    OVER_LIMIT = "over-limit"

    def __bool__(self) -> bool:  # true: the list grew
        return self is _Merged.GREW


@dataclass(frozen=True)
class CutOff:
    """A session :class:`RevocationSync` closed because the peer's certificate is revoked, as
    its :meth:`~RevocationSync.on_cut_off` listeners are told.

    ``serial``: that certificate's. ``still_connected``: ``node_id`` keeps an open session under
    a certificate that is not revoked (only an old one was revoked, by serial), so it is still
    reachable. ``carried_sends``: this session was the one the peer table sent ``node_id``'s
    messages over (its oldest open one) until the revocation came in force: what was written to
    it before then may be lost (what was still queued then went over the node's good session,
    or, with none, was dropped, its requesters told); if not, an older session that is still
    open carried everything sent to the node while this one was open. That says nothing of
    what the peer sent back: it picks its own oldest session, and after simultaneous dials the
    two sides may disagree, so an answer unread on the closed session is lost even when
    ``carried_sends`` is False (the asker's own timeout covers it)."""

    node_id: str
    serial: int
    still_connected: bool
    carried_sends: bool

    @property
    def sends_lost(self) -> bool:
        """Whether work sent to ``node_id`` may be lost with this session: it went over this
        session, or no session under a good certificate is left to answer on."""
        return self.carried_sends or not self.still_connected


class RevocationSync:
    """Keeps ``admission.revocations`` current; see the module docstring. ``store``: the list
    file to watch and to write merged lists to (None: neither). Start with :meth:`start`, stop
    with :meth:`aclose` (before the peer table closes)."""

    def __init__(
        self,
        admission: Admission,
        peers: PeerTable,
        membership: MembershipService,
        *,
        store: Path | None = None,
        config: RevocationSyncConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.admission = admission
        self.peers = peers
        self.membership = membership
        self.store = store
        self.config = config or RevocationSyncConfig()
        self.stats = RevocationStats()
        self._rng = rng or random.Random()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._steps = Steps(log, "revocation step")
        self._closed = False
        self._exchange = RevocationExchange(
            admission.revocations,
            patience=self.config.ask_timeout_s,
            answer_interval=self.config.answer_interval_s,
        )
        #: the list file's stamp when last looked at (None: absent, or not looked at yet), the
        #: loop time that stamp was first seen, and whether the file was last read once it had
        #: been seen long enough to show any later change (else the next look reads it again)
        self._seen_file: FileStamp | None = None
        self._seen_since = self._loop.time()
        self._seen_settled = True
        self._problem: str | None = None  # why the file could not be read, as last warned
        #: the file's bytes as last read or written (None: absent, or unreadable)
        self._seen_bytes: bytes | None = None
        self._file_unusable = False  # the file as last read does not parse: never written over
        self._file_lock = asyncio.Lock()
        self._cut_off: list[Callable[[CutOff], None]] = []
        self._self_revoked: list[Callable[[RevocationEntry], None]] = []
        #: the entry of the list in force that revokes this node's own certificate (None: none)
        self.own_revocation = admission.revocations.revocation_for(admission.identity.certificate)
        self._cutting: set[Session] = set()  # sessions being closed for a revoked certificate
        self._settling: set[asyncio.Task[None]] = set()  # write-downs and cuts after merges
        peers.on(RevocationsWanted, self._on_wanted)
        peers.on(RevocationsOffer, self._on_offer)
        peers.on(RevocationNotice, self._on_notice)
        peers.on_session(self._on_session)
        membership.subscribe(self._on_member)
        state = membership.state  # (gossiped as the list's highest sequence: a gap hides less)
        if state.revocation_version != self.version:
            membership.update_state(replace(state, revocation_version=self.version))

    @property
    def revocations(self) -> RevocationList:
        return self.admission.revocations

    @property
    def version(self) -> int:
        """The version of the list in force (kept, not recomputed from the entries)."""
        return self._exchange.version

    @property
    def trust(self) -> FleetTrust:
        return self.admission.identity.trust

    def on_cut_off(self, callback: Callable[[CutOff], None]) -> None:
        """Call ``callback(cut)`` (a :class:`CutOff`) for each open session this node closes
        because the peer's certificate is revoked, just after it closed it: a scheduler's cue to
        re-run at once what was sent over it and, unless ``cut.still_connected``, to stop
        counting on that peer. A callback that raises is logged."""
        self._cut_off.append(callback)

    def on_self_revoked(self, callback: Callable[[RevocationEntry], None]) -> None:
        """Call ``callback(entry)`` once, when a list that revokes this node's own certificate
        comes in force (by gossip, the file or a push; ``entry`` is the one that revokes it):
        peers refuse this node from then on, so it should stop serving. A list in force at the
        start that revokes it already is the daemon's to refuse (see :attr:`own_revocation`).
        A callback that raises is logged."""
        self._self_revoked.append(callback)

    async def self_revoked(self) -> RevocationEntry:
        """Wait until a list that revokes this node's own certificate is in force (at once if
        one is), and return the entry that revokes it: a daemon's cue to stop (see
        :func:`~meshinfer.runtime.startup.until_self_revoked`)."""
        if self.own_revocation is None:
            told: asyncio.Future[RevocationEntry] = self._loop.create_future()

            def tell(entry: RevocationEntry) -> None:
                if not told.done():
                    told.set_result(entry)

            self._self_revoked.append(tell)
            try:
                return await told
            finally:
                self._self_revoked.remove(tell)
        return self.own_revocation

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = self._loop.create_task(self._run(), name="revocations")
            self._task.add_done_callback(_log_failure)

    async def aclose(self) -> None:
        """Stop: peers' messages are ignored from now on; merges already under way (and their
        file writes) finish first. Idempotent."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        await self._steps.aclose()

    # --- looking for news --------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self.stats.checks += 1
            await self._reload()
            self._ask()
            self._wake.clear()
            try:
                async with asyncio.timeout(self.config.check_interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _on_member(self, event: MemberEvent) -> None:
        if event.member.state.revocation_version > self.version:
            self._wake.set()

    def _ask(self, *, next_page_of: str | None = None) -> None:
        """Ask one live member whose list is newer than ours for the entries we lack (see the
        module docstring for the pace); ``next_page_of``: that member, at once."""
        now = self._loop.time()
        claims = {
            m.node_id: m.state.revocation_version for m in self.membership.core.live_members()
        }
        exchange = self._exchange
        if next_page_of is None:
            asking = exchange.question(claims, now, self._rng)
        else:
            asking = exchange.next_page(next_page_of, claims, self._rng)
        if asking is not None and self.peers.send(*asking):
            exchange.asked(asking[0], claims[asking[0]], now)
            self.stats.asked += 1

    async def _reload(self) -> None:
        """Merge the list file if it changed since last looked at (a bad file is logged); one
        that lacks entries in force (an older list copied in) is written over with them: a
        restart reads the file."""
        async with self._file_lock:
            listed = await self._read_file_if_changed()
        if listed is None:
            return
        grew = await self._adopt(listed, f"file {self.store}") is _Merged.GREW
        if not grew and listed.entries < self.revocations.entries:
            await self._write_down()

    async def _read_file_if_changed(self) -> RevocationList | None:
        """The file's list if its bytes changed since last read (call holding ``_file_lock``).
        A stat first: a file whose stamp is unchanged since a read made once that stamp had
        settled (seen for ``STAMP_SETTLE_NS``, see the module docstring) is not read. A file
        that does not parse (damaged, or half-copied by an operator) is logged and marked
        unusable until it changes: the list in force stays, and is not written over it. One
        that cannot be read is warned about once per problem. The look (a stat) runs in a
        worker thread too: on a network file system it can block."""
        if self.store is None:
            return None
        stamp = await asyncio.to_thread(file_stamp, self.store)
        now = self._loop.time()  # after the stat: the stamp was there by then
        if stamp != self._seen_file:
            self._seen_file, self._seen_since = stamp, now
        elif self._seen_settled:  # unchanged since a read that any later change would show in
            return None
        # the read below comes after ``now``: once the stamp has been seen for the settle window,
        # a change made after that read gets a new stamp
        self._seen_settled = stamp is None or now - self._seen_since >= _SETTLE_S
        if stamp is None:
            self._seen_bytes, self._file_unusable, self._problem = None, False, None
            return None
        try:
            data = await asyncio.to_thread(read_revocations, self.store)
        except IdentityError as exc:  # unreadable, not a file, too large, or gone meanwhile
            self._seen_bytes, self._file_unusable = None, True
            self._warn_unreadable(str(exc))
            return None
        self._problem = None
        if data == self._seen_bytes:  # touched, or our own write read back: nothing new
            return None
        self._seen_bytes, self._file_unusable = data, False
        try:
            return await asyncio.to_thread(parse_revocations, data, self.store, self.trust)
        except IdentityError as exc:
            self._file_unusable = True
            log.warning(
                "revocation list file not used: %s; the list in force (version %d) stays, and"
                " is not written over that file until it changes",
                exc,
                self.version,
            )
            return None

    def _warn_unreadable(self, problem: str) -> None:
        """Warn that the file cannot be read, unless that is what was warned of last (the file
        is read again at each look while its stamp settles, and after each change)."""
        if problem != self._problem:
            self._problem = problem
            log.warning("revocation list file not used: %s", problem)

    # --- peers' questions and answers --------------------------------------------------------

    def _on_wanted(self, peer: str, msg: RevocationsWanted) -> None:
        """Answer with the next page above ``have`` (unless asked again too soon)."""
        offer = None if self._closed else self._exchange.answer(peer, msg, self._loop.time())
        if offer is None:
            self.stats.requests_dropped += 1
        elif self.peers.send(peer, offer):
            self.stats.answers_sent += 1

    def _on_offer(self, peer: str, msg: RevocationsOffer) -> None:
        answer = None if self._closed else self._exchange.take(peer, msg, self._loop.time())
        if answer is None:
            self.stats.unsolicited += 1
            return
        self.stats.answered += 1
        self._spawn(self._merge_offer(peer, answer))

    async def _merge_offer(self, peer: str, answer: Answer) -> None:
        """Verify ``peer``'s answer (in a worker thread) and merge it up to its first bad
        entry or gap in sequence numbers; an answer cut short, or over the entry limit, leaves
        ``peer`` unasked until it claims another version."""
        verified, bad = await asyncio.to_thread(_verify, answer.fresh, self.trust)
        held = self.revocations
        if held.version > self.version:  # entries held above a gap (from a file) continue it too
            verified += [e for e in held.entries if e.sequence > self.version]
        kept, gap = up_to_gap(self.version, verified)  # (the version now, after the wait)
        refused = bad is not None
        if bad is not None:
            self.stats.bad_entries += 1
            log.warning("revocation answer from %s refused from a bad entry on: %s", peer, bad)
        if gap:
            refused = True
            self.stats.gaps += 1
            missing = max([self.version, *(e.sequence for e in kept)]) + 1
            log.warning(
                "revocation answer from %s refused from a gap on: it lacks entry %d", peer, missing
            )
        if kept:
            listed = RevocationList(self.trust.fleet_id, kept)
            refused |= await self._adopt(listed, f"peer {peer}") is _Merged.OVER_LIMIT
        if self._exchange.checked(answer, bad=refused) and not self._closed:
            self._ask(next_page_of=peer)  # the next page, at once

    def _on_notice(self, peer: str, msg: RevocationNotice) -> None:
        """A peer that cuts this node off says which entry revokes it: checked unless this
        node knows already, or ``peer``'s last notice was too recent (see the module doc)."""
        if self._closed or self.own_revocation is not None:
            self.stats.notices_dropped += 1
        elif not self._exchange.notice(peer, self._loop.time()):
            self.stats.notices_dropped += 1
        else:
            self._spawn(self._take_notice(peer, msg.entry))

    async def _take_notice(self, peer: str, raw: bytes) -> None:
        """Verify ``raw`` (in a worker thread) and merge it if it revokes this node's own
        certificate; anything else is refused with a warning."""
        try:
            entry = await asyncio.to_thread(RevocationEntry.from_bytes, raw, self.trust)
        except RevocationError as exc:
            self.stats.notices_refused += 1
            log.warning("revocation notice from %s refused: %s", peer, exc)
            return
        if not entry.covers(self.admission.identity.certificate):
            self.stats.notices_refused += 1
            log.warning(
                "revocation notice from %s refused: its entry %d does not revoke this node's"
                " certificate",
                peer,
                entry.sequence,
            )
            return
        self.stats.notices += 1
        listed = RevocationList(self.trust.fleet_id, [entry])
        await self._adopt(listed, f"peer {peer}, which cut this node off")

    # --- merging -----------------------------------------------------------------------------

    async def merge_list(self, more: RevocationList, source: str) -> bool:
        """Merge a list verified against :attr:`trust` that reached this node another way (an
        operator's push through the coordinator's API), as if a peer had offered it: written
        down, gossiped, revoked peers' sessions closed. Whether the list in force grew;
        :class:`RevocationError` if the union would be over ``MAX_REVOCATION_ENTRIES``."""
        if more.fleet_id != self.trust.fleet_id:
            raise RevocationError(f"revocation list is for fleet {more.fleet_id!r}")
        if len(self.revocations.merge(more).entries) > MAX_REVOCATION_ENTRIES:
            raise RevocationError(f"the merged list would be over {MAX_REVOCATION_ENTRIES} entries")
        return await self._adopt(more, source) is _Merged.GREW

    async def _adopt(self, more: RevocationList, source: str) -> _Merged:
        """Merge ``more`` into the list in force; if it grew, write it down and close the
        sessions of peers it revokes, in a step of its own that a cancelled caller does not
        cut short: a list in force is always written down and its sessions cut."""
        merged = self._merge(more, source)
        if merged is _Merged.GREW:
            step = self._loop.create_task(self._settle_merge(), name="revocations write-down")
            self._settling.add(step)
            step.add_done_callback(self._settling.discard)
            step.add_done_callback(_log_failure)
            await asyncio.shield(step)
        return merged

    async def _settle_merge(self) -> None:
        await self._write_down()
        await self._close_revoked(self.peers.open_sessions())

    def _merge(self, more: RevocationList, source: str) -> _Merged:
        """Put the union in force and gossip its version; whether it grew, or why not."""
        current = self.revocations
        merged = current.merge(more)
        if len(merged.entries) == len(current.entries):
            return _Merged.HELD
        if len(merged.entries) > MAX_REVOCATION_ENTRIES:  # the file could not be read back
            # (not our bug: the authority signed more entries than a list may hold; a warning,
            # counted, since a peer relaying them must not be able to make ERROR lines)
            self.stats.over_limit += 1
            log.warning(
                "revocation list from %s not merged: the list in force would be over %d entries",
                source,
                MAX_REVOCATION_ENTRIES,
            )
            return _Merged.OVER_LIMIT
        self.admission.revocations = merged
        self._exchange.hold(merged)
        self.stats.merged += 1
        state = self.membership.state
        if self.version != state.revocation_version:
            self.membership.update_state(replace(state, revocation_version=self.version))
        log.info(
            "revocation list now version %d (%d entries, from %s)",
            self.version, len(merged.entries), source,
        )  # fmt: skip
        if self.own_revocation is None:
            self._check_own(merged, source)
        return _Merged.GREW

    def _check_own(self, merged: RevocationList, source: str) -> None:
        """Say so, and tell the :meth:`on_self_revoked` listeners, if ``merged`` (now in force)
        revokes this node's own certificate."""
        cert = self.admission.identity.certificate
        own = merged.revocation_for(cert)
        if own is None:
            return
        self.own_revocation = own
        log.warning(
            "this node's own certificate (%s, serial %d) is revoked by revocation entry %d"
            " (reason %r, from %s): every peer refuses it from now on; it needs a new"
            " certificate (meshinfer fleet enroll)",
            cert.node_id, cert.serial, own.sequence, own.reason, source,
        )  # fmt: skip
        _tell(self._self_revoked, own, "own-revocation listener failed")

    def _on_session(self, peer: str, session: Session) -> None:
        if self.revocations.is_revoked(session.peer):  # admitted just before a merge
            self._spawn(self._close_revoked([session]))

    async def _close_revoked(self, sessions: list[Session]) -> None:
        for session in sessions:
            cutting = session in self._cutting  # two merges may find it open while it closes
            if session.is_open and not cutting and self.revocations.is_revoked(session.peer):
                self._cutting.add(session)
                try:
                    await self._cut(session)
                finally:
                    self._cutting.discard(session)

    async def _cut(self, session: Session) -> None:
        """Close ``session``, then tell the listeners: after the close, so that what went to
        the node while it closed is theirs to re-run too, and what they send again goes over
        a good session if the node has one."""
        node, serial = session.peer_id, session.peer.serial
        log.warning(
            "closing a session with %s: its certificate (serial %d) is revoked", node, serial
        )
        self.stats.disconnected += 1
        carried = self.peers.session(node) is session
        notice = self._notice(session)
        await session.aclose(CloseCode.GOING_AWAY, "certificate revoked", before=notice)
        cut = CutOff(node, serial, self._has_good_session(node), carried)
        _tell(self._cut_off, cut, f"cut-off listener failed for {node}")

    def _notice(self, session: Session) -> RevocationNotice | None:
        """What tells ``session``'s peer why it is cut (None: its Hello did not announce that
        it understands a notice)."""
        entry = self.revocations.revocation_for(session.peer)
        if entry is None or NOTICE_FEATURE not in session.peer_features:
            return None
        self.stats.notices_sent += 1
        return RevocationNotice(entry.to_bytes())

    def _has_good_session(self, node: str) -> bool:
        """Whether ``node`` has an open session under a certificate that is not revoked."""
        return any(
            s.peer_id == node and not self.revocations.is_revoked(s.peer)
            for s in self.peers.open_sessions()
        )

    async def _write_down(self) -> None:
        """Write the list in force to ``store``, merging first what the file holds if it was
        replaced meanwhile (by the operator): its entries are never overwritten unread, and
        the sessions they revoke are closed. A file that does not parse (perhaps one the
        operator is still copying in) is left as it is; so is one that changes while this
        write is made ready: the next look reads it."""
        if self.store is None:
            return
        async with self._file_lock:
            listed = await self._read_file_if_changed()
            grew = listed is not None and self._merge(listed, f"file {self.store}") is _Merged.GREW
            await self._write_locked(self.store)
        if grew:  # entries the file brought in: their sessions are cut like any merge's
            await self._close_revoked(self.peers.open_sessions())

    async def _write_locked(self, store: Path) -> None:
        """Write the list in force over ``store`` unless it is unusable (call holding
        ``_file_lock``); a failed write is logged."""
        if self._file_unusable:
            log.warning(
                "revocation list (version %d) not written to %s: that file does not parse;"
                " it is written once the file is fixed or removed",
                self.version,
                store,
            )
            return
        current, seen = self.revocations, self._seen_bytes
        try:
            written = await asyncio.to_thread(_write, store, current, seen)
        except (IdentityError, OSError) as exc:
            log.warning("revocation list not written to %s: %s", store, exc)
            return
        if written is not None:  # our own write: not news (the next look reads it back)
            self._seen_bytes, self._seen_settled = written, False

    def _spawn(self, step: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            step.close()
            return
        self._steps.spawn(step)


def _tell(listeners: list[Callable[[Any], None]], value: object, failed: str) -> None:
    """Call each listener with ``value``; one that raises is logged (``failed``), and the
    others still hear of it."""
    for callback in listeners:
        try:
            callback(value)
        except Exception:
            log.exception("%s", failed)


def _write(path: Path, listed: RevocationList, seen: bytes | None) -> bytes | None:
    """Encode and atomically replace the file, unless it no longer holds ``seen`` (None: no
    file); the bytes written, or None if left as it is. Runs in a worker thread."""
    data = listed.to_bytes()
    return data if replace_unchanged(path, data, seen) is not None else None


def _verify(raws: tuple[bytes, ...], trust: FleetTrust) -> tuple[list[RevocationEntry], str | None]:
    """The entries decoded and checked against ``trust`` up to the first bad one, and why that
    one is bad (None: all good). Runs in a worker thread."""
    good = []
    for raw in raws:
        try:
            good.append(RevocationEntry.from_bytes(raw, trust))
        except RevocationError as exc:
            return good, str(exc)
    return good, None
