"""Configuration files as editors write them: a leading UTF-8 byte-order mark.

Notepad and some other editors start a UTF-8 file with U+FEFF; tomllib took it for the start of
a key and answered "Invalid statement (at line 1, column 1)", which names nothing the user can
see in their editor. The mark is skipped; a mark anywhere else stays an error.
"""

from __future__ import annotations

import pytest

from coordinator import config as coord_config
from meshinfer.errors import ConfigError
from meshinfer.runtime.session import (
    MAX_REKEY_AFTER,
    SessionConfig,
    _hello,
    _read_hello,
    peer_rekey_after,
)
from meshinfer.testing.fleet import make_fleet
from meshinfer.tomlconfig import read_toml
from node import config as node_config

BOM = b"\xef\xbb\xbf"


def test_a_leading_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "node.toml"
    path.write_bytes(BOM + b'[network]\nlink = "v2i"\n')
    assert read_toml(path) == {"network": {"link": "v2i"}}


@pytest.mark.parametrize("module", [node_config, coord_config], ids=["node", "coordinator"])
def test_daemon_files_with_a_byte_order_mark_load(tmp_path, module):
    path = tmp_path / "daemon.toml"
    path.write_bytes(BOM + b"[session]\nidle_timeout = 30.0\n")
    assert module.load_config(path).session.idle_timeout == 30.0


def test_a_mark_inside_the_file_is_still_refused(tmp_path):
    path = tmp_path / "node.toml"
    path.write_bytes(b"[network]\n" + BOM + b'link = "v2i"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(path)


# --- [session] rekey_after has an upper bound ------------------------------------------------


@pytest.mark.parametrize("module", [node_config, coord_config], ids=["node", "coordinator"])
def test_rekey_after_past_the_nonce_space_is_refused_naming_the_key(module):
    with pytest.raises(ConfigError, match=r"x\.toml: \[session\] rekey_after must be at most"):
        module.config_from_dict({"session": {"rekey_after": 10**60}}, "x.toml")
    largest = module.config_from_dict({"session": {"rekey_after": MAX_REKEY_AFTER}}, "x.toml")
    assert largest.session.rekey_after == MAX_REKEY_AFTER


def test_the_largest_rekey_after_still_makes_a_valid_hello():
    """Our Hello announces ``rekey-after=N``; a feature is at most 64 characters, so a 60-digit
    value made every handshake fail at our own Hello (the node sat alone)."""
    ident = make_fleet().identities["alpha"]
    hello = _read_hello(_hello(ident, SessionConfig(rekey_after=MAX_REKEY_AFTER)))
    assert peer_rekey_after(hello) == MAX_REKEY_AFTER
    with pytest.raises(ValueError, match="rekey_after must be at most"):
        SessionConfig(rekey_after=MAX_REKEY_AFTER + 1)
