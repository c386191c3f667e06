"""The journal's SQLite schema as an append-only list of migrations.

``MIGRATIONS[i]`` takes a database from schema version ``i`` to ``i + 1``; the ``schema_version``
table holds the current version (0 for a new file). :func:`migrate` applies the missing ones,
each in its own transaction together with the version bump, so a crash mid-migration leaves the
previous version intact. ONLY APPEND: never edit a migration that has shipped.

Version 1 tables:

* ``tasks``    -- one row per accepted task: the spec (msgpack blob), state, pattern, priority,
  policy, wall-clock created/updated stamps, the result summary blob and error. ``seq`` orders
  tasks for keyset pagination.
* ``items``    -- one row per planned work item: task, position, model, pipeline stage, state,
  the node it was last sent to, attempt, last error.
* ``results``  -- at most one row per item (primary key = item id): the exactly-once guarantee.
* ``events``   -- the audit log's stored lines (what happened to which task/item, when), those the
  other rows do not say: :mod:`coordinator.journal_history` reads the rest back from them.
* ``counters`` -- named counters (duplicate results, late results, ...).

Version 2: ``items.refused`` -- how many of the item's attempts were refused or never reached
their node (not counted against ``max_attempts``; a restarted coordinator reads it back).

Version 3: no statement: from it on, ``events`` holds only the audit lines the other rows do not
say (:mod:`coordinator.journal_history`). Its number keeps an older coordinator, which would read
those histories with lines missing, from opening the file.

Version 4: ``events.attempt`` and ``events.node`` -- a dispatch line's attempt and node, as
columns (NULL on other lines, and on dispatch lines written before version 4, whose detail text
says them: :func:`coordinator.journal_history.read_dispatches` parses those). A restarted
coordinator reads them to know which node may answer which earlier attempt of an item; they
ride on the line the dispatch writes anyway, in the same statement: no row more per dispatch.
"""

from __future__ import annotations

import re
import sqlite3

from meshinfer.errors import MeshInferError

__all__ = ["MIGRATIONS", "SchemaError", "check_is_journal", "migrate", "schema_version"]


class SchemaError(MeshInferError):
    """The database was written by a newer meshinfer (or is not a journal)."""


_V1 = (
    """CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        spec BLOB NOT NULL,
        state TEXT NOT NULL,
        pattern TEXT NOT NULL,
        priority INTEGER NOT NULL,
        policy TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        summary BLOB,
        error TEXT)""",
    "CREATE INDEX tasks_by_state ON tasks (state, seq)",
    """CREATE TABLE items (
        id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL REFERENCES tasks (id),
        position INTEGER NOT NULL,
        model_id TEXT NOT NULL,
        model_version TEXT NOT NULL,
        stage TEXT NOT NULL,
        state TEXT NOT NULL,
        node TEXT,
        attempt INTEGER NOT NULL CHECK (attempt >= 1),
        error TEXT,
        updated_at REAL NOT NULL)""",
    "CREATE INDEX items_by_task ON items (task_id, position)",
    "CREATE INDEX items_by_model ON items (model_id, task_id)",
    """CREATE TABLE results (
        item_id TEXT PRIMARY KEY REFERENCES items (id),
        attempt INTEGER NOT NULL,
        node TEXT,
        blob BLOB NOT NULL,
        received_at REAL NOT NULL)""",
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        task_id TEXT,
        item_id TEXT,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '')""",
    "CREATE INDEX events_by_task ON events (task_id, seq)",
    "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)

_V2 = ("ALTER TABLE items ADD COLUMN refused INTEGER NOT NULL DEFAULT 0",)
_V3: tuple[str, ...] = ()  # the audit log's stored lines: see the module docstring
_V4 = ("ALTER TABLE events ADD COLUMN attempt INTEGER", "ALTER TABLE events ADD COLUMN node TEXT")

#: Statements taking the schema from version i to i + 1. ONLY APPEND.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3, _V4)


def schema_version(db: sqlite3.Connection) -> int:
    """The schema version of ``db`` (0 when it has none yet); :class:`SchemaError` if its
    table holds no version (a damaged file)."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    (version,) = db.execute("SELECT max(version) FROM schema_version").fetchone()
    if version is not None and (type(version) is not int or version < 0):  # (SQLite: any type)
        raise SchemaError(f"damaged: its schema_version table holds {version!r}, not a version")
    return version or 0


#: The tables of a journal at version 1 or later (``sqlite_sequence`` is SQLite's own): those
#: version 1 creates, read off its statements, and the version table itself.
_TABLES = frozenset(
    {"schema_version"}
    | {m[1] for statement in _V1 if (m := re.match(r"CREATE TABLE (\w+)", statement))}
)


def check_is_journal(db: sqlite3.Connection) -> None:
    """Refuse, before writing anything, a database of some other application: one with tables
    but no ``schema_version`` (a new journal has none; one a crash interrupted before its
    first migration has that table only), or one whose version claims tables it lacks; and a
    journal a newer meshinfer wrote (a version beyond :data:`MIGRATIONS`), whose rows this code
    may read wrong (:func:`migrate` refuses it too)."""
    rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    tables = {name for (name,) in rows} - {"sqlite_sequence"}
    version = schema_version(db) if "schema_version" in tables else 0
    if version > len(MIGRATIONS):  # refused before anything touches it (even the WAL switch)
        raise SchemaError(_newer(version, len(MIGRATIONS)))
    if version == 0 and (others := sorted(tables - {"schema_version"})):
        raise SchemaError(
            f"not a meshinfer journal (it holds other tables: {', '.join(others[:5])})"
        )
    if version > 0 and (missing := _TABLES - tables):
        raise SchemaError(
            f"not a meshinfer journal (schema version {version}, but no table"
            f" {', '.join(sorted(missing))})"
        )


def migrate(db: sqlite3.Connection, migrations: tuple[tuple[str, ...], ...] = MIGRATIONS) -> int:
    """Bring ``db`` (autocommit mode) up to ``len(migrations)``; returns the version.

    Raises :class:`SchemaError` if the file is newer than this code. Whether it is a journal
    at all is :func:`check_is_journal`'s to say, before the file is touched (the journal calls
    it first, before its switch to WAL).
    """
    current = schema_version(db)
    if current > len(migrations):
        raise SchemaError(_newer(current, len(migrations)))
    for version in range(current, len(migrations)):
        db.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(db) > version:  # another process migrated meanwhile
                db.execute("ROLLBACK")
                continue
            for statement in migrations[version]:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
        except BaseException:
            if db.in_transaction:  # (SQLite may have rolled it back: a full disk, an I/O error)
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return len(migrations)


def _newer(version: int, known: int) -> str:
    return (
        f"schema version {version} is newer than this meshinfer's {known}"
        " (a newer meshinfer wrote it: run that one)"
    )
