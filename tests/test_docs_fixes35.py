"""More of the user documentation checked against the programs it describes.

``test_docs_fixes32.py`` checks the flags, subcommands, config table and coordinator routes the
README and the architecture page name. These checks cover what it leaves out: the HTTP routes of
both pages with their methods (the node's too), the ``fleet`` group shared by the three CLIs, the
task commands' way of finding the coordinator, defaults quoted in prose, metric and ``/v1/stats``
names, the bench commands of the performance page, and the simulator's README (its JSON document's
keys and its rounding examples). No daemon runs.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

from coordinator.config import render_defaults as coord_defaults
from coordinator.openapi import openapi_document
from coordinator.service_config import CoordinatorConfig
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.runtime.revocations import RevocationSyncConfig
from meshinfer.runtime.session import SessionConfig
from meshinfer.transport.base import Address
from node.config import render_defaults as node_defaults
from node.http import NodeHttp
from simulations.cli import main as sim_main
from simulations.membership import decimal_text
from tests.test_docs_fixes32 import PARSERS, options, rendered_sections, subparsers

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
PERFORMANCE = ROOT / "docs" / "performance.md"
SIM_README = ROOT / "simulations" / "README.md"
DOCS = (README, ARCHITECTURE, PERFORMANCE)


def flat(doc: Path) -> str:
    """The page's text on one line (prose wraps anywhere)."""
    return re.sub(r"\s*\n\s*", " ", doc.read_text())


# -- HTTP routes ---------------------------------------------------------------------------------


def node_routes() -> set[tuple[str, str]]:
    app = NodeHttp(None, Address("127.0.0.1", 0)).app  # type: ignore[arg-type]
    return {(r.method, r.resource.canonical) for r in app.router.routes()}


def coordinator_routes() -> set[tuple[str, str]]:
    paths = openapi_document()["paths"]
    return {(method.upper(), path) for path, ops in paths.items() for method in ops}


def documented_routes(text: str) -> set[tuple[str, str]]:
    """``GET /a``, ``GET|POST /a`` and ``GET /v1/tasks[/{id}[/wait]]`` as (method, path) pairs."""
    found = set()
    for methods, path in re.findall(
        r"`((?:GET|POST|HEAD)(?:\|(?:GET|POST|HEAD))*) (/[^`\s]*)`", text
    ):
        paths = [path]
        if path == "/v1/tasks[/{id}[/wait]]":
            paths = ["/v1/tasks", "/v1/tasks/{id}", "/v1/tasks/{id}/wait"]
        found |= {(m, p) for m in methods.split("|") for p in paths}
    return found


@pytest.mark.parametrize("doc", [README, ARCHITECTURE], ids=lambda d: d.name)
def test_every_route_named_with_its_method_is_served_with_it(doc):
    served = coordinator_routes() | node_routes()
    named = documented_routes(flat(doc))
    assert len(named) >= 8
    assert named <= served, f"{doc.name}: {sorted(named - served)}"


def test_the_readme_names_every_node_route_and_only_those():
    text = flat(README)
    said = text.split("Each node serves", 1)[1].split("positioning.", 1)[0]
    named = set(re.findall(r"`(/[a-z]+)`", said)) | {p for _, p in documented_routes(said)}
    assert named == {path for _, path in node_routes()}
    assert ("POST", "/position") in documented_routes(said)


def test_the_architecture_page_lists_every_coordinator_route():
    text = flat(ARCHITECTURE)
    said = text.split("HTTP API (`api.py`", 1)[1].split("bearer token", 1)[0]
    named = set(re.findall(r"`(?:(?:GET|POST)(?:\|POST)? )?(/[^`\s]*)`", said))
    assert named == {path for _, path in coordinator_routes()}


# -- command groups ------------------------------------------------------------------------------


def command_tree(parser) -> dict:
    """Subcommand -> (its options, its own subcommands), all the way down."""
    return {
        name: (sorted(options(sub)), command_tree(sub)) for name, sub in subparsers(parser).items()
    }


