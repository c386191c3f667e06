"""``meshinfer-coord``: the fleet operator's command line.

Commands so far: the ``fleet`` group (see :mod:`meshinfer.fleetcli`). Add a command by writing
an ``_add_<name>(commands)`` function and listing it in :data:`COMMANDS`.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshinfer.fleetcli import CommandParser, add_fleet_commands, new_parser, run_cli

COMMANDS = (add_fleet_commands,)


def build_parser() -> CommandParser:
    """The ``meshinfer-coord`` argument parser with every command."""
    parser, commands = new_parser("meshinfer-coord", "meshinfer fleet coordinator")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``meshinfer-coord``; returns the exit code."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
