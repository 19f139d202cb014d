"""What the store needs of a database, so one ``Store`` runs on SQLite and on PostgreSQL.

A ``Backend`` is a driver behind a small, sqlite3-shaped interface: ``connect()`` gives a
``Connection`` in autocommit mode whose statements take ``?`` placeholders and whose rows are
addressed by column name and by position; ``errors`` are the driver's exception classes and
``read_error`` reads one (its code, its message); ``failure()`` says what it means and
``error()`` turns it into a StoreError that names the store and says what to do, both by the
one table in ``failures.py``. Everything else (the SQL, the transactions, the locking) is
shared; the few statements that differ are chosen by ``dialect`` in ``sql.py``. ``migrate``
brings a database to ``SCHEMA_VERSION`` on either backend. No driver exception leaves the store
package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from executor.errors import StoreError
from executor.store import sql
from executor.store.failures import DriverError, Failure, classify, store_failure
from executor.store.rows import format_time

__all__ = ["Backend", "Connection", "DbCursor", "migrate"]


class DbCursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def execute(self, statement: str, parameters: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, statement: str, parameters: Any, /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def close(self) -> None: ...


class Connection(Protocol):
    @property
    def in_transaction(self) -> bool: ...

    def execute(self, statement: str, parameters: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, statement: str, parameters: Any, /) -> Any: ...

    def cursor(self) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Backend:
    """One store location and the driver that reaches it."""

    dialect: sql.Dialect
    url: str  # accepted by open_store; may carry a password: never print it
    location: str  # for messages: the file, or the URL without its password
    connect: Callable[[], Connection]
    errors: tuple[type[Exception], ...]
    read_error: Callable[[Exception], DriverError]  # one of ``errors``, as failures.py reads it
    blob_root: Path  # where artifact files live
    path: Path | None = None  # the SQLite file, if it is one
    # Before the first connection: create the store's directory and file privately, tighten
    # an existing one (SPEC §5); returns what it tightened, for the caller to say once.
    prepare: Callable[[], list[str]] = lambda: []
    # When a driver error says the disk is full (``failure``): free the reserve kept for that
    # moment (the bytes it freed), so that the final writes of a stopped build land in it.
    release_reserve: Callable[[], int] = lambda: 0
    # Whether the store cannot be written now (a read-only file system or file): reads work,
    # the recovery writes are skipped.
    read_only: Callable[[], bool] = lambda: False
    # A write was refused as read-only (``failure``): ``read_only`` says so from then on.
    found_read_only: Callable[[], None] = lambda: None

    @property
    def on_server(self) -> bool:
        """A database server (PostgreSQL), not a file on this machine."""
        return self.path is None

    @property
    def named(self) -> str:
        """The store as messages name it: its file, or ``the PostgreSQL store <location>``."""
        return (
            self.location
            if self.path is not None
            else f"the {self.dialect.title} store {self.location}"
        )

    def failure(self, exc: Exception, action: str = "") -> Failure:
        """What the driver error ``exc`` means (the disk is full, the store read-only, ...)."""
        return classify(self.read_error(exc), server=self.on_server, action=action)

    def error(self, action: str, exc: Exception) -> StoreError:
        """``exc``, met while doing ``action``, as a StoreError that says what to do."""
        return store_failure(action, self.read_error(exc), store=self.named, server=self.on_server)


def _version(db: Connection, dialect: sql.Dialect) -> int:
    if not db.execute(sql.migrations_table_exists(dialect)).fetchone()[0]:
        return 0
    return int(db.execute(sql.SCHEMA_VERSION_NOW).fetchone()[0] or 0)


def _refuse_newer(version: int, location: str) -> None:
    if version > sql.SCHEMA_VERSION:
        raise StoreError(
            f"the store {location} has schema version {version}, newer than this harmont-exec "
            f"understands (version {sql.SCHEMA_VERSION}); upgrade harmont-exec to use it"
        )


def migrate(db: Connection, backend: Backend) -> int:
    """Apply the migrations the store lacks, all in one transaction; return the version.

    A store already at ``SCHEMA_VERSION`` is only read, so opening it beside a busy writer does
    not wait for a lock. Processes migrating one new store at once are serialized (SQLite:
    ``BEGIN IMMEDIATE``; PostgreSQL: a transaction-scoped advisory lock); the later ones find
    the work done.
    """
    dialect = backend.dialect
    version = _version(db, dialect)
    _refuse_newer(version, backend.location)
    if version == sql.SCHEMA_VERSION:
        return version
    if backend.read_only():
        raise StoreError(
            f"the store {backend.location} has schema version {version} and this harmont-exec "
            f"reads version {sql.SCHEMA_VERSION}, but it cannot be upgraded: it is read-only; "
            "open it once where it can be written (or use the harmont-exec that wrote it)"
        )
    db.execute("BEGIN IMMEDIATE")
    try:
        if dialect.migration_lock is not None:
            db.execute(dialect.migration_lock)
        version = _version(db, dialect)
        _refuse_newer(version, backend.location)
        if version == 0 and db.execute(sql.count_tables(dialect)).fetchone()[0] > 0:
            raise StoreError(
                f"{backend.location} is a {dialect.title} database that harmont-exec did not "
                "create (it has tables but no schema_migrations); point --db / HARMONT_DB at a "
                "new or harmont-exec store"
            )
        db.execute(sql.CREATE_SCHEMA_MIGRATIONS)
        applied_at = format_time(datetime.now(UTC))
        scripts = sql.migrations(dialect)
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
