"""``meshinfer-sim``: researcher-facing simulations of the real protocol cores in virtual time.

Commands::

    membership --nodes N --preset lan|v2v|test --loss P --latency-ms LO,HI
               --crash K --joins J --duration S --seed SEED [--json] [--no-timing]

``membership`` plays a :class:`~simulations.membership.MembershipScenario` (a converged fleet,
J joins, K simultaneous crashes, S more seconds) and prints what it measured: join
dissemination, crash detection, false deaths, load and the CPU the run took. The same seed gives
the same figures; with ``--no-timing`` (no CPU and wall seconds) the same bytes. The table shows
the JSON's figures rounded half up (see :mod:`simulations.membership`). One run is capped at
:data:`~simulations.membership.MAX_NODE_SECONDS` (5 million) node-seconds,
``(N + J) * (2 + J + S)`` (2 s settle, about 1 s per join): 5 to 15 CPU minutes without loss;
a larger one is refused up front rather than left running for hours.
Errors follow :func:`meshinfer.fleetcli.run_cli`: a bad argument is one line on stderr and exit
code 2. Add a command by writing an ``_add_<name>(commands)`` function and listing it in
:data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from meshinfer.errors import ConfigError
from meshinfer.fleetcli import CommandParser, command_line, run_cli
from simulations.membership import (
    CAP_COST,
    MAX_DURATION,
    MAX_JOINS,
    MAX_LATENCY,
    MAX_LOSS,
    MAX_NODE_SECONDS,
    MAX_NODES,
    MAX_SEED,
    PRESETS,
    MembershipReport,
    MembershipScenario,
    RunInterrupted,
    decimal_text,
    run_membership,
    run_size,
)

# --- argument types (argparse turns ArgumentTypeError into "argument --x: message") -----------


def _integer(low: int, high: int) -> Callable[[str], int]:
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {low} to {high}, got {_shown(text)}"
            )
        return value

    return integer


def _number(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (low < value if low_open else low <= value) or not value <= high:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(
                f"must be a number in {bracket}{low:g}, {high:g}], got {_shown(text)}"
            )
        return value + 0.0  # -0 is 0: reported as "-0.0%" otherwise

    return number


def _latency_ms(text: str) -> tuple[float, float]:
    """``LO,HI`` in milliseconds -> (low, high) in seconds."""
    parts = text.split(",")
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        low = high = float("nan")
    if not 0 <= low <= high <= MAX_LATENCY * 1000:
        raise argparse.ArgumentTypeError(
            "must be LO,HI milliseconds with 0 <= LO <= HI <= "
            f"{MAX_LATENCY * 1000:g}, got {_shown(text)}"
        )
    return low / 1000 + 0.0, high / 1000 + 0.0  # -0 is 0: reported as "-0-1 ms" otherwise


def _seed(text: str) -> int:
    # random.Random(-n) draws what random.Random(n) does; int() refuses a string of over 4300
    # digits (ValueError): out of range like any other number past MAX_SEED
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"must be an integer from 0 to 2**64 - 1 ({MAX_SEED}), got {_shown(text)}"
        )
    return seed


def _shown(text: str) -> str:
    """``text`` quoted for an error line, cut short: a value of thousands of characters would
    bury the message."""
    return repr(text) if len(text) <= 60 else f"{text[:40]!r}... ({len(text):,} characters)"


# --- membership --------------------------------------------------------------------------------

#: ``meshinfer-sim membership`` options: (flag, add_argument keywords).
MEMBERSHIP_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--nodes", dict(type=_integer(2, MAX_NODES), default=50, metavar="N",
                     help="fleet size (default 50)")),
    ("--preset", dict(choices=tuple(PRESETS), default="lan",
                      help="membership preset (default lan)")),
    ("--loss", dict(type=_number(0, MAX_LOSS), default=0.0, metavar="P",
                    help="packet loss 0..0.5 (default 0)")),
    ("--latency-ms", dict(type=_latency_ms, default=(0.001, 0.005), metavar="LO,HI",
                          help="one-way delay range in ms (default 1,5)")),
    ("--crash", dict(type=_integer(0, MAX_NODES + MAX_JOINS), default=1, metavar="K",
                     help="nodes crashed at once after the joins (default 1)")),
    ("--joins", dict(type=_integer(0, MAX_JOINS), default=1, metavar="J",
                     help="nodes that join one after another (default 1)")),
    ("--duration", dict(type=_number(0, MAX_DURATION, low_open=True), default=60.0, metavar="S",
                        help="simulated seconds to run after the crashes (default 60)")),
    ("--seed", dict(type=_seed, default=1, help="random seed, 0 to 2**64 - 1 (default 1)")),
    ("--json", dict(action="store_true", help="print one JSON document instead of the table")),
    ("--no-timing", dict(action="store_true",
                         help="leave out the CPU and wall seconds the run took: the same seed "
                              "then gives byte-identical output")),
)  # fmt: skip


def _add_membership(commands: Any) -> None:
    help_text = "SWIM membership on the virtual network: joins, crashes, loss"
    description = (
        "Start a converged fleet of N nodes running the real membership cores, let J nodes "
        "join one after another, crash K random nodes at once and run S more simulated "
        "seconds; print join dissemination, crash detection, false deaths and load."
    )
    epilog = (
        f"A run may be at most {MAX_NODE_SECONDS:,} node-seconds, (N + J) x (2 + J + S): "
        f"{CAP_COST} (a CPU second simulates 5,000 node-seconds in a fleet of 2000, 20,000 in "
        "one of 50; at 50% loss only about 700)."
    )
    parser = commands.add_parser(
        "membership", help=help_text, description=description, epilog=epilog
    )
    for flag, options in MEMBERSHIP_OPTIONS:
        parser.add_argument(flag, **options)
    parser.set_defaults(handler=_membership)


def _membership(args: argparse.Namespace) -> int:
    most = args.nodes + args.joins - 1
    if args.crash > most:
        raise ConfigError(
            f"argument --crash: must leave one node running: at most --nodes + --joins - 1 = "
            f"{most}, got {args.crash} (see --help)"
        )
    size = run_size(args.nodes, args.joins, args.duration)
    if size > MAX_NODE_SECONDS:
        raise ConfigError(
            f"arguments --nodes, --joins, --duration: a run of {size:,.0f} node-seconds, "
            f"(N + J) x (2 + J + S), is over the cap of {MAX_NODE_SECONDS:,} ({CAP_COST}); "
            "lower --nodes, --joins or --duration (see --help)"
        )
    scenario = MembershipScenario(
        nodes=args.nodes,
        preset=args.preset,
        loss=args.loss,
        latency=args.latency_ms,
        crashes=args.crash,
        joins=args.joins,
        duration=args.duration,
        seed=args.seed,
    )
    try:
        report = run_membership(scenario)
    except RunInterrupted as interrupted:  # Ctrl-C: say how far the run came, not nothing
        print(f"meshinfer-sim membership: {interrupted}", file=sys.stderr)
        return 130
    if args.json:
        doc = report.to_json()
        if args.no_timing:
            del doc["timing"]
        print(json.dumps(doc, indent=2))
    else:
        print(membership_table(report, timing=not args.no_timing))
    return 0


def membership_table(report: MembershipReport, *, timing: bool = True) -> str:
    """The human-readable report of one membership run: the figures of its JSON document,
    rounded half up; ``timing`` False leaves out the "cost" row (CPU and wall seconds)."""
    doc = report.to_json()
    scenario, joins, crashes = report.scenario, doc["joins"], doc["crashes"]
    low, high = doc["scenario"]["latency_ms"]
    lines = [
        f"membership: {scenario.nodes} nodes, preset {scenario.preset}, "
        f"loss {_share(scenario.loss)}, latency {low:g}-{high:g} ms, seed {scenario.seed}",
        f"simulated {decimal_text(doc['simulated_s'], 1)} s = settle {scenario.settle:g} s + "
        f"{_count(joins['count'], 'join')} {decimal_text(doc['join_phase_s'], 1)} s + "
        f"{scenario.duration:g} s after {_count(crashes['count'], 'crash', 'crashes')}",
        "",
        _row("joins", "to 99.9% of the fleet", joins, "max", joins["count"])
        + f"  ({joins['reached']}/{joins['count']} reached)",
        _row("crashes", "first DEAD declaration", crashes["first_dead"], "p99", crashes["count"])
        + f"  ({crashes['detected']}/{crashes['count']} detected)",
        _row("", "DEAD at all live nodes", crashes["all_live"], "p99", crashes["count"])
        + f"  ({crashes['known_by_all']}/{crashes['count']} complete)",
        *_false_death_rows(doc["false_deaths"]),
        *_load_rows(doc["load"]),
        *([_cost_row(doc["timing"])] if timing else []),
    ]
    return "\n".join(lines + _per_crash_rows(crashes["per_crash"]))


def _share(value: float) -> str:
    """``value`` as a percentage, with every digit it has beyond the first decimal."""
    return f"{value:.1%}" if round(value, 3) == value else f"{value * 100:g}%"


def _count(n: int, singular: str, plural: str = "") -> str:
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def _row(section: str, what: str, figures: dict[str, Any], top: str, count: int) -> str:
    """``count`` 0: nothing was measured, so the figures are "-" rather than "never"."""
    median, high = figures["median_s"], figures[f"{top}_s"]
    none = "never" if count else "-"
    return f"{section:<11} {what:<24} median {_seconds(median, none)}  {top} {_seconds(high, none)}"


def _seconds(value: float | None, none: str = "never") -> str:
    return f"{none:>8}" if value is None else f"{decimal_text(value, 2):>6} s"


def _false_death_rows(false_deaths: dict[str, int]) -> list[str]:
    return [
        f"{'false DEAD':<11} {'declarations, live nodes':<24} {false_deaths['declarations']:>8}"
        f"    ({_count(false_deaths['nodes'], 'node')})",
        f"{'':<11} {'SUSPECT, live nodes':<24} {false_deaths['suspect_declarations']:>8}"
        f"    ({_count(false_deaths['suspected_nodes'], 'node')}, refuted or pending)",
    ]


def _load_rows(load: dict[str, Any]) -> list[str]:
    lost = decimal_text(load["lost"] / max(1, load["packets"]), 1, percent=True)
    packets = decimal_text(load["packets_per_node_s"], 1)
    size = decimal_text(load["bytes_per_node_s"], 0)
    return [
        f"{'load':<11} {'per node per second':<24} {packets:>8} "
        f"packets  {size:>8} bytes  ({lost}% of packets lost)",
    ]


def _cost_row(timing: dict[str, float]) -> str:
    cpu, wall = decimal_text(timing["cpu_s"], 2), decimal_text(timing["wall_s"], 2)
    return f"{'cost':<11} {'of this simulation':<24} {cpu:>8} s CPU  {wall:>8} s wall"


def _per_crash_rows(per_crash: list[dict[str, Any]]) -> list[str]:
    if not per_crash:
        return []
    rows = ["", f"{'crashed':<11} {'first DEAD':>10} {'all live':>10}  declared by"]
    for crash in per_crash:
        rows.append(
            f"{crash['node']:<11} {_seconds(crash['first_dead_s']):>10} "
            f"{_seconds(crash['all_live_s']):>10}  {crash['known_by']}/{crash['observers']}"
        )
    return rows


COMMANDS = (_add_membership,)


def build_parser() -> CommandParser:
    """The ``meshinfer-sim`` argument parser with every command."""
    return command_line("meshinfer-sim", "meshinfer simulations in virtual time", COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``meshinfer-sim``; returns the exit code."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
