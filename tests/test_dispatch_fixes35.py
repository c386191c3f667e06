"""The coordinator's placement classes under ``contact_aware`` (thirty-fifth session)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from coordinator.service_dispatch import Dispatch
from meshinfer.proto.models import ModelRef
from meshinfer.proto.tasks import Tensor, WorkItem


def placement(policy: str | None, params: dict, default: str = "least_loaded") -> tuple:
    item = WorkItem(
        "t1/0",
        "t1",
        ModelRef("digits-mlp", "1"),
        Tensor.from_array(np.zeros(1, np.float32)),
        params,
    )
    service = SimpleNamespace(config=SimpleNamespace(default_policy=default))
    run = SimpleNamespace(spec=SimpleNamespace(policy=policy))
    return Dispatch._placement(service, run, SimpleNamespace(item=item))


def test_contact_aware_items_of_different_runtimes_are_different_classes() -> None:
    # A class is parked behind its first item ("if the first fits nowhere, none does") and
    # its unplaced reason is worked out once: under contact_aware an item expecting 1 s fits
    # nodes leaving in 10 s that one expecting 100 s does not (it shared the class and reason).
    short = placement("contact_aware", {"expected_runtime_s": 1.0})
    long = placement("contact_aware", {"expected_runtime_s": 100.0})
    assert short != long
    assert placement(None, {"expected_runtime_s": 1.0}, default="contact_aware") == short
    assert placement("contact_aware", {}) not in (short, long)


def test_other_policies_keep_one_class_whatever_the_runtime() -> None:
    for policy in ("least_loaded", "round_robin", "capability", "latency", "model_affinity"):
        one = placement(policy, {"expected_runtime_s": 1.0})
        assert one == placement(policy, {"expected_runtime_s": 100.0}) == placement(policy, {})
