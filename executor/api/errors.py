"""The Harmont error envelope: every error the API returns, how it is built, answered and
documented.

``{"error": {"type", "code", "message", "doc_url", "request_id"}}``, with the same request id
in the ``x-request-id`` header. ``type`` and ``code`` are public API: ``code`` is an
``ErrorCode`` (Harmont's catalog words where Harmont has one), ``type`` one of Harmont's
``ErrorType`` words; ``doc_url`` points at the code's section of docs/errors.md. The live log
stream's refusals are Harmont's flat body instead (``LogStreamError``).

``EXCEPTION_HANDLERS`` turns these exceptions, FastAPI's validation errors and Starlette's
HTTP errors (unknown route, wrong method) into responses; ``documented`` and
``error_responses`` are the one table of error responses in the OpenAPI document. Raising is
the routes' business; nothing here reads the store.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from executor.api import models
from executor.api.paths import API_PREFIX
from executor.errors import ErrorCode, ExecutorError, InternalError, StoreError

__all__ = [
    "DOC_BASE",
    "EXCEPTION_HANDLERS",
    "STATUS_TEXT",
    "ApiError",
    "ErrorType",
    "LogStreamError",
    "documented",
    "documented_write",
    "envelope",
    "error_response",
    "error_responses",
    "not_found_error",
    "request_id_of",
    "store_refusals",
    "unauthorized_error",
]

DOC_BASE = "docs/errors.md#"
"""Where each error code is documented: the section of the repository's docs/errors.md that has
the code as its title (no host: harmont-exec has no public docs site yet)."""


class ErrorType(StrEnum):
    """The envelope's ``type``: the kind of error, above its ``code`` (Harmont's words)."""

    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INVALID_REQUEST = "invalid_request"
    SERVER_ERROR = "server_error"


class ApiError(Exception):
    """An error response: HTTP ``status``, envelope ``type`` and ``code``, and a message that
    names the thing, shows the value and says what to do."""

    def __init__(self, status: int, type_: ErrorType, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message


def envelope(type_: ErrorType, code: ErrorCode, message: str, request_id: str) -> dict[str, Any]:
    return {
        "error": {
            "type": type_,
            "code": code,
            "message": message,
            "doc_url": DOC_BASE + code,
            "request_id": request_id,
        }
    }


def unauthorized_error(message: str) -> ApiError:
    """The 401 for a request without a usable token."""
    return ApiError(401, ErrorType.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, message)


def not_found_error(code: ErrorCode, message: str) -> ApiError:
    """A 404 ``code`` (one of the ``*_not_found`` codes, or ``not_found`` for no route)."""
    return ApiError(404, ErrorType.NOT_FOUND, code, message)


class LogStreamError(Exception):
    """A refusal of the live log stream: Harmont answers those with a flat body,
    ``{"code", "message"}``, not the envelope (``log_stream_unauthorized`` 401,
    ``log_stream_forbidden`` 403)."""

    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@contextmanager
def store_refusals() -> Iterator[None]:
    """A write the store refuses for what was asked (a taken slug, an empty name: an
    ``ExecutorError`` that is neither a ``StoreError`` nor a bug) as a 422 with the store's
    code and message; a store that cannot be written, and a bug, are left to the middleware
    (503, 500)."""
    try:
        yield
    except (StoreError, InternalError):
        raise
    except ExecutorError as exc:
        if exc.code.endswith("_not_found"):  # what the path names, gone since it was looked up
            raise not_found_error(exc.code, str(exc)) from None
        raise ApiError(422, ErrorType.INVALID_REQUEST, exc.code, str(exc)) from None


# --- answering ----------------------------------------------------------------------------


def request_id_of(request: Request) -> str:
    """The id ``RequestIdMiddleware`` gave the request."""
    return str(getattr(request.state, "request_id", "req_unknown"))


def error_response(
    error: ApiError, request_id: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The envelope; 401 says how to authenticate, and ``headers`` (e.g. a 405's ``Allow``)
    are kept."""
    extra = dict(headers or {})
    if error.status == 401:
        extra["www-authenticate"] = "Bearer"
    body = envelope(error.type, error.code, error.message, request_id)
    return JSONResponse(body, status_code=error.status, headers=extra or None)


async def answer_api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc, request_id_of(request))


