"""A real Triton Inference Server (NVIDIA PyTriton) serving registry models on the CPU, for tests.

Run it directly::

    python -m meshinfer.testing.triton_server --http-port 8000 --grpc-port 8001 --metrics-port 8002

serves ``digits-mlp`` version 1 on 127.0.0.1 (``--address 0.0.0.0`` for every interface; add
``--model id@version`` to choose others; Triton versions must be integers) through a Python
inference callable that runs the NumPy forward pass of :mod:`meshinfer.inference.mlp`, until
SIGINT or SIGTERM.

From a test, :class:`TritonServerProcess` does the plumbing: it picks free ports, starts the
server in its own process group with ``LD_LIBRARY_PATH`` pointing at this interpreter's
``libpython`` (PyTriton's Python-backend stub needs it), waits -- bounded -- until the child
reports that every model is ready (a line on a pipe, not polling), and at :meth:`stop` sends
SIGINT, then kills the whole process group if the server lingers (a graceful stop takes a few
seconds; ``timeout_s`` is only its bound). What a killed server cannot clean up itself -- the
Python backend's model copies in ``/tmp`` and its shared memory in ``/dev/shm`` -- is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

from meshinfer.inference.base import ModelRef

DIGITS = ModelRef("digits-mlp", "1")
READY_LINE = b"meshinfer-triton-ready\n"


class TritonServerError(RuntimeError):
    """The test server could not start (the message carries the tail of its log)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1 that were free a moment ago (all held bound
    at once while they are picked, so no two are the same)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def server_environment() -> dict[str, str]:
    """This process's environment plus the interpreter's LIBDIR in ``LD_LIBRARY_PATH``."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
    return env


class TritonServerProcess:
    """Starts and stops ``python -m meshinfer.testing.triton_server`` in a subprocess.

    The ports stay the same across :meth:`stop` / :meth:`start`, so a client can watch the
    server go away and come back (a restart).
    """

    def __init__(self, models: Sequence[ModelRef] = (DIGITS,)) -> None:
        self.models = tuple(models)
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self.log_path: Path | None = None

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (tritonclient wants no scheme)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the server and return once every model is ready. Blocking (test helper).

        Raises :class:`TritonServerError` (with the log's tail, once there is a log) when the
        server cannot be started, exits during startup or is not ready within ``timeout_s``; by
        then what it started is gone (its process group killed, its files removed). A server
        that died on its own since the last start is cleaned up so before the new one starts."""
        if self.running:
            return
        self._end(0.0)  # the remains of a server that exited by itself, if any
        self._tmp = Path(tempfile.mkdtemp(prefix="meshinfer-triton-"))
        self.log_path = self._tmp / "server.log"
        ready_read, ready_write = os.pipe()
        try:
            self._process = self._spawn(ready_write)
        except BaseException as exc:
            os.close(ready_read)
            self._end(0.0)
            if isinstance(exc, OSError):
                raise TritonServerError(f"could not start the server: {exc}") from exc
            raise
        finally:
            os.close(ready_write)
        try:
            self._wait_ready(ready_read, timeout_s)
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(ready_read)

    def _spawn(self, ready_fd: int) -> subprocess.Popen[bytes]:
        assert self._tmp is not None and self.log_path is not None
        command = [sys.executable, "-m", "meshinfer.testing.triton_server"]
        command += ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        command += ["--metrics-port", str(self.metrics_port), "--ready-fd", str(ready_fd)]
        command += ["--workspace", str(self._tmp / "workspace")]
        for ref in self.models:
            command += ["--model", f"{ref.model_id}@{ref.version}"]
        with open(self.log_path, "wb") as log:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    **server_environment(),
                    "TMPDIR": str(self._tmp),
                },  # all its files in one place
                pass_fds=(ready_fd,),
                start_new_session=True,  # its own process group: stop() can reap tritonserver too
            )

    def _wait_ready(self, ready_fd: int, timeout_s: float) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(ready_fd, selectors.EVENT_READ)
            if not selector.select(timeout_s):
                raise TritonServerError(f"not ready after {timeout_s} s\n{self.log_tail()}")
        if os.read(ready_fd, len(READY_LINE)) != READY_LINE:  # EOF: the child died first
            raise TritonServerError(f"server exited during startup\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server (SIGINT, then SIGKILL to its process group). Idempotent."""
        self._end(timeout_s)

    def kill(self) -> None:
        """Crash the server: SIGKILL its whole process group at once (no graceful shutdown)."""
        self._end(0.0)

    def _end(self, grace_s: float) -> None:
        process, self._process = self._process, None
        if process is not None:
            _interrupt_then_kill(process, grace_s)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TritonServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _interrupt_then_kill(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is None and timeout_s > 0:
        process.send_signal(signal.SIGINT)  # PyTriton stops tritonserver and cleans up
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    leftovers = _model_copies(process.pid)
    segments = _shared_memory(process.pid)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its group
    except ProcessLookupError:
        pass
    process.wait()
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)
    for segment in segments:
        with contextlib.suppress(OSError):
            segment.unlink()


def _model_copies(group: int) -> set[Path]:
    """Triton's Python backend copies each model to ``/tmp/folderXXXXXX`` (ignoring TMPDIR) and
    removes it only on a graceful stop; find the copies that the stubs of ``group`` run from."""
    import psutil

    folders = set()
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) != group:
                continue
            for arg in proc.info["cmdline"] or ():
                path = Path(arg)
                if path.name == "model.py" and path.parent.parent.name.startswith("folder"):
                    folders.add(path.parent.parent)
    return folders


