"""Layering fixes (session 31): ``meshinfer/proto/`` reads no files, and the coordinator's
OpenAPI document takes a task name's pattern and the priority range from the task validator."""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import numpy as np
import pytest

import meshinfer.proto
from meshinfer.errors import ConfigError
from meshinfer.identity_files import FleetDirectory, NodeDirectory, enroll
from meshinfer.proto.identity import NodeIdentity
from meshinfer.proto.models import ModelRef
from meshinfer.proto.tasks import InvalidTaskError, Pattern, Stage, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime.startup import load_identity

PROTO = Path(meshinfer.proto.__file__).parent
_IN = Tensor.from_array(np.ones((2, 2), np.float32))
_M = (ModelRef("m"),)


# --- Task A: proto/ holds no file I/O -----------------------------------------------------------


def _imported_modules(source: str, package: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` anywhere in ``source`` names (relative
    imports resolved against ``package``; ``from a import b`` also counts as ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_import_scan_sees_a_lazy_import_inside_a_method() -> None:
    source = "class A:\n    def load(self):\n        from ..identity_files import X\n"
    assert "meshinfer.identity_files" in _imported_modules(source, "meshinfer.proto")


def test_no_module_under_proto_imports_the_identity_files() -> None:
    offenders = []
    for path in sorted(PROTO.rglob("*.py")):
        package = "meshinfer." + ".".join(path.relative_to(PROTO.parent).parent.parts)
        modules = _imported_modules(path.read_text(encoding="utf-8"), package)
        if any(m == "meshinfer.identity_files" or m.startswith("meshinfer.identity_files.")
               for m in modules):  # fmt: skip
            offenders.append(path.name)
    assert offenders == []


def test_node_identity_has_no_load_the_node_directory_reads_it() -> None:
    assert not hasattr(NodeIdentity, "load")
    assert callable(NodeDirectory.load)


def _enrolled(tmp_path: Path) -> tuple[FleetDirectory, NodeDirectory]:
    fleet = FleetDirectory.init(tmp_path / "fleet", "layers")
    node = NodeDirectory(tmp_path / "node")
    enroll(fleet, node, "car-1", frozenset({"vehicle"}), now=time.time() - 60, lifetime_s=86400)
    return fleet, node


def test_the_daemons_load_an_identity_directory_given_as_text(tmp_path: Path) -> None:
    fleet, node = _enrolled(tmp_path)
    identity = load_identity(str(node.path), "[node] identity_dir")  # (a TOML value: text)
    assert identity.node_id == "car-1" and identity.certificate == fleet.issued()[0]
    with pytest.raises(ConfigError, match=r"^\[node\] identity_dir: .*not found"):
        load_identity(str(tmp_path / "nowhere"), "[node] identity_dir")


# --- Task B: one source for a task name's pattern and the priority range -----------------------


def _schemas() -> dict:
    from coordinator.openapi import openapi_document

    return openapi_document()["components"]["schemas"]


def test_the_openapi_document_takes_the_name_pattern_and_priority_range_from_tasks() -> None:
    from meshinfer.proto.tasks import MAX_PRIORITY, MIN_PRIORITY, NAME_PATTERN

    assert (MIN_PRIORITY, MAX_PRIORITY) == (-(2**31), 2**31 - 1)
    submission = _schemas()["TaskSubmission"]["properties"]
    stage = _schemas()["Stage"]["properties"]
    assert submission["task_id"]["pattern"] == stage["name"]["pattern"] == f"^{NAME_PATTERN}$"
    priority = submission["priority"]
    assert (priority["minimum"], priority["maximum"]) == (MIN_PRIORITY, MAX_PRIORITY)


def _spec(task_id: str = "t", priority: int = 0, stage: str | None = None) -> TaskSpec:
    if stage is None:
        return TaskSpec(task_id, Pattern.SINGLE, _IN, _M, priority=priority)
    return TaskSpec(task_id, Pattern.PIPELINE, _IN, stages=(Stage(stage, _M[0]),))


@pytest.mark.parametrize("name", ["a" * 64, "A0_.:-", "9"])
def test_a_name_the_document_allows_is_accepted(name: str) -> None:
    pattern = _schemas()["TaskSubmission"]["properties"]["task_id"]["pattern"]
    assert re.search(pattern, name)
    _spec(task_id=name).validate()
    _spec(stage=name).validate()


@pytest.mark.parametrize("name", ["a" * 65, "_a", "", "a b", "a/b", "-a"])
def test_a_name_just_outside_the_pattern_is_refused_by_both(name: str) -> None:
    pattern = _schemas()["TaskSubmission"]["properties"]["task_id"]["pattern"]
    assert not re.search(pattern, name)
    with pytest.raises(InvalidTaskError, match="task_id"):
        _spec(task_id=name).validate()
    with pytest.raises(InvalidTaskError, match="stage"):
        _spec(stage=name).validate()


def test_the_priority_bounds_are_inclusive_and_one_past_either_is_refused() -> None:
    from meshinfer.proto.tasks import MAX_PRIORITY, MIN_PRIORITY

    _spec(priority=MIN_PRIORITY).validate()
    _spec(priority=MAX_PRIORITY).validate()
    for outside in (MIN_PRIORITY - 1, MAX_PRIORITY + 1):
        with pytest.raises(InvalidTaskError, match="priority"):
            _spec(priority=outside).validate()
