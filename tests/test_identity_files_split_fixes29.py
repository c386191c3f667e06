"""Fixes found while splitting meshinfer/identity_files.py (session 29)."""

from __future__ import annotations

import pytest

from meshinfer.errors import IdentityError
from meshinfer.identity_files import NodeDirectory, load_revocations
from meshinfer.proto.identity import FleetAuthority


def test_a_dangling_revocations_symlink_is_refused_not_read_as_no_revocations(tmp_path):
    """A node's ``revocations.bin`` that names a missing file (a shared copy on a mount that is
    gone) must not load as an empty list: that would admit every revoked peer."""
    trust = FleetAuthority.create("f").trust
    node = NodeDirectory(tmp_path)
    assert not node.revocations(trust).entries  # no file at all: an empty list, as before
    node.revocations_bin.symlink_to(tmp_path / "gone" / "revocations.bin")
    with pytest.raises(IdentityError, match="revocation list not found"):
        node.revocations(trust)
    with pytest.raises(IdentityError, match=str(node.revocations_bin)):
        load_revocations(node.revocations_bin, trust, missing_ok=True)
