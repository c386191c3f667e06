"""Follow-ups of session 29: input files the readers did not foresee are named as such (not as
an unexpected answer of the coordinator), the journal's read-only hint fits a reader too, and a
revocation list's version is computed once per list.

The CLI runs in process (``main(argv)``) against the scripted HTTP server of
:mod:`tests.test_client_config_hunt` on loopback; the journal errors are SQLite's own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import input_files
from coordinator.cli import main as coord_main
from coordinator.input_files import load_inputs
from coordinator.journal_files import JournalFileError, explained
from meshinfer.errors import ConfigError
from meshinfer.proto.identity import FleetAuthority, RevocationList
from tests.test_client_config_hunt import TOKEN, ScriptedServer, one_line_error

# --- input files ------------------------------------------------------------------------------

#: PGM files whose numbers Python's int() refuses (4300 digits or more): a bare ValueError.
LONG_NUMBER_PGMS = {
    "width": b"P2 " + b"9" * 5000 + b" 2 255\n1 2 3 4\n",
    "maxval": b"P2 2 2 " + b"6" * 5000 + b"\n1 2 3 4\n",
    "pixel": b"P2 2 2 255\n" + b"1" * 5000 + b" 1 1 1\n",
}


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as scripted:
        yield scripted


def submit(server: ScriptedServer, path: Path) -> int:
    argv = ["submit", "--url", server.url, "--timeout", "5", "--model", "m@1"]
    return coord_main([*argv, "--input", str(path)])


@pytest.mark.parametrize("where", sorted(LONG_NUMBER_PGMS))
def test_a_pgm_with_a_huge_number_is_a_config_error_naming_the_file(tmp_path, where):
    path = tmp_path / f"{where}.pgm"
    path.write_bytes(LONG_NUMBER_PGMS[where])
    with pytest.raises(ConfigError, match=rf"{where}\.pgm: PGM .* out of range"):
        load_inputs([path])


def test_a_pgm_with_long_but_fitting_numbers_still_reads(tmp_path):
    path = tmp_path / "zeros.pgm"
    zeros = b"0" * 5000  # (as many as int() refuses: they are dropped first)
    path.write_bytes(b"P2 00002 2 " + zeros + b"255\n0 255 " + zeros + b"255 0\n")
    assert load_inputs([path]).shape == (1, 64)


def test_a_csv_cell_with_an_underscore_is_not_a_number(tmp_path):
    """float() reads "1_0" as 10 (Python's digit grouping): a typo read as another number."""
    path = tmp_path / "rows.csv"
    path.write_text("1,2\n1_0,3\n")
    with pytest.raises(ConfigError, match=r"rows\.csv: line 2 holds something that is not a"):
        load_inputs([path])
    path.write_text("a_b,c\n1,2\n")  # (a header line may hold one)
    assert load_inputs([path]).tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize("where", sorted(LONG_NUMBER_PGMS))
def test_submit_names_a_bad_pgm_and_asks_nothing(server, tmp_path, capsys, monkeypatch, where):
    """The ValueError read as "unexpected answer from the coordinator", which was never asked."""
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    path = tmp_path / f"{where}.pgm"
    path.write_bytes(LONG_NUMBER_PGMS[where])
    assert submit(server, path) == 2
    err = one_line_error(capsys, "meshinfer-coord")
    assert f"{where}.pgm" in err and "unexpected answer" not in err, err
    assert not server.requests


def test_an_unforeseen_reader_error_names_the_file(server, tmp_path, capsys, monkeypatch):
    """Any error a reader did not foresee is the file's: a stand-in reader raising a bare
    TypeError (as the PGM reader's ValueError did) gives one line naming the file."""

    def reader(name: str, data: bytes, key: str | None) -> None:
        raise TypeError("unforeseen")

    monkeypatch.setitem(input_files._READERS, ".csv", reader)
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    path = tmp_path / "rows.csv"
    path.write_text("1,2\n")
    with pytest.raises(ConfigError, match=r"rows\.csv: .*TypeError: unforeseen"):
        load_inputs([path])
    assert submit(server, path) == 2
    err = one_line_error(capsys, "meshinfer-coord")
    assert "rows.csv" in err and "unexpected answer" not in err, err
    assert not server.requests


def test_a_bad_answer_is_still_named_as_the_coordinators(server, tmp_path, capsys, monkeypatch):
    """The other side of the split: the same kind of error reading the answer keeps its label."""
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    server.script("POST", "/v1/tasks", {"accepted": True}, status=201)  # no task_id, no state
    path = tmp_path / "rows.csv"
    path.write_text("1,2\n")
    assert submit(server, path) == 2
    assert "unexpected answer from the coordinator" in one_line_error(capsys, "meshinfer-coord")


# --- the journal's read-only hint -------------------------------------------------------------


def test_the_read_only_hint_fits_a_reader_too(tmp_path):
    """A read-only connection writing is SQLite's "attempt to write a readonly database"; the
    hint said "the coordinator must write its journal", wrong where a reader (read_stats) met it."""
    path = tmp_path / "journal.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        with pytest.raises(JournalFileError) as caught, explained(path):
            db.execute("INSERT INTO t VALUES (1)")
    finally:
        db.close()
    text = str(caught.value)
    assert str(path) in text and "read-only" in text and "readonly database" in text
    assert "reader" in text and "must write its journal" not in text


# --- RevocationList.version -------------------------------------------------------------------


class CountedEntries(frozenset):
    """A frozenset that counts the passes over it."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


@pytest.fixture
def authority() -> FleetAuthority:
    return FleetAuthority.create("fleet-a", seed=bytes(32))


def revoked(authority: FleetAuthority, count: int) -> RevocationList:
    revocations = RevocationList(authority.fleet_id)
    for serial in range(count):
        revocations = authority.revoke(revocations, now=1000.0 + serial, serial=serial)
    return revocations


def test_version_after_revoke_merge_since_and_from_bytes(authority):
    empty = RevocationList(authority.fleet_id)
    assert empty.version == 0
    five = revoked(authority, 5)
    assert five.version == 5 and len(five.entries) == 5
    assert five.since(3).version == 5 and five.since(5).version == 0
    assert empty.merge(five.since(2)).version == 5
    assert five.since(3).merge(empty).version == 5
    assert RevocationList(authority.fleet_id, five.since(0).entries).version == 5
    assert RevocationList.from_bytes(five.to_bytes(), authority.trust).version == 5
    six = authority.revoke(five, now=2000.0, node_id="node-x")
    assert six.version == 6 and five.version == 5  # (the older list keeps its own)
    lower = RevocationList(authority.fleet_id, frozenset(e for e in six.entries if e.sequence < 3))
    assert lower.merge(six).version == 6 and six.merge(lower).version == 6
    assert lower.version == 2


def test_version_passes_over_the_entries_once_per_list(authority):
    entries = CountedEntries(revoked(authority, 4).entries)
    revocations = RevocationList._of_checked(authority.fleet_id, entries)
    assert [revocations.version for _ in range(5)] == [4] * 5
    assert entries.passes == 1


def test_merging_sets_the_new_version_without_a_pass_over_all(authority):
    five = revoked(authority, 5)
    entries = CountedEntries(five.since(2).entries)
    counted = RevocationList._of_checked(authority.fleet_id, entries)
    assert counted.version == 5 and entries.passes == 1
    newer = authority.revoke(counted, now=3000.0, serial=99)
    assert newer.version == 6
    assert entries.passes == 1  # (the union runs in C; version came from the parts)
