"""A throw-away fleet of real daemon processes on loopback, for tests, benchmarks and the demo.

``LocalCluster`` creates a fleet directory, enrols nodes, writes each node's TOML and starts
``meshinfer-node run`` (or ``meshinfer-coord serve``) as separate processes, reading the
``READY {json}`` line each prints. Everything is plain files and subprocesses, exactly what an
operator would run by hand. Each daemon runs with ``--exit-with-parent``: a test or benchmark
killed outright (SIGKILL, the OOM killer, a crashed worker) leaves no daemon behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from meshinfer.identity_files import FleetDirectory, NodeDirectory, enroll

YEAR = 365 * 86400.0


@dataclass
class DaemonProcess:
    """One running daemon: its process, READY facts and captured output."""

    name: str
    proc: subprocess.Popen[str]
    facts: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def http(self) -> str:
        return self.facts["http"]

    def get(self, path: str, timeout: float = 5.0) -> Any:
        with urllib.request.urlopen(self.http + path, timeout=timeout) as response:
            return json.loads(response.read())

    def alive(self) -> bool:
        return self.proc.poll() is None


class LocalCluster:
    """See the module docstring. Use as a context manager (``async with`` in a test on an event
    loop): every process is killed on exit. Its other methods block: from a coroutine, call
    them with ``asyncio.to_thread``."""

    def __init__(self, root: Path, *, fleet_id: str = "test-fleet", preset: str = "test") -> None:
        self.root = Path(root).absolute()  # (a config's relative path is from its own folder)
        self.fleet_id = fleet_id
        self.preset = preset
        self.fleet = FleetDirectory.init(self.root / "fleet", fleet_id)
        self.configs: dict[str, Path] = {}
        self.processes: dict[str, DaemonProcess] = {}

    def enroll(self, node_id: str, roles: tuple[str, ...] = ("vehicle",)) -> Path:
        node_dir = self.root / "nodes" / node_id
        enroll(
            self.fleet,
            NodeDirectory(node_dir),
            node_id,
            frozenset(roles),
            now=time.time() - 60,
            lifetime_s=YEAR,
        )
        return node_dir

    def add_node(self, node_id: str, *, roles=("vehicle",), extra: str = "") -> Path:
        """Enrol ``node_id`` and write its TOML (``extra`` is appended verbatim)."""
        node_dir = self.enroll(node_id, roles)
        data_dir = self.root / "data" / node_id
        data_dir.mkdir(parents=True, exist_ok=True)
        config = self.root / f"{node_id}.toml"
        config.write_text(
            f"[node]\nidentity_dir = {_toml(node_dir)}\ndata_dir = {_toml(data_dir)}\n"
            f'[discovery]\ninterfaces = ["127.0.0.1"]\n'
            f"[membership]\npreset = {_toml(self.preset)}\n{extra}"
        )
        self.configs[node_id] = config
        return config

    def add_coordinator(
        self, node_id: str = "coord", *, extra: str = "", settings: str = ""
    ) -> Path:
        """Enrol a coordinator and write its TOML: API on a free loopback port, fleet token.

        ``settings``: TOML lines placed in its ``[coordinator]`` section (``max_attempts = 8``);
        ``extra`` is appended verbatim after the ``[api]`` section."""
        node_dir = self.enroll(node_id, ("coordinator",))
        data_dir = self.root / "data" / node_id
        data_dir.mkdir(parents=True, exist_ok=True)
        config = self.root / f"{node_id}.toml"
        settings = settings if not settings or settings.endswith("\n") else settings + "\n"
        config.write_text(
            f"[coordinator]\nidentity_dir = {_toml(node_dir)}\ndata_dir = {_toml(data_dir)}\n"
            f"{settings}"
            f'[discovery]\ninterfaces = ["127.0.0.1"]\n'
            f"[membership]\npreset = {_toml(self.preset)}\n"
            f'[api]\nlisten = "127.0.0.1:0"\ntoken_file = {_toml(self.fleet.api_token_file)}\n'
            f"{extra}"
        )
        self.configs[node_id] = config
        return config

    def start_coordinator(self, node_id: str = "coord", timeout: float = 30.0) -> DaemonProcess:
        """Start ``meshinfer-coord serve`` for ``node_id`` (see :meth:`add_coordinator`)."""
        command = (sys.executable, "-m", "coordinator.cli", "serve", "--config")
        return self.start(node_id, command=command, timeout=timeout)

    @property
    def token(self) -> str:
        """The fleet's API token."""
        return self.fleet.api_token()

    def start(self, node_id: str, *, command: tuple[str, ...] | None = None, timeout=30.0):
        """Start a daemon for ``node_id`` and wait for its READY line.

        ``command`` ends with ``--config`` (the file is appended). Every daemon gets
        ``--exit-with-parent <this pid>``: it stops by itself once this process is gone, even
        when killed before it could stop its daemons."""
        argv = command or (sys.executable, "-m", "node.cli", "run", "--config")
        argv = (*argv, str(self.configs[node_id]), "--exit-with-parent", str(os.getpid()))
        with open(self.root / f"{node_id}.log", "a") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=_child_env(),
                cwd=self.root,  # (the caller's folder would come first on the child's sys.path)
                start_new_session=True,
            )
        daemon = DaemonProcess(node_id, proc, {})
        ready = threading.Event()
        daemon.reader = threading.Thread(
            target=_pump, args=(proc.stdout, daemon, ready), daemon=True
        )
        daemon.reader.start()
        try:
            came_up = ready.wait(timeout) and daemon.facts
        except BaseException:  # interrupted (KeyboardInterrupt, a signal): not left running
            _killed(proc)
            raise
        if not came_up:
            _killed(proc)
            raise RuntimeError(
                f"{node_id} did not become ready; log tail:\n{self.log_tail(node_id)}"
            )
        self.processes[node_id] = daemon
        return daemon

    def log_tail(self, node_id: str, chars: int = 2000) -> str:
        """The last ``chars`` characters of ``node_id``'s log (its stderr); empty if it has none."""
        try:
            return (self.root / f"{node_id}.log").read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        daemon = self.processes[node_id]
        daemon.proc.send_signal(sig)
        daemon.proc.wait(timeout=30)
        if daemon.reader is not None:
            daemon.reader.join(timeout=5)  # every line the process printed is in ``lines``

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0, step=0.1) -> None:
        """Poll ``predicate`` until true; TimeoutError naming the predicate otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except OSError:
                pass  # a daemon not answering yet
            time.sleep(step)
        raise TimeoutError(f"condition not met within {timeout}s: {predicate}")

    def members(self, node_id: str) -> dict[str, str]:
        """``{member: status}`` as ``node_id`` sees it, from its /status."""
        doc = self.processes[node_id].get("/status")
        return {m["node_id"]: m["status"] for m in doc["members"]}

    def close(self) -> None:
        for daemon in self.processes.values():
            if daemon.alive():
                _killed(daemon.proc)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def aclose(self) -> None:
        """:meth:`close` for a test on an event loop: waiting for the processes to exit would
        block the loop, so it runs in a thread."""
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> LocalCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _toml(value: object) -> str:
    """``value`` as a TOML basic string (a JSON string is one: quotes, backslashes and control
    characters escaped; a path holding any of them was written into the config as it was)."""
    return json.dumps(str(value), ensure_ascii=False)


#: the folder holding the packages this process runs (meshinfer, node, coordinator): first on
#: a daemon's import path, which no longer starts with the caller's working directory
_PACKAGES = str(Path(__file__).resolve().parents[2])


def _child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGES, env.get("PYTHONPATH")) if p)
    return env


def _killed(proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """SIGKILL ``proc`` and reap it (waiting at most ``timeout``: no zombie is left behind)."""
    proc.kill()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass  # (uninterruptible sleep in the kernel: nothing more to do from here)


def _pump(stream: TextIO | None, daemon: DaemonProcess, ready: threading.Event) -> None:
    """Read the daemon's stdout to its end, then close our end of the pipe (left open, it
    would be closed by the garbage collector with a ResourceWarning, at any later moment)."""
    try:
        if stream is None:
            return
        with stream:
            for line in stream:
                daemon.lines.append(line.rstrip("\n"))
                if line.startswith("READY ") and not daemon.facts:
                    daemon.facts = json.loads(line[6:])
                    ready.set()
    finally:
        ready.set()
