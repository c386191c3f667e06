"""Faults fixed in the node daemon's operator surface (session 26): executor counters missing
from ``/metrics``, ``POST /position`` taken after the drain left the mesh, IPv6 addresses in
``/status`` without brackets, ``meshinfer-node status`` on a runtime file a SIGKILLed daemon left,
relative directories in ``node.toml`` taken from the working directory, a math-library thread
limit that raised holding the pools forever, and the start-up helpers' placement.

Real daemons (in this process, or as ``meshinfer-node run`` children), real HTTP on loopback,
real files. The same faults in the transport's ``Address`` text and in the coordinator's config
and client are tested here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest

from meshinfer.testing.cluster import LocalCluster
from node import cli as node_cli
from node.config import load_config, with_overrides
from node.daemon import NodeDaemon
from tests.helpers import until
from tests.test_node_surface_hunt import node, scrape

ROOT = Path(__file__).resolve().parents[1]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _gone_pid() -> int:
    """The pid of a process that ran and was reaped (nothing runs under it now)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


# --- 1. /metrics: the executor's dropped counter ---------------------------------------------
# (answers from a revoked peer are counted by the peer table now, which drops them before the
# executor: meshinfer_messages_from_revoked_total, tests/test_revocation_fixes27.py)


async def test_dropped_items_are_exported_as_a_counter(tmp_path):
    async with node(tmp_path) as daemon, aiohttp.ClientSession() as http:
        daemon.executor.stats.dropped = 3
        series, kinds = await scrape(http, daemon)  # (checks HELP and TYPE before samples)
    assert series["meshinfer_items_dropped_total", ()] == 3
    assert kinds["meshinfer_items_dropped_total"] == "counter"


# --- 2. POST /position once the drain has left the mesh ---------------------------------------


async def test_a_position_posted_after_the_leave_is_refused_not_answered_ok(tmp_path):
    async with node(tmp_path) as daemon, aiohttp.ClientSession() as http:
        url = daemon.http.url + "/position"
        async with http.post(url, json={"position": [1.0, 2.0]}) as response:
            assert response.status == 200  # still a member: gossiped
        await daemon.mesh.leave(timeout=0.1)  # as the drain does before it closes
        body = {"position": [5.0, 6.0], "velocity": [1.0, 0.0]}
        async with http.post(url, json=body) as response:
            assert response.status == 503
            assert "left the mesh" in (await response.json())["error"]
        assert daemon.mesh.membership.state.position == (1.0, 2.0)  # nothing taken
        async with http.post(url, data=b"{") as response:
            assert response.status == 400  # a bad body is still a bad body


# --- 3. IPv6 addresses in /status ------------------------------------------------------------


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host has no IPv6 loopback")
async def test_status_writes_an_ipv6_address_in_brackets(tmp_path, capsys):
    cluster = LocalCluster(tmp_path, fleet_id="v6")
    files = [cluster.add_node(f"node-{i}") for i in range(2)]
    v6 = {"network": {"listen": "[::1]:0"}}
    first = NodeDaemon(with_overrides(load_config(files[0]), **v6, discovery={"mdns": False}))
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(first.aclose)
        await first.start()
        port = first.mesh.address.port
        key = first.identity.certificate.static_public.hex()
        seed = f"node-0@[::1]:{port}?key={key}"
        second = NodeDaemon(
            with_overrides(load_config(files[1]), **v6, discovery={"mdns": False, "seeds": (seed,)})
        )
        stack.push_async_callback(second.aclose)
        await second.start()
        await until(lambda: [m.node_id for m in second.mesh.membership.core.members()])

        async with aiohttp.ClientSession() as http:
            async with http.get(second.http.url + "/status") as response:
                doc = await response.json()
        assert [m["address"] for m in doc["members"]] == [f"[::1]:{port}"]
        assert doc["session_address"] == f"[::1]:{second.mesh.address.port}"
        assert first.facts()["session"] == f"[::1]:{port}"  # READY and runtime.json too
        argv = ["status", "--url", second.http.url]
        assert await asyncio.to_thread(node_cli.main, argv) == 0
        table = capsys.readouterr().out
        assert f"at [::1]:{second.mesh.address.port}: ready" in table
        assert f"[::1]:{port} " in table


