"""A daemon's data directory and the runtime file it records itself in.

Both daemons (``meshinfer-node run``, ``meshinfer-coord serve``) keep one: ``data_dir`` in their
config, or, left empty, a fresh temporary directory that is removed when the daemon closes
(nothing could find it again). Once ready, a daemon records where it can be reached in
``<data_dir>/runtime.json`` (the CLIs' ``--data-dir`` reads it): written whole or not at all
(a reader never sees half a file), and removed when the daemon closes if it is still this
process's, so a stopped daemon is not taken for a running one. A daemon that could not remove
it (SIGKILLed, the OOM killer, a power cut) leaves it behind: :func:`stale_pid` tells such a
file from a running daemon's by the ``pid`` it records and, on Linux, that process's start time
(``pid_started``, :func:`process_started`): a pid reused by another process is told exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from meshinfer.errors import ConfigError
from meshinfer.filelock import failure_text, lock_one_user

log = logging.getLogger(__name__)

RUNTIME_FILE = "runtime.json"


class DataDir:
    """``configured`` (empty: a temporary directory named ``temp_prefix...``); ``key`` names
    the setting in errors, e.g. ``"[node] data_dir"``. With ``lock`` (a file name, e.g.
    ``"node.lock"``), :meth:`make` takes that lock file's exclusive lock in a configured
    directory, held until :meth:`close` (the kernel drops it when the process dies): a second
    daemon on the same directory is refused at start instead of replacing the first's runtime
    file, which the one stopped first then removed while the other still ran."""

    def __init__(self, configured: str, key: str, temp_prefix: str, lock: str = "") -> None:
        self.key = key
        self.temporary = not configured
        self.path = Path(configured) if configured else self._make_temporary(temp_prefix)
        self.lock = lock
        self._lock_fd: int | None = None
        self._wrote = False  # the runtime file is this one's to remove

    def _make_temporary(self, prefix: str) -> Path:
        """A fresh temporary directory; none to be had (TMPDIR missing, full or read-only) is a
        ConfigError naming the key, as the daemon cannot run without one."""
        try:
            return Path(tempfile.mkdtemp(prefix=prefix))
        except OSError as exc:
            why = failure_text(Path(tempfile.gettempdir()), "create a directory in", exc)
            raise ConfigError(f"{self.key} (empty: a temporary directory): {why}") from None

    @property
    def runtime_file(self) -> Path:
        return self.path / RUNTIME_FILE

    def make(self) -> None:
        """Create the directory (and its parents); one that cannot be is a ConfigError
        naming the key and the path."""
        where = f"{self.key} {self.path}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file, a link to one, or a link to nothing is in the way
            raise ConfigError(f"{where}: {_in_the_way(self.path)}") from None
        except OSError as exc:  # where access is denied: by whom, and what to do
            raise ConfigError(f"{self.key}: {failure_text(self.path, 'create', exc)}") from None
        if self.lock and not self.temporary and self._lock_fd is None:
            self._lock_fd = self._take_lock(where)

    def _take_lock(self, where: str) -> int:
        advice = "one data_dir serves one daemon (stop that one, or give this one another data_dir)"
        return lock_one_user(
            self.path / self.lock, ConfigError, in_use=f"{where}: in use by another daemon",
            advice=advice, where=self.key,
        )  # fmt: skip

    def write_runtime(self, facts: dict[str, Any]) -> None:
        """Record ``facts`` (which must hold this process's ``pid``) in the runtime file, with
        the process's start time as ``pid_started`` where it is known (Linux)."""
        pid = facts.get("pid")
        started = process_started(pid) if isinstance(pid, int) else None
        if started is not None:
            facts = {**facts, "pid_started": started}
        partial = self.path / f".{RUNTIME_FILE}.{os.getpid()}"
        try:
            partial.write_text(json.dumps(facts))
            os.replace(partial, self.runtime_file)
        except OSError as exc:  # a full disk, a read-only mount, a directory in the way
            with contextlib.suppress(OSError):
                partial.unlink()
            why = failure_text(self.runtime_file, "write", exc)
            raise ConfigError(f"{self.key}: {why}") from None
        self._wrote = True

    def close(self) -> None:
        """Remove the runtime file if this process wrote it, and a temporary directory whole.
        Errors are logged, not raised: this runs on the way out."""
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)
            if self.path.exists():
                log.warning("cannot remove the temporary %s %s", self.key, self.path)
            return
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            if self._wrote and json.loads(self.runtime_file.read_text()).get("pid") == os.getpid():
                self.runtime_file.unlink()  # (else not there, or another daemon's since)
        self._wrote = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes last: no other daemon saw a file of ours
            self._lock_fd = None


