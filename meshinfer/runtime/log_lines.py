"""Log lines and terminal text that what a peer or a server sent cannot forge.

A node's failure message, a refusal's reason or a server's error reaches a log line or a
terminal as text. A newline in it would start a line of its own (a forged ``ERROR`` line, which
also fails the chaos tests), and a terminal's escape sequence would act on the terminal.
:func:`printable` writes each such character as its Python escape; :class:`OneLineFormatter`
applies it to every log record's message (a traceback, which the formatter appends after the
message, keeps its lines).
"""

from __future__ import annotations

import logging

__all__ = ["OneLineFormatter", "printable"]


def printable(text: str) -> str:
    """``text`` with each character that is not printable (control characters such as a
    terminal's escape, newlines, tabs, format characters such as a bidirectional override,
    line and paragraph separators) written as its Python escape (``\\x1b``, ``\\n``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class OneLineFormatter(logging.Formatter):
    """A formatter whose every record's message is one line of :func:`printable` text."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)
