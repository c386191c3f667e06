"""The journal's hot path (coordinator/journal_hot.py): tasks kept in memory, rows staged.

It must write, count, log and answer exactly what the ordinary path does (every call reading and
writing its rows): checked against a journal that keeps no task in memory, over random flows of
calls in random groups, with and without SQLite's ``UPDATE ... FROM``. A task read back with
its end is the one :meth:`Journal.get` then reads. And it is fast because a group of results
costs a few statements, not one per row: counted.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from coordinator.journal import Journal, TaskEnding
from meshinfer.proto.tasks import TaskState
from tests.test_journal_group_commit import _OPS, _in_groups, _state, pair, single


def hot_and_cold(folder):
    """Two journals on one constant clock (so their rows compare whole, stamps included)."""
    hot = Journal(folder / "hot.db", synchronous="NORMAL", wall_clock=lambda: 1.0)
    # keeps no task in memory: every call reads and writes its rows
    cold = Journal(folder / "cold.db", synchronous="NORMAL", wall_clock=lambda: 1.0, hot_items=0)
    return hot, cold


def rows(journal: Journal) -> dict[str, list[tuple]]:
    """Every row of every table, in a fixed order."""
    tables = ("tasks", "items", "results", "events", "counters")
    return {t: journal._db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}


@settings(max_examples=150, deadline=None)
@given(ops=_OPS, cuts=st.lists(st.integers(1, 30), max_size=6), update_from=st.booleans())
@example(ops=[("vouched", 0, 0, 1), ("end", 0, 1, 1)], cuts=[], update_from=True)
@example(
    ops=[("dispatch", 1, 1, 1), ("end", 1, 0, 2), ("get", 1, 0, 1)], cuts=[1], update_from=False
)
def test_the_hot_path_does_what_the_ordinary_path_does(tmp_path_factory, ops, cuts, update_from):
    ops = [("submit", task, 0, 1) for task in range(3)] + ops  # mostly calls on live tasks
    hot, cold = hot_and_cold(tmp_path_factory.mktemp("hot"))
    hot._staged.update_from = update_from  # False: as on SQLite < 3.33
    with hot, cold:
        assert _in_groups(hot, ops, cuts) == _in_groups(cold, ops, cuts)
        assert rows(hot) == rows(cold)
        assert _state(hot) == _state(cold)


@pytest.mark.parametrize("read_back", [True, False])
def test_a_task_read_back_with_its_end_is_what_get_reads(tmp_path, read_back):
    with Journal(tmp_path / "j.db") as journal:
        journal.submit(pair("t"))
        assert len(journal._hot) == 1
        assert journal.record_result("t/0", 1, b"a", node="veh", sent_to="veh")
        ending = TaskEnding("t", TaskState.SUCCEEDED, b"sum", None, read_back)
        fresh, (in_flight, record) = journal.take_result(
            "t/1", 1, b"b", node="car", sent_to="car", ending=ending
        )
        assert fresh and in_flight == [] and len(journal._hot) == 0  # ended: no longer kept
        if read_back:
            assert record == journal.get("t")  # stamps, spec, items, results and all
            assert [i.node for i in record.items] == ["veh", "car"]
        else:
            assert record is None
        assert journal.stats().tasks == {"succeeded": 1}


def test_any_other_write_to_a_task_takes_it_off_the_hot_path(tmp_path):
    with Journal(tmp_path / "j.db") as journal:
        for task_id in ("a", "b", "c", "d"):
            journal.submit(pair(task_id))
        journal.mark_dispatched("a/0", "veh", 1)
        journal.record_failure("b/1", 1, "no node has the model", retryable=False)
        journal.cancel("c")
        assert set(journal._hot._tasks) == {"d"}
        journal.recover()
        assert len(journal._hot) == 0
        # the ordinary path then reads the rows: the dispatch and the failure count
        assert journal.record_result("a/0", 1, b"x")
        assert not journal.record_result("b/1", 1, b"x", sent_to="veh")
        assert journal.stats().counters == {"late_results": 1}


def test_a_rolled_back_group_forgets_the_tasks_it_kept(tmp_path):
    with Journal(tmp_path / "j.db") as journal:
        journal.submit(single("kept"))

        def lose_the_transaction():
            journal._db.execute("ROLLBACK")

        with pytest.raises(Exception, match="lost"):
            journal.commit_group([lambda: journal.submit(single("new")), lose_the_transaction])
        assert len(journal._hot) == 0 and not journal._staged
        with pytest.raises(Exception, match="no task"):
            journal.get("new")
        assert journal.record_result("kept/0", 1, b"x", sent_to="veh")  # the ordinary way


def test_only_as_many_items_as_the_limit_are_kept(tmp_path):
    with Journal(tmp_path / "j.db", hot_items=3) as journal:
        journal.submit(pair("a"))
        journal.submit(pair("b"))  # 4 items would not fit
        journal.submit(single("c"))
        assert set(journal._hot._tasks) == {"a", "c"}


def test_a_call_refused_without_writing_leaves_its_group_and_the_hot_tasks_alone(tmp_path):
    """A read inside a group writes the earlier calls' staged rows first: those are not the
    refused call's own writes (the group would run twice, and forget every hot task)."""
    with Journal(tmp_path / "j.db") as journal:
        journal.commit_group([lambda n=n: journal.submit(pair(f"t{n}")) for n in range(50)])
        runs = []
        run_group = journal._run_group
        journal._run_group = lambda *a, savepoints: (
            runs.append(savepoints) or run_group(*a, savepoints=savepoints)
        )
        outcomes = journal.commit_group([
            lambda: journal.take_result("t0/0", 1, b"r", sent_to="veh"),
            lambda: journal.get("no such task"),  # a client asking after an unknown id
            lambda: journal.mark_dispatched("t1/0", "veh", 7),  # the wrong attempt
            lambda: journal.take_result("t2/0", 1, b"r", sent_to="veh"),
        ])  # fmt: skip
        assert [type(o.error).__name__ for o in outcomes] == [
            "NoneType", "UnknownTaskError", "LocalProtocolError", "NoneType",
        ]  # fmt: skip
        assert runs == [False] and len(journal._hot) == 50
        assert journal.get("t0").items[0].result == journal.get("t2").items[0].result == b"r"


