"""Session 30's node executor fixes: a result too large for the session it must go over is not
kept for a replay (node/replay.py), so the item sent again is answered (with the failure), not
met with silence until the coordinator's timeout.

Real peer tables and Noise sessions over the in-memory transport, a real NumPy engine and
batcher (tests/test_executor_sharing.py's :class:`Net`). ``w`` dials with a message cap of
:data:`CAP` bytes: an item of :data:`ROWS` rows fits under it, its result (10 float32 class
scores a row against 8 input values) does not. Sessions the coordinator dials take the default
cap.
"""

from __future__ import annotations

from meshinfer.proto import messages
from meshinfer.runtime.session import SessionConfig
from node.replay import ResultReplay
from tests.test_executor_sharing import KEEPING, Net, item, soon
from tests.test_result_replay import keep, result

ROWS = 64
CAP = 2400  # the item of ROWS rows encodes to ~2.1 KB, its result to ~2.65 KB


def test_the_sizes_straddle_the_cap():
    assert len(messages.encode(item("big", 2, ROWS))) < CAP


def test_a_forgotten_result_answers_nothing_and_frees_its_bytes():
    replay = ResultReplay(1 << 20, keep_s=60)
    keep(replay, "a", 0.0)
    keep(replay, "b", 0.0)
    assert replay.forget("a") and not replay.forget("a") and not replay.forget("never")
    assert "a" not in replay and replay.answer("coord", item("a", 2), 1.0) is None
    assert replay.answer("coord", item("b", 2), 1.0) is not None
    assert replay.bytes == len(result("b").output.data) + 700


async def test_an_item_whose_result_was_too_large_is_answered_again_when_sent_again():
    """w's only session with coord is one it dialled (capped): the result of ``big`` cannot be
    written, and coord hears so (TaskFailed). Sent again, the item is answered again with the
    failure: before, the result stayed kept and the resend was answered with it, dropped as
    too large again, in silence."""
    async with Net(worker_sends=SessionConfig(max_message_size=CAP)) as net:
        await net.connect("w", "coord")
        executor = net.worker(KEEPING)
        net.gate.set()
        coord = net.nodes["coord"]
        await net.assign("coord", "big", rows=ROWS)
        await soon(lambda: ("TaskFailed", "big", 1, "w") in coord.answers())
        await net.assign("coord", "big", attempt=2, rows=ROWS)
        await soon(lambda: ("TaskFailed", "big", 2, "w") in coord.answers())
        failed = coord.failure("big")
        assert failed.retryable and "exceeds the session cap" in failed.message
        assert not any(kind == "TaskResult" for kind, *_ in coord.answers())
        assert "big" not in executor.replay and executor.stats.accepted == 2


async def test_a_kept_result_too_large_for_the_resends_session_is_answered_with_the_failure():
    """``big``'s result went to coord over the session coord dialled (default cap) and was
    kept. That session closes; the resend comes over one w dialled (capped): the kept result
    cannot be written there, so it is forgotten and the resend answered with the failure
    instead of nothing."""
    async with Net(worker_sends=SessionConfig(max_message_size=CAP)) as net:
        executor = net.worker(KEEPING)
        net.gate.set()
        coord = net.nodes["coord"]
        await net.assign("coord", "big", rows=ROWS)
        await soon(lambda: ("TaskResult", "big", 1, "w") in coord.answers())
        assert "big" in executor.replay
        for session in coord.peers.open_sessions("w"):
            await session.aclose()
        await soon(lambda: net.w.session("coord") is None)
        await net.connect("w", "coord")
        await soon(lambda: coord.peers.session("w") is not None)
        await net.assign("coord", "big", attempt=2, rows=ROWS)
        await soon(lambda: ("TaskFailed", "big", 2, "w") in coord.answers())
        assert "exceeds the session cap" in coord.failure("big").message
        assert executor.replay.stats.replayed == 1 and "big" not in executor.replay
        assert executor.stats.accepted == 1  # answered from the kept result: not run again
