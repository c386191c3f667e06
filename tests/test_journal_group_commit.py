"""Group commit in the task journal and in the coordinator's use of it.

:meth:`Journal.commit_group` runs many calls in one transaction: a call that raises is undone
alone; a group behaves exactly like its calls committed one by one; nothing is handed out before
the ``COMMIT``. :class:`JournalWriter` groups what is queued and answers callers only once their
group is durable -- checked against a second SQLite connection, and after SIGKILLing a process in
the middle of thousands of concurrent calls. Last, the coordinator: a task costs three journal
calls (its result and its end are one), and resubmitting a known task runs nothing again.
"""

from __future__ import annotations

import asyncio
import sqlite3
import textwrap
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import coordinator.service as service
from coordinator.journal import (
    CallOutcome,
    Journal,
    JournalError,
    TaskConflictError,
    TaskEnding,
    UnknownTaskError,
)
from coordinator.journal_writer import JournalWriter
from coordinator.service import CoordinatorConfig
from meshinfer.errors import ConfigError, LocalProtocolError
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.tasks import InvalidTransition, Pattern, TaskSpec, TaskState
from meshinfer.proto.tasks_wire import Tensor
from tests.helpers import until
from tests.test_coordinator_service import Mesh, hold_inference, spec
from tests.test_journal import run_until_killed

REPO = Path(__file__).resolve().parent.parent
_INPUT = Tensor.from_array(np.arange(8, dtype=np.float32).reshape(4, 2))


def single(task_id: str, model: str = "m") -> TaskSpec:
    return TaskSpec(task_id, Pattern.SINGLE, _INPUT, (ModelRef(model),))


def pair(task_id: str) -> TaskSpec:
    """A batch of two items."""
    return TaskSpec(task_id, Pattern.BATCH, _INPUT, (ModelRef("m"),), shard_size=2)


class Boom(Exception):
    """Raised on purpose by a call of a group."""


@pytest.fixture
def journal(tmp_path):
    with Journal(tmp_path / "journal.db", synchronous="NORMAL") as j:
        yield j


def committed_tasks(path: Path) -> set[str]:
    """Task ids as a second connection sees them: committed data only."""
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT id FROM tasks")}


# --- commit_group ------------------------------------------------------------------------------


def test_a_failing_call_leaves_the_rest_of_its_group_alone(journal):
    journal.submit(single("known"))

    def write_then_raise():
        journal.submit(single("undone"))
        journal.mark_dispatched("undone/0", "veh-1", 1)
        raise Boom("after writing")

    outcomes = journal.commit_group([
        lambda: journal.submit(single("a")),
        lambda: journal.submit(single("known", model="other")),  # TaskConflictError
        lambda: journal.mark_dispatched("nope/0", "veh-1", 1),  # UnknownTaskError
        write_then_raise,
        lambda: journal.mark_dispatched("a/0", "veh-1", 1),
        lambda: journal.mark_dispatched("a/0", "veh-2", 1),  # InvalidTransition: in flight
        lambda: journal.submit(single("b")),
    ])  # fmt: skip
    assert [o.value for o in outcomes if o.error is None] == ["a", None, "b"]
    errors = [type(o.error) for o in outcomes if o.error is not None]
    assert errors == [TaskConflictError, UnknownTaskError, Boom, InvalidTransition]
    assert committed_tasks(journal.path) == {"known", "a", "b"}
    assert journal.get("known").spec == single("known")
    assert journal.get("a").items[0].node == "veh-1"
    # The failed calls left no trace in the audit log; the others exactly one line each (the
    # dispatch stored, the submissions read back from their rows).
    assert [e.kind for e in journal.history("a")] == ["submitted", "dispatched"]
    assert journal.history("undone") == []
    assert journal.stats().events == 1


