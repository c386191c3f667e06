"""The coordinator's config and stats, and the pure helpers its parts share (no state, no I/O).

:class:`CoordinatorConfig` (every knob, checked when built), :class:`CoordinatorStats` (the
counters ``stats()`` and ``/metrics`` show), :func:`fold_gone_nodes` (bounds
``completed_by_node``), an item's attempt as the journal has it (:data:`Attempt`), the retry
constants of a journal write (``END_RETRY_*``, ``_TRANSIENT``) and small functions over maps
of timers. (Which node may answer an item's attempt, and what a passed deadline left undone, are
methods of :class:`~coordinator.runs.ItemRun` and :class:`~coordinator.runs.TaskRun`.) What the
knobs do is told in :mod:`coordinator.service`, from which the public names here are importable
too.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from coordinator.journal import TransientJournalError
from meshinfer.errors import ConfigError
from meshinfer.proto.aggregation import Mode
from meshinfer.proto.scheduling import Policy
from meshinfer.proto.tasks import MAX_DEADLINE_S

#: An item's attempt as the journal has it at recovery: (attempt, refused, the (attempt, node)
#: of each journaled dispatch of an earlier attempt). An item waiting to be sent has only
#: dispatches of attempts before its own journaled (the journal moves an item on to attempt + 1
#: only from a journaled dispatch: a retry, a refusal, or recovery requeuing an item in
#: flight): the one just before it on the item's row, those further back in the journal's
#: dispatch lines (their attempt and node columns: :meth:`Journal.dispatches`).
Attempt = tuple[int, int, frozenset[tuple[int, str]]]

#: A task's end the journal failed to write is written again after this long, doubling up to
#: the maximum (see Coordinator._finish).
END_RETRY_FIRST_S = 0.05
END_RETRY_MAX_S = 2.0
#: The journal write errors that may pass if the write is made again: a busy or full disk, or
#: a group commit rolled back for another call's fault. A refusal (an unknown task, an item in
#: the wrong state) would be refused again: it is raised at once. A failed sync of the log (an
#: ``OSError``) never passes: it stops the daemon (Coordinator.failed), whose close of the
#: coordinator ends the retries.
_TRANSIENT = (sqlite3.OperationalError, OSError, TransientJournalError)

#: Said of a task that ran out of time while no coordinator ran it (found so at recovery).
_WHILE_DOWN = "(while the coordinator was down)"

#: ``completed_by_node`` keeps a series of its own for each member membership knows and for
#: this many other nodes (those credited most recently); the items of the rest are counted
#: under ``GONE_NODES``, which no node id can be (:func:`fold_gone_nodes`).
KEEP_GONE_NODES = 64
GONE_NODES = "(gone)"

#: The most attempts per work item ``max_attempts`` may allow: the journal counts an item's
#: attempts in a 64-bit column (and compares them with ``max_attempts`` there, at recovery),
#: and a million retries outlast any task's longest deadline many times over.
MAX_ATTEMPTS = 1_000_000

_POLICIES = frozenset(p.value for p in Policy)
_AGGREGATIONS = frozenset(m.value for m in Mode)


@dataclass(frozen=True)
class CoordinatorConfig:
    """Defaults and fault-tolerance knobs (see :mod:`coordinator.service`)."""

    default_policy: str = "least_loaded"
    default_aggregation: str = "all"
    max_attempts: int = 4
    retry_backoff_s: float = 0.05
    retry_backoff_max_s: float = 2.0
    item_timeout_s: float = 30.0
    journal_synchronous: str = "FULL"
    node_capacity: int = 4
    max_in_flight_per_node: int = 32
    #: Fast failover: after a node's session is lost abruptly, the node must answer a ping (over
    #: another session, or a re-dial) within this many seconds, or its items are re-dispatched
    #: (0 disables the fast path: membership decides). On a slow link, set it above a round
    #: trip plus a retransmission.
    redial_timeout_s: float = 0.25
    #: Journal an item's dispatch, and its node's accept (running), only if its result is not
    #: in this long after it (a quick item costs the journal its result alone).
    running_mark_delay_s: float = 0.05
    #: Ended tasks are deleted from the journal (items, results, audit lines) this long after
    #: they ended, checked every ``prune_interval_s``; 0 keeps them forever.
    retention_s: float = 7 * 86400.0
    prune_interval_s: float = 60.0
    #: Inputs this large or larger are sent by reference to a node that keeps them already
    #: (see :mod:`coordinator.service`); 0 always sends the bytes.
    input_ref_min_bytes: int = 64 * 1024
    #: The time budget (s) of a task that names no ``deadline_s``; 0: such a task has none.
    default_deadline_s: float = 0.0
    #: ``contact_aware``: radio range (m) of an infrastructure node (role ``rsu`` or link
    #: ``v2i``), from which a moving node's gossiped position and velocity give its contact time
    #: (:mod:`meshinfer.proto.contact`).
    radio_range_m: float = 300.0

    def __post_init__(self) -> None:
        if self.default_policy not in _POLICIES:
            raise ConfigError(f"default_policy: unknown policy {self.default_policy!r}")
        if self.default_aggregation not in _AGGREGATIONS:
            raise ConfigError(f"default_aggregation: unknown mode {self.default_aggregation!r}")
        if self.journal_synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(
                f'journal_synchronous: "FULL" or "NORMAL", not {self.journal_synchronous!r}'
            )
        for name in (
            "max_attempts",
            "item_timeout_s",
            "prune_interval_s",
            "retry_backoff_max_s",
            "node_capacity",
            "max_in_flight_per_node",
            "radio_range_m",
        ):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be > 0 and finite, got {getattr(self, name)!r}")
        for name in (
            "retry_backoff_s",
            "redial_timeout_s",
            "running_mark_delay_s",
            "retention_s",
            "input_ref_min_bytes",
            "default_deadline_s",
        ):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be >= 0 and finite, got {getattr(self, name)!r}")
        if self.max_attempts > MAX_ATTEMPTS:  # (a recovery's journal query would overflow)
            raise ConfigError(
                f"max_attempts must be at most {MAX_ATTEMPTS}, got {self.max_attempts!r}"
            )
        if self.retry_backoff_s > self.retry_backoff_max_s:
            raise ConfigError(
                f"retry_backoff_s ({self.retry_backoff_s!r}) must be at most retry_backoff_max_s"
                f" ({self.retry_backoff_max_s!r}), the longest retry delay"
            )
        if self.default_deadline_s > MAX_DEADLINE_S:  # every task without one would be refused
            raise ConfigError(
                f"default_deadline_s must be at most {MAX_DEADLINE_S:.0f} (30 days: a task's"
                f" longest deadline), got {self.default_deadline_s!r}"
            )


@dataclass
class CoordinatorStats:
    """The coordinator's counters since it started (its ``/metrics`` and ``stats``): items
    sent, retried, re-dispatched after a node was lost, session ends, duplicates and foreign
    results refused, inputs sent by reference, and items completed by node."""

    dispatched: int = 0
    retries: int = 0
    refusals: int = 0  # retries not counted against max_attempts (Coordinator._retry)
    redispatched_after_death: int = 0  # after a death, a leave, or a lost session (below)
    redispatched_after_disconnect: int = 0  # by the fast path, before membership decided
    sessions_lost: int = 0  # node sessions that ended lost (no Close frame from it, or silent)
    sessions_closed: int = 0  # node sessions that ended otherwise (Close frame, local close)
    redials_ok: int = 0  # lost sessions whose node answered the ping (over another or a new one)
    resent_after_redial: int = 0  # items sent again to a node reachable after a lost session
    duplicates: int = 0  # results the journal refused: duplicate, late, unknown, unexpected
    foreign_results: int = 0  # results from a node their attempt was not sent to (refused)
    inputs_by_reference: int = 0  # items sent with an input_ref instead of their input's bytes
    input_bytes_saved: int = 0  # the bytes those references did not send
    input_cache_misses: int = 0  # references a node did not hold (the bytes went again)
    #: Items completed, by the node credited (one series per member membership knows, plus
    #: the ``KEEP_GONE_NODES`` others credited most recently; the rest are folded into the
    #: series ``GONE_NODES``: see :func:`fold_gone_nodes`).
    completed_by_node: Counter[str] = field(default_factory=Counter)


def fold_gone_nodes(
    completed: Counter[str], credited_at: OrderedDict[str, None], known: set[str], keep: int
) -> None:
    """Bound ``completed`` (items completed by node): every node in ``known`` (the members
    membership knows) keeps its series, and so do the ``keep`` other nodes credited most
    recently (``credited_at``: its nodes, the one credited last at the end); the counts of the
    rest move to ``GONE_NODES`` and their series go (from both). The total stays the same:
    each completed item is counted once, under its node or under ``GONE_NODES``. So on a
    coordinator that meets vehicles by the thousand, ``/metrics`` has at most one series per
    member, ``keep`` more and ``GONE_NODES``."""
    gone = [node for node in credited_at if node not in known]
    for node in gone[: max(0, len(gone) - keep)]:
        del credited_at[node]
        completed[GONE_NODES] += completed.pop(node, 0)
