"""The SQLite backend: one file in WAL mode, safe beside concurrent readers (the default).

Every connection comes from ``connect`` (WAL, synchronous=FULL, foreign keys on, a busy
timeout) and every sqlite3 exception is read by ``read_error`` for ``failures.py`` (what it
means, what to do), so no sqlite3 exception leaves the package. Artifact files live in
``artifacts/`` beside the database file. This module builds no queries of its own: the SQL text
lives in ``sql.py``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from executor.errors import StoreError
from executor.store import sql
from executor.store.backend import Backend
from executor.store.failures import DriverError, Failure, classify
from executor.store.private import check_owned, create_private_file, make_private_dirs, tighten

__all__ = ["BUSY_TIMEOUT_S", "MIN_SQLITE", "connect", "read_error", "sqlite_backend"]

MIN_SQLITE = (3, 33, 0)
"""UPDATE ... FROM (the writer's batched job updates) arrived in SQLite 3.33 (2020)."""

BUSY_TIMEOUT_S = 30.0
"""How long a statement waits for another connection's write lock before failing."""

SYNCHRONOUS = "FULL"
"""Every commit is synced to disk before it returns (in WAL mode: the WAL, at each commit):
a crash, a power loss or a filesystem that turns read-only loses at most the batch being
written, never one that was committed, so nothing shown is lost (SPEC §5). NORMAL would sync
only at checkpoints; ``benchmarks.bench_run --tools harmont,harmont-normal`` measures the
difference."""


RESERVE_BYTES = 8 << 20
"""The most space kept in reserve beside the database (``<file>.reserve``): freed when the
disk is full, so that the writes that stop a build land (SPEC §5). On a small disk it is a
quarter of the free space."""


def artifacts_beside(path: Path) -> Path:
    """Where a SQLite store keeps its artifact files: ``artifacts/`` beside the database in
    the default ``.harmont/`` (or where an existing store already keeps them), else
    ``<database file>.artifacts/`` beside it, so that a user's own ``artifacts/`` directory
    beside a ``--db ./ci.db`` is never taken over."""
    shared = path.parent / "artifacts"
    if path.parent.name == ".harmont" or (shared / "sha256").is_dir():
        return shared
    return path.with_name(path.name + ".artifacts")


def sqlite_backend(path: Path) -> Backend:
    """The store in the SQLite file ``path`` (an absolute path; see ``url.resolve_db_path``)."""
    blob_root = artifacts_beside(path)

    def prepare() -> list[str]:
        _check_version()  # before anything is made: nothing is left at the path
        make_private_dirs(path.parent)
        created = create_private_file(path)
        check_owned(blob_root)
        tightened = [] if created else tighten(path, blob_root)
        keep_reserve(path)
        return tightened

    return Backend(
        dialect=sql.SQLITE,
        url=f"sqlite:///{path}",
        location=str(path),
        connect=lambda: connect(path),
        errors=(sqlite3.Error,),
        read_error=lambda exc: read_error(exc, path),
        blob_root=blob_root,
        path=path,
        prepare=prepare,
        release_reserve=lambda: release_reserve(path),
        read_only=lambda: read_only(path),
        found_read_only=lambda: found_read_only(path),
    )


def _free_bytes(directory: Path) -> int | None:
    try:
        info = os.statvfs(directory)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


def _reserve_of(path: Path) -> Path:
    return path.with_name(path.name + ".reserve")


def keep_reserve(path: Path) -> None:
    """Make the reserve file beside the database if it is missing (a quarter of the free
    space, at most RESERVE_BYTES); a disk too full for it has none."""
    reserve = _reserve_of(path)
    if reserve.exists():
        return
    try:
        free = os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize
        size = min(RESERVE_BYTES, free // 4)
        if size < 64 << 10:
            return
        fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        block = b"\0" * (1 << 20)  # written, not sparse: the space must really be taken
        left = size
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
    except OSError:
        os.close(fd)
        reserve.unlink(missing_ok=True)
        return
    os.close(fd)


def release_reserve(path: Path) -> int:
    """Free the reserve; how many bytes it held (0: there was none)."""
    reserve = _reserve_of(path)
    try:
        size = reserve.stat().st_size
        reserve.unlink()
    except OSError:
        return 0
    return size


def read_error(exc: Exception, path: Path | None = None) -> DriverError:
    """What SQLite said: its error name (``SQLITE_FULL``; None when sqlite3 gives none), its
    message and, given the database file, the free space beside it (a full disk may only say
    "disk I/O error")."""
    free = None if path is None else _free_bytes(path.parent)
    return DriverError.read(exc, getattr(exc, "sqlite_errorname", None), free)


def _failure(exc: Exception) -> Failure:
    return classify(read_error(exc), server=False)


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
            if _failure(exc) is not Failure.BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _check_version() -> None:
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise StoreError(
            f"the store needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer, but this Python "
            f"uses SQLite {sqlite3.sqlite_version}; use a Python built with a newer SQLite "
            "(python.org and distribution builds since 2021 have one)"
        )


_FOUND_READ_ONLY: set[Path] = set()  # stores a write was refused on (an ext4 remounted
# read-only after an error still says it is writable): read-only from then on, in this process


def read_only(path: Path) -> bool:
    """Whether the database cannot be written: its file system is mounted read-only, the file
    (or its directory, where SQLite keeps the -wal and -shm) is not writable by us, or SQLite
    already refused to write it in this process."""
    if path in _FOUND_READ_ONLY:
        return True
    try:
        if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        return False
    return path.exists() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def found_read_only(path: Path) -> None:
    """A write was refused as read-only: treat the store so from now on (``read_only``)."""
    _FOUND_READ_ONLY.add(path)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to a store that cannot be written (SPEC §5: read commands work
    on a full or read-only disk, or a copied file): through the -wal and -shm if they are
    there (SQLite reads them on read-only media), else as an immutable file (a cleanly
    closed database: nothing is in a -wal to miss). A -wal without its -shm cannot be read
    there: refused, rather than showing the record without what the -wal holds."""
    location = quote(str(path))
    wal = path.with_name(path.name + "-wal")
    shm = path.with_name(path.name + "-shm")
    has_wal = wal.exists() and wal.stat().st_size > 0
    if has_wal and not shm.exists():
        raise StoreError(
            f"the store {path} is read-only and its {wal.name} holds changes that cannot be "
            f"read without its {shm.name}: copy that file too, or open the store where it can "
            "be written (SQLite then merges the -wal)"
        )
    uri = f"file:{location}?mode=ro" + ("" if has_wal else "&immutable=1")
    db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    return db


def connect(path: Path) -> sqlite3.Connection:
    """A connection to ``path`` in autocommit mode (transactions are explicit BEGIN/COMMIT),
    usable from any thread (callers serialize access); read-only when the store cannot be
    written (``read_only``)."""
    _check_version()
    if read_only(path):
        return _connect_read_only(path)
    try:
        return _connect_writable(path)
    except sqlite3.OperationalError as exc:
        cannot_open = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_CANTOPEN
        if path.exists() and (cannot_open or _failure(exc) is Failure.READ_ONLY):
            # Its disk said it was writable, but it is not (the kernel remounted it
            # read-only after an error, or the -shm cannot be made): read it as such.
            found_read_only(path)
            return _connect_read_only(path)
        raise


def _connect_writable(path: Path) -> sqlite3.Connection:
    """A read-write connection: WAL, synced commits, foreign keys, a busy timeout."""
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
        db.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
        db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        db.close()
        raise
    return db