def test_the_fleet_group_is_the_same_in_all_three_clis():
    clis = ("meshinfer", "meshinfer-coord", "meshinfer-node")
    trees = {cli: command_tree(subparsers(PARSERS[cli]())["fleet"]) for cli in clis}
    assert trees["meshinfer"] == trees["meshinfer-coord"] == trees["meshinfer-node"]
    said = re.search(r"`meshinfer fleet ([a-z|]+)`", ARCHITECTURE.read_text()).group(1)
    assert set(said.split("|")) == set(trees["meshinfer"])


def test_the_task_commands_find_the_coordinator_as_the_readme_says():
    text = flat(README)
    listed = re.search(r"The task commands \(([^)]*)\) find the coordinator by", text).group(1)
    names = re.findall(r"`([a-z]+)`", listed)
    coord = subparsers(PARSERS["meshinfer-coord"]())
    task_commands = {n for n, p in coord.items() if "--token-file" in options(p)}
    assert set(names) == task_commands
    for name in names:
        assert {"--url", "--token-file", "--data-dir"} <= options(coord[name]), name
    for variable in re.findall(r"`(MESHINFER_\w+)`", text):
        assert variable in (ROOT / "coordinator" / "client.py").read_text()


# -- defaults quoted in prose --------------------------------------------------------------------


def config_defaults() -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    for rendered in (node_defaults(), coord_defaults()):
        for section, keys in rendered_sections(rendered).items():
            sections.setdefault(section, {}).update(keys)
    return sections


def dataclass_defaults() -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for cls in (CoordinatorConfig, SessionConfig, MembershipConfig, RevocationSyncConfig):
        for field in dataclasses.fields(cls):
            if isinstance(field.default, int | float) and not isinstance(field.default, bool):
                found.setdefault(field.name, []).append(float(field.default))
    return found


QUOTED_DEFAULT = re.compile(
    r"`(?:\[(\w+)\] )?(\w+)`,? \(?(2\^\d+|\d[\d,]*(?:\.\d+)?)(?: (ms|s|MiB|m)\b)?"
)


def quoted_value(number: str, unit: str | None, key: str) -> float:
    """``50 ms`` for a key in seconds is 0.05; ``64 MiB`` for a key in bytes is 64 << 20."""
    value = 2.0 ** int(number[2:]) if number.startswith("2^") else float(number.replace(",", ""))
    if unit == "ms" and not key.endswith("_ms"):
        value /= 1000
    if unit == "MiB" and not key.endswith("_mib"):
        value *= 1 << 20
    return value


def test_defaults_quoted_in_prose_are_the_defaults():
    """A key in backticks followed by a figure (``[session] verify_timeout` (1 s``,
    ``result_replay_s` (60 s)``) quotes that key's default: of the TOML schemas, else of the
    components' configs."""
    config, fields = config_defaults(), dataclass_defaults()
    checked = 0
    for doc in DOCS:
        for m in QUOTED_DEFAULT.finditer(flat(doc)):
            section, key, number, unit = m.groups()
            toml = [v for s, keys in config.items() for k, v in keys.items()
                    if k == key and section in (None, s)]  # fmt: skip
            defaults = [float(v) for v in toml if re.fullmatch(r"-?[\d.]+", v)] or fields.get(key)
            if not defaults:
                continue
            checked += 1
            quoted = quoted_value(number, unit, key)
            assert quoted in defaults, f"{doc.name}: {m.group(0)!r}, default {defaults}"
    assert checked >= 15


# -- metrics and stats ---------------------------------------------------------------------------

SOURCES = [ROOT / d for d in ("meshinfer", "node", "coordinator")]


def source_text() -> str:
    return "\n".join(p.read_text() for d in SOURCES for p in sorted(d.rglob("*.py")))


