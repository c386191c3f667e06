"""The coordinator's SQLite task journal: round trips, exactly-once results, pagination, schema
migrations, recovery, and a SIGKILL crash test in a real subprocess."""

import concurrent.futures
import itertools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import coordinator.journal as journal_module
from coordinator.journal import (
    Journal,
    TaskConflictError,
    TaskEnding,
    UnknownTaskError,
    read_stats,
)
from coordinator.journal_schema import MIGRATIONS, SchemaError, migrate, schema_version
from meshinfer.errors import ConfigError, LocalProtocolError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks import (
    InvalidTaskError,
    InvalidTransition,
    Pattern,
    Stage,
    TaskSpec,
    TaskState,
    outline,
)
from meshinfer.proto.tasks_wire import Tensor
from tests.test_tasks import specs

REPO = Path(__file__).resolve().parent.parent
_INPUT = Tensor.from_array(np.arange(12, dtype=np.float32).reshape(6, 2))
# Hypothesis examples make their own files under tmp_path; the fixture is only a parent folder.


def fresh_files(max_examples: int) -> settings:
    """Hypothesis settings for tests that make a fresh database file per example."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def batch(task_id: str, model: str = "digits", rows_per_item: int = 2) -> TaskSpec:
    """A batch task of 6 rows: 6 / rows_per_item items."""
    return TaskSpec(task_id, Pattern.BATCH, _INPUT, (ModelRef(model),), shard_size=rows_per_item)


class FakeClock:
    """A wall clock that ticks one second per reading."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def journal(tmp_path):
    with Journal(tmp_path / "journal.db", wall_clock=FakeClock()) as j:
        yield j


def fresh_journal(tmp_path: Path, **kwargs) -> Journal:
    return Journal(tmp_path / f"{uuid.uuid4().hex}.db", **kwargs)


# --- submission and reading back -----------------------------------------------------------------


@fresh_files(40)
@given(spec=specs())
def test_submitted_specs_read_back_with_their_planned_items(tmp_path, spec):
    with fresh_journal(tmp_path, synchronous="NORMAL") as journal:
        assert journal.submit(spec) == spec.task_id
        record = journal.get(spec.task_id)
    assert record.spec == spec and record.state == TaskState.PENDING
    planned = outline(spec)
    assert [i.item_id for i in record.items] == [o.item_id for o in planned]
    assert [i.model for i in record.items] == [o.model for o in planned]
    assert all(i.state == TaskState.PENDING and i.attempt == 1 for i in record.items)
    assert record.summary.pattern == spec.pattern and record.summary.priority == spec.priority
    assert record.summary.items_total == len(planned) and record.summary.items_done == 0


def test_tasks_survive_reopening(tmp_path):
    path = tmp_path / "j.db"
    with Journal(path) as journal:
        journal.submit(batch("t1"))
        journal.mark_dispatched("t1/0", "veh-1", 1)
        assert journal.record_result("t1/0", 1, b"output", node="veh-1")
    with Journal(path) as journal:
        record = journal.get("t1")
        assert record.spec == batch("t1")
        assert record.items[0].result == b"output" and record.items[0].node == "veh-1"
        assert record.items[0].state == TaskState.SUCCEEDED
        assert record.summary.items_done == 1


def test_resubmitting_is_idempotent_but_a_different_spec_conflicts(journal):
    spec = TaskSpec("t1", Pattern.SINGLE, _INPUT, (ModelRef("m"),), params={"a": 1, "b": 2})
    assert journal.submit(spec) == "t1"
    reordered = TaskSpec("t1", Pattern.SINGLE, _INPUT, (ModelRef("m"),), params={"b": 2, "a": 1})
    assert journal.submit(reordered) == "t1"
    with pytest.raises(TaskConflictError, match="t1"):
        journal.submit(TaskSpec("t1", Pattern.SINGLE, _INPUT, (ModelRef("m"),), params={"a": 2}))
    assert journal.stats().tasks == {"pending": 1}


def test_accept_tells_a_new_task_from_an_idempotent_retry(journal):
    assert journal.accept(batch("t1")) is True
    assert journal.accept(batch("t1")) is False  # the same spec: nothing to run again
    with pytest.raises(TaskConflictError):
        journal.accept(batch("t1", model="other"))
    assert [e.kind for e in journal.history("t1")] == ["submitted"]
    assert journal.stats().tasks == {"pending": 1}


