"""Fleet files, session 26: one home for the flock helpers (and a clear error for a lock file of
another user), a half-copied revocation file never written over, an all-or-nothing
``fleet init`` whose ``--force`` keeps the old fleet, and ``meshinfer fleet``.

CLI tests run the commands as real subprocesses, on real files."""

from __future__ import annotations

import json
import logging
import os
import random
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from coordinator.journal_files import JournalFileError, lock_journal
from meshinfer.errors import IdentityError
from meshinfer.filelock import LockHeld, lock_directory, lock_file
from meshinfer.identity_files import (
    FleetDirectory,
    load_revocations,
    load_trust,
    replace_file,
    replace_unchanged,
)
from meshinfer.runtime.node import MeshNode
from meshinfer.runtime.revocations import RevocationSyncConfig
from meshinfer.testing.fleet import make_fleet
from tests.helpers import until
from tests.test_mesh_node import options

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
QUICK = RevocationSyncConfig(check_interval_s=0.05, ask_timeout_s=0.5)


def meshinfer(*args: object) -> subprocess.CompletedProcess[str]:
    """``meshinfer ARGS`` as a user runs it."""
    command = [sys.executable, "-m", "meshinfer.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit code 2, one line on stderr holding every fragment, no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], result.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- 1. one home for the flock helpers ---------------------------------------------------------


def test_a_lock_file_and_a_directory_lock_are_held_once_and_name_the_holder(tmp_path):
    fd = lock_file(tmp_path / "x-lock")
    try:
        with pytest.raises(LockHeld) as held:
            lock_file(tmp_path / "x-lock")
        assert held.value.pid == os.getpid()
    finally:
        os.close(fd)
    os.close(lock_file(tmp_path / "x-lock"))  # free again once closed
    fleet = FleetDirectory.init(tmp_path / "fleet", "f")
    fd = lock_directory(fleet.path)
    try:
        with pytest.raises(LockHeld):
            lock_directory(fleet.path)
        with pytest.raises(IdentityError, match="in use by another fleet command"):
            fleet.sign("n", bytes(32), frozenset({"rsu"}), now=1.0, lifetime_s=9)
    finally:
        os.close(fd)


_AS_NOBODY = """
import os, sys
from pathlib import Path
from coordinator.journal_files import JournalFileError, lock_journal
os.setgid(65534)
os.setuid(65534)
try:
    lock_journal(Path(sys.argv[1]))
except JournalFileError as exc:
    print(exc)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file of another user")
def test_a_journal_lock_file_of_another_user_names_the_owner_and_what_to_do():
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:  # pytest's tmp_path is root's only
        os.chmod(shared, 0o777)
        _lock_file_of_root_opened_by_nobody(Path(shared) / "journal.db")


def _lock_file_of_root_opened_by_nobody(journal: Path) -> None:
    os.close(lock_journal(journal))  # a coordinator once run as root left its lock file
    command = [sys.executable, "-c", _AS_NOBODY, str(journal)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    said = result.stdout.strip()
    assert f"{journal}-lock" in said and "Permission denied" in said, said
    assert "belongs to user root (uid 0)" in said and "chown" in said, said
    with pytest.raises(JournalFileError, match="in use"):  # root's own lock still works
        fd = lock_journal(journal)
        try:
            lock_journal(journal)
        finally:
            os.close(fd)


# --- 2. a half-copied revocation file ----------------------------------------------------------


async def test_a_half_copied_revocation_file_is_never_written_over(tmp_path, caplog):
    fleet = make_fleet(None, ["car-a"])
    store = tmp_path / "revocations.bin"
    opts = options(mdns=None, revocations_file=store, revocations=QUICK)
    node = MeshNode(fleet.identities["car-a"], fleet.revocations, opts, rng=random.Random(1))
    await node.start()
    try:
        sync = node.revocation_sync
        fleet.revoke("gone-1")
        replace_file(store, fleet.revocations.to_bytes())
        await until(lambda: sync.version == 1)
        fleet.revoke("gone-2")
        second = fleet.revocations
        fleet.revoke("gone-3")
        third = fleet.revocations.to_bytes()
        half = third[: len(third) // 2]
        with caplog.at_level(logging.WARNING, logger="meshinfer.runtime.revocations"):
            copy = os.open(store, os.O_WRONLY | os.O_TRUNC)  # the operator's cp
            try:
                os.write(copy, half)
                await until(lambda: "revocation list file not used" in caplog.text)
                assert str(store) in caplog.text
                assert await sync.merge_list(second, "a push")  # grew: it would be written
                assert sync.version == 2  # in force, and the half file left alone
                assert store.read_bytes() == half
                assert f"not written to {store}: that file does not parse" in caplog.text
                os.write(copy, third[len(half) :])
            finally:
                os.close(copy)
            await until(lambda: sync.version == 3)  # the finished copy is read and merged
        trust = node.identity.trust
        assert load_revocations(store, trust).version == 3
    finally:
        await node.aclose()


def test_a_file_changed_since_it_was_read_is_not_replaced(tmp_path):
    path = tmp_path / "list"
    path.write_bytes(b"seen")
    seen = path.read_bytes()
    path.write_bytes(b"someone else's, longer")
    assert replace_unchanged(path, b"ours", seen) is None
    assert path.read_bytes() == b"someone else's, longer"
    assert replace_unchanged(path, b"ours", path.read_bytes()) is not None
    assert path.read_bytes() == b"ours"
    assert replace_unchanged(tmp_path / "new", b"x", None) is not None  # None: no file yet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list", "new"]  # no temporaries


# --- 3. fleet init: all or nothing, and --force keeps the old fleet ----------------------------

_CUT_SHORT = """
import os, signal, sys
import meshinfer.fleet_dir as files
renames = []
real = files._rename
def rename(source, target):
    renames.append(target)
    if len(renames) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)  # a crash or power cut at this very point
    real(source, target)
