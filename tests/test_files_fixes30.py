"""Files, session 30: a new file's placeholder does not outlive a failed final rename (where the
file system has no hard links); the fleet directory moved to :mod:`meshinfer.fleet_dir` and
still importable from :mod:`meshinfer.identity_files`; a node's revocation file watch sees a
change within the settle window even when this host's clock runs ahead of the file system's,
and names an unreadable file once, not at each look.

Real files throughout. A file system without hard links is simulated the only way one can be on
a normal one: ``os.link`` refuses with ``EPERM`` (what FAT, SMB mounts and some FUSE file
systems answer). A file system with coarse times and no change time (FAT) is simulated by the
stamp the watch takes: a real stat whose ``ctime`` is its ``mtime``, which ``os.utime`` sets."""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from pathlib import Path

import pytest

from meshinfer import atomic_files
from meshinfer.atomic_files import FileStamp, replace_file, write_new_file
from meshinfer.errors import IdentityError
from meshinfer.runtime.node import MeshNode
from meshinfer.runtime.revocations import RevocationSyncConfig
from meshinfer.testing.fleet import make_fleet
from tests.helpers import until
from tests.test_mesh_node import options

# --- 1. no hard links: the placeholder goes when the final rename fails ------------------------


@pytest.fixture
def no_hard_links(monkeypatch):
    def link(source, target, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)


def _failing_replace(monkeypatch, before=None):
    """``os.replace`` fails once (``EIO``), after running ``before(target)``."""
    real = os.replace

    def replace(source, target, *args, **kwargs):
        monkeypatch.setattr(os, "replace", real)
        if before is not None:
            before(Path(target))
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", replace)


def test_without_hard_links_a_failed_rename_leaves_no_placeholder_and_a_retry_works(
    tmp_path, no_hard_links, monkeypatch
):
    path = tmp_path / "node.key"
    _failing_replace(monkeypatch)
    with pytest.raises(IdentityError, match=r"cannot write .*node\.key: Input/output error"):
        write_new_file(path, b"secret\n", mode=0o600)
    assert list(tmp_path.iterdir()) == []  # neither placeholder nor temporary file
    write_new_file(path, b"secret\n", mode=0o600)  # was "already exists"
    assert path.read_bytes() == b"secret\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    with pytest.raises(IdentityError, match="already exists"):
        write_new_file(path, b"other\n", mode=0o600)
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


def test_without_hard_links_a_failed_rename_leaves_a_file_someone_put_there(
    tmp_path, no_hard_links, monkeypatch
):
    path = tmp_path / "fleet.json"

    def theirs(target: Path) -> None:  # someone replaced our placeholder meanwhile
        target.unlink()
        target.write_bytes(b"")  # empty, as the placeholder was: only the inode tells

    _failing_replace(monkeypatch, theirs)
    with pytest.raises(IdentityError):
        write_new_file(path, b"{}\n", mode=0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["fleet.json"]


def test_writes_still_name_replace_and_refuse_as_before(tmp_path):
    path = tmp_path / "f"
    written = write_new_file(path, b"one", mode=0o644)
    assert (written.st_size, path.read_bytes()) == (3, b"one")
    with pytest.raises(IdentityError, match="already exists"):
        write_new_file(path, b"two", mode=0o644)
    assert write_new_file(path, b"two", mode=0o644, force=True).st_size == 3
    assert replace_file(path, b"three").st_size == 5
    assert atomic_files.replace_unchanged(path, b"4", b"nope") is None
    assert atomic_files.replace_unchanged(path, b"4", b"three") is not None
    assert path.read_bytes() == b"4"
    (tmp_path / "d").mkdir()
    with pytest.raises(IdentityError, match="is a directory"):
        write_new_file(tmp_path / "d", b"x", mode=0o644, force=True)
    with pytest.raises(IdentityError, match="cannot write"):
        atomic_files.replace_unchanged(tmp_path / "d", b"x", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]  # no temporaries


# --- 2. the fleet directory in its own module, still importable from identity_files ------------


def test_the_fleet_directory_moved_and_every_old_import_still_works(tmp_path):
    from meshinfer import fleet_dir, identity_files

    for name in (
        "FleetDirectory", "init_fleet", "load_trust", "load_revocations", "read_revocations",
        "parse_revocations", "trust_to_json", "FLEET_FILES", "STAGING_PREFIX", "BACKUP_PREFIX",
        "FILE_FORMAT", "MAX_SMALL_FILE_BYTES",
    ):  # fmt: skip
        assert getattr(identity_files, name) is getattr(fleet_dir, name), name
    for name in (
        "write_new_file", "replace_file", "replace_unchanged", "read_file", "FileStamp",
        "file_stamp", "SECRET_MODE", "PUBLIC_MODE", "MAX_FILE_BYTES",
    ):  # fmt: skip
        assert getattr(identity_files, name) is getattr(atomic_files, name), name
    fleet, backup = identity_files.init_fleet(tmp_path / "fleet", "f", now=1_700_000_000.0)
    assert backup is None and isinstance(fleet, fleet_dir.FleetDirectory)
    node = identity_files.NodeDirectory(tmp_path / "node")
    roles = frozenset({"rsu"})
    me = identity_files.enroll(fleet, node, "n", roles, now=time.time(), lifetime_s=3600)
    assert me.certificate.node_id == "n" and me.trust == fleet.trust()


# --- 3. the revocation file watch --------------------------------------------------------------


def _fat_stamp(path: Path) -> FileStamp | None:
    """The stamp a file system without change times gives (FAT: its "ctime" is the creation
    time, which a write leaves alone): a real stat, with the mtime standing for both."""
    try:
        st = path.stat()
    except OSError:
        return None
    return FileStamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mtime_ns)


