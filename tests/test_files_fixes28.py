"""Files as an operator meets them (session 28): a journal this user may not reach or write is
one line from ``meshinfer-coord serve`` naming the path that stops it, its owner and what to do;
``fleet revoke`` says how its revocation reaches a running mesh."""

import os
import pwd
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# imported before the fork: the child, as nobody, cannot read the Python install under /root
import coordinator.api
import coordinator.config
import coordinator.daemon  # noqa: F401
from coordinator.cli import main
from coordinator.journal import Journal
from coordinator.journal_files import JournalFileError
from meshinfer.fleetcli import run_cli
from tests.test_coordinator_cli import serve_config


def _nobody() -> int | None:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return None


NOBODY = _nobody()
as_another_user = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY is None,
    reason="needs root, to run a child as user nobody (root itself is never denied)",
)


@pytest.fixture
def shared_dir():
    """A directory user nobody can reach (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="mi-files28-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def serve_as_nobody(config: Path, err: Path) -> int:
    """``meshinfer-coord serve --config CONFIG`` in a child process running as user nobody;
    its exit code (stderr goes to ``err``)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            sys.stderr = open(err, "w")  # root's: opened before the switch
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = main(["serve", "--config", str(config)])
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def hand_to_nobody(*paths: Path) -> None:
    for top in paths:
        for path in [top, *top.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)


@as_another_user
@pytest.mark.parametrize("mode", [0o700, 0o755], ids=["unsearchable", "unwritable"])
def test_serve_on_a_data_dir_this_user_may_not_use_names_its_owner_and_what_to_do(shared_dir, mode):
    """0700: nobody may not even look for journal.db in it (the bare PermissionError of a
    stat); 0755: nobody may not create the journal's lock file in it."""
    data = shared_dir / "data"
    config = serve_config(shared_dir, data)
    hand_to_nobody(shared_dir / "fleet", shared_dir / "coord")
    data.mkdir(mode=mode)  # root's
    err = shared_dir / "err"
    assert serve_as_nobody(config, err) == 2
    said = err.read_text().strip()
    assert len(said.splitlines()) == 1 and "Traceback" not in said, said
    assert said.startswith(f"meshinfer-coord: error: journal {data / 'journal.db'}: "), said
    assert f"{data} belongs to user root (uid 0)" in said, said
    assert "runs as user nobody" in said and f"chown {data} to user nobody" in said, said


@as_another_user
def test_serve_on_a_data_dir_it_may_not_create_names_the_directory_in_the_way(shared_dir):
    closed = shared_dir / "closed"
    closed.mkdir(mode=0o755)  # root's: nobody may not make data in it
    data = closed / "data"
    config = serve_config(shared_dir, data)
    hand_to_nobody(shared_dir / "fleet", shared_dir / "coord")
    err = shared_dir / "err"
    assert serve_as_nobody(config, err) == 2
    said = err.read_text().strip()
    assert len(said.splitlines()) == 1 and "Traceback" not in said, said
    assert f"[coordinator] data_dir: cannot create {data}: Permission denied" in said, said
    assert f"{closed} belongs to user root (uid 0)" in said and "chown" in said, said


def test_a_journal_under_a_file_is_a_journal_error_naming_it(tmp_path):
    """What root can meet too: a data_dir path through a regular file."""
    (tmp_path / "data").write_text("a file")
    journal = tmp_path / "data" / "journal.db"
    with pytest.raises(JournalFileError, match="Not a directory") as refused:
        Journal(journal)
    assert str(journal) in str(refused.value)


def test_revoke_says_how_the_revocation_reaches_the_running_mesh(tmp_path, capsys):
    fleet, node = tmp_path / "fleet", tmp_path / "node"
    assert run_cli_coord(["fleet", "init", "--dir", fleet, "--fleet-id", "f"]) == 0
    enroll = ["fleet", "enroll", "--dir", fleet, "--node-dir", node, "--node-id", "car-1"]
    assert run_cli_coord([*enroll, "--roles", "vehicle"]) == 0
    capsys.readouterr()
    assert run_cli_coord(["fleet", "revoke", "--dir", fleet, "--node-id", "car-1"]) == 0
    said = capsys.readouterr().out
    assert f"meshinfer-coord revocations --push {fleet}" in said, said  # the API way
    assert f"copy {fleet / 'revocations.bin'} into the identity directory" in said, said
    assert "the mesh admits that certificate until" in said, said
    assert "gossip" in said, said


def run_cli_coord(argv: list) -> int:
    from coordinator.cli import build_parser

    return run_cli(build_parser(), [str(a) for a in argv])
