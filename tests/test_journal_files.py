"""The journal's file as an operator meets it: a path that is no journal (a directory, random
bytes, a damaged file, another application's database) is one clear error and is left as it
was; one journal serves one coordinator at a time, and a crash frees it."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.journal import Journal, UnknownTaskError, read_stats
from coordinator.journal_files import LOCK_SUFFIX, JournalFileError
from coordinator.journal_schema import SchemaError
from meshinfer.errors import MeshInferError
from tests.test_journal import batch

REPO = Path(__file__).resolve().parent.parent


def other_application(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ada')")
    sqlite3.connect(path).close()


def damaged_journal(path: Path) -> None:
    with Journal(path) as journal:
        journal.submit(batch("t1"))
    with open(path, "r+b") as file:  # cut mid-page: the schema page survives, the rest does not
        file.truncate(os.path.getsize(path) // 2 + 100)


def foreign_schema_version(path: Path) -> None:
    with sqlite3.connect(path) as db:  # e.g. a migration tool's table of the same name
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (2)")
        db.execute("CREATE TABLE accounts (id INTEGER)")
    sqlite3.connect(path).close()


NOT_JOURNALS = {
    "directory": (lambda path: path.mkdir(), "is a directory"),
    "random bytes": (
        lambda path: path.write_bytes(os.urandom(3000) + b"\0" * 5192),
        "not an SQLite database",
    ),
    "damaged": (damaged_journal, "damaged"),
    "other application": (
        other_application,
        "not a meshinfer journal (it holds other tables: users",
    ),
    "foreign schema_version": (foreign_schema_version, "schema version 2, but no table counters"),
}


@pytest.mark.parametrize("case", NOT_JOURNALS)
def test_a_file_that_is_no_journal_is_one_clear_error_and_is_left_alone(tmp_path, case):
    make, fragment = NOT_JOURNALS[case]
    path = tmp_path / "journal.db"
    make(path)
    before = _contents(path)
    with pytest.raises(MeshInferError) as refused:  # not a bare sqlite3 error: no traceback
        Journal(path)
    assert isinstance(refused.value, JournalFileError | SchemaError)
    message = str(refused.value)
    assert str(path) in message and fragment in message and "\n" not in message, message
    assert _contents(path) == before  # nothing written into someone else's file
    path.with_name(path.name + LOCK_SUFFIX).unlink(missing_ok=True)
    if case == "directory":
        path.rmdir()
    else:
        path.unlink()
    Journal(path).close()  # and the lock was let go: a journal opens there once it is gone


def _contents(path: Path) -> bytes | None:
    return None if path.is_dir() else path.read_bytes()


def test_a_missing_directory_is_one_clear_error(tmp_path):
    path = tmp_path / "no-such-folder" / "journal.db"
    with pytest.raises(JournalFileError, match=r"no-such-folder.*No such file or directory"):
        Journal(path)


def test_a_newer_journal_names_the_file(tmp_path):
    path = tmp_path / "j.db"
    Journal(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (99)")
    sqlite3.connect(path).close()
    with pytest.raises(SchemaError, match=re.escape(f"{path}: schema version 99 is newer")):
        Journal(path)


def test_a_second_journal_on_the_same_file_is_refused_until_the_first_closes(tmp_path):
    path = tmp_path / "j.db"
    with Journal(path) as first:
        first.submit(batch("t1"))
        with pytest.raises(
            JournalFileError, match=rf"in use by another coordinator \(pid {os.getpid()}\)"
        ):
            Journal(path)
        assert read_stats(path).tasks == {"pending": 1}  # readers take no lock
        first.submit(batch("t2"))  # the refused one disturbed nothing
    with Journal(path) as second:
        assert {r.task.task_id for r in second.recover()} == {"t1", "t2"}


_HOLDER = """
import sys
from coordinator.journal import Journal
journal = Journal(sys.argv[1])
print("open", flush=True)
sys.stdin.read()
"""


def test_a_journal_held_by_another_process_is_refused_and_freed_when_it_dies(tmp_path):
    path = tmp_path / "j.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=env, text=True,
    )  # fmt: skip
    try:
        assert child.stdout.readline() == "open\n"
        with pytest.raises(JournalFileError, match=rf"in use .*\(pid {child.pid}\)"):
            Journal(path)
        child.send_signal(signal.SIGKILL)  # a crash: the kernel lets the lock go
        child.wait(timeout=30)
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdin.close()
        child.stdout.close()
    Journal(path).close()


class FullDisk:
    """The journal's connection, with every ``COMMIT`` failing as on a full disk."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def test_a_commit_that_fails_acknowledges_nothing_and_the_journal_goes_on(tmp_path):
    path = tmp_path / "j.db"
    with Journal(path) as journal:
        journal.submit(batch("kept"))
        db, journal._db = journal._db, FullDisk(journal._db)
        with pytest.raises(sqlite3.OperationalError, match="full"):
            journal.submit(batch("refused"))
        with pytest.raises(sqlite3.OperationalError, match="full"):
            journal.commit_group([lambda: journal.submit(batch("grouped"))])
        journal._db = db  # space again
        for task_id in ("refused", "grouped"):  # not even in memory (the hot tasks)
            with pytest.raises(UnknownTaskError):
                journal.get(task_id)
        journal.submit(batch("later"))
    with Journal(path) as reopened:
        assert {r.task.task_id for r in reopened.recover()} == {"kept", "later"}
