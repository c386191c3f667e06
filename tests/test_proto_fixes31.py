"""Session 31 (proto): the protocol layer imports no engine or file code; a task's time budget
is bounded (MAX_DEADLINE_S); the journal's result methods depend one way (ends on items)."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest

import coordinator.journal_items as journal_items
from coordinator import config as coord_config
from coordinator.api_errors import ApiError
from coordinator.api_requests import body_to_spec
from coordinator.journal import Journal
from coordinator.service_config import CoordinatorConfig
from meshinfer.errors import ConfigError
from meshinfer.proto.models import ModelRef, models_named
from meshinfer.proto.tasks import (
    MAX_DEADLINE_S,
    InvalidTaskError,
    Pattern,
    TaskSpec,
    outline,
)
from meshinfer.proto.tasks_codec import decode_spec, encode_spec, spec_from_dict, spec_to_dict
from meshinfer.proto.tasks_wire import Tensor

# --- layering ---------------------------------------------------------------------------------

_IMPORT_ALL_PROTO = """
import importlib, pkgutil, sys
import meshinfer.proto as proto
for module in pkgutil.iter_modules(proto.__path__):
    importlib.import_module("meshinfer.proto." + module.name)
bad = sorted(
    name for name in sys.modules
    if name.startswith(("meshinfer.inference", "meshinfer.identity_files"))
)
print(",".join(bad))
"""


def test_proto_modules_import_no_engine_or_file_code():
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL_PROTO], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"meshinfer.proto imports {done.stdout.strip()}"


def test_model_ref_is_still_importable_from_inference_base():
    from meshinfer.inference import base
    from meshinfer.proto import tasks

    assert base.ModelRef is ModelRef is tasks.ModelRef
    assert tasks.models_named is models_named
    assert str(ModelRef("digits")) == "digits@1"
    assert models_named("digits", (ModelRef("digits"), ModelRef("x", "2"))) == (ModelRef("digits"),)


# --- deadline bound ---------------------------------------------------------------------------

_INPUT = Tensor(b"\x00" * 4, "float32", (1,))


def _spec(**options) -> TaskSpec:
    return TaskSpec("t1", Pattern.SINGLE, _INPUT, (ModelRef("m"),), **options)


@pytest.mark.parametrize(
    "deadline", [1e308, MAX_DEADLINE_S + 1, 10**400], ids=["1e308", "bound+1", "int-past-float"]
)
def test_an_absurd_deadline_is_refused_naming_the_bound(deadline):
    with pytest.raises(InvalidTaskError, match=r"deadline_s .* at most MAX_DEADLINE_S = 2592000"):
        _spec(deadline_s=deadline).validate()


def test_the_bound_itself_is_accepted():
    assert MAX_DEADLINE_S == 30 * 24 * 3600
    _spec(deadline_s=MAX_DEADLINE_S).validate()
    spec = spec_from_dict(spec_to_dict(_spec(deadline_s=MAX_DEADLINE_S)))
    assert spec.deadline_s == MAX_DEADLINE_S


def test_an_absurd_aggregation_timeout_is_refused_without_a_deadline():
    spec = TaskSpec(
        "t1", Pattern.PARALLEL, _INPUT, (ModelRef("a"), ModelRef("b")), aggregation_timeout_s=1e308
    )
    with pytest.raises(InvalidTaskError, match=r"aggregation_timeout_s .* MAX_DEADLINE_S"):
        spec.validate()
    dataclasses.replace(spec, aggregation_timeout_s=MAX_DEADLINE_S).validate()


def test_the_http_body_path_refuses_an_absurd_deadline_with_a_400():
    body = {"pattern": "single", "model": "m", "inputs": {"values": [1.0]}, "deadline_s": 1e308}
    with pytest.raises(ApiError, match="MAX_DEADLINE_S") as caught:
        body_to_spec(body, lambda: "t1")
    assert caught.value.status == 400
    assert body_to_spec({**body, "deadline_s": MAX_DEADLINE_S}, lambda: "t1").deadline_s == (
        MAX_DEADLINE_S
    )


def test_a_task_journaled_before_the_bound_still_recovers_with_the_bound(tmp_path):
    """A real journal holding a spec accepted when the bound did not exist: recovery reads it
    (with the bound as its budget) instead of refusing the whole journal."""
    bounded = _spec(deadline_s=10.0)
    old = dataclasses.replace(bounded, deadline_s=1e9)
    path = tmp_path / "j.db"
    with Journal(path, synchronous="NORMAL") as journal:
        assert journal.accept(old, outline(bounded))  # (the old code journaled it unchecked)
    assert decode_spec(encode_spec(old)).deadline_s == MAX_DEADLINE_S
    with Journal(path, synchronous="NORMAL") as journal:
        (recovered,) = journal.recover()
    assert recovered.task.spec.deadline_s == MAX_DEADLINE_S
    assert [i.item_id for i in recovered.to_dispatch] == ["t1/0"]


def test_a_default_deadline_past_the_bound_is_refused_at_configuration(tmp_path):
    """In the service's config and in the coordinator's TOML file, naming the key (before,
    every submit without a deadline failed on a deadline_s the client never gave)."""
    with pytest.raises(ConfigError, match="default_deadline_s must be at most 2592000"):
        CoordinatorConfig(default_deadline_s=MAX_DEADLINE_S + 1)
    assert CoordinatorConfig(default_deadline_s=MAX_DEADLINE_S).default_deadline_s > 0
    path = tmp_path / "coordinator.toml"
    path.write_text(f"[coordinator]\ndefault_deadline_s = {MAX_DEADLINE_S + 1}\n")
    with pytest.raises(ConfigError, match=r"\[coordinator\] default_deadline_s must be at most"):
        coord_config.load_config(path)


# --- journal: one-way dependency between its result methods ---------------------------------


def test_item_progress_never_calls_back_into_task_ends():
    source = inspect.getsource(journal_items)
    assert "take_result" not in source and "journal_ends" not in source.replace(
        ":mod:`coordinator.journal_ends`", ""
    )
    assert not hasattr(journal_items.ItemProgress, "record_result")


def test_record_result_still_accepts_once(tmp_path):
    spec = _spec()
    with Journal(tmp_path / "j.db", synchronous="NORMAL") as journal:
        journal.accept(spec)
        journal.mark_dispatched("t1/0", "n1", 1)
        assert journal.record_result("t1/0", 1, b"r", node="n1") is True
        assert journal.record_result("t1/0", 1, b"r", node="n1") is False
        assert journal.get("t1").items[0].state == "succeeded"
