"""Strict, self-documenting TOML configuration files (the node's and the coordinator's).

A configuration is a frozen dataclass whose fields are sections, each section a frozen dataclass
whose fields carry their documentation (:func:`doc`). :class:`Schema` reads a parsed TOML document
into it, refusing unknown sections and keys, wrong types, values outside a fixed set of choices
and non-positive values where a positive one is needed, each as a
:class:`~meshinfer.errors.ConfigError` naming the file, section and key. :meth:`Schema.render`
prints the annotated file with every key and its documentation, so the documentation cannot
drift from the code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshinfer.atomic_files import read_limited
from meshinfer.errors import ConfigError
from meshinfer.transport.base import Address

__all__ = [
    "Schema",
    "config_folder",
    "doc",
    "parse_address",
    "paths_from",
    "read_toml",
    "with_overrides",
]


def doc(default: Any, text: str) -> Any:
    """A section field with its default and documentation."""
    if isinstance(default, list):
        raise TypeError("use a tuple for list defaults (frozen sections)")
    return field(default=default, metadata={"doc": text})


def parse_address(text: str, where: str) -> Address:
    """``"host:port"`` (IPv6 as ``"[::1]:7946"``) -> Address, or ConfigError naming ``where``:
    an IPv6 address without its brackets (``::1:80`` could end in its port or in a group),
    stray brackets and a port outside 0..65535 are each refused with their own reason."""
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    # ASCII digits only: str.isdigit also takes "²", which int() refuses
    if not sep or not host or not _is_decimal(port):
        raise ConfigError(f'{where}: expected "host:port", got {text!r}')
    if "[" in host or "]" in host:
        raise ConfigError(f'{where}: stray bracket in the host of {text!r} ("[::1]:7946")')
    if ":" in host and not bracketed:
        raise ConfigError(f'{where}: an IPv6 address goes in brackets, "[{host}]:{port}"')
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: port {int(port)} of {text!r} is outside 0..65535")
    return Address(host, int(port))


def listen_failure(key: str, listen: str, exc: OSError) -> ConfigError:
    """A socket that cannot listen at ``listen`` (taken, not an address of this host, a name
    that does not resolve) as one line naming the setting: ``[http] listen HOST:PORT: why``."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    return ConfigError(f"{key} {listen}: {cause.strerror or cause}")


def _is_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()


MAX_CONFIG_BYTES = 16 << 20
"""The largest configuration file read (a full one is some kilobytes)."""


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse ``path``; a missing, unreadable or malformed file is a ConfigError naming it, and
    so is one that is no regular file (a FIFO held the command for good, waiting for a writer;
    a device such as /dev/zero was read until memory ran out) or over :data:`MAX_CONFIG_BYTES`.
    A leading UTF-8 byte-order mark (some editors write one) is skipped: tomllib took it for a
    key and answered "Invalid statement" at line 1."""
    path = Path(path)
    data = read_limited(path, "config file", limit=MAX_CONFIG_BYTES, error=ConfigError)
    try:
        return tomllib.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except ValueError as exc:  # a TOMLDecodeError, or an integer of over 4300 digits
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


@dataclass(frozen=True)
class Schema:
    """How to read and render one kind of configuration file.

    ``choices`` maps ``(section, key)`` to the allowed values; ``positive`` lists the keys that
    must be > 0; ``cross_check(config, source)`` validates relations between keys.
    """

    root: type
    title: str
    choices: Mapping[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    positive: frozenset[tuple[str, str]] = frozenset()
    cross_check: Callable[[Any, str], None] | None = None

    def from_dict(self, data: Mapping[str, Any], source: str = "config") -> Any:
        """Validate a parsed TOML document into an instance of :attr:`root`."""
        sections = {f.name for f in dataclasses.fields(self.root)}
        for name in data:
            if name not in sections:
                raise ConfigError(f"{source}: unknown section [{name}] (known: {sorted(sections)})")
        hints = typing.get_type_hints(self.root)
        built = {
            name: self._section(name, hints[name], table, source) for name, table in data.items()
        }
        config = self.root(**built)
        if self.cross_check is not None:
            self.cross_check(config, source)
        return config

    def load(
        self, path: str | Path, *, relative_paths: Mapping[str, tuple[str, ...]] | None = None
    ) -> Any:
        """Read and validate ``path``; every problem is a ConfigError naming the file and key.

        ``relative_paths`` (as ``keys`` of :func:`paths_from`) names the path keys whose
        relative values are taken from the file's folder (:func:`config_folder`), so a daemon
        finds the same files whatever directory it is started from."""
        config = self.from_dict(read_toml(path), str(path))
        if relative_paths is None:
            return config
        return paths_from(config, config_folder(path), relative_paths)

    def _section(self, name: str, cls: type, table: Any, source: str) -> Any:
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(
                    f"{source}: [{name}] unknown key {key!r} (known: {sorted(known)})"
                )
            where = f"{source}: [{name}] {key}"
            value = _check_value(where, hints[key], value)
            allowed = self.choices.get((name, key))
            if allowed is not None and value not in allowed:
                raise ConfigError(f"{where}: must be one of {allowed}, got {value!r}")
            if (name, key) in self.positive and value <= 0:
                raise ConfigError(f"{where}: must be positive, got {value!r}")
            values[key] = value
        return cls(**values)

    def render(self, config: Any | None = None) -> str:
        """The annotated TOML for ``config`` (defaults if None): every key with its doc."""
        config = config or self.root()
        lines = [f"# {self.title}"]
        for section in dataclasses.fields(self.root):
            lines += ["", f"[{section.name}]"]
            table = getattr(config, section.name)
            for f in dataclasses.fields(table):
                lines.append(f"# {f.metadata['doc']}")
                lines.append(f"{f.name} = {_toml_value(getattr(table, f.name))}")
        return "\n".join(lines) + "\n"


_LARGEST_FLOAT = int(sys.float_info.max)


def _check_value(where: str, hint: Any, value: Any) -> Any:
    if typing.get_origin(hint) is tuple:
        inner = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_check_value(f"{where}[{i}]", inner, v) for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > _LARGEST_FLOAT:  # float() would raise OverflowError
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if (hint in (int, float) and isinstance(value, bool)) or not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    if isinstance(value, str) and "\0" in value:  # no path, host or name holds one; open() fails
        raise ConfigError(f"{where}: must not contain a NUL character, got {value!r}")
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # JSON's string escapes are TOML's; DEL, which JSON leaves bare, TOML wants escaped too
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def config_folder(path: str | Path) -> Path:
    """The folder a config file's relative paths are taken from: the file's own, made absolute
    (``os.path.abspath``: a symlink to the file is not followed)."""
    return Path(os.path.abspath(path)).parent


def paths_from(config: Any, folder: Path, keys: Mapping[str, tuple[str, ...]]) -> Any:
    """``config`` with its relative paths joined to ``folder``: ``keys`` maps a section to its
    path keys (an empty value is left empty), e.g. ``{"node": ("identity_dir", "data_dir")}``."""
    sections = {
        name: {
            key: str(folder / value)
            for key in names
            if (value := getattr(getattr(config, name), key)) and not Path(value).is_absolute()
        }
        for name, names in keys.items()
    }
    return with_overrides(config, **{name: vals for name, vals in sections.items() if vals})


def with_overrides(config: Any, **sections: dict[str, Any]) -> Any:
    """A copy with some keys replaced, e.g. ``with_overrides(c, network={"listen": ...})``."""
    return dataclasses.replace(
        config,
        **{
            name: dataclasses.replace(getattr(config, name), **vals)
            for name, vals in sections.items()
        },
    )
