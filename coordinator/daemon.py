"""The coordinator daemon: one TOML file in, a coordinator on the mesh with its HTTP API out.

Composition, in start order (reverse order on shutdown):

1. identity and revocations from ``[coordinator] identity_dir`` (a certificate with the
   ``coordinator`` role, not expired and not revoked by that directory's revocation list: every
   peer would refuse it) and the API token from ``[api] token_file``;
2. the mesh: session listener, membership, discovery (the node's sections, and the start-up
   code both daemons share: :mod:`meshinfer.runtime.startup`);
3. the :class:`~coordinator.service.Coordinator` on its SQLite journal
   (``<data_dir>/journal.db``); starting it recovers every acknowledged, unfinished task;
4. the HTTP API (:class:`~coordinator.api.CoordinatorApi`).

Once everything listens, ``<data_dir>/runtime.json`` records the API URL and token file (for the
CLI's ``--data-dir``) and a ``READY {json}`` line goes to stdout. SIGTERM stops the API, the
dispatcher and the mesh (announcing the leave); unfinished tasks stay in the journal and resume
on the next start. A second SIGTERM (or SIGINT) skips the graceful leave (and the API's grace
for the requests it serves); the coordinator's close, once begun, still ends with the journal
closed.

A failed sync of the journal's log is fatal (:meth:`~coordinator.service.Coordinator.failed`:
commits since the last sync may be lost, and the journal syncs nothing more): the daemon logs
it (CRITICAL), stops as on SIGTERM and exits 1, for its supervisor to restart it; the restart's
recovery replays the journal. So does a revocation list that revokes the coordinator's own
certificate, coming in force while it runs (every peer refuses it from then on; a restart is
refused until it is enrolled again).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path
from typing import Any

from coordinator.client import read_token_file
from coordinator.config import CoordinatorFileConfig
from coordinator.journal import Journal
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.closing import OneClose
from meshinfer.errors import ConfigError, log_failure
from meshinfer.identity_files import NodeDirectory
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
from meshinfer.tomlconfig import listen_failure, parse_address

log = logging.getLogger(__name__)


def service_config(config: CoordinatorFileConfig) -> CoordinatorConfig:
    """The ``[coordinator]`` section as the service's :class:`CoordinatorConfig`."""
    c = config.coordinator
    return CoordinatorConfig(
        default_policy=c.default_policy,
        default_aggregation=c.default_aggregation,
        max_attempts=c.max_attempts,
        retry_backoff_s=c.retry_backoff_s,
        retry_backoff_max_s=c.retry_backoff_max_s,
        item_timeout_s=c.item_timeout_s,
        default_deadline_s=c.default_deadline_s,
        journal_synchronous=c.journal_synchronous,
        node_capacity=c.node_capacity,
        max_in_flight_per_node=c.max_in_flight_per_node,
        retention_s=c.retention_days * 86400.0,
        input_ref_min_bytes=c.input_ref_min_kib * 1024,
        redial_timeout_s=c.redial_timeout_s,
        radio_range_m=c.radio_range_m,
    )


def read_token(config: CoordinatorFileConfig) -> str:
    """The API bearer token, or ConfigError saying which file to point ``token_file`` at."""
    path = config.api.token_file
    if not path:
        raise ConfigError(
            "[api] token_file is required while the API is enabled: point it at the fleet's"
            " `api-token` (made by `meshinfer-coord fleet init`)"
        )
    token = read_token_file(path, "[api] token_file")
    if len(token) < 16:
        raise ConfigError(f"[api] token_file: {path} holds no usable token (under 16 chars)")
    return token


