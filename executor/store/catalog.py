"""The record's few synchronous writes that are not builds: organizations and pipelines made
through the API (``createOrganization``, ``createPipeline``), API tokens, and the store's own
keys. Each is one statement or one short transaction on the store's connection, under its lock;
``Store`` inherits them. Builds and their changes are ``Store``'s (``store.py``)."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from executor.errors import (
    InternalError,
    OrganizationNotFoundError,
    SlugTakenError,
    StoreError,
    StoreReadOnlyError,
)
from executor.store import sql
from executor.store.failures import Failure
from executor.store.names import check_organization_slug, slug_for
from executor.store.reads import Reader, token_hash
from executor.store.rows import OrganizationRow, PipelineRow, TokenRow, format_time

__all__ = ["TOKEN_PREFIX", "Catalog"]

TOKEN_PREFIX = "hm_"
"""Every API token starts with this (Harmont's format: ``hm_`` + 43 url-safe characters)."""


class Catalog(Reader):
    """The synchronous writes of organizations, pipelines, tokens and keys (see the module
    docstring); ``Store`` is the class to use."""

    _closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store {self._backend.location} is closed; open it again")

    # --- organizations and pipelines (synchronous) -------------------------------------------

    def create_organization(self, *, name: str, url: str | None, now: datetime) -> OrganizationRow:
        """Record a new organization (``createOrganization``), its slug made from ``name``
        (``names.slug_for``). SlugTakenError if an organization has that slug already,
        InvalidNameError for a name that makes none."""
        self._check_open()
        slug = check_organization_slug(slug_for(name, what="organization name"))
        args = (str(uuid.uuid4()), slug, name, url, format_time(now))
        try:
            with self._lock:
                added = self._db.execute(sql.INSERT_ORGANIZATION, args).rowcount
        except self._errors as exc:
            raise self._backend.error(f"record the new organization {slug!r}", exc) from None
        if added != 1:
            raise SlugTakenError(
                f"an organization with the slug {slug!r} exists already (the name {name!r} "
                "makes that slug); use it, or choose another name"
            )
        found = self.get_organization(slug)
        if found is None:  # written by this process a moment ago
            raise InternalError(f"organization {slug!r} is not in {self.location} after writing")
        return found

    def create_pipeline(
        self,
        org: str,
        *,
        name: str,
        repository: str | None,
        default_branch: str | None,
        description: str | None,
        repo_name: str | None,
        now: datetime,
    ) -> PipelineRow:
        """Record a new pipeline of organization ``org`` (``createPipeline``), its slug made
        from ``name``. SlugTakenError if the organization has a pipeline with that slug,
        InvalidNameError for a name that makes none, OrganizationNotFoundError for an
        organization that does not exist."""
        self._check_open()
        slug = slug_for(name, what="pipeline name")
        try:
            with self._lock:
                found = self._db.execute(sql.ORGANIZATION_ID, (org,)).fetchone()
                added = 0
                if found is not None:
                    args = (
                        str(uuid.uuid4()),
                        found[0],
                        slug,
                        name,
                        repository,
                        default_branch,
                        description,
                        repo_name,
                        format_time(now),
                    )
                    added = self._db.execute(sql.INSERT_PIPELINE, args).rowcount
        except self._errors as exc:
            raise self._backend.error(f"record the new pipeline {org}/{slug}", exc) from None
        if found is None:
            raise OrganizationNotFoundError(
                f"no organization {org!r}; create it first (createOrganization)"
            )
        if added != 1:
            raise SlugTakenError(
                f"organization {org!r} has a pipeline with the slug {slug!r} already (the name "
                f"{name!r} makes that slug); use it, or choose another name"
            )
        pipeline_row = self.get_pipeline(org, slug)
        if pipeline_row is None:  # written by this process a moment ago
            raise InternalError(f"pipeline {org}/{slug} is not in {self.location} after writing")
        return pipeline_row

    # --- API tokens (synchronous) ------------------------------------------------------------

    def create_token(
        self,
        *,
        description: str | None,
        organizations: Sequence[str] | None,
        expires_at: datetime | None,
        now: datetime,
    ) -> tuple[TokenRow, str]:
        """DbRow a new API token; return its row and its secret (``hm_`` + 43 url-safe
        characters), which is not stored and cannot be shown again. ``organizations`` limits
        what it sees (None: every organization)."""
        self._check_open()
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = str(uuid.uuid4())
        orgs = None if organizations is None else json.dumps(sorted(set(organizations)))
        expires = None if expires_at is None else format_time(expires_at)
        args = (token_id, token_hash(secret), description, orgs, format_time(now), expires)
        try:
            with self._lock:
                self._db.execute(sql.INSERT_TOKEN, args)
                row = self._db.execute(sql.TOKEN_BY_ID, (token_id,)).fetchone()
        except self._errors as exc:
            raise self._backend.error("record a new API token", exc) from None
        return TokenRow.from_db(row), secret

    def revoke_token(self, token_id: str, *, now: datetime) -> TokenRow | None:
        """Revoke a token (at once: the next request with it gets 401). Returns its row, or
        None if there is no such token; revoking twice keeps the first time."""
        self._check_open()
        try:
            with self._lock:
                self._db.execute(sql.REVOKE_TOKEN, (format_time(now), token_id))
                row = self._db.execute(sql.TOKEN_BY_ID, (token_id,)).fetchone()
        except self._errors as exc:
            raise self._backend.error(f"revoke API token {token_id}", exc) from None
        return None if row is None else TokenRow.from_db(row)

    # --- the store's own keys (synchronous) -------------------------------------------------

    def store_key(self, name: str) -> bytes:
        """A 32-byte secret kept in the store under ``name``, made by the first process that
        asks; every process sharing the store gets the same one (e.g. the live-log tokens'
        HMAC key, so a token minted by one server is good at another)."""
        self._check_open()
        try:
            with self._lock:
                found = self._db.execute(sql.STORE_KEY, (name,)).fetchone()
                if found is None:  # (only then a write: a read-only store with one works)
                    now = format_time(datetime.now(UTC))
                    self._db.execute(sql.ENSURE_STORE_KEY, (name, secrets.token_hex(32), now))
                    found = self._db.execute(sql.STORE_KEY, (name,)).fetchone()
        except self._errors as exc:
            if self._backend.failure(exc) is Failure.READ_ONLY or self._backend.read_only():
                raise StoreReadOnlyError(
                    f"the store {self.location} is read-only and has no {name!r} key yet (it "
                    "is made the first time it is needed); open the store once where it can be "
                    "written"
                ) from None
            raise self._backend.error(f"read or create the key {name!r}", exc) from None
        return bytes.fromhex(found[0])
