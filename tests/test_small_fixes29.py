"""Session 29 small fixes.

* node/executor.py: a float64 output with a finite value beyond float32's range fails its item
  clearly (it went as inf); inf and NaN still travel as they are, a big output is still packed
  in the batcher's worker thread.
* coordinator/journal.py ``read_stats``: a journal it cannot read (denied, missing, a
  directory, under a file, another application's database) is a JournalFileError or
  SchemaError naming the file and what to do, not a bare ``sqlite3`` error.
* meshinfer/proto/identity.py ``RevocationList``: a merge checks only the entries new to the
  list (its own were checked when it was built), and one that adds nothing is the list itself;
  entries of another fleet are still refused.

Real batchers and engines over the in-memory transport, real SQLite files, a real subprocess.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from coordinator.journal import Journal, read_stats
from coordinator.journal_files import JournalFileError
from coordinator.journal_schema import SchemaError
from meshinfer.errors import InferenceError, LocalProtocolError, RevocationError
from meshinfer.inference.base import ModelRef
from meshinfer.inference.batching import INLINE_MAX_BYTES, BatcherConfig, DynamicBatcher
from meshinfer.proto.identity import FleetAuthority, RevocationEntry, RevocationList
from meshinfer.proto.tasks_wire import (
    FailureKind,
    TaskAssign,
    TaskFailed,
    TaskResult,
    Tensor,
    encode_params,
)
from node.executor import TaskExecutor, _wire_tensor
from tests.test_batching import EchoEngine
from tests.test_executor_sharing import KEEPING, Net, WorkerMesh, soon
from tests.test_node_loop_fixes27 import answer

REPO = Path(__file__).resolve().parent.parent

# --- a float64 output beyond float32's range ------------------------------------------------------

ECHO = ModelRef("echo", "1")
#: An input value the engine answers with 1e300 (finite in float64, beyond float32).
HUGE_AT = -3.0


class Float64Echo(EchoEngine):
    """Echoes ``2x + 1`` as float64, and 1e300 where the input is :data:`HUGE_AT`."""

    async def infer(self, ref, batch):
        out = (await super().infer(ref, batch)).astype(np.float64)
        return np.where(batch == HUGE_AT, 1e300, out)


@contextlib.asynccontextmanager
async def float64_worker():
    batcher = DynamicBatcher(Float64Echo(), ECHO, BatcherConfig(max_queue_delay_s=0.0))
    async with Net() as net:
        net.gate.set()
        await batcher.start()
        executor = TaskExecutor(WorkerMesh("w", net.w, net.w.admission, net.members),
                                {ECHO: batcher}, KEEPING)  # fmt: skip
        executor.start()
        net.executors.append(executor)
        try:
            yield net, executor
        finally:
            await executor.aclose()
            await batcher.aclose()


async def answer_to(net: Net, item_id: str, inputs: np.ndarray) -> TaskResult | TaskFailed:
    x = Tensor.from_array(inputs)
    msg = TaskAssign(item_id, f"task-{item_id}", "echo", "1", x, encode_params({}), None, 0, 1)
    await net.nodes["coord"].peers.request("w", msg)
    await soon(lambda: answer(net, item_id) is not None)
    return answer(net, item_id)


async def test_a_float64_output_beyond_float32_fails_its_item_naming_the_overflow():
    """It was sent as float32 with the value turned to inf, as if the engine had said inf."""
    async with float64_worker() as (net, executor):
        failed = await answer_to(net, "x", np.array([[1.0, HUGE_AT, 2.0]], np.float32))
    assert isinstance(failed, TaskFailed), failed
    assert failed.code == FailureKind.INFERENCE_ERROR and not failed.retryable
    assert "float64 output cannot be sent" in failed.message
    assert "1 value(s) overflow float32" in failed.message and "1e+300" in failed.message
    assert "at index (0, 1)" in failed.message
    assert executor.stats.failed["inference_error"] == 1


def test_inf_and_nan_of_a_float64_output_are_packed_as_they_are_on_any_thread():
    """inf and NaN were already so in float64: faithful as float32. (The batcher refuses an
    engine's non-finite output before it gets here; :func:`_wire_tensor` stands alone.) Its
    check is the cast's overflow flag, which is per thread: in the batcher's thread too."""
    output = np.array([[np.inf, -np.inf, np.nan, 3.4028234e38, -1.5]], np.float64)
    with ThreadPoolExecutor(1) as pool:
        for tensor in (_wire_tensor(output), pool.submit(_wire_tensor, output).result()):
            assert tensor.dtype == "float32"
            np.testing.assert_array_equal(tensor.to_array(), output.astype(np.float32))
        with pytest.raises(InferenceError, match=r"2 value\(s\) overflow float32"):
            pool.submit(_wire_tensor, np.array([[np.nan, -1e39, 1e300]])).result()


async def test_a_big_float64_output_is_checked_in_the_worker_thread_too():
    """6.5 MB of float64 (packed in the batcher's thread) with one value too big, at the end."""
    inputs = np.zeros((100, 8192), np.float32)
    inputs[99, 8191] = HUGE_AT
    assert inputs.nbytes > INLINE_MAX_BYTES
    async with float64_worker() as (net, _executor):
        failed = await answer_to(net, "big", inputs)
        assert isinstance(failed, TaskFailed), failed
        assert "1 value(s) overflow float32" in failed.message
        assert "at index (99, 8191)" in failed.message
        inputs[99, 8191] = 1.0  # the same size, nothing too big: it goes
        result = await answer_to(net, "fine", inputs)
    assert isinstance(result, TaskResult), result
    np.testing.assert_array_equal(result.output.to_array(), inputs * 2 + 1)


# --- read_stats of a journal it cannot read -------------------------------------------------------

_READ_AS_NOBODY = """
import os, sys
from coordinator.journal import read_stats
from coordinator.journal_files import JournalFileError
os.setgid(65534)
os.setuid(65534)
try:
    read_stats(sys.argv[1])
except JournalFileError as exc:
    print("JournalFileError:", exc)
"""


def test_read_stats_of_a_journal_this_user_may_not_read_names_it_and_what_to_do(tmp_path):
    """A real EACCES: as root (whom permissions do not stop) the reader drops to ``nobody``
    in a subprocess; otherwise the journal is made unreadable (mode 0). It was sqlite's
    "unable to open database file", naming neither the file nor why."""
    path = tmp_path / "journal.db"
    with Journal(path):
        pass
    if os.geteuid() == 0:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        run = subprocess.run([sys.executable, "-c", _READ_AS_NOBODY, str(path)], env=env,
                             capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        text = run.stdout + run.stderr
        assert text.startswith("JournalFileError:"), text
        assert "belongs to user root" in text and "run this as user root" in text
    else:
        path.chmod(0)
        with pytest.raises(JournalFileError) as caught:
            read_stats(path)
        text = str(caught.value)
        assert "check the permissions of" in text and "(mode 0000)" in text
    assert f"journal {path}: cannot read" in text and "Permission denied" in text


def other_application(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    sqlite3.connect(path).close()


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("missing", "cannot read {path}: No such file or directory"),
        ("under_a_file", "cannot read {path}: Not a directory"),
        ("directory", "{path} is a directory, not a file"),
        ("random_bytes", "it is not an SQLite database"),
        ("empty", "it holds no journal tables"),
        ("other_application", "not a meshinfer journal (it holds other tables: users)"),
    ],
)
def test_read_stats_of_a_file_that_is_no_journal_names_it_and_why(tmp_path, where, expected):
    path = tmp_path / "journal.db"
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "journal.db"
    elif where == "directory":
        path.mkdir()
    elif where == "random_bytes":
        path.write_bytes(os.urandom(4096))
    elif where == "empty":
        path.write_bytes(b"")
    elif where == "other_application":
        other_application(path)
    with pytest.raises((JournalFileError, SchemaError)) as caught:
        read_stats(path)
    text = str(caught.value)
    assert text.startswith(f"journal {path}") and expected.format(path=path) in text


def test_read_stats_of_a_journal_still_reads_it(tmp_path):
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        assert read_stats(path) == journal.stats()
        assert read_stats(str(path)).tasks == {}


# --- a revocation list's merge checks only what is new --------------------------------------------


def entry(sequence: int, fleet: str = "fleet") -> RevocationEntry:
    """An entry (its signature a placeholder: a list does not verify, its decoding does)."""
    return RevocationEntry(fleet, sequence, 1.0, sequence, None, "gone", signature=bytes(64))


def smuggled(fleet: str, entries: set[RevocationEntry]) -> RevocationList:
    """A list of ``fleet`` holding ``entries`` though one is another fleet's: built past the
    constructor's check (as no code here does), to see which entries a merge looks at."""
    made = RevocationList(fleet)
    object.__setattr__(made, "entries", frozenset(entries))
    return made


def test_a_merge_checks_the_new_entries_only_not_the_lists_own():
    """The list's own entries were checked when it was built: a merge no longer walks them
    all again (a Python pass of ~1 ms per merge at 16k entries). Shown with a list whose own
    entries hold one of another fleet, smuggled past that check: old code refused the merge."""
    held = smuggled("fleet", {entry(1), entry(2, "elsewhere")})
    merged = held.merge(RevocationList("fleet", {entry(3)}))
    assert {e.sequence for e in merged.entries} == {1, 2, 3}


def test_new_entries_of_another_fleet_are_still_refused():
    with pytest.raises(LocalProtocolError, match="mixes entries of different fleets"):
        RevocationList("fleet", {entry(1), entry(2, "elsewhere")})
    with pytest.raises(LocalProtocolError, match="mixes entries of different fleets"):
        RevocationList("fleet", {entry(1)}).merge(smuggled("fleet", {entry(2, "elsewhere")}))
    with pytest.raises(LocalProtocolError, match="cannot merge revocations of 'elsewhere'"):
        RevocationList("fleet").merge(RevocationList("elsewhere", {entry(1, "elsewhere")}))


def test_a_merge_that_adds_nothing_is_the_list_itself_and_keeps_its_indexes():
    whole = RevocationList("fleet", {entry(i) for i in range(1, 6)})
    assert whole._by_serial  # (its index, built)
    assert whole.merge(whole.since(2)) is whole and whole.merge(RevocationList("fleet")) is whole
    assert "_by_serial" in vars(whole.merge(whole))


def test_merge_and_since_keep_their_meaning():
    a = RevocationList("fleet", {entry(1), entry(2)})
    b = RevocationList("fleet", {entry(2), entry(3)})
    assert a.merge(b) == b.merge(a) == RevocationList("fleet", {entry(1), entry(2), entry(3)})
    assert a.merge(b).merge(b) == a.merge(b) and a.merge(b).version == 3
    assert a.merge(b).since(1) == b and a.since(2) == RevocationList("fleet")


def test_a_decoded_list_still_verifies_every_entry():
    authority = FleetAuthority.create("fleet", seed=bytes(32))
    listed = authority.revoke(RevocationList("fleet"), now=5.0, serial=7, reason="lost")
    listed = authority.revoke(listed, now=6.0, node_id="n2", reason="sold")
    assert RevocationList.from_bytes(listed.to_bytes(), authority.trust) == listed
    forged = listed.merge(RevocationList("fleet", {entry(9)}))  # (a placeholder signature)
    with pytest.raises(RevocationError, match="revocation entry 9 has a bad signature"):
        RevocationList.from_bytes(forged.to_bytes(), authority.trust)
