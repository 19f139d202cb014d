"""Artifacts (SPEC §6-§7, extensions): a build's and a job's, paginated, and one artifact's
content, streamed from the store's blob directory.

Tenancy is ``lookup``'s: the org / pipeline / build / job 404s as everywhere, and an artifact
id from another build (or not a UUID) is ``artifact_not_found``. A download is served as an
attachment (never rendered by a browser on the API's origin) with its recorded content type,
its length, and its SHA-256 in ``Repr-Digest`` (RFC 9530), read from disk a chunk at a time.
"""

from __future__ import annotations

import base64
from urllib.parse import quote

from fastapi.responses import FileResponse, JSONResponse

from executor.api import models, wire
from executor.api.deps import Caller, Cursor, Limit, StoreDep
from executor.api.errors import ApiError, ErrorType, documented, error_responses
from executor.api.lookup import artifact_in, build_of, job_of, read
from executor.api.middleware import HeadRouter
from executor.api.pagination import clamp, decode_cursor, invalid_cursor_error, page_json
from executor.api.paths import BUILD, JOB
from executor.errors import ErrorCode, StoreError
from executor.store import ArtifactRow, Store, TokenRow
from executor.store.blobs import CHUNK_BYTES

__all__ = ["router"]

router = HeadRouter()
_EXTENSION = {"x-harmont-extension": True}


def _attachment(filename: str) -> str:
    """``attachment`` with the name twice (RFC 6266): an ASCII ``filename`` for every client
    (each non-ASCII character, quote or backslash as '_'; `curl -OJ` uses it) and the exact
    UTF-8 name in ``filename*`` for those that read it."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=utf-8''{quote(filename, safe='')}"


def _after(store: Store, cursor: str | None, kind: str) -> ArtifactRow | None:
    """The artifact a cursor of ``kind`` points after (the caller checks it is of its list)."""
    if cursor is None:
        return None
    after = store.get_artifact(decode_cursor(cursor, kind, str))
    if after is None:
        raise invalid_cursor_error(cursor)
    return after


@router.get(
    f"{BUILD}/artifacts",
    tags=["artifacts"],
    operation_id="listBuildArtifacts",
    summary="A build's artifacts: its jobs in plan order, then by path (extension)",
    **documented(models.ArtifactList, 400, openapi_extra=_EXTENSION),
)
async def build_artifacts(
    org: str,
    pipeline: str,
    number: int,
    store: StoreDep,
    token: Caller,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> JSONResponse:
    size = clamp(limit)

    def lookup() -> list[ArtifactRow]:
        build = build_of(store, token, org, pipeline, number)
        after = _after(store, cursor, "build_artifacts")
        if after is not None and after.build_id != build.id:
            raise invalid_cursor_error(str(cursor))
        return store.list_artifacts(
            build_id=build.id, after=None if after is None else after.id, limit=size + 1
        )

    rows = await read(lookup)
    return JSONResponse(
        page_json(rows, size, "build_artifacts", wire.artifact_json, lambda a: a.id)
    )


@router.get(
    f"{JOB}/artifacts",
    tags=["artifacts"],
    operation_id="listJobArtifacts",
    summary="A job's artifacts, by path (extension)",
    **documented(models.ArtifactList, 400, openapi_extra=_EXTENSION),
)
async def job_artifacts(
    org: str,
    pipeline: str,
    number: int,
    job_id: str,
    store: StoreDep,
    token: Caller,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> JSONResponse:
    size = clamp(limit)

    def lookup() -> list[ArtifactRow]:
        job = job_of(store, token, org, pipeline, number, job_id)
        after = _after(store, cursor, "job_artifacts")
        if after is not None and after.job_id != job.id:
            raise invalid_cursor_error(str(cursor))
        return store.list_artifacts(
            job_id=job.id, after=None if after is None else after.id, limit=size + 1
        )

    rows = await read(lookup)
    return JSONResponse(page_json(rows, size, "job_artifacts", wire.artifact_json, lambda a: a.id))


@router.get(
    f"{BUILD}/artifacts/{{artifact_id}}/download",
    tags=["artifacts"],
    operation_id="downloadArtifact",
    summary="An artifact's content (extension)",
    response_class=FileResponse,
    openapi_extra=_EXTENSION,
    responses={
        200: {
            "description": "The file's bytes, with its recorded content type",
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(401, 404, 422),
    },
)
async def download(
    org: str, pipeline: str, number: int, artifact_id: str, store: StoreDep, token: Caller
) -> FileResponse:
    artifact, path = await read(_artifact_file, store, token, org, pipeline, number, artifact_id)
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


def _artifact_file(
    store: Store, token: TokenRow, org: str, pipeline: str, number: int, artifact_id: str
) -> tuple[ArtifactRow, str]:
    artifact = artifact_in(store, build_of(store, token, org, pipeline, number), artifact_id)
    try:
        return artifact, str(store.artifact_file(artifact))
    except StoreError as exc:
        raise ApiError(
            500, ErrorType.SERVER_ERROR, ErrorCode.ARTIFACT_CONTENT_MISSING, str(exc)
        ) from None
