"""An item its task's end left unfinished says why in its error: "not finished: the task
failed" or "not needed: the task succeeded without it" (it read as an operator's cancel, with no
reason), on the hot path (the task in memory) and the ordinary one alike; a cancelled task's
items need none."""

from __future__ import annotations

import pytest

from coordinator.journal import Journal, TaskEnding
from meshinfer.proto.tasks import TaskState
from tests.test_journal_group_commit import pair

FAILED = "not finished: the task failed"
NOT_NEEDED = "not needed: the task succeeded without it"


@pytest.mark.parametrize("hot_items", [65536, 0], ids=["hot", "ordinary"])
def test_an_item_a_successful_end_left_unfinished_says_it_was_not_needed(tmp_path, hot_items):
    with Journal(tmp_path / "j.db", hot_items=hot_items) as journal:
        journal.submit(pair("t"))
        ending = TaskEnding("t", TaskState.SUCCEEDED, b"sum", None, read_back=True)
        fresh, (_, record) = journal.take_result("t/0", 1, b"a", sent_to="veh", ending=ending)
        assert fresh
        for items in (record.items, journal.get("t").items):  # handed out, then read back
            assert [(i.state, i.error) for i in items] == [
                (TaskState.SUCCEEDED, None),
                (TaskState.CANCELLED, NOT_NEEDED),
            ]


def test_an_item_a_failed_end_left_unfinished_says_the_task_failed(tmp_path):
    with Journal(tmp_path / "j.db") as journal:
        journal.submit(pair("t"))
        journal.mark_dispatched("t/0", "veh", 1)
        assert journal.finish("t", TaskState.FAILED, error="deadline passed") == [("t/0", "veh")]
        items = journal.get("t").items
        assert [(i.state, i.error) for i in items] == [(TaskState.CANCELLED, FAILED)] * 2
        assert journal.get("t").summary.error == "deadline passed"


def test_a_cancelled_tasks_items_carry_no_made_up_error(tmp_path):
    with Journal(tmp_path / "j.db") as journal:
        journal.submit(pair("t"))
        journal.cancel("t")
        assert [(i.state, i.error) for i in journal.get("t").items] == [
            (TaskState.CANCELLED, None)
        ] * 2
