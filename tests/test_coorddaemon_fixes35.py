"""The coordinator daemon's start-up, configuration and certificates (session 35).

* ``[coordinator] max_attempts`` had no upper bound: one over 2**63 was accepted, and the next
  start with an item in flight died in its recovery with a traceback (SQLite cannot bind it).
  Now it is at most :data:`~coordinator.service_config.MAX_ATTEMPTS`, a ConfigError naming the
  key (``config --check`` and ``serve``).
* ``retry_backoff_s`` over ``retry_backoff_max_s`` was taken silently (every delay the longest
  one); now it is a ConfigError naming both keys.
* A coordinator whose own certificate its identity directory's revocation list revokes
  started, printed READY and sat alone (every peer's handshake refuses it), where an expired
  one is refused at start. Now it is one clear error line, exit 2, without READY.
* A ``CoordinatorDaemon`` made with an invalid ``[coordinator]`` section (built in code, not
  read from a file) failed only in ``start()``, after it had joined the mesh (and with the
  journal handed over to no coordinator, left open). Now the constructor refuses it.
* A second signal while the coordinator closed (its drain cut short) left its journal open
  (``Coordinator.aclose`` called again returned at once): the daemon now waits for the close
  under way.

Real parts: TOML files, SQLite journals, TCP on loopback, ``meshinfer-coord`` subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator import config as coord_config
from coordinator.cli import main
from coordinator.daemon import CoordinatorDaemon
from coordinator.journal import Journal
from coordinator.service_config import MAX_ATTEMPTS, CoordinatorConfig
from meshinfer.errors import ConfigError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.tomlconfig import with_overrides
from tests.test_coordinator_cli import one_line_error, serve_config

REPO = Path(__file__).resolve().parents[1]
ROWS = Tensor.from_array(np.zeros((1, 64), np.float32))


def with_settings(path: Path, lines: str) -> Path:
    """``path`` with ``lines`` added to its ``[coordinator]`` section."""
    text = path.read_text().replace("[coordinator]\n", f"[coordinator]\n{lines}\n", 1)
    path.write_text(text)
    return path


def start_serve(config: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --- bounds and cross-key checks ------------------------------------------------------------


@pytest.mark.parametrize("value", [MAX_ATTEMPTS + 1, 2**63, 10**23])
def test_max_attempts_over_its_bound_is_refused_naming_the_key(tmp_path, capsys, value):
    config = with_settings(serve_config(tmp_path, tmp_path / "data"), f"max_attempts = {value}")
    capsys.readouterr()
    assert main(["config", "--check", str(config)]) == 2
    one_line_error(capsys, "[coordinator] max_attempts", f"at most {MAX_ATTEMPTS}", str(value))
    with pytest.raises(ConfigError, match="max_attempts must be at most"):
        CoordinatorConfig(max_attempts=value)


def test_max_attempts_at_its_bound_is_taken(tmp_path):
    path = with_settings(serve_config(tmp_path, tmp_path / "d"), f"max_attempts = {MAX_ATTEMPTS}")
    assert coord_config.load_config(path).coordinator.max_attempts == MAX_ATTEMPTS
    assert CoordinatorConfig(max_attempts=MAX_ATTEMPTS).max_attempts == MAX_ATTEMPTS


@pytest.mark.parametrize(
    ("lines", "refused"),
    [
        ("retry_backoff_s = 5.0", True),  # over the default longest delay, 2.0
        ("retry_backoff_s = 1.0\nretry_backoff_max_s = 0.5", True),
        ("retry_backoff_s = 0.5\nretry_backoff_max_s = 0.5", False),
        ("retry_backoff_s = 0.0\nretry_backoff_max_s = 0.001", False),
    ],
)
def test_a_first_retry_delay_over_the_longest_is_refused(tmp_path, capsys, lines, refused):
    config = with_settings(serve_config(tmp_path, tmp_path / "data"), lines)
    capsys.readouterr()
    assert main(["config", "--check", str(config)]) == (2 if refused else 0)
    values = dict(line.split(" = ") for line in lines.splitlines())
    knobs = {k: float(v) for k, v in values.items()}
    if refused:
        one_line_error(capsys, "[coordinator] retry_backoff_s", "at most retry_backoff_max_s")
        with pytest.raises(ConfigError, match=r"retry_backoff_s .* must be at most"):
            CoordinatorConfig(**knobs)
    else:
        CoordinatorConfig(**knobs)


def test_an_invalid_coordinator_section_is_refused_before_anything_starts(tmp_path):
    """Built in code (no file's checks ran): the constructor refuses it, not ``start()`` once
    the mesh was joined."""
    config = coord_config.load_config(serve_config(tmp_path, tmp_path / "data"))
    for bad in ({"max_attempts": 0}, {"retry_backoff_s": 3.0}, {"max_attempts": 10**23}):
        with pytest.raises(ConfigError):
            CoordinatorDaemon(with_overrides(config, coordinator=bad))
    assert not (tmp_path / "data").exists()  # nothing was made


def test_a_huge_max_attempts_no_longer_reaches_a_recovery(tmp_path):
    """The fault itself: ``serve`` on a journal with an item in flight, with a max_attempts
    SQLite cannot bind, died in the recovery with a traceback (exit 1); now it is one line
    naming the key (exit 2), and the journal is left as it was."""
    data = tmp_path / "data"
    data.mkdir()
    with Journal(data / "journal.db") as journal:
        journal.submit(TaskSpec("t", Pattern.SINGLE, ROWS, (ModelRef("digits-mlp", "1"),)))
        (item,) = journal.get("t").items
        journal.mark_dispatched(item.item_id, "node-1", item.attempt)
    config = with_settings(serve_config(tmp_path, data), "max_attempts = 99999999999999999999")
    proc = start_serve(config)
    out, err = finish(proc)
    assert proc.returncode == 2 and out == "", err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "[coordinator] max_attempts must be at most" in err, err
    with Journal(data / "journal.db") as journal:
        (item,) = journal.get("t").items
        assert (item.state.value, item.attempt, item.node) == ("dispatched", 1, "node-1")


# --- certificates ---------------------------------------------------------------------------


def revoke_coordinator(tmp_path: Path) -> None:
    """Revoke the coordinator ``serve_config`` enrolled and give its directory the list (as
    ``fleet revoke`` and a copy of ``revocations.bin`` do)."""
    fleet = tmp_path / "fleet"
    assert main(["fleet", "revoke", "--dir", str(fleet), "--node-id", "coord"]) == 0
    shutil.copyfile(fleet / "revocations.bin", tmp_path / "coord" / "revocations.bin")


def test_serve_under_a_revoked_certificate_is_one_clear_line_and_exit_2(tmp_path):
    data = tmp_path / "data"
    config = serve_config(tmp_path, data)
    revoke_coordinator(tmp_path)
    proc = start_serve(config)
    first = proc.stdout.readline()  # READY, had it started (it would then serve on)
    if first:
        proc.kill()
    out, err = finish(proc)
    assert first == "" and out == "", first + out
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "[coordinator] identity_dir" in lines[0] and "'coord' (serial 1) is revoked" in err
    assert "revocations.bin" in err and "fleet enroll --force" in err
    assert not (data / "journal.db").exists()  # refused before anything was opened


async def test_a_revoked_certificate_is_refused_by_start_with_nothing_left_open(tmp_path):
    config = serve_config(tmp_path, tmp_path / "data")
    revoke_coordinator(tmp_path)
    daemon = CoordinatorDaemon(coord_config.load_config(config))
    try:
        with pytest.raises(ConfigError, match="is revoked by"):
            await daemon.start()
        assert daemon.mesh is None and daemon.coordinator is None
    finally:
        await daemon.aclose()


async def test_a_not_revoked_certificate_starts_beside_a_revocation_of_another(tmp_path):
    """A list that revokes another node's certificate (or an older serial) is no reason."""
    config = serve_config(tmp_path, tmp_path / "data")
    fleet = tmp_path / "fleet"
    enroll = ["fleet", "enroll", "--dir", str(fleet), "--node-dir", str(tmp_path / "other")]
    assert main([*enroll, "--node-id", "other", "--roles", "vehicle"]) == 0
    assert main(["fleet", "revoke", "--dir", str(fleet), "--node-id", "other"]) == 0
    shutil.copyfile(fleet / "revocations.bin", tmp_path / "coord" / "revocations.bin")
    daemon = CoordinatorDaemon(coord_config.load_config(config))
    try:
        facts = await daemon.start()
        assert facts["node_id"] == "coord"
        assert len(daemon.mesh.admission.revocations.entries) == 1
    finally:
        await daemon.stop()


# --- a stop cut short -----------------------------------------------------------------------


async def test_a_stop_cut_short_while_the_coordinator_closes_still_closes_its_journal(
    tmp_path, caplog
):
    """A second signal during the drain cancels ``stop()`` and calls ``aclose()``: when it
    comes while the coordinator is closing, the journal is closed all the same (its lock
    released: another coordinator may open it)."""
    daemon = CoordinatorDaemon(coord_config.load_config(serve_config(tmp_path, tmp_path / "d")))
    await daemon.start()
    coordinator = daemon.coordinator
    real, closing = coordinator.aclose, asyncio.Event()

    async def aclose() -> None:
        closing.set()
        await real()

    coordinator.aclose = aclose
    stop = asyncio.create_task(daemon.stop())
    await asyncio.wait_for(closing.wait(), timeout=10)
    await asyncio.sleep(0)  # (into the close: it waits on its journal's thread)
    stop.cancel()
    await asyncio.gather(stop, return_exceptions=True)
    await asyncio.wait_for(daemon.aclose(), timeout=10)
    Journal(daemon.journal_path).close()  # not "in use by another coordinator"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_second_signal_during_the_drain_stops_at_once_with_the_journal_closed(tmp_path):
    """``serve`` serving a request that has not sent its body: SIGTERM begins the drain (which
    grants the request its grace), SIGINT cuts it short: exit 0, ``STOPPED``, no ERROR line,
    and the journal is free for the next start."""
    data = tmp_path / "data"
    proc = start_serve(serve_config(tmp_path, data))
    try:
        ready = proc.stdout.readline()
        assert ready.startswith("READY "), ready + proc.stderr.read()
        facts = json.loads(ready[len("READY ") :])
        token = Path(facts["token_file"]).read_text().strip()
        host, port = facts["api"].removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as http:
            http.sendall(
                f"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
            )
            proc.send_signal(signal.SIGTERM)
            line = proc.stderr.readline()
            while "stopping (SIGTERM)" not in line:
                assert line, "the daemon ended before it began its drain"
                line = proc.stderr.readline()
            proc.send_signal(signal.SIGINT)
            out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["STOPPED coord"], out
    assert "SIGINT while draining: closing at once" in err, err
    assert " ERROR " not in err and "Traceback" not in err, err
    Journal(data / "journal.db").close()


# --- faults in files this area does not own (strict xfail) ---------------------------------


async def test_coordinator_aclose_called_again_after_a_cancelled_one_closes_the_journal(tmp_path):
    daemon = CoordinatorDaemon(coord_config.load_config(serve_config(tmp_path, tmp_path / "d")))
    await daemon.start()
    coordinator = daemon.coordinator
    try:
        await daemon.api.aclose()
        first = asyncio.create_task(coordinator.aclose())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(coordinator.aclose(), timeout=10)
        Journal(daemon.journal_path).close()
    finally:
        await daemon.aclose()


async def test_a_node_daemon_refuses_to_start_under_a_revoked_certificate(tmp_path):
    from meshinfer.testing.cluster import LocalCluster
    from node.config import load_config as load_node_config
    from node.daemon import NodeDaemon

    cluster = LocalCluster(tmp_path)
    path = cluster.add_node("veh-1", extra="[http]\nenabled = false\n")
    cluster.fleet.revoke(now=cluster.fleet.issued()[0].not_before + 1, node_id="veh-1")
    shutil.copyfile(cluster.fleet.revocations_bin, tmp_path / "nodes" / "veh-1" / "revocations.bin")
    daemon = NodeDaemon(load_node_config(path))
    try:
        with pytest.raises(ConfigError, match="revoked"):
            await daemon.start()
    finally:
        await daemon.aclose()
