"""Journal faults found in session 34's review, each with the test that failed before its fix.

* Recovery requeued an item in flight with attempt + 1 and nothing else, so every coordinator
  restart while an item ran used one of its ``max_attempts`` though nothing failed. The journal
  can now count such a requeue as a refusal (``recover(max_refused=...)``), capped as the
  coordinator caps refusals, so a coordinator crashing on an item for ever still ends it.
* A journal whose database file or write-ahead log was removed (or replaced) while open went on
  answering commits as durable: SQLite writes on into the files it has open, so every commit
  since was lost even to a mere process crash. The sync now checks both are still in place, and
  a close after a removed log merges the log it has open (the only copy) into the file.
* The writer's thread dying in ``_next_group`` (a bug) settled the group before it again (a
  told call that had succeeded was logged as failed) and lost the calls it had taken from the
  queue (their callers waited for ever).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets

import numpy as np
import pytest

from coordinator.journal import Journal
from coordinator.journal_writer import JournalWriter
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.identity_files import NodeDirectory
from meshinfer.inference.base import ModelRef
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.cluster import LocalCluster

_INPUT = Tensor.from_array(np.arange(8, dtype=np.float32).reshape(4, 2))


def single(task_id: str) -> TaskSpec:
    return TaskSpec(task_id, Pattern.SINGLE, _INPUT, (ModelRef("m"),))


# --- recovery: a requeue is no failure -----------------------------------------------------------


def _restart(path, max_refused: int) -> tuple[int, int]:
    """Reopen the journal, recover, and send the one item again: its (attempt, refused)."""
    with Journal(path) as journal:
        (recovered,) = journal.recover(max_refused=max_refused)
        (item,) = recovered.to_dispatch
        journal.mark_dispatched(item.item_id, "veh-1", item.attempt)
        return item.attempt, item.refused


def test_a_requeue_at_recovery_counts_as_refused_up_to_max_refused(tmp_path):
    path = tmp_path / "j.db"
    with Journal(path) as journal:
        journal.submit(single("t"))
        (item_id,) = [i.item_id for i in journal.get("t").items]
        journal.mark_dispatched(item_id, "veh-0", 1)
    assert _restart(path, max_refused=2) == (2, 1)  # attempt - refused: still 1 counted
    assert _restart(path, max_refused=2) == (3, 2)
    assert _restart(path, max_refused=2) == (4, 2)  # the cap: from now on a restart counts
    with Journal(path) as journal:
        assert [e.kind for e in journal.history("t")].count("requeued") == 3


def test_recovery_by_default_counts_a_requeue_as_an_attempt(tmp_path):
    path = tmp_path / "j.db"
    with Journal(path) as journal:
        journal.submit(single("t"))
        (item_id,) = [i.item_id for i in journal.get("t").items]
        journal.mark_dispatched(item_id, "veh-0", 1)
    assert _restart(path, max_refused=0) == (2, 0)


async def test_a_coordinator_restart_uses_none_of_an_in_flight_items_attempts(tmp_path):
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        journal.submit(single("t"))
        (item_id,) = [i.item_id for i in journal.get("t").items]
        journal.mark_dispatched(item_id, "veh-0", 1)  # then the coordinator crashed
    cluster = LocalCluster(tmp_path, fleet_id=f"journal34-{secrets.token_hex(4)}")
    ident = NodeDirectory(coord_dir := cluster.enroll("coord", roles=("coordinator",))).load()
    revocations = NodeDirectory(coord_dir).revocations(ident.trust)
    options = MeshNodeOptions(mdns=MdnsConfig.loopback(), membership=MembershipConfig.test())
    mesh = MeshNode(ident, revocations, options)
    await mesh.start()
    try:
        coordinator = Coordinator(mesh, path, CoordinatorConfig(max_attempts=2))
        await coordinator.start()
        try:  # (no node: the item waits to be sent, as attempt 2)
            entry = coordinator._items[item_id][1]
            assert (entry.attempt, entry.refused) == (2, 1)  # one failure more is no give-up
        finally:
            await coordinator.aclose()
    finally:
        await mesh.aclose()


# --- the files removed or replaced while open -----------------------------------------------------


@pytest.mark.parametrize("suffix", ["-wal", ""])
def test_a_journal_whose_files_were_removed_while_open_answers_nothing_durable(tmp_path, suffix):
    path = tmp_path / "j.db"
    with Journal(path) as journal:  # synchronous=FULL
        journal.submit(single("a"))
        os.unlink(f"{path}{suffix}")
        with pytest.raises(OSError, match="removed or replaced"):
            journal.submit(single("b"))  # written to a file no later open will read
        with pytest.raises(OSError, match="earlier sync of its log failed"):
            journal.sync()  # sticky: restart the coordinator
    if suffix == "-wal":  # the close merged the log open (its only copy) into the file
        with Journal(path) as journal:
            assert [t.task_id for t in journal.list().tasks] == ["b", "a"]


def test_a_journal_whose_file_was_replaced_while_open_answers_nothing_durable(tmp_path):
    path = tmp_path / "j.db"
    with Journal(tmp_path / "other.db") as other:
        other.submit(single("x"))
    with Journal(path) as journal:
        journal.submit(single("a"))
        os.replace(tmp_path / "other.db", path)
        with pytest.raises(OSError, match="removed or replaced"):
            journal.submit(single("b"))


def test_a_journal_at_normal_or_in_place_syncs_as_before(tmp_path):
    with Journal(tmp_path / "j.db") as journal:
        journal.submit(single("a"))
        journal.sync()
    with Journal(tmp_path / "n.db", synchronous="NORMAL") as journal:
        journal.submit(single("a"))  # (NORMAL: no sync, so no check either)


# --- the writer's thread dying -------------------------------------------------------------------


async def test_a_writer_dying_in_next_group_fails_what_it_took_not_the_group_before(
    tmp_path, caplog
):
    with Journal(tmp_path / "j.db") as journal:
        writer = JournalWriter(lambda: journal, tell_delay_s=0)
        real = writer._next_group

        def next_group():  # the group of "lost" is taken from the queue, then the bug strikes
            group = real()
            if any(call.args and call.args[0].task_id == "lost" for call in group):
                raise RuntimeError("a bug in _next_group (injected)")
            return group

        writer._next_group = next_group
        writer.tell("submit", single("told"))  # succeeds, in the first group
        caplog.set_level(logging.DEBUG, logger="coordinator.journal_writer")
        await writer.run("holds", single("told"))  # (after the told call: same group or next)
        taken = writer.call("submit", single("lost"))
        try:
            async with asyncio.timeout(10):  # (the old writer never answered it)
                error = await asyncio.gather(taken, return_exceptions=True)
        finally:
            await writer.aclose()
        assert isinstance(error[0], RuntimeError), error
        failed = [r for r in caplog.records if "journal call" in r.getMessage()]
        assert not failed, [r.getMessage() for r in failed]  # the told call succeeded
