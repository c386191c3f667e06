"""The journal's files: one coordinator at a time on a journal, and a clear error for a file that
is no journal (or cannot be one).

Two coordinators on one journal would each recover the other's live tasks and run them again,
and each keeps the live tasks it accepted in memory (:mod:`coordinator.journal_hot`) and judges
their results there, blind to what the other wrote. So a :class:`~coordinator.journal.Journal`
holds an exclusive ``flock`` on ``<journal>-lock`` for as long as it is open
(:func:`lock_journal`, by :func:`meshinfer.filelock.lock_file`), and a second one is refused,
naming the process that holds it. The lock is a file of its own, not the database: SQLite's own
(POSIX) locks on the database are dropped when *any* descriptor of that file in the process is
closed. A lock file of another user (left by a coordinator run as root), or a directory this
user may not search or write, is an error naming that path, its owner and what to do
(:func:`meshinfer.filelock.failure_text`), never a bare ``PermissionError``. A journal that does
not exist yet is made for its owner only (:data:`JOURNAL_MODE`: it holds every task's inputs and
results, which the API serves to holders of its token only; SQLite gives the ``-wal`` and
``-shm`` files the database file's mode); one that exists keeps its mode. A path that names a
FIFO, a socket or a device is refused (SQLite would wait on a FIFO for ever). Readers
(:func:`~coordinator.journal.read_stats`, the CLI) take no lock: WAL lets them read beside the
writer; a file a reader cannot open is a :class:`JournalFileError` naming it and what to do
(:func:`check_readable`), as for the writer. The kernel drops the lock when its process dies,
so a crash leaves nothing to clean up (the file stays, unlocked).

Every ``sqlite3`` error while the journal opens (a directory, random bytes, a damaged file, a
read-only place, a full disk) becomes a :class:`JournalFileError` naming the file and what is
wrong (:func:`explained`): the operator meets it as one line from ``meshinfer-coord serve``.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from coordinator.journal_schema import SchemaError
from meshinfer.errors import MeshInferError
from meshinfer.filelock import failure_text, lock_one_user

__all__ = [
    "JOURNAL_MODE",
    "LOCK_SUFFIX",
    "JournalFileError",
    "check_readable",
    "explained",
    "lock_journal",
]

#: The lock file is the journal's path with this appended (as SQLite's ``-wal`` and ``-shm``).
LOCK_SUFFIX = "-lock"
#: The mode a new journal file is made with (the umask may take more away).
JOURNAL_MODE = 0o600

#: What an ``sqlite3`` error met while opening says to an operator (first match wins).
_HINTS = (
    ("not a database", "it is not an SQLite database (not a meshinfer journal, or damaged)"),
    ("malformed", "it is damaged (restore it from a backup, or move it away to start afresh)"),
    (
        "readonly",
        "it or its directory is read-only to this user (the coordinator writes its journal; a"
        " reader too may need to make the -wal and -shm files beside it)",
    ),
    ("unable to open", "it cannot be opened or created (may this user write its directory?)"),
    ("locked", "another process holds it locked"),
    ("full", "the disk is full"),
    ("no such table", "it holds no journal tables (not a meshinfer journal, or never opened)"),
)


class JournalFileError(MeshInferError):
    """The journal's file cannot serve as one (its message names the file and why)."""


def lock_journal(path: Path) -> int:
    """Take the journal's lock (see the module docstring); its descriptor, which holds the lock
    until it is closed; a journal not there yet is then made, for its owner only
    (:func:`_make_private`). :class:`JournalFileError` if another journal holds it, the lock
    file cannot be made or opened (one of another user names that user and what to do), or
    ``path`` is no regular file."""
    try:
        _check_kind(path, os.stat(path).st_mode)
    except FileNotFoundError:
        pass  # a new journal (or a link to none yet): made below
    except OSError as exc:  # e.g. a directory above it that this user may not search
        raise JournalFileError(f"journal {path}: {failure_text(path, 'reach', exc)}") from None
    # beside the file SQLite opens: a journal held through a symbolic link let in another
    # opened by the real path (its lock was beside the link)
    fd = lock_one_user(
        Path(f"{os.path.realpath(path)}{LOCK_SUFFIX}"), JournalFileError,
        in_use=f"journal {path} is in use by another coordinator",
        advice="one journal serves one coordinator (stop that one, or give this one another"
        " data_dir)",
        where=f"journal {path}",
    )  # fmt: skip
    _make_private(path)
    return fd


def _make_private(path: Path) -> None:
    """Make the journal ``path`` names, empty and with :data:`JOURNAL_MODE`, if nothing is
    there yet (under the lock: no other journal makes it meanwhile). SQLite takes an empty file
    for a new database; one that cannot be made here is left for SQLite to make or explain."""
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        os.close(os.open(os.path.realpath(path), flags, JOURNAL_MODE))
    except OSError:
        pass  # there already (EEXIST), or SQLite says why not


def _check_kind(path: Path, mode: int) -> None:
    """:class:`JournalFileError` unless ``mode`` is that of a regular file."""
    if stat.S_ISDIR(mode):
        raise JournalFileError(f"journal {path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket or device"
        raise JournalFileError(f"journal {path} is {kind}, not a regular file")


def check_readable(path: Path) -> None:
    """Raise :class:`JournalFileError` unless this process can open ``path`` to read it: one
    missing, a directory (or anything but a regular file), or one this user may not read (the
    message names the path that stops it, its owner and what to do:
    :func:`meshinfer.filelock.failure_text`), rather than SQLite's bare "unable to open
    database file"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # (a FIFO: no wait)
    except OSError as exc:
        raise JournalFileError(f"journal {path}: {failure_text(path, 'read', exc)}") from None
    mode = os.fstat(fd).st_mode
    os.close(fd)
    _check_kind(path, mode)  # (a FIFO: SQLite's own open would wait for a writer for ever)


@contextmanager
def explained(path: Path) -> Iterator[None]:
    """Turn an ``sqlite3`` error raised inside into a :class:`JournalFileError` saying what it
    means for the journal at ``path``; a :class:`SchemaError` gets the path in its message."""
    try:
        yield
    except SchemaError as exc:
        raise SchemaError(f"journal {path}: {exc}") from None
    except sqlite3.Error as exc:
        text = str(exc)
        hint = next((f"{hint} ({text})" for key, hint in _HINTS if key in text.lower()), text)
        raise JournalFileError(f"journal {path}: {hint}") from None