def test_calls_of_a_group_see_the_writes_of_those_before_them(journal):
    outcomes = journal.commit_group([
        lambda: journal.submit(single("t")),
        lambda: journal.get("t").state,
        lambda: journal.mark_dispatched("t/0", "veh-1", 1),
        lambda: journal.record_result("t/0", 1, b"out"),
        lambda: journal.record_result("t/0", 1, b"again"),  # refused: the journal said so
        lambda: [e.kind for e in journal.history("t")],
    ])  # fmt: skip
    assert [o.unwrap() for o in outcomes] == [
        "t", TaskState.PENDING, None, True, False, ["submitted", "dispatched", "result"],
    ]  # fmt: skip
    assert journal.stats().counters == {"duplicate_results": 1}


def test_a_result_and_the_end_it_decides_commit_together_or_not_at_all(journal):
    journal.submit(single("t"))
    journal.mark_dispatched("t/0", "veh-1", 1)

    def result_then_bad_end():
        journal.record_result("t/0", 1, b"out")
        journal.finish("t", TaskState.RUNNING)  # LocalProtocolError: not a final state

    (outcome,) = journal.commit_group([result_then_bad_end])
    assert isinstance(outcome.error, LocalProtocolError)
    item = journal.get("t").items[0]
    assert item.state == TaskState.DISPATCHED and item.result is None  # the result is undone
    assert journal.record_result("t/0", 1, b"out")  # and can still be accepted, once


def test_a_failed_commit_fails_the_whole_group_and_keeps_nothing(journal):
    def orphan_item():  # a foreign key checked only at COMMIT
        db = journal._db
        db.execute("PRAGMA defer_foreign_keys = ON")
        db.execute(
            "INSERT INTO items (id, task_id, position, model_id, model_version, stage, state,"
            " attempt, updated_at) VALUES ('ghost/0', 'ghost', 0, 'm', '', '', 'pending', 1, 0)"
        )

    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        journal.commit_group([lambda: journal.submit(single("a")), orphan_item])
    assert committed_tasks(journal.path) == set()
    assert journal.stats().events == 0
    assert journal.commit_group([lambda: journal.submit(single("a"))])[0].value == "a"


def test_a_group_whose_transaction_vanished_fails_as_a_whole(journal):
    def lose_the_transaction():  # what SQLite does itself on some I/O errors
        journal._db.execute("ROLLBACK")

    ran = []
    with pytest.raises(JournalError, match="lost"):
        journal.commit_group([
            lambda: journal.submit(single("a")), lose_the_transaction, lambda: ran.append(1),
        ])  # fmt: skip
    assert ran == [] and committed_tasks(journal.path) == set()
    assert journal.commit_group([lambda: journal.submit(single("a"))])[0].value == "a"


def test_commit_group_needs_an_open_journal_and_cannot_close_it(tmp_path):
    journal = Journal(tmp_path / "j.db")
    (outcome,) = journal.commit_group([journal.close])
    assert isinstance(outcome.error, LocalProtocolError)
    journal.close()
    with pytest.raises(LocalProtocolError, match="closed"):
        journal.commit_group([lambda: None])


def test_groups_from_many_threads_keep_every_acknowledged_write(tmp_path):
    path = tmp_path / "j.db"
    journal = Journal(path, synchronous="NORMAL")
    acknowledged: list[str] = []

    def submitter(thread: int) -> None:
        for round_ in range(15):
            ids = [f"t{thread}-{round_}-{n}" for n in range(8)]
            outcomes = journal.commit_group([lambda i=i: journal.submit(single(i)) for i in ids])
            acknowledged.extend(o.unwrap() for o in outcomes)

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert committed_tasks(path) == set(acknowledged) and len(acknowledged) == 4 * 15 * 8
    journal.close()
    with Journal(path) as reopened:
        assert reopened.stats().tasks == {"pending": len(acknowledged)}


# --- a group is the same as its calls one by one -------------------------------------------------

_OP_NAMES = (
    *("submit", "conflict", "dispatch", "result", "fail", "finish", "cancel", "get"),
    *("vouched", "end", "unknown", "history", "write-then-raise", "take-then-raise"),
)
_OPS = st.lists(
    st.tuples(
        st.sampled_from(_OP_NAMES),
        st.integers(0, 2),  # task
        st.integers(0, 1),  # item
        st.integers(1, 3),  # attempt
    ),
    min_size=1,
    max_size=30,
)


