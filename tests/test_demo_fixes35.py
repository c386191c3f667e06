"""``meshinfer demo``: a halfway kill that fails is said in the summary and fails the demo
(thirty-fifth session). The demo's pieces run on the fakes of ``test_demo_fixes34``."""

from __future__ import annotations

import json

import pytest

import meshinfer.demo as demo_module
from coordinator.client import ApiError
from meshinfer.demo import Demo, DemoOptions
from tests.test_demo_fixes34 import Cluster, Coordinator


@pytest.mark.parametrize("raised", [ApiError(503, "unavailable", "restarting"), KeyError("x")])
def test_a_failed_halfway_kill_is_recorded_not_lost_in_a_thread(tmp_path, capsys, raised) -> None:
    demo = Demo(DemoOptions(nodes=2), tmp_path)
    demo.cluster = Cluster(demo.names)

    class Failing(Coordinator):
        def stats(self) -> dict:
            raise raised

    demo.client = Failing(demo.cluster)
    demo.start_killer(demo_module.Progress(), total=0)
    demo.killer.join(10)
    assert not demo.killer.is_alive()
    # was: the thread died with a traceback and the demo went on to exit 0
    assert demo.kill_error == f"{type(raised).__name__}: {raised}"
    err = capsys.readouterr().err
    assert ("Traceback" in err) == (not isinstance(raised, ApiError))  # a fault says where


def test_the_summary_names_the_failed_kill_and_the_demo_fails(tmp_path, monkeypatch, capsys):
    summary = {
        "rows_classified": 10, "rows": 10, "tasks": 1, "accuracy": 1.0, "rows_per_s": 5.0,
        "latency": {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0}, "ensemble_state": "succeeded",
        "ensemble_accuracy": 1.0, "ensemble_s": 0.1, "killed": None, "retries": 0,
        "redispatched_after_death": 0, "duplicates_dropped": 0, "tasks_failed": [],
        "nodes": ["rsu-1"], "items_by_node": {"rsu-1": 10}, "node_status": {"rsu-1": "alive"},
        "kill_error": "ApiError: the coordinator is restarting",
    }  # fmt: skip
    monkeypatch.setattr(demo_module, "load_digits_holdout", lambda: (None, None), raising=False)
    monkeypatch.setattr(demo_module, "_run", lambda *args: summary)
    roots = iter([tmp_path / "one", tmp_path / "two"])
    monkeypatch.setattr(demo_module, "_demo_root", lambda keep: _Root(next(roots)))
    assert demo_module.run_demo(DemoOptions(nodes=2)) == 1
    out = capsys.readouterr()
    assert "the halfway kill failed: ApiError: the coordinator is restarting" in out.out
    monkeypatch.setattr(demo_module, "_run", lambda *args: {**summary, "kill_error": None})
    assert demo_module.run_demo(DemoOptions(nodes=2, json=True)) == 0
    assert json.loads(capsys.readouterr().out)["kill_error"] is None


class _Root:
    """A demo root (the demo's own makes and removes a temporary directory)."""

    def __init__(self, path) -> None:
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc: object) -> None:
        return None