def test_metric_names_in_the_docs_exist_with_their_labels():
    code = source_text()
    names = 0
    for doc in DOCS:
        for name, labels in re.findall(r"`(meshinfer_[a-z_]*)(\{[a-z_=\",]*\})?`", flat(doc)):
            names += 1
            assert name in code, f"{doc.name}: no metric {name}"
            if name.endswith("_") or not labels:
                continue
            # the family's definition, up to the next family: does it use that label?
            body = code.split(f'"{name}"', 1)[1].split("family(", 1)[0]
            for label in re.findall(r"(\w+)(?:=|\})", labels):
                assert f'"{label}"' in body, f"{doc.name}: {name} has no label {label}"
    assert names >= 8


def test_stats_counters_the_docs_name_are_in_the_stats_schema():
    stats = set(openapi_document()["components"]["schemas"]["Stats"]["properties"])
    named = set()
    for doc in (README, ARCHITECTURE):
        text = flat(doc)
        for run in re.findall(r"((?:`\w+`(?:,| and)? ?)+) in `/v1/stats`", text):
            named |= set(re.findall(r"`(\w+)`", run))
        named |= set(re.findall(r"\(`(\w+)` in `/v1/stats`\)", text))
        named |= set(re.findall(r"`/stats` counts them \(`(\w+)`\)", text))
    assert {"inputs_by_reference", "resent_after_redial", "refusals"} <= named
    assert named <= stats, sorted(named - stats)


# -- the performance page's bench commands -------------------------------------------------------


def bench_options() -> dict[str, set[str]]:
    """bench file -> the options its parser takes (``add_argument`` calls in the file and in the
    bench helpers it calls, such as ``bench_tasks.add_cpu_threads_option``)."""
    own: dict[str, set[str]] = {}
    helpers: dict[str, set[str]] = {}
    called: dict[str, set[str]] = {}
    for path in sorted((ROOT / "bench").glob("bench_*.py")):
        tree = ast.parse(path.read_text())
        own[path.name] = added_options(tree)
        called[path.name] = {
            n.func.id for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }  # fmt: skip
        for fn in tree.body:
            if isinstance(fn, ast.FunctionDef) and fn.name != "main" and added_options(fn):
                helpers[fn.name] = added_options(fn)
    return {
        name: opts.union(*(helpers[f] for f in called[name] if f in helpers))
        for name, opts in own.items()
    }


def added_options(tree: ast.AST) -> set[str]:
    return {
        arg.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")
    }


def test_bench_commands_in_the_docs_name_real_benches_and_options():
    benches = bench_options()
    assert "--cpu-threads" in benches["bench_input_refs.py"]  # through bench_tasks' helper
    commands = 0
    for doc in DOCS:
        for command in re.findall(r"`(?:python3? )?bench/(bench_\w+\.py[^`]*)`", flat(doc)):
            name, *words = command.split()
            commands += 1
            assert name in benches, f"{doc.name}: no bench/{name}"
            for flag in (w for w in words if w.startswith("--")):
                assert flag in benches[name], f"{doc.name}: bench/{name} takes no {flag}"
    assert commands >= 20


# -- the simulator's README ----------------------------------------------------------------------


def test_the_sim_readme_lists_the_json_document_s_keys(capsys):
    argv = ["membership", "--nodes", "2", "--joins", "0", "--crash", "0", "--duration", "1"]
    assert sim_main([*argv, "--json"]) == 0
    keys = list(json.loads(capsys.readouterr().out))
    said = flat(SIM_README).split("one JSON document (", 1)[1].split(";", 1)[0]
    assert re.findall(r"`(\w+)`", said) == keys


def test_the_sim_readme_rounding_examples_are_the_table_s():
    text = flat(SIM_README)
    examples = re.findall(r"(\d+\.\d+) s (?:shows )?as (\d+\.\d+)", text)
    assert len(examples) == 2
    for figure, shown in examples:
        assert decimal_text(float(figure), len(shown.split(".")[1])) == shown
