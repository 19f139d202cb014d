"""The SQLite backend: one file in WAL mode, safe beside concurrent readers (the default).

Every connection comes from ``connect`` (WAL, synchronous=NORMAL, foreign keys on, a busy
timeout) and every sqlite3 exception is translated by ``store_error``, so no sqlite3 exception
leaves the package. Artifact files live in ``artifacts/`` beside the database file. This module
builds no queries of its own: the SQL text lives in ``sql.py``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from executor.errors import StoreError
from executor.store import sql
from executor.store.backend import Backend

__all__ = ["BUSY_TIMEOUT_S", "MIN_SQLITE", "connect", "sqlite_backend", "store_error"]

MIN_SQLITE = (3, 33, 0)
"""UPDATE ... FROM (the writer's batched job updates) arrived in SQLite 3.33 (2020)."""

BUSY_TIMEOUT_S = 30.0
"""How long a statement waits for another connection's write lock before failing."""


def sqlite_backend(path: Path) -> Backend:
    """The store in the SQLite file ``path`` (an absolute path; see ``url.resolve_db_path``)."""

    def describe(action: str, exc: Exception) -> StoreError:
        return store_error(action, exc, path)

    return Backend(
        dialect=sql.SQLITE,
        url=f"sqlite:///{path}",
        location=str(path),
        connect=lambda: connect(path),
        errors=(sqlite3.Error,),
        describe=describe,
        blob_root=path.parent / "artifacts",
        path=path,
    )


def store_error(action: str, exc: Exception, path: Path) -> StoreError:
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


def _wal(db: sqlite3.Connection) -> str:
    """Switch the file to WAL mode unless it is in it (the mode is kept in the file); return the
    mode. The switch needs the file to itself and SQLite does not wait for that (it answers
    "database is locked" at once), so processes opening a new file together retry it."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            mode = str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode != "wal":
                mode = str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            return mode
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


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
        mode = _wal(db)
        if mode != "wal":
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
