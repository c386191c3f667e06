"""Files written whole or not at all, and read with a size cap.

A file is written to a temporary file beside it (created with ``os.open(O_CREAT | O_EXCL,
mode)``, so a secret file is never readable by others, not even briefly), flushed to disk, and
only then given its name: hard-linked to a name that must not exist yet (:func:`write_new_file`),
or renamed over the old file (:func:`replace_file`; :func:`replace_unchanged` only while the old
file still holds what the caller last read), and the directory flushed. So a crash never leaves a
half-written file, and an existing file (or symlink) is never followed or clobbered unless asked.

:class:`FileStamp` tells whether a file may have changed since it was last read without
reading it again, once the same stamp has been seen for :data:`STAMP_SETTLE_NS` (by the
watcher's own monotonic clock, which no offset from the file system's clock can fool, as
:mod:`meshinfer.runtime.revocations` does). :func:`read_limited` reads a regular file with a
size cap, raising the caller's error (:func:`read_file`: IdentityError); the checks below it
refuse to overwrite, to write where a directory is, or to use a secret file others can read.

Every other failure raises :class:`~meshinfer.errors.IdentityError` naming the file (these
helpers were written for the key and certificate files of :mod:`meshinfer.identity_files`, and
other file readers rely on that error).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import NamedTuple

from meshinfer.errors import IdentityError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
MAX_FILE_BYTES = 64 * 1024 * 1024  # read_file's default cap: a fleet's certificate index fits


def write_new_file(path: Path, data: bytes, *, mode: int, force: bool = False) -> os.stat_result:
    """Create ``path`` with ``mode`` holding ``data``; refuse to overwrite unless ``force``.
    Returns the new file's status as written.

    The data goes to a temporary file in the same directory first, flushed to disk, and only
    then appears under ``path`` (hard-linked, or renamed over it with ``force``): a crash never
    leaves a half-written file, and an existing file (or symlink) is never followed or clobbered.
    """
    if path.is_dir() and not path.is_symlink():
        raise IdentityError(f"cannot write {path}: it is a directory")
    temporary, written = _write_temporary(path, data, mode)
    with _naming(path, temporary):
        if force:
            os.replace(temporary, path)
        else:
            _link_new(temporary, path, mode)
    sync_directory(path.parent)
    return written


def replace_file(path: Path, data: bytes, *, mode: int = PUBLIC_MODE) -> os.stat_result:
    """Atomically replace ``path`` with ``data`` (write a temporary file, then rename); returns
    the new file's status as written (a later change to ``path`` shows in its mtime/size)."""
    return write_new_file(path, data, mode=mode, force=True)