@pytest.mark.parametrize("bound", ["SPEC_CACHE_BYTES", "SPEC_CACHE_COUNT"])
def test_specs_read_back_the_same_whether_remembered_or_decoded(tmp_path, monkeypatch, bound):
    monkeypatch.setattr(journal_module, bound, {"SPEC_CACHE_BYTES": 2_000}.get(bound, 5))
    specs = [batch(f"t{n}", rows_per_item=n % 3 + 1) for n in range(30)]
    with Journal(tmp_path / "j.db") as journal:
        for spec in specs:
            journal.submit(spec)
        assert 0 < len(journal._specs) < len(specs)  # the oldest were forgotten
        assert list(journal._specs) == [spec.task_id for spec in specs[-len(journal._specs) :]]
        if bound == "SPEC_CACHE_COUNT":
            assert len(journal._specs) == 5
        assert [journal.get(spec.task_id).spec for spec in specs] == specs
    with Journal(tmp_path / "j.db") as reopened:  # nothing remembered: every spec decoded
        assert [reopened.get(spec.task_id).spec for spec in specs] == specs


def test_the_audit_log_works_without_sqlite_json_functions(tmp_path):
    with Journal(tmp_path / "j.db", wall_clock=FakeClock()) as journal:
        journal._json_events = False  # as on an SQLite built without them
        journal.submit(batch("t1", rows_per_item=6))
        journal.mark_dispatched("t1/0", "veh-1", 1)
        journal.record_result("t1/0", 1, b"out")
        journal.finish("t1", TaskState.SUCCEEDED)
        events = journal.history("t1")
    assert [(e.kind, e.item_id) for e in events] == [
        ("submitted", None), ("dispatched", "t1/0"), ("result", "t1/0"), ("succeeded", None),
    ]  # fmt: skip
    assert [e.at for e in events] == sorted(e.at for e in events)


def test_invalid_specs_are_not_journaled(journal):
    with pytest.raises(InvalidTaskError):
        journal.submit(TaskSpec("bad", Pattern.SINGLE, _INPUT, ()))
    with pytest.raises(UnknownTaskError):
        journal.get("bad")
    assert journal.stats().tasks == {}


def test_closing_twice_is_fine_and_use_after_close_is_refused(tmp_path):
    journal = Journal(tmp_path / "j.db")
    journal.close()
    journal.close()
    with pytest.raises(LocalProtocolError, match="closed"):
        journal.submit(batch("t1"))


def test_synchronous_mode_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="synchronous"):
        Journal(tmp_path / "j.db", synchronous="OFF")


def wal_syncs(monkeypatch) -> list[str]:
    """Record which files ``os.fdatasync`` syncs from now on (it still syncs them)."""
    synced: list[str] = []
    real = os.fdatasync

    def noting(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", noting)
    return synced


def test_the_database_runs_in_wal_mode_and_full_syncs_the_log_of_every_commit(
    tmp_path, monkeypatch
):
    with Journal(tmp_path / "j.db") as journal:
        db = journal._db
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # SQLite syncs the log before a checkpoint (NORMAL); the journal syncs it at commits
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 1 and journal.syncs
        synced = wal_syncs(monkeypatch)
        journal.submit(batch("t1"))
        assert synced == [str(tmp_path / "j.db-wal")]
        journal.commit_group([lambda: journal.submit(batch("t2"))])
        assert len(synced) == 2
        journal.commit_group([lambda: journal.submit(batch("t3"))], sync=False)
        assert len(synced) == 2  # left to the caller
        journal.sync()
        assert len(synced) == 3


def test_normal_never_syncs_the_log_itself(tmp_path, monkeypatch):
    with Journal(tmp_path / "j.db", synchronous="NORMAL") as journal:
        synced = wal_syncs(monkeypatch)
        journal.submit(batch("t1"))
        journal.sync()
        assert synced == [] and not journal.syncs


# --- schema --------------------------------------------------------------------------------------


def test_new_files_get_the_latest_schema_and_newer_files_are_refused(tmp_path):
    path = tmp_path / "j.db"
    Journal(path).close()
    with sqlite3.connect(path) as db:
        assert schema_version(db) == len(MIGRATIONS)
        db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS) + 1,))
    with pytest.raises(SchemaError, match="newer"):
        Journal(path)


def test_migrations_apply_once_and_keep_the_data(tmp_path):
    path = tmp_path / "j.db"
    with Journal(path) as journal:
        journal.submit(batch("t1"))
    later = (*MIGRATIONS, ("ALTER TABLE tasks ADD COLUMN owner TEXT DEFAULT 'ops'",))
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate(db, later) == len(later)
    assert migrate(db, later) == len(later)  # nothing left to do: no "duplicate column" error
    assert db.execute("SELECT id, owner FROM tasks").fetchall() == [("t1", "ops")]
    db.close()


def test_a_failing_migration_leaves_the_previous_version(tmp_path):
    path = tmp_path / "j.db"
    Journal(path).close()
    broken = (*MIGRATIONS, ("CREATE TABLE extra (x)", "THIS IS NOT SQL"))
    db = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        migrate(db, broken)
    assert schema_version(db) == len(MIGRATIONS)
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None
    db.close()


