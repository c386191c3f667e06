"""Faults found in the coordinator's client and CLI, the TOML configuration and static seeds.

The CLI runs in process (``main(argv)``) against a stand-in HTTP server on loopback
(:class:`ScriptedServer`, also used by test_cli_leftovers): a thread of :mod:`http.server`
answering each request with the status and body scripted for it, so a test controls exactly
what the client reads without starting a coordinator.
"""

from __future__ import annotations

import json
import threading
import tomllib
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coordinator import config as coord_config
from coordinator.cli import main as coord_main
from coordinator.client import ApiError, CoordinatorClient
from coordinator.task_views import render_task, utc_iso
from meshinfer.errors import ConfigError, LocalProtocolError
from node import cli as node_cli
from node import config as node_config

TOKEN = "t" * 32
KEY = "ab" * 32


Answer = tuple[int, bytes, dict[str, str]]


class ScriptedServer:
    """An HTTP server on loopback answering ``METHOD path`` with the next answer scripted for
    it (the last one repeats); every other request gets 404. ``requests`` lists what came, as
    ``"METHOD path?query"``."""

    def __init__(self) -> None:
        self.scripts: dict[tuple[str, str], list[Answer]] = {}
        self.requests: list[str] = []
        scripts, requests = self.scripts, self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer()

            def _answer(self) -> None:
                requests.append(f"{self.command} {self.path}")
                script = scripts.get((self.command, self.path.split("?")[0])) or [(404, b"", {})]
                status, body, headers = script.pop(0) if len(script) > 1 else script[0]
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        serve = {"poll_interval": 0.05}  # (a shutdown waits up to one)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs=serve, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def script(self, method: str, path: str, *answers: object, status: int = 200, **headers: str):
        """Answer ``method path`` with ``answers`` in turn (JSON documents, or bytes as they
        are), each with ``status``
        and ``headers`` (a name's ``_`` written as ``-``)."""
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        queue = self.scripts.setdefault((method, path), [])
        queue += [(status, _body(doc), sent) for doc in answers]

    def answer(self, path: str, doc: object, status: int = 200) -> None:
        """Answer every ``GET path`` with ``doc`` (a JSON document, or bytes as they are)."""
        self.script("GET", path, doc, status=status)


def _body(doc: object) -> bytes:
    return doc if isinstance(doc, bytes) else json.dumps(doc).encode()


@pytest.fixture
def canned() -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        yield server


def coord(canned: ScriptedServer, *argv: str) -> int:
    """``meshinfer-coord ARGV`` against the stand-in server."""
    return coord_main([argv[0], "--url", canned.url, "--timeout", "5", *argv[1:]])


def one_line_error(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"{prog}: error:"), err
    return err


def task(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "task_id": "t-1", "state": "running", "pattern": "single", "priority": 0,
        "policy": None, "created_at": 1.7e9, "updated_at": 1.7e9 + 1, "error": None,
        "items_total": 1, "items_done": 0, "deadline_s": None, "expires_at": None,
        "aggregation": None, "items": [], "result": None,
    }  # fmt: skip
    doc.update(changes)
    return doc


# --- the task commands -----------------------------------------------------------------------


@pytest.mark.parametrize("deadline_s", [1e12, 1e17, 1e300])
def test_status_of_a_task_whose_deadline_is_past_the_calendar(
    canned, capsys, monkeypatch, deadline_s
):
    """A coordinator from before ``MAX_DEADLINE_S`` took any positive finite ``deadline_s``
    (``--deadline 1e12``: "no deadline to speak of"), so ``expires_at`` may lie beyond year
    9999; ``status`` crashed rendering it (ValueError, OSError or OverflowError from
    ``datetime.fromtimestamp``)."""
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    doc = task(deadline_s=deadline_s, expires_at=1.7e9 + deadline_s)
    assert f"{deadline_s:g} s, until" in render_task(doc)
    canned.answer("/v1/tasks/t-1", doc)
    assert coord(canned, "status", "t-1") == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "deadline" in captured.out, captured
    assert utc_iso(0) == "1970-01-01T00:00:00Z"  # in range: as before


@pytest.mark.parametrize("status", [200, 400])
def test_an_answer_nested_too_deep_for_json_is_an_api_error(canned, capsys, monkeypatch, status):
    """Every failure of the client is an ApiError (module doc); JSON nested deeper than the
    parser's recursion limit raised RecursionError, a traceback out of the CLI."""
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    canned.answer("/v1/nodes", b"[" * 100_000, status)
    with pytest.raises(ApiError):
        CoordinatorClient(canned.url, TOKEN, timeout=5).nodes()
    assert coord(canned, "nodes") == 2
    one_line_error(capsys, "meshinfer-coord")


# --- meshinfer-node status -------------------------------------------------------------------

NODE_STATUS = {
    "node_id": "veh-1", "fleet_id": "f", "session_address": "127.0.0.1:7946", "ready": True,
    "problems": [], "engine": "numpy", "models": ["digits-mlp@1"], "members": [],
}  # fmt: skip


def test_node_status_of_a_loopback_daemon_bypasses_environment_proxies(canned, capsys, monkeypatch):
    """A daemon's HTTP listens on loopback by default, where no proxy can reach it; with
    ``http_proxy`` set (as on hosts behind a company proxy) ``meshinfer-node status`` sent the
    request to the proxy and failed, while ``meshinfer-coord`` bypasses it for loopback."""
    canned.answer("/status", NODE_STATUS)
    without_a_reachable_proxy(monkeypatch)
    assert node_cli.main(["status", "--url", canned.url]) == 0
    assert "node veh-1 (fleet f)" in capsys.readouterr().out


