"""A task's audit log: the lines the journal stores, and those read back from the task's rows
(:mod:`coordinator.journal_history`)."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.journal import Journal, TaskEnding
from meshinfer.proto.tasks import TERMINAL_STATES, TaskState
from tests.test_journal import FakeClock, batch, fresh_files, fresh_journal

ENDINGS = {s.value for s in TERMINAL_STATES}


@pytest.fixture
def clocked(tmp_path):
    with Journal(tmp_path / "journal.db", wall_clock=FakeClock()) as journal:
        yield journal


def lines(journal: Journal, task_id: str) -> list[tuple]:
    return [(e.seq, e.at, e.item_id, e.kind, e.detail) for e in journal.history(task_id)]


def stored(journal: Journal) -> int:
    return journal.stats().events


def test_a_plain_task_stores_no_line_and_reads_its_history_back_from_its_rows(tmp_path):
    """Accepted, each result vouching for its unjournaled dispatch, ended with the last one:
    the hot path. No audit row is written; the history is what storing the lines would have
    given, stamped with the rows' own times."""
    clock = FakeClock()
    with Journal(tmp_path / "j.db", wall_clock=clock) as journal:
        journal.commit_group([lambda: journal.accept(batch("t", rows_per_item=3))])
        journal.commit_group([lambda: journal.take_result("t/0", 1, b"a", node="n1", sent_to="n1")])
        ending = TaskEnding("t", TaskState.SUCCEEDED, b"ab", None, True)
        journal.commit_group(
            [lambda: journal.take_result("t/1", 1, b"b", node="n3", sent_to="n2", ending=ending)]
        )
        record = journal.get("t")
        assert stored(journal) == 0
        created, ended = record.summary.created_at, record.summary.updated_at
        with sqlite3.connect(tmp_path / "j.db") as db:
            (first,), (second,) = db.execute("SELECT received_at FROM results ORDER BY item_id")
        assert created < first < second == ended
        assert lines(journal, "t") == [
            (0, created, None, "submitted", "2 items"),
            (0, first, "t/0", "dispatched", "attempt 1 to n1"),
            (0, first, "t/0", "result", "attempt 1 from n1"),
            (0, second, "t/1", "dispatched", "attempt 1 to n2"),
            (0, second, "t/1", "result", "attempt 1 from n3"),  # computed elsewhere
            (0, second, None, "succeeded", ""),
        ]


def test_stored_lines_and_lines_read_back_interleave_by_time(clocked):
    """What the rows do not say (a journaled dispatch, a failure, a retry) is stored as it
    happens; the history places the lines read back among them by time."""
    journal = clocked
    journal.submit(batch("t"))  # three items
    journal.record_result("t/0", 1, b"a", node="n1", sent_to="n1")  # vouched
    journal.mark_dispatched("t/1", "n2", 1)  # overdue: journaled
    journal.record_failure("t/1", 1, "engine crashed", retryable=True)
    journal.mark_dispatched("t/1", "n3", 2)
    journal.record_result("t/1", 2, b"b", node="n3")
    journal.record_result("t/2", 1, b"c", sent_to="n1")  # no node named: an older sender
    journal.finish("t", TaskState.FAILED, summary=None, error="no quorum")
    assert stored(journal) == 3
    history = [(e.seq > 0, e.item_id, e.kind, e.detail) for e in journal.history("t")]
    assert history == [
        (False, None, "submitted", "3 items"),
        (False, "t/0", "dispatched", "attempt 1 to n1"),
        (False, "t/0", "result", "attempt 1 from n1"),
        (True, "t/1", "dispatched", "attempt 1 to n2"),
        (True, "t/1", "retry", "engine crashed"),
        (True, "t/1", "dispatched", "attempt 2 to n3"),
        (False, "t/1", "result", "attempt 2 from n3"),
        (False, "t/2", "dispatched", "attempt 1 to n1"),
        (False, "t/2", "result", "attempt 1"),
        (False, None, "failed", "no quorum"),
    ]
    ats = [e.at for e in journal.history("t")]
    assert ats == sorted(ats)


class SteppingClock:
    """A wall clock that moves by each of ``deltas`` in turn (0: stamps alike; < 0: a step
    back, as an NTP or GPS correction makes)."""

    def __init__(self, deltas: list[float]) -> None:
        self.deltas, self.now, self.reads = deltas, 1_000.0, 0

    def __call__(self) -> float:
        self.now += self.deltas[self.reads % len(self.deltas)]
        self.reads += 1
        return self.now


