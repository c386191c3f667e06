"""Revocations spread by gossip: keeps a node's revocation list in step with the fleet's.

How a revocation reaches every node of a running fleet:

1. the fleet operator runs ``meshinfer fleet revoke`` (the fleet directory's ``revocations.bin``
   grows by one authority-signed entry) and copies that file into the identity directory of
   ANY running node or coordinator;
2. that node sees the file change (it looks every ``check_interval_s``), verifies and merges
   it, and gossips its new list version (``NodeState.revocation_version``, the highest sequence
   number it holds) with its membership state;
3. a node that sees a live member with a higher version than its own asks that member for the
   entries above its version (:class:`~meshinfer.proto.revocation_wire.RevocationsWanted`),
   verifies every entry of the answer against its own trust anchor, merges them (a set union:
   late, repeated or reordered answers are harmless), writes the merged list to its own
   ``revocations.bin`` (so it survives a restart) and gossips the new version in turn.

After every merge the node closes its sessions with peers whose certificate is now revoked, and
its handshakes refuse them from then on (:class:`~meshinfer.runtime.session.Admission` reads
the current list). A node asks at most one question per ``ask_timeout_s``: a member that stays
silent, or whose answer falls short of the version it claims, is not waited for, and the next
look asks a member with a newer list again (chosen at random). Offers nobody asked for are
dropped unread.

Versions compare the highest sequence numbers only: the authority numbers its entries 1, 2, 3...
and every list it writes holds all of them, so a list with the same version holds the same
entries.

Concurrency: everything runs on the node's loop; the signature checks of an answer (thousands of
entries at most) run in a worker thread, so a large list never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from meshinfer.errors import IdentityError, RevocationError
from meshinfer.identity_files import load_revocations, replace_file
from meshinfer.proto.identity import FleetTrust, RevocationEntry, RevocationList
from meshinfer.proto.membership import MemberEvent
from meshinfer.proto.revocation_wire import RevocationsOffer, RevocationsWanted
from meshinfer.runtime.loop import log_failure
from meshinfer.runtime.membership_service import MembershipService
from meshinfer.runtime.peers import PeerTable
from meshinfer.runtime.session import Admission

log = logging.getLogger(__name__)

_log_failure = log_failure(log, "revocation step")


@dataclass(frozen=True)
class RevocationSyncConfig:
    """``check_interval_s``: how often the list file and the members' versions are looked at
    (a member's newer version is acted on at once, too). ``ask_timeout_s``: how long an asked
    member may take to answer before another is asked."""

    check_interval_s: float = 2.0
    ask_timeout_s: float = 5.0


@dataclass
class RevocationStats:
    """Counters for metrics and tests."""

    asked: int = 0
    answered: int = 0
    merged: int = 0  # merges that added entries (from the file or from peers)
    bad_entries: int = 0  # entries from peers that failed verification
    unsolicited: int = 0  # offers from peers that were not asked (dropped)
    disconnected: int = 0  # sessions closed because the peer's certificate was revoked


class RevocationSync:
    """Keeps ``admission.revocations`` current; see the module docstring. ``store``: the list
    file to watch and to write merged lists to (None: neither)."""

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
        self._steps: set[asyncio.Task[None]] = set()
        self._asked_at: float | None = None  # when a member was last asked
        self._awaiting: set[str] = set()  # members asked that have not answered
        self._seen_file = self._file_stamp()  # the file as loaded at start: not news
        self._write_lock = asyncio.Lock()
        peers.on(RevocationsWanted, self._on_wanted)
        peers.on(RevocationsOffer, self._on_offer)
        membership.subscribe(self._on_member)

    @property
    def revocations(self) -> RevocationList:
        return self.admission.revocations

    @property
    def trust(self) -> FleetTrust:
        return self.admission.identity.trust

    def start(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._run(), name="revocations")
            self._task.add_done_callback(_log_failure)

    async def aclose(self) -> None:
        """Stop looking; merges under way finish first (their file writes included)."""
        tasks = [t for t in (self._task, *self._steps) if t is not None]
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- looking for news ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._reload()
            self._ask()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.check_interval_s):
                    await self._wake.wait()

    def _on_member(self, event: MemberEvent) -> None:
        if event.member.state.revocation_version > self.revocations.version:
            self._wake.set()

    def _ask(self) -> None:
        """Ask one live member whose list is newer than ours for the entries we lack; at most
        one question per ``ask_timeout_s`` (a member whose answer does not bring us to the
        version it claims is asked again no sooner, nor is one that stays silent)."""
        version, now = self.revocations.version, self._loop.time()
        if self._asked_at is not None and now - self._asked_at < self.config.ask_timeout_s:
            return
        ahead = sorted(
            m.node_id
            for m in self.membership.core.live_members()
            if m.state.revocation_version > version
        )
        if not ahead:
            return
        node = self._rng.choice(ahead)
        if self.peers.send(node, RevocationsWanted(have=version)):
            self._asked_at = now
            self._awaiting.add(node)
            self.stats.asked += 1

    async def _reload(self) -> None:
        """Merge the list file if it changed since last looked at (a bad file is logged)."""
        stamp = self._file_stamp()
        if stamp is None or stamp == self._seen_file:
            return
        listed = await self._read_file(stamp)
        if listed is not None:
            await self._adopt(listed, f"file {self.store}")

    async def _read_file(self, stamp: tuple[int, int]) -> RevocationList | None:
        assert self.store is not None
        self._seen_file = stamp
        try:
            return await asyncio.to_thread(load_revocations, self.store, self.trust)
        except IdentityError as exc:
            log.warning("revocation list file not used: %s", exc)
            return None

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.store is None:
            return None
        try:
            st = self.store.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    # --- peers' requests and answers ----------------------------------------------------------

    def _on_wanted(self, peer: str, msg: RevocationsWanted) -> None:
        newer = self.revocations.since(msg.have)
        ordered = sorted(newer.entries, key=lambda e: (e.sequence, e.signature))
        self.peers.send(peer, RevocationsOffer(tuple(e.to_bytes() for e in ordered)))

    def _on_offer(self, peer: str, msg: RevocationsOffer) -> None:
        """An answer: merged if it answers a question of ours (an offer nobody asked for is
        dropped: checking signatures costs CPU, which a peer must not make us spend at will)."""
        if peer not in self._awaiting:
            self.stats.unsolicited += 1
            return
        self._awaiting.discard(peer)
        self.stats.answered += 1
        known = {e.to_bytes() for e in self.revocations.entries}
        fresh = [raw for raw in dict.fromkeys(msg.entries) if raw not in known]
        if fresh:
            self._spawn(self._merge_offer(peer, fresh))

    async def _merge_offer(self, peer: str, raws: list[bytes]) -> None:
        verified, bad = await asyncio.to_thread(_verify, raws, self.trust)
        if bad:
            self.stats.bad_entries += len(bad)
            log.warning("%d revocation entries from %s refused: %s", len(bad), peer, bad[0])
        if verified:
            await self._adopt(RevocationList(self.trust.fleet_id, verified), f"peer {peer}")

    # --- merging -----------------------------------------------------------------------------

    async def _adopt(self, more: RevocationList, source: str) -> None:
        """Merge ``more`` into the list in force; if it grew, write it down and close the
        sessions of peers it revokes."""
        if self._merge(more, source):
            await self._write_down()
            await self._disconnect_revoked()

    def _merge(self, more: RevocationList, source: str) -> bool:
        """Put the union in force and gossip its version; whether it grew."""
        current = self.revocations
        merged = current.merge(more)
        if len(merged.entries) == len(current.entries):
            return False
        self.admission.revocations = merged
        self.stats.merged += 1
        state = self.membership.state
        if merged.version != state.revocation_version:
            self.membership.update_state(replace(state, revocation_version=merged.version))
        log.info(
            "revocation list now version %d (%d entries, from %s)",
            merged.version, len(merged.entries), source,
        )  # fmt: skip
        return True

    async def _disconnect_revoked(self) -> None:
        for node in self.peers.connected:
            session = self.peers.session(node)
            if session is not None and self.revocations.is_revoked(session.peer):
                log.warning("closing the sessions with %s: its certificate is revoked", node)
                self.stats.disconnected += 1
                await self.peers.disconnect(node, "certificate revoked")

    async def _write_down(self) -> None:
        """Write the list in force to ``store``, merging first what the file holds if it was
        replaced meanwhile (by the operator): its entries are never overwritten unread."""
        if self.store is None:
            return
        async with self._write_lock:
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._seen_file:
                listed = await self._read_file(stamp)
                if listed is not None:
                    self._merge(listed, f"file {self.store}")
            data = self.revocations.to_bytes()
            try:
                await asyncio.to_thread(replace_file, self.store, data)
            except (IdentityError, OSError) as exc:
                log.warning("revocation list not written to %s: %s", self.store, exc)
                return
            self._seen_file = self._file_stamp()  # our own write is not news

    def _spawn(self, step: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(step)
        self._steps.add(task)
        task.add_done_callback(self._steps.discard)
        task.add_done_callback(_log_failure)


def _verify(raws: list[bytes], trust: FleetTrust) -> tuple[list[RevocationEntry], list[str]]:
    """Each entry decoded and checked against ``trust``: the good ones, and why the rest are
    bad (runs in a worker thread)."""
    good, bad = [], []
    for raw in raws:
        try:
            good.append(RevocationEntry.from_bytes(raw, trust))
        except RevocationError as exc:
            bad.append(str(exc))
    return good, bad
