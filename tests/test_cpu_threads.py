"""``[inference] cpu_threads``: the math libraries' thread pools, limited at node daemon start.

The limit is process-wide, so what :func:`limit_cpu_threads` does to this process is checked in
a child process; the daemon test runs here and checks the pools are put back when it closes.
Every pool is first set to 3 threads (more than the 1 or 2 the tests ask for, on any machine),
so that a limit that did nothing cannot pass.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
import threadpoolctl

from meshinfer.errors import ConfigError
from meshinfer.inference import threads
from meshinfer.inference.threads import cpu_thread_pools, limit_cpu_threads, restore_cpu_threads
from meshinfer.testing.cluster import LocalCluster
from node import config as node_config
from node.config import load_config
from node.daemon import NodeDaemon

ROOT = Path(__file__).resolve().parents[1]
TINY = "synthetic-mlp@w10-d1"


def pool_sizes() -> list[int]:
    """The thread count of every math-library pool loaded in this process (threadpoolctl)."""
    return [info["num_threads"] for info in threadpoolctl.threadpool_info()]


# --- the config key ---------------------------------------------------------------------------


def test_the_default_is_one_thread_per_pool_and_documented():
    assert node_config.NodeConfig().inference.cpu_threads == node_config.CPU_THREADS == 1
    rendered = node_config.render_defaults().splitlines()
    line = rendered.index("cpu_threads = 1")
    assert rendered[line - 1].startswith("# threads each math-library pool")


@pytest.mark.parametrize("value", [0, 1, 16])
def test_zero_and_positive_counts_are_accepted(value):
    config = node_config.config_from_dict({"inference": {"cpu_threads": value}})
    assert config.inference.cpu_threads == value


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (-1, "[inference] cpu_threads must be >= 0"),
        ("2", "[inference] cpu_threads: expected int, got str"),
        (1.5, "[inference] cpu_threads: expected int, got float"),
        (True, "[inference] cpu_threads: expected int, got bool"),
    ],
)
def test_bad_counts_are_config_errors_naming_the_key(value, named):
    with pytest.raises(ConfigError) as info:
        node_config.config_from_dict({"inference": {"cpu_threads": value}}, "node.toml")
    assert str(info.value).startswith("node.toml: ")
    assert named in str(info.value)


# --- limit_cpu_threads, in a child process ----------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json
    import numpy  # loads its BLAS
    from threadpoolctl import threadpool_info, threadpool_limits
    from meshinfer.inference.threads import limit_cpu_threads, restore_cpu_threads

    def pools():
        return [i["num_threads"] for i in threadpool_info()]

    threadpool_limits(limits=3)  # the libraries' "own" size here, whatever the machine
    seen = {"apis": [i["user_api"] for i in threadpool_info()], "own": pools()}
    seen["limit_2"] = limit_cpu_threads(2)
    seen["after_2"] = pools()
    seen["limit_1"] = limit_cpu_threads(1)
    seen["after_1"] = pools()
    restore_cpu_threads()
    seen["one_holder_left"] = pools()
    restore_cpu_threads()
    seen["none_left"] = pools()
    restore_cpu_threads()
    seen["extra_restore"] = pools()
    seen["limit_0"] = limit_cpu_threads(0)
    seen["after_0"] = pools()
    print(json.dumps(seen))
    """
)


@pytest.fixture(scope="module")
def child_seen() -> dict:
    """What the child process running :data:`CHILD` saw."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_limit_sets_every_loaded_pool_as_threadpoolctl_reports_it(child_seen):
    assert "blas" in child_seen["apis"]  # numpy's BLAS is there to be limited
    assert set(child_seen["own"]) == {3}
    assert set(child_seen["after_2"]) == {2}
    assert set(child_seen["after_1"]) == {1}
    assert set(child_seen["limit_1"].values()) == {1}
    assert len(child_seen["limit_1"]) == len(child_seen["own"])  # one entry per pool


def test_the_last_holder_puts_the_pools_back_as_they_were(child_seen):
    assert set(child_seen["one_holder_left"]) == {1}  # another holder still wants its limit
    assert child_seen["none_left"] == child_seen["own"]
    assert child_seen["extra_restore"] == child_seen["own"]


def test_zero_changes_nothing_and_reports_the_pools(child_seen):
    assert child_seen["after_0"] == child_seen["own"]
    assert sorted(child_seen["limit_0"].values()) == sorted(child_seen["own"])


def test_without_threadpoolctl_nothing_changes_and_a_warning_says_why(monkeypatch, caplog):
    before = pool_sizes()
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import threadpoolctl fails
    monkeypatch.setattr(threads, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=threads.__name__):
        assert limit_cpu_threads(1) == {}
        assert cpu_thread_pools() == {}
        restore_cpu_threads()
    assert [r.getMessage() for r in caplog.records] == [
        "threadpoolctl is not installed: math-library threads left as they are"
    ]
    monkeypatch.undo()
    assert pool_sizes() == before


def test_negative_counts_are_refused():
    with pytest.raises(ConfigError, match=">= 0"):
        limit_cpu_threads(-1)


# --- the node daemon --------------------------------------------------------------------------


@pytest.mark.parametrize("cpu_threads", [0, 2])
async def test_the_daemon_limits_the_pools_shows_them_in_status_and_puts_them_back(
    tmp_path, caplog, cpu_threads
):
    assert threads._holders == 0, "a daemon of an earlier test still holds the limit"
    cluster = LocalCluster(tmp_path, fleet_id="threads-test")
    extra = f'[inference]\nmodels = ["{TINY}"]\ncpu_threads = {cpu_threads}\n'
    daemon = NodeDaemon(load_config(cluster.add_node("node-0", extra=extra)))
    with threadpoolctl.threadpool_limits(limits=3):  # the libraries' "own" size in this test
        try:
            with caplog.at_level(logging.INFO, logger="node.daemon"):
                await daemon.start()
            expected = cpu_threads or 3
            assert set(pool_sizes()) == {expected}
            async with aiohttp.ClientSession() as http, http.get(f"{daemon.http.url}/status") as r:
                status = (await r.json())["cpu_threads"]
        finally:
            await daemon.aclose()
        assert set(pool_sizes()) == {3}  # put back once the daemon is closed
    assert status["setting"] == cpu_threads
    assert set(status["pools"].values()) == {expected}
    assert len(status["pools"]) == len(pool_sizes())
    logged = [r.getMessage() for r in caplog.records if "math-library threads" in r.getMessage()]
    assert len(logged) == 1
    assert f"={expected}" in logged[0]
