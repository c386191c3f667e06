"""Fleet files, session 38: a secret file's mode is judged on the file read (the old second
look at the path passed a private file swapped in after an exposed one was read); ``enroll``
takes the trust anchor and revocation list it copies under the lock it signs under (read
before, an ``init --force`` in between left the node with the old anchor beside the new
fleet's certificate); ``sign --out`` never writes over a file holding a key, even with
``--force`` (``--pubkey``'s own ``node.pub``, a ``node.key``); a ``--pubkey`` too long for a
file name, or a ``--serial`` of thousands of digits, is a one-line error, not a traceback.

Real files on disk; the CLI runs in process (``meshinfer-coord``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from meshinfer.errors import ConfigError, IdentityError
from meshinfer.filelock import LockUnavailable, lock_file
from meshinfer.identity_files import (
    FleetDirectory,
    NodeDirectory,
    enroll,
    init_fleet,
)
from meshinfer.runtime.data_dir import DataDir
from tests.test_fleet_fixes34 import KEY, NOW, VEHICLE, fleet, refused, run

__all__ = ["fleet"]  # (a fixture, imported to be used)


# --- secret files: the mode of the file read ---------------------------------------------------


class _SwapOnLook(type(Path())):  # type: ignore[misc]
    """A path whose secret file is swapped for a private copy when it is looked at by name
    (what an operator's ``cp`` + ``chmod 600`` + ``mv`` does between a read and a second look)."""

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        if self.name in ("node.key", "authority.key", "api-token") and (
            os.stat(self).st_mode & 0o077
        ):
            copy = self.with_name(self.name + ".copy")
            copy.write_bytes(Path(self).read_bytes())
            copy.chmod(0o600)
            os.replace(copy, self)
        return super().stat(follow_symlinks=follow_symlinks)


def test_a_node_key_read_while_exposed_is_refused_though_a_private_one_replaced_it(
    fleet: Path, tmp_path: Path
) -> None:
    # was taken: the key was read from a file others could read, and the mode looked at after,
    # by name, on the private copy swapped in meanwhile
    node = NodeDirectory(tmp_path / "n1")
    enroll(FleetDirectory(fleet), node, "n1", VEHICLE, now=NOW, lifetime_s=3600.0)
    node.node_key.chmod(0o644)
    with pytest.raises(IdentityError, match=r"node key .*node\.key is readable by others"):
        NodeDirectory(_SwapOnLook(node.path)).static_private()


@pytest.mark.parametrize("which", ["authority", "api_token"])
def test_a_fleet_secret_read_while_exposed_is_refused_though_a_private_one_replaced_it(
    fleet: Path, which: str
) -> None:
    target = FleetDirectory(fleet)
    (target.authority_key if which == "authority" else target.api_token_file).chmod(0o640)
    with pytest.raises(IdentityError, match="readable by others"):
        getattr(FleetDirectory(_SwapOnLook(fleet)), which)()


def test_a_private_node_key_is_still_taken(fleet: Path, tmp_path: Path) -> None:
    node = NodeDirectory(tmp_path / "n1")
    identity = enroll(FleetDirectory(fleet), node, "n1", VEHICLE, now=NOW, lifetime_s=3600.0)
    assert NodeDirectory(_SwapOnLook(node.path)).load().certificate == identity.certificate


# --- enroll: the copies are read under the lock ------------------------------------------------


class _ReplacedBeforeTheLock(FleetDirectory):
    """A fleet directory that another operator's ``fleet init --force`` replaces just before
    this process takes its lock (the other command held it until then)."""

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        init_fleet(self.path, "f1", force=True, now=NOW)
        with super()._exclusive():
            yield


def test_enroll_copies_the_trust_anchor_it_signed_under(fleet: Path, tmp_path: Path) -> None:
    # was: node.fleet.json held the old fleet's anchor beside the new fleet's certificate; the
    # node refused to load (a serial issued for nothing), or with --force kept a stale anchor
    node = NodeDirectory(tmp_path / "n1")
    identity = enroll(
        _ReplacedBeforeTheLock(fleet), node, "n1", VEHICLE, now=NOW, lifetime_s=3600.0
    )
    now_fleet = FleetDirectory(fleet)
    assert node.fleet_json.read_bytes() == now_fleet.fleet_json.read_bytes()
    assert node.revocations_bin.read_bytes() == now_fleet.revocations_bin.read_bytes()
    assert identity.trust == now_fleet.trust()
    assert [c.serial for c in now_fleet.issued()] == [identity.certificate.serial]


def test_enroll_copies_a_revocation_made_before_the_lock(fleet: Path, tmp_path: Path) -> None:
    first = NodeDirectory(tmp_path / "n1")
    enroll(FleetDirectory(fleet), first, "n1", VEHICLE, now=NOW, lifetime_s=3600.0)

    class RevokedBeforeTheLock(FleetDirectory):
        @contextmanager
        def _exclusive(self) -> Iterator[None]:
            if not FleetDirectory(self.path).revocations().records():
                FleetDirectory(self.path).revoke(now=NOW, node_id="n1", reason="stolen")
            with super()._exclusive():
                yield

    node = NodeDirectory(tmp_path / "n2")
    enroll(RevokedBeforeTheLock(fleet), node, "n2", VEHICLE, now=NOW, lifetime_s=3600.0)
    assert node.revocations_bin.read_bytes() == FleetDirectory(fleet).revocations_bin.read_bytes()
    assert len(node.revocations(node.load().trust).records()) == 1


# --- sign --out over a key file ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["node.pub", "node.key"])
def test_sign_out_never_replaces_a_key_file_even_with_force(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # was: `--pubkey n1/node.pub --out n1/node.pub --force` wrote the certificate over the key
    # it certified (the node then refused to start: node.pub did not match), and --out
    # n1/node.key --force lost the node's private key for good
    node = NodeDirectory(tmp_path / "n1")
    node.keygen()
    before = {p.name: p.read_bytes() for p in (node.node_key, node.node_pub)}
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "n1", "--pubkey", node.node_pub)
    result = run(capsys, *sign, "--roles", "vehicle", "--out", node.path / name, "--force")
    refused(result, f"--out {node.path / name} holds a key", "even with --force")
    assert {p.name: p.read_bytes() for p in (node.node_key, node.node_pub)} == before
    assert FleetDirectory(fleet).issued() == []  # no serial issued for it
    node.static_private()


def test_sign_out_force_still_replaces_an_old_certificate(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "n1.cert"
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "n1", "--pubkey", KEY)
    assert run(capsys, *sign, "--roles", "vehicle", "--out", out)[0] == 0
    first = out.read_bytes()
    assert run(capsys, *sign, "--roles", "vehicle", "--out", out, "--force")[0] == 0
    assert out.read_bytes() != first


# --- hostile arguments -------------------------------------------------------------------------


def test_a_pubkey_too_long_for_a_file_name_is_one_line(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # was a traceback: Path.exists raised OSError (name too long) inside argparse's type check
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "n1", "--pubkey", "ab" * 2500)
    result = run(capsys, *sign, "--roles", "vehicle", "--out", tmp_path / "n1.cert")
    refused(result, "--pubkey", "5000 hex digits, not 64")


def test_a_serial_of_thousands_of_digits_is_refused_without_echoing_them(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # was "invalid serial value: '999...'" with all 5,000 digits (int() refuses over 4,300)
    result = run(capsys, "fleet", "revoke", "--dir", fleet, "--serial", "9" * 5000)
    line = refused(result, "serial must be a non-negative integer")
    assert len(line) < 300


# --- a lock file is never followed -------------------------------------------------------------


def test_a_symlink_at_a_lock_file_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    # was followed: the pid written into the "lock file" truncated the file it named
    target = tmp_path / "precious.json"
    target.write_text('{"keep": true}\n')
    (tmp_path / "lock").symlink_to(target)
    with pytest.raises(LockUnavailable, match=r"symbolic link.*remove it"):
        lock_file(tmp_path / "lock")
    assert target.read_text() == '{"keep": true}\n'


def test_a_data_dir_whose_lock_is_a_symlink_is_a_config_error(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep\n")
    data = DataDir(str(tmp_path / "data"), "data_dir", "unused-", lock="node.lock")
    data.path.mkdir()
    (data.path / "node.lock").symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        data.make()
    assert target.read_text() == "keep\n"
