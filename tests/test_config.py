"""The node's and the coordinator's TOML files: documented defaults, strict validation."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import cli as coord_cli
from coordinator import config as coord_config
from coordinator.daemon import CoordinatorDaemon, service_config
from meshinfer.errors import ConfigError
from meshinfer.identity_files import FleetDirectory, NodeDirectory, enroll
from meshinfer.tomlconfig import read_toml
from node import cli as node_cli
from node import config as node_config

SCHEMAS = {"node": node_config, "coordinator": coord_config}


@pytest.mark.parametrize("kind", SCHEMAS)
def test_rendered_defaults_read_back_as_the_defaults(kind, tmp_path):
    module = SCHEMAS[kind]
    path = tmp_path / "defaults.toml"
    path.write_text(module.render_defaults())
    assert module.load_config(path) == module.SCHEMA.root()
    comments = [line for line in path.read_text().splitlines() if line.startswith("# ")]
    keys = [line for line in path.read_text().splitlines() if " = " in line]
    assert len(comments) == len(keys) + 1  # every key documented, plus the title


@pytest.mark.parametrize(
    ("kind", "doc", "named"),
    [
        ("node", {"nosuch": {}}, "unknown section [nosuch]"),
        ("node", {"network": {"lsiten": "x"}}, "[network] unknown key 'lsiten'"),
        ("node", {"network": {"listen": "7946"}}, '[network] listen: expected "host:port"'),
        ("node", {"executor": {"max_concurrent": True}}, "max_concurrent: expected int"),
        ("node", {"executor": {"max_concurrent": 0}}, "max_concurrent: must be positive"),
        ("node", {"inference": {"engine": "torch"}}, "[inference] engine: must be one of"),
        ("node", {"inference": {"models": "digits"}}, "models: expected a list"),
        ("node", {"inference": {"models": [1]}}, "models[0]: expected str"),
        ("node", {"inference": {"engine": "triton"}}, "triton_url is required"),
        ("node", {"session": {"keepalive_interval": 90.0}}, "keepalive_interval must be below"),
        ("node", {"session": {"verify_timeout": -1}}, "[session] verify_timeout must be >= 0"),
        ("coordinator", {"session": {"verify_timeout": -0.5}}, "verify_timeout must be >= 0"),
        ("node", {"http": []}, "[http] must be a table"),
        ("coordinator", {"coordinator": {"default_policy": "fastest"}}, "default_policy"),
        ("coordinator", {"coordinator": {"journal_synchronous": "OFF"}}, "journal_synchronous"),
        ("coordinator", {"coordinator": {"retry_backoff_s": -1}}, "retry_backoff_s must not"),
        ("coordinator", {"coordinator": {"retention_days": -0.5}}, "retention_days must not"),
        ("coordinator", {"coordinator": {"default_deadline_s": -1}}, "default_deadline_s must not"),
        ("coordinator", {"coordinator": {"redial_timeout_s": -0.1}}, "redial_timeout_s must not"),
        ("coordinator", {"coordinator": {"item_timeout_s": 0}}, "must be positive"),
        ("coordinator", {"coordinator": {"item_timeout_s": float("nan")}}, "finite number"),
        ("node", {"session": {"idle_timeout": float("inf")}}, "idle_timeout: must be a finite"),
        ("node", {"session": {"idle_timeout": 10**400}}, "idle_timeout: must be a finite"),
        ("node", {"network": {"listen": "127.0.0.1:\u00b2"}}, '[network] listen: expected "host'),
        ("node", {"http": {"listen": "[::1]:\u0663"}}, '[http] listen: expected "host:port"'),
        ("node", {"network": {"advertise_host": "a host"}}, "advertise_host must be an address"),
        ("node", {"network": {"advertise_host": "0.0.0.0"}}, "advertise_host must be an address"),
        ("coordinator", {"network": {"advertise_host": "x" * 300}}, "advertise_host must be an"),
        ("node", {"node": {"data_dir": "d\0"}}, "[node] data_dir: must not contain a NUL"),
        ("node", {"inference": {"max_queue_delay_ms": -5.0}}, "max_queue_delay_ms must be >= 0"),
        ("coordinator", {"api": {"listen": "localhost"}}, '[api] listen: expected "host:port"'),
        ("coordinator", {"http": {}}, "unknown section [http]"),
        ("coordinator", {"inference": {}}, "unknown section [inference]"),
    ],
)
def test_invalid_keys_are_named(kind, doc, named):
    with pytest.raises(ConfigError) as info:
        SCHEMAS[kind].config_from_dict(doc, "f.toml")
    assert str(info.value).startswith("f.toml: ")
    assert named in str(info.value)


def test_ints_are_accepted_for_floats_and_lists_become_tuples():
    config = coord_config.config_from_dict(
        {"coordinator": {"item_timeout_s": 5}, "discovery": {"interfaces": ["127.0.0.1"]}}
    )
    assert config.coordinator.item_timeout_s == 5.0
    assert isinstance(config.coordinator.item_timeout_s, float)
    assert config.discovery.interfaces == ("127.0.0.1",)
    assert service_config(config).item_timeout_s == 5.0
    days = coord_config.config_from_dict(
        {"coordinator": {"retention_days": 2, "default_deadline_s": 90, "redial_timeout_s": 1}}
    )
    assert service_config(days).retention_s == 2 * 86400.0
    assert service_config(days).default_deadline_s == 90.0
    assert service_config(days).redial_timeout_s == 1.0


def test_malformed_files_are_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nidentity_dir = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        read_toml(tmp_path / "absent.toml")
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot read"):
        read_toml(bad)
    bad.write_text("[session]\nrekey_after = " + "9" * 5000)  # over int()'s 4300 digits
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(bad)


_SCALARS = st.one_of(
    st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False), st.text(max_size=12)
)
_VALUES = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3), st.dictionaries(st.text(), _SCALARS))


def _documents(schema):
    import dataclasses

    sections = [f.name for f in dataclasses.fields(schema.root)]
    keys = {
        f.name: [k.name for k in dataclasses.fields(f.default_factory())]
        for f in dataclasses.fields(schema.root)
    }
    section = st.sampled_from([*sections, "bogus"])
    return st.dictionaries(
        section,
        st.one_of(
            _VALUES,
            st.builds(
                dict,
                st.lists(
                    st.tuples(
                        st.one_of(
                            st.sampled_from(sorted({k for v in keys.values() for k in v})),
                            st.text(max_size=5),
                        ),
                        _VALUES,
                    ),
                    max_size=4,
                ),
            ),
        ),
        max_size=4,
    )


@pytest.mark.parametrize("kind", SCHEMAS)
def test_any_document_is_a_config_or_a_config_error(kind):
    schema = SCHEMAS[kind].SCHEMA

    @settings(max_examples=300, deadline=None)
    @given(_documents(schema))
    def check(doc):
        try:
            config = schema.from_dict(doc, "fuzz.toml")
        except ConfigError as exc:
            assert str(exc).startswith("fuzz.toml")
        else:
            assert isinstance(config, schema.root)
            if kind == "coordinator":  # what the file allows, the service takes
                service_config(config)

    check()


@pytest.mark.parametrize(("main", "prog"), [(node_cli.main, "node"), (coord_cli.main, "coord")])
def test_config_check_command(main, prog, tmp_path, capsys):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('[network]\nlisten = "127.0.0.1:0"\n')
    bad.write_text("[network]\nlisten = 7946\n")
    assert main(["config", "--check", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["config", "--check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "[network] listen: expected str, got int" in err
    assert "Traceback" not in err
    assert main(["config"]) == 0
    assert "[network]" in capsys.readouterr().out


@pytest.fixture
def fleet(tmp_path):
    return FleetDirectory.init(tmp_path / "fleet", "cfg-fleet")


def _enrolled(fleet, tmp_path, name, roles):
    directory = tmp_path / name
    enroll(
        fleet,
        NodeDirectory(directory),
        name,
        frozenset(roles),
        now=time.time() - 60,
        lifetime_s=86400.0,
    )
    return str(directory)


def test_coordinator_daemon_refuses_bad_setups_before_starting(fleet, tmp_path):
    coord = _enrolled(fleet, tmp_path, "coord", ("coordinator",))
    vehicle = _enrolled(fleet, tmp_path, "veh", ("vehicle",))
    token = str(fleet.api_token_file)
    cases = [
        ({}, "identity_dir is required"),
        ({"coordinator": {"identity_dir": str(tmp_path / "nowhere")}}, "identity_dir"),
        ({"coordinator": {"identity_dir": vehicle}, "api": {"token_file": token}},
         "lacks the coordinator role"),
        ({"coordinator": {"identity_dir": coord}}, "token_file is required"),
        ({"coordinator": {"identity_dir": coord}, "api": {"token_file": coord}}, "is a directory"),
    ]  # fmt: skip
    for doc, message in cases:
        with pytest.raises(ConfigError, match=message):
            CoordinatorDaemon(coord_config.config_from_dict(doc))
    daemon = CoordinatorDaemon(
        coord_config.config_from_dict(
            {"coordinator": {"identity_dir": coord}, "api": {"token_file": token}}
        )
    )
    assert daemon.token == fleet.api_token()
    no_api = coord_config.config_from_dict(
        {"coordinator": {"identity_dir": coord}, "api": {"enabled": False}}
    )
    assert CoordinatorDaemon(no_api).token == ""


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("executor", "accepted_notice_ms", -1.0),
        ("inference", "inline_max_macs", -1),
        ("executor", "input_cache_mib", -1),
    ],
)
def test_negative_values_are_refused_naming_the_key(section, key, value):
    with pytest.raises(ConfigError, match=key):
        node_config.config_from_dict({section: {key: value}}, "node.toml")