def _call(journal: Journal, op: str, task: int, item: int, attempt: int, *, grouped=True):
    """The call for one op. Outside a group a write-then-raise call writes nothing: what a
    group must make of it."""
    task_id, item_id = f"t{task}", f"t{task}/{item}"
    if op == "submit":  # two items: a batch, or (task 2) the same input through two models
        both = TaskSpec(task_id, Pattern.PARALLEL, _INPUT, (ModelRef("a"), ModelRef("b")))
        return lambda: journal.submit(both if task == 2 else pair(task_id))
    if op == "conflict":
        return lambda: journal.submit(single(task_id))
    if op == "dispatch":
        return lambda: journal.mark_dispatched(item_id, "veh", attempt)
    if op == "result":
        return lambda: journal.record_result(item_id, attempt, f"{item_id}@{attempt}".encode())
    if op == "fail":
        return lambda: journal.record_failure(item_id, attempt, "x", retryable=attempt < 3)
    if op == "finish":
        return lambda: journal.finish(task_id, TaskState.SUCCEEDED, summary=b"s")
    if op == "cancel":
        return lambda: journal.cancel(task_id)
    if op == "get":
        return lambda: [(i.state, i.attempt, i.result) for i in journal.get(task_id).items]
    if op == "unknown":  # refused without writing anything
        return lambda: journal.get("no such task")
    if op == "history":
        return lambda: [(e.kind, e.item_id, e.detail) for e in journal.history(task_id)]
    if op == "vouched":  # a result whose dispatch the caller vouches for
        return lambda: journal.record_result(item_id, attempt, b"v", node="veh", sent_to="veh")
    if op == "end":  # a result that ends the task (failed if from item 1), read back
        ending = TaskEnding(
            task_id, TaskState.FAILED if item else TaskState.SUCCEEDED, b"sum",
            "lost" if item else None, read_back=attempt != 3,
        )  # fmt: skip
        return lambda: _ended(
            journal.take_result(item_id, attempt, b"e", sent_to="veh" if attempt < 3 else None,
                                ending=ending)
        )  # fmt: skip

    def write_then_raise():
        if grouped and op == "write-then-raise":
            journal.submit(pair(f"x{task}"))
        elif grouped:  # a result (from memory, if its task is) and then the raise
            journal.record_result(item_id, attempt, b"lost", sent_to="veh")
        raise Boom(task_id)

    return write_then_raise


def _ended(taken):
    """What :meth:`Journal.take_result` returned, less its wall-clock stamps."""
    fresh, end = taken
    if end is None:
        return fresh, None
    in_flight, record = end
    if record is None:
        return fresh, in_flight, None
    items = [(i.item_id, i.state, i.node, i.attempt, i.error, i.result, i.result_attempt)
             for i in record.items]  # fmt: skip
    s = record.summary
    return fresh, in_flight, (s.state, s.error, s.items_total, s.items_done), items


def _run_alone(call) -> CallOutcome:
    try:
        return CallOutcome(call())
    except Exception as exc:
        return CallOutcome(error=exc)


def _outcome(outcome: CallOutcome):
    return ("error", type(outcome.error)) if outcome.error is not None else ("ok", outcome.value)


def _state(journal: Journal) -> tuple:
    """Everything but wall-clock stamps."""
    records = []
    for summary in journal.list(limit=100).tasks:
        r = journal.get(summary.task_id)
        items = [(i.item_id, i.state, i.node, i.attempt, i.error, i.result) for i in r.items]
        records.append((r.task_id, r.state, r.result_summary, items))
        records.append([(e.kind, e.item_id, e.detail) for e in journal.history(r.task_id)])
    stats = journal.stats()
    return records, stats.counters, stats.events