def without_a_reachable_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's opener reads them anew


def test_a_daemon_recorded_at_the_wildcard_address_bypasses_environment_proxies(
    canned, tmp_path, capsys, monkeypatch
):
    """A daemon listening on every address (``listen = "0.0.0.0:7950"``, to be reachable from
    other hosts) records ``http://0.0.0.0:PORT`` in its runtime file, which this host reaches
    locally; ``--data-dir`` then sent the request to an environment proxy, which cannot."""
    without_a_reachable_proxy(monkeypatch)
    port = canned.url.rsplit(":", 1)[1]
    token = tmp_path / "api-token"
    token.write_text(TOKEN)
    runtime = {"api": f"http://0.0.0.0:{port}", "token_file": str(token), "http": None}
    (tmp_path / "runtime.json").write_text(json.dumps(runtime))
    canned.answer("/v1/nodes", {"nodes": []})
    assert coord_main(["nodes", "--data-dir", str(tmp_path), "--timeout", "5"]) == 0
    assert capsys.readouterr().out.strip() == "no nodes"
    runtime["http"] = f"http://0.0.0.0:{port}"
    (tmp_path / "runtime.json").write_text(json.dumps(runtime))
    canned.answer("/status", NODE_STATUS)
    assert node_cli.main(["status", "--data-dir", str(tmp_path)]) == 0
    assert "node veh-1 (fleet f)" in capsys.readouterr().out


def test_node_status_answer_nested_too_deep_is_one_line(canned, capsys):
    canned.answer("/status", b"[" * 100_000)
    assert node_cli.main(["status", "--url", canned.url]) == 2
    assert "not a meshinfer node's /status" in one_line_error(capsys, "meshinfer-node")


# --- configuration files ---------------------------------------------------------------------

SCHEMAS = {"node": node_config, "coordinator": coord_config}


@pytest.mark.parametrize("kind", SCHEMAS)
@pytest.mark.parametrize("text", ["a\nb", "tab\there", "del\x7f", 'quote" back\\', "é\u2028"])
def test_a_rendered_config_with_any_string_loads_back(kind, text):
    """TOML strings may hold escaped control characters; ``render(config)`` wrote them raw,
    which is not TOML, so the printed file did not load back."""
    module = SCHEMAS[kind]
    section = "node" if kind == "node" else "coordinator"
    config = module.config_from_dict({section: {"data_dir": text}})
    rendered = module.render_defaults(config)
    assert module.config_from_dict(tomllib.loads(rendered)) == config


@pytest.mark.parametrize("kind", SCHEMAS)
@pytest.mark.parametrize(
    ("discovery", "named"),
    [
        ({"seeds": ["garbage"]}, "[discovery] seeds: static seed 'garbage'"),
        ({"seeds": [f"rsu@10.0.0.1:99999#{KEY}"]}, "[discovery] seeds"),
        ({"seeds": [f"rsu@10.0.0.1:7400#{KEY}", f"rsu@10.0.0.2:7400#{KEY}"]}, "appears twice"),
        ({"interfaces": []}, "[discovery] interfaces"),
    ],
)
def test_config_check_refuses_discovery_the_daemon_refuses(kind, discovery, named):
    """``config --check`` said ``ok`` to seeds and mDNS interfaces the daemon refuses at start
    (there, without naming the file or the key)."""
    with pytest.raises(ConfigError) as info:
        SCHEMAS[kind].config_from_dict({"discovery": discovery}, "f.toml")
    assert str(info.value).startswith("f.toml: ") and named in str(info.value)


def test_config_check_accepts_good_seeds_and_no_mdns_without_interfaces():
    seeds = [f"rsu@10.0.0.1:7400#{KEY}", f"coord@[fd00::10]:7400?key={KEY}&link=v2i"]
    config = node_config.config_from_dict({"discovery": {"seeds": seeds}})
    assert config.discovery.seeds == tuple(seeds)
    no_mdns = {"discovery": {"mdns": False, "interfaces": []}}
    assert coord_config.config_from_dict(no_mdns).discovery.interfaces == ()


@pytest.mark.parametrize("kind", SCHEMAS)
def test_a_max_message_size_no_handshake_can_carry_is_refused(kind):
    """``[session] max_message_mib`` goes into every handshake's Hello as bytes, a msgpack
    unsigned 64-bit integer; from 2**44 MiB on, no Hello can be encoded, so the daemon started
    but every session failed (LocalProtocolError in the handshake)."""
    from meshinfer.proto import messages
    from meshinfer.proto.messages import Hello

    too_big = (1 << 44) << 20
    with pytest.raises(LocalProtocolError):
        messages.encode(Hello(1, "n", b"", (), (), too_big))
    with pytest.raises(ConfigError, match=r"\[session\] max_message_mib"):
        SCHEMAS[kind].config_from_dict({"session": {"max_message_mib": 1 << 44}}, "f.toml")
    limit = node_config.MAX_MESSAGE_MIB
    config = SCHEMAS[kind].config_from_dict({"session": {"max_message_mib": limit}})
    assert config.session.max_message_mib == limit
    messages.encode(Hello(1, "n", b"", (), (), limit << 20))
