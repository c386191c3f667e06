"""The node daemon: one TOML file in, a running mesh node out.

Composition, in start order (reverse order on shutdown):

1. identity and revocations from ``[node] identity_dir``;
2. the inference engine (``[inference]``): the math libraries' thread pools limited to
   ``cpu_threads`` (process-wide, put back on close), its models loaded and a dynamic batcher per
   model;
3. the mesh: session listener, membership, discovery (:class:`~meshinfer.runtime.node.MeshNode`);
4. the task executor, which serves work items that reach this node;
5. the HTTP endpoint (``/healthz``, ``/readyz``, ``/metrics``, ``/status``, ``POST
   /position``);
6. a telemetry loop that refreshes the gossiped node state (queue depth, free GPU memory).

The gossiped position and velocity (``[mobility]``, then ``POST /position`` from the vehicle's
positioning) let a coordinator's ``contact_aware`` policy tell how long this node stays in range.

Readiness is reported (``/readyz`` 200 and a ``READY {json}`` line on stdout) only once the
listener is up and every configured model is loaded. SIGTERM drains: the executor stops taking
work and hands back queued items, running ones finish, membership announces the leave, then the
rest closes. A second SIGTERM (or SIGINT) skips the drain.

A revocation list that revokes this node's own certificate, coming in force while it runs (by
gossip, a copy in its identity directory, or a push), stops it as SIGTERM does, and it exits 1:
every peer refuses it from then on, and a restart is refused until it is enrolled again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshinfer.closing import OneClose
from meshinfer.errors import ConfigError, ModelNotFoundError, log_stopped
from meshinfer.identity_files import NodeDirectory
from meshinfer.inference.base import InferenceEngine, ModelRef
from meshinfer.inference.batching import BatcherConfig, DynamicBatcher
from meshinfer.inference.threads import limit_cpu_threads, restore_cpu_threads
from meshinfer.proto.membership_wire import ModelInfo as GossipModel
from meshinfer.runtime.data_dir import DataDir
from meshinfer.runtime.heap import settle_heap
from meshinfer.runtime.loop import close_in_order, serve_until_signalled
from meshinfer.runtime.node import MeshNode
from meshinfer.runtime.startup import (
    check_not_revoked,
    load_identity,
    mesh_options,
    start_mesh,
    until_self_revoked,
)
from meshinfer.runtime.startup import check_validity as check_validity  # (its home was here)
from meshinfer.runtime.telemetry import TelemetryCollector
from meshinfer.tomlconfig import listen_failure
from node.config import NodeConfig, parse_address, parse_models
from node.config import parse_model_ref as parse_model_ref  # (its home was here: re-exported)
from node.executor import HAND_BACK_WRITE_S, TaskExecutor

log = logging.getLogger(__name__)

DRAIN_S = 10.0
"""How long a SIGTERM's drain lets the items running here finish (the rest are handed back)."""
LEAVE_S = 2.0
"""How long a SIGTERM's graceful leave waits for membership to tell the others."""
STOP_S = DRAIN_S + HAND_BACK_WRITE_S + LEAVE_S
"""The longest a SIGTERM's drain and leave take (the hand-backs' writes may outlast the drain
by up to :data:`~node.executor.HAND_BACK_WRITE_S`); closing comes after."""


def make_engine(config: NodeConfig) -> InferenceEngine:
    kind = config.inference.engine
    if kind == "numpy":
        from meshinfer.inference.numpy_engine import NumpyEngine

        return NumpyEngine(inline_max_macs=config.inference.inline_max_macs)
    if kind == "cupy":
        from meshinfer.inference.cupy_engine import CupyEngine

        return CupyEngine()
    from meshinfer.inference.triton_engine import TritonEngine

    return TritonEngine(config.inference.triton_url)


