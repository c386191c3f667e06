"""Faults left in the coordinator's client and CLI and the node's ``config --check``.

The CLI runs in process (``main(argv)``) against a scripted HTTP server on loopback: a thread of
:mod:`http.server` answering each (method, path) with the next of its scripted answers (the last
one again once the script runs out), so a test controls exactly what the client reads and
counts what it asked. The client's clock is a stand-in too: its pauses are recorded and move a
virtual clock instead of sleeping.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from coordinator import client as client_module
from coordinator import config as coord_config
from coordinator.cli import main as coord_main
from coordinator.client import CoordinatorClient
from meshinfer.errors import ConfigError
from node import cli as node_cli
from node import config as node_config
from node.daemon import parse_models
from tests.test_client_config_hunt import TOKEN, ScriptedServer, one_line_error, task


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as scripted:
        yield scripted


class VirtualClock:
    """``time.monotonic``/``time.sleep`` for the client: a sleep moves the clock and is noted."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert len(self.pauses) < 100, "asking again in a tight loop"
        self.pauses.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> VirtualClock:
    virtual = VirtualClock()
    fake_time = SimpleNamespace(monotonic=virtual.monotonic, sleep=virtual.sleep)
    monkeypatch.setattr(client_module, "time", fake_time)
    return virtual


def coord(server: ScriptedServer, *argv: str) -> int:
    """``meshinfer-coord ARGV`` against the scripted server."""
    return coord_main([argv[0], "--url", server.url, "--timeout", "5", *argv[1:]])


ACCEPTED = {"task_id": "t-1", "state": "queued", "items_total": 1, "location": "/v1/tasks/t-1"}


# --- CoordinatorClient.wait ------------------------------------------------------------------


def test_wait_asks_again_when_the_server_answers_before_the_timeout(server, clock):
    """A ``/wait`` answered early (the server closing, or capping its waits shorter) ended a
    wait of 300 s or less after that one request, the task still running."""
    server.script("GET", "/v1/tasks/t-1/wait", task(), task(state="succeeded"))
    client = CoordinatorClient(server.url, TOKEN, timeout=5)
    assert client.wait("t-1", timeout=60)["state"] == "succeeded"
    assert len(server.requests) == 2
    assert clock.pauses and all(p > 0 for p in clock.pauses)  # not asked again in a tight loop


def test_wait_gives_up_once_its_timeout_is_spent_pausing_between_early_answers(server, clock):
    server.script("GET", "/v1/tasks/t-1/wait", task())  # always at once, always running
    client = CoordinatorClient(server.url, TOKEN, timeout=5)
    assert client.wait("t-1", timeout=2)["state"] == "running"
    assert clock.now >= 2 and sum(clock.pauses) == pytest.approx(2)
    assert 2 < len(server.requests) <= 2 / client_module.MIN_RETRY_PAUSE_S + 1
    asked = [float(r.split("timeout=")[1].split("&")[0]) for r in server.requests]
    assert asked[0] == 2 and asked == sorted(asked, reverse=True)  # never past the deadline


def test_submit_wait_waits_out_its_wait_timeout(server, clock, tmp_path, monkeypatch, capsys):
    """``submit --wait`` exited 3 ("still running") after the server's first early answer."""
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    (tmp_path / "x.json").write_text("[[1, 2]]")
    server.script("POST", "/v1/tasks", ACCEPTED, status=201)
    server.script("GET", "/v1/tasks/t-1/wait", task(), task(state="succeeded", items_done=1))
    argv = ["--model", "m@1", "--input", str(tmp_path / "x.json"), "--wait", "--no-progress"]
    assert coord(server, "submit", *argv, "--wait-timeout", "30") == 0
    assert "task t-1: succeeded" in capsys.readouterr().out


# --- submit's retry of a busy coordinator ----------------------------------------------------


def test_a_busy_answer_is_retried_after_a_sensible_pause_whatever_its_retry_after(server, clock):
    """``Retry-After: 0`` re-sent the POST in a tight loop for up to 30 s; a negative or
    garbage one gave up at once."""
    for retry_after in ["0", "-5", "soon", "2"]:
        busy = {"error": {"code": "busy", "message": "too many uploads"}}
        server.script("POST", "/v1/tasks", busy, status=503, Retry_After=retry_after)
    server.script("POST", "/v1/tasks", ACCEPTED, status=201)
    client = CoordinatorClient(server.url, TOKEN, timeout=5)
    assert client.submit({"model": "m@1"})["task_id"] == "t-1"
    least, default = client_module.MIN_RETRY_PAUSE_S, client_module.BUSY_PAUSE_S
    assert clock.pauses == [least, default, default, 2.0]
    assert len(server.requests) == 5


