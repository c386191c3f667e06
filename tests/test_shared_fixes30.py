"""Session 30: things written once instead of twice, and two small faults.

1. relative config paths joined by one ``tomlconfig.paths_from`` (node and coordinator);
2. one ``LINGER_S`` for both HTTP servers (``runtime.http_log``);
3. one reader of a daemon's runtime file (``data_dir.read_runtime``) with its errors;
4. the node's and mDNS's address watches logged by ``loop.log_failure``;
6. ``CoordinatorClient`` refuses a timeout a socket would refuse (OverflowError before);
7. ``PeerDirectory``'s ``max_peers`` given at construction; ``mdns.__all__`` trimmed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import ifaddr
import pytest

from meshinfer.errors import ConfigError
from tests.helpers import until
from tests.test_discovery_mdns import LOOPBACK, Recorder, make_advert

# --- 1. relative paths in config files -------------------------------------------------------


def test_both_config_files_take_relative_paths_from_their_folder(tmp_path: Path) -> None:
    from coordinator.config import load_config as load_coordinator
    from meshinfer.tomlconfig import paths_from
    from node.config import load_config as load_node

    node_file = tmp_path / "node.toml"
    node_file.write_text('[node]\nidentity_dir = "ids"\ndata_dir = "/abs/data"\n')
    node = load_node(node_file)
    assert (node.node.identity_dir, node.node.data_dir) == (str(tmp_path / "ids"), "/abs/data")
    coord_file = tmp_path / "coord.toml"
    coord_file.write_text('[coordinator]\ndata_dir = "d"\n[api]\ntoken_file = "t"\n')
    coord = load_coordinator(coord_file)
    assert coord.coordinator.data_dir == str(tmp_path / "d")
    assert coord.api.token_file == str(tmp_path / "t")
    assert coord.coordinator.identity_dir == ""  # empty stays empty
    # nothing relative: the same object back
    assert paths_from(node, tmp_path, {"node": ("identity_dir", "data_dir")}) == node


# --- 2. the servers' lingering time ----------------------------------------------------------


def test_both_http_servers_linger_for_the_one_shared_time() -> None:
    from coordinator import api
    from meshinfer.runtime import http_log
    from node import http

    assert http.LINGER_S is http_log.LINGER_S and api.LINGER_S is http_log.LINGER_S


# --- 3. a daemon's runtime file --------------------------------------------------------------


def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


@pytest.mark.parametrize(
    "write, said",
    [
        (None, "no running coordinator recorded there (No such file or directory)"),
        ("dir", "no running coordinator recorded there (Is a directory)"),  # unreadable
        (b"{not json", "not a JSON document"),
        (b"\xff\xfe", "not a JSON document"),  # not UTF-8
        (b"[" * 100_000, "not a JSON document"),  # nested past the parser's limit
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"text"', "expected a JSON object, got str"),
    ],
    ids=["missing", "unreadable", "not-json", "not-utf8", "too-deep", "list", "string"],
)
def test_a_runtime_file_that_names_no_daemon_is_one_clear_error(
    tmp_path: Path, write: bytes | str | None, said: str
) -> None:
    from meshinfer.runtime.data_dir import read_runtime

    runtime = tmp_path / "runtime.json"
    if write == "dir":
        runtime.mkdir()
    elif isinstance(write, bytes):
        runtime.write_bytes(write)
    with pytest.raises(ConfigError) as caught:
        read_runtime(tmp_path, "coordinator")
    assert str(caught.value) == f"{runtime}: {said}"


def test_a_runtime_file_left_by_a_gone_daemon_is_stale_and_a_live_one_is_read(
    tmp_path: Path,
) -> None:
    from meshinfer.runtime.data_dir import read_runtime

    runtime = tmp_path / "runtime.json"
    gone = _gone_pid()
    runtime.write_text(json.dumps({"pid": gone, "http": None}))
    with pytest.raises(
        ConfigError, match=f"no daemon running \\(stale runtime file from pid {gone}"
    ):
        read_runtime(tmp_path)
    runtime.write_text(json.dumps({"pid": os.getpid(), "http": "http://127.0.0.1:9"}))
    assert read_runtime(tmp_path)["http"] == "http://127.0.0.1:9"


def test_the_node_cli_says_what_a_wrong_shaped_runtime_file_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node import cli as node_cli

    for text, said in [
        ("[1]", "expected a JSON object, got list"),  # was: "... (list indices must be ...)"
        ("{}", "no running daemon recorded there (no http URL)"),
        ('{"http": 5}', "no running daemon recorded there (http: 5)"),
    ]:
        (tmp_path / "runtime.json").write_text(text)
        assert node_cli.main(["status", "--data-dir", str(tmp_path)]) == 2
        assert said in capsys.readouterr().err


# --- 4. background watches logged by log_failure ---------------------------------------------


class WatchBroke(BaseException):
    """Not an Exception: what the watch's own ``except Exception`` does not catch."""


async def test_a_dead_mdns_address_watch_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    from meshinfer.discovery.mdns import MdnsDiscovery

    looks = [0]

    def adapters() -> list[ifaddr.Adapter]:
        looks[0] += 1
        if looks[0] > 1:  # the start's look works; the watch's first one breaks
            raise WatchBroke("interface table gone")
        return list(ifaddr.get_adapters())

    config = replace(LOOPBACK, address_check_interval=0.01)
    source = MdnsDiscovery(make_advert("a", "f30"), Recorder(), config, adapters=adapters)
    with caplog.at_level(logging.ERROR, logger="meshinfer.discovery.mdns"):
        await source.start()
        try:
            watch = source._address_watch
            assert watch is not None
            await until(watch.done, timeout=5.0)
            await asyncio.sleep(0)  # done-callbacks run one loop step after the task ends
        finally:
            await source.aclose()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "mdns: the address watch stopped for good: interface table gone; our advert stays at"
        " 127.0.0.1; host and peers' addresses are looked at no more"
    ]  # (session 31: "for good", with the address it stays at)
    assert isinstance(errors[0].exc_info[1], WatchBroke)


# --- 6. the client's timeout -----------------------------------------------------------------


def test_the_client_refuses_a_timeout_no_socket_takes_and_takes_a_day() -> None:
    from coordinator.client import ApiError, CoordinatorClient

    day = 86400.0  # coordinator.client.MAX_REQUEST_TIMEOUT_S, as the CLI's --timeout

    token = "t" * 32
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    for timeout in (1e10, day + 1, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="of at most 86400 "):
            CoordinatorClient(url, token, timeout=timeout)  # 1e10 was: OverflowError at a call
    client = CoordinatorClient(url, token, timeout=day)
    with pytest.raises(ApiError) as caught:  # the socket takes a day
        client.nodes()
    assert caught.value.code == "unreachable"


# --- 7. mDNS: max_peers, __all__ -------------------------------------------------------------


def test_a_peer_directory_gets_its_bound_at_construction() -> None:
    from meshinfer.discovery.base import DiscoveryStats, PeerDirectory

    events: list[object] = []
    directory = PeerDirectory("me", "f", events.append, DiscoveryStats(), "test", max_peers=1)
    assert directory.max_peers == 1
    directory.sight(make_advert("p1", "f"), 0.0)
    directory.sight(make_advert("p2", "f"), 0.0)
    assert list(directory.peers) == ["p1"] and directory.stats.ignored_full == 1


def test_mdns_exports_only_names_imported_from_it() -> None:
    from meshinfer.discovery import mdns

    for name in ("TXT_VERSION", "AdapterSource", "Network", "host_addresses"):
        assert name not in mdns.__all__
    assert all(hasattr(mdns, name) for name in mdns.__all__)
