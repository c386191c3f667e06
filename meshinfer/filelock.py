"""Exclusive ``flock`` locks that one process holds at a time: a fleet command on its fleet
directory (:mod:`meshinfer.identity_files`), a coordinator on its journal
(:mod:`coordinator.journal_files`).

:func:`lock_directory` locks a directory itself; :func:`lock_file` locks a lock file of its own
(made if missing), and writes the holder's pid into it for the message another process gets.
Either returns the open descriptor that holds the lock until it is closed; the kernel drops the
lock when its process dies, so a crash leaves nothing to clean up. Nobody waits: a lock someone
holds is :class:`LockHeld` at once. A path that cannot be opened or locked is
:class:`LockUnavailable`, whose message names the path and, where access was denied, the path
that stops this process (the lock's, or a directory above it) and what to do: run as the user it
belongs to, or chown it, or check its permissions (rather than a bare "Permission denied"; see
:func:`failure_text`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
from collections.abc import Callable
from pathlib import Path

from meshinfer.errors import MeshInferError

__all__ = [
    "LockHeld",
    "LockUnavailable",
    "failure_text",
    "lock_directory",
    "lock_file",
    "lock_one_user",
]

_DENIED = {errno.EACCES, errno.EPERM}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class LockHeld(MeshInferError):
    """Another process holds the lock; ``pid`` is its pid where the lock file says it."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is locked by another process" + (f" (pid {pid})" if pid else ""))
        self.path = path
        self.pid = pid


class LockUnavailable(MeshInferError):
    """The lock's path cannot be opened or locked; the message names it and says why."""


def lock_directory(path: Path) -> int:
    """Take the exclusive lock of the directory ``path``; its open descriptor (see the module
    docstring)."""
    return _lock(Path(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0), record_pid=False)


def lock_file(path: Path) -> int:
    """Take the exclusive lock of the lock file ``path`` (made with mode 0644 if missing) and
    write this process's pid into it; its open descriptor (see the module docstring). A symlink
    at ``path`` is not followed (:class:`LockUnavailable`): the pid written over the file it
    named destroyed that file."""
    return _lock(Path(path), os.O_RDWR | os.O_CREAT | _NOFOLLOW, record_pid=True)


def lock_one_user(
    path: Path, error: Callable[[str], Exception], *, in_use: str, advice: str, where: str
) -> int:
    """:func:`lock_file` for what one process at a time may use (a journal, a data directory),
    or ``error(message)``: held, ``"<in_use> (pid N): <advice>"``; not to be had at all,
    ``"<where>: <why>"``."""
    try:
        return lock_file(path)
    except LockHeld as exc:
        holder = f" (pid {exc.pid})" if exc.pid else ""
        raise error(f"{in_use}{holder}: {advice}") from None
    except LockUnavailable as exc:
        raise error(f"{where}: {exc}") from None


def _lock(path: Path, flags: int, *, record_pid: bool) -> int:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP and flags & _NOFOLLOW and os.path.islink(path):
            raise LockUnavailable(
                f"cannot open {path}: it is a symbolic link, and a lock file is never followed"
                " (its pid would be written over the file it names); remove it"
            ) from None
        raise LockUnavailable(failure_text(path, "open", exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd) if record_pid else None
        os.close(fd)
        raise LockHeld(path, pid) from None
    except OSError as exc:
        os.close(fd)
        raise LockUnavailable(failure_text(path, "lock", exc)) from None
    if record_pid:
        _record_holder(fd)
    return fd


def _record_holder(fd: int) -> None:
    """Write this process's pid into the lock file (best effort: e.g. on a full disk)."""
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass


def _holder(fd: int) -> int | None:
    """The pid the lock file names, or None if it names none."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isascii() and text.isdigit() else None


def failure_text(path: Path, doing: str, exc: OSError) -> str:
    """``cannot DOING PATH: REASON`` for ``exc``, met doing that to ``path``. Where access was
    denied: the path that stops this process (``path``, or the nearest directory above it that
    can be looked at), whose it is and what to do: run as its owner or chown it, or, where it is
    this user's own, check its permissions."""
    message = f"cannot {doing} {path}: {exc.strerror}"
    if exc.errno not in _DENIED:
        return message
    found = _nearest_status(Path(path))
    if found is None:
        return message
    where, status = found
    it = "it" if where == Path(path) else str(where)
    me = os.geteuid()
    if status.st_uid == me:
        return f"{message}; check the permissions of {where} (mode {status.st_mode & 0o7777:04o})"
    return (
        f"{message}; {it} belongs to {_user(status.st_uid)} and this process runs as"
        f" {_user(me)}: run this as {_user(status.st_uid)}, or chown {it} to {_user(me)}"
    )


def _nearest_status(path: Path) -> tuple[Path, os.stat_result] | None:
    """``path`` or the nearest directory above it that can be looked at, with its status."""
    for candidate in (path, *path.parents):
        try:
            return candidate, os.stat(candidate)
        except OSError:  # missing, or in a directory this user may not search
            continue
    return None


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