files._rename = rename
from meshinfer.cli import main
sys.exit(main(sys.argv[2:]))
"""


def init_cut_short(at_rename: int, *args: object) -> None:
    """``meshinfer fleet init ARGS`` killed just before its ``at_rename``-th file move."""
    command = [sys.executable, "-c", _CUT_SHORT, str(at_rename), "fleet", "init", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == -9, result.stderr


def test_an_init_cut_short_is_an_unfinished_fleet_until_init_force_makes_it_again(tmp_path):
    fleet = tmp_path / "fleet"
    init_cut_short(3, "--dir", fleet, "--fleet-id", "f")  # authority.key and api-token named
    assert (fleet / "authority.key").exists() and not (fleet / "fleet.json").exists()
    refused(meshinfer("fleet", "show", "--dir", fleet), str(fleet), "unfinished fleet")
    sign = ("--node-id", "n", "--pubkey", "ab" * 32, "--roles", "rsu", "--out", tmp_path / "c")
    refused(meshinfer("fleet", "sign", "--dir", fleet, *sign), "unfinished fleet")
    refused(meshinfer("fleet", "init", "--dir", fleet, "--fleet-id", "f"), "unfinished", "--force")
    said = ok(meshinfer("fleet", "init", "--dir", fleet, "--fleet-id", "f", "--force"))
    (backup,) = fleet.glob("replaced-*")
    assert f"moved to {backup}" in said
    assert sorted(p.name for p in backup.iterdir()) == ["api-token", "authority.key"]
    assert not list(fleet.glob(".init-*"))  # the staged secret of the cut-short init is gone
    assert FleetDirectory(fleet).authority().trust == load_trust(fleet / "fleet.json")


def test_an_init_that_cannot_write_leaves_nothing_behind(tmp_path):
    """Every file is written before any is named: a write that fails (a full disk, here a
    100-byte file size limit that fleet.json is over) leaves no half fleet."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
        "from meshinfer.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    fleet = tmp_path / "fleet"
    command = [sys.executable, "-c", script, "fleet", "init", "--dir", str(fleet), "--fleet-id"]
    result = subprocess.run([*command, "f"], capture_output=True, text=True, env=ENV, timeout=60)
    refused(result, "fleet.json")
    assert list(fleet.iterdir()) == []
    ok(meshinfer("fleet", "init", "--dir", fleet, "--fleet-id", "f"))  # no --force needed


def test_init_force_keeps_the_old_fleet_in_a_private_backup(tmp_path):
    fleet = tmp_path / "fleet"
    ok(meshinfer("fleet", "init", "--dir", fleet, "--fleet-id", "old"))
    old = {p.name: p.read_bytes() for p in fleet.iterdir()}
    node = ("--node-dir", tmp_path / "car", "--node-id", "car-1", "--roles", "vehicle")
    ok(meshinfer("fleet", "enroll", "--dir", fleet, *node))
    old["issued.json"] = (fleet / "issued.json").read_bytes()
    said = ok(meshinfer("fleet", "init", "--dir", fleet, "--fleet-id", "new", "--force"))
    (backup,) = fleet.glob("replaced-*")
    assert f"moved to {backup}" in said and "authority key" in said
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == old
    assert mode(backup) == 0o700 and mode(backup / "authority.key") == 0o600
    assert load_trust(fleet / "fleet.json").fleet_id == "new"
    assert (fleet / "authority.key").read_bytes() != old["authority.key"]
    ok(meshinfer("fleet", "init", "--dir", fleet, "--fleet-id", "newer", "--force"))
    assert len(list(fleet.glob("replaced-*"))) == 2  # a second backup, the first kept


