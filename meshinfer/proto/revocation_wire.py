"""Wire messages that spread revocation lists through the fleet (sans-I/O).

Every node gossips the version of its revocation list (the highest sequence number it holds,
``NodeState.revocation_version``). A node that sees a member with a higher version asks that
member for what it lacks, and merges the answer::

    asker                                   member with a newer list
      | -- RevocationsWanted(have=3) -------> |
      | <------ RevocationsOffer(entries) --- |   entries: each RevocationEntry.to_bytes()
                                                  with a sequence above 3

The entries are signed one by one by the fleet authority, so whoever relays them cannot forge
or alter one; the receiver verifies each against its own trust anchor before it merges
(:meth:`meshinfer.proto.identity.RevocationEntry.from_bytes`). Merging is a set union, so
offers may arrive late, twice or out of order.

A node that cuts a session because the peer's certificate is revoked tells the peer why, just
before its ``Close``, if the peer's Hello announced the ``revocation-notice`` feature (an older
peer would take the unknown type as a protocol error)::

    cutting node                            revoked node
      | -- RevocationNotice(entry) -------> |   the entry that revokes the receiver's certificate
      | -- Close --------------------------> |

Its peers stop talking to a revoked node, so without it the node would learn of its own
revocation only from its own directory's list file.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshinfer.errors import RemoteProtocolError
from meshinfer.proto.identity import MAX_REVOCATION_ENTRY_BYTES
from meshinfer.proto.messages import message

__all__ = [
    "MAX_OFFER_ENTRIES",
    "MAX_VERSION",
    "NOTICE_FEATURE",
    "RevocationNotice",
    "RevocationsOffer",
    "RevocationsWanted",
]

#: The largest list version (a sequence number) a peer may name.
MAX_VERSION = 2**63 - 1
#: The most entries one offer may hold: four of today's pages
#: (:data:`~meshinfer.proto.revocation_sync.PAGE_ENTRIES`), room for a later version's larger
#: ones. A longer offer is a protocol error (the session closes), not 8 MiB decoded first.
MAX_OFFER_ENTRIES = 1024
#: The Hello feature of a node that takes a :class:`RevocationNotice` (one that does not would
#: refuse the unknown type as a protocol error).
NOTICE_FEATURE = "revocation-notice"


@message(type_id=17, max_size=64)
@dataclass(frozen=True, slots=True)
class RevocationsWanted:
    """Ask a peer for its revocation entries with a sequence above ``have`` (the asker's
    list version; 0 for all of them)."""

    have: int

    def validate(self) -> None:
        if not 0 <= self.have <= MAX_VERSION:
            raise RemoteProtocolError(
                f"invalid RevocationsWanted: have is outside 0..{MAX_VERSION}"
            )


@message(
    type_id=18,
    max_size=MAX_OFFER_ENTRIES * (MAX_REVOCATION_ENTRY_BYTES + 5) + 1024,
    max_items=MAX_OFFER_ENTRIES,
)
@dataclass(frozen=True, slots=True)
class RevocationsOffer:
    """Revocation entries, each as the authority signed it (``RevocationEntry.to_bytes()``);
    the receiver verifies every one before it believes it."""

    entries: tuple[bytes, ...]

    def validate(self) -> None:
        if any(len(e) > MAX_REVOCATION_ENTRY_BYTES for e in self.entries):
            raise RemoteProtocolError(
                f"invalid RevocationsOffer: an entry is over {MAX_REVOCATION_ENTRY_BYTES} bytes"
            )


@message(type_id=19, max_size=MAX_REVOCATION_ENTRY_BYTES + 16)
@dataclass(frozen=True, slots=True)
class RevocationNotice:
    """The revocation entry (``RevocationEntry.to_bytes()``, as the authority signed it) that
    revokes the receiver's own certificate: sent just before the ``Close`` of a session cut for
    it. The receiver verifies it against its own trust anchor, and takes it only if it revokes
    its own certificate."""

    entry: bytes

    def validate(self) -> None:
        if len(self.entry) > MAX_REVOCATION_ENTRY_BYTES:
            raise RemoteProtocolError(
                f"invalid RevocationNotice: the entry is over {MAX_REVOCATION_ENTRY_BYTES} bytes"
            )