# --- item lifecycle ------------------------------------------------------------------------------


def test_a_task_runs_from_pending_to_succeeded(journal):
    journal.submit(batch("t1", rows_per_item=3))
    assert journal.get("t1").state == TaskState.PENDING
    journal.mark_dispatched("t1/0", "veh-1", 1)
    assert journal.get("t1").state == TaskState.DISPATCHED
    assert journal.mark_running("t1/0", 1)
    assert not journal.mark_running("t1/0", 1)  # already running: ignored
    assert journal.get("t1").state == TaskState.RUNNING
    journal.mark_dispatched("t1/1", "veh-2", 1)
    assert journal.record_result("t1/1", 1, b"b", node="veh-2")  # no accept seen: fine
    assert journal.record_result("t1/0", 1, b"a", node="veh-1")
    assert journal.finish("t1", TaskState.SUCCEEDED, summary=b"ab") == []
    record = journal.get("t1")
    assert record.state == TaskState.SUCCEEDED and record.result_summary == b"ab"
    assert [i.result for i in record.items] == [b"a", b"b"]
    kinds = [e.kind for e in journal.history("t1")]
    assert kinds == ["submitted", "dispatched", "dispatched", "result", "result", "succeeded"]


def test_dispatch_needs_the_current_attempt_and_a_waiting_item(journal):
    journal.submit(batch("t1"))
    with pytest.raises(LocalProtocolError, match="attempt 2, not 1"):
        journal.mark_dispatched("t1/0", "veh-1", 2)
    journal.mark_dispatched("t1/0", "veh-1", 1)
    with pytest.raises(InvalidTransition):
        journal.mark_dispatched("t1/0", "veh-1", 1)
    with pytest.raises(UnknownTaskError):
        journal.mark_dispatched("t9/0", "veh-1", 1)


def test_retryable_failures_bump_the_attempt_and_stale_ones_are_ignored(journal):
    journal.submit(batch("t1"))
    journal.mark_dispatched("t1/0", "veh-1", 1)
    assert journal.record_failure("t1/0", 1, "overloaded", retryable=True)
    item = journal.get("t1").items[0]
    assert (item.state, item.attempt, item.error) == (TaskState.RETRYING, 2, "overloaded")
    assert not journal.record_failure("t1/0", 1, "again", retryable=True)  # old attempt
    journal.mark_dispatched("t1/0", "veh-2", 2)
    assert journal.record_result("t1/0", 1, b"late but fine", node="veh-1")  # attempt 1 answered
    assert not journal.record_result("t1/0", 2, b"second")
    assert not journal.record_failure("t1/0", 2, "too late", retryable=False)
    item = journal.get("t1").items[0]
    assert (item.state, item.result, item.result_attempt) == (
        TaskState.SUCCEEDED, b"late but fine", 1,
    )  # fmt: skip
    assert journal.stats().counters == {"duplicate_results": 1, "ignored_failures": 2}


def test_a_late_result_is_accepted_while_the_item_waits_for_its_retry(journal):
    journal.submit(batch("t1"))
    journal.mark_dispatched("t1/0", "veh-1", 1)
    assert journal.record_failure("t1/0", 1, "timed out", retryable=True)
    assert journal.record_result("t1/0", 1, b"slow but here")
    with pytest.raises(InvalidTransition):  # nothing left to retry
        journal.mark_dispatched("t1/0", "veh-2", 2)
    assert journal.get("t1").items[0].state == TaskState.SUCCEEDED


def test_final_failures_and_failing_a_waiting_item(journal):
    journal.submit(batch("t1"))
    journal.mark_dispatched("t1/0", "veh-1", 1)
    assert journal.record_failure("t1/0", 1, "model missing", retryable=False)
    assert journal.record_failure("t1/1", 1, "no node has the model", retryable=False)
    assert not journal.record_failure("t1/2", 1, "pending items cannot retry", retryable=True)
    states = [i.state for i in journal.get("t1").items]
    assert states == [TaskState.FAILED, TaskState.FAILED, TaskState.PENDING]
    assert not journal.record_result("t1/0", 1, b"x")
    assert journal.stats().counters["late_results"] == 1


def test_results_for_unknown_items_and_undispatched_attempts_are_refused(journal):
    journal.submit(batch("t1"))
    assert not journal.record_result("nope/0", 1, b"x")
    assert not journal.record_result("t1/0", 1, b"x")  # never dispatched
    journal.mark_dispatched("t1/0", "veh-1", 1)
    assert not journal.record_result("t1/0", 2, b"x")  # attempt 2 was never sent
    assert not journal.record_result("t1/0", 0, b"x")
    assert journal.stats().counters == {"unknown_results": 1, "unexpected_results": 3}
    assert journal.get("t1").items[0].result is None