def test_a_clock_stepping_back_does_not_reorder_the_story(tmp_path):
    """The dispatch is stored; then the clock steps back and the result (read back from its
    row) is stamped before the task was even submitted. The history still tells it in order:
    submitted, dispatched, result, the end."""
    clock = SteppingClock([1.0])
    with Journal(tmp_path / "j.db", wall_clock=clock) as journal:
        journal.submit(batch("t", rows_per_item=6))  # one item
        journal.mark_dispatched("t/0", "n1", 1)
        clock.now -= 60
        journal.record_result("t/0", 1, b"a", node="n1")
        journal.finish("t", TaskState.SUCCEEDED, summary=b"a")
        history = journal.history("t")
    assert [(e.kind, e.seq > 0) for e in history] == [
        ("submitted", False), ("dispatched", True), ("result", False), ("succeeded", False),
    ]  # fmt: skip
    assert history[2].at < history[0].at  # (the stamps are the rows', as they were written)


def test_a_journal_that_stored_every_line_reads_each_once(tmp_path):
    """Before its rows were read back, a journal stored every line: such a journal's history
    shows each line once, as stored."""
    with Journal(tmp_path / "j.db", wall_clock=FakeClock()) as journal:
        journal.submit(batch("t", rows_per_item=6))  # one item
        journal.record_result("t/0", 1, b"a", node="n1", sent_to="n1")
        journal.finish("t", TaskState.SUCCEEDED, summary=b"a")
        expected = [(e.at, e.item_id, e.kind, e.detail) for e in journal.history("t")]
    with sqlite3.connect(tmp_path / "j.db") as db:  # as the earlier code wrote them
        db.executemany(
            "INSERT INTO events (at, task_id, item_id, kind, detail) VALUES (?, 't', ?, ?, ?)",
            expected,
        )
    with Journal(tmp_path / "j.db") as journal:
        history = journal.history("t")
    assert [(e.at, e.item_id, e.kind, e.detail) for e in history] == expected
    assert all(e.seq > 0 for e in history)


# What may happen to one item of a three-item batch task; the task may then be ended.
STEPS = st.sampled_from(["vouched", "dispatch", "result", "retry", "fail"])


@fresh_files(60)
@given(
    steps=st.lists(st.tuples(st.integers(0, 2), STEPS), max_size=12),
    end=st.sampled_from([None, "succeed", "fail", "cancel"]),
    deltas=st.lists(st.sampled_from([1.0, 1.0, 0.0, -5.0]), min_size=1, max_size=6),
)
def test_every_history_is_a_coherent_story(tmp_path, steps, end, deltas):
    """Whatever happened to a task, stored or read back, and whatever the clock did: it starts
    with its submission, the stored lines keep their order, each result the journal holds has
    one line after the one dispatch line of that attempt, a task that ended closes with its
    end, once; and with a clock that never steps back, the lines are in time order."""
    with fresh_journal(tmp_path, wall_clock=SteppingClock(deltas)) as journal:
        journal.submit(batch("t"))
        for index, step in steps:
            item_id = f"t/{index}"
            item = journal.get("t").items[index]
            attempt = item.attempt
            try:
                if step == "vouched":
                    journal.record_result(item_id, attempt, b"x", node="n9", sent_to="n1")
                elif step == "dispatch":
                    journal.mark_dispatched(item_id, "n2", attempt)
                elif step == "result":
                    journal.record_result(item_id, attempt, b"x", node="n2")
                else:
                    journal.record_failure(item_id, attempt, "boom", retryable=step == "retry")
            except Exception:  # a step the item's state does not allow: refused, as it should
                pass
        if end == "cancel":
            journal.cancel("t")
        elif end is not None and journal.get("t").state.value not in ENDINGS:
            state = TaskState.SUCCEEDED if end == "succeed" else TaskState.FAILED
            journal.finish("t", state, summary=None, error=None if end == "succeed" else "why")
        record = journal.get("t")
        history = journal.history("t")
        assert sum(e.seq > 0 for e in history) == stored(journal)
    assert history[0].kind == "submitted" and history[0].item_id is None
    seqs = [e.seq for e in history if e.seq > 0]
    assert seqs == sorted(seqs)
    if min(deltas) >= 0:
        assert [e.at for e in history] == sorted(e.at for e in history)
    answered = {i.item_id: i.result_attempt for i in record.items if i.result is not None}
    results = [(e.item_id, e.detail.split()[1]) for e in history if e.kind == "result"]
    assert sorted(results) == sorted((k, str(v)) for k, v in answered.items())
    sends = [(e.item_id, e.detail.split()[1]) for e in history if e.kind == "dispatched"]
    assert len(sends) == len(set(sends))  # each attempt's dispatch told once
    for n, line in enumerate(history):
        if line.kind == "result":
            sent = f"attempt {line.detail.split()[1]} to "
            assert any(
                e.kind == "dispatched" and e.item_id == line.item_id and e.detail.startswith(sent)
                for e in history[:n]
            )
    task_lines = [e.kind for e in history if e.item_id is None]
    if record.state.value in ENDINGS:
        assert task_lines == ["submitted", record.state.value]
        assert history[-1].kind == record.state.value
    else:
        assert task_lines == ["submitted"]
