"""``meshinfer wire-demo``: a fleet, two node processes and encrypted sessions on loopback TCP.

What it does, printing each step:

1. creates a throw-away fleet with the real CLI (``meshinfer-coord fleet init``) and enrols two
   nodes (``fleet enroll``): a roadside unit ``rsu-1`` and a vehicle ``car-1``;
2. starts ``rsu-1`` as a separate process (``python -m meshinfer.demo_wire serve``) listening on
   127.0.0.1, which answers every ``AppData`` message;
3. ``car-1`` (this process) dials it: a Noise XX handshake with certificate checks both ways,
   then messages each way and a measured round trip; then again with IK, since ``car-1`` now knows
   ``rsu-1``'s static key;
4. a node of another fleet tries to connect and is refused; then ``car-1`` is revoked and a
   fresh ``rsu-1`` refuses it too;
5. stops the node process with SIGTERM (a graceful close).

SIGINT (Ctrl-C), SIGTERM and SIGHUP stop it early: the node process is stopped the same way
before it exits with status 128 + the signal. The node process runs in a session of its own (a
Ctrl-C at the terminal reaches this process only) and stops by itself when its standard input,
a pipe from this process, closes: also when this process was killed outright.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from meshinfer.demo import STOP_SIGNALS
from meshinfer.errors import MeshInferError
from meshinfer.fleetcli import EXIT_CLOSED_PIPE, stdout_gone
from meshinfer.identity_files import FleetDirectory, NodeDirectory
from meshinfer.proto.identity import RevocationEntry
from meshinfer.proto.messages import AppData
from meshinfer.proto.revocation_wire import RevocationNotice
from meshinfer.runtime.endpoint import SessionListener, dial
from meshinfer.runtime.session import Admission, SessionMetrics
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpTransport


class WireDemoError(MeshInferError):
    """A step of the wire demo could not run (reported in one line, no traceback)."""


def _say(text: str, quiet: bool = False) -> None:
    if not quiet:
        print(text, flush=True)


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "coordinator.cli", *args]
    # (a session of its own: a Ctrl-C meant for the demo lets it finish; the demo stops after it)
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
    if done.returncode != 0:
        raise WireDemoError(f"meshinfer-coord {args[0]} {args[1]} failed (exit {done.returncode})")


def _load_admission(node_dir: Path) -> Admission:
    ident = NodeDirectory(node_dir).load()
    return Admission(ident, NodeDirectory(node_dir).revocations(ident.trust))


# --- the serving node (a separate process) ----------------------------------------------------


async def _serve(node_dir: Path, fleet_dir: Path | None) -> None:
    admission = _load_admission(node_dir)
    if fleet_dir is not None:  # a node with access to the fleet's current revocation list
        admission.revocations = FleetDirectory(fleet_dir).revocations()
    metrics = SessionMetrics()

    async def answer(session):
        print(f"[{admission.identity.node_id}] session from {session.peer_id}", flush=True)
        async for msg in session:
            reply = msg.payload.decode(errors="replace").upper().encode()
            await session.send(AppData(topic="reply", payload=reply))
        print(f"[{admission.identity.node_id}] {session.peer_id} left: {session.close_reason}")

    listener = SessionListener(TcpTransport(), admission, answer, metrics=metrics)
    addr = await listener.start(Address("127.0.0.1", 0))
    print(f"LISTENING {addr.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    loop.add_reader(sys.stdin.fileno(), stop.set)  # end of file: the demo is gone
    await stop.wait()
    await listener.aclose()
    refused = dict(metrics.handshake_failures)
    print(f"[{admission.identity.node_id}] stopping; refused handshakes: {refused}", flush=True)


# --- the driving side -------------------------------------------------------------------------


LISTEN_S = 30.0
"""How long the wire demo waits for its node process to say ``LISTENING``."""


async def _start_node(node_dir: Path, fleet_dir: Path | None = None) -> _NodeProcess:
    """A node process listening (see :meth:`_NodeProcess.listening`)."""
    node = _NodeProcess(node_dir, fleet_dir)
    await node.listening()
    return node


class _NodeProcess:
    def __init__(self, node_dir: Path, fleet_dir: Path | None = None) -> None:
        cmd = [sys.executable, "-m", "meshinfer.demo_wire", "serve", str(node_dir)]
        if fleet_dir is not None:
            cmd.append(str(fleet_dir))
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        self.address = Address("127.0.0.1", 0)  # (known once it said LISTENING: see listening)

    async def listening(self, timeout: float | None = None) -> None:
        """Wait (off the event loop: a stop signal still cancels it) for its ``LISTENING`` line;
        a :class:`WireDemoError` when it exits or says nothing within ``timeout`` s (default
        :data:`LISTEN_S`). On every way out but that line (a cancel too) it is killed and
        reaped."""
        timeout = LISTEN_S if timeout is None else timeout
        stdout = self.proc.stdout
        assert stdout is not None
        reading = asyncio.ensure_future(asyncio.to_thread(stdout.readline))
        line, said = "", None
        try:
            line = await asyncio.wait_for(asyncio.shield(reading), timeout)
        except TimeoutError:
            said = f"it said nothing within {timeout:g} s"
        finally:
            if not line.startswith("LISTENING "):
                self.proc.kill()  # (its stdout ends: the read returns)
                await asyncio.wait({reading})
                if not reading.cancelled():
                    reading.exception()  # (retrieved: a failed read is reported as below)
                self.proc.communicate()
        if not line.startswith("LISTENING "):
            raise WireDemoError(f"node process failed to start: {said or repr(line)}")
        self.address = Address("127.0.0.1", int(line.split()[1]))

    def stop(self) -> str:
        """SIGTERM it and reap it (killed if it has not exited within 10 s); what it printed."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


