"""Journal faults found in session 35's review of its reads and upkeep, each with the test that
failed before its fix.

* Retention stopped at the first task stamped in the future: a wall clock that ran ahead and was
  then set back kept every task journaled after it, ended or not, until the clock caught up
  with the wrong stamp (a year, for a clock set a year ahead).
* A journal a newer meshinfer wrote was switched to WAL before it was refused (a write to a file
  this code cannot read), and :func:`read_stats` read it without a word.
* A ``schema_version`` table holding no number (a damaged file) was a bare ``TypeError``.
* ``list`` with a limit or a ``since`` of the wrong type was an SQL or ``ValueError``, not the
  ``ConfigError`` of every other bad filter.
"""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest

from coordinator.journal import Journal, read_stats
from coordinator.journal_schema import MIGRATIONS, SchemaError
from meshinfer.errors import ConfigError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks import Pattern, TaskSpec, TaskState
from meshinfer.proto.tasks_wire import Tensor

_INPUT = Tensor.from_array(np.arange(8, dtype=np.float32).reshape(4, 2))
DAY = 86400.0


def single(task_id: str) -> TaskSpec:
    return TaskSpec(task_id, Pattern.SINGLE, _INPUT, (ModelRef("m"),))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- retention and a clock that steps back ------------------------------------------------------


def test_a_task_stamped_by_a_clock_since_set_back_does_not_stop_retention(tmp_path):
    clock = Clock(1000 * DAY)
    with Journal(tmp_path / "j.db", wall_clock=clock) as journal:
        clock.now += 365 * DAY  # the clock runs a year ahead...
        journal.submit(single("ahead-ended"))
        journal.finish("ahead-ended", TaskState.FAILED, error="x")
        journal.submit(single("ahead-live"))
        clock.now -= 365 * DAY  # ...and is set right
        for n in range(3):
            journal.submit(single(f"ended-{n}"))
            journal.finish(f"ended-{n}", TaskState.FAILED, error="x")
        journal.submit(single("live"))
        clock.now += 10 * DAY
        assert journal.prune(7 * DAY) == 3  # was 0: the walk stopped at "ahead-ended"
        left = {s.task_id for s in journal.list().tasks}
        # the tasks stamped ahead have not ended 7 days ago by this clock; live ones never go
        assert left == {"ahead-ended", "ahead-live", "live"}
        clock.now += 400 * DAY
        assert journal.prune(7 * DAY) == 1
        assert {s.task_id for s in journal.list().tasks} == {"ahead-live", "live"}


def test_the_walk_still_stops_at_the_first_task_created_after_the_cutoff(tmp_path):
    clock = Clock(1000 * DAY)
    with Journal(tmp_path / "j.db", wall_clock=clock) as journal:
        journal.submit(single("old"))
        journal.finish("old", TaskState.FAILED, error="x")
        clock.now += 5 * DAY
        journal.submit(single("young"))
        journal.finish("young", TaskState.FAILED, error="x")
        clock.now += 3 * DAY
        assert journal.prune(7 * DAY) == 1
        assert [s.task_id for s in journal.list().tasks] == ["young"]


# --- schema versions ----------------------------------------------------------------------------


def _newer_journal(path) -> None:
    """A journal, in rollback-journal mode, stamped by a meshinfer one version ahead."""
    with Journal(path) as journal:
        journal.submit(single("t"))
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (len(MIGRATIONS) + 1,))
    db.close()


def test_a_journal_of_a_newer_meshinfer_is_refused_before_anything_writes_to_it(tmp_path):
    path = tmp_path / "j.db"
    _newer_journal(path)
    with pytest.raises(SchemaError, match="newer than this meshinfer"):
        Journal(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # was switched to WAL
    db.close()


def test_read_stats_refuses_a_journal_of_a_newer_meshinfer(tmp_path):
    path = tmp_path / "j.db"
    _newer_journal(path)
    with pytest.raises(SchemaError, match=f"journal {path}: schema version 5 is newer"):
        read_stats(path)  # it read the counts as if its own


@pytest.mark.parametrize("version", ["abc", b"4", 99.5])
def test_a_schema_version_that_is_no_version_is_a_clear_schema_error(tmp_path, version):
    path = tmp_path / "j.db"
    with Journal(path) as journal:
        journal.submit(single("t"))
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    db.commit()
    db.close()
    with pytest.raises(SchemaError, match="damaged: its schema_version table holds"):
        Journal(path)  # was a TypeError ('>' between str and int)
    with pytest.raises(SchemaError, match="damaged"):
        read_stats(path)


# --- listing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [2.5, "3", None])
def test_a_listing_limit_that_is_no_whole_number_is_refused(tmp_path, limit):
    with Journal(tmp_path / "j.db") as journal:
        journal.submit(single("t"))
        with pytest.raises(ConfigError, match="limit"):
            journal.list(limit=limit)  # 2.5 was an sqlite3.IntegrityError, "3" a TypeError


@pytest.mark.parametrize("since", ["abc", "1", b"1", True])
def test_a_listing_since_that_is_no_number_is_refused(tmp_path, since):
    with Journal(tmp_path / "j.db") as journal:
        journal.submit(single("t"))
        with pytest.raises(ConfigError, match="since"):
            journal.list(since=since)  # "abc" was a ValueError; "1" was taken as 1.0


def test_pages_neither_skip_nor_repeat_tasks_submitted_meanwhile_at_one_instant(tmp_path):
    with Journal(tmp_path / "j.db", wall_clock=lambda: 5.0) as journal:  # equal stamps
        for n in range(30):
            journal.submit(single(f"old-{n}"))
        stop = threading.Event()

        def submit_more() -> None:
            n = 0
            while not stop.is_set():
                journal.submit(single(f"new-{n}"))
                n += 1

        thread = threading.Thread(target=submit_more)
        thread.start()
        try:
            seen, cursor = [], None
            while True:
                page = journal.list(limit=4, cursor=cursor)
                seen += [s.task_id for s in page.tasks]
                if (cursor := page.next_cursor) is None:
                    break
        finally:
            stop.set()
            thread.join()
    old = [t for t in seen if t.startswith("old-")]
    assert len(seen) == len(set(seen))
    assert old == [f"old-{n}" for n in reversed(range(30))]
