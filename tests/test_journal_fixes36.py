"""Journal faults found in session 36's review of its write side, each with the test that failed
before its fix.

* A row of the hot path that SQLite refused when the group wrote its staged rows (a task's end
  whose summary is over SQLite's length limit: "string or blob too big", which the coordinator
  expects to fail alone and then takes the result without it) failed EVERY call of the group,
  and when another call's read wrote it, as a :class:`TransientJournalError` (made again, it
  fails again). Now the group runs again with savepoints and only that call fails.
* A journal opened through a symbolic link never synced its log: SQLite writes the ``-wal``
  beside the file the link names, and ``sync`` looked beside the link, found nothing and took
  it for "nothing committed yet" -- an acknowledged write was not durable at FULL. Likewise a
  journal opened by a relative path looked for its log in the current directory of the moment.
* A result row SQLite refused for another reason than the primary key (a blob of None) was
  counted as a duplicate delivery and answered False, as if the item had its result already.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading

import numpy as np
import pytest

from coordinator.journal import Journal, TaskEnding, TransientJournalError
from coordinator.journal_files import JournalFileError
from coordinator.journal_writer import JournalWriter
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks import Pattern, TaskSpec, TaskState
from meshinfer.proto.tasks_wire import Tensor

_INPUT = Tensor.from_array(np.arange(8, dtype=np.float32).reshape(4, 2))


def single(task_id: str) -> TaskSpec:
    return TaskSpec(task_id, Pattern.SINGLE, _INPUT, (ModelRef("m"),))


def committed(path) -> dict[str, tuple[str, bytes | None]]:
    """task id -> (state, result of its item) as a second connection sees them."""
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT t.id, t.state, r.blob FROM tasks t JOIN items i ON i.task_id = t.id"
            " LEFT JOIN results r ON r.item_id = i.id"
        ).fetchall()
    return {task: (state, blob) for task, state, blob in rows}


# --- a staged row SQLite refuses -----------------------------------------------------------------


def test_an_end_too_big_for_sqlite_fails_its_call_not_its_group(tmp_path):
    with Journal(tmp_path / "j.db") as journal:
        journal._db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 50_000)  # as the default's 1e9 is
        journal.submit(single("big"))
        journal.submit(single("ok"))
        too_big = TaskEnding("big", TaskState.SUCCEEDED, b"s" * 100_000, None, read_back=False)
        outcomes = journal.commit_group([
            lambda: journal.submit(single("a")),
            lambda: journal.take_result("big/0", 1, b"x", sent_to="n", ending=too_big),
            lambda: journal.take_result("ok/0", 1, b"y", sent_to="n"),
            lambda: journal.submit(single("c")),
        ])  # fmt: skip
        errors = [o.error for o in outcomes]
        assert [o.value for o in outcomes] == ["a", None, (True, None), "c"]
        assert errors[0] is errors[2] is errors[3] is None
        assert isinstance(errors[1], sqlite3.DataError)  # its own error: not a transient one
        rows = committed(journal.path)
        assert rows["big"] == ("pending", None)  # nothing of the refused call
        assert rows["ok"] == ("running", b"y") and {"a", "c"} <= rows.keys()
        # what the coordinator does next: the result alone, then the end without the summary
        assert journal.take_result("big/0", 1, b"x", sent_to="n") == (True, None)
        assert journal.get("big").items[0].result == b"x"


async def test_through_the_writer_only_the_caller_of_the_refused_end_hears_an_error(tmp_path):
    with Journal(tmp_path / "j.db") as journal:
        journal._db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 50_000)
        writer = JournalWriter(lambda: journal)
        await writer.run("submit", single("big"))
        await writer.run("submit", single("ok"))
        entered, gate = threading.Event(), threading.Event()

        def hold() -> bool:  # the writer's thread waits here: the calls below make one group
            entered.set()
            return gate.wait(5)

        held = asyncio.ensure_future(writer.run_alone(hold))
        assert await asyncio.to_thread(entered.wait, 5)
        too_big = TaskEnding("big", TaskState.SUCCEEDED, b"s" * 100_000, None, read_back=True)
        calls = [
            writer.call("submit", single("a")),
            writer.call("take_result", "big/0", 1, b"x", sent_to="n", ending=too_big),
            writer.call("take_result", "ok/0", 1, b"y", sent_to="n"),
        ]
        gate.set()
        assert await held
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        await writer.aclose()
        assert writer.groups == 4  # the two submits, hold, then the three calls in one group
        assert outcomes[0] == "a" and outcomes[2] == (True, None)
        assert isinstance(outcomes[1], sqlite3.DataError)


def test_a_row_that_cannot_be_bound_fails_its_call_when_another_calls_read_writes_it(tmp_path):
    """(tests/test_journal_hot.py's ``test_a_failed_flush_fails_the_whole_group`` pinned the
    old rule: every call failed, with a ``TransientJournalError``.)"""
    with Journal(tmp_path / "j.db") as journal:
        journal.submit(single("a"))
        journal.submit(single("b"))
        outcomes = journal.commit_group([
            lambda: journal.take_result("a/0", 1, b"r", node=("n",), sent_to="veh"),
            lambda: journal.get("b"),  # writes the row above first, inside this call
            lambda: journal.submit(single("c")),
        ])  # fmt: skip
        assert isinstance(outcomes[0].error, sqlite3.ProgrammingError)
        assert not isinstance(outcomes[0].error, TransientJournalError)
        assert outcomes[1].value.summary.task_id == "b" and outcomes[2].value == "c"
        assert not journal._staged
        assert committed(journal.path)["a"] == ("pending", None)
        assert journal.take_result("a/0", 1, b"r", node="n", sent_to="veh") == (True, None)
        assert committed(journal.path)["a"] == ("running", b"r")


def test_a_call_that_catches_the_refusal_of_its_rows_still_fails(tmp_path):
    with Journal(tmp_path / "j.db") as journal:
        journal.submit(single("a"))
        journal.submit(single("b"))

        def swallow():
            journal.take_result("a/0", 1, b"r", node=("n",), sent_to="veh")
            try:
                journal.get("b")  # its flush of the row above is refused
            except sqlite3.Error:
                pass
            return "fine?"

        outcomes = journal.commit_group([lambda: journal.submit(single("c")), swallow])
        assert outcomes[0].value == "c"
        assert isinstance(outcomes[1].error, sqlite3.ProgrammingError)
        assert committed(journal.path)["a"] == ("pending", None)
        assert journal.stats().tasks == {"pending": 3}


# --- exactly once: only the primary key says "duplicate" ----------------------------------------


@pytest.mark.parametrize("hot_items", [0, 1000])
def test_a_result_row_refused_for_another_reason_is_no_duplicate(tmp_path, hot_items):
    with Journal(tmp_path / "j.db", hot_items=hot_items) as journal:
        journal.submit(single("a"))
        with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
            journal.take_result("a/0", 1, None, sent_to="n")  # type: ignore[arg-type]
        assert "duplicate_results" not in journal.stats().counters
        assert journal.take_result("a/0", 1, b"r", sent_to="n") == (True, None)
        assert journal.take_result("a/0", 1, b"r", sent_to="n") == (False, None)
        assert journal.stats().counters["duplicate_results"] == 1


# --- the log that sync() makes durable is the one SQLite writes ---------------------------------


def same_file(fd: int, path) -> bool:
    there = os.stat(path)
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def test_a_journal_opened_through_a_symbolic_link_syncs_its_log(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "link").mkdir()
    real = tmp_path / "data" / "j.db"
    link = tmp_path / "link" / "j.db"
    link.symlink_to(real)
    with Journal(link) as journal:
        journal.submit(single("a"))  # committed, and synced before it returns
        assert journal._wal is not None  # was None: no "link/j.db-wal", so nothing synced
        assert same_file(journal._wal, f"{real}-wal")


def test_a_journal_opened_by_a_relative_path_syncs_its_log_after_a_chdir(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "j.db-wal").write_bytes(b"another journal's log")
    monkeypatch.chdir(tmp_path / "a")
    with Journal("j.db") as journal:
        monkeypatch.chdir(tmp_path / "b")
        journal.submit(single("a"))
        assert journal._wal is not None and same_file(journal._wal, tmp_path / "a" / "j.db-wal")


def test_a_journal_held_through_a_link_refuses_one_opened_by_the_real_path(tmp_path):
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "j.db"
    link = tmp_path / "j.db"
    link.symlink_to(real)
    with Journal(link):
        with pytest.raises(JournalFileError, match="in use"):
            Journal(real).close()