async def _exchange(car: Admission, addr: Address, n: int, quiet: bool, **kw) -> None:
    session = await dial(TcpTransport(), addr, car, **kw)
    kind = "IK" if kw.get("expected_static") else "XX"
    _say(
        f"[car-1] {kind} session with {session.peer_id} (roles {sorted(session.peer.roles)})", quiet
    )
    for i in range(n):
        await session.send(AppData(topic="hello", payload=f"frame {i} from car-1".encode()))
        reply = await session.recv()
        _say(f"[car-1]   sent 'frame {i} from car-1', got {reply.payload.decode()!r}", quiet)
    rtt = await session.ping()
    _say(f"[car-1]   round trip {rtt * 1e3:.2f} ms", quiet)
    await session.aclose()


async def _refused(label: str, admission: Admission, addr: Address, quiet: bool) -> bool:
    try:
        session = await dial(TcpTransport(), addr, admission)
        await session.send(AppData(topic="hello", payload=b"let me in"))
        said = await session.recv()
        if isinstance(said, RevocationNotice):  # a revoked node is told which entry revokes it
            entry = RevocationEntry.from_bytes(said.entry, admission.identity.trust)
            _say(f"[{label}] told why: revocation entry {entry.sequence} ({entry.reason!r})", quiet)
            await session.recv()  # the refusal's Close
    except MeshInferError as exc:
        _say(f"[{label}] refused: {type(exc).__name__}: {exc}", quiet)
        return True
    _say(f"[{label}] was NOT refused", quiet)
    return False


async def _drive(tmp: Path, n: int, quiet: bool) -> int:
    fleet_dir, rsu_dir, car_dir = tmp / "fleet", tmp / "rsu-1", tmp / "car-1"
    _cli("fleet", "init", "--dir", str(fleet_dir), "--fleet-id", "demo-fleet")
    for node_id, node_dir, roles in (("rsu-1", rsu_dir, "rsu"), ("car-1", car_dir, "vehicle")):
        _cli(
            "fleet",
            "enroll",
            "--dir",
            str(fleet_dir),
            "--node-dir",
            str(node_dir),
            "--node-id",
            node_id,
            "--roles",
            roles,
        )
    _say(f"fleet 'demo-fleet' created in {fleet_dir}; enrolled rsu-1 and car-1", quiet)
    car = _load_admission(car_dir)
    node = await _start_node(rsu_dir)
    ok = True
    try:
        _say(f"rsu-1 runs as process {node.proc.pid}, listening on {node.address}", quiet)
        started = time.perf_counter()
        await _exchange(car, node.address, n, quiet)
        rsu_key = NodeDirectory(rsu_dir).load().static_public
        await _exchange(car, node.address, n, quiet, expected_static=rsu_key)
        intruder = make_fleet(None, ["intruder"], fleet_id="other-fleet").admission("intruder")
        _say(
            "[intruder] a node of another fleet tries (the Noise prologue binds the fleet id)",
            quiet,
        )
        ok &= await _refused("intruder", intruder, node.address, quiet)
        _say(f"sessions done in {(time.perf_counter() - started) * 1e3:.0f} ms", quiet)
    finally:
        for line in node.stop().splitlines():
            _say(line, quiet)
    FleetDirectory(fleet_dir).revoke(node_id="car-1", serial=None, reason="demo", now=time.time())
    _say("car-1 revoked by the fleet authority; rsu-1 restarts with the new list", quiet)
    node = await _start_node(rsu_dir, fleet_dir)
    try:
        ok &= await _refused("car-1", car, node.address, quiet)
    finally:
        for line in node.stop().splitlines():
            _say(line, quiet)
    print("demo finished: " + ("all checks passed" if ok else "SOME CHECKS FAILED"))
    return 0 if ok else 1


async def _until_signalled(work: Coroutine[Any, Any, int]) -> int:
    """Run ``work``; the first of :data:`STOP_SIGNALS` cancels it (its ``finally`` stops the node
    process) and makes the result 128 + that signal."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    received: list[int] = []

    def stop(signum: int) -> None:
        if not received:
            received.append(signum)
            task.cancel()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await task
    except BaseException:
        if not received:
            raise
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    name = signal.Signals(received[0]).name
    print(f"meshinfer wire-demo: stopped by {name}; its node process was stopped", file=sys.stderr)
    return 128 + received[0]


def run_demo(*, messages: int = 5, quiet: bool = False) -> int:
    """Run the wire demo: 0 when every check passed, 1 when one failed or a step could not run,
    128 + the signal when SIGINT, SIGTERM or SIGHUP stopped it."""
    try:
        with tempfile.TemporaryDirectory(prefix="meshinfer-wire-demo-") as tmp:
            return asyncio.run(_until_signalled(_drive(Path(tmp), messages, quiet)))
    except BrokenPipeError as exc:  # ``| head``: the node process is stopped; stop quietly
        if stdout_gone(exc):
            return EXIT_CLOSED_PIPE
        print(f"meshinfer wire-demo: {exc}", file=sys.stderr)
        return 1
    except (MeshInferError, OSError) as exc:  # no temporary directory, a step that failed
        print(f"meshinfer wire-demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        fleet = Path(sys.argv[3]) if len(sys.argv) > 3 else None
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        asyncio.run(_serve(Path(sys.argv[2]), fleet))
    else:
        raise SystemExit(run_demo())
