"""The node daemon's one TOML file: every key documented, with defaults; strict validation.

``meshinfer-node config`` prints the full annotated default file (generated from the ``doc``
metadata below, so the documentation cannot drift from the code). Unknown or invalid keys are a
:class:`~meshinfer.errors.ConfigError` naming the key, e.g. ``node.toml: [network] listen:
expected "host:port", got "7946"``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshinfer.errors import ConfigError
from meshinfer.transport.base import Address


def _doc(default: Any, doc: str) -> Any:
    """A field with its documentation (rendered by ``meshinfer-node config``)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class NodeSection:
    identity_dir: str = _doc(
        "", "directory made by `meshinfer-coord fleet enroll`: node.key, node.cert, fleet.json"
    )
    data_dir: str = _doc("", "where the node keeps its cache and runtime files (empty: a temp dir)")


@dataclass(frozen=True)
class NetworkSection:
    listen: str = _doc("127.0.0.1:0", 'session listener "host:port"; port 0 picks a free one')
    advertise_host: str = _doc(
        "", "address peers should dial (empty: the listen host, or 127.0.0.1 for 0.0.0.0)"
    )
    link: str = _doc("wan", 'link kind of this host\'s interface: "v2v", "v2i" or "wan"')


@dataclass(frozen=True)
class DiscoverySection:
    mdns: bool = _doc(True, "advertise and browse _meshinfer._tcp.local. with mDNS")
    interfaces: tuple[str, ...] = _doc(
        ("all",), 'mDNS interfaces: ["all"], interface names ("eth0") or IP addresses'
    )
    seeds: tuple[str, ...] = _doc(
        (),
        'static peers, "node-id@host:port?key=HEX64[&roles=rsu,vehicle][&link=v2i]" (hosts'
        " without multicast, RSUs, the coordinator)",
    )


@dataclass(frozen=True)
class MembershipSection:
    preset: str = _doc("lan", 'SWIM timing preset: "lan", "v2v" or "test"')


@dataclass(frozen=True)
class SessionSection:
    handshake_timeout: float = _doc(5.0, "seconds for a whole Noise handshake")
    idle_timeout: float = _doc(60.0, "close a session after this many silent seconds")
    keepalive_interval: float = _doc(15.0, "send a ping after this many seconds without sending")
    rekey_after: int = _doc(1 << 20, "rekey each direction after this many Noise messages")
    max_message_mib: int = _doc(16, "largest application message accepted, MiB")


@dataclass(frozen=True)
class InferenceSection:
    engine: str = _doc("numpy", '"numpy" (CPU), "cupy" (NVIDIA GPU) or "triton"')
    models: tuple[str, ...] = _doc(
        ("digits-mlp@1", "digits-mlp-wide@1", "digits-mlp-deep@1"),
        'models to load at start, "id@version"',
    )
    triton_url: str = _doc("", 'Triton server for engine "triton", e.g. "127.0.0.1:8000"')
    max_batch_size: int = _doc(64, "dynamic batcher: largest batch handed to the engine")
    max_queue_delay_ms: float = _doc(2.0, "dynamic batcher: longest wait to fill a batch")
    max_queue: int = _doc(1024, "dynamic batcher: queued requests before answering overloaded")


@dataclass(frozen=True)
class ExecutorSection:
    max_concurrent: int = _doc(4, "work items executed at once on this node")
    offload_queue_depth: int = _doc(
        16, "queue depth above which work is offered to a less loaded peer with the model"
    )


@dataclass(frozen=True)
class HttpSection:
    enabled: bool = _doc(True, "serve /healthz, /readyz, /metrics and /status")
    listen: str = _doc("127.0.0.1:0", 'HTTP "host:port" (loopback by default)')


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


_CHOICES = {
    ("network", "link"): ("v2v", "v2i", "wan"),
    ("membership", "preset"): ("lan", "v2v", "test"),
    ("inference", "engine"): ("numpy", "cupy", "triton"),
}
_POSITIVE = {
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


def parse_address(text: str, where: str) -> Address:
    """``"host:port"`` (IPv6 as ``"[::1]:7946"``) -> Address, or ConfigError naming ``where``."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f'{where}: expected "host:port", got {text!r}')
    return Address(host, int(port))


def _check_value(where: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_check_value(f"{where}[{i}]", inner, v) for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def _section(name: str, cls: type, table: Any, source: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"{source}: [{name}] unknown key {key!r} (known: {sorted(known)})")
    values = {}
    for key, value in table.items():
        where = f"{source}: [{name}] {key}"
        value = _check_value(where, hints[key], value)
        if (name, key) in _CHOICES and value not in _CHOICES[(name, key)]:
            raise ConfigError(f"{where}: must be one of {_CHOICES[(name, key)]}, got {value!r}")
        if (name, key) in _POSITIVE and value <= 0:
            raise ConfigError(f"{where}: must be positive, got {value!r}")
        values[key] = value
    return cls(**values)


def config_from_dict(data: dict[str, Any], source: str = "config") -> NodeConfig:
    """Validate a parsed TOML document into a :class:`NodeConfig`."""
    sections = {f.name: f for f in dataclasses.fields(NodeConfig)}
    for name in data:
        if name not in sections:
            raise ConfigError(f"{source}: unknown section [{name}] (known: {sorted(sections)})")
    hints = typing.get_type_hints(NodeConfig)
    built = {name: _section(name, hints[name], table, source) for name, table in data.items()}
    config = NodeConfig(**built)
    _cross_checks(config, source)
    return config


def _cross_checks(config: NodeConfig, source: str) -> None:
    parse_address(config.network.listen, f"{source}: [network] listen")
    parse_address(config.http.listen, f"{source}: [http] listen")
    s = config.session
    if s.keepalive_interval >= s.idle_timeout:
        raise ConfigError(f"{source}: [session] keepalive_interval must be below idle_timeout")
    if config.inference.engine == "triton" and not config.inference.triton_url:
        raise ConfigError(f'{source}: [inference] triton_url is required for engine "triton"')


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate ``path``; every problem is a ConfigError naming the file and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data, str(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def render_defaults(config: NodeConfig | None = None) -> str:
    """The annotated TOML for ``config`` (defaults if None): every key with its documentation."""
    config = config or NodeConfig()
    lines = ["# meshinfer node configuration (meshinfer-node run --config FILE)"]
    for section in dataclasses.fields(NodeConfig):
        lines += ["", f"[{section.name}]"]
        table = getattr(config, section.name)
        for f in dataclasses.fields(table):
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{f.name} = {_toml_value(getattr(table, f.name))}")
    return "\n".join(lines) + "\n"


def with_overrides(config: NodeConfig, **sections: dict[str, Any]) -> NodeConfig:
    """A copy with some keys replaced, e.g. ``with_overrides(c, network={"listen": ...})``."""
    return dataclasses.replace(
        config,
        **{
            name: dataclasses.replace(getattr(config, name), **vals)
            for name, vals in sections.items()
        },
    )


__all__ = [
    "NodeConfig",
    "config_from_dict",
    "load_config",
    "parse_address",
    "render_defaults",
    "with_overrides",
]