def _in_groups(journal: Journal, ops, cuts) -> list:
    together, start = [], 0
    for cut in [*sorted(set(cuts)), len(ops)]:  # split the ops into a few groups
        chunk = ops[start:cut]
        start = max(start, cut)
        calls = [_call(journal, *op) for op in chunk]
        together += [_outcome(o) for o in journal.commit_group(calls)] if calls else []
    return together


@settings(max_examples=150, deadline=None)
@given(ops=_OPS, cuts=st.lists(st.integers(1, 30), max_size=6))
def test_a_group_commits_what_its_calls_one_by_one_would(tmp_path_factory, ops, cuts):
    folder = tmp_path_factory.mktemp("groups")
    with (
        Journal(folder / "grouped.db", synchronous="NORMAL") as grouped,
        Journal(folder / "alone.db", synchronous="NORMAL") as alone,
    ):
        # one by one: each journal method is its own transaction
        one_by_one = [_outcome(_run_alone(_call(alone, *op, grouped=False))) for op in ops]
        assert _in_groups(grouped, ops, cuts) == one_by_one
        assert _state(grouped) == _state(alone)


# --- the writer thread -------------------------------------------------------------------------


class CountingJournal(Journal):
    """A journal that remembers the size of each group it committed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group_sizes: list[int] = []

    def commit_group(self, calls, **kw):
        self.group_sizes.append(len(calls))
        return super().commit_group(calls, **kw)


async def test_callers_are_answered_only_once_their_group_is_durable(tmp_path):
    path = tmp_path / "j.db"
    journal = CountingJournal(path)  # synchronous=FULL
    writer = JournalWriter(lambda: journal)
    seen_committed: list[bool] = []

    async def submit(n: int) -> None:
        task_id = await writer.run(journal.submit, single(f"t{n}"))
        seen_committed.append(task_id in committed_tasks(path))  # a second connection

    await asyncio.gather(*(submit(n) for n in range(200)))
    await writer.run_alone(journal.close)
    await writer.aclose()
    assert seen_committed == [True] * 200
    assert sum(journal.group_sizes) == 200
    assert len(journal.group_sizes) < 200  # calls queued together were committed together
    assert writer.groups == len(journal.group_sizes) + 1  # + the close, alone


async def test_the_writer_keeps_the_order_caps_groups_and_reports_each_error(tmp_path):
    journal = CountingJournal(tmp_path / "j.db", synchronous="NORMAL")
    writer = JournalWriter(lambda: journal, max_group=8)
    futures = [writer.call(journal.submit, single(f"t{n}")) for n in range(30)]
    futures.append(writer.call(journal.submit, single("t3", model="other")))  # conflict
    futures += [writer.call(journal.mark_dispatched, f"t{n}/0", "veh", 1) for n in range(30)]
    futures.append(writer.call(lambda: journal.get("t29").state))
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[:30] == [f"t{n}" for n in range(30)]
    assert isinstance(results[30], TaskConflictError)
    assert results[31:61] == [None] * 30  # each dispatch after its own submit
    assert results[61] == TaskState.DISPATCHED
    assert max(journal.group_sizes) <= 8 and sum(journal.group_sizes) == 62
    await writer.run_alone(journal.close)
    await writer.aclose()


async def test_told_calls_keep_their_place_and_their_failures_are_logged(tmp_path, caplog):
    journal = Journal(tmp_path / "j.db", synchronous="NORMAL")
    writer = JournalWriter(lambda: journal)
    writer.tell(journal.submit, single("t"))
    writer.tell(journal.mark_dispatched, "t/0", "veh-1", 1)
    writer.tell(journal.mark_dispatched, "t/0", "veh-2", 1)  # InvalidTransition, logged
    assert await writer.run(journal.record_result, "t/0", 1, b"out")  # after the dispatch
    assert (await writer.run(journal.get, "t")).items[0].node == "veh-1"
    assert "cannot dispatch" in caplog.text
    await writer.run_alone(journal.close)
    await writer.aclose()
    writer.tell(journal.get, "t")
    assert "writer closed" in caplog.text


async def test_told_calls_wait_briefly_for_a_call_to_commit_with(tmp_path):
    journal = CountingJournal(tmp_path / "j.db", synchronous="NORMAL")
    writer = JournalWriter(lambda: journal, tell_delay_s=0.5)
    await writer.run(journal.submit, single("t"))
    writer.tell(journal.mark_dispatched, "t/0", "veh", 1)
    assert await writer.run(journal.record_result, "t/0", 1, b"out")
    assert journal.group_sizes == [1, 2]  # the dispatch waited and committed with the result
    await writer.run_alone(journal.close)
    await writer.aclose()


async def test_told_calls_alone_commit_once_the_delay_is_over(tmp_path):
    path = tmp_path / "j.db"
    journal = CountingJournal(path, synchronous="NORMAL")
    writer = JournalWriter(lambda: journal, tell_delay_s=0.05)
    writer.tell(journal.submit, single("t"))
    await until(lambda: "t" in committed_tasks(path))
    assert journal.group_sizes == [1]
    writer.tell(journal.submit, single("u"))
    await writer.aclose()  # closing does not wait out the delay
    assert "u" in committed_tasks(path)
    journal.close()
    with pytest.raises(ConfigError, match="tell_delay_s"):
        JournalWriter(lambda: journal, tell_delay_s=-1)


async def test_the_next_group_runs_while_the_last_one_syncs_and_answers_wait_for_it(tmp_path):
    path = tmp_path / "j.db"
    journal = Journal(path)  # synchronous=FULL: the writer's sync thread syncs the log
    syncing, release = threading.Event(), threading.Event()
    real_sync = journal.sync

    def held_sync() -> None:
        syncing.set()
        assert release.wait(10), "the test never released the sync"
        real_sync()

    journal.sync = held_sync
    writer = JournalWriter(lambda: journal)
    first = writer.call("submit", single("a"))
    await until(syncing.is_set)  # "a" is committed; its sync is held
    second = writer.call("submit", single("b"))
    await until(lambda: "b" in committed_tasks(path))  # the next group ran meanwhile
    assert not first.done() and not second.done()  # neither is known durable yet
    release.set()
    assert await first == "a" and await second == "b"
    await writer.aclose()
    journal.close()


async def test_a_failed_sync_fails_the_callers_it_would_have_made_durable(tmp_path, caplog):
    journal = Journal(tmp_path / "j.db")

    def failing_sync() -> None:
        raise OSError("EIO (injected)")

    journal.sync = failing_sync
    writer = JournalWriter(lambda: journal)
    with pytest.raises(OSError, match="EIO"):  # committed, but maybe not on the disk
        await writer.run("submit", single("a"))
    assert "could not sync" in caplog.text
    await writer.aclose()
    journal.close()


async def test_calls_may_name_journal_methods_with_keyword_arguments(journal):
    writer = JournalWriter(lambda: journal)
    assert await writer.run("submit", single("t")) == "t"
    writer.tell("mark_dispatched", "t/0", "veh-1", 1)
    assert await writer.run("record_failure", "t/0", 1, "lost", retryable=True)
    assert (await writer.run("get", "t")).items[0].attempt == 2
    with pytest.raises(AttributeError):
        await writer.run("no_such_method")
    await writer.aclose()


async def test_on_decided_comes_before_the_commit_and_exactly_once(tmp_path):
    path = tmp_path / "j.db"
    journal = CountingJournal(path, synchronous="NORMAL")
    writer = JournalWriter(lambda: journal)
    seen: list[tuple[object, bool]] = []
    told = threading.Event()
    original_commit = journal.commit_group

    def commit_once_told(calls, before_commit=None, **kw):
        def wait_for_the_loop(outcomes):
            before_commit(outcomes)
            assert told.wait(10)  # the COMMIT waits until the loop ran the callback

        return original_commit(calls, before_commit=wait_for_the_loop, **kw)

    def decided(outcome: CallOutcome) -> None:  # what a second connection sees meanwhile
        seen.append((outcome.unwrap(), "t" in committed_tasks(path)))
        told.set()

    journal.commit_group = commit_once_told
    assert await writer.call(journal.submit, single("t"), on_decided=decided) == "t"
    assert seen == [("t", False)]  # decided, not yet committed

    failing = CountingJournal(tmp_path / "k.db", synchronous="NORMAL")
    original = failing.commit_group

    def failing_commit(calls, before_commit=None, **kw):
        def then_fail(outcomes):
            before_commit(outcomes)
            raise OSError("injected")

        return original(calls, before_commit=then_fail, **kw)

    failing.commit_group = failing_commit
    outcomes: list[CallOutcome] = []
    writer2 = JournalWriter(lambda: failing)
    with pytest.raises(OSError, match="injected"):
        await writer2.call(failing.submit, single("u"), on_decided=outcomes.append)
    assert [o.value for o in outcomes] == ["u"]  # decided, then the commit failed
    assert not committed_tasks(tmp_path / "k.db")

    writer2._journal = lambda: object()  # a stand-in without groups: told at the end
    assert await writer2.call(lambda: 7, on_decided=outcomes.append) == 7
    assert [o.value for o in outcomes] == ["u", 7]
    for w, j in ((writer, journal), (writer2, failing)):
        await w.aclose()
        j.close()
    with pytest.raises(LocalProtocolError):
        await writer.call(lambda: 1, on_decided=outcomes.append)
    assert isinstance(outcomes[-1].error, LocalProtocolError)


async def test_alone_calls_run_outside_groups_and_a_closed_writer_refuses(tmp_path):
    journal = Journal(tmp_path / "j.db", synchronous="NORMAL")
    writer = JournalWriter(lambda: journal)
    assert await writer.run_alone(lambda: journal._in_transaction) is False
    assert await writer.run(lambda: journal._in_transaction) is True
    await writer.run_alone(journal.close)
    with pytest.raises(LocalProtocolError, match="closed"):
        await writer.run(journal.get, "t")  # the journal is closed: every call says so
    await writer.aclose()
    await writer.aclose()  # idempotent
    with pytest.raises(LocalProtocolError, match="writer is closed"):
        await writer.call(journal.get, "t")


async def test_callers_are_failed_not_left_hanging_if_the_writer_dies(journal, caplog):
    groups = iter([journal, journal])  # a bug on the third group: no journal to give

    writer = JournalWriter(lambda: next(groups))
    assert await writer.run(journal.submit, single("a")) == "a"
    assert await writer.run(journal.submit, single("b")) == "b"
    with pytest.raises(RuntimeError, match="StopIteration"):
        await writer.run(journal.submit, single("c"))
    await writer.aclose()  # the thread is gone already
    assert "journal writer died" in caplog.text
    with pytest.raises(LocalProtocolError, match="closed"):
        await writer.run(journal.submit, single("d"))
    assert committed_tasks(journal.path) == {"a", "b"}


async def test_a_bug_in_the_sync_thread_fails_its_callers_and_hangs_nothing_after(journal, caplog):
    writer = JournalWriter(lambda: journal)
    sync = writer._sync

    def buggy(_journal: object) -> BaseException | None:
        writer._sync = sync  # once
        raise RuntimeError("a bug in the sync thread (injected)")

    writer._sync = buggy
    with pytest.raises(RuntimeError, match="injected"):  # committed, not known to be durable
        await writer.run(journal.submit, single("a"))
    assert "sync thread failed" in caplog.text
    async with asyncio.timeout(10):  # an alone call waits for every sync before it
        assert await writer.run_alone(lambda: "alone") == "alone"
        assert await writer.run(journal.submit, single("b")) == "b"
    await writer.aclose()
    assert committed_tasks(journal.path) == {"a", "b"}


async def test_a_stand_in_without_groups_gets_its_calls_one_by_one():
    class StandIn:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def note(self, n: int) -> int:
            if n == 3:
                raise Boom(n)
            self.calls.append(n)
            return n * n

    stand_in = StandIn()
    writer = JournalWriter(lambda: stand_in)
    results = await asyncio.gather(
        *(writer.run(stand_in.note, n) for n in range(6)), return_exceptions=True
    )
    await writer.aclose()
    assert results[:3] == [0, 1, 4] and isinstance(results[3], Boom) and results[4:] == [16, 25]
    assert stand_in.calls == [0, 1, 2, 4, 5]


# --- crash: nothing acknowledged is lost -------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    from coordinator.journal import Journal
    from coordinator.journal_writer import JournalWriter
    from meshinfer.inference.base import ModelRef
    from meshinfer.proto.tasks import Pattern, TaskSpec, TaskState
    from meshinfer.proto.tasks_wire import Tensor

    journal = Journal(sys.argv[1])  # synchronous=FULL
    writer = JournalWriter(lambda: journal)
    tensor = Tensor.from_array(np.zeros((1, 2), np.float32))

    def end(task_id):  # the result and the task's end as one call
        assert journal.record_result(f"{task_id}/0", 1, b"r" * 256, node="veh")
        journal.finish(task_id, TaskState.SUCCEEDED, summary=b"ok")

    async def task(n):
        task_id = f"task-{n}"
        spec = TaskSpec(task_id, Pattern.SINGLE, tensor, (ModelRef("m"),))
        await writer.run(journal.submit, spec)
        print("submitted", task_id, flush=True)
        writer.call(journal.mark_dispatched, f"{task_id}/0", "veh", 1)  # not waited for
        if n % 2 == 0:
            await writer.run(end, task_id)
            print("finished", task_id, flush=True)

    async def worker(w):
        for n in range(w, 1_000_000, 32):
            await task(n)

    async def main():
        await asyncio.gather(*(worker(w) for w in range(32)))

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("kill_after", [50, 700])
def test_no_acknowledged_group_write_is_lost_when_the_process_is_killed(tmp_path, kill_after):
    db_path = tmp_path / f"crash-{uuid.uuid4().hex}.db"
    acknowledged = run_until_killed(db_path, kill_after, _WORKER)
    submitted = {words[1] for words in acknowledged if words[0] == "submitted"}
    finished = {words[1] for words in acknowledged if words[0] == "finished"}
    assert len(acknowledged) >= kill_after and finished
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with Journal(db_path) as journal:
        for task_id in submitted:
            record = journal.get(task_id)  # UnknownTaskError if an acknowledged submit was lost
            if task_id in finished:
                assert record.state == TaskState.SUCCEEDED
            # one call, one savepoint: a result is never journaled without the task's end
            has_result = record.items[0].result is not None
            assert has_result == (record.state == TaskState.SUCCEEDED)


# --- the coordinator ---------------------------------------------------------------------------

#: No running mark: a fast item costs no journal write for it whatever the machine's load.
_CONFIG = CoordinatorConfig(item_timeout_s=10.0, running_mark_delay_s=60.0)


async def test_a_quick_task_costs_two_journal_calls_and_waiting_costs_none(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=_CONFIG) as mesh:
        c = mesh.coordinator
        await c.wait(await c.submit(spec("warm", "single", x[:1])), timeout=10)
        gate = hold_inference(mesh.daemons["node-0"])  # the result must not beat the waiter
        before = c._db.calls
        waiting = asyncio.create_task(c.wait(await c.submit(spec("one", "single", x[:2])), 10))
        await until(lambda: "one" in c._waiters)
        gate.set()
        record = await waiting
        assert record.state == TaskState.SUCCEEDED and record.result_summary is not None
        # submit, then the result with its dispatch, the task's end and its read-back
        assert c._db.calls - before == 2
        history = await c._db.run("history", "one")
        assert [e.kind for e in history] == ["submitted", "dispatched", "result", "succeeded"]
        assert history[1].detail == "attempt 1 to node-0"
        assert record.items[0].node == "node-0" and record.summary.state == TaskState.SUCCEEDED


@pytest.mark.parametrize("will_wait", [True, False], ids=["wait-follows", "never-waits"])
async def test_a_task_that_ends_before_its_submit_is_answered_costs_no_read_to_wait_for(
    tmp_path, will_wait
):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=_CONFIG) as mesh:
        c = mesh.coordinator
        await c.wait(await c.submit(spec("warm", "single", x[:1])), timeout=10)
        entered, synced, journal = threading.Event(), threading.Event(), c.journal
        original = journal.sync

        def held_sync():
            entered.set()
            assert synced.wait(10), "the test never released the sync"
            original()

        journal.sync = held_sync
        before = c._db.calls
        read = asyncio.create_task(c.get("warm"))  # its group's sync holds the sync thread
        await until(entered.is_set)
        submit = asyncio.create_task(c.submit(spec("quick", "single", x[:1]), will_wait=will_wait))
        # the submit's answer waits for a sync; its item goes out, and its result commits
        await until(lambda: c._db._committed.qsize() == 2)  # (its sync thread's queue)
        synced.set()  # one sync answers both groups: the task ends before the submit returns
        task_id = await submit
        await read
        record = await c.wait(task_id, timeout=10)  # usually handed over from the end
        assert record.state == TaskState.SUCCEEDED and record.result_summary is not None
        assert "quick" not in c._handed
        # handed over with the end: no read; never-waits (the HTTP API): nothing kept, one read
        assert c._db.calls - before == (3 if will_wait else 4)
        assert (await c.get("quick")) == record


async def test_records_kept_for_a_later_wait_are_bounded_in_count_and_bytes(tmp_path, monkeypatch):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=_CONFIG) as mesh:
        c = mesh.coordinator
        record = await c.wait(await c.submit(spec("kept", "single", x[:4])), timeout=10)
        size = len(record.spec.inputs.data) + len(record.result_summary)
        size += sum(len(item.result) for item in record.items)
        for n in range(service.HANDED_RECORDS + 5):  # as if nobody ever waited for them
            c._hand(f"t{n}", record)
        assert len(c._handed) == service.HANDED_RECORDS and "t0" not in c._handed
        assert c._handed_bytes == size * service.HANDED_RECORDS
        c._hand("t100", record)  # again: counted once
        assert c._handed_bytes == size * service.HANDED_RECORDS
        assert await c.wait("t100") is record
        assert c._handed_bytes == size * (service.HANDED_RECORDS - 1)
        monkeypatch.setattr(service, "HANDED_BYTES", size * 3)
        c._hand("last", record)  # the byte bound drops the oldest down to three records
        assert len(c._handed) == 3 and "last" in c._handed
        assert c._handed_bytes == size * 3


async def test_resubmitting_a_known_task_runs_nothing_again(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=_CONFIG) as mesh:
        c = mesh.coordinator
        task = spec("once", "batch", x[:6], shard_size=2)
        first = await c.wait(await c.submit(task), timeout=10)
        assert first.state == TaskState.SUCCEEDED
        dispatched, events = c.stats_.dispatched, len(await c._db.run("history", "once"))
        assert await c.submit(task) == "once"  # an idempotent client retry of a finished task
        again = await c.wait("once", timeout=10)
        assert again.state == TaskState.SUCCEEDED and again.result_summary == first.result_summary
        stats = await c.stats()
        assert c.stats_.dispatched == dispatched == 3 and stats["live_tasks"] == 0
        assert len(await c._db.run("history", "once")) == events
        assert stats["journal_counters"] == {} and stats["duplicates"] == 0
        with pytest.raises(TaskConflictError):
            await c.submit(spec("once", "batch", x[:4], shard_size=2))


async def test_resubmitting_a_running_task_adds_no_second_run(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=1, config=_CONFIG) as mesh:
        c = mesh.coordinator
        daemon = mesh.daemons["node-0"]
        gate = hold_inference(daemon)
        task = spec("slow", "single", x[:1])
        await c.submit(task)
        assert await c.submit(task) == "slow"
        gate.set()
        record = await c.wait("slow", timeout=10)
        assert record.state == TaskState.SUCCEEDED
        assert c.stats_.dispatched == 1 and c.stats_.duplicates == 0
