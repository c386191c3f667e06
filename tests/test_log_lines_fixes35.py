"""A daemon's log lines cannot be forged by what a peer sent (thirty-fifth session)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from meshinfer.runtime.log_lines import OneLineFormatter, printable

DAEMON = textwrap.dedent(
    """
    import logging
    from meshinfer.runtime.loop import run_main

    async def main():
        reason = "bad input\\n1999-01-01 00:00:00,000 ERROR meshinfer: forged\\x1b[2J"
        logging.getLogger("node").info("peer-1 refused item-7 (%s): running it here", reason)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("node").exception("a real failure")
        return 0

    raise SystemExit(run_main(main(), "INFO"))
    """
)


def test_a_peers_newline_does_not_start_a_log_line_of_its_own() -> None:
    # was: the failure message a node sent was logged as it came; its newline started a line
    # reading ERROR (which a log watcher, and CI's chaos tests, take for the daemon's own)
    done = subprocess.run(
        [sys.executable, "-c", DAEMON], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert not any(line.startswith("1999-01-01") for line in lines), lines
    refused = [line for line in lines if "refused item-7" in line]
    assert len(refused) == 1 and r"bad input\n1999-01-01" in refused[0]
    assert r"forged\x1b[2J" in refused[0]
    # a traceback, appended after the message, keeps its lines
    assert "Traceback (most recent call last):" in lines
    assert lines[-1] == "ValueError: boom"


def test_the_formatter_escapes_the_message_only() -> None:
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "said %s", ("a\u2028b\tc",), None)
    assert formatter.format(record) == r"INFO said a\u2028b\tc"
    assert printable("plain é 漢") == "plain é 漢"
