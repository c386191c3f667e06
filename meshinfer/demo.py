"""``meshinfer demo``: a coordinator and node daemons on this machine classify digits together.

Everything runs as an operator would run it, only on loopback and in a throw-away directory:

1. a new fleet (authority key, API token) and one certificate per daemon;
2. ``meshinfer-coord serve`` and ``--nodes`` times ``meshinfer-node run`` as separate processes,
   each with its own Noise identity, on the CPU (NumPy) engine; they find each other by mDNS and
   SWIM gossip, and the coordinator waits until it sees every node alive with its models;
3. the shipped held-out digits are classified across the mesh as a stream of small ``batch``
   tasks (each sharded into items spread over the nodes), submitted through the coordinator's
   HTTP API with several tasks in flight;
4. halfway through, the node with the most work in flight is frozen (SIGSTOP, so that its work
   cannot finish first) and killed with SIGKILL: its items are re-dispatched to the others, and
   no task is lost;
5. one ``parallel`` task runs the whole held-out set through the three digit models and combines
   them (``ensemble`` aggregation);
6. a summary: accuracy, throughput, task latency percentiles, and the work each node did.

``--json`` prints the summary as one JSON object instead, with these keys (times in seconds,
null where there is nothing to say):

- ``nodes``: the node daemons' names (the coordinator is not one);
- ``killed``: the node killed halfway (null with ``--no-kill``); ``killed_in_flight``: the items
  the coordinator counted in flight on it then; ``kill_settled_s``: from the kill until none was
  left on it; ``killed_items_moved``: the items re-dispatched meanwhile; ``kill_detected_s``:
  from the kill until membership no longer had it alive;
- ``kill_error``: why the halfway kill failed (null: it did not);
- ``tasks``: the batch tasks that ended; ``tasks_failed``: one line for each that did not succeed;
- ``rows``: the held-out digits; ``rows_classified``: those the batch tasks classified;
  ``accuracy``: the share of all ``rows`` classified right (one not classified counts as wrong);
- ``rows_per_s``: ``rows_classified`` over ``seconds``, the time from the first submission to the
  last task's end;
- ``latency``: ``p50_ms``, ``p90_ms`` and ``p99_ms`` of the succeeded batch tasks, each from
  its submission to its result over HTTP, by nearest rank (a time one task took: p99 of fewer
  than 100 tasks is the slowest);
- ``ensemble_state``, ``ensemble_accuracy``, ``ensemble_s``: the ensemble task's end, the share of
  ``rows`` it classified right and how long it took;
- ``items_by_node``: the work items each node completed (every node named, 0 for none; the batch
  tasks' and the ensemble's); ``items``: their sum;
- ``node_status``: each node daemon's process as the summary was made: ``alive``, ``killed``
  (the halfway kill's) or ``exited (status N)`` (one that ended by itself: the demo fails);
- ``retries``, ``redispatched_after_death``, ``duplicates_dropped``: the coordinator's counts of
  items tried again, moved off a node that died, and results that came twice (the second dropped).

Ctrl-C, SIGTERM and SIGHUP stop it early the same way: the daemons are stopped (SIGTERM, they
drain) before it exits with status 128 + the signal. A second of them while it waits for the
daemons (a second Ctrl-C) waits no longer: the daemons left are killed (SIGKILL) and reaped, and
it exits with the same status (128 + the first signal). The daemons also run with
``--exit-with-parent``, so that even a demo killed outright leaves none behind.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meshinfer.errors import MeshInferError
from meshinfer.fleetcli import EXIT_CLOSED_PIPE, stdout_gone
from meshinfer.percentiles import nearest_rank

DIGITS = "digits-mlp@1"
ENSEMBLE = ("digits-mlp@1", "digits-mlp-wide@1", "digits-mlp-deep@1")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
KILLER_GRACE_S = 10.0
"""How long :meth:`Demo.stop` waits for the node killer to give up before stopping the daemons."""
DRAIN_S = 20.0
"""How long :meth:`Demo.stop` lets the daemons drain after SIGTERM before it kills them: a node
daemon's drain and leave take up to ``node.daemon.STOP_S`` (14 s), then it closes."""
FORCED_CHECK_S = 0.05
"""How often :meth:`Demo.stop` looks, while it waits, whether a second stop signal came."""
TASK_WAIT_S = 60.0
"""How long the batch stream waits for one task."""
WAIT_SLICE_S = 1.0
"""The longest single wait of the batch stream for a task: once the demo is halted, each of its
threads ends within about that long (the client asks a coordinator gone away again, for all of
a wait's time: the demo's process could not exit until then)."""