def _in_the_way(path: Path) -> str:
    """What keeps ``path`` from being made a directory (``mkdir`` found something there): the
    first of it and its parents that is a symbolic link pointing nowhere, or not a directory."""
    for part in (*reversed(path.parents), path):
        if part.is_symlink() and not part.exists():  # (a link in a loop included)
            with contextlib.suppress(OSError):
                target = os.readlink(part)
                return f"{part} is a symbolic link to {target}, which points nowhere"
        elif part.exists() and not part.is_dir():
            return "exists and is not a directory" if part == path else f"{part} is not a directory"
    return "exists and is not a directory"


def read_runtime(data_dir: str | Path, daemon: str = "daemon") -> dict[str, Any]:
    """The facts the daemon on ``data_dir`` recorded in its runtime file (as
    :meth:`DataDir.write_runtime` wrote them), checked to be a running daemon's. Each fault is a
    ConfigError naming the file, ``daemon`` the word it uses (``"coordinator"``): none there or
    unreadable ("no running daemon recorded there (why)"), not a JSON document, not a JSON
    object, or left by a daemon that is gone ("no daemon running (stale runtime file from pid
    N; ...)", :func:`stale_pid`). What each key must hold is the caller's to check."""
    path = Path(data_dir) / RUNTIME_FILE
    try:
        text = path.read_bytes()
    except OSError as exc:
        why = exc.strerror or exc
        raise ConfigError(f"{path}: no running {daemon} recorded there ({why})") from None
    try:
        facts = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError; nested too deep)
        raise ConfigError(f"{path}: not a JSON document") from None
    if not isinstance(facts, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(facts).__name__}")
    if (pid := stale_pid(path, facts)) is not None:  # SIGKILLed: it could not remove the file
        raise ConfigError(
            f"{path}: no {daemon} running (stale runtime file from pid {pid}; a {daemon}"
            " started on this data_dir replaces it once ready)"
        )
    return facts


def process_started(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (field 22, ``starttime``, of
    ``/proc/<pid>/stat``): with the pid, it names one process for as long as the machine runs.
    None where there is no such process, or no ``/proc`` (not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            text = file.read()
    except (OSError, ValueError):
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so the fields are
    # counted from the last ")"; state is field 3, starttime field 22
    try:
        return int(text[text.rindex(b")") + 1 :].split()[22 - 3])
    except (ValueError, IndexError):
        return None


def stale_pid(runtime_file: Path, facts: dict[str, Any]) -> int | None:
    """The ``pid`` recorded in ``runtime_file`` (its ``facts``) if that daemon is gone: no such
    process, a zombie, or another process now (the pid was reused): one whose start time is not
    the recorded ``pid_started`` or, where that is not recorded (an older daemon's file) or
    cannot be read here (no ``/proc``), one started after the file was written. None while it
    may still run, or when no pid is recorded (nothing to tell by)."""
    import psutil  # here: the command lines import this module and start fast

    pid = facts.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return pid
        started = process.create_time()
    except psutil.NoSuchProcess:  # (a ZombieProcess too, where one is refused)
        return pid
    except psutil.Error:  # e.g. not allowed to look: it exists
        return None
    recorded = facts.get("pid_started")
    if type(recorded) is int and (now := process_started(pid)) is not None:
        return None if now == recorded else pid
    try:
        written = runtime_file.stat().st_mtime
    except OSError:
        return None
    # a daemon writes its file once ready, after it started (1 s: create_time is coarse)
    return pid if started > written + 1.0 else None
