"""The daemons' garbage collector, settled once a daemon is ready.

A daemon allocates most of what it keeps for good while it starts: modules, models, the mesh's
tables, the journal's connection. CPython's cyclic collector walks every tracked object in
each full collection, so under load a daemon kept re-walking its start-up heap a few times a
second, and the task that happened to run then waited for it (the p99 of a busy coordinator).
:func:`settle_heap` runs once, after the start: a full collection, then :func:`gc.freeze` (what
is alive now is never walked again), then a higher first-generation threshold, so the
short-lived objects of each task (messages, futures, records) are collected in fewer, larger
rounds. Reference counting frees all of them as before; only cycles wait for a collection, and
a cycle among the frozen start-up objects is never collected (they live as long as the daemon).
"""

from __future__ import annotations

import gc

__all__ = ["FIRST_GENERATION_THRESHOLD", "settle_heap"]

#: Allocations (net of frees) between two collections of the youngest generation; CPython's
#: default is 700. Higher means fewer collections of the same objects, and older generations
#: (whose thresholds count younger collections) collected less often in proportion.
FIRST_GENERATION_THRESHOLD = 10_000


def settle_heap() -> None:
    """Collect once, freeze what survives (never walked again), raise the first threshold.
    For a daemon's process once it is ready; process-wide, so not for library code."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(FIRST_GENERATION_THRESHOLD, second, third)
