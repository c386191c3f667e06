"""Faults found in the node's command line, configuration file and HTTP surface (session 34):
a FIFO or device given as ``--config`` (the command waited for a writer for good; /dev/null read
as an empty, valid file), ``meshinfer-node status`` held by a server trickling its headers (each
read waited the whole timeout afresh), a foreign server's 404 read as "cannot reach the daemon",
and ``/readyz`` that could not see a dead batcher dispatcher.

Real subprocesses, real TCP servers on loopback, a real daemon in this process.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from meshinfer.errors import ConfigError
from meshinfer.tomlconfig import read_toml
from node import cli as node_cli
from tests.test_node_surface_hunt import node
from tests.test_nodedaemon_fixes32 import readyz

ROOT = Path(__file__).resolve().parent.parent

# --- --config that is no regular file ----------------------------------------------------------


def test_a_fifo_as_config_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "node.toml"
    os.mkfifo(fifo)
    try:  # (was: the command waited for a writer for good)
        done = subprocess.run(
            [sys.executable, "-m", "node.cli", "config", "--check", str(fifo)],
            cwd=ROOT, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("meshinfer-node waited on a FIFO given as its config file")
    assert done.returncode == 2
    assert f"config file {fifo} is a FIFO, socket or device, not a regular file" in done.stderr


def test_a_device_as_config_is_refused_not_read_as_an_empty_file() -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        read_toml("/dev/null")  # was {}: a daemon ran on every default


def test_a_directory_as_config_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        read_toml(tmp_path)


# --- `meshinfer-node status`: one deadline, and a foreign server named as such -----------------


@contextmanager
def trickling_headers(stop: threading.Event) -> Iterator[str]:
    """A loopback server that starts a 200 and then sends one byte of a header now and then,
    until ``stop`` or ~3 s, and then closes; its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(60):
                    if stop.wait(0.05):
                        return
                    conn.sendall(b"a")
            except OSError:  # the client gave up
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=30)
        listener.close()


def test_status_gives_up_on_headers_trickling_past_its_deadline(monkeypatch, capsys) -> None:
    monkeypatch.setattr(node_cli, "STATUS_TIMEOUT_S", 0.5)
    stop = threading.Event()
    with trickling_headers(stop) as url:  # (each header read waited the timeout afresh)
        code = node_cli.main(["status", "--url", url])
        stop.set()
    err = capsys.readouterr().err
    assert code == 2 and f"cannot reach the daemon at {url}: no whole answer within 0.5 s" in err


@contextmanager
def foreign_server(code: int) -> Iterator[str]:
    """Some other HTTP server on loopback, answering every GET with ``code``; its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


@pytest.mark.parametrize("code", [404, 405])
def test_status_names_a_foreign_server_as_no_meshinfer_node(capsys, code: int) -> None:
    with foreign_server(code) as url:
        assert node_cli.main(["status", "--url", url]) == 2
    err = capsys.readouterr().err
    assert f"{url}: not a meshinfer node's /status (it answered HTTP {code} " in err
    assert "cannot reach" not in err  # (it was reached: it is another program)


def test_status_refuses_a_redirect_as_no_meshinfer_node(capsys) -> None:
    with foreign_server(302) as url:  # a daemon never redirects
        assert node_cli.main(["status", "--url", url]) == 2
    assert "not a meshinfer node's /status (it answered HTTP 302 " in capsys.readouterr().err


# --- /readyz and a dead batcher dispatcher ----------------------------------------------------


async def test_readyz_is_503_once_a_batcher_dispatcher_died(tmp_path: Path) -> None:
    async with node(tmp_path) as daemon:
        assert (await readyz(daemon))[0] == 200
        batcher = daemon.batchers[daemon.models[0]]
        batcher._dispatcher.cancel()  # as a bug that ends the task (it logs an ERROR)
        await asyncio.gather(batcher._dispatcher, return_exceptions=True)
        status, body = await readyz(daemon)
        assert status == 503, body
