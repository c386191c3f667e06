"""Session 38 review of the journal's read side and upkeep.

1. A new journal, and so its ``-wal`` and ``-shm`` files, is its owner's only (0600): it holds
   every task's inputs and results, which the API serves to holders of its token only (it was
   made 0644, readable by every local user).
2. A journal path naming a FIFO is a clear error: ``read_stats`` waited on it for ever (SQLite's
   open of a FIFO waits for a writer), a ``Journal`` said "disk I/O error".
3. Arguments no caller means: a listing ``since`` an integer beyond any float (an
   ``OverflowError`` traceback), a prune ``limit`` that is no whole number (2.5 pruned every
   ended task: the batch bound was never met) or an ``older_than_s`` of NaN (pruned nothing,
   silently).
4. Pins: a model filter is matched literally (``%`` and ``_`` are no wildcards); ``read_stats``
   reads what was committed while another process holds a write transaction open.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.journal import Journal, read_stats
from coordinator.journal_files import JournalFileError
from meshinfer.errors import ConfigError, LocalProtocolError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import Tensor

ROOT = Path(__file__).resolve().parents[1]
_INPUT = Tensor.from_array(np.arange(8, dtype=np.float32).reshape(4, 2))


def single(task_id: str, model: str = "m") -> TaskSpec:
    return TaskSpec(task_id, Pattern.SINGLE, _INPUT, (ModelRef(model),))


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --- 1. the journal's files are its owner's ----------------------------------------------------


def test_a_new_journal_and_its_log_files_are_its_owners_only(tmp_path, umask_022):
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        journal.submit(single("t1"))
        modes = {
            suffix: stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
            for suffix in ("", "-wal", "-shm")
        }
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
    with Journal(path) as journal:  # and it reopens as a journal
        assert journal.get("t1").summary.task_id == "t1"


def test_a_journal_that_exists_keeps_its_mode(tmp_path, umask_022):
    path = tmp_path / "journal.db"
    Journal(path).close()
    os.chmod(path, 0o640)  # an operator's choice (a group that reads it)
    with Journal(path) as journal:
        journal.submit(single("t1"))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert stat.S_IMODE(os.stat(f"{path}-wal").st_mode) == 0o640


def test_a_new_journal_through_a_link_to_no_file_yet_is_made_where_it_points(tmp_path, umask_022):
    real = tmp_path / "real.db"
    link = tmp_path / "journal.db"
    link.symlink_to(real)
    with Journal(link) as journal:
        journal.submit(single("t1"))
    assert real.is_file() and stat.S_IMODE(os.stat(real).st_mode) == 0o600
    assert read_stats(link).tasks == {"pending": 1}


# --- 2. a FIFO ----------------------------------------------------------------------------------

_READ_STATS = """
import sys
from coordinator.journal import read_stats
from coordinator.journal_files import JournalFileError
try:
    read_stats(sys.argv[1])
except JournalFileError as exc:
    print(exc)
"""


def test_read_stats_of_a_fifo_is_a_clear_error_not_a_wait_for_ever(tmp_path):
    fifo = tmp_path / "journal.db"
    os.mkfifo(fifo)
    command = [sys.executable, "-c", _READ_STATS, str(fifo)]
    try:  # (in a process of its own: a wait for ever there is a failure here, not a hang)
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("read_stats waited on the FIFO")
    assert done.returncode == 0, done.stderr
    assert f"journal {fifo} is a FIFO, not a regular file" in done.stdout


def test_a_journal_on_a_fifo_is_refused_by_name_and_left_alone(tmp_path):
    fifo = tmp_path / "journal.db"
    os.mkfifo(fifo)
    with pytest.raises(JournalFileError, match="is a FIFO, not a regular file"):
        Journal(fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not Path(f"{fifo}-wal").exists()


# --- 3. arguments no caller means ---------------------------------------------------------------


@pytest.mark.parametrize("since", [10**400, -(10**400), 10**5000], ids=["big", "-big", "huge"])
def test_a_listing_since_an_integer_beyond_any_float_is_refused(tmp_path, since):
    with Journal(tmp_path / "journal.db") as journal:
        with pytest.raises(ConfigError, match="since"):
            journal.list(since=since)


def test_a_prune_limit_that_is_no_whole_number_is_refused_not_unbounded(tmp_path):
    clock = [1000.0]
    with Journal(tmp_path / "journal.db", wall_clock=lambda: clock[0]) as journal:
        for n in range(4):
            journal.submit(single(f"t{n}"))
            journal.cancel(f"t{n}")
        clock[0] += 100
        with pytest.raises(LocalProtocolError, match="whole limit"):
            journal.prune(10, limit=2.5)
        assert journal.stats().tasks == {"cancelled": 4}  # nothing went
        assert journal.prune(10, limit=2) == 2  # a whole batch still goes


def test_a_prune_older_than_nan_is_refused_not_silently_nothing(tmp_path):
    with Journal(tmp_path / "journal.db") as journal:
        with pytest.raises(LocalProtocolError):
            journal.prune(float("nan"))


# --- 4. pins ------------------------------------------------------------------------------------


def test_a_model_filter_matches_literally_with_no_wildcards(tmp_path):
    with Journal(tmp_path / "journal.db") as journal:
        for task_id, model in (("a", "m%"), ("b", "mx"), ("c", "m_"), ("d", "m\\%")):
            journal.submit(single(task_id, model))
        listed = {m: [t.task_id for t in journal.list(model=m).tasks] for m in ("m%", "m_", "m")}
    assert listed == {"m%": ["a"], "m_": ["c"], "m": []}


_HOLD_WRITE = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
db.execute("INSERT INTO counters (name, value) VALUES ('uncommitted', 1)")
print("holding", flush=True)
sys.stdin.read()
"""


def test_read_stats_reads_what_was_committed_while_another_process_writes(tmp_path):
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        journal.submit(single("t1"))
    command = [sys.executable, "-c", _HOLD_WRITE, str(path)]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as p:
        try:
            assert p.stdout.readline().strip() == "holding"
            stats = read_stats(path)
        finally:
            p.stdin.close()
            p.wait(timeout=60)
    assert stats.tasks == {"pending": 1} and "uncommitted" not in stats.counters
    with sqlite3.connect(path) as db:  # the writer's transaction never committed
        assert db.execute("SELECT count(*) FROM counters").fetchone() == (0,)
