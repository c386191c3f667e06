"""Bad input to the node daemon from anyone (its file, a client of its HTTP endpoint, the
``meshinfer-node status`` command line) is a clear error naming the problem: never a crash, a
traceback or a task left running.

Real daemons in this process (TCP, Noise, the NumPy engine; no mDNS), asked over real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from meshinfer.errors import ConfigError
from meshinfer.identity_files import NodeDirectory, enroll
from meshinfer.testing.cluster import LocalCluster
from node import cli as node_cli
from node.config import config_from_dict
from node.daemon import NodeDaemon, check_validity
from tests.helpers import until


@pytest.fixture
def base(tmp_path):
    """The sections of a one-model node without mDNS; a test adds or replaces keys."""
    identity = LocalCluster(tmp_path, fleet_id="inputs").enroll("veh")
    return {
        "node": {"identity_dir": str(identity), "data_dir": str(tmp_path / "data")},
        "discovery": {"mdns": False},
        "membership": {"preset": "test"},
        "inference": {"models": ["digits-mlp@1"]},
    }


def _config(base, **sections):
    return config_from_dict({**base, **{k: {**base.get(k, {}), **v} for k, v in sections.items()}})


@contextlib.asynccontextmanager
async def _started(config):
    daemon = NodeDaemon(config)
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.aclose()


def test_a_model_listed_twice_is_refused_naming_it(base):
    # its second batcher replaced the first, whose task then ran on with no owner; the config
    # checks refuse it too, so the models are put in past them: the daemon must refuse them
    config = _config(base)
    twice = dataclasses.replace(config.inference, models=("digits-mlp@1", "digits-mlp"))
    config = dataclasses.replace(config, inference=twice)
    with pytest.raises(ConfigError, match=r"^\[inference\] models\[1\]: digits-mlp@1 is listed"):
        NodeDaemon(config)


async def test_a_data_dir_that_cannot_be_one_is_named(base, tmp_path):
    (tmp_path / "a-file").write_text("")
    for path, problem in [("a-file", "exists and is not a directory"), ("a-file/sub", "")]:
        config = _config(base, node={"data_dir": str(tmp_path / path)})
        with pytest.raises(ConfigError, match=rf"\[node\] data_dir\b.* \S*{path}: .*{problem}"):
            async with _started(config):
                pass


@pytest.mark.parametrize("section", ["network", "http"])
async def test_a_listen_address_that_cannot_be_bound_is_named(base, section):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        for address, why in [(listen, "in use"), ("no-such-host.invalid:0", "")]:
            config = _config(base, **{section: {"listen": address}})
            with pytest.raises(ConfigError, match=rf"^\[{section}\] listen {address}: \S.*{why}"):
                async with _started(config):
                    pass


async def test_the_runtime_file_is_written_whole_and_removed_at_stop(base, tmp_path):
    runtime = tmp_path / "data" / "runtime.json"
    async with _started(_config(base)) as daemon:
        facts = json.loads(runtime.read_text())
        assert facts["pid"] == os.getpid() and facts["node_id"] == daemon.node_id
        # no partial file beside it (node.lock: one daemon per data_dir)
        assert sorted(os.listdir(runtime.parent)) == ["node.lock", "runtime.json"]
    assert not runtime.exists()  # `meshinfer-node status --data-dir` no longer finds it
    assert runtime.parent.is_dir()  # a configured data_dir stays


async def test_a_temporary_data_dir_is_removed_at_stop(base):
    async with _started(_config(base, node={"data_dir": ""})) as daemon:
        temporary = daemon.data_dir
        assert (temporary / "runtime.json").is_file()
    assert not temporary.exists()


async def test_http_on_ipv6_loopback_records_a_bracketed_url(base):
    async with _started(_config(base, http={"listen": "[::1]:0"})) as daemon:
        assert daemon.http.url.startswith("http://[::1]:")
        async with aiohttp.ClientSession() as http, http.get(daemon.http.url + "/healthz") as r:
            assert r.status == 200


_MALFORMED_REQUESTS = [
    b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /status?a=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /status HTTP/9.9\r\nHost: x\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
]


async def test_malformed_http_requests_get_400_and_no_error_log(base, caplog):
    caplog.set_level(logging.DEBUG)
    async with _started(_config(base)) as daemon:
        port = int(daemon.http.url.rsplit(":", 1)[1])
        for request in _MALFORMED_REQUESTS:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            assert (await reader.readline()).split()[1] == b"400"
            writer.close()
            await writer.wait_closed()
        async with aiohttp.ClientSession() as http, http.get(daemon.http.url + "/healthz") as r:
            assert r.status == 200
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []  # the client's fault: no ERROR, no traceback in the daemon's log


@pytest.fixture
async def impostor():
    """A loopback HTTP server that is no meshinfer node: ``/status`` answers what
    ``impostor.body`` holds."""
    answers = {"body": b"{}"}

    async def status(request):
        return web.Response(body=answers["body"], content_type="application/json")

    app = web.Application()
    app.router.add_get("/status", status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield url, answers
    await runner.cleanup()


async def _status(argv, capsys):
    code = await asyncio.to_thread(node_cli.main, ["status", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


async def test_status_refuses_what_is_not_a_meshinfer_node(impostor, capsys):
    url, answers = impostor
    for body in (b'{"a": 1}', b"[1, 2]", b"null", b"<html>"):
        answers["body"] = body
        for argv in (["--url", url], ["--url", url, "--json"]):
            code, err = await _status(argv, capsys)
            assert (code, f"{url}: not a meshinfer node's /status" in err) == (2, True)


async def test_status_names_an_unusable_url_or_runtime_file(tmp_path, capsys):
    for url, said in [
        ("http://127.0.0.1:1/a b", "must not hold blanks"),  # (refused before any request)
        ("http://127.0.0.1:1/", "cannot reach the daemon at"),
        ("file:///etc/passwd", "must look like http://HOST:PORT"),
        ("http://[::1", "must look like http://HOST:PORT"),  # was a ValueError traceback
        ("http://127.0.0.1:99999", "must look like http://HOST:PORT"),
    ]:
        code, err = await _status(["--url", url], capsys)
        assert code == 2 and said in err
    runtime = tmp_path / "runtime.json"
    for recorded, said in [(None, "serves no HTTP"), (5, "no running daemon recorded there")]:
        runtime.write_text(json.dumps({"http": recorded}))
        code, err = await _status(["--data-dir", str(tmp_path)], capsys)
        assert code == 2 and said in err


async def test_a_failing_telemetry_sample_is_logged_once_and_the_loop_goes_on(
    base, caplog, monkeypatch
):
    calls = []

    async def broken(stats):
        calls.append(1)
        raise RuntimeError("sensor gone")

    async with _started(_config(base)) as daemon:
        monkeypatch.setattr(daemon.telemetry, "sample", broken)  # its next sample, in 1 s
        await until(lambda: len(calls) >= 2, timeout=10)  # it went on (and gossips its depth)
        said = [r for r in caplog.records if "telemetry sample failed" in r.getMessage()]
        assert len(said) == 1 and "sensor gone" in said[0].exc_text
        assert not any("the telemetry loop" in r.getMessage() for r in caplog.records)


def test_an_expired_certificate_is_refused_and_one_not_valid_yet_is_a_warning(base, caplog):
    identity = NodeDirectory(Path(base["node"]["identity_dir"])).load()
    cert, where = identity.certificate, "[node] identity_dir"
    check_validity(identity, where, now=cert.not_before)  # valid: nothing to say
    assert caplog.records == []
    with pytest.raises(
        ConfigError, match=r"^\[node\] identity_dir: .*'veh' \(serial \d+\) expired"
    ):
        check_validity(identity, where, now=cert.not_after + 1)
    check_validity(identity, where, now=cert.not_before - 60)  # this host's clock may be behind
    assert "valid only from" in caplog.text and "clock behind" in caplog.text


def test_a_daemon_on_an_expired_certificate_is_refused_before_it_starts(base, tmp_path):
    cluster = LocalCluster(tmp_path / "other", fleet_id="inputs")
    old = NodeDirectory(tmp_path / "old")
    hour = 3600.0
    enroll(cluster.fleet, old, "old", frozenset({"vehicle"}), now=time.time() - 2 * hour,
           lifetime_s=hour)  # fmt: skip
    config = _config(base, node={"identity_dir": str(old.path)})
    with pytest.raises(ConfigError, match=r"identity_dir: the certificate of 'old' .* expired"):
        NodeDaemon(config)


async def test_the_telemetry_loop_goes_on_quietly_after_the_node_left(base, caplog, monkeypatch):
    """A drain leaves membership, then the loop still sees the depth change (items handed
    back): it must not update the gossiped state (membership refuses it after a leave)."""
    async with _started(_config(base)) as daemon:
        await daemon.mesh.leave(timeout=0.1)
        samples = []
        sample = daemon.telemetry.sample

        async def counted(stats):
            samples.append(1)
            return await sample(stats)

        monkeypatch.setattr(daemon.telemetry, "sample", counted)
        monkeypatch.setattr(daemon, "_gpu_free_mb", lambda: 12345)  # a change to gossip
        await until(lambda: len(samples) >= 2, timeout=10)  # a whole turn after the change
        assert not any("telemetry loop" in r.getMessage() for r in caplog.records)