class FileStamp(NamedTuple):
    """What a stat tells of a file: where it is (device, inode) and when and how it last
    changed. Equal stamps are not proof of equal contents: a change within the file system's
    time granularity, at the same size and in place, keeps them (see :data:`STAMP_SETTLE_NS`)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int  # set by every write, rename and utime: nobody can set it back


#: a stamp whose times are this recent (by our clock) may yet hide a change: file systems keep
#: times at up to 2 s granularity (FAT), and a network file system's clock may run a little late.
#: (:mod:`meshinfer.runtime.revocations` instead watches a stamp this long by its own monotonic
#: clock, which no offset between the two clocks can fool.)
STAMP_SETTLE_NS = 5_000_000_000


def file_stamp(path: Path) -> FileStamp | None:
    """``path``'s :class:`FileStamp`, which every write changes unless made within the time
    granularity of the last; None if there is no file."""
    try:
        st = path.stat()
    except OSError:
        return None
    return FileStamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def replace_unchanged(
    path: Path, data: bytes, expected: bytes | None, *, mode: int = PUBLIC_MODE
) -> os.stat_result | None:
    """:func:`replace_file`, unless ``path`` no longer holds exactly ``expected`` (None: no
    file) once the new contents are on disk: then ``path`` is left as it is and None returned.
    So a file someone is writing meanwhile (an operator's copy) is not renamed over, which
    would send the rest of their writes to a file nobody can read. The contents are compared,
    not a stamp: a change within the file system's time granularity keeps mtime and size."""

    temporary, written = _write_temporary(path, data, mode)
    with _naming(path, temporary):
        if _current_bytes(path, expected) != expected:
            return None
        os.replace(temporary, path)
    sync_directory(path.parent)
    return written


def _current_bytes(path: Path, expected: bytes | None) -> bytes | None:
    """``path``'s bytes, read up to one past ``expected``'s length (enough to tell them
    apart); None if there is no file. A directory or unreadable file raises OSError."""
    try:  # (never blocks: a FIFO swapped in raises NotRegularFileError, an OSError)
        return read_regular(path, len(expected or b""))
    except FileNotFoundError:
        return None


def _write_temporary(path: Path, data: bytes, mode: int) -> tuple[Path, os.stat_result]:
    """A new temporary file beside ``path`` (created with ``mode``) holding ``data``, flushed
    to disk, and its status as written. Every failure is an :class:`IdentityError` naming
    ``path``, and leaves no temporary file; on success the caller removes it (:func:`_naming`)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
    try:
        fd = os.open(temporary, flags, mode)
    except OSError as exc:
        raise IdentityError(f"cannot create {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
            return temporary, os.fstat(file.fileno())
    except OSError as exc:
        _remove_quietly(temporary)
        raise IdentityError(f"cannot write {path}: {exc.strerror}") from None


@contextmanager
def _naming(path: Path, temporary: Path) -> Iterator[None]:
    """Around giving the finished ``temporary`` the name ``path``: an ``OSError`` is an
    :class:`IdentityError` naming ``path``, and ``temporary`` never outlives the block (once
    named, the name that is left is only a second link to the file, or none)."""
    try:
        yield
    except OSError as exc:
        raise IdentityError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        _remove_quietly(temporary)


def _link_new(temporary: Path, path: Path, mode: int) -> None:
    """Give the finished ``temporary`` the name ``path`` unless that name exists (even as a
    dangling symlink). Where the file system has no hard links, the name is reserved by
    creating an empty placeholder exclusively, then the temporary file is renamed over it; if
    that rename fails, the placeholder is removed (so a retry is not told the file exists), but
    only while the name still holds our placeholder, not a file someone put there meanwhile."""
    try:
        try:
            os.link(temporary, path)
            return
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
        placeholder = _create_empty(path, mode)
    except FileExistsError:
        raise IdentityError(
            f"{path} already exists; refusing to overwrite it (use --force)"
        ) from None
    try:
        os.replace(temporary, path)
    except OSError:
        _remove_if_same(path, placeholder)
        raise


def _create_empty(path: Path, mode: int) -> os.stat_result:
    """Create the empty file ``path`` (``FileExistsError`` if the name exists); its status."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _remove_if_same(path: Path, created: os.stat_result) -> None:
    """Remove ``path`` if it is still the file ``created`` describes (same device, inode and
    change time, still empty); leave anything else there. Best effort: a file renamed over
    ``path`` between the check and the unlink is removed. POSIX has no unlink-if-same, and
    moving the file to a private name first does not close the window: putting back a file
    that was not ours either clobbers one made at ``path`` meanwhile (rename) or needs a hard
    link, which this path runs for want of (:func:`_link_new`); and the other writer's file
    would be missing from ``path`` while it is aside."""
    try:
        now = os.lstat(path)
    except OSError:
        return
    if _identity(now) == _identity(created) and now.st_size == 0:
        _remove_quietly(path)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """Which file a status is of: a file made later in a freed inode has a later ctime."""
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def sync_directory(directory: Path) -> None:
    """Flush a directory's entries to disk (best effort: not every file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class NotRegularFileError(OSError):
    """A FIFO, socket or device where a regular file was to be read (:func:`read_regular`)."""


def read_regular(
    path: Path, limit: int | None = None, *, check: Callable[[os.stat_result], None] | None = None
) -> bytes:
    """The bytes of the regular file ``path``: all of them, or at most ``limit + 1`` (so that a
    caller can tell a file over ``limit``). Opened without blocking and judged by the opened
    file's own status: a FIFO put there (or swapped in after a look) made a plain open wait for
    a writer for good, and a device (/dev/zero) can be read for ever. Raises ``OSError``:
    ``IsADirectoryError`` for a directory, :class:`NotRegularFileError` for anything else that
    is not a regular file. ``check`` is given that status before anything is read (whatever it
    raises goes to the caller): the file read is the file checked."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        mode = status.st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
        if check is not None:
            check(status)
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read() if limit is None else file.read(limit + 1)
    finally:
        os.close(fd)


def read_limited(
    path: Path,
    what: str,
    *,
    limit: int | None,
    error: Callable[[str], Exception],
    check: Callable[[os.stat_result], None] | None = None,
) -> bytes:
    """The bytes of the regular file ``path`` (:func:`read_regular`, given ``check``), at most
    ``limit`` of them (None: no limit). A missing or unreadable file, a directory, a FIFO,
    socket or device, and a file over ``limit`` each raise ``error(message)``, the message
    naming ``what`` and ``path``: the one reader behind every configuration, key, token and
    input file read."""
    try:
        data = read_regular(path, limit, check=check)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a file") from None
    except NotRegularFileError:
        raise error(f"{what} {path} is a FIFO, socket or device, not a regular file") from None
    except (OSError, ValueError) as exc:  # (ValueError: a NUL in the path)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise error(f"cannot read {what} {path}: {reason}") from None
    if limit is not None and len(data) > limit:
        raise error(f"{what} {path} is over the {limit}-byte limit")
    return data


def read_file(
    path: Path, what: str, *, limit: int = MAX_FILE_BYTES, private: bool = False
) -> bytes:
    """:func:`read_limited` raising :class:`IdentityError` (a FIFO there held the node's
    revocation watch, its file lock and its exit). ``private``: a secret file, refused as
    :func:`require_private` does if group or others may read it, judged by the status of the
    file opened (a second look at the path, as before, passed a private file swapped in after
    an exposed one was read)."""
    check = partial(_refuse_exposed, path, what) if private else None
    return read_limited(path, what, limit=limit, error=IdentityError, check=check)


# --- checks before reading or writing ----------------------------------------------------------


def require_private(path: Path, what: str) -> None:
    """:class:`IdentityError` if group or others may read the secret file ``path`` (to read
    one, :func:`read_file` with ``private=True`` checks the very file it reads)."""
    _refuse_exposed(path, what, path.stat())


def _refuse_exposed(path: Path, what: str, status: os.stat_result) -> None:
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        raise IdentityError(f"{what} {path} is readable by others (mode {mode:04o}); chmod 600 it")


def refuse_existing(paths: list[Path], force: bool) -> None:
    """:class:`IdentityError` naming those of ``paths`` that exist (even as a dangling
    symlink), unless ``force``."""
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        raise IdentityError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
            "refusing to overwrite (use --force)"
        )


def refuse_directories(paths: list[Path]) -> None:
    """:class:`IdentityError` naming those of ``paths`` that are directories."""
    directories = [str(p) for p in paths if p.is_dir() and not p.is_symlink()]
    if directories:
        raise IdentityError(f"{', '.join(directories)}: a directory where a file belongs")


def make_directory(path: Path) -> None:
    """Create ``path`` and its parents where missing; an :class:`IdentityError` if it cannot."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"cannot create directory {path}: {exc.strerror}") from None