def test_audit_lines_a_raising_call_wrote_out_are_undone(tmp_path):
    with Journal(tmp_path / "j.db") as journal:

        def log_read_raise():  # its line is written by the read's flush, then it raises
            journal._log("note", "a")
            journal.get("a")
            raise RuntimeError("after the read")

        outcomes = journal.commit_group([lambda: journal.submit(single("a")), log_read_raise])
        assert isinstance(outcomes[1].error, RuntimeError)
        assert [e.kind for e in journal.history("a")] == ["submitted"]


class Statements:
    """Counts the statements a journal's connection runs."""

    def __init__(self, journal: Journal) -> None:
        self.real, self.sql = journal._db, []
        journal._db = self

    def __getattr__(self, name):
        return getattr(self.real, name)

    def execute(self, sql, *args):
        self.sql.append(sql)
        return self.real.execute(sql, *args)

    def executemany(self, sql, *args):
        self.sql.append(sql)
        return self.real.executemany(sql, *args)


def test_a_group_of_results_costs_a_few_statements_whatever_its_size(tmp_path):
    with Journal(tmp_path / "j.db") as journal:
        journal.commit_group([lambda n=n: journal.submit(pair(f"t{n}")) for n in range(200)])
        counted = Statements(journal)
        calls = [
            lambda n=n, i=i: journal.take_result(
                f"t{n}/{i}", 1, b"r", sent_to="veh",
                ending=TaskEnding(f"t{n}", TaskState.SUCCEEDED, b"s", None, True) if i else None,
            )
            for n in range(200) for i in (0, 1)
        ]  # fmt: skip
        outcomes = journal.commit_group(calls)
        assert all(o.unwrap()[0] for o in outcomes)
        # BEGIN; 400 results and 400 item updates in chunks of 128 + 128 + 128 + 16 rows, 200
        # task updates in 128 + 64 + 8; COMMIT (no audit line: the rows say it all)
        assert len(counted.sql) == 1 + 4 + 4 + 3 + 1
        assert journal.stats().tasks == {"succeeded": 200}
        assert journal.stats().items == {"succeeded": 400}