def test_a_result_vouched_as_sent_carries_its_unjournaled_dispatch(journal):
    journal.submit(batch("t1"))
    # attempt 2 was never sent, vouched or not; attempt 1 of t1/0 went to veh-1, unjournaled
    assert not journal.record_result("t1/0", 2, b"x", sent_to="veh-1")
    assert journal.record_result("t1/0", 1, b"a", node="veh-9", sent_to="veh-1")
    assert journal.get("t1").state == TaskState.RUNNING  # moved as the dispatch would have
    item = journal.get("t1").items[0]
    assert (item.state, item.node, item.result, item.result_attempt) == (
        TaskState.SUCCEEDED, "veh-1", b"a", 1,
    )  # fmt: skip
    history = [(e.kind, e.item_id, e.detail) for e in journal.history("t1")][1:]
    assert history == [
        ("dispatched", "t1/0", "attempt 1 to veh-1"), ("result", "t1/0", "attempt 1 from veh-9"),
    ]  # fmt: skip
    # a retrying item: the vouched result of its current attempt counts as that attempt's
    journal.mark_dispatched("t1/1", "veh-1", 1)
    assert journal.record_failure("t1/1", 1, "overloaded", retryable=True)
    assert journal.record_result("t1/1", 2, b"b", sent_to="veh-2")
    assert journal.get("t1").items[1].node == "veh-2"
    # a dispatched item needs no voucher, and the voucher changes nothing there
    journal.mark_dispatched("t1/2", "veh-3", 1)
    assert journal.record_result("t1/2", 1, b"c", sent_to="veh-3")
    assert not journal.record_result("t1/2", 1, b"c", sent_to="veh-3")  # still once
    assert journal.stats().counters == {"unexpected_results": 1, "duplicate_results": 1}


def test_a_result_and_the_end_it_decides_commit_together_or_not_at_all(journal):
    zeros = Tensor.from_array(np.zeros((1, 2), np.float32))
    journal.submit(TaskSpec("one", Pattern.SINGLE, zeros, models=(ModelRef("digits", "1"),)))
    bad_end = TaskEnding("one", TaskState.CANCELLED, b"s", None, read_back=False)  # not final
    with pytest.raises(LocalProtocolError):
        journal.take_result("one/0", 1, b"r", sent_to="veh-1", ending=bad_end)
    record = journal.get("one")  # the result was rolled back with the failed end
    assert record.state == record.items[0].state == TaskState.PENDING
    assert record.items[0].result is None
    good_end = TaskEnding("one", TaskState.SUCCEEDED, b"s", None, read_back=True)
    fresh, (in_flight, record) = journal.take_result(
        "one/0", 1, b"r", sent_to="veh-1", ending=good_end
    )
    assert fresh and in_flight == [] and record.state == TaskState.SUCCEEDED
    assert record.items[0].result == b"r"


def test_cancel_stops_live_items_and_reports_those_in_flight(journal):
    journal.submit(batch("t1"))
    journal.mark_dispatched("t1/0", "veh-1", 1)
    journal.mark_dispatched("t1/1", "veh-2", 1)
    assert journal.record_result("t1/1", 1, b"done")
    assert journal.cancel("t1") == [("t1/0", "veh-1")]
    assert journal.cancel("t1") is None  # idempotent: it had ended
    record = journal.get("t1")
    assert record.state == TaskState.CANCELLED
    assert [i.state for i in record.items] == [
        TaskState.CANCELLED, TaskState.SUCCEEDED, TaskState.CANCELLED,
    ]  # fmt: skip
    assert not journal.record_result("t1/0", 1, b"late")
    assert journal.finish("t1", TaskState.SUCCEEDED) == []  # already over: left alone
    assert journal.get("t1").state == TaskState.CANCELLED
    with pytest.raises(UnknownTaskError):
        journal.cancel("t9")


def test_finish_cancels_leftovers_and_takes_only_final_states(journal):
    journal.submit(TaskSpec("p", Pattern.PARALLEL, _INPUT, (ModelRef("a"), ModelRef("b"))))
    journal.mark_dispatched("p/0", "veh-1", 1)
    journal.mark_dispatched("p/1", "veh-2", 1)
    assert journal.record_result("p/0", 1, b"a")
    with pytest.raises(LocalProtocolError):
        journal.finish("p", TaskState.RUNNING)
    assert journal.finish("p", TaskState.FAILED, error="quorum lost") == [("p/1", "veh-2")]
    record = journal.get("p")
    assert record.state == TaskState.FAILED and record.summary.error == "quorum lost"


# --- exactly once under any interleaving ----------------------------------------------------------

