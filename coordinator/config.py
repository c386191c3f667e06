"""The coordinator daemon's one TOML file: every key documented, with defaults; strict validation.

``meshinfer-coord config`` prints the annotated default file; ``--check FILE`` validates one.
The mesh sections (``[network]``, ``[discovery]``, ``[membership]``, ``[session]``) are the
node's, so a coordinator joins the mesh exactly like a node does. Unknown or invalid keys are a
:class:`~meshinfer.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.service_config import MAX_ATTEMPTS
from meshinfer.errors import ConfigError
from meshinfer.proto.aggregation import Mode
from meshinfer.proto.scheduling import Policy
from meshinfer.proto.tasks import MAX_DEADLINE_S
from meshinfer.tomlconfig import Schema, doc, parse_address, with_overrides
from node.config import CHOICES as NODE_CHOICES
from node.config import POSITIVE as NODE_POSITIVE
from node.config import (
    DiscoverySection,
    MembershipSection,
    NetworkSection,
    SessionSection,
    check_mesh_sections,
)


@dataclass(frozen=True)
class CoordinatorSection:
    identity_dir: str = doc(
        "",
        "directory made by `meshinfer-coord fleet enroll --roles coordinator` (a relative path"
        " is taken from this file's folder, not the working directory)",
    )
    data_dir: str = doc(
        "",
        "where journal.db and runtime.json live (empty: a temp dir, removed at stop; relative:"
        " from this file's folder)",
    )
    default_policy: str = doc(
        "least_loaded",
        "scheduling policy for tasks that name none: round_robin, least_loaded, capability,"
        " latency, model_affinity, contact_aware",
    )
    default_aggregation: str = doc(
        "all",
        "aggregation for parallel tasks that name none: first, all, majority, weighted, ensemble",
    )
    max_attempts: int = doc(
        4, f"attempts per work item (first try included) before it fails; at most {MAX_ATTEMPTS}"
    )
    retry_backoff_s: float = doc(
        0.05, "first retry delay; doubles each attempt (at most retry_backoff_max_s)"
    )
    retry_backoff_max_s: float = doc(2.0, "longest retry delay")
    item_timeout_s: float = doc(30.0, "an attempt with no result after this long is retried")
    default_deadline_s: float = doc(
        0.0,
        "time budget in seconds of a task that names no deadline_s (it fails, or a parallel"
        " task aggregates what it has, when it runs out); 0: such a task has none",
    )
    journal_synchronous: str = doc(
        "FULL",
        'SQLite synchronous level of the WAL journal: "FULL" survives power loss, "NORMAL"'
        " survives process crashes",
    )
    node_capacity: int = doc(4, "work items a node is assumed to run at once (load estimate)")
    max_in_flight_per_node: int = doc(32, "work items outstanding on one node at once")
    retention_days: float = doc(
        7.0,
        "ended tasks (their inputs, results and audit lines) are deleted from the journal this"
        " many days after they ended; 0 keeps them forever",
    )
    redial_timeout_s: float = doc(
        0.25,
        "fast failover: after a node's session is lost (abruptly, or silent), the node must"
        " answer a ping over another session within this many seconds, or else a new dial (in"
        " what is left of that time if every session ended; in as many seconds again once"
        " sessions that stayed silent are closed, which may take up to a second more), or its"
        " items are re-dispatched at once; on a slow link, set it above a round trip plus a"
        " retransmission; 0 leaves it to membership",
    )
    input_ref_min_kib: int = doc(
        64,
        "an input this large (KiB) or larger goes to a node that already keeps it (its"
        " [executor] input_cache_mib) as a reference to its sha256, not as its bytes; 0 always"
        " sends the bytes",
    )
    radio_range_m: float = doc(
        300.0,
        "contact_aware policy: radio range in metres of a roadside unit (a node with role rsu or"
        " link v2i; 300 is the DSRC / C-V2X class); a vehicle whose gossiped position and"
        " velocity ([mobility] of its node) take it out of every unit's range before an item's"
        " expected runtime is over gets none",
    )


@dataclass(frozen=True)
class ApiSection:
    enabled: bool = doc(True, "serve the HTTP API (tasks, nodes, stats, /metrics, /healthz)")
    listen: str = doc("127.0.0.1:7950", 'HTTP "host:port"; port 0 picks a free one')
    token_file: str = doc(
        "",
        "file holding the bearer token (the fleet's `api-token`, made by `fleet init`; relative:"
        " from this file's folder)",
    )
    max_body_mib: int = doc(64, "largest request body accepted (a task's inputs), MiB")
    max_uploads_mib: int = doc(
        256,
        "task submissions read and parsed at once, MiB of bodies (at least max_body_mib);"
        " one more gets 503 busy with Retry-After",
    )


@dataclass(frozen=True)
class CoordinatorFileConfig:
    """The whole file; each attribute is one ``[section]``."""

    coordinator: CoordinatorSection = field(default_factory=CoordinatorSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    membership: MembershipSection = field(default_factory=MembershipSection)
    session: SessionSection = field(default_factory=SessionSection)
    api: ApiSection = field(default_factory=ApiSection)


_CHOICES = {
    **{k: v for k, v in NODE_CHOICES.items() if k[0] in ("network", "membership")},
    ("coordinator", "default_policy"): tuple(p.value for p in Policy),
    ("coordinator", "default_aggregation"): tuple(m.value for m in Mode),
    ("coordinator", "journal_synchronous"): ("FULL", "NORMAL"),
}
_POSITIVE = {k for k in NODE_POSITIVE if k[0] == "session"} | {
    ("coordinator", "max_attempts"),
    ("coordinator", "item_timeout_s"),
    ("coordinator", "retry_backoff_max_s"),
    ("coordinator", "max_in_flight_per_node"),
    ("coordinator", "node_capacity"),
    ("coordinator", "radio_range_m"),
    ("api", "max_body_mib"),
    ("api", "max_uploads_mib"),
}


def _cross_checks(config: CoordinatorFileConfig, source: str) -> None:
    check_mesh_sections(config, source)
    parse_address(config.api.listen, f"{source}: [api] listen")
    if config.api.max_uploads_mib < config.api.max_body_mib:
        raise ConfigError(f"{source}: [api] max_uploads_mib must be at least max_body_mib")
    non_negative = (
        "retry_backoff_s", "retention_days", "input_ref_min_kib", "default_deadline_s",
        "redial_timeout_s",
    )  # fmt: skip
    for key in non_negative:
        if getattr(config.coordinator, key) < 0:
            raise ConfigError(f"{source}: [coordinator] {key} must not be negative")
    c = config.coordinator
    if c.max_attempts > MAX_ATTEMPTS:  # (the journal's 64-bit columns: see service_config)
        raise ConfigError(
            f"{source}: [coordinator] max_attempts must be at most {MAX_ATTEMPTS},"
            f" got {c.max_attempts!r}"
        )
    if c.retry_backoff_s > c.retry_backoff_max_s:  # (the first delay would be the longest)
        raise ConfigError(
            f"{source}: [coordinator] retry_backoff_s ({c.retry_backoff_s!r}) must be at most"
            f" retry_backoff_max_s ({c.retry_backoff_max_s!r})"
        )
    if config.coordinator.default_deadline_s > MAX_DEADLINE_S:
        raise ConfigError(
            f"{source}: [coordinator] default_deadline_s must be at most {MAX_DEADLINE_S:.0f}"
            " (30 days: a task's longest deadline)"
        )
    if not math.isfinite(config.coordinator.retention_days * 86400.0):  # the service's seconds
        raise ConfigError(f"{source}: [coordinator] retention_days is too large (0: forever)")


SCHEMA = Schema(
    CoordinatorFileConfig,
    "meshinfer coordinator configuration (meshinfer-coord serve --config FILE)",
    _CHOICES,
    frozenset(_POSITIVE),
    _cross_checks,
)


def config_from_dict(data: dict[str, Any], source: str = "config") -> CoordinatorFileConfig:
    """Validate a parsed TOML document into a :class:`CoordinatorFileConfig`."""
    return SCHEMA.from_dict(data, source)


def load_config(path: str | Path) -> CoordinatorFileConfig:
    """Read and validate ``path``; every problem is a ConfigError naming the file and key.

    A relative ``[coordinator] identity_dir`` or ``data_dir``, or ``[api] token_file``, is taken
    from the file's folder (made absolute), so the daemon finds the same files whatever directory
    it is started from.
    """
    return SCHEMA.load(path, relative_paths=_PATH_KEYS)


_PATH_KEYS = {"coordinator": ("identity_dir", "data_dir"), "api": ("token_file",)}


def render_defaults(config: CoordinatorFileConfig | None = None) -> str:
    """The annotated TOML for ``config`` (defaults if None): every key with its documentation."""
    return SCHEMA.render(config)


__all__ = [
    "ApiSection",
    "CoordinatorFileConfig",
    "CoordinatorSection",
    "config_from_dict",
    "load_config",
    "render_defaults",
    "with_overrides",
]
