"""The node daemon as its operators meet it: its loopback HTTP endpoints, ``meshinfer-node
status``, and readiness while it drains.

Real daemons in this process (TCP, Noise, mDNS on loopback, the NumPy engine) next to a real
coordinator; the HTTP endpoints are asked over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from coordinator.service import CoordinatorConfig
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.testing.cluster import LocalCluster
from node import cli as node_cli
from tests.helpers import until
from tests.test_coordinator_service import Mesh, hold_inference, spec


async def _get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, response.content_type, await response.text()


async def test_healthz_readyz_metrics_and_status_answer_over_http(tmp_path):
    async with Mesh(tmp_path, n=1, http=True) as mesh:
        daemon = mesh.daemons["node-0"]
        base = daemon.http.url
        assert base.startswith("http://127.0.0.1:")  # loopback by default

        status, kind, body = await _get(base + "/healthz")
        assert (status, kind) == (200, "application/json")
        assert json.loads(body) == {"status": "alive", "node_id": "node-0"}

        status, _, body = await _get(base + "/readyz")
        assert (status, json.loads(body)) == (200, {"ready": True, "problems": []})

        x, _ = load_digits_holdout()
        record = await mesh.coordinator.wait(
            await mesh.coordinator.submit(spec("counted", "single", x[:3])), timeout=10
        )
        assert record.state.value == "succeeded"
        status, kind, body = await _get(base + "/metrics")
        assert (status, kind) == (200, "text/plain")
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert "meshinfer_handshakes" in families  # the parser drops the _total suffix
        records = families["meshinfer_session_records"].samples
        assert {s.labels["direction"] for s in records} == {"sent", "received"}
        checked = families["meshinfer_older_sessions_checked"].samples
        outcomes = {s.labels["outcome"]: s.value for s in checked}
        assert outcomes.keys() == {"answered", "silent"} and outcomes["silent"] == 0
        assert "meshinfer_input_cache_bytes" in families
        requests = families["meshinfer_batcher_requests"]
        completed = {
            s.labels["model"]: s.value
            for s in requests.samples
            if s.name.endswith("_total") and s.labels["outcome"] == "completed"
        }
        assert completed["digits-mlp@1"] >= 1  # the task above went through the batcher

        status, _, body = await _get(base + "/status")
        doc = json.loads(body)
        assert status == 200 and doc["node_id"] == "node-0" and doc["ready"] is True
        assert doc["executor"]["completed"] >= 1
        assert [m["node_id"] for m in doc["members"]] == ["coord"]
        assert "coord" in doc["sessions"]


async def test_status_command_reads_the_daemons_runtime_file(tmp_path, capsys):
    async with Mesh(tmp_path, n=2, http=True) as mesh:
        node = mesh.daemons["node-0"]
        await mesh.daemons.pop("node-1").aclose()
        await until(lambda: not node.mesh.membership.core.member("node-1").is_live)
        main = node_cli.main
        assert await asyncio.to_thread(main, ["status", "--data-dir", str(node.data_dir)]) == 0
        table = capsys.readouterr().out.splitlines()
        fleet = mesh.cluster.fleet_id
        assert table[0].startswith(f"node node-0 (fleet {fleet}) at 127.0.0.1:")
        assert table[0].endswith(": ready")
        assert table[1].startswith("engine numpy, models digits-mlp@1")
        assert table[2].split() == ["member", "status", "address", "queue", "models"]
        assert table[3].split()[:2] == ["coord", "alive"]
        name, status, _address, queue = table[4].split()[:4]
        assert (name, status in ("dead", "left"), queue) == ("node-1", True, "-")

        argv = ["status", "--url", node.http.url, "--json"]
        assert await asyncio.to_thread(main, argv) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["node_id"] == "node-0" and doc["cpu_threads"]["setting"] == 1
        left = [m for m in doc["members"] if m["node_id"] == "node-1"]
        assert left[0]["queue_depth"] is None  # its last gossiped one is stale

    empty = tmp_path / "no-daemon"
    empty.mkdir()
    assert node_cli.main(["status", "--data-dir", str(empty)]) == 2
    assert "no running daemon recorded there" in capsys.readouterr().err


async def test_a_draining_daemon_is_not_ready_and_finishes_what_it_runs(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, http=True) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        readyz = daemon.http.url + "/readyz"
        gate = hold_inference(daemon)
        task_id = await c.submit(spec("running", "single", x[:2]))
        await until(lambda: daemon.executor.running == 1)

        draining = asyncio.create_task(daemon.drain_and_close(timeout=10))
        await until(lambda: daemon.stopping.is_set())
        status, _, body = await _get(readyz)
        assert (status, json.loads(body)) == (503, {"ready": False, "problems": ["draining"]})
        assert not draining.done()  # it waits for the running item

        gate.set()
        await draining
        record = await c.wait(task_id, timeout=10)
        assert record.state.value == "succeeded"
        assert [i.attempt for i in record.items] == [1]  # finished there, not run again
        assert daemon.executor.stats.handed_back == 0
        mesh.daemons.pop("node-0")  # closed by its drain


async def test_a_draining_daemon_stops_being_offered_work_at_once(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2) as mesh:
        c, daemon = mesh.coordinator, mesh.daemons["node-0"]
        gate = hold_inference(daemon)  # the drain waits for the item it runs
        for i in range(2):  # one to each node
            await c.submit(spec(f"held{i}", "single", x[:1], policy="round_robin"))
        await until(lambda: daemon.executor.running == 1)
        draining = asyncio.create_task(daemon.drain_and_close(timeout=10))

        def models_of_node_0() -> list[str]:
            return next(n["models"] for n in c.nodes() if n["node_id"] == "node-0")

        await until(lambda: models_of_node_0() == [])  # gossiped: it serves nothing any more
        ids = [await c.submit(spec(f"t{i}", "single", x[i : i + 1])) for i in range(6)]
        for task_id in ids:  # none bounced off the drain
            record = await c.wait(task_id, timeout=10)
            assert [(i.node, i.attempt) for i in record.items] == [("node-1", 1)]
        gate.set()
        await draining
        mesh.daemons.pop("node-0")  # closed by its drain


async def test_an_unexpected_error_running_an_item_is_answered_at_once_not_left_to_the_timeout(
    tmp_path, caplog
):
    x, _ = load_digits_holdout()
    config = CoordinatorConfig(item_timeout_s=60.0, max_attempts=1)
    async with Mesh(tmp_path, n=1, config=config) as mesh:
        # a bug in the executor itself, once the item ran (an engine's errors, and outputs
        # the wire cannot carry, are InferenceErrors: the batcher and the packing say so)
        def buggy() -> str:
            raise ValueError("a bug")

        mesh.daemons["node-0"].executor._device = buggy
        c = mesh.coordinator
        record = await c.wait(await c.submit(spec("bug", "single", x[:1])), timeout=10)
        assert record.state.value == "failed", "the node never answered"
        assert "node node-0 failed: ValueError: a bug" in (record.summary.error or "")
        assert "item bug/0 failed unexpectedly" in caplog.text


def test_a_sigterm_while_the_start_hangs_stops_the_real_daemon_without_ready(tmp_path):
    """A real ``meshinfer-node run`` whose start waits on a Triton server that never answers:
    SIGTERM cancels the start, closes what started and exits 0 without READY (not after the
    engine's own timeout, with its error)."""
    with socket.socket() as silent:  # takes connections, never answers one
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        silent.settimeout(30)
        host, port = silent.getsockname()
        cluster = LocalCluster(tmp_path)
        engine = f'[inference]\nengine = "triton"\ntriton_url = "{host}:{port}"\n'
        config = cluster.add_node("veh-1", extra=engine)
        argv = [sys.executable, "-m", "node.cli", "run", "--config", str(config)]
        with open(tmp_path / "veh-1.log", "w") as log:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            waiting, _ = silent.accept()  # the start now waits for Triton's answer
            with waiting:
                proc.send_signal(signal.SIGTERM)
                out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log_text = (tmp_path / "veh-1.log").read_text()
    assert (proc.returncode, out.splitlines()) == (0, ["STOPPED veh-1"]), log_text[-2000:]
    assert "stopping during the start-up (SIGTERM)" in log_text
    assert "is not ready" not in log_text
