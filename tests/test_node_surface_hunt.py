"""Faults found in the node daemon's operator surface: its HTTP endpoint (``/metrics``,
``/status``, ``POST /position``), ``meshinfer-node status``, ``config --check`` and ``run``'s
start-up, and its host telemetry.

Real daemons in this process (TCP, Noise, mDNS on loopback, the NumPy engine), asked over real
HTTP; the CLI runs in process (``main(argv)``) or, where what it imports matters, as a child
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from meshinfer.errors import ConfigError
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.runtime import telemetry
from meshinfer.testing.cluster import LocalCluster
from node import cli as node_cli
from node.config import MAX_CPU_THREADS, load_config
from node.daemon import NodeDaemon
from tests.helpers import until
from tests.test_coordinator_service import Mesh, hold_inference, spec

# --- helpers ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def node(tmp_path: Path, extra: str = "") -> AsyncIterator[NodeDaemon]:
    """One started node daemon (no coordinator) with the TOML lines ``extra``."""
    config = LocalCluster(tmp_path, fleet_id="hunt").add_node("node-0", extra=extra)
    daemon = NodeDaemon(load_config(config), rng=random.Random(0))
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.aclose()


def http_port(daemon: NodeDaemon) -> int:
    return daemon.http._runner.addresses[0][1]


def other_address_of_this_host() -> str | None:
    """An IPv4 address of this host's that is not a loopback one, if it has any."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|'
    r'\\[\\"n])*",?)*)\})? (?P<value>\S+)$'
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def exposition(text: str) -> tuple[Series, dict[str, str]]:
    """Check ``text`` against the Prometheus text format 0.0.4 strictly (one HELP and one TYPE
    line per family before its samples, samples of the family just declared, no series twice,
    counters named ``_total``, histograms cumulative and ending at ``_count``); its series, and
    each sample name's kind."""
    series: Series = {}
    declared: dict[str, str] = {}
    kinds: dict[str, str] = {}
    current, kind, helped = "", "", set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helped and name not in declared, f"second HELP: {line}"
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, current, kind = line.split(" ")
            assert current in helped and current not in declared, f"TYPE out of place: {line}"
            assert kind in ("counter", "gauge", "histogram"), line
            assert kind != "counter" or current.endswith("_total"), line
            declared[current] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name = m["name"]
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ()
            assert name == current or name in (current + s for s in suffixes), line
            labels = tuple(sorted(_LABEL.findall(m["labels"] or "")))
            assert len(dict(labels)) == len(labels), f"a label twice: {line}"
            assert (name, labels) not in series, f"series twice: {line}"
            value = float(m["value"])
            assert not math.isnan(value), line
            series[name, labels] = value
            kinds[name] = kind
    for name, kind in declared.items():
        if kind == "histogram":
            _check_histogram(name, series)
    return series, kinds


def _check_histogram(name: str, series: Series) -> None:
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for (sample, labels), value in series.items():
        if sample == name + "_bucket":
            rest = tuple(kv for kv in labels if kv[0] != "le")
            buckets.setdefault(rest, []).append((float(dict(labels)["le"]), value))
    for labels, rows in buckets.items():
        counts = [count for _, count in sorted(rows)]
        assert counts == sorted(counts), f"{name}{labels}: buckets not cumulative"
        assert max(le for le, _ in rows) == math.inf
        assert counts[-1] == series[name + "_count", labels]


async def scrape(http: aiohttp.ClientSession, daemon: NodeDaemon) -> tuple[Series, dict[str, str]]:
    async with http.get(daemon.http.url + "/metrics") as response:
        assert response.status == 200
        return exposition(await response.text())


# --- POST /position from another host ---------------------------------------------------------


async def test_position_from_a_non_loopback_address_is_refused_over_real_http(tmp_path):
    other = other_address_of_this_host()
    if other is None:
        pytest.skip("this host has no address but loopback ones to come from")
    async with node(tmp_path, '[http]\nlisten = "0.0.0.0:0"\n') as daemon:
        port = http_port(daemon)
        body = {"position": [10.0, 20.0], "velocity": [1.0, 0.0]}
        connector = aiohttp.TCPConnector(local_addr=(other, 0))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.post(f"http://{other}:{port}/position", json=body) as response:
                assert response.status == 403
                assert "loopback" in (await response.json())["error"]
        assert daemon.mesh.membership.state.position is None  # nothing was taken
        async with aiohttp.ClientSession() as http:  # the same endpoint, from loopback
            async with http.post(f"http://127.0.0.1:{port}/position", json=body) as response:
                assert response.status == 200
        assert daemon.mesh.membership.state.position == (10.0, 20.0)


# --- malformed requests -----------------------------------------------------------------------


async def test_a_body_in_a_charset_python_has_no_codec_for_is_a_400_not_a_500(tmp_path):
    async with node(tmp_path) as daemon, aiohttp.ClientSession() as http:
        url = daemon.http.url + "/position"
        headers = {"Content-Type": "application/json; charset=klingon"}
        async with http.post(url, data=b'{"position": [1, 2]}', headers=headers) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "the body must be JSON"
        assert daemon.mesh.membership.state.position is None


async def test_a_client_that_never_finishes_its_request_does_not_hold_up_the_stop(tmp_path):
    async with node(tmp_path) as daemon:
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port(daemon))
        writer.write(
            b"POST /position HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 100\r\n\r\n{"
        )
        # routed to the handler, which now waits for the 99 bytes that never come
        assert (await reader.readline()).startswith(b"HTTP/1.1 100 Continue")
        try:
            # aiohttp's default waited 60 s for that request (SHUTDOWN_GRACE_S now)
            async with asyncio.timeout(30):
                await daemon.aclose()
        finally:
            writer.close()


