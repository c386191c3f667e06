"""Fleet files, session 33: a fleet command that a ``fleet init --force`` overtook signs nothing
with the replaced authority, a certificate or node directory that cannot be written issues no
serial, a node is not enrolled into the fleet directory itself, a symlink to a private key is not
certified as a public key, and a trust file or index missing a field says which.

Real files on disk; the CLI runs in process (``meshinfer-coord``)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import meshinfer.fleet_dir as fleet_dir
from coordinator.cli import main as coord_main
from meshinfer.errors import IdentityError
from meshinfer.identity_files import FleetDirectory, NodeDirectory, enroll, init_fleet

NOW = 1_700_000_000.0
DAY = 86_400.0
NODE_KEY = bytes([9]) + bytes(31)  # a Noise static key (X25519 base point: not of small order)
KEY = "ab" * 32
VEHICLE = frozenset({"vehicle"})
#: a directory nobody may create files in, not even root
UNWRITABLE = Path("/proc")


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = coord_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(result: tuple[int, str, str], *fragments: str) -> str:
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    path = tmp_path / "fleet"
    init_fleet(path, "f1", now=NOW)
    return path


def serials(path: Path) -> list[int]:
    return [c.serial for c in FleetDirectory(path).issued()]


def overtaken_by_init_force(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Make the next fleet command's wait for the directory lock end after another operator's
    ``fleet init --force`` (same fleet id) replaced the fleet: the interleaving of two commands
    where the second one ran between the first's reading of the authority and its lock."""
    real_lock = fleet_dir._lock_directory
    pending = [True]

    def lock_after_init(directory: Path) -> int:
        if pending:
            pending.clear()
            init_fleet(path, "f1", force=True, now=NOW + 1)
            # and certified a node in the new fleet (takes the lock itself)
            FleetDirectory(path).sign("car-1", NODE_KEY, VEHICLE, now=NOW, lifetime_s=DAY)
        return real_lock(directory)

    monkeypatch.setattr(fleet_dir, "_lock_directory", lock_after_init)


# --- a command overtaken by init --force -------------------------------------------------------


def test_a_revoke_overtaken_by_init_force_leaves_a_readable_revocation_list(
    fleet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = FleetDirectory(fleet)
    directory.sign("car-1", NODE_KEY, VEHICLE, now=NOW, lifetime_s=DAY)
    overtaken_by_init_force(monkeypatch, fleet)
    entry = directory.revoke(now=NOW, serial=1)  # serial 1 of the new fleet
    entry.verify(directory.trust())
    assert directory.revocations().version == 1  # the list still verifies against fleet.json


def test_a_sign_overtaken_by_init_force_signs_with_the_new_authority(
    fleet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = FleetDirectory(fleet)
    overtaken_by_init_force(monkeypatch, fleet)
    cert = directory.sign("car-1", NODE_KEY, VEHICLE, now=NOW, lifetime_s=DAY)
    cert.verify(directory.trust())  # the fleet the index belongs to now
    for issued in directory.issued():
        issued.verify(directory.trust())


# --- nothing issued that cannot be delivered ---------------------------------------------------


@pytest.mark.skipif(not UNWRITABLE.is_dir(), reason="needs /proc")
def test_sign_issues_no_serial_when_the_output_directory_is_not_writable(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = UNWRITABLE / "meshinfer-test.cert"
    args = ("--node-id", "n", "--roles", "rsu", "--pubkey", KEY, "--out", out)
    refused(run(capsys, "fleet", "sign", "--dir", fleet, *args), str(UNWRITABLE))
    assert serials(fleet) == []


def test_enroll_refuses_the_fleet_directory_as_the_node_directory(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.read_bytes() for p in fleet.iterdir() if p.is_file()}
    args = ("--node-id", "car-1", "--roles", "vehicle", "--force")
    line = refused(run(capsys, "fleet", "enroll", "--dir", fleet, "--node-dir", fleet, *args))
    assert "fleet directory" in line
    assert serials(fleet) == []
    assert not (fleet / "node.key").exists()
    after = {p.name: p.read_bytes() for p in fleet.iterdir() if p.is_file()}
    assert after == before


def test_enroll_into_a_symlink_to_the_fleet_directory_is_refused_too(
    fleet: Path, tmp_path: Path
) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(fleet)
    with pytest.raises(IdentityError, match="fleet directory"):
        enroll(
            FleetDirectory(fleet), NodeDirectory(alias), "car-1", VEHICLE, now=NOW,
            lifetime_s=DAY, force=True,
        )  # fmt: skip
    assert serials(fleet) == []


# --- keys and damaged files --------------------------------------------------------------------


def test_sign_refuses_a_symlink_to_a_private_key_as_the_public_key(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = NodeDirectory(tmp_path / "node")
    node.keygen()
    alias = tmp_path / "node-public.txt"
    alias.symlink_to(node.node_key)
    args = ("--node-id", "n", "--roles", "rsu", "--pubkey", alias, "--out", tmp_path / "n.cert")
    refused(run(capsys, "fleet", "sign", "--dir", fleet, *args), "private key")
    assert serials(fleet) == []


@pytest.mark.parametrize("field", ["fleet_id", "authority_public_key"])
def test_a_trust_file_missing_a_field_names_the_field(
    fleet: Path, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = fleet / "fleet.json"
    document = json.loads(path.read_text())
    del document[field]
    path.write_text(json.dumps(document))
    refused(run(capsys, "fleet", "show", "--dir", fleet), str(path), f"missing {field!r}")


def test_an_index_record_missing_its_certificate_names_the_field(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    FleetDirectory(fleet).sign("car-1", NODE_KEY, VEHICLE, now=NOW, lifetime_s=DAY)
    path = fleet / "issued.json"
    document = json.loads(path.read_text())
    del document["certificates"][0]["certificate"]
    path.write_text(json.dumps(document))
    refused(run(capsys, "fleet", "show", "--dir", fleet), str(path), "missing 'certificate'")


def test_the_private_files_stay_private_after_sign_revoke_and_enroll(
    fleet: Path, tmp_path: Path
) -> None:
    directory = FleetDirectory(fleet)
    enroll(directory, NodeDirectory(tmp_path / "n"), "car-1", VEHICLE, now=NOW, lifetime_s=DAY)
    directory.revoke(now=NOW, serial=1)
    for path in (fleet / "authority.key", fleet / "api-token", tmp_path / "n" / "node.key"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