class CoordinatorDaemon:
    """Everything ``meshinfer-coord serve`` runs; see the module docstring."""

    def __init__(self, config: CoordinatorFileConfig, *, rng: random.Random | None = None):
        self.config = config
        self.rng = rng or random.Random()
        self.identity = load_identity(config.coordinator.identity_dir, "[coordinator] identity_dir")
        if "coordinator" not in self.identity.certificate.roles:
            raise ConfigError(
                f"[coordinator] identity_dir: certificate of {self.identity.node_id!r} lacks"
                " the coordinator role (enrol it with --roles coordinator)"
            )
        self.coordinator_config = service_config(config)  # (a bad knob: refused before a start)
        self.token = read_token(config) if config.api.enabled else ""
        self.api_address = parse_address(config.api.listen, "[api] listen")
        self.options = mesh_options(
            config, self.identity.trust.fleet_id, config.coordinator.identity_dir
        )
        self.data = DataDir(config.coordinator.data_dir, "[coordinator] data_dir", "mi-coord-")
        self.data_dir = self.data.path
        self.mesh: MeshNode | None = None
        self.coordinator: Coordinator | None = None
        self.api: Any = None
        self._journal: Journal | None = None  # open, not yet the coordinator's
        self._coordinating = asyncio.Event()  # set once self.coordinator is made (see fatal)
        self._coordinator_closing: asyncio.Future[None] | None = None  # see _close_coordinator
        self._one_close = OneClose()

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def journal_path(self) -> Path:
        return self.data_dir / "journal.db"

    async def start(self) -> dict[str, Any]:
        """Start every component in order; return the facts printed on the READY line."""
        node_dir = NodeDirectory(Path(self.config.coordinator.identity_dir))
        # file I/O (and the list's signature checks) off the loop, as a stop may come meanwhile
        revocations = await asyncio.to_thread(node_dir.revocations, self.identity.trust)
        check_not_revoked(
            self.identity, revocations, "[coordinator] identity_dir", node_dir.revocations_bin
        )
        await asyncio.to_thread(self.data.make)
        self._journal = await asyncio.to_thread(self._open_journal)
        self.mesh = MeshNode(self.identity, revocations, self.options, rng=self.rng)
        await start_mesh(self.mesh, self.config)
        self.coordinator = Coordinator(
            self.mesh, self.journal_path, self.coordinator_config, rng=self.rng,
            journal=self._journal,
        )  # fmt: skip
        self._journal = None  # the coordinator's to close from here
        self._coordinating.set()
        await self.coordinator.start()
        if self.config.api.enabled:
            from coordinator.api import CoordinatorApi

            self.api = CoordinatorApi(
                self.coordinator,
                self.api_address,
                self.token,
                max_body_bytes=self.config.api.max_body_mib << 20,
                max_upload_bytes=self.config.api.max_uploads_mib << 20,
            )
            try:
                await self.api.start()
            except OSError as exc:
                raise listen_failure("[api] listen", self.config.api.listen, exc) from None
        facts = self.facts()
        await asyncio.to_thread(self.data.write_runtime, facts)
        return facts

    async def fatal(self) -> str:
        """Return (why) once this daemon cannot go on: its coordinator's journal failed to
        sync its log, during the start (its recovery) or after, or a revocation list that
        revokes its own certificate came in force while it ran (see the module docstring)."""
        await self._coordinating.wait()
        assert self.coordinator is not None and self.mesh is not None
        watches = [
            asyncio.ensure_future(self._journal_failed(self.coordinator)),
            asyncio.ensure_future(until_self_revoked(self.mesh)),
        ]
        try:
            done, _ = await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for watch in watches:
                watch.cancel()
            await asyncio.gather(*watches, return_exceptions=True)
        return done.pop().result()

    async def _journal_failed(self, coordinator: Coordinator) -> str:
        error = await coordinator.failed()
        return f"journal {self.journal_path}: a sync of its log failed: {error}"

    def _open_journal(self) -> Journal:
        """Open the journal before joining the mesh: a coordinator whose journal is unusable
        (no journal, a newer one, one another coordinator holds) says so and stops before it
        announces itself, rather than join beside the one that holds it, under the same node
        id. It stays open (and locked) for the coordinator to serve from: two started at one
        instant cannot both get past this."""
        return Journal(self.journal_path, synchronous=self.config.coordinator.journal_synchronous)

    def facts(self) -> dict[str, Any]:
        assert self.mesh is not None and self.mesh.address is not None
        token_file = self.config.api.token_file
        return {
            "node_id": self.node_id,
            "pid": os.getpid(),
            "session": str(self.mesh.address),
            "api": self.api.url if self.api else None,
            "token_file": str(Path(token_file).resolve()) if token_file else None,
            "journal": str(self.journal_path),
        }

    async def stop(self, *, graceful: bool = True) -> None:
        """Stop serving (API, dispatch); with ``graceful``, announce the leave; close the rest."""
        await close_in_order(
            [
                self.api.aclose() if self.api else None,
                self._close_coordinator(),
                self.mesh.leave(timeout=2.0) if graceful and self.mesh else None,
            ],
            log,
        )
        await self.aclose()  # both aclose calls above are idempotent

    async def _close_coordinator(self) -> None:
        """Close the coordinator (if made), waited for by both :meth:`stop` and :meth:`aclose`
        without raising: its failure is logged once, by the task's done-callback (the
        coordinator's own ``aclose`` raises it to every caller, and each of the two would log
        it). A stop cut short during it (a second signal) leaves the close going on."""
        if self.coordinator is None:
            return
        if self._coordinator_closing is None:
            closing = asyncio.ensure_future(self.coordinator.aclose())
            closing.add_done_callback(log_failure(log, "closing the coordinator"))
            self._coordinator_closing = closing
        await asyncio.wait({self._coordinator_closing})  # (cancelled: the close goes on)

    async def aclose(self) -> None:
        """Close in reverse start order. Idempotent; errors are logged, not raised. The close
        runs once (:class:`~meshinfer.closing.OneClose`): a caller cancelled half-way leaves it
        running, and a later call waits for it (it returned at once, the mesh left open)."""
        await self._one_close.run(self._close, name="coordinator-daemon-close")

    async def _close(self) -> None:
        steps = [
            self.api.aclose() if self.api else None,
            self._close_coordinator(),
            self.mesh.aclose() if self.mesh else None,
        ]
        await close_in_order(steps, log)
        if self._journal is not None:  # opened, never handed to a coordinator
            await asyncio.to_thread(self._journal.close)
            self._journal = None
        await asyncio.to_thread(self.data.close)  # a temporary one is removed whole


async def run_coordinator(config: CoordinatorFileConfig, parent_pid: int | None = None) -> int:
    """Run until SIGTERM/SIGINT (or, with ``parent_pid``, until this process's parent is no
    longer that one: ``--exit-with-parent``), or until the journal fails to sync (exit code 1);
    print ``READY {json}`` once ready. Returns the exit code."""
    daemon = CoordinatorDaemon(config)
    return await serve_until_signalled(
        daemon, daemon.stop, parent_pid, on_ready=settle_heap, fatal=daemon.fatal
    )
