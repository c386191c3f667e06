"""Bad, hostile and unlucky input to the fleet commands and the identity files behind them.

Each test feeds one thing a user or an attacker can hand us (a wrong argument, a damaged or
foreign file, a directory where a file belongs, a second command at once, a write that fails
half-way) and holds us to the standard: one clear line and exit code 2, never a traceback, and
nothing already on disk lost or half-written.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.cli import main as coord_main
from meshinfer.errors import ConfigError, IdentityError
from meshinfer.identity_files import (
    SECRET_MODE,
    FleetDirectory,
    NodeDirectory,
    enroll,
    load_trust,
    replace_file,
    write_new_file,
)
from meshinfer.proto.identity import FleetAuthority, NodeCertificate, RevocationList
from node.cli import main as node_main

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_700_000_000.0
DAY = 86_400.0
NODE_KEY = bytes([9]) + bytes(31)  # a Noise static key (X25519 base point: not of small order)
KEY = "ab" * 32


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``meshinfer-coord ARGS`` in process: exit code, stdout, stderr."""
    code = coord_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(result: tuple[int, str, str], *fragments: str) -> None:
    """Exit code 2 with one line on stderr that holds every fragment."""
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    assert all(f in lines[0] for f in fragments), lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def serials(fleet: Path) -> list[int]:
    return [c.serial for c in FleetDirectory(fleet).issued()]


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    FleetDirectory.init(tmp_path / "fleet", "inputs")
    return tmp_path / "fleet"


@contextmanager
def held_lock(directory: Path) -> Iterator[None]:
    """Hold the lock a fleet command takes on its directory, as a running one would."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- command-line arguments --------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["lost\udcffcar", "two\nlines", "x" * 129])
def test_revoke_refuses_a_reason_that_is_not_one_line_of_text(
    fleet: Path, tmp_path: Path, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    FleetDirectory(fleet).sign("car-1", NODE_KEY, frozenset({"vehicle"}), now=NOW, lifetime_s=DAY)
    before = snapshot(fleet)
    refused(
        run(capsys, "fleet", "revoke", "--dir", fleet, "--serial", 1, "--reason", reason), "reason"
    )
    assert snapshot(fleet) == before


def test_a_revocation_reason_must_be_encodable_text() -> None:
    authority = FleetAuthority.create("inputs")
    with pytest.raises(ConfigError, match="reason"):
        authority.revoke(RevocationList("inputs"), now=NOW, serial=1, reason="bad\udcff")


def test_sign_refuses_a_private_key_file_as_the_public_key(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = NodeDirectory(tmp_path / "node")
    node.keygen()
    out = tmp_path / "n.cert"
    args = ("--node-id", "n", "--roles", "rsu", "--out", out)
    result = run(capsys, "fleet", "sign", "--dir", fleet, "--pubkey", node.node_key, *args)
    refused(result, "private key", "node.pub")
    assert not out.exists() and serials(fleet) == []


def test_sign_reads_a_key_file_whose_path_is_64_characters_long(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    name = "p" * 60 + ".pub"
    Path(name).write_text(KEY + "\n")
    args = ("--node-id", "n", "--roles", "rsu", "--out", "n.cert")
    code, _, err = run(capsys, "fleet", "sign", "--dir", fleet, "--pubkey", name, *args)
    assert code == 0, err
    assert NodeCertificate.from_bytes(Path("n.cert").read_bytes()).static_public.hex() == KEY


@pytest.mark.parametrize(
    "out, make, fragment",
    [
        ("missing/n.cert", None, "does not exist"),
        ("taken", "mkdir", "is a directory"),
    ],
)
def test_sign_issues_no_serial_when_the_certificate_cannot_be_written(
    fleet: Path,
    tmp_path: Path,
    out: str,
    make: str | None,
    fragment: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = tmp_path / out
    if make == "mkdir":
        target.mkdir()
    args = ("--node-id", "n", "--roles", "rsu", "--pubkey", KEY, "--out", target, "--force")
    refused(run(capsys, "fleet", "sign", "--dir", fleet, *args), str(target), fragment)
    assert serials(fleet) == []


def test_revoke_takes_only_ascii_digits_as_a_serial(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    FleetDirectory(fleet).sign("car-1", NODE_KEY, frozenset({"vehicle"}), now=NOW, lifetime_s=DAY)
    refused(run(capsys, "fleet", "revoke", "--dir", fleet, "--serial", "\u0661"), "serial")
    assert FleetDirectory(fleet).revocations().version == 0


# --- files in the way --------------------------------------------------------------------------


def test_enroll_issues_nothing_when_a_directory_stands_where_the_certificate_goes(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = tmp_path / "node"
    (node / "node.cert").mkdir(parents=True)
    args = ("--node-dir", node, "--node-id", "car-1", "--roles", "vehicle", "--force")
    refused(run(capsys, "fleet", "enroll", "--dir", fleet, *args), "node.cert", "directory")
    assert serials(fleet) == []


def test_init_force_keeps_the_authority_when_it_cannot_finish(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (fleet / "issued.json").unlink()
    (fleet / "issued.json").mkdir()
    before = snapshot(fleet)
    result = run(capsys, "fleet", "init", "--dir", fleet, "--fleet-id", "other", "--force")
    refused(result, "issued.json", "directory")
    assert snapshot(fleet) == before


def test_write_new_file_into_a_directory_says_so(tmp_path: Path) -> None:
    (tmp_path / "node.key").mkdir()
    with pytest.raises(IdentityError, match=r"node\.key: it is a directory"):
        write_new_file(tmp_path / "node.key", b"00", mode=SECRET_MODE, force=True)


def _keygen_under_file_size_limit(directory: Path, limit: int) -> subprocess.CompletedProcess[str]:
    """``meshinfer-node keygen`` in a process whose writes fail past ``limit`` bytes (EFBIG), as
    on a full disk: the kernel fails the write half-way, even for root."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from node.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-c", script, "keygen", "--dir", str(directory)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def test_a_failed_write_leaves_no_half_written_key(tmp_path: Path) -> None:
    result = _keygen_under_file_size_limit(tmp_path, 10)
    assert result.returncode == 2, result.stderr
    assert "node.key" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # neither a 10-byte key nor a temporary file


