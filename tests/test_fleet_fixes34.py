"""Fleet files, session 34: a blank API token file and a trust anchor whose authority key is no
Ed25519 point are refused when read, ``--pubkey`` never blocks on a FIFO (nor crashes on a
symlink loop), ``keygen --force`` cut short never leaves a mismatched pair, a certificate
lifetime too short to use is refused, and an error line that a closed stderr cannot take ends
the command quietly with exit code 2.

Real files on disk; the CLI runs in process (``meshinfer-coord``), or as a real subprocess where
its standard streams matter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import meshinfer.identity_files as identity_files
from coordinator.cli import main as coord_main
from meshinfer.errors import ConfigError, IdentityError
from meshinfer.identity_files import FleetDirectory, NodeDirectory, init_fleet, load_trust

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.0
KEY = "ab" * 32
VEHICLE = frozenset({"vehicle"})


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


# --- the API token -----------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n", b"   \n", b"short\n", b"x" * 20 + b" y" * 4])
def test_a_blank_or_unusable_api_token_file_is_refused(fleet: Path, content: bytes) -> None:
    # was "" (or the text as it was): a client sending it would be refused with no hint why
    token_file = FleetDirectory(fleet).api_token_file
    token_file.write_bytes(content)
    with pytest.raises(IdentityError, match="holds no usable token"):
        FleetDirectory(fleet).api_token()


def test_the_token_fleet_init_writes_is_taken(fleet: Path) -> None:
    token = FleetDirectory(fleet).api_token()
    assert len(token) >= 32 and token.isascii() and token.isprintable()


# --- the trust anchor --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [bytes(32), b"\xff" * 32, b"\x01" + bytes(31)])
def test_an_authority_key_that_is_no_ed25519_point_is_refused_when_read(
    fleet: Path, key: bytes
) -> None:
    # was taken: every certificate of the fleet then failed, far away, as "bad signature"
    trust_file = FleetDirectory(fleet).fleet_json
    document = json.loads(trust_file.read_text())
    document["authority_public_key"] = key.hex()
    trust_file.write_text(json.dumps(document))
    with pytest.raises(IdentityError, match="not an Ed25519 public key"):
        load_trust(trust_file)


# --- --pubkey ----------------------------------------------------------------------------------


def test_a_fifo_swapped_in_for_the_pubkey_file_is_refused_without_blocking(
    fleet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    fifo = tmp_path / "node.pub"
    os.mkfifo(fifo)
    # the look said "a regular file" (as before the swap): the old open then waited for a writer
    monkeypatch.setattr(Path, "is_file", lambda self: True)
    results: list[tuple[int, str, str]] = []
    out = tmp_path / "n.cert"
    args = ["fleet", "sign", "--dir", fleet, "--node-id", "n", "--pubkey", fifo]
    args += ["--roles", "vehicle", "--out", out]
    thread = threading.Thread(target=lambda: results.append(run(capsys, *args)), daemon=True)
    thread.start()
    thread.join(timeout=20)
    if thread.is_alive():  # unblock the old code's open, then fail
        os.close(os.open(fifo, os.O_WRONLY))
        thread.join(timeout=20)
        pytest.fail("fleet sign blocked opening a FIFO given as --pubkey")
    refused(results[0], "--pubkey", "not a regular file")
    assert not out.exists()


def test_a_symlink_loop_as_pubkey_is_a_clear_error(fleet: Path, tmp_path: Path, capsys) -> None:
    # (a guard, not a fix: --pubkey no longer looks before it reads, and Path.resolve raises
    # RuntimeError on a symlink loop in Python 3.11)
    (tmp_path / "a.pub").symlink_to(tmp_path / "b.pub")
    (tmp_path / "b.pub").symlink_to(tmp_path / "a.pub")
    args = ["--node-id", "n", "--pubkey", tmp_path / "a.pub", "--roles", "vehicle"]
    result = run(capsys, "fleet", "sign", "--dir", fleet, *args, "--out", tmp_path / "n.cert")
    refused(result, "--pubkey", "cannot read")


# --- keygen --force cut short ------------------------------------------------------------------


def test_keygen_force_cut_short_never_leaves_a_mismatched_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = NodeDirectory(tmp_path / "node")
    node.keygen()
    real_write = identity_files.write_new_file

    def crash_at_node_pub(path: Path, *args, **kwargs):
        if path == node.node_pub:
            raise IdentityError("power cut")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(identity_files, "write_new_file", crash_at_node_pub)
    with pytest.raises(IdentityError, match="power cut"):
        node.keygen(force=True)
    monkeypatch.undo()
    # was "node.pub does not match node.key": the old node.pub beside the new node.key
    private = node.static_private()
    assert len(private) == 32
    public = node.keygen(force=True)
    assert node.node_pub.read_text().strip() == public.hex()


def test_a_mismatched_pair_says_what_to_do(tmp_path: Path) -> None:
    node = NodeDirectory(tmp_path / "node")
    node.keygen()
    node.node_pub.write_text("cd" * 32 + "\n")
    with pytest.raises(IdentityError, match=r"does not match .*remove node\.pub"):
        node.static_private()


# --- certificate lifetimes ---------------------------------------------------------------------


@pytest.mark.parametrize("days", ["1e-320", "0.0001", "0.000694"])
def test_days_under_a_minute_are_refused(fleet: Path, tmp_path: Path, capsys, days: str) -> None:
    # was taken: 1e-320 days gave a certificate expired at once
    out = tmp_path / "n.cert"
    args = ["--node-id", "n", "--pubkey", KEY, "--roles", "vehicle", "--days", days]
    refused(run(capsys, "fleet", "sign", "--dir", fleet, *args, "--out", out), "one minute")
    assert not out.exists() and FleetDirectory(fleet).issued() == []


def test_a_minute_or_more_is_taken(fleet: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "n.cert"
    args = ["--node-id", "n", "--pubkey", KEY, "--roles", "vehicle", "--days", "0.00070"]
    code, _, err = run(capsys, "fleet", "sign", "--dir", fleet, *args, "--out", out)
    assert code == 0, err
    (cert,) = FleetDirectory(fleet).issued()
    assert cert.not_after - cert.not_before == pytest.approx(0.0007 * 86400)


def test_a_lifetime_too_short_to_move_the_clock_is_refused(fleet: Path) -> None:
    # was a certificate with not_after == not_before: expired as soon as it was used
    with pytest.raises(ConfigError, match="lifetime must be positive"):
        FleetDirectory(fleet).sign("n", bytes.fromhex(KEY), VEHICLE, now=NOW, lifetime_s=1e-300)
    assert FleetDirectory(fleet).issued() == []


# --- a closed stderr ---------------------------------------------------------------------------


def test_an_error_line_a_closed_stderr_cannot_take_ends_quietly_with_code_2(tmp_path: Path):
    # as `meshinfer-coord fleet show --dir X 2>&1 >/dev/null | head -0`: was a traceback into
    # the closed pipe and exit code 1
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        command = [sys.executable, "-m", "coordinator.cli", "fleet", "show", "--dir"]
        done = subprocess.run(
            [*command, str(tmp_path / "missing")],
            stdout=subprocess.PIPE,
            stderr=write_end,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stdout) == (2, b"")
