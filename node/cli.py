"""``meshinfer-node``: the vehicle / roadside-unit node command line.

Commands so far: ``keygen`` (make the node's Noise static key pair) and the shared ``fleet``
group (see :mod:`meshinfer.fleetcli`). Add a command by writing an ``_add_<name>(commands)``
function and listing it in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshinfer.fleetcli import CommandParser, add_fleet_commands, new_parser, run_cli
from meshinfer.identity_files import NodeDirectory


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


COMMANDS = (_add_keygen, add_fleet_commands)


def build_parser() -> CommandParser:
    """The ``meshinfer-node`` argument parser with every command."""
    parser, commands = new_parser("meshinfer-node", "meshinfer vehicle / roadside-unit node")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``meshinfer-node``; returns the exit code."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
