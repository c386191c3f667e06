"""The node daemon's one TOML file: every key documented, with defaults; strict validation.

``meshinfer-node config`` prints the full annotated default file (generated from the ``doc``
metadata below, so the documentation cannot drift from the code). Unknown or invalid keys are a
:class:`~meshinfer.errors.ConfigError` naming the key, e.g. ``node.toml: [network] listen:
expected "host:port", got "7946"``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshinfer.discovery.base import ADDRESS_CHECK_INTERVAL, is_host
from meshinfer.discovery.static import parse_seeds
from meshinfer.errors import ConfigError
from meshinfer.inference.base import ModelRef
from meshinfer.inference.numpy_engine import INLINE_MAX_MACS
from meshinfer.proto.identity import DEFAULT_CLOCK_SKEW_S, check_clock_skew
from meshinfer.proto.membership_config import MAX_MEMBERS, MembershipConfig
from meshinfer.proto.membership_wire import MAX_INPUT_CACHE_MB
from meshinfer.proto.models import model_name_problem
from meshinfer.runtime.outbox_size import OUTBOX_BYTES
from meshinfer.runtime.session import MAX_REKEY_AFTER
from meshinfer.tomlconfig import Schema, doc, parse_address, with_overrides

#: The largest ``[executor] result_replay_mib``.
MAX_RESULT_REPLAY_MIB = 1 << 16

MAX_OUTBOX_MIB = 1 << 16
"""The largest ``[session] outbox_mib`` (it is at least ``max_message_mib``, itself at most
:data:`MAX_MESSAGE_MIB`)."""

MAX_MESSAGE_MIB = 1 << 16
"""The largest ``[session] max_message_mib``: each handshake's Hello carries the size in bytes
as an unsigned 64-bit integer, which from 2**44 MiB on no Hello can hold."""

_MEMBERSHIP = MembershipConfig()  # the keys' defaults: every preset keeps them

_SEED_FLEET = "fleet"
"""The fleet id a seed naming none is checked with here (the daemon reads seeds with its own
fleet's id, known only from the identity directory)."""

CPU_THREADS = 1
"""Default ``[inference] cpu_threads``, chosen from ``python bench/bench_input_refs.py
--cpu-threads 0 1 2`` (figures in the key's documentation)."""

MAX_CPU_THREADS = 1 << 16
"""The largest ``[inference] cpu_threads``: far above any host's cores, and within the C ``int``
the math libraries take (a larger figure made their call raise at start, a traceback)."""

MAX_ADDRESS_CHECK_INTERVAL = 86400.0
"""The largest ``[discovery] address_check_interval``: a day (0 turns the checks off)."""


@dataclass(frozen=True)
class NodeSection:
    identity_dir: str = doc(
        "",
        "directory made by `meshinfer-coord fleet enroll`: node.key, node.cert, fleet.json (a"
        " relative path is taken from this file's folder, not the working directory)",
    )
    data_dir: str = doc(
        "",
        "where the node keeps its runtime.json, and node.lock, which refuses a second daemon on"
        " the same data_dir (empty: a temp dir, removed at stop; relative: from this file's"
        " folder)",
    )


@dataclass(frozen=True)
class NetworkSection:
    listen: str = doc("127.0.0.1:0", 'session listener "host:port"; port 0 picks a free one')
    advertise_host: str = doc(
        "",
        "address peers should dial (empty: the listen host; for 0.0.0.0 or ::, the address"
        " this host routes from); an IP address, not a host name, while [discovery] mdns is on",
    )
    link: str = doc("wan", 'link kind of this host\'s interface: "v2v", "v2i" or "wan"')


@dataclass(frozen=True)
class DiscoverySection:
    mdns: bool = doc(True, "advertise and browse _meshinfer._tcp.local. with mDNS")
    interfaces: tuple[str, ...] = doc(
        ("all",), 'mDNS interfaces: ["all"], interface names ("eth0") or IP addresses'
    )
    seeds: tuple[str, ...] = doc(
        (),
        'static peers, "node-id@host:port?key=HEX64[&roles=rsu,vehicle][&link=v2i]" (hosts'
        " without multicast, RSUs, the coordinator)",
    )
    address_check_interval: float = doc(
        ADDRESS_CHECK_INTERVAL,
        "seconds between two looks at this host's interface addresses (a V2I link comes up,"
        " DHCP gives a new lease): mDNS follows them and re-announces, and a node listening on"
        " 0.0.0.0 or :: with no [network] advertise_host gossips its new route address;"
        " 0: look only at start, and peers' expired mDNS records are no longer checked (a peer"
        " gone silently is lost only when its PTR record expires, ~75 min) (at most 86400)",
    )


@dataclass(frozen=True)
class MembershipSection:
    preset: str = doc("lan", 'SWIM timing preset: "lan", "v2v" or "test"')
    push_pull_digests: bool = doc(
        _MEMBERSHIP.push_pull_digests,
        "anti-entropy starts with a digest of the member table (a few bytes per member) and then"
        " sends only the records the two sides hold differently; false sends whole tables, for a"
        " fleet that still runs nodes without digest packets (they refuse and count them)",
    )
    max_members: int = doc(
        _MEMBERSHIP.max_members,
        f"most members the table holds, this node included, in any status (2..{MAX_MEMBERS}):"
        " records of further node ids are refused and counted (meshinfer_members_refused_total);"
        " set it well above the fleet, the same on every node (a packet is read up to twice as"
        " many records)",
    )


@dataclass(frozen=True)
class SessionSection:
    handshake_timeout: float = doc(5.0, "seconds for a whole Noise handshake")
    idle_timeout: float = doc(60.0, "close a session after this many silent seconds")
    keepalive_interval: float = doc(15.0, "send a ping after this many seconds without sending")
    rekey_after: int = doc(
        1 << 20,
        "rekey each direction after this many Noise messages (a session uses the smaller of"
        " this and its peer's value)",
    )
    max_message_mib: int = doc(16, "largest application message accepted, MiB (at most 65536)")
    outbox_mib: int = doc(
        0,
        "most MiB of messages queued for one peer (each counted by the bytes it carries) before"
        " a send to it is refused (outbox-bytes): at least max_message_mib, at most 65536;"
        f" 0: {OUTBOX_BYTES >> 20}, or max_message_mib if that is larger",
    )
    verify_timeout: float = doc(
        1.0,
        "when a peer opens a session while older ones with it are open (it re-dialled after"
        " roaming), each older one must answer a ping (or receive anything) within this many"
        " seconds or it is abandoned as lost (the coordinator then sends that node's items"
        " again, a node the items it passed on); sends to that peer wait meanwhile; 0 keeps"
        " older sessions unchecked",
    )
    clock_skew: float = doc(
        DEFAULT_CLOCK_SKEW_S,
        "seconds of tolerance on either side of a peer certificate's validity window, for"
        " session handshakes and for the certificates proving membership records (0..86400);"
        " the same on every node",
    )


@dataclass(frozen=True)
class InferenceSection:
    engine: str = doc("numpy", '"numpy" (CPU), "cupy" (NVIDIA GPU) or "triton"')
    models: tuple[str, ...] = doc(
        ("digits-mlp@1", "digits-mlp-wide@1", "digits-mlp-deep@1"),
        'models to load at start, "id@version"',
    )
    triton_url: str = doc("", 'Triton server for engine "triton", e.g. "127.0.0.1:8000"')
    max_batch_size: int = doc(64, "dynamic batcher: largest batch handed to the engine")
    max_queue_delay_ms: float = doc(
        2.0, "dynamic batcher: longest wait to fill a batch (see dispatch_when_idle)"
    )
    max_queue: int = doc(1024, "dynamic batcher: queued requests before answering overloaded")
    dispatch_when_idle: bool = doc(
        True,
        "dynamic batcher: while the engine runs no batch of the model, send a waiting request at"
        " once (max_queue_delay_ms then applies only while it is busy)",
    )
    inline_max_macs: int = doc(
        INLINE_MAX_MACS,
        'engine "numpy": largest forward pass (rows x multiply-adds per row) run on the event'
        " loop; bigger ones go to a worker thread (0: always a thread)",
    )
    cpu_threads: int = doc(
        CPU_THREADS,
        "threads each math-library pool behind NumPy (OpenBLAS, MKL, OpenMP) may use, process-wide,"
        " set at start (0: the libraries' default, one per core; at most 65536); at the node's"
        " batch sizes more than 1 gains nothing and spins on the cores the event loop needs"
        " (2 cores: 1.3-1.5x tasks/s, 0.3-0.4x node CPU per task with 1 against 0)",
    )


@dataclass(frozen=True)
class ExecutorSection:
    max_concurrent: int = doc(4, "work items executed at once on this node")
    offload_queue_depth: int = doc(
        16,
        "queue depth from which an item from a coordinator is passed to a less loaded peer"
        " with the model (one hop: a passed item runs where it lands)",
    )
    accepted_notice_ms: float = doc(
        20.0,
        "tell the coordinator an item was accepted only if it still runs after this long"
        " (0: at once); quick items go straight to their result",
    )
    input_cache_mib: int = doc(
        256,
        "MiB of task inputs kept so a coordinator can send the same input again by reference"
        " (its sha256) instead of its bytes; 0 keeps none",
    )
    result_replay_mib: int = doc(
        16,
        "MiB of recent results kept so an item a coordinator sends again (its answer may have"
        " been lost with a session, or with the coordinator's restart) is answered without"
        " running it again; each result counts its output plus ~700 bytes (more for a relayed"
        " one with long ids or many timings); 0 keeps none",
    )
    result_replay_s: float = doc(60.0, "seconds a result is kept for such a replay (0 keeps none)")


@dataclass(frozen=True)
class HttpSection:
    enabled: bool = doc(True, "serve /healthz, /readyz, /metrics and /status")
    listen: str = doc("127.0.0.1:0", 'HTTP "host:port" (loopback by default)')


@dataclass(frozen=True)
class MobilitySection:
    position: tuple[float, ...] = doc(
        (),
        "where this node is, 2 or 3 coordinates in metres in the fleet's local frame (empty:"
        " unknown); gossiped, with velocity, for the contact_aware scheduling policy; a vehicle's"
        " positioning updates both at run time with POST /position on the [http] endpoint",
    )
    velocity: tuple[float, ...] = doc(
        (),
        "how this node moves, metres/second, as many coordinates as position (empty: not"
        " moving, as a roadside unit)",
    )


@dataclass(frozen=True)
class NodeConfig:
    """The whole file; each attribute is one ``[section]``."""

    node: NodeSection = field(default_factory=NodeSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    membership: MembershipSection = field(default_factory=MembershipSection)
    session: SessionSection = field(default_factory=SessionSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    executor: ExecutorSection = field(default_factory=ExecutorSection)
    http: HttpSection = field(default_factory=HttpSection)
    mobility: MobilitySection = field(default_factory=MobilitySection)


CHOICES = {
    ("network", "link"): ("v2v", "v2i", "wan"),
    ("membership", "preset"): ("lan", "v2v", "test"),
    ("inference", "engine"): ("numpy", "cupy", "triton"),
}
POSITIVE = {
    ("session", "handshake_timeout"),
    ("session", "idle_timeout"),
    ("session", "keepalive_interval"),
    ("session", "rekey_after"),
    ("session", "max_message_mib"),
    ("inference", "max_batch_size"),
    ("inference", "max_queue"),
    ("executor", "max_concurrent"),
    ("executor", "offload_queue_depth"),
}


def check_mesh_sections(config: Any, source: str) -> None:
    """Relations between keys of the mesh sections a node's and a coordinator's file share."""
    parse_address(config.network.listen, f"{source}: [network] listen")
    host = config.network.advertise_host
    if host and (not is_host(host) or host in ("0.0.0.0", "::")):
        raise ConfigError(
            f"{source}: [network] advertise_host must be an address or host name peers can"
            f" dial, got {host!r}"
        )
    if config.discovery.mdns:
        _check_mdns_host(config.network, source)
    s = config.session
    if s.keepalive_interval >= s.idle_timeout:
        raise ConfigError(f"{source}: [session] keepalive_interval must be below idle_timeout")
    if s.verify_timeout < 0:
        raise ConfigError(f"{source}: [session] verify_timeout must be >= 0")
    if s.rekey_after > MAX_REKEY_AFTER:
        raise ConfigError(f"{source}: [session] rekey_after must be at most {MAX_REKEY_AFTER}")
    if s.max_message_mib > MAX_MESSAGE_MIB:
        raise ConfigError(f"{source}: [session] max_message_mib must be at most {MAX_MESSAGE_MIB}")
    if s.outbox_mib and not s.max_message_mib <= s.outbox_mib <= MAX_OUTBOX_MIB:
        raise ConfigError(
            f"{source}: [session] outbox_mib must be 0 (the default) or in"
            f" max_message_mib..{MAX_OUTBOX_MIB} ({s.max_message_mib}..{MAX_OUTBOX_MIB}: a"
            f" peer's outbox holds the largest message), got {s.outbox_mib!r}"
        )
    try:
        check_clock_skew(s.clock_skew)
    except ValueError as exc:
        raise ConfigError(f"{source}: [session] {exc}") from None
    _check_discovery(config.discovery, source)
    if not 2 <= config.membership.max_members <= MAX_MEMBERS:
        raise ConfigError(f"{source}: [membership] max_members must be in 2..{MAX_MEMBERS}")


def _check_mdns_host(n: NetworkSection, source: str) -> None:
    """mDNS advertises an address, never a name: the host advertised must be an IP literal
    (the daemon refused a name only at start, naming neither file nor key)."""
    if n.advertise_host:
        key, host = "advertise_host", n.advertise_host
    else:
        key, host = "listen", parse_address(n.listen, f"{source}: [network] listen").host
        if host in ("0.0.0.0", "::"):  # the address this host routes from is advertised
            return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{source}: [network] {key}: mDNS ([discovery] mdns) advertises an IP address, not"
            f" the host name {host!r}: give an address, or set mdns = false"
        ) from None


def _check_discovery(d: DiscoverySection, source: str) -> None:
    """What the daemon refuses at start (there without naming the file or key)."""
    if not 0 <= d.address_check_interval <= MAX_ADDRESS_CHECK_INTERVAL:
        limit = f"{MAX_ADDRESS_CHECK_INTERVAL:g}"
        raise ConfigError(
            f"{source}: [discovery] address_check_interval must be in 0..{limit} seconds"
            " (0: only at start)"
        )
    if d.mdns and not d.interfaces:
        raise ConfigError(f'{source}: [discovery] interfaces: ["all"] or at least one interface')
    if d.mdns and "all" in d.interfaces and len(d.interfaces) > 1:  # no interface is named "all"
        raise ConfigError(
            f'{source}: [discovery] interfaces: "all" stands alone (["all"]), or name interfaces'
        )
    try:
        parse_seeds(d.seeds, fleet_id=_SEED_FLEET)
    except ConfigError as exc:
        raise ConfigError(f"{source}: [discovery] seeds: {exc}") from None


def parse_model_ref(text: str, where: str = "model") -> ModelRef:
    """``"id@version"`` (version defaults to ``1``) -> ModelRef, or ConfigError."""
    model_id, _, version = text.partition("@")
    if not model_id or (_ and not version):
        raise ConfigError(f'{where}: expected "id@version", got {text!r}')
    if (problem := model_name_problem(model_id, version or "1")) is not None:
        raise ConfigError(f"{where}: {text!r}: {problem} (no task could name it)")
    return ModelRef(model_id, version or "1")


def parse_models(texts: Sequence[str], where: str) -> list[ModelRef]:
    """Each ``"id@version"`` of ``texts`` as a ModelRef, or ConfigError naming ``where[i]``.

    A model listed twice (``"m"`` and ``"m@1"`` are one) is refused: its second batcher would
    replace the first, whose dispatch task then runs on with no owner to close it.
    """
    refs: list[ModelRef] = []
    for i, text in enumerate(texts):
        ref = parse_model_ref(text, f"{where}[{i}]")
        if ref in refs:
            raise ConfigError(f"{where}[{i}]: {ref} is listed twice")
        refs.append(ref)
    return refs


def _cross_checks(config: NodeConfig, source: str) -> None:
    check_mesh_sections(config, source)
    parse_models(config.inference.models, f"{source}: [inference] models")
    parse_address(config.http.listen, f"{source}: [http] listen")
    if config.inference.inline_max_macs < 0:
        raise ConfigError(f"{source}: [inference] inline_max_macs must be >= 0")
    if config.inference.max_queue_delay_ms < 0:
        raise ConfigError(f"{source}: [inference] max_queue_delay_ms must be >= 0")
    if config.inference.cpu_threads < 0:
        raise ConfigError(f"{source}: [inference] cpu_threads must be >= 0")
    if config.inference.cpu_threads > MAX_CPU_THREADS:
        limit = MAX_CPU_THREADS
        raise ConfigError(f"{source}: [inference] cpu_threads must be at most {limit}")
    if config.executor.accepted_notice_ms < 0:
        raise ConfigError(f"{source}: [executor] accepted_notice_ms must be >= 0")
    if not 0 <= config.executor.input_cache_mib <= MAX_INPUT_CACHE_MB:
        limit = MAX_INPUT_CACHE_MB
        raise ConfigError(f"{source}: [executor] input_cache_mib must be in 0..{limit}")
    if not 0 <= config.executor.result_replay_mib <= MAX_RESULT_REPLAY_MIB:
        limit = MAX_RESULT_REPLAY_MIB
        raise ConfigError(f"{source}: [executor] result_replay_mib must be in 0..{limit}")
    if not config.executor.result_replay_s >= 0:
        raise ConfigError(f"{source}: [executor] result_replay_s must be >= 0")
    if config.inference.engine == "triton" and not config.inference.triton_url:
        raise ConfigError(f'{source}: [inference] triton_url is required for engine "triton"')
    _check_mobility(config.mobility, source)


def _check_mobility(m: MobilitySection, source: str) -> None:
    for key in ("position", "velocity"):
        if len(getattr(m, key)) not in (0, 2, 3):
            raise ConfigError(f"{source}: [mobility] {key}: 2 or 3 numbers, or [] for unknown")
    if m.velocity and len(m.velocity) != len(m.position):
        raise ConfigError(f"{source}: [mobility] velocity needs a position of as many numbers")


SCHEMA = Schema(
    NodeConfig,
    "meshinfer node configuration (meshinfer-node run --config FILE)",
    CHOICES,
    frozenset(POSITIVE),
    _cross_checks,
)


def config_from_dict(data: dict[str, Any], source: str = "config") -> NodeConfig:
    """Validate a parsed TOML document into a :class:`NodeConfig`."""
    return SCHEMA.from_dict(data, source)


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate ``path``; every problem is a ConfigError naming the file and key.

    A relative ``[node] identity_dir`` or ``data_dir`` is taken from the file's folder (made
    absolute), so the daemon finds the same directories whatever directory it is started from.
    """
    return SCHEMA.load(path, relative_paths=_PATH_KEYS)


_PATH_KEYS = {"node": ("identity_dir", "data_dir")}


def render_defaults(config: NodeConfig | None = None) -> str:
    """The annotated TOML for ``config`` (defaults if None): every key with its documentation."""
    return SCHEMA.render(config)


__all__ = [
    "NodeConfig",
    "config_from_dict",
    "load_config",
    "parse_address",
    "parse_model_ref",
    "parse_models",
    "render_defaults",
    "with_overrides",
]
