"""The PostgreSQL backend: one record shared by executors and API servers on many machines.

It needs psycopg 3 (``pip install 'harmont-exec[postgresql]'``), imported only when a
``postgresql://`` store is opened. ``PgConnection`` gives psycopg the sqlite3 shape the store
uses: autocommit with explicit ``BEGIN``/``COMMIT``, ``?`` placeholders (rewritten to ``%s``),
``BEGIN IMMEDIATE`` read as ``BEGIN`` (PostgreSQL locks rows, not the database: statements that
must serialize lock what they change, see ``sql.Dialect.lock_rows``), and rows addressed by
column name and by position. A psycopg error is read as its SQLSTATE and message
(``read_error``); ``failures.py`` says what it means and what to do.

Tables live in the connection's current schema, so one database can hold several records:
``?options=-csearch_path%3Dname`` in the URL picks the schema (it must exist). Artifact files
cannot live in the database: they go to ``HARMONT_ARTIFACTS`` (default
``~/.local/share/harmont-exec/artifacts``), which every executor and server sharing the record
must see at the same path (a shared file system).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from executor.errors import StoreError
from executor.store import sql
from executor.store.backend import Backend
from executor.store.failures import DriverError
from executor.store.private import make_private_dirs

__all__ = [
    "APPLICATION_NAME",
    "ARTIFACTS_ENV",
    "CONNECT_TIMEOUT_S",
    "PgConnection",
    "postgresql_backend",
    "redact",
]

ARTIFACTS_ENV = "HARMONT_ARTIFACTS"
"""Where a PostgreSQL store keeps artifact files (a directory every sharer sees)."""

CONNECT_TIMEOUT_S = 10
"""How long opening a connection may take before the store reports the server unreachable."""

APPLICATION_NAME = "harmont-exec"
"""What the server shows for our connections (pg_stat_activity.application_name); a URL's
``application_name`` parameter overrides it."""


_PASSWORD_PARAM = re.compile(r"(?i)(^|&)(password=)[^&]*")


def redact(url: str) -> str:
    """``url`` without its password (``user:password@`` or a ``password=`` parameter), for
    messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username}:***@{host}")
    if parts.query:
        parts = parts._replace(query=_PASSWORD_PARAM.sub(r"\1\2***", parts.query))
    return parts.geturl()


@lru_cache(maxsize=512)
def _translate(statement: str) -> str:
    """sqlite3 text to psycopg text: ``?`` placeholders become ``%s`` (the store's SQL has no
    ``?`` inside literals, and no PostgreSQL ``?`` operators), a literal ``%`` is doubled."""
    if statement == "BEGIN IMMEDIATE":
        return "BEGIN"
    return statement.replace("%", "%%").replace("?", "%s")


class Row:
    """A result row addressed by column name or by position (like ``sqlite3.Row``)."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._index)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values, strict=True))!r})"


def _row_factory(cursor: Any) -> Any:
    description = cursor.description or ()
    index = {column.name: i for i, column in enumerate(description)}

    def make(values: Sequence[Any]) -> Row:
        return Row(values, index)

    return make


class PgCursor:
    __slots__ = ("_cursor",)

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def execute(self, statement: str, parameters: Sequence[Any] = (), /) -> PgCursor:
        self._cursor.execute(_translate(statement), parameters or None)
        return self

    def executemany(self, statement: str, parameters: Any, /) -> PgCursor:
        self._cursor.executemany(_translate(statement), [tuple(p) for p in parameters])
        return self

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cursor.fetchall())

    def close(self) -> None:
        self._cursor.close()


class PgConnection:
    """A psycopg connection in autocommit mode, shaped like the store's sqlite3 connections."""

    __slots__ = ("_db",)

    def __init__(self, db: Any) -> None:
        self._db = db

    @property
    def in_transaction(self) -> bool:
        from psycopg import pq

        return bool(self._db.info.transaction_status != pq.TransactionStatus.IDLE)

    @property
    def broken(self) -> bool:
        """The server went away (or the connection was closed): open a new one."""
        return bool(self._db.closed)

    def cursor(self) -> PgCursor:
        return PgCursor(self._db.cursor(row_factory=_row_factory))

    def execute(self, statement: str, parameters: Sequence[Any] = (), /) -> PgCursor:
        return self.cursor().execute(statement, parameters)

    def executemany(self, statement: str, parameters: Any, /) -> PgCursor:
        return self.cursor().executemany(statement, parameters)

    def close(self) -> None:
        self._db.close()


def read_error(exc: Exception) -> DriverError:
    """What the server (or libpq) said: the SQLSTATE (None for a client-side error, such as
    a refused connection) and the message."""
    return DriverError.read(exc, getattr(exc, "sqlstate", None))


_FOUND_READ_ONLY: set[str] = set()  # stores (by location) a write was refused on, as read-only
# (a standby): read commands go on without the recovery writes, in this process


def artifacts_root() -> Path:
    """``HARMONT_ARTIFACTS``, else ``$XDG_DATA_HOME/harmont-exec/artifacts``."""
    given = os.environ.get(ARTIFACTS_ENV)
    if given:
        return Path(os.path.abspath(os.path.expanduser(given)))
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "harmont-exec" / "artifacts"


def postgresql_backend(url: str, origin: str) -> Backend:
    """The store at the libpq URL ``url`` (given as ``origin``: ``--db`` or HARMONT_DB)."""
    location = redact(url)
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            f"{origin}={location!r} names a PostgreSQL store, which needs psycopg; install it "
            "with pip install 'harmont-exec[postgresql]'"
        ) from None

    def connect() -> PgConnection:
        try:
            given = psycopg.conninfo.conninfo_to_dict(url)
            name = given.get("application_name") or APPLICATION_NAME
            db = psycopg.connect(
                url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name=str(name),
            )
        except psycopg.Error as exc:
            raise backend.error("connect", exc) from None
        return PgConnection(db)

    backend = Backend(
        dialect=sql.POSTGRESQL,
        url=url,
        location=location,
        connect=connect,
        errors=(psycopg.Error,),
        read_error=read_error,
        blob_root=artifacts_root(),
        prepare=lambda: _prepare_artifacts(artifacts_root()),
        read_only=lambda: location in _FOUND_READ_ONLY,
        found_read_only=lambda: _FOUND_READ_ONLY.add(location),
    )
    return backend


def _prepare_artifacts(root: Path) -> list[str]:
    """The artifact directory is private when harmont-exec creates it (an existing one, maybe
    shared between the executors' and the server's users on purpose, is left as it is)."""
    if not root.exists():
        try:
            make_private_dirs(root)
        except OSError:
            pass  # said when an artifact is first stored there
    return []
