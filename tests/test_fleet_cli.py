"""The key/fleet CLIs, run as real subprocesses, and the fleet/node directory files behind them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.cli import main as coord_main
from meshinfer.errors import AdmissionError, IdentityError
from meshinfer.identity_files import (
    SECRET_MODE,
    FleetDirectory,
    NodeDirectory,
    enroll,
    load_revocations,
    load_trust,
    write_new_file,
)
from meshinfer.proto.identity import NodeCertificate, admit, static_public_key
from node.cli import main as node_main

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_700_000_000.0
DAY = 86_400.0


def cli(program: str, *args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m node.cli`` / ``coordinator.cli`` for real, as a user would."""
    module = {"node": "node.cli", "coord": "coordinator.cli"}[program]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def line(
    program: str, template: str, cwd: Path | None = None, **values: object
) -> subprocess.CompletedProcess[str]:
    """``cli`` with a whitespace-separated argument template whose fields are filled in."""
    return cli(program, *(token.format(**values) for token in template.split()), cwd=cwd)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    """Exit code 2 with one clear line on stderr, never a traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error:" in lines[0] and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fleet")
    ok(cli("coord", "fleet", "init", "--dir", directory, "--fleet-id", "demo"))
    return directory


# --- keygen ------------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_we_can_read(tmp_path: Path) -> None:
    node = tmp_path / "node"
    printed = ok(cli("node", "keygen", "--dir", node)).strip()
    private = bytes.fromhex((node / "node.key").read_text())
    assert mode(node / "node.key") == 0o600
    assert (node / "node.pub").read_text().strip() == printed
    assert static_public_key(private).hex() == printed


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    ok(cli("node", "keygen", "--dir", tmp_path))
    before = snapshot(tmp_path)
    refused(cli("node", "keygen", "--dir", tmp_path), "already exist")
    assert snapshot(tmp_path) == before
    printed = ok(cli("node", "keygen", "--dir", tmp_path, "--force")).strip()
    assert printed != before["node.pub"].decode().strip()
    assert mode(tmp_path / "node.key") == 0o600


# --- fleet init --------------------------------------------------------------------------------


def test_fleet_init_creates_secrets_0600_and_public_trust(fleet_dir: Path) -> None:
    assert mode(fleet_dir / "authority.key") == 0o600
    assert mode(fleet_dir / "api-token") == 0o600
    trust = load_trust(fleet_dir / "fleet.json")
    assert trust.fleet_id == "demo"
    assert FleetDirectory(fleet_dir).authority().trust == trust
    assert load_revocations(fleet_dir / "revocations.bin", trust).entries == frozenset()
    assert len(FleetDirectory(fleet_dir).api_token()) >= 43


def test_fleet_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    ok(cli("coord", "fleet", "init", "--dir", tmp_path, "--fleet-id", "one"))
    before = snapshot(tmp_path)
    refused(cli("coord", "fleet", "init", "--dir", tmp_path, "--fleet-id", "two"), "--force")
    assert snapshot(tmp_path) == before
    ok(cli("coord", "fleet", "init", "--dir", tmp_path, "--fleet-id", "two", "--force"))
    assert load_trust(tmp_path / "fleet.json").fleet_id == "two"
    assert mode(tmp_path / "authority.key") == 0o600


# --- the whole round trip ----------------------------------------------------------------------


def _admit(node_dir: Path, fleet: Path, now: float) -> NodeCertificate:
    identity = NodeDirectory(node_dir).load()
    revocations = load_revocations(fleet / "revocations.bin", identity.trust)
    return admit(
        identity.certificate.to_bytes(),
        proven_static=identity.static_public,
        trust=load_trust(fleet / "fleet.json"),
        revocations=revocations,
        now=now,
    )


def _statuses(program: str, fleet: Path) -> dict[int, str]:
    report = json.loads(ok(cli(program, "fleet", "show", "--dir", fleet, "--json")))
    return {c["serial"]: c["status"] for c in report["certificates"]}


def test_init_enroll_sign_revoke_show_round_trip(tmp_path: Path) -> None:
    fleet, car1, car2 = tmp_path / "fleet", tmp_path / "car-1", tmp_path / "car-2"
    paths = {"fleet": fleet, "car1": car1, "car2": car2, "tmp": tmp_path}
    ok(line("coord", "fleet init --dir {fleet} --fleet-id roundtrip", **paths))
    enroll_car1 = "fleet enroll --dir {fleet} --node-dir {car1} --node-id car-1 --roles vehicle"
    ok(line("coord", enroll_car1, **paths))
    assert mode(car1 / "node.key") == 0o600
    assert _admit(car1, fleet, NodeDirectory(car1).load().certificate.not_before).serial == 1

    public = ok(line("node", "keygen --dir {car2}", **paths)).strip()
    sign_car2 = "fleet sign --dir {fleet} --node-id car-2 --pubkey {car2}/node.pub"
    sign_car2 += " --roles vehicle,rsu --days 2 --out {car2}/node.cert"
    ok(line("node", sign_car2, **paths))
    sign_rsu = "fleet sign --dir {fleet} --node-id rsu-1 --pubkey {key} --roles rsu --out {tmp}/r"
    ok(line("coord", sign_rsu, key=public, **paths))
    cert2 = NodeCertificate.from_bytes((car2 / "node.cert").read_bytes())
    assert (cert2.serial, cert2.roles, cert2.static_public.hex()) == (2, {"vehicle", "rsu"}, public)
    assert cert2.not_after - cert2.not_before == pytest.approx(2 * DAY)
    assert _statuses("coord", fleet) == {1: "valid", 2: "valid", 3: "valid"}

    ok(line("coord", "fleet revoke --dir {fleet} --node-id car-1 --reason stolen", **paths))
    ok(line("node", "fleet revoke --dir {fleet} --serial 3", **paths))
    assert _statuses("node", fleet) == {1: "revoked", 2: "valid", 3: "revoked"}
    with pytest.raises(AdmissionError) as refusal:
        _admit(car1, fleet, NodeDirectory(car1).load().certificate.not_before)
    assert refusal.value.reason == "revoked"

    text = ok(cli("coord", "fleet", "show", "--dir", fleet))
    assert "roundtrip" in text and "stolen" in text and "version 2" in text
    assert text == ok(cli("node", "fleet", "show", "--dir", fleet))

    # Re-enrolling keeps the node's key and issues a new certificate the old revocation misses.
    ok(line("coord", enroll_car1 + " --force", **paths))
    assert _statuses("coord", fleet)[4] == "valid"
    assert _admit(car1, fleet, NodeDirectory(car1).load().certificate.not_before).serial == 4
    assert (car1 / "node.pub").read_text().strip() == NodeDirectory(car1).load().static_public.hex()


def test_revoking_twice_is_refused(tmp_path: Path) -> None:
    ok(cli("coord", "fleet", "init", "--dir", tmp_path, "--fleet-id", "f"))
    sign = "fleet sign --dir {tmp} --node-id n --pubkey {key} --roles vehicle --out {tmp}/n.cert"
    ok(line("coord", sign, tmp=tmp_path, key="11" * 32))
    said = ok(cli("coord", "fleet", "revoke", "--dir", tmp_path, "--serial", "1"))
    assert "revocation list version 1" in said and "copy " in said  # how it spreads
    before = snapshot(tmp_path)
    refused(cli("coord", "fleet", "revoke", "--dir", tmp_path, "--serial", "1"), "already revoked")
    refused(cli("coord", "fleet", "revoke", "--dir", tmp_path, "--node-id", "n"), "already revoked")
    assert snapshot(tmp_path) == before


# --- bad arguments -----------------------------------------------------------------------------

SIGN = "fleet sign --node-id n --out x.cert --pubkey " + "ab" * 32


@pytest.mark.parametrize(
    "program, template, fragment",
    [
        ("coord", "", "required"),
        ("coord", "fleet", "required"),
        ("coord", "launch", "invalid choice"),
        ("node", "keygen", "--dir"),
        ("coord", "fleet init --dir {tmp} --fleet-id bad@id", "fleet id"),
        ("coord", SIGN + " --dir {fleet} --roles vehicle,car", "roles"),
        ("coord", SIGN + " --dir {fleet} --roles vehicle --pubkey zz", "64-hex-digit"),
        ("coord", SIGN + " --dir {fleet} --roles vehicle --pubkey {tmp}", "64-hex-digit"),
        ("coord", SIGN + " --dir {fleet} --roles vehicle --days -1", "days"),
        ("coord", SIGN + " --dir {fleet} --roles vehicle --node-id a/b", "node id"),
        ("coord", SIGN + " --dir {fleet} --roles vehicle --node-id ..", "node id"),
        ("coord", "fleet init --dir {tmp}/f --fleet-id .", "fleet id"),
        ("coord", SIGN + " --dir {tmp} --roles vehicle", "not found"),
        ("node", "fleet revoke --dir {fleet}", "required"),
        ("node", "fleet revoke --dir {fleet} --serial 1 --node-id n", "not allowed"),
        ("node", "fleet revoke --dir {fleet} --serial x3", "serial"),
        ("coord", "fleet revoke --dir {fleet} --serial 99", "no certificate"),
        ("coord", "fleet show --dir {tmp}/missing", "not found"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(
    program: str, template: str, fragment: str, fleet_dir: Path, tmp_path: Path
) -> None:
    before = snapshot(fleet_dir)
    refused(line(program, template, fleet=fleet_dir, tmp=tmp_path, cwd=tmp_path), fragment)
    assert snapshot(fleet_dir) == before


def test_sign_refuses_to_overwrite_the_output(fleet_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "existing.cert"
    out.write_bytes(b"keep me")
    sign = "fleet sign --dir {fleet} --node-id n --roles rsu --pubkey {key} --out {out}"
    refused(line("coord", sign, fleet=fleet_dir, key="ab" * 32, out=out), "already exists")
    assert out.read_bytes() == b"keep me"


def test_main_returns_exit_codes_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert coord_main(["--version"]) == 0
    assert "meshinfer-coord" in capsys.readouterr().out
    assert node_main(["fleet", "show"]) == 2
    assert "--dir" in capsys.readouterr().err


# --- the files behind the commands -------------------------------------------------------------


def test_write_new_file_never_follows_or_clobbers(tmp_path: Path) -> None:
    target, link = tmp_path / "target", tmp_path / "link"
    target.write_bytes(b"precious")
    link.symlink_to(target)
    with pytest.raises(IdentityError, match="already exists"):
        write_new_file(link, b"secret", mode=SECRET_MODE)
    write_new_file(link, b"secret", mode=SECRET_MODE, force=True)
    assert target.read_bytes() == b"precious"
    assert not link.is_symlink() and link.read_bytes() == b"secret"
    assert mode(link) == 0o600


def _enrolled(tmp_path: Path) -> tuple[FleetDirectory, NodeDirectory]:
    fleet = FleetDirectory.init(tmp_path / "fleet", "files")
    node = NodeDirectory(tmp_path / "node")
    enroll(fleet, node, "car-1", frozenset({"vehicle"}), now=NOW, lifetime_s=DAY)
    return fleet, node


def test_node_directory_load_round_trip(tmp_path: Path) -> None:
    fleet, node = _enrolled(tmp_path)
    identity = node.load()
    assert identity.node_id == "car-1"
    assert identity.trust == fleet.trust()
    assert identity.certificate == fleet.issued()[0]
    assert node.revocations(identity.trust) == fleet.revocations()


def test_load_refuses_a_certificate_for_another_key(tmp_path: Path) -> None:
    _, node = _enrolled(tmp_path)
    node.keygen(force=True)
    with pytest.raises(IdentityError, match="static key does not match"):
        node.load()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda n: n.node_key.unlink(), "node key not found"),
        (lambda n: n.node_key.chmod(0o644), "readable by others"),
        (lambda n: n.node_key.write_text("not hex"), "64 hex digits"),
        (lambda n: n.node_pub.write_text("00" * 32), "does not match"),
        (lambda n: n.node_cert.write_bytes(b"\x00garbage"), "malformed"),
        (lambda n: n.node_cert.unlink(), "node certificate not found"),
        (lambda n: n.fleet_json.write_text("{"), "not valid JSON"),
        (lambda n: n.fleet_json.write_text('{"format": 1, "fleet_id": "x"}'), "invalid"),
    ],
)
def test_load_reports_missing_or_corrupt_files(tmp_path: Path, damage, message: str) -> None:
    _, node = _enrolled(tmp_path)
    damage(node)
    with pytest.raises(IdentityError, match=message):
        node.load()


def test_fleet_refuses_a_world_readable_or_foreign_authority_key(tmp_path: Path) -> None:
    fleet = FleetDirectory.init(tmp_path / "fleet", "f")
    fleet.authority_key.chmod(0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        fleet.authority()
    fleet.authority_key.unlink()
    write_new_file(fleet.authority_key, b"22" * 32 + b"\n", mode=SECRET_MODE)
    with pytest.raises(IdentityError, match="does not match"):
        fleet.authority()


@pytest.mark.parametrize("program", ["node", "coord"])
def test_a_reader_that_closed_stdout_stops_the_command_quietly(program: str) -> None:
    # as `meshinfer-coord tasks --json | head -1` does once head has its line
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        command = [sys.executable, "-m", f"{'node' if program == 'node' else 'coordinator'}.cli"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [*command, "config"], stdout=write_end, stderr=subprocess.PIPE, text=True, env=env,
            timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")  # was "error: [Errno 32] Broken pipe"