_ops = st.lists(
    st.tuples(
        # weighted: cancel ends everything, so it is rare
        st.sampled_from(
            ["dispatch"] * 3
            + ["result"] * 3
            + ["sent_result", "accept", "fail", "retry", "restart"]
            + ["restart", "cancel"]
        ),
        st.integers(0, 1),  # item
        st.integers(-1, 1),  # attempt offset from the item's current attempt
    ),
    min_size=4,
    max_size=25,
)


@fresh_files(100)
@given(ops=_ops)
@example(ops=[("dispatch", 0, 0), ("restart", 0, 0), ("result", 0, -1), ("result", 0, 0)])
@example(ops=[("dispatch", 1, 0), ("retry", 1, 0), ("result", 1, -1), ("dispatch", 1, 0)])
def test_each_item_gets_exactly_one_result_under_any_interleaving(tmp_path, ops):
    path = tmp_path / f"{uuid.uuid4().hex}.db"
    journal = Journal(path, synchronous="NORMAL")
    journal.submit(batch("t", rows_per_item=3))  # two items
    accepted: dict[str, bytes] = {}
    refused = 0
    for serial, (op, index, offset) in enumerate(ops):
        item_id = f"t/{index}"
        item = journal.get("t").items[index]
        attempt = item.attempt + offset
        if op == "dispatch" and item.state in (TaskState.PENDING, TaskState.RETRYING):
            journal.mark_dispatched(item_id, f"veh-{serial % 3}", item.attempt)
        elif op == "accept":
            journal.mark_running(item_id, attempt)
        elif op in ("result", "sent_result"):  # sent_result: its dispatch vouched for
            blob = f"{item_id}#{serial}".encode()
            sent_to = "veh-0" if op == "sent_result" else None
            if journal.record_result(item_id, attempt, blob, sent_to=sent_to):
                assert item_id not in accepted, "a second result was accepted"
                accepted[item_id] = blob
            else:
                refused += 1
        elif op in ("fail", "retry"):
            journal.record_failure(item_id, attempt, op, retryable=op == "retry")
        elif op == "restart":
            journal.close()
            journal = Journal(path, synchronous="NORMAL")
            journal.recover()
        elif op == "cancel":
            journal.cancel("t")
    record, stats = journal.get("t"), journal.stats()
    journal.close()
    for item in record.items:
        assert item.result == accepted.get(item.item_id)
        assert (item.state == TaskState.SUCCEEDED) == (item.item_id in accepted)
    counters = stats.counters
    result_refusals = ("duplicate_results", "late_results", "unknown_results", "unexpected_results")
    assert sum(counters.get(name, 0) for name in result_refusals) == refused


# --- listing -------------------------------------------------------------------------------------


