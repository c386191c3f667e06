"""``[session] clock_skew`` and ``[discovery] address_check_interval`` in the daemons' files.

Both keys are in the node's and the coordinator's files (their mesh sections are shared),
documented in the rendered defaults, validated with errors naming file, section and key, and
passed to the mesh: the clock skew to session admission and to the membership records' checks
of a running node, the interval to both the node's and mDNS's looks at the host's addresses.
"""

from __future__ import annotations

import os
import time
import tomllib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import config as coord_config
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.errors import ConfigError
from meshinfer.proto import identity
from meshinfer.proto.identity import DEFAULT_CLOCK_SKEW_S
from meshinfer.proto.membership_auth import CertifiedRecordAuthenticator
from meshinfer.proto.membership_wire import AliveRecord, NodeState, signed_body
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.runtime.session import SessionConfig
from meshinfer.runtime.startup import mesh_options
from meshinfer.testing.fleet import DAY, make_fleet
from node import config as node_config

MODULES = {"node": node_config, "coordinator": coord_config}
NO_MDNS = {"discovery": {"mdns": False}}


def mesh(module, data: dict, source: str = "x.toml") -> MeshNodeOptions:
    return mesh_options(module.config_from_dict(data, source), "fleet", "/nonexistent")


@pytest.mark.parametrize("kind", MODULES)
def test_the_defaults_list_both_keys_with_the_meshs_own_defaults(kind):
    module = MODULES[kind]
    parsed = tomllib.loads(module.render_defaults())
    assert parsed["session"]["clock_skew"] == DEFAULT_CLOCK_SKEW_S == SessionConfig().clock_skew
    interval = parsed["discovery"]["address_check_interval"]
    assert interval == MeshNodeOptions().address_check_interval
    assert interval == MdnsConfig().address_check_interval
    options = mesh(module, {})
    assert options.session.clock_skew == DEFAULT_CLOCK_SKEW_S
    assert options.address_check_interval == options.mdns.address_check_interval == interval


@pytest.mark.parametrize("kind", MODULES)
def test_the_keys_reach_the_session_config_the_node_and_mdns(kind):
    module = MODULES[kind]
    data = {"session": {"clock_skew": 30}, "discovery": {"address_check_interval": 2.5}}
    options = mesh(module, data)
    assert options.session.clock_skew == 30.0
    assert options.address_check_interval == options.mdns.address_check_interval == 2.5
    loopback = {"discovery": {"interfaces": ["127.0.0.1"], "address_check_interval": 7}}
    assert mesh(module, loopback).mdns == replace(MdnsConfig.loopback(), address_check_interval=7.0)
    off = mesh(module, {"discovery": {"address_check_interval": 0}})
    assert off.address_check_interval is None and off.mdns.address_check_interval is None
    assert mesh(module, {"session": {"clock_skew": 0}}).session.clock_skew == 0.0


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"session": {"clock_skew": -1}}, r"\[session\] clock_skew must be in 0\.\.86400"),
        ({"session": {"clock_skew": 86401}}, r"\[session\] clock_skew must be in 0\.\.86400"),
        ({"session": {"clock_skew": "5m"}}, r"\[session\] clock_skew: expected float"),
        ({"session": {"clock_skew": True}}, r"\[session\] clock_skew: expected float"),
        ({"session": {"clock_skew": float("inf")}}, r"\[session\] clock_skew: must be a finite"),
        (
            {"discovery": {"address_check_interval": -0.5}},
            r"\[discovery\] address_check_interval must be in 0\.\.86400",
        ),
        (
            {"discovery": {"address_check_interval": 1e9}},
            r"\[discovery\] address_check_interval must be in 0\.\.86400",
        ),
        (
            {"discovery": {"address_check_interval": "5"}},
            r"\[discovery\] address_check_interval: expected float",
        ),
    ],
)
@pytest.mark.parametrize("kind", MODULES)
def test_a_bad_value_is_an_error_naming_file_section_and_key(kind, table, named):
    with pytest.raises(ConfigError, match=rf"^my\.toml: {named}"):
        MODULES[kind].config_from_dict(table, "my.toml")


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text("[session]\nclock_skew = -3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: \[session\] clock_skew must be"):
        node_config.load_config(path)


@settings(max_examples=60, deadline=None)
@given(value=st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-(2**40), 2**40))
def test_any_number_is_taken_exactly_in_range_or_refused(value):
    for key, section, limit in [
        ("clock_skew", "session", identity.MAX_CLOCK_SKEW_S),
        ("address_check_interval", "discovery", node_config.MAX_ADDRESS_CHECK_INTERVAL),
    ]:
        data = {**NO_MDNS, section: {**NO_MDNS.get(section, {}), key: value}}
        if 0 <= value <= limit:
            config = node_config.config_from_dict(data, "n.toml")
            assert getattr(getattr(config, section), key) == value
        else:
            with pytest.raises(ConfigError, match=rf"^n\.toml: \[{section}\] {key} must be"):
                node_config.config_from_dict(data, "n.toml")


def proof_checker(node: MeshNode) -> CertifiedRecordAuthenticator:
    authenticator = node.membership.core.table.authenticator
    assert isinstance(authenticator, CertifiedRecordAuthenticator)
    return authenticator


@pytest.mark.parametrize(("skew", "taken"), [(None, True), (0, False)])
async def test_a_running_node_judges_records_with_the_files_clock_skew(skew, taken):
    fleet = make_fleet(None, ["car-a"])
    # a certificate that expired a minute ago: within the default skew, outside a skew of 0
    old = fleet.enroll("car-old", now=time.time() - DAY - 60, lifetime_s=DAY)
    data = {**NO_MDNS, "session": {} if skew is None else {"clock_skew": skew}}
    node = MeshNode(fleet.identities["car-a"], fleet.revocations, mesh(node_config, data))
    await node.start()
    try:
        author = CertifiedRecordAuthenticator(
            old.certificate, old.static_private, old.trust, random_bytes=os.urandom
        )
        body = signed_body(AliveRecord("car-old", 0, 1, NodeState("127.0.0.1", 1)))
        checker = proof_checker(node)
        assert checker.verify("car-old", body, author.sign(body)) is taken
        assert checker.refusals == ({} if taken else {"expired": 1})
    finally:
        await node.aclose()
