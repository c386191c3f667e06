"""The documents the coordinator's HTTP API answers with: tasks (:func:`task_doc`, as listed:
:func:`summary_doc`), output tensors (:func:`tensor_to_json`), the revocation list, and the
``meshinfer_coord_*`` metric families of ``/metrics`` (:func:`coordinator_families`).

Each is plain JSON (:func:`json_safe`): the OpenAPI document (:mod:`coordinator.openapi`) holds
the schema of each, and tests hold the answers to them. Pure functions: none touches the loop.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from coordinator.journal import ItemRecord, TaskRecord, TaskSummary
from meshinfer.proto.identity import RevocationList
from meshinfer.proto.tasks import Pattern, TaskSpec, TaskState
from meshinfer.runtime.metrics import MetricFamily, family

__all__ = [
    "aggregation_doc",
    "coordinator_families",
    "item_doc",
    "json_safe",
    "revocations_doc",
    "revocations_doc_bytes",
    "summary_doc",
    "task_doc",
    "tensor_to_json",
]

_STATES = tuple(s.value for s in TaskState)


# --- tasks -----------------------------------------------------------------------------------


def summary_doc(summary: TaskSummary) -> dict[str, Any]:
    """A task as listed."""
    return {
        "task_id": summary.task_id, "state": summary.state.value, "pattern": summary.pattern,
        "priority": summary.priority, "policy": summary.policy,
        "created_at": summary.created_at, "updated_at": summary.updated_at,
        "error": summary.error, "items_total": summary.items_total,
        "items_done": summary.items_done,
    }  # fmt: skip


def item_doc(item: ItemRecord, waiting: str | None = None) -> dict[str, Any]:
    """One work item of a task document; ``waiting``: why it is on no node (live items)."""
    return {
        "item_id": item.item_id, "state": item.state.value, "node": item.node,
        "attempt": item.attempt, "refused": item.refused, "error": item.error,
        "model": str(item.model),
        "stage": item.stage or None, "position": item.position,
        "has_result": item.result is not None, "waiting": waiting,
    }  # fmt: skip


def tensor_to_json(array: np.ndarray) -> dict[str, Any]:
    """An output array as ``{"dtype", "shape", "data_b64"}`` (C order, little-endian)."""
    wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    data = base64.b64encode(wire.tobytes()).decode("ascii")
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data_b64": data}


def task_doc(
    record: TaskRecord,
    result: dict[str, Any] | None,
    *,
    outputs: bool,
    waiting: Mapping[str, str] | None = None,
    default_aggregation: str | None = None,
) -> dict:
    """The document of GET /v1/tasks/{id}: summary, deadline, aggregation (a parallel task's:
    ``default_aggregation`` stands for a mode the task left to the coordinator), items (with
    why those on no node wait, from ``waiting``) and result (outputs optional)."""
    doc = summary_doc(record.summary)
    deadline = record.spec.deadline_s
    doc["deadline_s"] = deadline
    doc["expires_at"] = None if deadline is None else record.summary.created_at + deadline
    doc["aggregation"] = aggregation_doc(record.spec, default_aggregation)
    waiting = waiting or {}
    doc["items"] = [item_doc(i, waiting.get(i.item_id)) for i in record.items]
    doc["result"] = None
    if result is not None:
        doc["result"] = {
            "labels": result.get("labels"),
            "nodes": json_safe(result.get("nodes") or {}),
            "aggregation": json_safe(result.get("aggregation")),
        }
        if outputs:
            doc["result"]["outputs"] = [tensor_to_json(a) for a in result.get("outputs", [])]
    return doc


def aggregation_doc(spec: TaskSpec, default_mode: str | None) -> dict[str, Any] | None:
    """How a parallel task aggregates, as accepted (None for the other patterns): the mode
    (``default_mode`` when it named none), its options (null: the default) and weights."""
    if spec.pattern != Pattern.PARALLEL:
        return None
    return {
        "mode": spec.aggregation or default_mode, "quorum": spec.quorum,
        "min_responses": spec.min_responses, "timeout_s": spec.aggregation_timeout_s,
        "weights": {str(ref): weight for ref, weight in spec.weights.items()},
    }  # fmt: skip


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists, bytes as base64, NumPy scalars as numbers, keys as str."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- certificate revocations ----------------------------------------------------------------


def revocations_doc(listed: RevocationList) -> dict[str, Any]:
    """``{"version", "entries": [...]}`` of a revocation list, oldest entry first."""
    return {"version": listed.version, "entries": listed.records()}


def revocations_doc_bytes(listed: RevocationList) -> int:
    """About how large ``listed``'s JSON document is (a long list is built off the loop)."""
    return 300 * len(listed.entries)