def test_a_busy_coordinator_is_asked_only_a_few_times_in_busy_s(server, clock):
    busy = {"error": {"code": "busy", "message": "too many uploads"}}
    server.script("POST", "/v1/tasks", busy, status=503, Retry_After="0")
    client = CoordinatorClient(server.url, TOKEN, timeout=5)
    with pytest.raises(client_module.ApiError, match="busy"):
        client.submit({"model": "m@1"}, busy_s=1.0)
    assert len(server.requests) <= 1 / client_module.MIN_RETRY_PAUSE_S + 1


# --- the client's own timeout ----------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_a_client_timeout_that_is_not_positive_and_finite_is_refused(timeout):
    """``timeout=0`` quietly became the default (``timeout or self.timeout``), unlike the
    CLI's ``--timeout``, which refuses it."""
    with pytest.raises(ConfigError, match="timeout"):
        CoordinatorClient("http://127.0.0.1:9", TOKEN, timeout=timeout)
    assert CoordinatorClient("http://127.0.0.1:9", TOKEN, timeout=0.5).timeout == 0.5


# --- rendering a malformed answer ------------------------------------------------------------


def test_a_value_error_rendering_an_answer_is_one_line(server, capsys, monkeypatch):
    """A string weight reaching ``:g`` raised ValueError: a traceback, where the other
    malformed answers give one line and exit 2."""
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    aggregation = {"mode": "weighted", "weights": {"a@1": "2"}}
    server.script("GET", "/v1/tasks/t-1", task(aggregation=aggregation))
    assert coord(server, "status", "t-1") == 2
    assert "unexpected answer from the coordinator" in one_line_error(capsys, "meshinfer-coord")


def test_a_bad_input_file_is_still_named_as_such(server, tmp_path, capsys, monkeypatch):
    """A ConfigError is a ValueError too: it must not read as a bad answer of the coordinator."""
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    (tmp_path / "x.json").write_text("[[1, 2]")
    assert coord(server, "submit", "--model", "m@1", "--input", str(tmp_path / "x.json")) == 2
    err = one_line_error(capsys, "meshinfer-coord")
    assert "x.json: not valid JSON" in err and "unexpected answer" not in err


# --- status --outputs ------------------------------------------------------------------------


def test_status_outputs_without_json_is_refused(server, capsys, monkeypatch):
    """``--outputs`` adds the output tensors to the ``--json`` document; the table shows no
    tensors, and the flag was silently ignored there."""
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    server.script("GET", "/v1/tasks/t-1", task())
    assert coord(server, "status", "t-1", "--outputs") == 2
    assert "--outputs" in one_line_error(capsys, "meshinfer-coord") and not server.requests
    assert coord(server, "status", "t-1", "--outputs", "--json") == 0
    assert json.loads(capsys.readouterr().out)["task_id"] == "t-1"
    assert server.requests == ["GET /v1/tasks/t-1"]  # outputs: the API's default


# --- config --check --------------------------------------------------------------------------

SCHEMAS = {"node": node_config, "coordinator": coord_config}


@pytest.mark.parametrize("kind", SCHEMAS)
def test_config_check_refuses_all_among_other_mdns_interfaces(kind):
    """``interfaces = ["all", "eth0"]`` passed the check; the daemon then looked for an
    interface named "all" at start."""
    with pytest.raises(ConfigError, match=r'^f\.toml: \[discovery\] interfaces: "all"'):
        SCHEMAS[kind].config_from_dict({"discovery": {"interfaces": ["all", "eth0"]}}, "f.toml")
    for interfaces in (["all"], ["eth0", "10.0.0.1"]):
        config = SCHEMAS[kind].config_from_dict({"discovery": {"interfaces": interfaces}})
        assert config.discovery.interfaces == tuple(interfaces)
    no_mdns = {"discovery": {"mdns": False, "interfaces": ["all", "eth0"]}}
    assert SCHEMAS[kind].config_from_dict(no_mdns).discovery.mdns is False  # not used then


@pytest.mark.parametrize(
    ("models", "named"),
    [
        (["m@"], r'\[inference\] models\[0\]: expected "id@version", got \'m@\''),
        (["@1"], r"\[inference\] models\[0\]"),
        (["a@1", "b", "a"], r"\[inference\] models\[2\]: a@1 is listed twice"),
    ],
)
def test_config_check_refuses_models_the_daemon_refuses(models, named, tmp_path, capsys):
    with pytest.raises(ConfigError, match=rf"^f\.toml: {named}"):
        node_config.config_from_dict({"inference": {"models": models}}, "f.toml")
    with pytest.raises(ConfigError):  # the daemon's own refusal, which the check repeats
        parse_models(models, "[inference] models")
    path = tmp_path / "node.toml"
    path.write_text(f"[inference]\nmodels = {json.dumps(models)}\n")
    assert node_cli.main(["config", "--check", str(path)]) == 2
    assert "[inference] models[" in one_line_error(capsys, "meshinfer-node")


def test_config_check_accepts_distinct_models():
    config = node_config.config_from_dict({"inference": {"models": ["a@1", "a@2", "b"]}})
    assert config.inference.models == ("a@1", "a@2", "b")