class DemoError(MeshInferError):
    """The demo cannot run here: no temporary directory, a daemon that did not come up (its mDNS
    or API port taken), a fleet that did not assemble. Reported in one message, no traceback."""


class Interrupted(BaseException):
    """Raised in the main thread by the first of :data:`STOP_SIGNALS` (a BaseException, like
    KeyboardInterrupt: no ``except Exception`` on the way swallows it)."""


class OutputClosed(BaseException):
    """Raised by :meth:`Demo.say` once the reader of stdout has gone (``meshinfer demo | head``):
    the demo stops its daemons and ends quietly with :data:`~meshinfer.fleetcli.EXIT_CLOSED_PIPE`
    (a BaseException, like :class:`Interrupted`)."""


class StopSignals:
    """While entered, the first of :data:`STOP_SIGNALS` sets :attr:`stopping` and raises
    :class:`Interrupted` in the main thread, so that the ``finally`` stopping the daemons runs;
    once :meth:`hold` was called (that cleanup is under way) it is only recorded. A second one
    sets :attr:`forced` (the daemons are to be killed, not waited for); later ones are ignored.
    The previous handlers are put back on exit. Outside the main thread (where no handler can be
    set) it does nothing.

    A handler's exception can land where Python cannot raise it (a weakref callback, a
    ``__del__``: it is then "ignored"); :meth:`check` raises it again between the demo's steps,
    and :attr:`stopping` ends the step under way soon.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopping = threading.Event()
        self.forced = threading.Event()
        self._held = False
        self._previous: dict[int, Any] = {}
        self._unraisable = sys.unraisablehook

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
            sys.unraisablehook = self._ignore_interrupted
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous:
            sys.unraisablehook = self._unraisable

    def hold(self) -> None:
        """From now on a signal is recorded, not raised."""
        self._held = True

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal came (and no cleanup is under way)."""
        if self.received is not None and not self._held:
            raise Interrupted(signal.Signals(self.received).name)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            self.forced.set()  # (nothing waits on it in this thread: setting it cannot block)
            return
        self.received = signum
        self.stopping.set()
        self.check()

    def _ignore_interrupted(self, unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, Interrupted):
            self._unraisable(unraisable)


@dataclass
class DemoOptions:
    """Knobs of ``meshinfer demo`` (the defaults are what the README runs)."""

    nodes: int = 3
    rows_per_task: int = 8
    shard_size: int = 2
    in_flight: int = 12
    kill: bool = True
    keep: Path | None = None
    quiet: bool = False
    json: bool = False


