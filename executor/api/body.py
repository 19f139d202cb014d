"""The write routes' request bodies (SPEC §6.3): read within a size limit, then checked against
their models, which carry Harmont's schema names (``CreateBuildRequest``, ...).

A body is read here, by hand, rather than by FastAPI: FastAPI reads a body whole before the
route runs, and checks it before the token. ``read_body`` refuses one over its limit (413
``payload_too_large``) from its Content-Length before reading any of it, and, for one that
declares none or less than it sends, as soon as the bytes read pass the limit, so no body is
ever held beyond it. ``parse`` then checks the JSON against a model (422 ``invalid_request``,
naming every field that is wrong). The models are strict: a string is a JSON string, a bool is
``true`` or ``false``, and a field not in the schema is refused (a typo must not be ignored).

The createBuild body carries the source tarball as base64, 4/3 of the tarball's size: the
server's upload limit (``serve --max-upload-mb``) is on the decoded tarball, and the body may
be as large as that in base64 plus ``BODY_ALLOWANCE`` for the rest (``build_body_limit``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any, TypeVar

from fastapi import Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from executor.api.errors import ApiError, ErrorType
from executor.errors import ErrorCode

__all__ = [
    "BODY_ALLOWANCE",
    "REQUEST_MODELS",
    "SMALL_BODY_LIMIT",
    "ApiTokenCreateRequest",
    "CreateBuildRequest",
    "CreateOrganizationRequest",
    "CreatePipelineRequest",
    "RetryBuildRequest",
    "build_body_limit",
    "decode_source",
    "parse",
    "read_body",
    "request_body",
    "too_large_error",
]

M = TypeVar("M", bound=BaseModel)

BODY_ALLOWANCE = 4 << 20
"""What a createBuild body may hold beside the base64 tarball (its IR, env, ...)."""
SMALL_BODY_LIMIT = 64 << 10
"""The limit of every other write's body (an organization, a pipeline, a token, a retry)."""


def build_body_limit(max_upload_bytes: int) -> int:
    """The largest createBuild body: a tarball of ``max_upload_bytes`` in base64, plus
    ``BODY_ALLOWANCE``."""
    return 4 * -(-max_upload_bytes // 3) + BODY_ALLOWANCE


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class CreateOrganizationRequest(_Request):
    """``createOrganization``: the slug is derived from the name."""

    name: str = Field(min_length=1, description="Display name.")
    url: str | None = Field(default=None, description="Optional website URL.")


class CreatePipelineRequest(_Request):
    """``createPipeline``: the slug is derived from the name; a taken one is a 422."""

    name: str = Field(min_length=1, description="Display name.")
    repository: str = Field(description="The source repository this pipeline builds.")
    default_branch: str = Field(description="The branch built by default.")
    description: str | None = Field(default=None, description="Optional human description.")
    repo_name: str | None = Field(
        default=None,
        description="Optional `owner/repo` label; when omitted it is derived from `repository`.",
    )


class CreateBuildRequest(_Request):
    """``createBuild``: ``pipeline_ir`` (Harmont v0 IR JSON, either form, or a harmont-exec
    build file's YAML/JSON text) and an optional gzip tarball of the source in ``source_b64``,
    unpacked into the build's own workspace (the jobs' working directory)."""

    pipeline_ir: str | None = Field(
        default=None,
        description="Harmont v0 IR JSON or a harmont-exec build file (YAML/JSON); required "
        "here (harmont-exec does not render a pipeline's IR in a sandbox).",
    )
    source_b64: str | None = Field(
        default=None,
        description="Standard base64 (padded) of a gzip tarball of the source; at most the "
        "server's upload limit once decoded (`serve --max-upload-mb`, default 100).",
    )
    source_sha256: str | None = Field(
        default=None,
        description="SHA-256 (hex) of the decoded tarball; checked when given.",
    )
    source_url: str | None = Field(
        default=None, description="Not supported here: send the source as `source_b64`."
    )
    env: dict[str, str] | None = Field(
        default=None, description="Build-level environment variables (over the build's env)."
    )
    branch: str | None = Field(default=None, description="Source branch.")
    commit: str | None = Field(default=None, description="Source commit SHA.")
    message: str | None = Field(default=None, description="Optional build/commit message.")
    source: str | None = Field(
        default=None, description="How the build was triggered; defaults to `api`."
    )


class RetryBuildRequest(_Request):
    """The ``retry`` extension: a new build of the build's recorded plan."""

    failed_only: bool = Field(
        default=False,
        description="Run only the jobs that did not pass; the others keep their result "
        "(`harmont-exec retry --failed-only`).",
    )


class ApiTokenCreateRequest(_Request):
    """``createApiToken``."""

    description: str = Field(description="Human label for the key.")
    expires_at: AwareDatetime | None = Field(
        default=None,
        description="Optional expiry (with a time zone); null or omitted: never, or when the "
        "calling token expires if it does.",
    )


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    CreateOrganizationRequest,
    CreatePipelineRequest,
    CreateBuildRequest,
    RetryBuildRequest,
    ApiTokenCreateRequest,
)
"""The bodies the OpenAPI document lists among its schemas."""


