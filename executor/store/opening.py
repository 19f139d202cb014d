"""Where the record lives: ``--db`` / ``HARMONT_DB`` values to a backend, and ``open_store``.

Accepted forms: a file path, ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` (SQLite),
``postgresql://...`` or ``postgres://...`` (PostgreSQL, libpq's URL syntax). Nothing given means
``HARMONT_DB``, else ``.harmont/harmont.db`` under the current directory. This module parses and
dispatches only; it runs no SQL.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

import structlog

from executor.errors import (
    ErrorCode,
    StoreError,
    StoreLocationError,
    StoreNotFoundError,
    StoreReadOnlyError,
)
from executor.store.backend import Backend
from executor.store.postgresql import postgresql_backend, redact
from executor.store.recovery import LostBuild, resume_hint
from executor.store.sqlite import sqlite_backend
from executor.store.store import Store

__all__ = [
    "DB_ENV",
    "DEFAULT_DB",
    "open_store",
    "resolve_backend",
    "resolve_db_path",
]

DB_ENV = "HARMONT_DB"
DEFAULT_DB = Path(".harmont") / "harmont.db"

log = structlog.get_logger("executor.store")

_FORMS = "a file path, sqlite:///relative/path, sqlite:////absolute/path or postgresql://..."
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_CONNINFO = re.compile(r"^\s*(host|hostaddr|port|dbname|user|password|service|sslmode)\s*=")
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)(?:'[^']*'|\S+)")


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except PermissionError:
        return False  # said by open_store, naming the owner


def resolve_backend(url: str | Path | None = None) -> Backend:
    """The store that ``url`` names (see the module docstring); StoreError for a value that is
    not one of the accepted forms."""
    origin = "--db"
    if url is None or url == "":
        url = os.environ.get(DB_ENV) or None
        origin = DB_ENV
    if isinstance(url, str):
        scheme = _SCHEME.match(url)
        if scheme is not None and scheme.group(1).lower() in ("postgresql", "postgres"):
            return postgresql_backend(url, origin)
        if _CONNINFO.match(url):
            shown = _CONNINFO_PASSWORD.sub(r"\1***", url)
            raise StoreLocationError(
                f"{origin}={shown!r} looks like a libpq key=value connection string; "
                "harmont-exec takes PostgreSQL stores as URLs: "
                "postgresql://USER@HOST:PORT/DBNAME (keep a password in ~/.pgpass or PGPASSWORD)"
            )
    return sqlite_backend(_sqlite_path(url, origin))


def resolve_db_path(url: str | Path | None = None) -> Path:
    """The SQLite file that ``url`` names; StoreError for a PostgreSQL URL or a value that is
    not one of the accepted forms."""
    backend = resolve_backend(url)
    if backend.path is None:
        raise StoreLocationError(f"{backend.location!r} is a PostgreSQL store, not a SQLite file")
    return backend.path


def _sqlite_path(url: str | Path | None, origin: str) -> Path:
    if url is None:
        return Path.cwd() / DEFAULT_DB
    if isinstance(url, Path):
        path = url
    else:
        scheme = _SCHEME.match(url)
        name = scheme.group(1).lower() if scheme else None
        if name == "sqlite":
            if not url.startswith("sqlite:///") or url == "sqlite:///":
                raise StoreLocationError(
                    f"{origin}={url!r} is not a SQLite URL harmont-exec understands; use "
                    "sqlite:///relative/path or sqlite:////absolute/path"
                )
            path = Path(url.removeprefix("sqlite:///"))
        elif scheme is not None and url[scheme.end() :].startswith("//"):
            raise StoreLocationError(
                f"{origin}={redact(url)!r} is not a store location; use {_FORMS}"
            )
        else:
            path = Path(url)
    if str(path) == ":memory:":
        raise StoreLocationError(
            f"{origin}=':memory:': the store must be a file that the runner, its writer thread "
            "and readers share; give a file path"
        )
    path = path.expanduser()
    if _is_dir(path):
        raise StoreLocationError(
            f"{origin}={str(path)!r} is a directory; give a file path such as {path / 'harmont.db'}"
        )
    return Path(os.path.abspath(path))


def _check_reachable(path: Path) -> None:
    """StoreError, naming the owner, for a store another user keeps private (its directory 0700 or
    its file 0600)."""
    try:
        kept = path if path.exists() and not os.access(path, os.R_OK) else None
    except PermissionError:
        kept = path.parent
    if kept is None:
        return
    owner = next(
        (f"uid {p.stat().st_uid}" for p in (kept, *kept.parents) if p.exists()),
        "another user",
    )
    raise StoreError(
        f"cannot read the store {path}: permission denied; a store is private to the user "
        f"who made it ({owner} owns {kept}): run as that user, or point --db / "
        f"{DB_ENV} at a store of your own"
    )


def open_store(
    url: str | Path | None = None, *, recover: bool = True, must_exist: bool = False
) -> Store:
    """Open the store at ``url`` (see ``resolve_backend``), creating the SQLite file and its
    directory, and the schema, as needed. The result is a context manager that closes it.

    With ``recover`` (every harmont-exec command does it), builds whose executor is gone are
    finished first (``Store.recover_lost_builds``), each reported as a ``build_abandoned``
    warning in the log.

    With ``must_exist`` (the commands that only read the record), a SQLite file that does not
    exist is a StoreError instead of a new, empty store: a mistyped path must not look like a
    record with no builds."""
    backend = resolve_backend(url)
    if backend.path is not None:
        _check_reachable(backend.path)
    if must_exist and backend.path is not None and not backend.path.exists():
        raise StoreNotFoundError(
            f"no store at {backend.path}: nothing was recorded there; check --db / "
            f"{DB_ENV} (or the current directory: the default is {DEFAULT_DB}), or run a "
            "build first"
        )
    store = Store(backend)
    if store.tightened:
        log.warning(
            "store_permissions_tightened",
            paths=store.tightened,
            reason="the record holds every log, the API tokens' hashes and the log-token key: "
            "only its owner may read it (directories 0700, files 0600)",
        )
    lost: list[LostBuild] = []
    if recover and not backend.read_only():
        try:
            lost = store.recover_lost_builds(datetime.now(UTC))
            store.blobs.sweep()  # copies a killed executor left half-done
        except StoreReadOnlyError:
            pass  # its disk said it could be written, but it cannot: said just below
        except BaseException:
            store.close()
            raise
    if recover and backend.read_only():
        log.warning(
            "recovery_skipped",
            store=store.location,
            reason="the store is read-only: builds whose executor died are shown as they were "
            "left, not marked abandoned",
        )
    for build in lost:
        log.warning(
            ErrorCode.BUILD_ABANDONED.value,  # the log line's event is the build's error code
            build=f"{build.org}/{build.pipeline} #{build.number}",
            executor=build.executor,
            lost_jobs=build.lost_jobs,
            canceled_jobs=build.canceled_jobs,
            stopped_jobs=build.stopped_jobs,
            killed_processes=build.killed_processes,
            hint=resume_hint(build),
        )
    return store