def _write_in_place_keeping_mtime(path: Path, data: bytes) -> None:
    """A same-size change made within the file system's granularity: same mtime as before."""
    before = path.stat()
    assert len(data) == before.st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _two_lists_of_one_size():
    fleet = make_fleet(None, ["car-a"])
    fleet.revoke("gone-1")
    first = fleet.revocations
    fleet.revoke("gone-2")
    second = fleet.revocations.since(1)
    assert len(first.to_bytes()) == len(second.to_bytes()) and first != second
    return fleet, first, second


async def _watching(fleet, first, store: Path) -> MeshNode:
    config = RevocationSyncConfig(check_interval_s=0.05, ask_timeout_s=0.5)
    opts = options(mdns=None, revocations_file=store, revocations=config)
    node = MeshNode(fleet.identities["car-a"], first, opts, rng=random.Random(1))
    await node.start()
    return node


@pytest.mark.parametrize("host_ahead_s", [3600, 6, -3600])
async def test_a_change_within_the_granularity_is_seen_whatever_the_clocks_offset(
    tmp_path, monkeypatch, host_ahead_s
):
    """The file system's clock is ``host_ahead_s`` behind this host's (set with ``os.utime``):
    a same-size change that keeps the stamp, made just after the node first read the file, was
    missed when the host ran more than 5 s ahead (the stamp looked settled at once)."""
    import meshinfer.runtime.revocations as revocations

    monkeypatch.setattr(revocations, "file_stamp", _fat_stamp)
    fleet, first, second = _two_lists_of_one_size()
    store = tmp_path / "revocations.bin"
    replace_file(store, first.to_bytes())
    fs_now = time.time_ns() - host_ahead_s * 10**9
    os.utime(store, ns=(fs_now, fs_now))
    node = await _watching(fleet, first, store)
    try:
        sync = node.revocation_sync
        checks = sync.stats.checks
        await until(lambda: sync.stats.checks >= checks + 2)  # the file has been looked at
        assert sync.version == 1
        _write_in_place_keeping_mtime(store, second.to_bytes())
        assert _fat_stamp(store) == sync._seen_file  # the stamp cannot tell
        await until(lambda: sync.version == 2, timeout=4)
    finally:
        await node.aclose()


async def test_an_unreadable_file_is_warned_about_once_per_problem(tmp_path, caplog):
    fleet, first, _ = _two_lists_of_one_size()
    store = tmp_path / "revocations.bin"
    store.mkdir()  # a directory where the list belongs: every read fails
    with caplog.at_level(logging.WARNING, logger="meshinfer.runtime.revocations"):
        node = await _watching(fleet, first, store)
        try:
            sync = node.revocation_sync
            await until(lambda: sync.stats.checks >= 6)  # read at each look: its stamp is new

            def warnings() -> list[str]:
                return [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]

            assert len(warnings()) == 1, warnings()  # was one at each look
            assert "is a directory" in warnings()[0]
            store.rmdir()
            replace_file(store, fleet.revocations.to_bytes())
            await until(lambda: sync.version == 2)
            store.unlink()
            store.mkdir()  # broken again, after a good read: said again
            await until(lambda: len(warnings()) == 2)
            checks = sync.stats.checks
            await until(lambda: sync.stats.checks >= checks + 4)
            assert len(warnings()) == 2
        finally:
            await node.aclose()