def test_list_filters_by_state_model_and_time(journal):
    journal.submit(batch("a", model="digits"))
    journal.submit(batch("b", model="yolo"))
    journal.submit(TaskSpec("c", Pattern.PARALLEL, _INPUT, (ModelRef("digits"), ModelRef("yolo"))))
    journal.cancel("a")
    created = {t.task_id: t.created_at for t in journal.list().tasks}
    assert [t.task_id for t in journal.list().tasks] == ["c", "b", "a"]  # newest first
    assert [t.task_id for t in journal.list(state="cancelled").tasks] == ["a"]
    assert [t.task_id for t in journal.list(state=TaskState.PENDING).tasks] == ["c", "b"]
    assert [t.task_id for t in journal.list(model="yolo").tasks] == ["c", "b"]
    assert [t.task_id for t in journal.list(since=created["b"]).tasks] == ["c", "b"]
    assert [
        t.task_id for t in journal.list(model="yolo", state="pending", since=created["c"]).tasks
    ] == ["c"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 100_000}, "limit"),
        ({"cursor": "abc"}, "cursor"),
        ({"cursor": "-1"}, "cursor"),
        ({"cursor": "\u00b2"}, "cursor"),  # a digit to str.isdigit, not to int()
        ({"state": "sleeping"}, "state"),
    ],
)
def test_list_refuses_bad_arguments(journal, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        journal.list(**kwargs)


@fresh_files(40)
@given(
    initial=st.integers(0, 25),
    page=st.integers(1, 7),
    inserts=st.lists(st.integers(0, 4), max_size=10),
    finish_some=st.booleans(),
)
def test_pagination_loses_and_repeats_nothing_while_tasks_arrive(
    tmp_path, initial, page, inserts, finish_some
):
    with fresh_journal(tmp_path, synchronous="NORMAL") as journal:
        for i in range(initial):
            journal.submit(batch(f"old-{i}"))
        counter, seen, cursor = itertools.count(), [], None
        for burst in itertools.chain(inserts, itertools.repeat(0)):
            result = journal.list(limit=page, cursor=cursor)
            seen.extend(t.task_id for t in result.tasks)
            for _ in range(burst):  # submitted between two page reads
                journal.submit(batch(f"new-{next(counter)}"))
            if finish_some and seen:
                journal.cancel(seen[-1])  # state changes must not move rows between pages
            cursor = result.next_cursor
            if cursor is None:
                break
    assert len(seen) == len(set(seen))
    assert {f"old-{i}" for i in range(initial)} <= set(seen)


# --- recovery ------------------------------------------------------------------------------------


def test_recover_requeues_in_flight_items_and_skips_finished_tasks(tmp_path):
    path = tmp_path / "j.db"
    with Journal(path) as journal:
        journal.submit(batch("live"))
        journal.submit(batch("over"))
        journal.mark_dispatched("live/0", "veh-1", 1)
        journal.mark_dispatched("live/1", "veh-2", 1)
        journal.mark_running("live/1", 1)
        journal.mark_dispatched("live/2", "veh-3", 1)
        journal.record_result("live/2", 1, b"done")
        journal.finish("over", TaskState.FAILED, error="given up")
    with Journal(path) as journal:
        (recovered,) = journal.recover()
        assert recovered.task.task_id == "live"
        to_dispatch = {i.item_id: i for i in recovered.to_dispatch}
        assert set(to_dispatch) == {"live/0", "live/1"}
        assert all(i.state == TaskState.PENDING and i.attempt == 2 for i in to_dispatch.values())
        assert to_dispatch["live/0"].node == "veh-1"  # where it went last: avoid or reuse
        assert journal.record_result("live/0", 1, b"old attempt still counts")
        journal.mark_dispatched("live/1", "veh-4", 2)
        assert journal.record_result("live/1", 2, b"new attempt")
        assert [e.kind for e in journal.history("live")].count("requeued") == 2


def test_refused_attempts_are_counted_and_read_back_after_recovery(tmp_path):
    path = tmp_path / "j.db"
    with Journal(path) as journal:
        journal.submit(batch("t1"))
        journal.mark_dispatched("t1/0", "veh-1", 1)
        assert journal.record_failure("t1/0", 1, "node is draining", retryable=True, refused=True)
        journal.mark_dispatched("t1/0", "veh-2", 2)
        assert journal.record_failure("t1/0", 2, "no answer", retryable=True)
        journal.mark_dispatched("t1/0", "veh-3", 3)
    with Journal(path) as journal:
        (recovered,) = journal.recover()
        item = next(i for i in recovered.to_dispatch if i.item_id == "t1/0")
        assert (item.attempt, item.refused) == (4, 1)  # (the requeue counts: fate unknown)
        assert [e.kind for e in journal.history("t1")].count("refused") == 1
        assert [e.kind for e in journal.history("t1")].count("retry") == 1


def test_a_version_1_journal_gains_the_refused_column(tmp_path, monkeypatch):
    path = tmp_path / "j.db"
    with monkeypatch.context() as patch:  # a journal written by the first release (schema v1)
        patch.setattr(journal_module, "migrate", lambda db: migrate(db, MIGRATIONS[:1]))
        with Journal(path) as journal:
            journal.submit(batch("t1"))
    with sqlite3.connect(path) as db:
        assert schema_version(db) == 1
        assert "refused" not in [row[1] for row in db.execute("PRAGMA table_info(items)")]
    db.close()
    with Journal(path) as journal:
        assert [i.refused for i in journal.get("t1").items] == [0] * 3
    with sqlite3.connect(path) as db:
        assert schema_version(db) == len(MIGRATIONS) == 4
    db.close()


def test_a_send_whose_dispatch_was_never_journaled_runs_again_after_recovery(tmp_path):
    path = tmp_path / "j.db"
    with Journal(path) as journal:
        journal.submit(batch("t1", rows_per_item=6))
        # the item went out; the coordinator died before its mark_dispatched committed
    with Journal(path) as journal:
        (recovered,) = journal.recover()
        (item,) = recovered.to_dispatch
        assert (item.item_id, item.state, item.attempt) == ("t1/0", TaskState.PENDING, 1)
        assert not journal.record_result("t1/0", 1, b"lost send")  # not journaled as sent
        journal.mark_dispatched("t1/0", "veh-2", 1)
        assert journal.record_result("t1/0", 1, b"answer")  # accepted once, whoever sent it
        assert not journal.record_result("t1/0", 1, b"the other answer")
        assert journal.stats().counters == {"unexpected_results": 1, "duplicate_results": 1}


def test_stats_count_tasks_items_and_events(journal):
    journal.submit(batch("a"))
    journal.submit(batch("b"))
    journal.mark_dispatched("a/0", "veh-1", 1)
    journal.record_result("a/0", 1, b"x")
    journal.record_result("a/0", 1, b"x")
    stats = journal.stats()
    assert stats.tasks == {"running": 1, "pending": 1}
    assert stats.items == {"pending": 5, "succeeded": 1}
    assert stats.counters == {"duplicate_results": 1}
    assert stats.events == 1  # the dispatch; the rows say the rest (see test_journal_history)


def test_stats_read_on_their_own_connection_wait_for_no_write_and_see_what_committed(journal):
    journal.submit(batch("a"))
    seen = []

    def meanwhile():  # runs inside a group: its transaction holds the write lock
        journal.submit(batch("b"))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            seen.append(pool.submit(read_stats, journal.path).result(timeout=5))

    journal.commit_group([meanwhile])
    assert seen[0].tasks == {"pending": 1} and seen[0].items == {"pending": 3}  # "b" not yet
    assert read_stats(journal.path) == journal.stats()
    assert journal.stats().tasks == {"pending": 2}


def test_pipeline_items_are_journaled_per_stage(journal):
    spec = TaskSpec("p", Pattern.PIPELINE, _INPUT, stages=(
        Stage("detect", ModelRef("yolo")), Stage("classify", ModelRef("digits"), ("detect",)),
    ))  # fmt: skip
    journal.submit(spec)
    items = journal.get("p").items
    assert [(i.item_id, i.stage, i.model.model_id) for i in items] == [
        ("p/detect", "detect", "yolo"), ("p/classify", "classify", "digits"),
    ]  # fmt: skip


# --- crash safety --------------------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from coordinator.journal import Journal
    from meshinfer.inference.base import ModelRef
    from meshinfer.proto.tasks import Pattern, TaskSpec, TaskState
    from meshinfer.proto.tasks_wire import Tensor

    journal = Journal(sys.argv[1])
    tensor = Tensor.from_array(np.zeros((4, 2), np.float32))
    for n in range(10_000):
        task_id = f"task-{n}"
        journal.submit(TaskSpec(task_id, Pattern.BATCH, tensor, (ModelRef("m"),), shard_size=2))
        print("submitted", task_id, flush=True)
        journal.mark_dispatched(f"{task_id}/0", "veh-1", 1)
        if journal.record_result(f"{task_id}/0", 1, b"r" * 512):
            print("result", f"{task_id}/0", flush=True)
        if n % 3 == 0:
            journal.mark_dispatched(f"{task_id}/1", "veh-2", 1)
            journal.record_result(f"{task_id}/1", 1, b"s" * 512)
            journal.finish(task_id, TaskState.SUCCEEDED, summary=b"ok")
            print("finished", task_id, flush=True)
    """
)


def run_until_killed(db_path: Path, kill_after: int, worker: str = _WORKER) -> list[list[str]]:
    """Run ``worker`` (a script printing one line per acknowledged write) on ``db_path``,
    SIGKILL it after ``kill_after`` acknowledgements; every complete line, split."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", worker, str(db_path)],
        stdout=subprocess.PIPE, cwd=REPO, env=env, text=True,
    )  # fmt: skip
    lines = []
    try:
        for line in child.stdout:
            lines.append(line)
            if len(lines) >= kill_after:
                break
        child.send_signal(signal.SIGKILL)
        lines.extend(child.stdout)  # whatever it acknowledged before dying
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return [line.split() for line in lines if line.endswith("\n")]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_acknowledged_task_is_lost_when_the_coordinator_is_killed(tmp_path, seed):
    db_path = tmp_path / "crash.db"
    acknowledged = run_until_killed(db_path, kill_after=random.Random(seed).randint(3, 60))
    submitted = {words[1] for words in acknowledged if words[0] == "submitted"}
    results = {words[1] for words in acknowledged if words[0] == "result"}
    finished = {words[1] for words in acknowledged if words[0] == "finished"}
    assert submitted
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with Journal(db_path) as journal:
        recovered = {r.task.task_id: r for r in journal.recover()}
        for task_id in submitted:
            record = journal.get(task_id)  # never lost
            assert record.spec.task_id == task_id
            if task_id in finished:
                assert record.state == TaskState.SUCCEEDED
            assert record.state in (TaskState.SUCCEEDED, TaskState.CANCELLED) or (
                task_id in recovered
            )
        for item_id in results:
            task = journal.get(item_id.split("/")[0])
            assert any(i.item_id == item_id and i.result == b"r" * 512 for i in task.items)
        for task in recovered.values():
            waiting = {i.item_id for i in task.to_dispatch}
            for item in task.task.items:
                assert (item.result is not None) or item.item_id in waiting


