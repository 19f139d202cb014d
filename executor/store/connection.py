"""SQLite connections: settings, schema migrations, and turning sqlite3 errors into StoreError.

Every connection the store opens comes from ``connect`` (WAL, synchronous=NORMAL, foreign keys
on, a busy timeout) and every sqlite3 exception is translated by ``store_error``, so no sqlite3
exception leaves the package. ``migrate`` brings a file to ``SCHEMA_VERSION`` once, in one
transaction, and refuses files written by a newer harmont-exec. This module builds no queries of
its own: the SQL text lives in ``sql.py``.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from executor.errors import StoreError
from executor.store import sql
from executor.store.rows import format_time

__all__ = ["BUSY_TIMEOUT_S", "MIN_SQLITE", "connect", "migrate", "store_error"]

MIN_SQLITE = (3, 33, 0)
"""UPDATE ... FROM (the writer's batched job updates) arrived in SQLite 3.33 (2020)."""

BUSY_TIMEOUT_S = 30.0
"""How long a statement waits for another connection's write lock before failing."""


def store_error(action: str, exc: sqlite3.Error, path: Path) -> StoreError:
    """A StoreError for ``exc`` that names the file, SQLite's message and what to do."""
    text = str(exc)
    lowered = text.lower()
    hint = "check the disk and the file's permissions"
    if "full" in lowered:
        hint = "free disk space where the database lives, then run the build again"
    elif "readonly" in lowered or "read-only" in lowered:
        hint = "make the database file and its directory writable"
    elif "locked" in lowered or "busy" in lowered:
        hint = "another process held the database too long; retry when it is done"
    elif "not a database" in lowered or "malformed" in lowered:
        hint = "point --db / HARMONT_DB at a harmont-exec database file"
    elif "closed" in lowered:
        hint = "the store was closed; open it again"
    return StoreError(f"could not {action} in {path}: {text}; {hint}")


def connect(path: Path) -> sqlite3.Connection:
    """A connection to ``path`` in autocommit mode (transactions are explicit BEGIN/COMMIT),
    usable from any thread (callers serialize access)."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise StoreError(
            f"the store needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer, but this Python "
            f"uses SQLite {sqlite3.sqlite_version}; use a Python built with a newer SQLite "
            "(python.org and distribution builds since 2021 have one)"
        )
    db = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(
                f"could not switch {path} to WAL mode (it stays in {mode!r} mode); put the "
                "database on a local file system that supports shared memory"
            )
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        db.close()
        raise
    return db


def _version(db: sqlite3.Connection) -> int:
    try:
        row = db.execute(sql.SCHEMA_VERSION_NOW).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return 0
        raise
    return int(row[0] or 0)


def _refuse_newer(version: int, path: Path) -> None:
    if version > sql.SCHEMA_VERSION:
        raise StoreError(
            f"the store {path} has schema version {version}, newer than this harmont-exec "
            f"understands (version {sql.SCHEMA_VERSION}); upgrade harmont-exec to use it"
        )


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Apply the migrations ``path`` lacks, all in one transaction; return the version.

    A file already at ``SCHEMA_VERSION`` is only read, so opening the store beside a busy
    writer does not wait for its lock. Two processes migrating one new file at once are
    serialized by ``BEGIN IMMEDIATE``; the second finds the work done.
    """
    version = _version(db)
    _refuse_newer(version, path)
    if version == sql.SCHEMA_VERSION:
        return version
    db.execute("BEGIN IMMEDIATE")
    try:
        version = _version(db)
        _refuse_newer(version, path)
        if version == 0 and db.execute(sql.COUNT_TABLES).fetchone()[0] > 0:
            raise StoreError(
                f"{path} is a SQLite database that harmont-exec did not create (it has tables "
                "but no schema_migrations); point --db / HARMONT_DB at a new or harmont-exec file"
            )
        db.execute(sql.CREATE_SCHEMA_MIGRATIONS)
        applied_at = format_time(datetime.now(UTC))
        scripts = sql.migrations(sql.SQLITE)
        for target in range(version + 1, sql.SCHEMA_VERSION + 1):
            for statement in scripts[target - 1]:
                db.execute(statement)
            db.execute(sql.RECORD_MIGRATION, (target, applied_at))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return sql.SCHEMA_VERSION
