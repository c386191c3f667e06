"""``meshinfer-node``: the vehicle / roadside-unit node command line.

Commands: ``run`` (the daemon), ``status`` (ask a running one), ``config`` (the annotated
default file, or ``--check`` one), ``keygen`` (make the node's Noise static key pair) and the
shared ``fleet`` group (see :mod:`meshinfer.fleetcli`). Add a command by writing an
``_add_<name>(commands)`` function and listing it in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshinfer.errors import ConfigError
from meshinfer.fleetcli import (
    CommandParser,
    add_config_command,
    add_fleet_commands,
    add_log_level,
    command_line,
    run_cli,
)
from meshinfer.identity_files import NodeDirectory

if TYPE_CHECKING:
    import urllib.error


def _add_keygen(commands: Any) -> None:
    help_text = "write a new Noise static key pair (node.key 0600, node.pub) and print the key"
    parser = commands.add_parser("keygen", help=help_text, description=help_text)
    parser.add_argument("--dir", required=True, type=Path, help="node directory")
    parser.add_argument("--force", action="store_true", help="replace an existing key pair")
    parser.set_defaults(handler=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    public = NodeDirectory(args.dir).keygen(force=args.force)
    print(public.hex())
    return 0


def _add_run(commands: Any) -> None:
    from meshinfer.runtime.loop import add_parent_watch_option

    help_text = "run the node daemon until SIGTERM (prints READY {json} once ready)"
    parser = commands.add_parser("run", help=help_text, description=help_text)
    parser.add_argument("--config", required=True, type=Path, help="node TOML file")
    add_parent_watch_option(parser)
    add_log_level(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from meshinfer.runtime.loop import run_main, watched_parent

    parent_pid = watched_parent(args.exit_with_parent)  # before anything slow
    from node.config import load_config
    from node.daemon import run_daemon

    config = load_config(args.config)  # ConfigError -> one line on stderr, exit 2
    return run_main(run_daemon(config, parent_pid), args.log_level)


def _add_status(commands: Any) -> None:
    help_text = "ask a running daemon for its status (members, sessions, models, load)"
    parser = commands.add_parser("status", help=help_text, description=help_text)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the daemon's HTTP base URL, e.g. http://127.0.0.1:8080")
    where.add_argument("--data-dir", type=Path, help="the daemon's [node] data_dir")
    parser.add_argument("--json", action="store_true", help="print the raw JSON document")
    parser.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    import json

    url = args.url if args.url is not None else _recorded_url(args.data_dir)
    doc = _fetch_status(url)
    try:  # built before --json prints too: it checks that a meshinfer node answered
        table = _status_table(doc)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{url}: not a meshinfer node's /status ({exc!r})") from None
    print(json.dumps(doc, indent=2) if args.json else table)
    return 0


def _recorded_url(data_dir: Path) -> str:
    """The HTTP URL the daemon with ``data_dir`` recorded in its runtime file; a file a daemon
    that is gone left behind (SIGKILLed: it could not remove it) says so."""
    from meshinfer.runtime.data_dir import RUNTIME_FILE, read_runtime

    facts = read_runtime(data_dir)
    runtime = data_dir / RUNTIME_FILE
    if "http" in facts and facts["http"] is None:
        raise ConfigError(
            f"{runtime}: the daemon recorded there serves no HTTP ([http] enabled = false)"
        )
    url = facts.get("http")
    if not isinstance(url, str):
        what = f"http: {url!r}" if "http" in facts else "no http URL"
        raise ConfigError(f"{runtime}: no running daemon recorded there ({what})")
    return url


def _fetch_status(url: str) -> Any:
    """The JSON document at ``url``/status; any failure is a ConfigError naming ``url``."""
    import http.client
    import json
    import urllib.error

    from meshinfer.http_client import read_capped, strict_opener
    from meshinfer.http_url import check_http_url

    url = check_http_url(url, "the daemon's URL")
    try:  # one deadline for the whole request, headers included (each read waited 5 s)
        with strict_opener(url).open(url + "/status", timeout=STATUS_TIMEOUT_S) as response:
            body = read_capped(response, STATUS_MAX_BYTES)
    except urllib.error.HTTPError as exc:  # something answered: no node (its /status is 200)
        exc.close()
        raise ConfigError(_not_a_node(url, exc)) from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        if isinstance(getattr(exc, "reason", exc), TimeoutError):
            exc = TimeoutError(f"no whole answer within {STATUS_TIMEOUT_S:g} s")
        raise ConfigError(f"cannot reach the daemon at {url}: {exc}") from None
    if body is None:
        raise ConfigError(f"{url}: not a meshinfer node's /status (over {STATUS_MAX_BYTES} bytes)")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # (nested past the parser's limit)
        raise ConfigError(f"{url}: not a meshinfer node's /status (not JSON: {exc})") from None


def _not_a_node(url: str, exc: urllib.error.HTTPError) -> str:
    """What ``status`` says of an HTTP error answer: a meshinfer daemon's ``/status`` is 200
    (500 only if it failed), so a 404, 405 or redirect comes from some other server on that
    port."""
    answer = f"HTTP {exc.code} {exc.reason}"
    if exc.code >= 500:
        return f"{url}: the server failed to answer /status ({answer})"
    return f"{url}: not a meshinfer node's /status (it answered {answer})"


STATUS_TIMEOUT_S = 5.0
"""How long ``status`` waits for the daemon's whole answer (each read waited this long, so a
hung daemon that sent a byte now and then held the command for ever)."""
STATUS_MAX_BYTES = 256 << 20
"""The largest ``/status`` document ``status`` reads (a full table of 65,536 members is some
tens of MiB); past it, what answered is no meshinfer node (an endless answer filled memory)."""


def _status_table(doc: dict[str, Any]) -> str:
    lines = [
        f"node {doc['node_id']} (fleet {doc['fleet_id']}) at {doc['session_address']}: "
        + ("ready" if doc["ready"] else "NOT READY: " + "; ".join(doc["problems"])),
        f"engine {doc['engine']}, models {', '.join(doc['models']) or '-'}",
        f"{'member':<20}{'status':<10}{'address':<24}{'queue':>6}  models",
    ]
    for m in doc["members"]:
        queue = "-" if m["queue_depth"] is None else m["queue_depth"]  # dead or left
        lines.append(
            f"{m['node_id']:<20}{m['status']:<10}{m['address']:<24}{queue:>6}  "
            + ",".join(m["models"])
        )
    return "\n".join(lines)


def _add_config(commands: Any) -> None:
    def schema() -> Any:
        from node.config import SCHEMA

        return SCHEMA

    add_config_command(commands, "node.toml", schema)


COMMANDS = (_add_keygen, _add_run, _add_status, _add_config, add_fleet_commands)


def build_parser() -> CommandParser:
    """The ``meshinfer-node`` argument parser with every command."""
    return command_line("meshinfer-node", "meshinfer vehicle / roadside-unit node", COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``meshinfer-node``; returns the exit code."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