# --- retention -----------------------------------------------------------------------------------


def _rows(journal: Journal, table: str) -> int:
    (count,) = journal._db.execute(f"SELECT count(*) FROM {table}").fetchone()
    return count


def _orphans(journal: Journal) -> int:
    """Rows left behind by a deleted task: items, results and audit lines of no task."""
    (count,) = journal._db.execute(
        "SELECT (SELECT count(*) FROM items WHERE task_id NOT IN (SELECT id FROM tasks))"
        " + (SELECT count(*) FROM results WHERE item_id NOT IN (SELECT id FROM items))"
        " + (SELECT count(*) FROM events WHERE task_id NOT IN (SELECT id FROM tasks))"
    ).fetchone()
    return count


def test_prune_forgets_only_tasks_that_ended_long_enough_ago(tmp_path):
    clock = FakeClock()
    with Journal(tmp_path / "j.db", wall_clock=clock) as journal:
        for task_id in ("old", "recent", "live"):
            journal.submit(batch(task_id))
        journal.mark_dispatched("old/0", "veh-1", 1)
        journal.record_result("old/0", 1, b"x", node="veh-1")
        journal.finish("old", TaskState.SUCCEEDED, summary=b"x")
        clock.now += 1_000
        journal.cancel("recent")
        journal.mark_dispatched("live/0", "veh-1", 1)
        clock.now += 500
        assert journal.prune(older_than_s=900) == 1
        with pytest.raises(UnknownTaskError):
            journal.get("old")
        assert journal.history("old") == []
        assert journal.get("recent").state == TaskState.CANCELLED
        assert journal.get("live").state == TaskState.DISPATCHED
        assert _rows(journal, "results") == 0 and _orphans(journal) == 0
        assert journal.stats().counters == {"pruned_tasks": 1}
        assert journal.prune(older_than_s=900) == 0  # nothing else is old enough
        assert journal.accept(batch("old"))  # a pruned id is a new task again


