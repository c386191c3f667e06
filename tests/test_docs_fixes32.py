"""The user documentation (README.md, docs/architecture.md) against the programs it describes.

Each check reads the docs as text and compares them with the code's own sources of truth (the
argparse parsers, the TOML schemas' rendered defaults, the OpenAPI document), so a renamed flag,
key or route, or a changed default, fails here instead of rotting in the docs. No daemon runs.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.cli import build_parser as coord_parser
from coordinator.config import render_defaults as coord_defaults
from coordinator.openapi import openapi_document
from meshinfer.cli import _build_parser as meshinfer_parser
from node.cli import build_parser as node_parser
from node.config import render_defaults as node_defaults
from simulations.cli import build_parser as sim_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "meshinfer": meshinfer_parser,
    "meshinfer-node": node_parser,
    "meshinfer-coord": coord_parser,
    "meshinfer-sim": sim_parser,
}


# -- helpers ------------------------------------------------------------------------------------


def rendered_sections(text: str) -> dict[str, dict[str, str]]:
    """``[section]`` -> {key: TOML value} of a file ``config`` prints."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(m.group(1), {})
        elif m := re.fullmatch(r"(\w+) = (.*)", line):
            current[m.group(1)] = m.group(2)
    return sections


def documented_config(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """The architecture page's config table: file -> section -> {key: default}."""
    table: dict[str, dict[str, dict[str, str]]] = {"node": {}, "coordinator": {}}
    for line in text.splitlines():
        m = re.fullmatch(r"\| ([a-z, ]+) \| `\[(\w+)\]` \| (.*) \|", line)
        if not m:
            continue
        keys = dict(re.findall(r"`(\w+) = ([^`]*)`", m.group(3)))
        for file in m.group(1).split(", "):
            table[file][m.group(2)] = keys
    return table


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_parser(words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of the deepest subcommand named by ``words`` and the words after it."""
    parser = PARSERS[words[0]]()
    rest = words[1:]
    while rest and rest[0] in subparsers(parser):
        parser, rest = subparsers(parser)[rest[0]], rest[1:]
    return parser, rest


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def shell_commands(text: str) -> list[list[str]]:
    """Each ``meshinfer*`` command of the ```sh blocks, as argv (comments, ``>`` redirections and
    the ``&``, ``&&`` and ``;`` separators dropped; continuation lines joined)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = [*shlex.split(line, comments=True), ";"]
            command: list[str] = []
            for before, word in zip([None, *words], words, strict=False):
                if ">" in (word, before):
                    continue
                if word in (";", "&", "&&"):
                    if command and command[0] in PARSERS:
                        commands.append(command)
                    command = []
                else:
                    command.append(word)
    return commands


def inline_commands(text: str) -> list[list[str]]:
    """``meshinfer... sub --flag`` spans in single backticks; ``a|b|c`` gives one per choice."""
    found = []
    for span in re.findall(r"(?<!`)`(meshinfer[^`\n]*)`(?!`)", text):
        words = span.split()
        if words[0] not in PARSERS:
            continue
        if len(words) > 1 and "|" in words[1] and not words[1].startswith("-"):
            found += [[words[0], choice, *words[2:]] for choice in words[1].split("|")]
        elif len(words) > 2 and "|" in words[2] and not words[2].startswith("-"):
            found += [[*words[:2], choice, *words[3:]] for choice in words[2].split("|")]
        else:
            found.append(words)
    return found


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "render"), [("node", node_defaults), ("coordinator", coord_defaults)]
)
def test_the_config_table_lists_every_key_with_its_default(file, render):
    documented = documented_config(ARCHITECTURE.read_text())[file]
    assert documented == rendered_sections(render())


def test_every_config_key_the_docs_name_exists():
    known = rendered_sections(node_defaults()) | rendered_sections(coord_defaults())
    for doc in (README, ARCHITECTURE):
        text = doc.read_text()
        for section, key in re.findall(r"`\[(\w+)\] (\w+)", text):
            assert section in known, f"{doc.name}: [{section}] is no config section"
            assert key in known[section], f"{doc.name}: [{section}] {key} is no config key"


# -- command lines --------------------------------------------------------------------------------


def test_readme_command_blocks_parse_with_the_real_parsers():
    commands = shell_commands(README.read_text())
    assert len(commands) >= 15, commands  # the tour's fleet-by-hand block is all there
    for argv in commands:
        try:
            PARSERS[argv[0]]().parse_args(argv[1:])
        except SystemExit as exc:
            pytest.fail(f"README: {shlex.join(argv)} does not parse (exit {exc.code})")


def test_inline_commands_name_real_subcommands_and_flags():
    commands = inline_commands(README.read_text()) + inline_commands(ARCHITECTURE.read_text())
    assert len(commands) >= 10
    for argv in commands:
        parser, rest = command_parser(argv)
        group = rest in ([], ["..."])  # a command group named as such
        assert group or not subparsers(parser), f"{' '.join(argv)}: no subcommand of {argv[0]}"
        for word in rest:
            flag = word.split("=")[0]
            if flag.startswith("--"):
                assert flag in options(parser), f"{' '.join(argv)}: {flag} is no option"


def test_the_demo_flags_the_readme_lists_are_the_demo_s():
    readme = README.read_text()
    demo = subparsers(meshinfer_parser())["demo"]
    listed = set(re.findall(r"`(--[a-z-]+)", readme.split("## A short tour")[1].split("\n\n")[1]))
    assert listed == options(demo) - {"-h", "--help"}


# -- HTTP API ------------------------------------------------------------------------------------


def test_readme_names_every_coordinator_route_and_only_those():
    readme = README.read_text()
    short = "/v1/tasks[/{id}[/wait]]"
    assert short in readme
    readme = readme.replace(short, "/v1/tasks /v1/tasks/{id} /v1/tasks/{id}/wait")
    paths = set(openapi_document()["paths"])
    named = set(re.findall(r"(/v1/[a-z]+(?:/\{id\}(?:/[a-z]+)?)?)", readme))
    named |= {p for p in ("/metrics", "/openapi.json", "/healthz") if p in readme}
    assert named == paths


def all_options(parser: argparse.ArgumentParser) -> set[str]:
    found = options(parser)
    for sub in subparsers(parser).values():
        found |= all_options(sub)
    return found


def test_every_flag_the_docs_name_is_an_option_of_some_command():
    known = set().union(*(all_options(build()) for build in PARSERS.values()))
    for doc in (README, ARCHITECTURE):
        named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", doc.read_text()))
        assert named <= known, f"{doc.name}: {sorted(named - known)}"
