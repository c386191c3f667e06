"""Session 31 ("files"): what each change fixes, each test failing on the code before it.

1. a watch that stops for good (mDNS address watch, static re-announce task) is an ERROR naming
   what the node keeps (its address), whatever the exception; one failed look is a WARNING
   (``errors.log_stopped``), the node's outbound watch with the address it stays at;
2. ``meshinfer.discovery.mdns`` re-exports nothing for tests;
3. ``mdns_config``'s mapping functions take the adapters (no blocking ifaddr read inside);
4. fleet and node directory file names are constants, spelled once;
5. a config file's folder is computed once (``tomlconfig.config_folder``, ``Schema.load``);
6. ``atomic_files.stamp_settled`` (used by tests only) is gone from production.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import logging
import uuid
from dataclasses import replace
from pathlib import Path

import ifaddr
import pytest

from meshinfer.discovery.base import DiscoveryEvent
from meshinfer.discovery.mdns import MdnsDiscovery
from meshinfer.discovery.static import StaticDiscovery, StaticSeed
from meshinfer.errors import ConfigError
from tests.helpers import until
from tests.test_discovery_mdns import LOOPBACK, Recorder, make_advert


class WatchBroke(BaseException):
    """Not an Exception: what the watches' own ``except Exception`` does not catch."""


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _ended(task: asyncio.Task[None] | None) -> None:
    assert task is not None
    await until(task.done, timeout=5.0)
    await asyncio.sleep(0)  # done-callbacks run one loop step after the task ends


# --- 1. watches that stop for good, and looks that fail once ----------------------------------


async def test_a_dead_mdns_watch_is_an_error_naming_the_address_it_stays_at(
    caplog: pytest.LogCaptureFixture,
) -> None:
    looks = [0]

    def adapters() -> list[ifaddr.Adapter]:
        looks[0] += 1
        if looks[0] > 1:  # the start's look works; the watch's first one breaks
            raise WatchBroke("interface table gone")
        return list(ifaddr.get_adapters())

    config = replace(LOOPBACK, address_check_interval=0.01)
    fleet = f"f31-{uuid.uuid4().hex[:8]}"
    source = MdnsDiscovery(make_advert("a", fleet), Recorder(), config, adapters=adapters)
    with caplog.at_level(logging.WARNING, logger="meshinfer.discovery.mdns"):
        await source.start()
        try:
            await _ended(source._address_watch)
        finally:
            await source.aclose()
    errors = _errors(caplog)
    assert len(errors) == 1, [r.getMessage() for r in errors]
    said = errors[0].getMessage()
    assert said.startswith("mdns: the address watch stopped for good: interface table gone;")
    assert "stays at 127.0.0.1" in said  # was: no address
    assert isinstance(errors[0].exc_info[1], WatchBroke)


async def test_one_failed_look_is_a_warning_and_the_mdns_watch_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    looks = [0]

    def adapters() -> list[ifaddr.Adapter]:
        looks[0] += 1
        if looks[0] == 2:  # an interface going away mid-look
            raise OSError(19, "No such device")
        return list(ifaddr.get_adapters())

    config = replace(LOOPBACK, address_check_interval=0.01)
    fleet = f"f31-{uuid.uuid4().hex[:8]}"
    source = MdnsDiscovery(make_advert("a", fleet), Recorder(), config, adapters=adapters)
    with caplog.at_level(logging.WARNING, logger="meshinfer.discovery.mdns"):
        async with source:
            await until(lambda: looks[0] >= 4, timeout=5.0)  # it looked again after the failure
            assert source._address_watch is not None and not source._address_watch.done()
    assert _errors(caplog) == []  # was: an ERROR with a traceback
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("following the host's address change failed" in w for w in warned), warned


