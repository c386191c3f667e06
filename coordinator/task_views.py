"""Text views of the coordinator's answers for ``meshinfer-coord``: the ``tasks``, ``nodes``
and ``revocations`` tables, the ``status`` and ``stats`` views, what ``submit --wait`` prints
(:func:`render_result`) and its progress bar line. Pure functions of the API documents.
"""

from __future__ import annotations

import datetime
import time
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from coordinator.client import TERMINAL_STATES

__all__ = [
    "ID_WIDTH",
    "NAME_WIDTH",
    "PROGRESS_WIDTH",
    "aggregation_text",
    "count_text",
    "deadline_text",
    "display_width",
    "fit",
    "format_table",
    "one_line",
    "progress_line",
    "render_nodes",
    "render_result",
    "render_revocations",
    "render_stats",
    "render_task",
    "render_tasks",
    "result_lines",
    "utc_iso",
    "waiting_lines",
]

PROGRESS_WIDTH = 30
#: The widest a table shows a task id (the API's longest, 64: a valid one is never cut) and
#: an item id, model or node name (longer ones are cut to this with ``...``; ``--json`` shows
#: every one whole): one long name no longer widens every row of its table.
ID_WIDTH = 64
NAME_WIDTH = 48


def utc_iso(seconds: float | None) -> str:
    """Unix seconds as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC); ``-`` for None; a moment past what a
    date can show (the end of any positive, finite ``deadline_s`` the API accepts) as
    ``unix SECONDS``."""
    if seconds is None:
        return "-"
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (ValueError, OverflowError, OSError):  # past year 9999, or past the C library's
        return f"unix {seconds:g}"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    right=(),
    widest: Mapping[str, int] | None = None,
) -> str:
    """Columns padded to their widest cell; columns named in ``right`` are right-aligned; a
    cell of a column named in ``widest`` longer than its width there is cut to it (``...``).
    Widths are terminal columns (:func:`display_width`): a wide character takes two."""
    limits = [(widest or {}).get(h) for h in headers]
    cells = [[str(h) for h in headers]] + [
        [_cut("-" if c is None else str(c), w) for c, w in zip(r, limits, strict=True)]
        for r in rows
    ]
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [
            _pad(cell, w, headers[i] in right)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _pad(cell: str, width: int, right: bool) -> str:
    blank = " " * (width - display_width(cell))
    return blank + cell if right else cell + blank


def _cut(text: str, width: int | None) -> str:
    return text if width is None else fit(text, width)


def display_width(text: str) -> int:
    """The terminal columns ``text`` (printable: see :func:`coordinator.client.printable`)
    takes: two for a wide or full-width character (East Asian), none for a combining mark."""
    if text.isascii():
        return len(text)
    return sum(_char_width(c) for c in text)


def _char_width(char: str) -> int:
    if unicodedata.category(char) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def fit(text: str, columns: int) -> str:
    """``text`` if it takes at most ``columns`` terminal columns, else its start ending in
    ``...`` in that many (or fewer: a wide character is not split)."""
    if display_width(text) <= columns:
        return text
    dots = "..." if columns > 3 else ""
    room, kept = columns - len(dots), []
    for char in text:
        room -= _char_width(char)
        if room < 0:
            break
        kept.append(char)
    return "".join(kept) + dots


def count_text(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def one_line(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 3] + "..."


def render_tasks(page: dict[str, Any]) -> str:
    """The ``tasks`` table of a GET /v1/tasks page (and how to get the next one)."""
    tasks = page["tasks"]
    if not tasks:
        return "no tasks"
    rows = [
        (
            t["task_id"],
            t["state"],
            t["pattern"],
            t["priority"],
            f"{t['items_done']}/{t['items_total']}",
            utc_iso(t["created_at"]),
            one_line(t.get("error"), 40),
        )
        for t in tasks
    ]
    headers = ("TASK", "STATE", "PATTERN", "PRIO", "ITEMS", "CREATED (UTC)", "ERROR")
    text = format_table(headers, rows, right={"PRIO", "ITEMS"}, widest={"TASK": ID_WIDTH})
    if page.get("next_cursor"):
        text += f"\n(more: --cursor {page['next_cursor']}, or --all)"
    return text


def render_task(doc: dict[str, Any]) -> str:
    """The ``status`` view: the task's fields, its items as a table, and its result."""
    took = doc["updated_at"] - doc["created_at"]
    lines = [
        f"task      {doc['task_id']}",
        f"state     {doc['state']}",
        f"pattern   {doc['pattern']}, priority {doc['priority']}, policy {doc['policy'] or '-'}",
        f"created   {utc_iso(doc['created_at'])}   updated {utc_iso(doc['updated_at'])}"
        f" ({took:.2f} s later)",
        f"items     {doc['items_done']}/{doc['items_total']} done",
    ]
    if doc.get("deadline_s") is not None:
        lines.append(f"deadline  {deadline_text(doc)}")
    if doc.get("aggregation"):
        lines.append(f"aggregate {aggregation_text(doc['aggregation'])}")
    if doc.get("error"):
        lines.append(f"error     {one_line(doc['error'], 200)}")
    items = doc.get("items") or []
    if items:
        rows = [
            (i["item_id"], i["state"], i.get("model"), i.get("node"), _attempt_text(i),
             one_line(f"waiting: {i['waiting']}" if i.get("waiting") else i.get("error"), 80))
            for i in items
        ]  # fmt: skip
        headers = ("ITEM", "STATE", "MODEL", "NODE", "ATTEMPT", "ERROR / WAITING")
        widest = {"ITEM": ID_WIDTH, "MODEL": NAME_WIDTH, "NODE": NAME_WIDTH}
        lines += ["", format_table(headers, rows, right={"ATTEMPT"}, widest=widest)]
    if doc.get("result"):
        lines += ["", *result_lines(doc["result"], 20)]
    return "\n".join(lines)


def _attempt_text(item: dict[str, Any]) -> str:
    """``3``, or ``3 (2 refused)`` for an item whose node refused (or never got) some attempts."""
    refused = item.get("refused") or 0
    return f"{item.get('attempt')}" + (f" ({refused} refused)" if refused else "")


def aggregation_text(aggregation: dict[str, Any]) -> str:
    """``ensemble, quorum 2, timeout 1.5 s, weights a@1=2`` (options left at their default are
    not shown)."""
    parts = [str(aggregation.get("mode") or "-")]
    for key, label in (("quorum", "quorum"), ("min_responses", "min responses")):
        if aggregation.get(key) is not None:
            parts.append(f"{label} {aggregation[key]}")
    if aggregation.get("timeout_s") is not None:
        parts.append(f"timeout {aggregation['timeout_s']:g} s")
    weights = aggregation.get("weights") or {}
    if weights:
        parts.append("weights " + " ".join(f"{m}={w:g}" for m, w in sorted(weights.items())))
    return ", ".join(parts)


def deadline_text(doc: dict[str, Any]) -> str:
    """``30 s, until 2026-11-23T10:00:30Z`` for a task with a deadline."""
    return f"{doc['deadline_s']:g} s, until {utc_iso(doc.get('expires_at'))}"


def waiting_lines(doc: dict[str, Any], show: int = 3) -> list[str]:
    """``waiting: <why> (N items)`` for the most common reasons live items are on no node."""
    reasons = Counter(i["waiting"] for i in doc.get("items") or () if i.get("waiting"))
    lines = [f"waiting: {why} ({count_text(n, 'item')})" for why, n in reasons.most_common(show)]
    if len(reasons) > show:
        lines.append(f"waiting: ... and {len(reasons) - show} other reasons")
    return lines


def render_result(doc: dict[str, Any], show: int = 20, *, now: float | None = None) -> str:
    """What ``submit --wait`` prints: the outcome line, then labels, outputs and nodes. A task
    still live shows its age (``now`` - created; ``now`` defaults to the wall clock)."""
    live = doc["state"] not in TERMINAL_STATES
    end = doc["updated_at"] if not live else time.time() if now is None else now
    took = end - doc["created_at"]
    head = (
        f"task {doc['task_id']}: {doc['state']} ({doc['pattern']}, "
        f"{doc['items_done']}/{doc['items_total']} items, {took:.2f} s{' so far' if live else ''})"
    )
    lines = [head]
    if live:
        lines.append("still running: see `meshinfer-coord status " + doc["task_id"] + "`")
        lines += waiting_lines(doc)
    if doc.get("error"):
        lines.append(f"error: {one_line(doc['error'], 200)}")
    if doc.get("result"):
        lines += result_lines(doc["result"], show)
    return "\n".join(lines)


def result_lines(result: dict[str, Any], show: int) -> list[str]:
    lines = []
    labels = result.get("labels")
    if labels is not None:
        shown = labels[: max(0, show)]
        first = f"; first {len(shown)}: " + " ".join(map(str, shown)) if shown else ""
        lines.append(f"labels: {len(labels)} rows{first}")
        counts = sorted(Counter(labels).items())
        lines.append("counts: " + "  ".join(f"{label}:{n}" for label, n in counts))
    for i, out in enumerate(result.get("outputs") or []):
        lines.append(f"output {i}: {out['dtype']} {out['shape']}")
    nodes = Counter((result.get("nodes") or {}).values())
    if nodes:
        lines.append(
            "nodes: "
            + ", ".join(f"{n} ({count_text(k, 'item')})" for n, k in sorted(nodes.items()))
        )
    aggregation = result.get("aggregation")
    if aggregation:
        sources = ", ".join(map(str, aggregation.get("sources") or [])) or "-"
        lines.append(
            f"aggregation: {aggregation.get('mode')} of {sources}"
            + (" (partial)" if aggregation.get("partial") else "")
            + (f", {aggregation['tied']} tied" if aggregation.get("tied") else "")
            + (f", {aggregation['abstained']} with no vote" if aggregation.get("abstained") else "")
        )
    return lines


def render_nodes(doc: dict[str, Any]) -> str:
    """The ``nodes`` table of a GET /v1/nodes answer (a node that left or died has no queue
    depth: ``-``; nor has one whose round trip was not measured yet, or a coordinator's answer
    from before ``rtt_ms``, an RTT; nor a contact time, ``CONTACT S``, one whose ``contact_s``
    is unknown: see :mod:`meshinfer.proto.contact`)."""
    nodes = doc["nodes"]
    if not nodes:
        return "no nodes"
    rows = [
        (
            n["node_id"],
            n["status"],
            ",".join(n["roles"]) or "-",
            n["address"],
            None if (rtt := n.get("rtt_ms")) is None else f"{rtt:.1f}",
            None if (contact := n.get("contact_s")) is None else f"{contact:.1f}",
            n["queue_depth"],
            n["in_flight"],
            n["done"],
            ",".join(n["models"]) or "-",
        )
        for n in nodes
    ]
    headers = (
        "NODE", "STATUS", "ROLES", "ADDRESS", "RTT MS", "CONTACT S", "QUEUE", "IN FLIGHT",
        "DONE", "MODELS",
    )  # fmt: skip
    right = {"RTT MS", "CONTACT S", "QUEUE", "IN FLIGHT", "DONE"}
    widest = {"NODE": NAME_WIDTH, "ADDRESS": NAME_WIDTH, "MODELS": ID_WIDTH}
    return format_table(headers, rows, right=right, widest=widest)


def render_stats(doc: dict[str, Any]) -> str:
    """The ``stats`` view of a GET /v1/stats answer."""

    def by_key(counts: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"

    return "\n".join(
        [
            f"tasks              {by_key(doc['tasks'])}",
            f"items              {by_key(doc['items'])}",
            f"live tasks         {doc['live_tasks']}, parked items {doc['parked_items']}",
            f"dispatched         {doc['dispatched']}, retries {doc['retries']} "
            f"({doc.get('refusals', 0)} refused), "
            f"redispatched after a node death {doc['redispatched_after_death']}",
            # (every result the journal refused, not only duplicates: its counters say why)
            f"refused results    {doc['duplicates']} "
            "(duplicate, late or unknown: see the journal counters)",
            f"inputs by ref      {doc.get('inputs_by_reference', 0)}, "
            f"{doc.get('input_bytes_saved', 0) / 2**20:.1f} MiB not sent, "
            f"{doc.get('input_cache_misses', 0)} sent again",
            f"done by node       {by_key(doc['completed_by_node'])}",
            f"journal counters   {by_key(doc.get('journal_counters') or {})}",
        ]
    )


def progress_line(doc: dict[str, Any], columns: int | None = None) -> str:
    """``[#####.....] done/total items  state`` for a task, and why its items wait if they
    do (the most common reason); cut to ``columns`` terminal columns if given (:func:`fit`).
    The bar stays :data:`PROGRESS_WIDTH` wide whatever counts the coordinator sent."""
    total, done = doc["items_total"], doc["items_done"]
    filled = PROGRESS_WIDTH * done // total if total > 0 else PROGRESS_WIDTH
    filled = min(PROGRESS_WIDTH, max(0, filled))
    bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
    line = f"[{bar}] {done}/{total} items  {doc['state']:<10}"
    why = waiting_lines(doc, show=1)
    line = f"{line}  {one_line(why[0], 70)}" if why else line
    return line if columns is None else fit(line, columns)


def render_revocations(doc: dict[str, Any]) -> str:
    """The ``revocations`` view: the list's version and entries (and whether a push merged)."""
    merged = doc.get("merged")
    head = f"revocation list version {doc['version']}" + (
        "" if merged is None else (" (merged)" if merged else " (nothing new)")
    )
    rows = [
        (
            e["sequence"],
            f"serial {e['serial']}" if e["serial"] is not None else f"node {e['node_id']}",
            utc_iso(e["revoked_at"]),
            e["reason"] or "-",
        )
        for e in doc["entries"]
    ]
    if not rows:
        return head + ": no certificate revoked"
    return head + "\n" + format_table(("SEQ", "REVOKES", "AT", "REASON"), rows, right={"SEQ"})
