"""Journal faults found in session 32's review, each with the test that failed before its fix.

* A failed ``fdatasync`` of the write-ahead log is sticky: the kernel may drop the unwritten
  pages and report the error once, so a later sync that "succeeds" must not make the journal
  answer "durable" again (a lost frame ends SQLite's recovery of the log, and every commit after).
* A migration that SQLite itself rolled back (a full disk) says so, not "cannot rollback".
* A writer call naming a method the journal lacks fails alone: not the other calls of its group,
  and not the writer's thread (an ``alone`` call).
"""

from __future__ import annotations

import os
import sqlite3
import threading

import numpy as np
import pytest

from coordinator.journal import Journal
from coordinator.journal_schema import MIGRATIONS, migrate, schema_version
from coordinator.journal_writer import JournalWriter
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from tests.helpers import until

_INPUT = Tensor.from_array(np.arange(8, dtype=np.float32).reshape(4, 2))


def single(task_id: str) -> TaskSpec:
    return TaskSpec(task_id, Pattern.SINGLE, _INPUT, (ModelRef("m"),))


@pytest.fixture
def eio_once(monkeypatch):
    """``os.fdatasync`` fails once with EIO, then succeeds again (as Linux reports a writeback
    error once per file, having dropped the pages); the list counts the failures."""
    failures: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if not failures:
            failures.append(fd)
            raise OSError(5, "Input/output error (injected)")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return failures


def test_a_failed_sync_fails_every_later_sync_of_the_journal(tmp_path, eio_once):
    with Journal(tmp_path / "j.db") as journal:  # synchronous=FULL
        with pytest.raises(OSError, match="injected"):
            journal.submit(single("a"))  # committed, not known to be durable
        assert eio_once
        with pytest.raises(OSError, match="earlier sync of its log failed") as caught:
            journal.submit(single("b"))  # the next fdatasync "succeeds": not durable either
        assert caught.value.errno == 5
        with pytest.raises(OSError, match="restart the coordinator"):
            journal.sync()
    with Journal(tmp_path / "j.db") as reopened:  # a restart syncs again
        reopened.submit(single("c"))
        assert {t.task_id for t in reopened.list().tasks} == {"a", "b", "c"}


async def test_after_a_failed_sync_the_writer_answers_no_later_call_durable(tmp_path, eio_once):
    journal = Journal(tmp_path / "j.db")
    writer = JournalWriter(lambda: journal)
    with pytest.raises(OSError, match="injected"):
        await writer.run("submit", single("a"))
    for task_id in ("b", "c"):
        with pytest.raises(OSError, match="earlier sync"):
            await writer.run("submit", single(task_id))
    await writer.aclose()
    journal.close()


def test_a_migration_sqlite_rolled_back_raises_its_own_error(tmp_path):
    db = sqlite3.connect(tmp_path / "j.db", isolation_level=None)
    migrate(db, MIGRATIONS[:1])
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages + 1}")  # the disk is (all but) full
    too_big = ("CREATE TABLE filler (b BLOB)", "INSERT INTO filler VALUES (zeroblob(100000))")
    with pytest.raises(sqlite3.OperationalError, match="full"):  # not "cannot rollback"
        migrate(db, (*MIGRATIONS[:1], too_big))
    assert not db.in_transaction
    assert schema_version(db) == 1  # the version before, intact
    db.close()


async def test_a_call_naming_no_method_fails_alone_not_its_group(tmp_path):
    journal = Journal(tmp_path / "j.db", synchronous="NORMAL")
    writer = JournalWriter(lambda: journal)
    running, release = threading.Event(), threading.Event()

    def hold() -> None:  # keeps the writer busy while the next group is queued
        running.set()
        assert release.wait(10)

    held = writer.call(hold)
    await until(running.is_set)
    calls = [
        writer.call("submit", single("a")),
        writer.call("no_such_call", 1),
        writer.call("submit", single("b")),
    ]
    release.set()
    await held
    assert await calls[0] == "a"
    with pytest.raises(AttributeError, match="no_such_call"):
        await calls[1]
    assert await calls[2] == "b"
    assert writer.groups == 2  # the three ran as one group
    await writer.aclose()
    journal.close()


async def test_an_alone_call_naming_no_method_leaves_the_writer_running(tmp_path):
    journal = Journal(tmp_path / "j.db", synchronous="NORMAL")
    writer = JournalWriter(lambda: journal)
    with pytest.raises(AttributeError, match="no_such_call"):
        await writer.run_alone("no_such_call")
    assert await writer.run("submit", single("a")) == "a"  # not "the journal writer is closed"
    await writer.aclose()
    journal.close()


def test_a_journal_whose_sync_failed_closes_without_checkpointing_its_log(tmp_path, eio_once):
    """Closing the last connection checkpoints the log into the database file and syncs it:
    after a failed sync that would make pages the kernel may have dropped permanent. The log is
    left as it is for the next open's recovery instead."""
    path = tmp_path / "j.db"
    journal = Journal(path)
    with pytest.raises(OSError, match="injected"):
        journal.submit(single("a"))
    with pytest.raises(OSError, match="earlier sync"):
        journal.submit(single("b"))
    database_before = path.read_bytes()
    journal.close()
    wal = tmp_path / "j.db-wal"
    assert wal.exists() and wal.stat().st_size > 0  # not checkpointed and removed
    assert path.read_bytes() == database_before  # nor copied into the database file
    with Journal(path) as reopened:  # recovery reads the log
        assert {t.task_id for t in reopened.list().tasks} == {"a", "b"}


def test_a_read_that_fails_raises_its_own_error_not_the_end_of_its_snapshot(tmp_path):
    """A read whose transaction SQLite already ended (as it does on some errors) used to raise
    "cannot commit - no transaction is active" from the read's ``finally``, hiding its error."""
    with Journal(tmp_path / "j.db") as journal:
        journal.submit(single("a"))
        with pytest.raises(ValueError, match="the read's own"):
            with journal._read() as db:
                db.execute("ROLLBACK")  # the snapshot ended under the read
                raise ValueError("the read's own error")
        assert [t.task_id for t in journal.list().tasks] == ["a"]  # and the journal reads on


@pytest.mark.parametrize("since", [float("nan"), float("inf"), float("-inf")])
def test_a_listing_since_a_time_that_is_no_time_is_refused(tmp_path, since):
    """``list(since=nan)`` matched nothing, silently (only the API checked it)."""
    from meshinfer.errors import ConfigError

    with Journal(tmp_path / "j.db") as journal:
        journal.submit(single("a"))
        with pytest.raises(ConfigError, match="not a finite time"):
            journal.list(since=since)
        assert [t.task_id for t in journal.list(since=0.0).tasks] == ["a"]