async def test_a_dead_static_reannounce_task_is_an_error_saying_what_stays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[DiscoveryEvent] = []

    def sink(event: DiscoveryEvent) -> None:  # an application's sink; the source's own rules
        events.append(event)
        if len(events) > 1:  # the start's report goes through; the first re-announce breaks
            raise WatchBroke("sink gone")

    seed = StaticSeed("rsu-1", "127.0.0.1", 7400, bytes(range(32)), "f31")
    source = StaticDiscovery(
        [seed], sink, own_node_id="me", fleet_id="f31", reannounce_interval=0.01
    )
    with caplog.at_level(logging.WARNING, logger="meshinfer.discovery.static"):
        await source.start()
        try:
            await _ended(source._reannouncer)
        finally:
            await source.aclose()
    errors = _errors(caplog)
    assert [r.getMessage() for r in errors] == [
        "static discovery: the re-announce task stopped for good: sink gone;"
        " its 1 seeds stay found but are re-announced no more"
    ]  # was: "... re-announce task failed: sink gone"


async def test_log_stopped_is_an_error_for_a_mesh_inference_error_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from meshinfer.errors import log_stopped

    log = logging.getLogger("tests.f31")
    where = ["10.0.0.1"]
    logged = log_stopped(log, "the watch", lambda: f"it stays at {where[0]}")

    async def fails() -> None:
        where[0] = "10.0.0.2"  # what it keeps is read when it stops
        raise ConfigError("bad table")

    async def returns() -> None:
        return None

    with caplog.at_level(logging.DEBUG, logger="tests.f31"):
        for run in (fails, returns, asyncio.Event().wait):
            task = asyncio.get_running_loop().create_task(run())
            task.add_done_callback(logged)
            if run is not fails and run is not returns:
                await asyncio.sleep(0)
                task.cancel()  # a cancelled watch did not fail: nothing logged
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "the watch stopped for good: bad table; it stays at 10.0.0.2"),
        (logging.ERROR, "the watch stopped for good: it returned; it stays at 10.0.0.2"),
    ]  # (log_failure says WARNING for a ConfigError: a task that may run again)


async def test_a_dead_node_address_watch_names_the_address_it_stays_at(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from meshinfer.proto.membership import MembershipConfig
    from meshinfer.runtime.node import MeshNode, MeshNodeOptions
    from meshinfer.testing.fleet import make_fleet
    from meshinfer.transport.base import Address

    fleet = make_fleet(None, ("car-a",))
    looks = [0]

    def outbound() -> str:
        looks[0] += 1
        if looks[0] > 1:
            raise WatchBroke("interface table gone")
        return "127.0.0.1"

    options = MeshNodeOptions(
        listen=Address("0.0.0.0", 0),
        mdns=None,
        membership=MembershipConfig.test(),
        address_check_interval=0.01,
    )
    node = MeshNode(fleet.identities["car-a"], fleet.revocations, options, outbound=outbound)
    with caplog.at_level(logging.ERROR):
        await node.start()
        try:
            await _ended(node._outbound_watch)
        finally:
            await node.aclose()
    errors = _errors(caplog)
    assert len(errors) == 1 and "127.0.0.1" in errors[0].getMessage()


# --- 2. no re-exports in mdns ------------------------------------------------------------------


def test_mdns_re_exports_nothing_for_tests() -> None:
    from meshinfer.discovery import mdns

    assert mdns.__all__ == ["MdnsConfig", "MdnsDiscovery"]
    gone = ("REFRESH_AT", "TXT_KEYS", "advert_from_txt", "pack_txt", "unpack_txt")
    gone += ("drop_foreign_loopback", "nearest_first")
    assert [name for name in gone if hasattr(mdns, name)] == []


# --- 3. no blocking default in mdns_config -----------------------------------------------------


def test_mdns_config_mappings_take_the_adapters() -> None:
    from meshinfer.discovery.mdns_config import MdnsConfig, advertised_addresses, resolve_interfaces

    config = MdnsConfig(interfaces=("lo",))
    for mapping in (resolve_interfaces, advertised_addresses):
        assert inspect.signature(mapping).parameters["adapters"].default is inspect.Parameter.empty
        with pytest.raises(TypeError):
            mapping(config)  # type: ignore[call-arg]  # was: read ifaddr here, blocking
    lo = [a for a in ifaddr.get_adapters() if a.name == "lo"]
    assert resolve_interfaces(config, lo) == ["127.0.0.1"]
    assert advertised_addresses(config, lo) == ("127.0.0.1",)
    assert resolve_interfaces(config, [], strict=False) == []  # lo gone since start


# --- 4. file names spelled once ----------------------------------------------------------------


def _literals(module: object) -> list[str]:
    """The string constants in ``module``'s code, docstrings left out."""
    tree = ast.parse(inspect.getsource(module))  # type: ignore[arg-type]
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    strings = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docs]
    return [n.value for n in strings if isinstance(n.value, str)]


