"""``meshinfer-coord``: the fleet operator's command line.

Commands: ``serve`` (the coordinator daemon), ``config`` (the annotated default file, or
``--check`` one), the task commands of :mod:`coordinator.cli_tasks` and the ``fleet`` group (see
:mod:`meshinfer.fleetcli`). Add a command by writing an ``_add_<name>(commands)`` function and
listing it in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator.cli_tasks import add_task_commands
from meshinfer.fleetcli import (
    CommandParser,
    add_config_command,
    add_fleet_commands,
    add_log_level,
    command_line,
    run_cli,
)


def _add_serve(commands: Any) -> None:
    from meshinfer.runtime.loop import add_parent_watch_option

    help_text = "run the coordinator daemon until SIGTERM (prints READY {json} once ready)"
    parser = commands.add_parser("serve", help=help_text, description=help_text)
    parser.add_argument("--config", required=True, type=Path, help="coordinator TOML file")
    add_parent_watch_option(parser)
    add_log_level(parser)
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from meshinfer.runtime.loop import run_main, watched_parent

    parent_pid = watched_parent(args.exit_with_parent)  # before anything slow
    from coordinator.config import load_config
    from coordinator.daemon import run_coordinator

    config = load_config(args.config)  # ConfigError -> one line on stderr, exit 2
    return run_main(run_coordinator(config, parent_pid), args.log_level)


def _add_config(commands: Any) -> None:
    def schema() -> Any:
        from coordinator.config import SCHEMA

        return SCHEMA

    add_config_command(commands, "coordinator.toml", schema)


COMMANDS = (_add_serve, _add_config, add_task_commands, add_fleet_commands)


def build_parser() -> CommandParser:
    """The ``meshinfer-coord`` argument parser with every command."""
    return command_line("meshinfer-coord", "meshinfer fleet coordinator", COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``meshinfer-coord``; returns the exit code."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