def request_body(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """The ``openapi_extra`` of a route whose body is ``model`` (read by hand, so FastAPI does
    not know it)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": ref}}}}


def too_large_error(what: str, limit: int) -> ApiError:
    return ApiError(
        413,
        ErrorType.INVALID_REQUEST,
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"{what} is larger than this server takes ({limit} bytes); send a smaller one "
        "(the source tarball's limit is `serve --max-upload-mb`)",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, at most ``limit`` bytes: 413 as soon as it is known to be more."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large_error(f"the request body ({declared} bytes)", limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large_error("the request body", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _invalid(message: str) -> ApiError:
    return ApiError(422, ErrorType.INVALID_REQUEST, ErrorCode.INVALID_REQUEST, message)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse(model: type[M], body: bytes, *, empty_is: bytes | None = None) -> M:
    """``body`` as ``model``; 422 naming every problem. An empty body is ``empty_is`` (when a
    route's body is optional), or refused."""
    if not body.strip():
        if empty_is is None:
            raise _invalid(f"the request body is empty; send a JSON {model.__name__} object")
        body = empty_is
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        problems = []
        for item in exc.errors(include_url=False):
            where = ".".join(str(p) for p in item["loc"])
            if item["type"] == "json_invalid":
                problems.append(
                    f"the body is not JSON ({item['msg'].removeprefix('Invalid JSON: ')})"
                )
            elif item["type"] == "model_type":
                problems.append(f"the body is not a JSON object (got {_shown(item['input'])})")
            elif item["type"] == "extra_forbidden":
                problems.append(f"{where}: not a field of {model.__name__}")
            elif item["type"] == "missing":
                problems.append(f"{where}: required")
            else:
                problems.append(f"{where}={_shown(item['input'])}: {item['msg']}")
        raise _invalid(
            f"{'; '.join(problems)}; send a {model.__name__} as Harmont's API documents it "
            "(see /api/v0/openapi.json)"
        ) from None


def decode_source(request: CreateBuildRequest, limit: int) -> bytes | None:
    """The tarball ``source_b64`` holds: 413 when it would be over ``limit`` bytes (known from
    its length, before decoding), 422 when it is not standard base64 or not what
    ``source_sha256`` says."""
    text = request.source_b64
    if text is None:
        if request.source_url is not None:
            raise _invalid(
                "source_url is not supported by harmont-exec (it does not fetch sources); "
                "send the gzip tarball itself, base64-encoded, as source_b64"
            )
        return None
    decoded_size = len(text) // 4 * 3 - len(text[-2:]) + len(text[-2:].rstrip("="))
    if decoded_size > limit:
        raise too_large_error(f"the source tarball ({decoded_size} bytes)", limit)
    try:
        source = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(
            "source_b64 is not base64 (standard alphabet A-Z a-z 0-9 + /, padded with '=', no "
            "line breaks); encode the gzip tarball with e.g. `base64 -w0`"
        ) from None
    expected = (request.source_sha256 or "").strip().lower()
    if expected and hashlib.sha256(source).hexdigest() != expected:
        raise _invalid(
            f"source_sha256 {_shown(request.source_sha256)} is not the SHA-256 of the decoded "
            "source_b64; send the digest of the tarball itself, or leave source_sha256 out"
        )
    return source