def test_prune_goes_oldest_first_and_at_most_limit_tasks_per_call(tmp_path):
    clock = FakeClock()
    with Journal(tmp_path / "j.db", wall_clock=clock) as journal:
        journal.submit(batch("live"))
        ids = [f"t{i}" for i in range(5)]
        for task_id in ids:
            journal.submit(batch(task_id))  # the oldest task still runs: it holds back no other
        for task_id in reversed(ids):  # ends in the opposite order of submission
            journal.cancel(task_id)
        clock.now += 100
        assert journal.prune(0, limit=2) == 2
        assert {r.task_id for r in journal.list().tasks} == {"live", "t2", "t3", "t4"}
        assert journal.prune(0, limit=2) == 2
        assert journal.prune(0, limit=2) == 1
        assert [r.task_id for r in journal.list().tasks] == ["live"]
        assert _rows(journal, "items") == 3 and _orphans(journal) == 0


def test_prune_also_drops_old_audit_lines_about_no_task(journal):
    journal._log("note", None, detail="coordinator restarted")
    journal.submit(batch("t"))  # writes the logged line with its own
    journal.mark_dispatched("t/0", "veh-1", 1)
    assert _rows(journal, "events") == 2
    assert journal.prune(0) == 0
    assert [e.kind for e in journal.history("t")] == ["submitted", "dispatched"]
    assert _rows(journal, "events") == 1


def test_prune_refuses_a_negative_age_or_an_empty_batch(journal):
    for kwargs in ({"older_than_s": -1}, {"older_than_s": 0, "limit": 0}):
        with pytest.raises(LocalProtocolError, match="prune"):
            journal.prune(**kwargs)


_PRUNE_OPS = st.lists(
    st.tuples(st.sampled_from(["submit", "finish", "cancel", "tick", "prune"]), st.integers(0, 5)),
    max_size=40,
)


@fresh_files(150)
@given(ops=_PRUNE_OPS)
def test_prune_never_touches_live_tasks_or_leaves_orphans(tmp_path, ops):
    clock = FakeClock()
    ended_at: dict[str, float] = {}
    with fresh_journal(tmp_path, wall_clock=clock) as journal:
        submitted: set[str] = set()
        for op, n in ops:
            task_id = f"t{n}"
            if op == "submit" and task_id not in submitted:
                journal.submit(batch(task_id))
                submitted.add(task_id)
            elif op in ("finish", "cancel") and task_id in submitted - ended_at.keys():
                if op == "finish":
                    journal.finish(task_id, TaskState.FAILED, error="no")
                else:
                    journal.cancel(task_id)
                ended_at[task_id] = journal.get(task_id).summary.updated_at
            elif op == "tick":
                clock.now += 10 * n
            elif op == "prune":
                cutoff = clock.now + 1 - 5 * n  # prune reads the clock once (+1)
                gone = journal.prune(5 * n)
                expired = {t for t, at in ended_at.items() if at < cutoff}
                assert gone == len(expired)
                submitted -= expired
                for t in expired:
                    del ended_at[t]
            assert {r.task_id for r in journal.list().tasks} == submitted
            assert _orphans(journal) == 0
        for task_id in submitted - ended_at.keys():
            assert len(journal.get(task_id).items) == 3  # live tasks keep every item
