"""The steady task path leaves no reference cycles behind (session 37).

A closure of ``NodeAnswers._take_result`` that called itself was a cycle per result (the
function, its cell, the result's message and encoded blob), freed only by the cyclic collector:
~7 % more coordinator CPU per task and a longer p99 in ``bench/bench_tasks.py`` FULL/64. Here
the collector is kept off while real tasks run through a coordinator and a node daemon (this
process, real SQLite and loopback TCP) and every unreachable object is kept
(``gc.DEBUG_SAVEALL``): none may be a function of this project or an instance of one of
its classes.
"""

from __future__ import annotations

import gc
import types

import pytest

from meshinfer.inference.registry import ModelRef, load_digits_holdout
from tests.test_coordinator_service import DIGITS, Mesh, spec

TASKS = 16
TWO_MODELS = (DIGITS, ModelRef("synthetic-mlp", "w64-d2"))
EXTRA = '[inference]\nmodels = ["digits-mlp@1", "synthetic-mlp@w64-d2"]\n'
#: pattern, rows, the spec's other fields
KINDS = {
    "single": ("single", 2, {}),
    "batch": ("batch", 12, {"shard_size": 3}),
    "parallel-ensemble": ("parallel", 4, {"models": TWO_MODELS, "aggregation": "ensemble"}),
    "parallel-majority": ("parallel", 4, {"models": TWO_MODELS, "aggregation": "majority"}),
}


OURS = ("coordinator", "node", "meshinfer")


def _ours(obj: object) -> str | None:
    """``obj`` described, if it is a function defined in this project or an instance of one
    of its classes (a wire message, a run, an entry...)."""
    if isinstance(obj, types.FunctionType):
        module = obj.__module__ or ""
        if module.split(".")[0] in OURS:
            return f"function {module}.{obj.__qualname__}"
    kind = type(obj)
    if kind.__module__.split(".")[0] in OURS:
        return f"{kind.__module__}.{kind.__qualname__}"
    return None


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_tasks_leave_no_cycles_of_the_task_path(tmp_path, kind):
    pattern, rows, fields = KINDS[kind]
    x, _ = load_digits_holdout()

    def task(name: str):
        return spec(name, pattern, x[:rows], **fields)

    async with Mesh(tmp_path, n=2, extra=EXTRA) as mesh:
        c = mesh.coordinator
        for warm in range(4):  # first-use caches, lazy imports, the session's first frames
            await c.wait(await c.submit(task(f"warm{warm}")), timeout=10)
        gc.collect()
        flags, enabled = gc.get_debug(), gc.isenabled()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            del gc.garbage[:]
            for n in range(TASKS):
                record = await c.wait(await c.submit(task(f"t{n}")), timeout=10)
                assert record.state.value == "succeeded", record.summary.error
            gc.collect()
            found = sorted({d for d in map(_ours, gc.garbage) if d is not None})
        finally:
            gc.set_debug(flags)
            del gc.garbage[:]
            if enabled:
                gc.enable()
    assert found == [], f"reference cycles per task: {found}"
