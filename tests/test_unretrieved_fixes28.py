"""Outcomes nobody retrieves (session 28): futures and tasks that can end with an exception no
code looks at, on paths a killed, restarted or disconnected peer or coordinator reaches. asyncio
logs each at ERROR ("Future exception was never retrieved", "Task exception was never
retrieved") when it is collected, and CI's chaos and process tests fail on any ERROR line.

Each test records what the loop reports through its exception handler (:func:`reported`),
collects garbage, and asserts that nothing was reported. Real coordinator and node daemons in
this process (``tests.test_coordinator_service.Mesh``), real SQLite and loopback TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator

import pytest

from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.tasks_wire import FailureKind, TaskFailed
from tests.helpers import until
from tests.test_coordinator_service import Mesh, hold_inference, spec


@contextlib.contextmanager
def reported() -> Iterator[list[str]]:
    """The messages the running loop's exception handler gets meanwhile (what asyncio would
    log at ERROR), garbage collected first so that a dropped future is reported now."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    before = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context["message"]))
    try:
        yield seen
        gc.collect()
    finally:
        loop.set_exception_handler(before)


# --- 1. coordinator: a retry after the coordinator closed ---------------------------------------


async def test_a_hand_back_after_the_coordinator_closed_leaves_no_unretrieved_future(tmp_path):
    """SIGTERM of the coordinator: ``Coordinator.aclose`` closes its steps and its journal
    writer, then the daemon's ``mesh.leave`` runs for up to 2 s with the peer table still
    dispatching. A draining node hands its items back meanwhile (a retryable SHUTTING_DOWN
    TaskFailed; a node leaving or dying does the same through ``_on_member``)."""
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1) as mesh:
        gate = hold_inference(mesh.daemons["node-0"])
        c = mesh.coordinator
        await c.submit(spec("late-refusal", "single", x[:1]))
        await until(lambda: any(e.node for _, e in c._items.values()))
        item_id, (_, entry) = next(iter(c._items.items()))
        node, attempt = entry.node, entry.attempt
        with reported() as seen:
            await c.aclose()
            retries = c.stats_.retries
            refusal = TaskFailed(item_id, attempt, int(FailureKind.SHUTTING_DOWN), "draining", True)
            c._on_failed(node, refusal)
            assert c.stats_.retries == retries  # no retry once closed: recovery runs it again
        gate.set()
    assert seen == []


async def test_a_call_refused_by_a_closed_writer_is_a_warning_not_an_unretrieved_future():
    from coordinator.journal_writer import JournalWriter
    from meshinfer.errors import LocalProtocolError

    writer = JournalWriter(lambda: None)
    assert await writer.run(lambda: 1) == 1
    await writer.aclose()
    with reported() as seen:
        writer.call(lambda: 2)  # dropped, as a caller that goes no further does
        kept = writer.call(lambda: 3)
        with pytest.raises(LocalProtocolError):  # one awaited still hears why
            await kept
    assert seen == []


# --- 2. mDNS: a zeroconf announcement that failed -----------------------------------------------


def failed_future(text: str) -> asyncio.Future[None]:
    future = asyncio.get_running_loop().create_future()
    future.set_exception(OSError(text))
    return future


async def test_announcements_that_failed_are_retrieved_when_kept_ones_are_pruned_and_at_close():
    """zeroconf's broadcast tasks do not raise today; one that did would be reported as never
    retrieved once mdns dropped it from its list (pruned at the next announcement) or cancelled
    the rest at close."""
    from meshinfer.discovery.mdns import _cancel_all, _unfinished

    with reported() as seen:
        running = asyncio.get_running_loop().create_future()
        assert _unfinished([failed_future("announce 1"), running]) == [running]
        await _cancel_all([failed_future("announce 2"), running])
        assert running.cancelled()
    assert seen == []
