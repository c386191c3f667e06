"""The journal split into modules (session 30): every name still importable from
``coordinator.journal``, the writer's optional journal parts as protocols, and the schema's
table list read off its migrations."""

from __future__ import annotations

import asyncio
import sqlite3

import coordinator.journal as journal_module
from coordinator.journal import Journal
from coordinator.journal_schema import _TABLES, MIGRATIONS, migrate
from coordinator.journal_writer import GroupCommits, JournalWriter, Syncs

#: What ``coordinator.journal`` offered before the split (its ``__all__`` and the constants
#: other modules and tests import or patch there).
_NAMES = (
    "MIGRATIONS", "CallOutcome", "ItemRecord", "Journal", "JournalError", "JournalEvent",
    "JournalStats", "RecoveredTask", "TaskConflictError", "TaskEnd", "TaskEnding", "TaskPage",
    "TaskRecord", "TaskSummary", "TransientJournalError", "UnknownTaskError", "item_ended",
    "read_stats", "MAX_PAGE", "PRUNE_BATCH", "SPEC_CACHE_BYTES", "SPEC_CACHE_COUNT", "migrate",
)  # fmt: skip


def test_every_name_is_still_importable_from_coordinator_journal():
    missing = [name for name in _NAMES if not hasattr(journal_module, name)]
    assert missing == []
    assert set(journal_module.__all__) <= set(dir(journal_module))


def test_the_writer_sees_a_journal_as_group_committing_and_syncing(tmp_path):
    with Journal(tmp_path / "j.db", synchronous="NORMAL") as journal:
        assert isinstance(journal, GroupCommits) and isinstance(journal, Syncs)
    assert not isinstance(object(), GroupCommits) and not isinstance(object(), Syncs)


def test_a_stand_in_with_sync_only_gets_its_calls_alone_and_synced():
    class SyncOnly:
        def __init__(self) -> None:
            self.syncs = 0

        def sync(self) -> None:
            self.syncs += 1

    stand_in = SyncOnly()

    async def main() -> object:
        writer = JournalWriter(lambda: stand_in)
        try:
            return await writer.run(lambda: "done")
        finally:
            await writer.aclose()

    assert asyncio.run(main()) == "done"
    assert isinstance(stand_in, Syncs) and not isinstance(stand_in, GroupCommits)
    assert stand_in.syncs >= 1


def test_the_schema_table_list_is_what_a_fresh_journal_holds(tmp_path):
    with Journal(tmp_path / "j.db", synchronous="NORMAL") as journal:
        rows = journal._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = {name for (name,) in rows} - {"sqlite_sequence"}
    assert tables == _TABLES
    db = sqlite3.connect(":memory:", isolation_level=None)  # version 1 alone holds them too
    migrate(db, MIGRATIONS[:1])
    rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    assert {name for (name,) in rows} - {"sqlite_sequence"} == _TABLES
    db.close()
