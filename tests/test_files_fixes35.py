"""The one bounded reader of regular files (``read_limited``), the FIFO-safe comparison in
``replace_unchanged`` and the reasons ``parse_address`` gives (thirty-fifth session)."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from meshinfer.atomic_files import read_limited, replace_unchanged
from meshinfer.errors import ConfigError, IdentityError
from meshinfer.tomlconfig import parse_address


class Refused(Exception):
    """The caller's own error type, which read_limited must raise for every failure."""


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "widget not found: {p}"),
        (lambda p: p.mkdir(), "widget {p} is a directory, not a file"),
        (lambda p: os.mkfifo(p), "widget {p} is a FIFO, socket or device, not a regular file"),
        (lambda p: p.write_bytes(b"x" * 9), "widget {p} is over the 8-byte limit"),
        (lambda p: p.symlink_to(p), "cannot read widget {p}: Too many levels of symbolic links"),
    ],
)
def test_every_failure_is_the_callers_error_naming_what_and_where(tmp_path, make, message):
    path = tmp_path / "w"
    make(path)
    with pytest.raises(Refused) as caught:
        read_limited(path, "widget", limit=8, error=Refused)
    assert str(caught.value) == message.format(p=path)


def test_a_file_at_the_limit_or_without_one_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "w"
    path.write_bytes(b"12345678")
    assert read_limited(path, "widget", limit=8, error=Refused) == b"12345678"
    assert read_limited(path, "widget", limit=None, error=Refused) == b"12345678"


def test_a_nul_in_the_path_is_the_callers_error_too(tmp_path: Path) -> None:
    with pytest.raises(Refused, match="cannot read widget"):
        read_limited(Path(f"{tmp_path}/a\0b"), "widget", limit=None, error=Refused)


def test_replace_unchanged_never_blocks_on_a_fifo_put_where_the_file_was(tmp_path: Path) -> None:
    # The comparison read opened the old file plainly: a FIFO there waited for a writer for
    # good, holding the revocation watch's worker thread (and the daemon's exit behind it).
    path = tmp_path / "revocations.bin"
    os.mkfifo(path)
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            outcome["result"] = replace_unchanged(path, b"new", None)
        except IdentityError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=20)
    if thread.is_alive():  # unblock the old code's open, then fail
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=20)
        pytest.fail("replace_unchanged blocked opening a FIFO")
    assert f"cannot write {path}: not a regular file" == str(outcome.get("error"))
    assert [p.name for p in tmp_path.iterdir()] == ["revocations.bin"]  # no temporary left


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("::1:80", 'an IPv6 address goes in brackets, "[::1]:80"'),
        ("[::1]x:80", "stray bracket in the host"),
        ("a]b:80", "stray bracket in the host"),
        ("host:65536", "port 65536 of 'host:65536' is outside 0..65535"),
        ("7946", 'expected "host:port"'),
    ],
)
def test_an_address_is_refused_with_its_own_reason(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"[net] listen: {reason}")):
        parse_address(text, "[net] listen")


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("[::1]:80", "::1", 80),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("car-1.local:65535", "car-1.local", 65535),
    ],
)
def test_good_addresses_still_parse(text: str, host: str, port: int) -> None:
    address = parse_address(text, "[net] listen")
    assert (address.host, address.port) == (host, port)