@dataclass
class Progress:
    """What the batch stream has done so far (shared by the submitting threads)."""

    latencies: list[float] = field(default_factory=list)
    labels: dict[int, list[int]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def done(self) -> int:
        with self.lock:
            return len(self.latencies) + len(self.failed)


class Demo:
    """One run of the demo; see the module docstring."""

    def __init__(
        self,
        options: DemoOptions,
        root: Path,
        halted: threading.Event | None = None,
        forced: threading.Event | None = None,
    ) -> None:
        """``halted``: set when the demo is to stop (by :meth:`stop`, or a signal); ``forced``:
        set when it is to stop at once (a second signal): :meth:`stop` then kills the daemons."""
        from meshinfer.testing.cluster import LocalCluster

        self.options = options
        self.started = time.monotonic()
        # a fleet id of its own: two demos at once would otherwise share one (started in the same
        # second), and with it their nodes' mDNS names, and dial each other's nodes
        fleet_id = f"demo-{int(time.time())}-{secrets.token_hex(3)}"
        # (LocalCluster makes the root absolute: ``--keep DIR`` may name a relative DIR)
        self.cluster = LocalCluster(root, fleet_id=fleet_id, preset="lan")
        roles = ["rsu"] + ["vehicle"] * (options.nodes - 1)
        self.names = ["rsu-1"] + [f"veh-{i}" for i in range(1, options.nodes)]
        self.roles = dict(zip(self.names, roles, strict=True))
        self.client: Any = None
        self.daemons: list[Any] = []  # the daemons start() started (DaemonProcess)
        self.victim: str | None = None
        self.kill_report: dict[str, Any] = {}
        self.kill_error: str | None = None  # why the halfway kill failed (the summary says it)
        self.killer: threading.Thread | None = None  # kills a node halfway (see classify)
        self.halted = halted or threading.Event()  # the stream and the killer give up
        self.forced = forced or threading.Event()  # stop() waits no longer
        self.killed: list[str] = []  # the daemons stop() had to SIGKILL
        self.output_closed = False  # the reader of stdout has gone: the demo stops quietly

    def say(self, text: str) -> None:
        """Print one step; :class:`OutputClosed` once the reader of stdout has gone (``| head``),
        from then on without printing, so that every thread's next step ends the demo."""
        if self.output_closed:
            raise OutputClosed
        if self.options.quiet:
            return
        try:
            print(f"[{time.monotonic() - self.started:5.1f}s] {text}", flush=True)
        except BrokenPipeError as exc:
            if not stdout_gone(exc):
                raise
            self.output_closed = True
            raise OutputClosed from None

    # --- setup -----------------------------------------------------------------------------

    def start(self) -> None:
        from coordinator.client import CoordinatorClient

        self.cluster.add_coordinator("coord")
        for name in self.names:
            self.cluster.add_node(name, roles=(self.roles[name],))
        self.say(
            f"fleet {self.cluster.fleet_id!r} created in {self.cluster.root}; enrolled the"
            f" coordinator and {', '.join(self.names)}"
        )
        with ThreadPoolExecutor(len(self.names) + 1) as pool:
            futures = [pool.submit(self.cluster.start_coordinator, "coord")]
            futures += [pool.submit(self.cluster.start, name) for name in self.names]
            self.daemons = daemons = [_started(future) for future in futures]
        coord = daemons[0]
        self.client = CoordinatorClient(coord.facts["api"], self.cluster.token)
        pids = ", ".join(f"{d.name} {d.facts['pid']}" for d in daemons)
        self.say(f"started 1 coordinator + {len(self.names)} node processes (pids: {pids})")
        self.say(f"coordinator API at {coord.facts['api']}, session at {coord.facts['session']}")
        self.wait_for_nodes()

    def wait_for_nodes(self) -> None:
        """Wait until the coordinator sees every node alive with its models (or a halt)."""
        try:
            self.cluster.wait_for(self._halted_or(self._all_nodes_ready), timeout=30)
        except TimeoutError:
            raise DemoError(
                "the coordinator did not see every node alive with its models within 30 s"
                f" ({self._seen()}); the daemons find each other by mDNS (UDP port 5353, group"
                " 224.0.0.251) on 127.0.0.1: let it through a firewall there, and on Linux"
                f" give lo the MULTICAST flag (`ip link set lo multicast on`).{self._logs_hint()}"
            ) from None
        if self.halted.is_set():
            return
        self.say(
            f"the coordinator sees {len(self.names)} nodes alive (mDNS + SWIM gossip), each"
            f" serving {', '.join(ENSEMBLE)}"
        )

    def _seen(self) -> str:
        """What the coordinator sees of each node (for an error message)."""
        try:
            nodes = self._nodes()
        except MeshInferError as exc:
            return f"its API did not answer: {exc}"
        return ", ".join(f"{name} {_node_state(nodes.get(name))}" for name in self.names)

    def _logs_hint(self) -> str:
        if self.options.keep is not None:
            return f" The daemons' logs are in {self.cluster.root}."
        return " Run it with --keep DIR to keep the daemons' logs."

    def _all_nodes_ready(self) -> bool:
        """Whether the coordinator sees every node alive with its models; a :class:`DemoError`
        naming a daemon that exited meanwhile, with its log's tail (no wait can help then)."""
        for daemon in self.daemons:
            if not daemon.alive():
                raise DemoError(
                    f"{daemon.name} exited (status {daemon.proc.returncode}) before the fleet"
                    f" assembled; log tail:\n{self.cluster.log_tail(daemon.name)}"
                )
        nodes = {n["node_id"]: n for n in self.client.nodes()["nodes"]}
        return all(
            nodes.get(name, {}).get("status") == "alive" and len(nodes[name]["models"]) >= 3
            for name in self.names
        )

    # --- the batch stream ------------------------------------------------------------------

    def classify(self, x: np.ndarray) -> tuple[Progress, float]:
        """Classify ``x`` as a stream of batch tasks; kill a node halfway. (progress, seconds)"""
        from coordinator.client import tensor_json

        step = self.options.rows_per_task
        chunks = [(i, x[i : i + step]) for i in range(0, len(x), step)]
        progress = Progress()
        self.say(
            f"classifying {len(x)} held-out digits with {DIGITS}: {len(chunks)} batch tasks of"
            f" {step} rows (shards of {self.options.shard_size}), {self.options.in_flight} in"
            " flight"
        )

        def run(chunk: tuple[int, np.ndarray]) -> None:
            if self.halted.is_set():
                return
            start, rows = chunk
            t0 = time.perf_counter()
            try:
                task = self.client.submit({
                    "pattern": "batch", "model": DIGITS, "inputs": tensor_json(rows),
                    "shard_size": self.options.shard_size,
                })  # fmt: skip
                doc = self._finished(task["task_id"])
            except MeshInferError as exc:
                if self.halted.is_set():
                    return
                with progress.lock:
                    progress.failed.append(f"rows {start}..: {exc}")
                return
            if doc is None:  # halted
                return
            elapsed = time.perf_counter() - t0
            with progress.lock:
                if doc["state"] == "succeeded":
                    progress.latencies.append(elapsed)
                    progress.labels[start] = doc["result"]["labels"]
                else:
                    progress.failed.append(f"{doc['task_id']}: {doc['state']} {doc['error']}")

        t0 = time.perf_counter()
        if self.options.kill:
            self.start_killer(progress, len(chunks))
        with _abandoned_when_interrupted(ThreadPoolExecutor(self.options.in_flight)) as pool:
            list(pool.map(run, chunks))
        elapsed = time.perf_counter() - t0
        if self.killer is not None:
            self.killer.join()
        return progress, elapsed

    def _finished(self, task_id: str) -> dict[str, Any] | None:
        """The task's document once it finished (or as it is after :data:`TASK_WAIT_S`), waited
        for in waits of at most :data:`WAIT_SLICE_S`; None once the demo is halted."""
        from coordinator.client import AWAY_CODES, TERMINAL_STATES, ApiError

        deadline = time.monotonic() + TASK_WAIT_S
        while not self.halted.is_set():
            left = deadline - time.monotonic()
            try:
                doc = self.client.wait(task_id, timeout=max(0.0, min(WAIT_SLICE_S, left)))
            except ApiError as exc:  # (a coordinator away: asked again while time is left)
                if self.halted.is_set() or (exc.code in AWAY_CODES and left > WAIT_SLICE_S):
                    continue
                raise
            if doc["state"] in TERMINAL_STATES or left <= WAIT_SLICE_S:
                return doc
        return None

    def start_killer(self, progress: Progress, total: int) -> None:
        """Start the thread that kills the busiest node once half of ``total`` tasks are done
        (:meth:`stop` waits for it)."""
        self.killer = threading.Thread(
            target=self._kill_halfway, args=(progress, total), daemon=True
        )
        self.killer.start()

    def _kill_halfway(self, progress: Progress, total: int) -> None:
        try:
            self._kill_a_busy_node(progress, total)
        except OutputClosed:
            self.halted.set()  # the stream gives up; the main thread's next step says so
        except Exception as exc:  # (the coordinator is gone when the demo is stopped early)
            if not self.halted.is_set():  # else said in the summary, which fails the demo
                self.kill_error = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, MeshInferError):  # (a fault here: where it came from)
                    traceback.print_exc()

    def _kill_a_busy_node(self, progress: Progress, total: int) -> None:
        while progress.done < total // 2:
            if self.halted.wait(0.005):
                return
        before = self.client.stats()
        frozen = self._freeze_a_busy_node(progress, total)
        if frozen is None:
            return
        self.victim, in_flight = frozen
        killed_at = time.perf_counter()  # (kill() returns once the process is reaped)
        self.cluster.kill(self.victim, signal.SIGKILL)
        self.say(f"halfway: SIGKILL {self.victim} with {_items(in_flight)} in flight on it")
        self.kill_report = {"node": self.victim, "in_flight": in_flight}
        try:
            self.cluster.wait_for(self._halted_or(self._victim_idle), timeout=30, step=0.005)
            if self.halted.is_set():
                return
            self.kill_report["settled_s"] = time.perf_counter() - killed_at
            moved = (
                self.client.stats()["redispatched_after_death"] - before["redispatched_after_death"]
            )
            self.kill_report["moved"] = moved
            self.cluster.wait_for(self._halted_or(self._victim_not_alive), timeout=30, step=0.02)
        except TimeoutError:
            self.say(f"{self.victim}'s work was not settled within 30 s")
            return
        if self.halted.is_set():
            return
        self.kill_report["detected_s"] = time.perf_counter() - killed_at
        counted = ""
        if moved > in_flight:  # the coordinator went on sending to the frozen node
            counted = f" ({moved - in_flight} of them sent to it after the count above)"
        elif in_flight > moved:
            counted = f"; {_items(in_flight - moved)} answered just before"
        self.say(
            f"{self.kill_report['settled_s'] * 1000:.0f} ms after the kill nothing was left on"
            f" {self.victim}: the coordinator saw its session drop, could not reach it again"
            f" and re-dispatched {_items(moved)} to other nodes{counted}"
        )
        self.say(
            f"membership marked {self.victim} {self._victim_status()} after"
            f" {self.kill_report['detected_s']:.2f}s (SWIM, lan preset)"
        )

    def _freeze_a_busy_node(self, progress: Progress, total: int) -> tuple[str, int] | None:
        """SIGSTOP the node with the most work in flight, so that the kill finds its work still
        on it (a fast node may otherwise answer everything between the look and the kill); if
        the coordinator then counts nothing in flight there, let it go on and look again, until
        three quarters of the stream are done. (node, items in flight on it), that node left
        stopped; None once the demo is halted. No other way out (a look that fails raises) leaves
        a node stopped."""
        while not self.halted.is_set():
            nodes = self._nodes()
            victim = max(self.names[1:], key=lambda n: nodes.get(n, {}).get("in_flight", 0))
            if self.halted.is_set():  # stop() may have let every node go on: freeze none now
                return None
            proc = self.cluster.processes[victim].proc
            proc.send_signal(signal.SIGSTOP)
            frozen = None
            try:
                time.sleep(0.02)  # answers already on their way arrive
                in_flight = self._nodes().get(victim, {}).get("in_flight", 0)
                if (in_flight or progress.done >= total * 3 // 4) and not self.halted.is_set():
                    frozen = victim, in_flight
            finally:
                if frozen is None:  # let it go on, also when the look failed
                    proc.send_signal(signal.SIGCONT)
            if frozen is not None:
                return frozen
            time.sleep(0.005)
        return None

    def _nodes(self) -> dict[str, dict[str, Any]]:
        return {n["node_id"]: n for n in self.client.nodes()["nodes"]}

    def _victim_idle(self) -> bool:
        return self._nodes().get(self.victim, {}).get("in_flight", 0) == 0

    def _victim_status(self) -> str:
        return self._nodes().get(self.victim, {}).get("status", "gone")

    def _victim_not_alive(self) -> bool:
        return self._victim_status() != "alive"

    def _halted_or(self, predicate: Callable[[], bool]) -> Callable[[], bool]:
        return lambda: self.halted.is_set() or predicate()

    # --- the ensemble ----------------------------------------------------------------------

    def ensemble(self, x: np.ndarray) -> tuple[dict[str, Any], float]:
        from coordinator.client import tensor_json

        self.say(f"one parallel task: all {len(x)} digits through {len(ENSEMBLE)} models, ensemble")
        t0 = time.perf_counter()
        task = self.client.submit({
            "pattern": "parallel", "models": list(ENSEMBLE), "inputs": tensor_json(x),
            "aggregation": "ensemble",
        })  # fmt: skip
        # (in waits of at most WAIT_SLICE_S, like the stream's: once halted it waits no longer)
        doc = self._finished(task["task_id"])
        return doc or {}, time.perf_counter() - t0

    def stop(self) -> None:
        """Halt the stream and the node killer (waiting up to :data:`KILLER_GRACE_S` for it to
        give up), SIGTERM every daemon (a frozen one is let go on), wait up to :data:`DRAIN_S`
        for them, kill stragglers and reap them. Once :attr:`forced` is set (at the latest
        :data:`FORCED_CHECK_S` later) it waits no longer: it kills every daemon left."""
        self.halted.set()
        if self.killer is not None:
            self._unless_forced(_joined(self.killer), KILLER_GRACE_S)
        daemons = list(self.cluster.processes.values())
        if not self.forced.is_set():
            for daemon in daemons:
                if daemon.alive():
                    daemon.proc.send_signal(signal.SIGTERM)
                    daemon.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + DRAIN_S
        stragglers = [
            d
            for d in daemons
            if not self._unless_forced(_exited(d.proc), deadline - time.monotonic())
        ]
        self.killed = [d.name for d in stragglers if d.alive()]
        if self.killed:
            why = (
                "second stop signal"
                if self.forced.is_set()
                else f"{', '.join(self.killed)} still running after {DRAIN_S:g} s"
            )
            print(f"meshinfer demo: {why}: killing the daemons (SIGKILL)", file=sys.stderr,
                  flush=True)  # fmt: skip
        for daemon in stragglers:  # all at once; close() reaps them
            daemon.proc.kill()
        self.cluster.close()

    def _unless_forced(self, over: Callable[[float], bool], timeout: float) -> bool:
        """Call ``over(seconds)`` (a wait of at most that long: whether what it waits for is
        over) until it is, ``timeout`` passed or :attr:`forced` is set. Whether it is over."""
        deadline = time.monotonic() + timeout
        while not self.forced.is_set():
            left = deadline - time.monotonic()
            if over(max(0.0, min(FORCED_CHECK_S, left))):
                return True
            if left <= 0:
                return False
        return False


def _started(future: Future[Any]) -> Any:
    """The daemon ``future`` started (:meth:`LocalCluster.start`); a :class:`DemoError` saying
    why, with its log's tail, when it did not come up."""
    try:
        return future.result()
    except (RuntimeError, OSError) as exc:
        raise DemoError(str(exc)) from None


def _demo_root(keep: Path | None) -> AbstractContextManager[str | Path]:
    """``keep``, or a temporary directory removed on exit; a :class:`DemoError` when none can be
    made."""
    if keep is not None:
        return nullcontext(keep)
    try:
        return tempfile.TemporaryDirectory(prefix="meshinfer-demo-")
    except OSError as exc:
        raise DemoError(
            f"cannot make a temporary directory ({exc.strerror or exc}: {exc.filename});"
            " name a directory with --keep DIR"
        ) from None


def _joined(thread: threading.Thread) -> Callable[[float], bool]:
    """A wait for ``thread`` (see :meth:`Demo._unless_forced`)."""

    def join(seconds: float) -> bool:
        thread.join(seconds)
        return not thread.is_alive()

    return join


def _exited(proc: subprocess.Popen[str]) -> Callable[[float], bool]:
    """A wait for ``proc`` to exit (see :meth:`Demo._unless_forced`); it is reaped."""

    def wait(seconds: float) -> bool:
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    return wait


@contextmanager
def _abandoned_when_interrupted(pool: ThreadPoolExecutor) -> Iterator[ThreadPoolExecutor]:
    """``pool`` as a context manager that, when left by an exception (:class:`Interrupted`),
    cancels the work not started and does not wait for the work under way: it ends once the
    daemons it talks to are stopped."""
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p90 and p99 of ``values`` (seconds) in milliseconds, by nearest rank: the smallest
    value with at least q% of them at or below it (each one a time some task took)."""
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    return {f"p{q}_ms": nearest_rank(values, q) * 1000 for q in (50, 90, 99)}


def _summary(demo: Demo, x, y, progress: Progress, seconds: float, ens: dict, ens_s: float):
    predicted = np.full(len(y), -1)
    for start, labels in progress.labels.items():
        predicted[start : start + len(labels)] = labels
    classified = int((predicted >= 0).sum())
    stats = demo.client.stats()
    done = stats["completed_by_node"]
    items_by_node = {name: done.get(name, 0) for name in demo.names}
    ens_labels = np.asarray((ens.get("result") or {}).get("labels") or [-1] * len(y))
    return {
        "nodes": demo.names,
        "killed": demo.kill_report.get("node"),
        "killed_in_flight": demo.kill_report.get("in_flight"),
        "kill_settled_s": demo.kill_report.get("settled_s"),
        "killed_items_moved": demo.kill_report.get("moved"),
        "kill_detected_s": demo.kill_report.get("detected_s"),
        "kill_error": demo.kill_error,
        "tasks": len(progress.latencies) + len(progress.failed),
        "tasks_failed": progress.failed,
        "rows": len(y),
        "rows_classified": classified,
        "accuracy": float((predicted == y).mean()),
        "rows_per_s": classified / seconds if seconds else 0.0,
        "seconds": seconds,
        "latency": _percentiles(progress.latencies),
        "ensemble_state": ens.get("state"),
        "ensemble_accuracy": float((ens_labels == y).mean()) if len(ens_labels) == len(y) else 0.0,
        "ensemble_s": ens_s,
        "items_by_node": items_by_node,
        "items": sum(items_by_node.values()),
        "node_status": {name: _process_status(demo, name) for name in demo.names},
        "retries": stats["retries"],
        "redispatched_after_death": stats["redispatched_after_death"],
        "duplicates_dropped": stats["duplicates"],
    }


def _process_status(demo: Demo, name: str) -> str:
    """``name``'s daemon process as it is now (see ``node_status``), not as the demo meant it."""
    daemon = demo.cluster.processes.get(name)
    if daemon is None:
        return "not started"
    if daemon.alive():
        return "alive"
    if name == demo.victim:  # (set before the kill: also when the kill's wait failed)
        return "killed"
    return f"exited (status {daemon.proc.returncode})"


def _node_state(node: dict[str, Any] | None) -> str:
    if node is None:
        return "not found"
    return f"{node.get('status')}, {len(node.get('models') or ())} models"


def _items(n: int) -> str:
    return f"{n} item" if n == 1 else f"{n} items"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _print_summary(s: dict[str, Any]) -> None:
    lat = s["latency"]
    lines = [
        "",
        "summary",
        f"  batch:    {s['rows_classified']}/{s['rows']} digits in {s['tasks']} tasks,"
        f" accuracy {s['accuracy']:.1%}, {s['rows_per_s']:.0f} digits/s",
        f"  latency:  per task (submit -> result over HTTP) p50 {_ms(lat['p50_ms'])},"
        f" p90 {_ms(lat['p90_ms'])}, p99 {_ms(lat['p99_ms'])}",
        f"  ensemble: {s['ensemble_state']}, accuracy {s['ensemble_accuracy']:.1%}"
        f" ({s['ensemble_s'] * 1000:.0f} ms)",
        f"  faults:   killed {s['killed'] or '-'}; items retried {s['retries']},"
        f" re-dispatched after death {s['redispatched_after_death']}, duplicate results"
        f" dropped {s['duplicates_dropped']}, tasks failed {len(s['tasks_failed'])}",
        *([f"  the halfway kill failed: {s['kill_error']}"] if s["kill_error"] else []),
        f"  {'node':<10}{'items done':>12}  status",
    ]
    for name in s["nodes"]:
        lines.append(f"  {name:<10}{s['items_by_node'].get(name, 0):>12}  {s['node_status'][name]}")
    total = sum(s["items_by_node"].get(name, 0) for name in s["nodes"])
    lines.append(f"  {'total':<10}{total:>12}")
    print("\n".join(lines), flush=True)


def _run(demo: Demo, x: np.ndarray, y: np.ndarray, signals: StopSignals) -> dict[str, Any]:
    """The demo's steps, then (also when a step failed or a signal interrupted it) the daemons
    stopped, with no signal let in meanwhile. The summary."""
    try:
        demo.start()
        signals.check()
        progress, seconds = demo.classify(x)
        signals.check()
        ens, ens_s = demo.ensemble(x)
        signals.check()
        return _summary(demo, x, y, progress, seconds, ens, ens_s)
    finally:
        try:
            signals.hold()
        finally:
            if not demo.forced.is_set() and not demo.output_closed:  # (killed: stop() says so)
                demo.say("stopping the daemons (SIGTERM)")
            demo.stop()


def run_demo(options: DemoOptions | None = None) -> int:
    """Run the demo; 0 when every task succeeded, accuracy is as trained and no node daemon but
    the one killed halfway exited, else 1; 128 + the signal when SIGINT, SIGTERM or SIGHUP
    stopped it early (its daemons are stopped first: they drain, or are killed at once when a
    second of those signals comes meanwhile)."""
    from meshinfer.inference.registry import load_digits_holdout

    options = options or DemoOptions()
    x, y = load_digits_holdout()
    signals = StopSignals()
    demo: Demo | None = None
    try:
        with signals, _demo_root(options.keep) as root:
            demo = Demo(options, Path(root), signals.stopping, signals.forced)
            summary = _run(demo, x, y, signals)
    except Interrupted:
        pass  # the daemons were stopped on the way out
    except OutputClosed:  # ``meshinfer demo | head``: the daemons were stopped on the way out
        if signals.received is None:
            return EXIT_CLOSED_PIPE
    except (MeshInferError, OSError) as exc:  # no fleet or temporary directory, no daemon up
        if signals.received is None:
            print(f"meshinfer demo: {exc}", file=sys.stderr)
            return 1
    if signals.received is not None:
        name = signal.Signals(signals.received).name
        how = "killed" if demo is not None and demo.killed else "stopped"
        print(f"meshinfer demo: stopped by {name}; its daemons were {how}", file=sys.stderr)
        return 128 + signals.received
    try:
        if options.json:
            print(json.dumps(summary), flush=True)
        else:
            _print_summary(summary)
    except BrokenPipeError as exc:
        if stdout_gone(exc):
            return EXIT_CLOSED_PIPE
        raise
    ok = not summary["tasks_failed"] and summary["accuracy"] > 0.9
    ok = ok and summary["ensemble_state"] == "succeeded" and summary["kill_error"] is None
    ok = ok and not any(v.startswith("exited") for v in summary["node_status"].values())
    if not ok:
        print("meshinfer demo: some work failed (see above)", file=sys.stderr)
    return 0 if ok else 1
