"""Files, session 28 (b): a revocation file changed within the file system's time granularity at
the same size (its mtime and size unchanged) is neither missed by a node's watch nor written
over unread; a runtime file whose pid now names another process is stale, told by the process's
exact start time rather than a 1 s window.

Real files (mtimes forced with ``os.utime``, which is how a change within one mtime granule
looks), a real node and real subprocesses."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from meshinfer.atomic_files import STAMP_SETTLE_NS
from meshinfer.identity_files import (
    FileStamp,
    file_stamp,
    load_revocations,
    replace_file,
    replace_unchanged,
)
from meshinfer.runtime.data_dir import DataDir, process_started, stale_pid
from meshinfer.runtime.node import MeshNode
from meshinfer.runtime.revocations import RevocationSyncConfig
from meshinfer.testing.fleet import make_fleet
from tests.helpers import until
from tests.test_mesh_node import options

LINUX = os.path.exists(f"/proc/{os.getpid()}/stat")


def _rewrite_in_place_keeping_mtime(path, data: bytes) -> None:
    """Write ``data`` over ``path`` in place (same size) and put its mtime back: what a change
    made within the file system's mtime granularity looks like to a stat."""
    before = path.stat()
    assert len(data) == before.st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


def _two_lists_of_one_size():
    """A fleet and two one-entry lists of the same size (entries 1 and 2), and the fleet's
    list with entry 3 too."""
    fleet = make_fleet(None, ["car-a"])
    fleet.revoke("gone-1")
    first = fleet.revocations
    fleet.revoke("gone-2")
    second = fleet.revocations.since(1)
    fleet.revoke("gone-3")
    assert len(first.to_bytes()) == len(second.to_bytes())
    assert first.to_bytes() != second.to_bytes()
    return fleet, first, second


# --- 1. the stamp window ------------------------------------------------------------------------


def test_a_same_size_change_keeping_the_mtime_is_not_replaced(tmp_path):
    path = tmp_path / "list"
    path.write_bytes(b"seen")
    _rewrite_in_place_keeping_mtime(path, b"SEEN")  # someone else's, between read and write
    assert replace_unchanged(path, b"ours", b"seen") is None
    assert path.read_bytes() == b"SEEN"
    assert replace_unchanged(path, b"ours", b"SEEN") is not None  # what is there: replaced
    assert path.read_bytes() == b"ours"
    assert replace_unchanged(path, b"x", None) is None  # None: no file expected, but one is
    assert replace_unchanged(path, b"x", b"our") is None  # a prefix is not the file
    assert replace_unchanged(tmp_path / "new", b"x", None) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list", "new"]  # no temporaries


def stamp_settled(stamp: FileStamp, now_ns: int) -> bool:
    """Whether an unchanged ``stamp`` (taken at ``now_ns``, ``time.time_ns()``) shows that the
    file did not change since (only tests use it; it was meshinfer.atomic_files')."""
    return max(stamp.mtime_ns, stamp.ctime_ns) < now_ns - STAMP_SETTLE_NS


def test_a_stamp_is_settled_only_once_its_times_are_well_past():
    stamp = file_stamp(Path(__file__))
    assert isinstance(stamp, FileStamp)
    now = max(stamp.mtime_ns, stamp.ctime_ns)
    assert not stamp_settled(stamp, now)  # just changed: a change in the same granule hides
    assert not stamp_settled(stamp, now - 10**9)  # in the future by our clock
    assert stamp_settled(stamp, now + 60 * 10**9)


async def test_the_watch_sees_a_same_size_change_that_kept_the_mtime(tmp_path):
    fleet, first, second = _two_lists_of_one_size()
    store = tmp_path / "revocations.bin"
    replace_file(store, first.to_bytes())
    config = RevocationSyncConfig(check_interval_s=0.05, ask_timeout_s=0.5)
    opts = options(mdns=None, revocations_file=store, revocations=config)
    node = MeshNode(fleet.identities["car-a"], first, opts, rng=random.Random(1))
    await node.start()
    try:
        sync = node.revocation_sync
        await until(lambda: sync.stats.checks >= 2)  # the file has been looked at
        assert sync.version == 1
        _rewrite_in_place_keeping_mtime(store, second.to_bytes())
        await until(lambda: sync.version == 2, timeout=5)  # was never noticed
        trust = node.identity.trust
        await until(lambda: len(load_revocations(store, trust).entries) == 2, timeout=5)
    finally:
        await node.aclose()


