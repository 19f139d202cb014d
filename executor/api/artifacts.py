"""Artifact routes (SPEC §6-§7, extensions): a build's and a job's artifacts, paginated, and
one artifact's content, streamed from the store's blob directory.

Tenancy is the API's: the org / pipeline / build lookups answer the same 404 for what does not
exist and what the token may not see, and an artifact id from another build (or not a UUID) is
``artifact_not_found``. A download is served as an attachment (never rendered by a browser on
the API's origin) with its recorded content type, its length, and its SHA-256 in
``Repr-Digest`` (RFC 9530), read from disk a chunk at a time.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations at runtime.
import base64
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, FastAPI, Query
from fastapi.responses import FileResponse, JSONResponse

from executor.api import models, wire
from executor.api.errors import ApiError, not_found
from executor.api.lookup import API_PREFIX, STATUS_TEXT, Lookups, clamp, documented, is_uuid
from executor.errors import StoreError
from executor.store import ArtifactRow, BuildRow, TokenRow
from executor.store.blobs import CHUNK_BYTES

__all__ = ["add_artifact_routes"]


def _attachment(filename: str) -> str:
    """``attachment`` with the name twice (RFC 6266): an ASCII ``filename`` for every client
    (each non-ASCII character, quote or backslash as '_'; `curl -OJ` uses it) and the exact
    UTF-8 name in ``filename*`` for those that read it."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=utf-8''{quote(filename, safe='')}"


def _page(rows: list[ArtifactRow], size: int, kind: str) -> JSONResponse:
    page = rows[:size]
    more = len(rows) > size
    return JSONResponse(
        {
            "data": [wire.artifact_json(a) for a in page],
            "next_cursor": wire.encode_cursor(kind, page[-1].id) if more else None,
        }
    )


def add_artifact_routes(app: FastAPI, lookups: Lookups) -> None:
    store = lookups.store
    Caller = Annotated[TokenRow, Depends(lookups.caller)]
    Limit = Annotated[int, Query(description="Page size (1-100, default 50; clamped).")]
    Cursor = Annotated[
        str | None, Query(description="Opaque cursor from a previous page's next_cursor.")
    ]
    builds_path = f"{API_PREFIX}/organizations/{{org}}/pipelines/{{pipeline}}/builds"
    extension = {"x-harmont-extension": True}

    def cursor_artifact(cursor: str | None, kind: str) -> ArtifactRow | None:
        """The artifact a cursor points after, checked by the caller to be of the list."""
        if cursor is None:
            return None
        after = store.get_artifact(str(wire.decode_cursor(cursor, kind, str)))
        if after is None:
            raise wire.invalid_cursor(cursor)
        return after

    @app.get(
        f"{builds_path}/{{number}}/artifacts",
        tags=["artifacts"],
        operation_id="listBuildArtifacts",
        summary="A build's artifacts: its jobs in plan order, then by path (extension)",
        **documented(models.ArtifactList, 400, openapi_extra=extension),
    )
    async def build_artifacts(
        org: str,
        pipeline: str,
        number: int,
        token: Caller,
        limit: Limit = 50,
        cursor: Cursor = None,
    ) -> JSONResponse:
        size = clamp(limit)

        def lookup() -> list[ArtifactRow]:
            build = lookups.build_of(token, org, pipeline, number)
            after = cursor_artifact(cursor, "build_artifacts")
            if after is not None and after.build_id != build.id:
                raise wire.invalid_cursor(str(cursor))
            return store.list_artifacts(
                build_id=build.id, after=None if after is None else after.id, limit=size + 1
            )

        return _page(await lookups.read(lookup), size, "build_artifacts")

    @app.get(
        f"{builds_path}/{{number}}/jobs/{{job_id}}/artifacts",
        tags=["artifacts"],
        operation_id="listJobArtifacts",
        summary="A job's artifacts, by path (extension)",
        **documented(models.ArtifactList, 400, openapi_extra=extension),
    )
    async def job_artifacts(
        org: str,
        pipeline: str,
        number: int,
        job_id: str,
        token: Caller,
        limit: Limit = 50,
        cursor: Cursor = None,
    ) -> JSONResponse:
        size = clamp(limit)

        def lookup() -> list[ArtifactRow]:
            job = lookups.job_of(token, org, pipeline, number, job_id)
            after = cursor_artifact(cursor, "job_artifacts")
            if after is not None and after.job_id != job.id:
                raise wire.invalid_cursor(str(cursor))
            return store.list_artifacts(
                job_id=job.id, after=None if after is None else after.id, limit=size + 1
            )

        return _page(await lookups.read(lookup), size, "job_artifacts")

    def artifact_missing(build: BuildRow, artifact_id: str) -> ApiError:
        return not_found(
            "artifact_not_found",
            f"no artifact {artifact_id!r} in build #{build.number} of {build.org}/"
            f"{build.pipeline}; list them with GET .../builds/{build.number}/artifacts",
        )

    @app.get(
        f"{builds_path}/{{number}}/artifacts/{{artifact_id}}/download",
        tags=["artifacts"],
        operation_id="downloadArtifact",
        summary="An artifact's content (extension)",
        response_class=FileResponse,
        openapi_extra=extension,
        responses={
            200: {
                "description": "The file's bytes, with its recorded content type",
                "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            },
            **{
                status: {"model": models.Error, "description": STATUS_TEXT[status]}
                for status in (401, 404, 422)
            },
        },
    )
    async def download(
        org: str, pipeline: str, number: int, artifact_id: str, token: Caller
    ) -> FileResponse:
        def lookup() -> tuple[ArtifactRow, str]:
            build = lookups.build_of(token, org, pipeline, number)
            artifact = store.get_artifact(artifact_id.lower()) if is_uuid(artifact_id) else None
            if artifact is None or artifact.build_id != build.id:
                raise artifact_missing(build, artifact_id)
            try:
                return artifact, str(store.artifact_file(artifact))
            except StoreError as exc:
                raise ApiError(500, "server_error", "artifact_content_missing", str(exc)) from None

        artifact, path = await lookups.read(lookup)
        digest = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
        response = FileResponse(
            path,
            media_type=artifact.mime_type,
            headers={
                "content-disposition": _attachment(artifact.filename),
                # Exactly the recorded type: Starlette would add "; charset=utf-8" to text/*,
                # a guess about bytes the job wrote.
                "content-type": artifact.mime_type,
                "repr-digest": f"sha-256=:{digest}:",
                "x-content-type-options": "nosniff",
            },
        )
        response.chunk_size = CHUNK_BYTES
        return response
