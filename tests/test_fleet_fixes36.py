"""Fleet files, session 36: ``fleet sign --out`` never names one of the fleet directory's own
files (``--force`` replaced the authority key with a certificate, for good); ``enroll --force``
replaces a ``node.pub`` left without its ``node.key`` instead of refusing it with "use --force";
a ``--pubkey`` of hex digits of the wrong length (or behind 0x) says so, without echoing the
paste, instead of "file not found: <the paste>"; and a ``--pubkey`` file named as a copy of a
private key (``node.key.bak``) is refused like ``node.key`` itself.

Real files on disk; the CLI runs in process (``meshinfer-coord``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshinfer.errors import IdentityError
from meshinfer.identity_files import (
    FLEET_FILES,
    FleetDirectory,
    NodeDirectory,
    enroll,
)
from tests.test_fleet_fixes34 import KEY, NOW, VEHICLE, fleet, refused, run

__all__ = ["fleet"]  # (a fixture, imported to be used)


def snapshot(fleet: Path) -> dict[str, bytes]:
    return {name: (fleet / name).read_bytes() for name in FLEET_FILES}


# --- sign --out into the fleet directory -------------------------------------------------------


@pytest.mark.parametrize("name", FLEET_FILES)
def test_sign_out_never_replaces_one_of_the_fleets_own_files(
    fleet: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # was: --out FLEET/authority.key --force wrote the certificate over the authority key (the
    # fleet could never sign again), or rewrote the index or revocation list outside the lock
    before = snapshot(fleet)
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "n1", "--pubkey", KEY)
    result = run(capsys, *sign, "--roles", "vehicle", "--out", fleet / name, "--force")
    refused(result, f"{fleet / name}", "fleet directory's own")
    assert snapshot(fleet) == before  # nothing replaced, and no serial issued
    FleetDirectory(fleet).authority()


def test_sign_out_into_the_fleet_directory_by_another_name_is_refused_too(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(fleet)
    before = snapshot(fleet)
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "n1", "--pubkey", KEY)
    result = run(capsys, *sign, "--roles", "vehicle", "--out", alias / "authority.key", "--force")
    refused(result, "fleet directory's own authority.key")
    assert snapshot(fleet) == before


def test_a_certificate_of_another_name_may_still_be_written_in_the_fleet_directory(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "n1", "--pubkey", KEY)
    code, out, err = run(capsys, *sign, "--roles", "vehicle", "--out", fleet / "n1.cert")
    assert code == 0, err
    assert (fleet / "n1.cert").is_file() and "serial 1" in out


# --- enroll --force and a node.pub without its node.key ----------------------------------------


def test_enroll_force_replaces_a_node_pub_left_without_its_key(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # was: "node.pub already exists; refusing to overwrite (use --force)", with --force given
    node = NodeDirectory(tmp_path / "node")
    enroll_args = ("fleet", "enroll", "--dir", fleet, "--node-dir", node.path, "--node-id", "n1")
    assert run(capsys, *enroll_args, "--roles", "vehicle")[0] == 0
    node.node_key.unlink()  # the key is lost; node.pub, node.cert and the copies are left
    code, out, err = run(capsys, *enroll_args, "--roles", "vehicle", "--force", "--new-key")
    assert code == 0, err
    assert "serial 2" in out
    identity = node.load()  # a new pair that matches, certified
    assert identity.certificate.serial == 2
    assert node.node_pub.read_text().strip() == identity.static_public.hex()
    assert os.stat(node.node_key).st_mode & 0o777 == 0o600


def test_enroll_without_force_still_refuses_a_node_pub_left_without_its_key(
    fleet: Path, tmp_path: Path
) -> None:
    node = NodeDirectory(tmp_path / "node")
    node.path.mkdir()
    node.node_pub.write_text(KEY + "\n")
    with pytest.raises(IdentityError, match="already exists; refusing to overwrite"):
        enroll(FleetDirectory(fleet), node, "n1", VEHICLE, now=NOW, lifetime_s=3600)
    assert node.node_pub.read_text() == KEY + "\n"
    assert not node.node_key.exists()
    assert FleetDirectory(fleet).issued() == []  # no serial issued for it


# --- --pubkey pasted with the wrong length ------------------------------------------------------


@pytest.mark.parametrize(
    ("pasted", "said"),
    [
        ("cd" * 31, "62 hex digits, not 64"),
        ("cd" * 32 + "e", "65 hex digits, not 64"),
        ("cd" * 64, "128 hex digits, not 64"),
        ("0x" + "cd" * 32, "behind a 0x prefix"),
    ],
    ids=["62", "65", "128", "0x"],
)
def test_a_pubkey_pasted_with_the_wrong_length_says_so_without_echoing_it(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], pasted: str, said: str
) -> None:
    # was: "file not found: <the paste>" (it may be a private key pasted by mistake)
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "n1", "--pubkey", pasted)
    line = refused(run(capsys, *sign, "--roles", "vehicle", "--out", tmp_path / "c"), said)
    assert "cdcdcdcd" not in line and "not found" not in line
    assert not (tmp_path / "c").exists()


def test_a_short_missing_file_name_that_is_hex_is_still_a_missing_file(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "n1", "--pubkey", "beef")
    refused(run(capsys, *sign, "--roles", "vehicle", "--out", tmp_path / "c"), "not found")


def test_a_file_whose_name_is_hex_digits_is_still_read(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    name = "ab" * 10  # a file named by hex digits, holding the key
    Path(name).write_text(KEY + "\n")
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "n1", "--pubkey", name)
    code, _, err = run(capsys, *sign, "--roles", "vehicle", "--out", tmp_path / "c")
    assert code == 0, err


# --- --pubkey naming a copy of a private key ---------------------------------------------------


@pytest.mark.parametrize("name", ["node.key.bak", "node.key.orig", "authority.key.old"])
def test_a_copy_of_a_private_key_is_refused_as_the_public_key(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # was: only the last suffix was looked at, so node.key.bak was certified as a public key:
    # the private key then stood in the certificate, the index and `fleet show`
    node = NodeDirectory(tmp_path / "node")
    node.keygen()
    copy = tmp_path / name
    copy.write_bytes(node.node_key.read_bytes())
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "n1", "--pubkey", copy)
    refused(run(capsys, *sign, "--roles", "vehicle", "--out", tmp_path / "c"), "private key file")
    assert FleetDirectory(fleet).issued() == []


def test_a_public_key_named_like_key_pub_is_still_taken(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    public = tmp_path / "host.key.pub"
    public.write_text(KEY + "\n")
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "n1", "--pubkey", public)
    code, _, err = run(capsys, *sign, "--roles", "vehicle", "--out", tmp_path / "c")
    assert code == 0, err
