"""Recovery after a restart, and retention: a part of :class:`~coordinator.journal.Journal`
(the rules are in :mod:`coordinator.journal`).

:class:`JournalUpkeep` is a mixin of ``Journal`` and works on its state (see
``Journal.__init__``). ``recover`` runs once, at startup: items whose fate is unknown go back
to pending with a new attempt (counted as refused, up to a cap, if the caller asks: see
``recover``), and every unfinished task is handed back with what to dispatch.
``prune`` forgets tasks that ended long enough ago, a bounded batch per call.
"""

from __future__ import annotations

import sqlite3

from coordinator.journal_types import _ENDED, _IN_FLIGHT, _LIVE, _WAITING, RecoveredTask
from meshinfer.errors import LocalProtocolError

__all__ = ["PRUNE_BATCH", "JournalUpkeep"]

#: Tasks :meth:`Journal.prune` forgets per call (one group: keep it short for the calls behind).
PRUNE_BATCH = 200


class JournalUpkeep:
    """Recovery and retention (a mixin of ``Journal``: see the module docstring)."""

    def recover(self, *, max_refused: int = 0) -> list[RecoveredTask]:
        """After a restart: every unfinished task, with the items that need a (re)dispatch.

        Items that were dispatched or running have an unknown fate: they go back to pending
        with attempt + 1 (a late result of the old attempt is still accepted). Nothing failed,
        so the requeue counts as a refusal (``refused`` + 1: not against ``max_attempts``, see
        ``Coordinator._retry``) while the item has fewer than ``max_refused`` refusals, as a
        send whose fate is unknown; beyond that (or with the default 0) it counts as an
        attempt, so a coordinator that crashes on an item for ever still ends it. Items still
        pending or retrying are listed too, with their attempt: among them any item that was
        sent while its :meth:`mark_dispatched` had not committed yet, which therefore runs
        again (a result of that unjournaled send is refused unless the new dispatch is
        journaled, or the result is vouched for as sent, then accepted once, like any other).
        Call once, at
        startup, before dispatching anything. Pipeline items are all listed; dispatch only
        those :class:`~meshinfer.proto.tasks_pipeline.PipelinePlan` says are ready.
        """
        with self._write() as db:
            self._hot.clear()
            ids = [r[0] for r in db.execute(f"SELECT id FROM tasks WHERE state IN {_LIVE}")]
            for task_id in ids:
                self._requeue(db, task_id, max_refused)
            records = [self._record(db, task_id) for task_id in ids]
        return [
            RecoveredTask(r, tuple(i for i in r.items if i.state.value in _WAITING))
            for r in records
        ]

    def _requeue(self, db, task_id: str, max_refused: int) -> None:
        stuck = db.execute(
            f"SELECT id FROM items WHERE task_id = ? AND state IN {_IN_FLIGHT}", (task_id,)
        ).fetchall()
        for (item_id,) in stuck:
            db.execute(
                "UPDATE items SET state = 'pending', attempt = attempt + 1,"
                " refused = refused + (refused < ?), updated_at = ? WHERE id = ?",
                (max_refused, self._clock(), item_id),
            )
            self._log("requeued", task_id, item_id, "coordinator restarted")

    # --- retention -----------------------------------------------------------------------------

    def prune(self, older_than_s: float, *, limit: int = PRUNE_BATCH) -> int:
        """Forget up to ``limit`` of the oldest tasks that ended more than ``older_than_s``
        seconds ago (by the journal's wall clock), with their items, results and audit
        events; and audit lines about no task that are as old. Returns how many tasks went
        (call again while it returns ``limit``). Live tasks are never touched. A pruned task is
        unknown afterwards: reading it raises :class:`UnknownTaskError`, and submitting its id
        again journals it as a new task.

        Tasks are walked in the order they were journaled, up to the first one created after
        the cutoff (no later task can have ended before it; one stamped in the future, by a
        clock since stepped back, is passed: see ``_expired``), so no index is kept for this on
        the hot path and a call reads little more than what it deletes (and the old tasks still
        live). Counted in the ``pruned_tasks`` counter. The file does not shrink: SQLite reuses
        the freed pages, so a journal with retention stays about as large as the tasks of one
        retention period.
        """
        if not older_than_s >= 0 or type(limit) is not int or limit < 1:  # (NaN; 2.5: no bound)
            raise LocalProtocolError("prune() needs older_than_s >= 0 and a whole limit >= 1")
        with self._write() as db:
            now = self._clock()
            cutoff = now - older_than_s
            ids = self._expired(db, now, cutoff, limit)
            if ids:
                for task_id in ids:
                    self._hot.drop(task_id)  # (an ended task is not hot: belt and braces)
                params = [(task_id,) for task_id in ids]
                db.executemany("DELETE FROM events WHERE task_id = ?", params)
                db.executemany(
                    "DELETE FROM results WHERE item_id IN (SELECT id FROM items WHERE task_id = ?)",
                    params,
                )
                db.executemany("DELETE FROM items WHERE task_id = ?", params)
                db.executemany("DELETE FROM tasks WHERE id = ?", params)
                self._count(db, "pruned_tasks", len(ids))
            db.execute("DELETE FROM events WHERE task_id IS NULL AND at < ?", (cutoff,))
        for task_id in ids:
            self._forget_spec(task_id)
        return len(ids)

    @staticmethod
    def _expired(db: sqlite3.Connection, now: float, cutoff: float, limit: int) -> list[str]:
        """The ids of up to ``limit`` tasks that ended before ``cutoff``, oldest first.

        A task stamped later than ``now`` was journaled while the wall clock ran ahead (it has
        since stepped back): it says nothing of the tasks after it, so the walk passes it
        rather than stop there until the clock catches up with it (after a clock set a year
        ahead and then corrected, no later task would go for a year)."""
        ids: list[str] = []
        rows = db.execute("SELECT id, state, created_at, updated_at FROM tasks ORDER BY seq")
        for task_id, state, created_at, updated_at in rows:
            if (cutoff <= created_at <= now) or len(ids) == limit:
                break
            if state in _ENDED and updated_at < cutoff:
                ids.append(task_id)
        return ids