class NodeDaemon:
    """Everything ``meshinfer-node run`` runs; see the module docstring."""

    def __init__(self, config: NodeConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.identity = load_identity(config.node.identity_dir, "[node] identity_dir")
        self.models = parse_models(config.inference.models, "[inference] models")
        self.options = mesh_options(config, self.identity.trust.fleet_id, config.node.identity_dir)
        self.data = DataDir(config.node.data_dir, "[node] data_dir", "meshinfer-node-", "node.lock")
        self.data_dir = self.data.path
        self.engine: InferenceEngine | None = None
        self.batchers: dict[ModelRef, DynamicBatcher] = {}
        self.cpu_threads: dict[str, int] = {}  # math-library pool -> threads, as applied
        self._cpu_limited = False
        self.mesh: MeshNode | None = None
        self.executor: Any = None
        self.http: Any = None
        self.telemetry = TelemetryCollector(gpu=config.inference.engine == "cupy")
        self.snapshot: Any = None
        self.ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self._meshed = asyncio.Event()  # set once self.mesh started (see fatal)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._one_close = OneClose()

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        """Start every component in order; return the facts printed on the READY line."""
        node_dir = NodeDirectory(Path(self.config.node.identity_dir))
        # file I/O (and the list's signature checks) off the loop, as a stop may come meanwhile
        revocations = await asyncio.to_thread(node_dir.revocations, self.identity.trust)
        where = "[node] identity_dir"
        check_not_revoked(self.identity, revocations, where, node_dir.revocations_bin)
        await asyncio.to_thread(self.data.make)
        await self._start_inference()
        self.mesh = MeshNode(self.identity, revocations, self.options, rng=self.rng)
        await start_mesh(self.mesh, self.config)
        self._meshed.set()
        self._publish_models()
        self.set_mobility(self.config.mobility.position, self.config.mobility.velocity)
        await self._start_executor()
        await self._start_http()
        telemetry = asyncio.get_running_loop().create_task(self._telemetry_loop())
        telemetry.add_done_callback(  # it runs until cancelled: ended otherwise, gossip goes stale
            log_stopped(log, "the telemetry loop", lambda: "the state gossiped is not refreshed")
        )
        self._tasks.append(telemetry)
        self.ready.set()
        facts = self.facts()
        await asyncio.to_thread(self.data.write_runtime, facts)
        return facts

    async def fatal(self) -> str:
        """Return (why) once this daemon cannot go on: a revocation list that revokes its own
        certificate came in force while it ran (see the module docstring)."""
        await self._meshed.wait()
        assert self.mesh is not None
        return await until_self_revoked(self.mesh)

    def facts(self) -> dict[str, Any]:
        assert self.mesh is not None and self.mesh.address is not None
        return {
            "node_id": self.node_id,
            "pid": os.getpid(),
            "session": str(self.mesh.address),
            "http": self.http.url if self.http else None,
            "engine": self.config.inference.engine,
            "models": [str(m) for m in self.models],
        }

    async def _start_inference(self) -> None:
        inf = self.config.inference
        self._limit_cpu_threads(inf.cpu_threads)
        self.engine = make_engine(self.config)
        batch = BatcherConfig(
            max_batch_size=inf.max_batch_size,
            max_queue_delay_s=inf.max_queue_delay_ms / 1000,
            max_queue_size=inf.max_queue,
            dispatch_when_idle=inf.dispatch_when_idle,
        )
        for i, ref in enumerate(self.models):
            try:
                await self.engine.load(ref)
            except ModelNotFoundError as exc:  # a typo in the file, most likely: name the key
                raise ConfigError(f"[inference] models[{i}]: {exc}") from None
            batcher = DynamicBatcher(self.engine, ref, batch)
            await batcher.start()
            self.batchers[ref] = batcher

    def _limit_cpu_threads(self, n: int) -> None:
        """Limit the math libraries' pools (process-wide) before any model runs; log them."""
        self.cpu_threads = limit_cpu_threads(n)
        self._cpu_limited = n > 0
        pools = ", ".join(f"{k}={v}" for k, v in self.cpu_threads.items()) or "none found"
        setting = n or "the libraries' default"
        log.info("math-library threads per pool (cpu_threads %s): %s", setting, pools)
        if n and any(threads != n for threads in self.cpu_threads.values()):
            log.warning("[inference] cpu_threads %d did not take for every pool: %s", n, pools)

    def _publish_models(self) -> None:
        assert self.mesh is not None and self.mesh.membership is not None
        loaded = {info.ref: info.sha256 for info in getattr(self.engine, "loaded_models", ())}
        models = tuple(
            GossipModel(r.model_id, r.version, bytes.fromhex(loaded.get(r, "")[:16]))
            for r in self.models
        )
        state = self.mesh.membership.state
        self.mesh.membership.update_state(_replace(state, models=models))

    def set_mobility(self, position: Sequence[float], velocity: Sequence[float]) -> bool:
        """Gossip where this node is and how it moves (metres, metres/second; empty: unknown,
        not moving), for the ``contact_aware`` policy: ``[mobility]`` at start, then ``POST
        /position``. Both checked by the caller (2 or 3 finite numbers). On the loop. False
        when nothing is gossiped any more (a drain left membership): nothing was taken."""
        membership = self.mesh.membership if self.mesh is not None else None
        if membership is None or membership.core.has_left:  # (a drain left: no gossip)
            return False
        state = membership.state
        where = tuple(map(float, position)) or None
        motion = tuple(map(float, velocity)) or None
        if (state.position, state.velocity) != (where, motion):
            membership.update_state(_replace(state, position=where, velocity=motion))
        return True

    async def _start_executor(self) -> None:
        assert self.mesh is not None
        self.executor = TaskExecutor(self.mesh, self.batchers, self.config.executor, rng=self.rng)
        self.executor.start()
        membership = self.mesh.membership
        if membership is not None and self.config.executor.input_cache_mib:
            # only now may a coordinator send inputs by reference
            state = membership.state
            membership.update_state(
                _replace(state, input_cache_mb=self.config.executor.input_cache_mib)
            )

    async def _start_http(self) -> None:
        if not self.config.http.enabled:
            return
        from node.http import NodeHttp

        listen = self.config.http.listen
        self.http = NodeHttp(self, parse_address(listen, "[http] listen"))
        try:
            await self.http.start()
        except OSError as exc:
            raise listen_failure("[http] listen", listen, exc) from None

    async def _telemetry_loop(self) -> None:
        assert self.mesh is not None and self.mesh.membership is not None
        failing = False
        while not self._closed:
            stats = [b.stats() for b in self.batchers.values()]
            try:
                self.snapshot = await self.telemetry.sample(stats)
                failing = False
            except Exception:  # the loop also gossips the queue depth: it must go on
                if not failing:  # (a warning: a wedged GPU is the host's fault, not ours)
                    log.warning("telemetry sample failed; keeping the last one", exc_info=True)
                failing = True
            depth = self.executor.backlog if self.executor else 0
            state = self.mesh.membership.state
            gpu_free = self._gpu_free_mb()
            changed = state.queue_depth != depth or state.gpu_free_mb != gpu_free
            if changed and not self.mesh.membership.core.has_left:  # (a drain left: no gossip)
                self.mesh.membership.update_state(
                    _replace(state, queue_depth=depth, gpu_free_mb=gpu_free)
                )
            await asyncio.sleep(1.0)

    def _gpu_free_mb(self) -> int:
        """The gossiped free GPU memory: the freest single device's (a task's memory must fit
        on one GPU; placement's ``min_gpu_memory`` reads this), 0 without a GPU."""
        snap = self.snapshot
        free = snap.gpu_memory_free_max_bytes if snap else None
        return 0 if free is None else max(0, int(free // (1 << 20)))  # (peers refuse < 0)

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not) for ``/readyz``."""
        problems = []
        if self.mesh is None or not self.mesh.ready.is_set():
            problems.append("mesh not listening")
        loaded = self._engine_models(problems)
        missing = [
            str(r)
            for r in self.models
            if r not in loaded or r not in self.batchers or self.batchers[r].closed
        ]
        if missing:
            problems.append(f"models not loaded: {', '.join(missing)}")
        for ref, batcher in self.batchers.items():
            if batcher.failure is not None:  # every item for it would fail
                problems.append(f"batcher for {ref} stopped: {batcher.failure!r}")
        if self.stopping.is_set():
            problems.append("draining")
        return not problems, problems

    def _engine_models(self, problems: list[str]) -> tuple[ModelRef, ...]:
        """The models the engine holds loaded now; a problem added when it is not ready, or
        cannot say (a GPU lost under it: its ``capacity`` raises), which then holds none."""
        try:
            capacity = self.engine.capacity() if self.engine is not None else None
        except Exception as exc:  # the engine's fault, told to whoever asks: never a 500
            problems.append(f"engine not ready: {exc!r}")
            return ()
        if capacity is None or not capacity.ready:
            problems.append("engine not ready")
        return () if capacity is None else capacity.loaded_models

    async def drain_and_close(self, timeout: float = DRAIN_S) -> None:
        """SIGTERM: stop taking work, finish or hand back what we have, leave, close (at most
        :data:`STOP_S` with the default ``timeout``, closing aside)."""
        self.stopping.set()
        self._withdraw_models()
        if self.executor is not None:
            with contextlib.suppress(Exception):
                await self.executor.drain(timeout)
        if self.mesh is not None:
            with contextlib.suppress(Exception):
                await self.mesh.leave(timeout=LEAVE_S)
        await self.aclose()

    def _withdraw_models(self) -> None:
        """Gossip that this node serves no model any more: coordinators and peers stop
        sending it work now, instead of having every item bounce off the drain."""
        membership = self.mesh.membership if self.mesh is not None else None
        if membership is not None:
            membership.update_state(_replace(membership.state, models=()))

    async def aclose(self) -> None:
        """Close in reverse start order. Idempotent; errors are logged, not raised. The close
        runs once (:class:`~meshinfer.closing.OneClose`): a caller cancelled half-way leaves it
        running, and a later call waits for it (it returned at once, the mesh and the engine
        left open)."""
        self._closed = True
        await self._one_close.run(self._close, name="node-close")

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        # awaited (a pending task at loop close is an ERROR line); a cancel lost in a race
        # with the telemetry reading ends its loop at the next turn (it checks _closed)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        steps = [
            self.http.aclose() if self.http else None,
            self.executor.aclose() if self.executor else None,
            self.mesh.aclose() if self.mesh else None,
            *(b.aclose() for b in self.batchers.values()),
            self.engine.aclose() if self.engine else None,
        ]
        await close_in_order(steps, log)
        await asyncio.to_thread(self.data.close)  # a temporary one is removed whole
        self.telemetry.close()
        if self._cpu_limited:
            self._cpu_limited = False
            restore_cpu_threads()


def _replace(state: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(state, **changes)


async def run_daemon(config: NodeConfig, parent_pid: int | None = None) -> int:
    """Run until SIGTERM/SIGINT (or, with ``parent_pid``, until this process's parent is no
    longer that one: ``--exit-with-parent``); print ``READY {json}`` once ready. Returns the
    exit code."""
    daemon = NodeDaemon(config)
    return await serve_until_signalled(
        daemon, daemon.drain_and_close, parent_pid, on_ready=settle_heap, fatal=daemon.fatal
    )
