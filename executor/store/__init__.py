"""The record: the only code that talks to a database (SPEC §5).

``open_store(url)`` opens the store a path or URL names: SQLite (one file, WAL, safe beside
concurrent readers; the default) or PostgreSQL (one record shared by many executors and API
servers), with one schema, one set of migrations and one ``Store`` over both (``backend.py``).
Writes are queued and group-committed by one writer thread; reads return frozen, typed rows.
This package re-exports the public names and holds no logic.
"""

from __future__ import annotations

from executor.store.blobs import Blob, BlobStore
from executor.store.names import MAX_NAME_LENGTH, slug_for
from executor.store.opening import (
    DB_ENV,
    DEFAULT_DB,
    open_store,
    resolve_backend,
    resolve_db_path,
)
from executor.store.reads import token_hash
from executor.store.recovery import LostBuild
from executor.store.rows import (
    REFUSED_CODES,
    UNSET,
    ArtifactRow,
    AttemptRow,
    BuildRow,
    CreatedBuild,
    JobProgress,
    JobRow,
    JobText,
    LogChunk,
    OrganizationRow,
    PipelineRow,
    TokenRow,
    TransitionRow,
    Unset,
)
from executor.store.sql import LOCAL_ORGANIZATION, SCHEMA_VERSION
from executor.store.store import TOKEN_PREFIX, Store

__all__ = [
    "DB_ENV",
    "DEFAULT_DB",
    "LOCAL_ORGANIZATION",
    "MAX_NAME_LENGTH",
    "REFUSED_CODES",
    "SCHEMA_VERSION",
    "TOKEN_PREFIX",
    "UNSET",
    "ArtifactRow",
    "AttemptRow",
    "Blob",
    "BlobStore",
    "BuildRow",
    "CreatedBuild",
    "JobProgress",
    "JobRow",
    "JobText",
    "LogChunk",
    "LostBuild",
    "OrganizationRow",
    "PipelineRow",
    "Store",
    "TokenRow",
    "TransitionRow",
    "Unset",
    "open_store",
    "resolve_backend",
    "resolve_db_path",
    "slug_for",
    "token_hash",
]