def test_replacing_a_secret_keeps_it_private_and_leaves_no_temporaries(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    write_new_file(key, b"old\n", mode=SECRET_MODE)
    write_new_file(key, b"new\n", mode=SECRET_MODE, force=True)
    replace_file(key, b"newer\n", mode=SECRET_MODE)
    assert key.read_bytes() == b"newer\n" and key.stat().st_mode & 0o777 == SECRET_MODE
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


# --- damaged and foreign files -----------------------------------------------------------------


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"[" * 50_000, "not valid JSON"),
        (b'{"format": true, "fleet_id": "x", "authority_public_key": ""}', "unknown format"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b" " * 70_000 + b"{}", "byte limit"),
    ],
    ids=["nested", "format-true", "not-utf8", "oversized"],
)
def test_a_damaged_trust_file_is_one_clear_error(
    fleet: Path, tmp_path: Path, content: bytes, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    node = NodeDirectory(tmp_path / "node")
    enroll(FleetDirectory(fleet), node, "car-1", frozenset({"vehicle"}), now=NOW, lifetime_s=DAY)
    node.fleet_json.write_bytes(content)
    with pytest.raises(IdentityError, match=fragment):
        node.load()
    (fleet / "fleet.json").write_bytes(content)
    refused(run(capsys, "fleet", "show", "--dir", fleet), "fleet.json", fragment)


def test_a_deeply_nested_index_is_one_clear_error(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (fleet / "issued.json").write_text('{"format": 1, "certificates": ' + "[" * 100_000)
    refused(run(capsys, "fleet", "show", "--dir", fleet), "issued.json", "not valid JSON")


def test_an_index_copied_from_another_fleet_is_refused(
    tmp_path: Path, fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = FleetDirectory.init(tmp_path / "other", "other")
    other.sign("car-9", NODE_KEY, frozenset({"vehicle"}), now=NOW, lifetime_s=DAY)
    (fleet / "issued.json").write_bytes(other.issued_json.read_bytes())
    refused(run(capsys, "fleet", "show", "--dir", fleet), "issued.json", "'other'")
    args = ("--node-id", "n", "--roles", "rsu", "--pubkey", KEY, "--out", tmp_path / "n.cert")
    refused(run(capsys, "fleet", "sign", "--dir", fleet, *args), "issued.json", "'other'")


def test_show_flags_a_certificate_the_authority_did_not_sign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = FleetDirectory.init(tmp_path / "old", "same")
    old.sign("car-1", NODE_KEY, frozenset({"vehicle"}), now=NOW, lifetime_s=DAY * 36_500)
    fleet = FleetDirectory.init(tmp_path / "new", "same")  # same id, new authority key
    fleet.issued_json.write_bytes(old.issued_json.read_bytes())
    code, out, err = run(capsys, "fleet", "show", "--dir", fleet.path, "--json")
    assert code == 0, err
    assert [c["status"] for c in json.loads(out)["certificates"]] == ["bad-signature"]


def test_show_prints_times_beyond_the_calendar(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    FleetDirectory(fleet).sign("far", NODE_KEY, frozenset({"rsu"}), now=NOW, lifetime_s=1e300)
    code, out, err = run(capsys, "fleet", "show", "--dir", fleet)
    assert code == 0, err
    assert "far" in out and "1e+300 s" in out


# --- two commands at once ----------------------------------------------------------------------


def test_a_second_fleet_command_at_once_is_refused_not_raced(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sign = ("fleet", "sign", "--dir", fleet, "--node-id", "n", "--roles", "rsu", "--pubkey", KEY)
    with held_lock(fleet):
        refused(run(capsys, *sign, "--out", tmp_path / "a.cert"), str(fleet), "in use")
        assert serials(fleet) == []
    assert run(capsys, *sign, "--out", tmp_path / "b.cert")[0] == 0
    with held_lock(fleet):
        refused(run(capsys, "fleet", "revoke", "--dir", fleet, "--serial", 1), "in use")
    assert FleetDirectory(fleet).revocations().version == 0


# --- output the terminal cannot encode ---------------------------------------------------------


def test_a_path_of_undecodable_bytes_is_printed_escaped(tmp_path: Path) -> None:
    directory = os.fsencode(tmp_path) + b"/fleet-\xff"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    command = [sys.executable, "-m", "coordinator.cli", "fleet", "init", "--fleet-id", "f"]
    result = subprocess.run(
        [*command, "--dir", directory], capture_output=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert b"fleet-\\udcff" in result.stdout
    assert load_trust(Path(os.fsdecode(directory)) / "fleet.json").fleet_id == "f"


# --- any bytes at all --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
trust_documents = st.fixed_dictionaries(
    {},
    optional={
        "format": st.sampled_from([1, 1.0, True, 2]) | json_values,
        "fleet_id": st.sampled_from(["inputs", "", "a/b"]) | json_values,
        "authority_public_key": st.sampled_from(["00" * 32, "0" * 64, "zz"]) | json_values,
    },
)


@given(st.binary(max_size=300) | trust_documents.map(lambda d: json.dumps(d).encode()))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_trust_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fleet.json"
    path.write_bytes(content)
    try:
        load_trust(path)
    except IdentityError as exc:
        assert str(path) in str(exc)


index_documents = st.fixed_dictionaries(
    {"format": st.just(1)},
    optional={
        "certificates": json_values
        | st.lists(st.fixed_dictionaries({}, optional={"certificate": json_values}), max_size=3)
    },
)


@given(index_documents)
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_issued_index(fleet: Path, document: dict[str, object]) -> None:
    directory = FleetDirectory(fleet)
    directory.issued_json.write_text(json.dumps(document))
    try:
        directory.issued()
    except IdentityError as exc:
        assert "issued.json" in str(exc)


def test_node_cli_shares_the_fleet_commands(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        node_main(["fleet", "revoke", "--dir", str(fleet), "--serial", "1", "--reason", "a\tb"])
        == 2
    )
    assert "--reason" in capsys.readouterr().err