# --- /metrics and `meshinfer-node status`, working and draining -------------------------------


async def test_metrics_are_valid_exposition_with_counters_that_only_grow_through_a_drain(
    tmp_path, capsys
):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, http=True) as mesh, aiohttp.ClientSession() as http:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        await until(lambda: daemon.snapshot is not None)  # the host figures too
        before, _ = await scrape(http, daemon)
        assert ("meshinfer_node_memory_available_bytes", ()) in before
        for i in range(2):
            record = await c.wait(await c.submit(spec(f"t{i}", "batch", x[:20])), timeout=10)
            assert record.state.value == "succeeded"
        gate = hold_inference(daemon)
        await c.submit(spec("held", "single", x[:1]))
        await until(lambda: daemon.executor.running == 1)
        draining = asyncio.create_task(daemon.drain_and_close(timeout=10))
        await until(daemon.stopping.is_set)

        during, kinds = await scrape(http, daemon)
        for (name, labels), value in before.items():
            if kinds[name] in ("counter", "histogram"):
                assert during[name, labels] >= value, (name, labels)
        completed = during["meshinfer_items_total", (("outcome", "completed"),)]
        assert completed >= 2 > before["meshinfer_items_total", (("outcome", "completed"),)]

        argv = ["status", "--data-dir", str(daemon.data_dir)]
        assert await asyncio.to_thread(node_cli.main, argv) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.endswith(": NOT READY: draining")
        gate.set()
        await draining
        mesh.daemons.pop("node-0")  # closed by its drain


# --- host telemetry ---------------------------------------------------------------------------


def test_a_load_average_that_raises_leaves_the_other_host_figures_sampled(monkeypatch, caplog):
    collector = telemetry.TelemetryCollector(gpu=False)

    def denied() -> tuple[float, float, float]:
        raise psutil.AccessDenied()  # a psutil.Error: no OSError

    monkeypatch.setattr(telemetry.psutil, "getloadavg", denied)
    with caplog.at_level(logging.WARNING, logger=telemetry.__name__):
        first = collector.collect()
        second = collector.collect()
    assert first.load_average_1m is None and first.memory_available_bytes > 0
    assert second.memory_available_bytes > 0
    warned = [r for r in caplog.records if "getloadavg" in r.getMessage()]
    assert len(warned) == 1  # once, until it reads again

    monkeypatch.setattr(telemetry.psutil, "getloadavg", lambda: (0.5, 0.25, 0.125))
    assert collector.collect().load_average_1m == 0.5
    monkeypatch.setattr(telemetry.psutil, "getloadavg", denied)
    assert collector.collect().load_average_1m == 0.5  # its last reading is kept
    collector.close()


# --- configuration: clear errors naming the key -----------------------------------------------


def check(tmp_path: Path, text: str, capsys) -> tuple[int, str]:
    """``meshinfer-node config --check`` of a file holding ``text``: (exit code, stderr)."""
    path = tmp_path / "node.toml"
    path.write_text(text)
    code = node_cli.main(["config", "--check", str(path)])
    return code, capsys.readouterr().err


def test_cpu_threads_beyond_what_the_libraries_take_is_refused_naming_the_key(tmp_path, capsys):
    code, err = check(tmp_path, f"[inference]\ncpu_threads = {1 << 70}\n", capsys)
    assert code == 2 and f"[inference] cpu_threads must be at most {MAX_CPU_THREADS}" in err
    assert check(tmp_path, f"[inference]\ncpu_threads = {MAX_CPU_THREADS}\n", capsys)[0] == 0


@pytest.mark.parametrize(
    ("network", "key"),
    [
        ('listen = "localhost:0"', "[network] listen"),
        ('advertise_host = "node-7.fleet.example"', "[network] advertise_host"),
    ],
)
def test_a_host_name_mdns_cannot_advertise_is_refused_naming_the_key(
    tmp_path, capsys, network, key
):
    code, err = check(tmp_path, f"[network]\n{network}\n", capsys)
    assert code == 2 and f"{key}: mDNS ([discovery] mdns) advertises an IP address" in err
    text = f"[network]\n{network}\n[discovery]\nmdns = false\n"
    assert check(tmp_path, text, capsys)[0] == 0  # a name is fine for seeds and gossip


@pytest.mark.parametrize(
    "network", ['listen = "0.0.0.0:0"', 'listen = "[::1]:0"', 'advertise_host = "fd00::2"']
)
def test_addresses_mdns_can_advertise_still_pass(tmp_path, capsys, network):
    assert check(tmp_path, f"[network]\n{network}\n", capsys) == (0, "")


async def test_a_model_missing_from_the_registry_is_a_start_error_naming_the_key(tmp_path):
    extra = '[inference]\nmodels = ["digits-mlp@1", "digits-mlp@7"]\n'
    config = LocalCluster(tmp_path, fleet_id="hunt").add_node("node-0", extra=extra)
    daemon = NodeDaemon(load_config(config), rng=random.Random(0))
    try:
        with pytest.raises(ConfigError, match=r"^\[inference\] models\[1\]: .*digits-mlp@7"):
            await daemon.start()
    finally:
        await daemon.aclose()


def test_config_check_does_not_import_the_daemon(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[inference]\nmodels = ["digits-mlp@1"]\n')
    program = (
        "import sys; from node.cli import main; code = main(['config', '--check', sys.argv[1]]);"
        " print(json.dumps([code, sorted(m for m in sys.modules if m.startswith('node.'))]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + program, str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    code, modules = json.loads(out.splitlines()[-1])
    assert code == 0 and "node.daemon" not in modules, modules