def test_an_init_force_cut_short_keeps_every_old_file(tmp_path):
    fleet = tmp_path / "fleet"
    ok(meshinfer("fleet", "init", "--dir", fleet, "--fleet-id", "old"))
    old = {p.name: p.read_bytes() for p in fleet.iterdir()}
    init_cut_short(2, "--dir", fleet, "--fleet-id", "new", "--force")  # fleet.json set aside
    (backup,) = fleet.glob("replaced-*")
    kept = {p.name: p.read_bytes() for p in [*backup.iterdir(), *fleet.iterdir()] if p.is_file()}
    assert kept == old  # split between the two places, none lost or half-written
    line = refused(meshinfer("fleet", "show", "--dir", fleet), "unfinished fleet")
    assert backup.name in line  # where the old fleet's fleet.json went


# --- 4. meshinfer fleet ------------------------------------------------------------------------


def test_meshinfer_fleet_is_the_fleet_command(tmp_path):
    assert "fleet" in ok(meshinfer("--help"))
    helped = ok(meshinfer("fleet", "--help"))
    assert all(name in helped for name in ("init", "sign", "enroll", "revoke", "show"))
    assert "replaced-" in ok(meshinfer("fleet", "init", "--help"))
    fleet, car = tmp_path / "fleet", tmp_path / "car"
    ok(meshinfer("fleet", "init", "--dir", fleet, "--fleet-id", "umbrella"))
    ok(meshinfer("fleet", "enroll", "--dir", fleet, "--node-dir", car, "--node-id", "car-1",
                 "--roles", "vehicle"))  # fmt: skip
    ok(meshinfer("fleet", "revoke", "--dir", fleet, "--node-id", "car-1", "--reason", "lost"))
    report = json.loads(ok(meshinfer("fleet", "show", "--dir", fleet, "--json")))
    assert report["fleet_id"] == "umbrella" and report["revocation_version"] == 1
    assert [c["status"] for c in report["certificates"]] == ["revoked"]
    coord = [sys.executable, "-m", "coordinator.cli", "fleet", "show", "--dir", str(fleet)]
    same = subprocess.run(coord, capture_output=True, text=True, env=ENV, timeout=60)
    assert same.stdout == ok(meshinfer("fleet", "show", "--dir", fleet))  # one implementation


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((), "required"),
        (("fleet",), "required"),
        (("fleet", "init", "--dir", "x"), "--fleet-id"),
        (("fleet", "revoke", "--dir", "{fleet}", "--node-id", "nobody"), "no certificate"),
        (("fleet", "show", "--dir", "{tmp}/missing"), "not found"),
        (("demo", "--nodes", "x"), "invalid int"),
    ],
)
def test_meshinfer_usage_errors_exit_2_with_one_line(tmp_path, args, fragment):
    fleet = tmp_path / "fleet"
    FleetDirectory.init(fleet, "f")
    filled = [a.format(fleet=fleet, tmp=tmp_path) for a in args]
    refused(meshinfer(*filled), fragment)


# --- more faults: a second machine under a node id in use ---------------------------------------


def test_a_node_id_in_use_for_another_key_is_refused_unless_the_node_moves_to_a_new_key(
    tmp_path,
):
    fleet = tmp_path / "fleet"
    ok(meshinfer("fleet", "init", "--dir", fleet, "--fleet-id", "f"))
    enroll = ("fleet", "enroll", "--dir", fleet, "--node-id", "car-1", "--roles", "vehicle")
    ok(meshinfer(*enroll, "--node-dir", tmp_path / "first"))
    refused(
        meshinfer(*enroll, "--node-dir", tmp_path / "second"), "'car-1'", "serial 1", "--new-key"
    )
    assert not (tmp_path / "second").exists()  # no key made for a taken id
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "car-1", "--roles", "vehicle")
    refused(meshinfer(*sign, "--pubkey", "ab" * 32, "--out", tmp_path / "c"), "serial 1")
    ok(meshinfer(*enroll, "--node-dir", tmp_path / "first", "--force"))  # same key: renewal
    ok(meshinfer(*enroll, "--node-dir", tmp_path / "second", "--new-key"))  # a new key, on purpose
    ok(meshinfer("fleet", "revoke", "--dir", fleet, "--serial", 1))
    ok(meshinfer("fleet", "revoke", "--dir", fleet, "--serial", 2))
    ok(meshinfer(*sign, "--pubkey", "cd" * 32, "--out", tmp_path / "d", "--new-key"))
    report = json.loads(ok(meshinfer("fleet", "show", "--dir", fleet, "--json")))
    assert [c["status"] for c in report["certificates"]] == ["revoked", "revoked", "valid", "valid"]