# --- metrics ---------------------------------------------------------------------------------


def coordinator_families(stats: Mapping[str, Any], nodes: list[dict]) -> list[MetricFamily]:
    """``meshinfer_coord_*`` families from :meth:`Coordinator.stats` and :meth:`.nodes`."""
    tasks, items = stats.get("tasks", {}), stats.get("items", {})
    by_status: dict[str, int] = {}
    for node in nodes:
        by_status[node["status"]] = by_status.get(node["status"], 0) + 1
    counters = [
        ("dispatched", "Work items sent to nodes."),
        ("retries", "Work item attempts retried."),
        ("refusals", "Retried attempts a node refused, handed back or never got (uncounted)."),
        ("duplicates", "Results refused: duplicate, late, unknown or unexpected."),
        ("foreign_results", "Results refused: their attempt went to another node."),
        ("redispatched_after_death", "Items re-sent after their node died or left."),
        ("redispatched_after_disconnect", "Items re-sent after their node's session was lost."),
        ("sessions_lost", "Node sessions that ended lost (no Close frame, or silent)."),
        ("redials_ok", "Lost node sessions whose node then answered a ping."),
        ("resent_after_redial", "Items sent again to a node reachable after a lost session."),
        ("inputs_by_reference", "Items sent naming their input by sha256, not its bytes."),
        ("input_bytes_saved", "Input bytes not sent because the node kept them."),
        ("input_cache_misses", "Inputs named by reference that the node no longer held."),
        ("stale_tells", "Dispatch or running marks of items that had ended (a race; no loss)."),
    ]
    return [
        family("meshinfer_coord_tasks", "gauge", "Journaled tasks by state.",
               [({"state": s}, tasks.get(s, 0)) for s in _STATES]),
        family("meshinfer_coord_items", "gauge", "Journaled work items by state.",
               [({"state": s}, items.get(s, 0)) for s in _STATES]),
        *(family(f"meshinfer_coord_{name}_total", "counter", text, [({}, stats.get(name, 0))])
          for name, text in counters),
        family("meshinfer_coord_journal_events_total", "counter",
               "Journal counters (refused results, ignored failures) by name.",
               [({"name": k}, v) for k, v in sorted(stats.get("journal_counters", {}).items())]),
        family("meshinfer_coord_completed_total", "counter", "Work items completed by node"
               " (nodes long gone are folded into the node (gone)).",
               [({"node": k}, v) for k, v in sorted(stats.get("completed_by_node", {}).items())]),
        family("meshinfer_coord_live_tasks", "gauge", "Tasks in flight.",
               [({}, stats.get("live_tasks", 0))]),
        family("meshinfer_coord_parked_items", "gauge", "Items waiting for a capable node.",
               [({}, stats.get("parked_items", 0))]),
        family("meshinfer_coord_nodes_alive", "gauge", "Members the coordinator sees alive.",
               [({}, by_status.get("alive", 0))]),
        family("meshinfer_coord_nodes", "gauge", "Members by status.",
               [({"status": s}, n) for s, n in sorted(by_status.items())]),
    ]  # fmt: skip
