"""The record: the only code that talks to a database (SPEC §5).

``open_store(url)`` opens the store a path or URL names: SQLite today (one file, WAL, safe
beside concurrent readers), with schema and SQL plain enough for a PostgreSQL backend to share.
Writes are queued and group-committed by one writer thread; reads return frozen, typed rows.
This package re-exports the public names and holds no logic.
"""

from __future__ import annotations

from executor.store.blobs import Blob, BlobStore
from executor.store.reads import token_hash
from executor.store.recovery import LostBuild
from executor.store.rows import (
    UNSET,
    ArtifactRow,
    AttemptRow,
    BuildRow,
    CreatedBuild,
    JobRow,
    JobText,
    LogChunk,
    OrganizationRow,
    PipelineRow,
    TokenRow,
    TransitionRow,
    Unset,
)
from executor.store.sql import SCHEMA_VERSION
from executor.store.sqlite import TOKEN_PREFIX, Store
from executor.store.url import DB_ENV, DEFAULT_DB, open_store, resolve_db_path

__all__ = [
    "DB_ENV",
    "DEFAULT_DB",
    "SCHEMA_VERSION",
    "TOKEN_PREFIX",
    "UNSET",
    "ArtifactRow",
    "AttemptRow",
    "Blob",
    "BlobStore",
    "BuildRow",
    "CreatedBuild",
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
    "resolve_db_path",
    "token_hash",
]
