"""A pipeline's builds, newest first, and one of them; a new build, a cancel, a retry (SPEC
§6.1, §6.3).

The writes go to the build service (``Service``; 503 without one): ``createBuild`` hands it
the checked body with the tarball decoded (``body``) and answers 201 with the queued build,
or, when the service recorded the build as refused (an IR that does not load, a tarball that
cannot be unpacked safely), the refusal's code and message with 422 (413 for a tarball over
the unpacked limit); the build is in the record either way. ``cancelBuild`` records the
request wherever the build runs and answers the build as it is now. Each route finds its
pipeline or build (the same 404 as the reads) before it reads a body.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from executor.api import models, wire
from executor.api.body import (
    SMALL_BODY_LIMIT,
    CreateBuildRequest,
    RetryBuildRequest,
    build_body_limit,
    decode_source,
    parse,
    read_body,
    request_body,
)
from executor.api.deps import Caller, Cursor, Limit, Service, StoreDep, UploadLimit
from executor.api.errors import ApiError, ErrorType, documented, documented_write
from executor.api.lookup import build_of, pipeline_of, read
from executor.api.middleware import HeadRouter
from executor.api.pagination import clamp, decode_cursor, page_json
from executor.api.paths import BUILD, BUILDS
from executor.api.service import BuildRequest, BuildService, Submitted
from executor.errors import BuildStateError, ErrorCode
from executor.store import BuildRow, Store, TokenRow

__all__ = ["router"]

router = HeadRouter()


@router.get(
    BUILDS,
    tags=["builds"],
    operation_id="listBuilds",
    summary="A pipeline's builds, newest first",
    **documented(models.BuildList, 400),
)
async def builds(
    org: str,
    pipeline: str,
    store: StoreDep,
    token: Caller,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> JSONResponse:
    before = None if cursor is None else decode_cursor(cursor, "builds", int)
    size = clamp(limit)
    rows = await read(_builds_before, store, token, org, pipeline, before, size + 1)
    return JSONResponse(page_json(rows, size, "builds", wire.build_json, lambda b: b.number))


def _builds_before(
    store: Store, token: TokenRow, org: str, pipeline: str, before: int | None, limit: int
) -> list[BuildRow]:
    pipeline_of(store, token, org, pipeline)
    return store.builds_page(org, pipeline, before=before, limit=limit)


@router.get(
    BUILD,
    tags=["builds"],
    operation_id="getBuild",
    summary="A build",
    **documented(models.Build),
)
async def build(
    org: str, pipeline: str, number: int, store: StoreDep, token: Caller
) -> JSONResponse:
    return JSONResponse(wire.build_json(await read(build_of, store, token, org, pipeline, number)))


@router.post(
    BUILDS,
    tags=["builds"],
    operation_id="createBuild",
    summary="Create a build: queued, it runs in this server",
    **documented_write(
        models.Build,
        201,
        402,
        403,
        404,
        413,
        s422="Not a CreateBuildRequest (no pipeline_ir, source_b64 not base64, ...), or the "
        "IR or the tarball refused: then the build is recorded, failed, with its error fields",
        s403="Never answered by harmont-exec (Harmont: manual builds are disabled for this "
        "pipeline; here every pipeline allows them)",
        openapi_extra=request_body(CreateBuildRequest),
    ),
)
async def create_build(
    org: str,
    pipeline: str,
    request: Request,
    store: StoreDep,
    token: Caller,
    service: Service,
    max_upload: UploadLimit,
) -> JSONResponse:
    await read(pipeline_of, store, token, org, pipeline)
    body = await read_body(request, build_body_limit(max_upload))
    submitted = await read(_submit, service, org, pipeline, body, max_upload)
    build = submitted.build
    if submitted.error is not None:
        code = submitted.error.code
        raise ApiError(
            413 if code is ErrorCode.PAYLOAD_TOO_LARGE else 422,
            ErrorType.INVALID_REQUEST,
            code,
            f"build #{build.number} of {org}/{pipeline} is recorded as failed: {submitted.error}",
        )
    return _created(build)


def _created(build: BuildRow) -> JSONResponse:
    where = BUILD.format(org=build.org, pipeline=build.pipeline, number=build.number)
    return JSONResponse(wire.build_json(build), status_code=201, headers={"location": where})


def _submit(
    service: BuildService, org: str, pipeline: str, body: bytes, max_upload: int
) -> Submitted:
    # In a worker thread: parsing and decoding a 100 MB body takes a while.
    request = parse(CreateBuildRequest, body)
    if request.pipeline_ir is None or not request.pipeline_ir.strip():
        raise ApiError(
            422,
            ErrorType.INVALID_REQUEST,
            ErrorCode.INVALID_REQUEST,
            "pipeline_ir is missing or blank; harmont-exec does not render a pipeline's IR "
            "itself: send Harmont v0 IR JSON or a harmont-exec build file's text",
        )
    source = decode_source(request, max_upload)
    return service.submit(
        BuildRequest(
            org=org,
            pipeline=pipeline,
            pipeline_ir=request.pipeline_ir,
            source=source,
            env=dict(request.env or {}),
            branch=request.branch,
            commit=request.commit,
            message=request.message,
            origin=request.source or "api",
        )
    )


@router.put(
    f"{BUILD}/cancel",
    tags=["builds"],
    operation_id="cancelBuild",
    summary="Cancel a build, wherever it runs; a finished one is returned unchanged",
    **documented_write(models.Build, 200, 404, s422="A path value of the wrong type"),
)
async def cancel_build(
    org: str, pipeline: str, number: int, store: StoreDep, token: Caller, service: Service
) -> JSONResponse:
    build = await read(_cancel, store, token, service, org, pipeline, number)
    return JSONResponse(wire.build_json(build))


def _cancel(
    store: Store, token: TokenRow, service: BuildService, org: str, pipeline: str, number: int
) -> BuildRow:
    return service.cancel(build_of(store, token, org, pipeline, number))


@router.post(
    f"{BUILD}/retry",
    tags=["builds"],
    operation_id="retryBuild",
    summary="Queue a new build of a finished build's plan (extension)",
    **documented_write(
        models.Build,
        201,
        404,
        409,
        413,
        s422="Not a RetryBuildRequest, or a path value of the wrong type",
        openapi_extra={
            "x-harmont-extension": True,
            **request_body(RetryBuildRequest, required=False),
        },
    ),
)
async def retry_build(
    org: str,
    pipeline: str,
    number: int,
    request: Request,
    store: StoreDep,
    token: Caller,
    service: Service,
) -> JSONResponse:
    build = await read(build_of, store, token, org, pipeline, number)
    body = await read_body(request, SMALL_BODY_LIMIT)
    failed_only = parse(RetryBuildRequest, body, empty_is=b"{}").failed_only
    return _created(await read(_retry, service, build, failed_only))


def _retry(service: BuildService, build: BuildRow, failed_only: bool) -> BuildRow:
    try:
        return service.retry(build, failed_only=failed_only)
    except BuildStateError as exc:
        raise ApiError(409, ErrorType.CONFLICT, exc.code, str(exc)) from None