def test_address_text_puts_an_ipv6_host_in_brackets():
    from meshinfer.transport.base import Address

    assert str(Address("::1", 7946)) == "[::1]:7946"


# --- 4. meshinfer-node status on a runtime file a SIGKILLed daemon left ----------------------


def test_status_after_a_sigkill_says_no_daemon_runs_then_finds_the_next_one(
    tmp_path, capsys, monkeypatch
):
    with LocalCluster(tmp_path, fleet_id="stale") as cluster:
        cluster.add_node("node-0")
        data_dir = tmp_path / "data" / "node-0"
        first = cluster.start("node-0")
        argv = ["status", "--data-dir", str(data_dir)]
        assert node_cli.main(argv) == 0
        capsys.readouterr()

        cluster.kill("node-0")  # SIGKILL: the runtime file stays behind
        assert (data_dir / "runtime.json").exists()
        assert node_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"no daemon running (stale runtime file from pid {first.proc.pid}" in err
        assert "cannot reach" not in err

        second = cluster.start("node-0")  # the next one records itself once ready
        assert second.proc.pid != first.proc.pid
        assert node_cli.main(argv) == 0
        assert capsys.readouterr().out.startswith("node node-0 ")


def test_a_recorded_pid_reused_by_a_later_process_is_stale_and_a_live_one_is_not(tmp_path, capsys):
    runtime = tmp_path / "runtime.json"
    later = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        runtime.write_text(json.dumps({"pid": later.pid, "http": "http://127.0.0.1:9"}))
        an_hour_ago = runtime.stat().st_mtime - 3600  # written long before `later` started
        os.utime(runtime, (an_hour_ago, an_hour_ago))
        assert node_cli.main(["status", "--data-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"stale runtime file from pid {later.pid}" in err
    finally:
        later.communicate(timeout=30)
    runtime.write_text(json.dumps({"pid": os.getpid(), "http": "http://127.0.0.1:9"}))
    assert node_cli.main(["status", "--data-dir", str(tmp_path)]) == 2
    assert "cannot reach the daemon at http://127.0.0.1:9" in capsys.readouterr().err  # alive


def test_coordinator_cli_on_a_stale_runtime_file_says_no_coordinator_runs(tmp_path, capsys):
    from coordinator import cli as coord_cli

    token = tmp_path / "api-token"
    token.write_text("t" * 32)
    facts = {"pid": _gone_pid(), "api": "http://127.0.0.1:9", "token_file": str(token)}
    (tmp_path / "runtime.json").write_text(json.dumps(facts))
    assert coord_cli.main(["nodes", "--data-dir", str(tmp_path)]) == 2
    assert "stale runtime file" in capsys.readouterr().err


# --- 5. relative directories in node.toml -----------------------------------------------------


def test_relative_directories_are_taken_from_the_config_files_folder(tmp_path, monkeypatch):
    cluster = LocalCluster(tmp_path / "fleet-root", fleet_id="relative")
    cluster.enroll("node-0")  # fleet-root/nodes/node-0
    config = tmp_path / "fleet-root" / "node-0.toml"
    config.write_text(
        '[node]\nidentity_dir = "nodes/node-0"\ndata_dir = "data/node-0"\n'
        '[discovery]\nmdns = false\n[membership]\npreset = "test"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the daemon below inherits this working directory
    relative = Path(os.path.relpath(config, elsewhere))  # ../fleet-root/node-0.toml
    loaded = load_config(relative)
    assert loaded.node.identity_dir == str(tmp_path / "fleet-root" / "nodes" / "node-0")
    assert loaded.node.data_dir == str(tmp_path / "fleet-root" / "data" / "node-0")

    cluster.configs["node-0"] = relative
    with cluster:
        daemon = cluster.start("node-0")
        recorded = json.loads((tmp_path / "fleet-root/data/node-0/runtime.json").read_text())
        assert recorded["pid"] == daemon.proc.pid
        assert not (elsewhere / "data").exists()


def test_absolute_directories_and_files_read_without_a_path_are_left_alone(tmp_path):
    from node.config import config_from_dict

    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nidentity_dir = "{tmp_path / "id"}"\ndata_dir = ""\n')
    loaded = load_config(config)
    assert loaded.node.identity_dir == str(tmp_path / "id") and loaded.node.data_dir == ""
    parsed = config_from_dict({"node": {"identity_dir": "id"}})
    assert parsed.node.identity_dir == "id"  # no file: nothing to be relative to


def test_coordinator_relative_directories_are_taken_from_the_config_files_folder(
    tmp_path, monkeypatch
):
    from coordinator.config import load_config as load_coordinator_config

    config = tmp_path / "coord.toml"
    config.write_text(
        '[coordinator]\nidentity_dir = "coord"\ndata_dir = "data"\n'
        '[api]\ntoken_file = "fleet/api-token"\n'
    )
    monkeypatch.chdir(tmp_path.parent)
    loaded = load_coordinator_config(config)
    assert loaded.coordinator.identity_dir == str(tmp_path / "coord")
    assert loaded.coordinator.data_dir == str(tmp_path / "data")
    assert loaded.api.token_file == str(tmp_path / "fleet" / "api-token")


# --- 6. a thread limit that raises holds nothing ---------------------------------------------

CHILD = textwrap.dedent(
    """
    import json
    import numpy  # loads its BLAS
    from threadpoolctl import ThreadpoolController
    from meshinfer.inference.threads import cpu_thread_pools, limit_cpu_threads
    from meshinfer.inference.threads import restore_cpu_threads

    ThreadpoolController().limit(limits=3)  # above what the test asks: a no-op cannot pass
    before = cpu_thread_pools()
    try:
        limit_cpu_threads(1 << 70)  # the libraries' C int refuses it
        failed = None
    except Exception as exc:
        failed = type(exc).__name__
    limit_cpu_threads(1)
    during = cpu_thread_pools()
    restore_cpu_threads()
    print(json.dumps([before, failed, during, cpu_thread_pools()]))
    """
)


def test_a_limit_the_libraries_refuse_leaves_no_hold_behind():
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True,
        cwd=ROOT,
    ).stdout  # fmt: skip
    before, failed, during, after = json.loads(out.splitlines()[-1])
    if not before:
        pytest.skip("no math-library pool found (threadpoolctl sees no BLAS)")
    assert failed is not None  # (ctypes refuses an int that big)
    assert set(during.values()) == {1}
    assert after == before  # the last restore put them back: the failed call held nothing


# --- 7. where the start-up helpers live -------------------------------------------------------

PLACEMENT = textwrap.dedent(
    """
    import json, sys
    import coordinator.daemon
    coordinator_pulls = sorted(m for m in sys.modules if m.startswith("node.daemon"))
    import node.daemon
    cli_pulls = "meshinfer.fleetcli" in sys.modules
    from node.daemon import check_validity, load_identity, mesh_options, start_mesh
    from meshinfer.fleetcli import utc_text
    print(json.dumps([coordinator_pulls, cli_pulls, utc_text(0)]))
    """
)


def test_the_coordinator_daemon_needs_not_the_node_daemon_nor_it_the_cli_plumbing():
    out = subprocess.run(
        [sys.executable, "-c", PLACEMENT], capture_output=True, text=True, timeout=60,
        check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    coordinator_pulls, cli_pulls, epoch = json.loads(out.splitlines()[-1])
    assert coordinator_pulls == [] and cli_pulls is False
    assert epoch == "1970-01-01 00:00:00"


def test_the_command_lines_do_not_import_the_mesh_to_write_a_date():
    program = (
        "import json, sys; import meshinfer.fleetcli;"
        " print(json.dumps(sorted(m for m in sys.modules if m in"
        " ('meshinfer.runtime.node', 'meshinfer.runtime.session', 'zeroconf'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
        check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    assert json.loads(out.splitlines()[-1]) == []