def _shared_memory(group: int) -> set[Path]:
    """The ``/dev/shm`` files that the processes of ``group`` map or hold open: the Python
    backend's region (``pytrtion<pid>-...``, ~4 MiB) and PyTriton's tensor stores are unlinked
    only on a graceful stop, and a killed server would leave them in RAM for good."""
    import psutil

    segments = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) != group:
                continue
            paths = [m.path for m in proc.memory_maps(grouped=False)]
            paths += [f.path for f in proc.open_files()]
            segments.update(Path(p) for p in paths if p.startswith("/dev/shm/"))
    return segments


# --- the server side (runs in the child process) -------------------------------------------------


def _parse_ref(text: str) -> ModelRef:
    model_id, _, version = text.partition("@")
    if not version.isdigit():
        raise argparse.ArgumentTypeError(f"want id@<integer version>, got {text!r}")
    return ModelRef(model_id, version)


def _bind(triton: object, ref: ModelRef) -> None:
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor

    from meshinfer.inference.mlp import forward
    from meshinfer.inference.registry import default_registry

    info = default_registry().get(ref)
    weights = info.load_weights()
    (source,), (target,) = info.inputs, info.outputs

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        pixels = np.ascontiguousarray(inputs[source.name], dtype=np.float32)
        return {target.name: forward(weights, pixels)}

    triton.bind(  # type: ignore[attr-defined]
        model_name=ref.model_id,
        model_version=int(ref.version),
        infer_func=infer,
        inputs=[Tensor(name=source.name, dtype=np.float32, shape=source.shape[1:])],
        outputs=[Tensor(name=target.name, dtype=np.float32, shape=target.shape[1:])],
        config=ModelConfig(max_batch_size=256),
        strict=True,
    )


def _serve(args: argparse.Namespace) -> None:
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(
        http_address=args.address,
        http_port=args.http_port,
        grpc_address=args.address,
        grpc_port=args.grpc_port,
        metrics_address=args.address,
        metrics_port=args.metrics_port,
    )
    triton = Triton(config=config, workspace=args.workspace)
    for ref in args.model or [DIGITS]:
        _bind(triton, ref)
    try:
        triton.run()  # starts tritonserver and waits until the models are loaded
        if args.ready_fd is not None:
            os.write(args.ready_fd, READY_LINE)
            os.close(args.ready_fd)
        triton.serve()  # until SIGINT (KeyboardInterrupt), then stops and cleans up
    finally:
        triton.stop()


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m meshinfer.testing.triton_server``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1", help="to listen on (all: 0.0.0.0)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--model", type=_parse_ref, action="append", help="id@version")
    parser.add_argument("--workspace", help="a directory PyTriton may create (must not exist)")
    parser.add_argument("--ready-fd", type=int, help="write a line to this fd once ready")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    _serve(args)


if __name__ == "__main__":
    main()