async def test_a_same_size_change_that_kept_the_mtime_is_merged_before_a_write(tmp_path):
    """The node writes a grown list: the operator's entry, copied in meanwhile within one
    mtime granule, was written over unread (lost)."""
    fleet, first, second = _two_lists_of_one_size()
    store = tmp_path / "revocations.bin"
    replace_file(store, first.to_bytes())
    config = RevocationSyncConfig(check_interval_s=3600, ask_timeout_s=0.5)  # no looks but ours
    opts = options(mdns=None, revocations_file=store, revocations=config)
    node = MeshNode(fleet.identities["car-a"], first, opts, rng=random.Random(1))
    await node.start()
    try:
        sync = node.revocation_sync
        await until(lambda: sync.stats.checks >= 1)
        _rewrite_in_place_keeping_mtime(store, second.to_bytes())  # the operator's entry 2
        assert await sync.merge_list(fleet.revocations.since(2), "a push")  # entry 3
        written = load_revocations(store, node.identity.trust)
        assert sorted(e.sequence for e in written.entries) == [1, 2, 3]
        assert sync.version == 3
    finally:
        await node.aclose()


# --- 2. a reused pid, told exactly ---------------------------------------------------------------


def _waiting_child(*setup: str) -> subprocess.Popen[str]:
    """A Python child that runs ``setup`` lines, says "ready" and waits for its stdin."""
    code = "\n".join([*setup, "print('ready', flush=True)", "import sys; sys.stdin.read()"])
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    return child


@pytest.mark.skipif(not LINUX, reason="no /proc: the 1 s rule is all there is")
def test_a_pid_named_with_another_start_time_is_stale_and_with_its_own_live(tmp_path):
    runtime = tmp_path / "runtime.json"
    child = _waiting_child()
    try:
        started = process_started(child.pid)
        assert isinstance(started, int) and started > 0
        # written just now, after the child started: by the 1 s rule alone it looked live
        runtime.write_text(json.dumps({"pid": child.pid, "pid_started": started - 1}))
        assert stale_pid(runtime, json.loads(runtime.read_text())) == child.pid
        runtime.write_text(json.dumps({"pid": child.pid, "pid_started": started}))
        an_hour_ago = runtime.stat().st_mtime - 3600  # the exact start time is what counts
        os.utime(runtime, (an_hour_ago, an_hour_ago))
        assert stale_pid(runtime, json.loads(runtime.read_text())) is None
        for odd in (True, "1", None, 1.5):  # not a start time: the 1 s rule, which says stale
            runtime.write_text(json.dumps({"pid": child.pid, "pid_started": odd}))
            os.utime(runtime, (an_hour_ago, an_hour_ago))
            assert stale_pid(runtime, json.loads(runtime.read_text())) == child.pid
    finally:
        child.communicate(timeout=30)
    assert process_started(child.pid) is None  # reaped: gone
    facts = {"pid": child.pid, "pid_started": started}
    assert stale_pid(runtime, facts) == child.pid


@pytest.mark.skipif(not LINUX, reason="no /proc")
def test_the_start_time_is_read_past_a_command_name_with_spaces_and_parentheses():
    odd = "a) 1 2 (b"
    child = _waiting_child(f"open('/proc/self/comm', 'w').write({odd!r})")
    try:
        with open(f"/proc/{child.pid}/stat", "rb") as file:
            assert f"({odd})".encode() in file.read()
        started = process_started(child.pid)
        assert started is not None
        hz = os.sysconf("SC_CLK_TCK")
        expected = psutil.Process(child.pid).create_time()
        assert abs(psutil.boot_time() + started / hz - expected) < 0.05
    finally:
        child.communicate(timeout=30)


@pytest.mark.skipif(not LINUX, reason="no /proc")
def test_the_runtime_file_records_the_daemons_start_time(tmp_path):
    data = DataDir(str(tmp_path), "[node] data_dir", "unused-")
    facts = {"pid": os.getpid(), "http": None}
    data.write_runtime(facts)
    recorded = json.loads(data.runtime_file.read_text())
    assert recorded == {**facts, "pid_started": process_started(os.getpid())}
    assert "pid_started" not in facts  # the caller's facts (the READY line) are left alone
    assert stale_pid(data.runtime_file, recorded) is None
    data.close()
    assert not data.runtime_file.exists()
