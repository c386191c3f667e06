"""The API token file as read by the coordinator CLI's client and by ``meshinfer-coord serve``
(session 34): a FIFO there blocked either for good (``Path.read_text`` waits for a writer), and
a device was read without end. Both read it through ``client.read_token_file`` now."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from coordinator.client import MAX_TOKEN_FILE_BYTES, read_token_file, resolve_endpoint
from coordinator.daemon import read_token
from meshinfer.errors import ConfigError

TOKEN = "t" * 43


def in_thread(call, *args):
    """``call(*args)``'s outcome, or a failure if it blocks (on a FIFO, for good)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call(*args)
        except BaseException as exc:  # the test looks at it
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        pytest.fail(f"{call.__name__} blocked on the token file")
    return outcome


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "api-token"
    os.mkfifo(path)
    return path


def test_the_client_refuses_a_fifo_as_token_file_at_once(fifo: Path) -> None:
    outcome = in_thread(resolve_endpoint, "http://127.0.0.1:1", fifo, None, {})
    assert isinstance(outcome.get("error"), ConfigError)
    assert "not a regular file" in str(outcome["error"]) and str(fifo) in str(outcome["error"])


def test_serve_refuses_a_fifo_as_token_file_at_once(fifo: Path) -> None:
    config = SimpleNamespace(api=SimpleNamespace(token_file=str(fifo)))
    outcome = in_thread(read_token, config)
    assert isinstance(outcome.get("error"), ConfigError)
    assert str(outcome["error"]).startswith(f"[api] token_file {fifo} is a FIFO")


def test_a_token_file_over_the_limit_is_refused_not_read_on(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    path.write_text("x" * (MAX_TOKEN_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match="over the 4096-byte limit"):
        read_token_file(path)


def test_a_good_token_file_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    path.write_text(TOKEN + "\n")
    config = SimpleNamespace(api=SimpleNamespace(token_file=str(path)))
    assert read_token(config) == TOKEN
    assert resolve_endpoint("http://127.0.0.1:1", path, None, {}).token == TOKEN