async def answer_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Starlette's own errors (no such route, a method the route does not take) as the
    envelope."""
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers.pop("allow", None)
        # Starlette's Allow names the methods of the first route on the path only; a path's
        # reads and writes are separate routes.
        allow = ", ".join(_methods_on(request) or [headers.get("Allow", "")])
        headers["Allow"] = allow
        error = ApiError(
            405,
            ErrorType.INVALID_REQUEST,
            ErrorCode.METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed on {request.url.path}; it takes {allow} (see "
            f"{API_PREFIX}/openapi.json)",
        )
    elif exc.status_code == 404:
        error = not_found_error(
            ErrorCode.NOT_FOUND,
            f"no route {request.url.path}; the API lives under {API_PREFIX}/ (see "
            f"{API_PREFIX}/openapi.json)",
        )
    else:
        error = ApiError(
            exc.status_code, ErrorType.INVALID_REQUEST, ErrorCode.INVALID_REQUEST, str(exc.detail)
        )
    return error_response(error, request_id_of(request), headers)


_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _methods_on(request: Request) -> list[str]:
    """Every method some route of the app takes on the request's path, in a fixed order
    (``create_app`` lists its routes on ``app.state.routes``)."""
    methods: set[str] = set()
    for route in getattr(request.app.state, "routes", ()):
        taken = getattr(route, "methods", None)
        if taken and route.matches(request.scope)[0] is not Match.NONE:
            methods |= taken
    return sorted(methods, key=lambda m: (*_METHOD_ORDER, m).index(m))


async def answer_invalid_request(request: Request, exc: RequestValidationError) -> Response:
    """A path or query value of the wrong type: every problem, named, in one message."""
    problems = []
    for item in exc.errors():
        where = ".".join(str(p) for p in item.get("loc", ()))
        problems.append(f"{where}={item.get('input')!r}: {item.get('msg')}")
    message = "; ".join(problems) + "; fix the value in the URL and retry"
    error = ApiError(422, ErrorType.INVALID_REQUEST, ErrorCode.INVALID_REQUEST, message)
    return error_response(error, request_id_of(request))


async def answer_log_stream_error(request: Request, exc: LogStreamError) -> Response:
    return JSONResponse({"code": exc.code, "message": exc.message}, status_code=exc.status)


EXCEPTION_HANDLERS: dict[
    int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]
] = {
    ApiError: answer_api_error,
    StarletteHTTPException: answer_http_error,
    RequestValidationError: answer_invalid_request,
    LogStreamError: answer_log_stream_error,
}
"""What ``create_app`` hands FastAPI: each exception a request can end with, answered."""


# --- documenting ----------------------------------------------------------------------------

STATUS_TEXT = {
    400: "An invalid cursor",
    401: "No token, or not a usable one",
    402: "Never answered by harmont-exec (Harmont: the organization's balance is exhausted)",
    403: "Not allowed to this token",
    404: "Not found, or not visible to this token",
    409: "The build's state does not allow it",
    413: "The body, or the source tarball in it, is over the server's limit",
    422: "A path or query value of the wrong type",
    503: "The record's database is unreachable or refusing now; retry later",
}


def error_responses(*statuses: int, **described: str) -> dict[int | str, Any]:
    """OpenAPI ``responses`` entries: each status as the envelope, with its meaning
    (``STATUS_TEXT``, or ``described["s422"]`` for 422, ...)."""
    return {
        status: {
            "model": models.Error,
            "description": described.get(f"s{status}", STATUS_TEXT[status]),
        }
        for status in statuses
    }


def documented(model: type[Any], *errors: int, **extra: Any) -> dict[str, Any]:
    """Route options of a JSON route: the 200 body's model and its error statuses (those of
    every JSON route, then ``errors``)."""
    responses: dict[int | str, Any] = {200: {"model": model}}
    responses.update(error_responses(401, 404, 422, 503, *errors))
    return {"responses": responses, **extra}


def documented_write(
    model: type[Any] | None,
    status: int,
    *errors: int,
    s422: str,
    s403: str = STATUS_TEXT[403],
    **extra: Any,
) -> dict[str, Any]:
    """Route options of a write: its ``status`` with ``model`` as the body (None: no body),
    and its error statuses (401, 422 as ``s422`` says, 503, then ``errors``; 403 as ``s403``
    says)."""
    answer: dict[str, Any] = {"description": "Done"} if model is None else {"model": model}
    responses: dict[int | str, Any] = {status: answer}
    responses.update(error_responses(401, 422, 503, *errors, s422=s422, s403=s403))
    return {"responses": responses, "status_code": status, **extra}
