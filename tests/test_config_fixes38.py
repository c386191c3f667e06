"""``[session] outbox_mib``: the byte bound of one peer's outbox, configurable in both daemons'
files (it was fixed at 64 MiB, ``PeerTable(outbox_bytes=)``'s default), checked like
``max_message_mib`` and carried through :class:`MeshNodeOptions` to the peer table."""

from __future__ import annotations

import tomllib

import pytest

from coordinator import config as coord_config
from meshinfer.errors import ConfigError
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.runtime.outbox_size import OUTBOX_BYTES
from meshinfer.runtime.startup import mesh_options
from meshinfer.testing.fleet import make_fleet
from node import config as node_config

MODULES = pytest.mark.parametrize(
    "module", [node_config, coord_config], ids=["node", "coordinator"]
)


def write(tmp_path, text: str):
    path = tmp_path / "daemon.toml"
    path.write_text("[discovery]\nmdns = false\n" + text)
    return path


@MODULES
@pytest.mark.parametrize(
    ("session", "bound"),
    [
        ("", OUTBOX_BYTES),  # the default: as before
        ("outbox_mib = 128\n", 128 << 20),
        ("outbox_mib = 16\n", 16 << 20),  # as small as the largest message
        ("max_message_mib = 100\n", 100 << 20),  # the default follows a larger message
        ("max_message_mib = 100\noutbox_mib = 300\n", 300 << 20),
    ],
)
def test_the_configured_outbox_bound_reaches_the_peer_table(tmp_path, module, session, bound):
    config = module.load_config(write(tmp_path, "[session]\n" + session))
    options = mesh_options(config, "test-fleet", str(tmp_path))
    assert options.outbox_bytes == bound
    fleet = make_fleet(None, ["car-a"])
    mesh = MeshNode(fleet.identities["car-a"], fleet.revocations, options)
    assert mesh.peers._outbox_bytes == bound


@MODULES
@pytest.mark.parametrize(
    "value",
    ["-1", "8", "65537", "99999999999999999999999", "true", "64.0", "nan", '"64"', "{ a = 1 }",
     "[64]"],
)  # fmt: skip
def test_a_bad_outbox_mib_is_an_error_naming_the_key(tmp_path, module, value):
    path = write(tmp_path, f"[session]\noutbox_mib = {value}\n")
    with pytest.raises(ConfigError, match=r"daemon\.toml: \[session\] outbox_mib"):
        module.load_config(path)


@MODULES
def test_an_outbox_below_the_largest_message_is_refused(module):
    data = {"session": {"max_message_mib": 100, "outbox_mib": 64}}
    with pytest.raises(ConfigError, match=r"outbox_mib must be .*100\.\.65536.*got 64"):
        module.config_from_dict(data, "f.toml")


@MODULES
def test_the_defaults_file_documents_outbox_mib_and_reads_back(module):
    text = module.render_defaults()
    assert "\noutbox_mib = 0\n" in text
    assert "at least max_message_mib" in text
    assert module.config_from_dict(tomllib.loads(text)).session.outbox_mib == 0


@pytest.mark.parametrize("bound", [0, -1, True, 1.5, "64"])
def test_mesh_node_options_refuse_a_bound_that_is_no_positive_integer(bound):
    with pytest.raises(ConfigError, match="outbox_bytes"):
        MeshNodeOptions(outbox_bytes=bound)


def test_mesh_node_options_default_is_the_peer_tables():
    assert MeshNodeOptions().outbox_bytes == OUTBOX_BYTES