def test_directory_file_names_are_constants_used_everywhere(tmp_path: Path) -> None:
    from meshinfer import fleet_dir, identity_files

    names = ["authority.key", "api-token", "revocations.bin", "issued.json", "fleet.json"]
    names += ["node.key", "node.pub", "node.cert"]
    found = _literals(fleet_dir) + _literals(identity_files)
    assert {name: found.count(name) for name in names} == dict.fromkeys(names, 1)
    fleet = fleet_dir.FleetDirectory(tmp_path)
    node = identity_files.NodeDirectory(tmp_path)
    assert fleet.fleet_json.name == node.fleet_json.name == fleet_dir.FLEET_JSON == "fleet.json"
    assert fleet.revocations_bin.name == node.revocations_bin.name == fleet_dir.REVOCATIONS_BIN
    assert fleet_dir.FLEET_FILES[-1] == fleet_dir.FLEET_JSON  # the trust anchor named last
    assert [p.name for p in fleet.files()] == list(fleet_dir.FLEET_FILES)
    assert (node.node_key.name, node.node_cert.name) == ("node.key", "node.cert")


def test_an_unfinished_fleet_is_still_named_with_the_trust_anchor(tmp_path: Path) -> None:
    from meshinfer.errors import IdentityError
    from meshinfer.fleet_dir import FleetDirectory, init_fleet

    fleet, _ = init_fleet(tmp_path, "f31", now=1_700_000_000.0)
    fleet.fleet_json.unlink()
    with pytest.raises(IdentityError, match=r"without fleet\.json: a `fleet init` was cut short"):
        FleetDirectory(tmp_path).trust()


# --- 5. the config folder, once ----------------------------------------------------------------


def test_a_schema_loads_relative_paths_from_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshinfer.tomlconfig import config_folder
    from node.config import SCHEMA, load_config

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "node.toml").write_text('[node]\nidentity_dir = "ids"\n')
    (tmp_path / "link.toml").symlink_to(tmp_path / "etc" / "node.toml")
    monkeypatch.chdir(tmp_path)
    assert config_folder("etc/node.toml") == tmp_path / "etc"
    assert config_folder("link.toml") == tmp_path  # the link's folder, as before
    keys = {"node": ("identity_dir", "data_dir")}
    for file in ("etc/node.toml", "link.toml"):
        loaded = SCHEMA.load(file, relative_paths=keys)
        assert loaded == load_config(file)
        assert loaded.node.identity_dir == str(config_folder(file) / "ids")
    assert SCHEMA.load("etc/node.toml").node.identity_dir == "ids"  # asked for none


# --- 6. stamp_settled out of production --------------------------------------------------------


def test_stamp_settled_is_gone_from_production() -> None:
    from meshinfer import atomic_files, identity_files

    assert not hasattr(atomic_files, "stamp_settled")
    assert not hasattr(identity_files, "stamp_settled")
    assert atomic_files.STAMP_SETTLE_NS == 5_000_000_000  # the revocation watch's still
