"""Faults injected at the store's boundary with its database, for the tests of what the store
does when a write is refused: the backend is wrapped, never the store's own code.

``open_faulty_store(url)`` opens a store whose backend hands out connections that work as the
driver's do, until ``Faults.inject(statement, ...)`` is called: then the next transaction the
writer thread begins runs those statements first, on its own connection, once. A statement that
makes the database refuse writes (``PRAGMA query_only = 1`` on SQLite, ``SET TRANSACTION READ
ONLY`` on PostgreSQL, ``PRAGMA max_page_count`` for a file that cannot grow) makes every write of
that transaction, and of the writer's later ones, fail with the driver's own error, as a
read-only file system, a standby or a full disk would. Readers and the store's synchronous
connection are left alone.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from executor.store import Store, resolve_backend
from executor.store.backend import Backend, Connection
from executor.store.writer import THREAD_NAME

__all__ = ["Faults", "faulty_backend", "open_faulty_store"]

_BEGIN = "BEGIN IMMEDIATE"


@dataclass
class Faults:
    """Statements waiting for the writer's next transaction."""

    _pending: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, *statements: str) -> None:
        """Run ``statements`` right after the writer begins its next transaction (once)."""
        with self._lock:
            self._pending.extend(statements)

    def _take(self) -> list[str]:
        if threading.current_thread().name != THREAD_NAME:
            return []
        with self._lock:
            taken, self._pending = self._pending, []
        return taken


class _Cursor:
    """A driver cursor that runs the pending faults after the writer's ``BEGIN``."""

    def __init__(self, cursor: Any, faults: Faults) -> None:
        self._cursor = cursor
        self._faults = faults

    def execute(self, statement: str, parameters: Sequence[Any] = (), /) -> Any:
        result = self._cursor.execute(statement, parameters)
        if statement == _BEGIN:
            for injected in self._faults._take():
                self._cursor.execute(injected)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _Connection:
    """A driver connection (``backend.Connection``) whose statements go through ``_Cursor``."""

    def __init__(self, db: Connection, faults: Faults) -> None:
        self._db = db
        self._faults = faults

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    @property
    def broken(self) -> bool:  # PostgreSQL's: the server went away (see Reader._reader)
        return bool(getattr(self._db, "broken", False))

    def cursor(self) -> _Cursor:
        return _Cursor(self._db.cursor(), self._faults)

    def execute(self, statement: str, parameters: Sequence[Any] = (), /) -> Any:
        return _Cursor(self._db, self._faults).execute(statement, parameters)

    def executemany(self, statement: str, parameters: Any, /) -> Any:
        return self._db.executemany(statement, parameters)

    def close(self) -> None:
        self._db.close()


def faulty_backend(backend: Backend) -> tuple[Backend, Faults]:
    """``backend`` whose connections run the statements ``Faults.inject`` is given."""
    faults = Faults()
    connect = backend.connect

    def faulty_connect() -> Connection:
        return _Connection(connect(), faults)

    return replace(backend, connect=faulty_connect), faults


def open_faulty_store(url: str | Path) -> tuple[Store, Faults]:
    """A new or existing store at ``url`` (as ``open_store``, without its recovery), and the
    faults to inject into its writer."""
    backend, faults = faulty_backend(resolve_backend(url))
    return Store(backend), faults
