"""What routes declare they need, as FastAPI dependencies: the store, the caller's token, the
live log stream's settings, the build service and the upload limit, and the page parameters.

``create_app`` puts the store, the live log settings, the build service (if any) and the upload
limit on ``app.state``; these read them from there, so a route module holds no state of its
own. ``Service`` is the build service, or a 503 ``service_unavailable`` for an app that has
none. ``Caller`` is the Bearer token (a 401
envelope for anything else); the tenancy checks that follow are ``lookup``'s.
"""

# No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from executor.api.errors import ApiError, ErrorType, unauthorized_error
from executor.api.live import LiveLog
from executor.api.lookup import read
from executor.api.service import BuildService
from executor.errors import ErrorCode
from executor.store import Store, TokenRow

__all__ = [
    "Caller",
    "Cursor",
    "Limit",
    "LiveLogDep",
    "Service",
    "StoreDep",
    "UploadLimit",
    "caller",
]


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _live_log(request: Request) -> LiveLog:
    live_log: LiveLog = request.app.state.live_log
    return live_log


def _service(request: Request) -> BuildService:
    service: BuildService | None = request.app.state.service
    if service is None:
        raise ApiError(
            503,
            ErrorType.SERVER_ERROR,
            ErrorCode.SERVICE_UNAVAILABLE,
            "this server runs no builds (its app was made without a build service); send "
            "builds, cancels and retries to a `harmont-exec serve`",
        )
    return service


def _upload_limit(request: Request) -> int:
    limit: int = request.app.state.max_upload_bytes
    return limit


StoreDep = Annotated[Store, Depends(_store)]
"""The store the app serves."""
LiveLogDep = Annotated[LiveLog, Depends(_live_log)]
"""The live log stream's settings and its log-token key."""
Service = Annotated[BuildService, Depends(_service)]
"""The build service (503 ``service_unavailable`` when the app has none): declare it after
``Caller``, so that a request without a token is a 401 first."""
UploadLimit = Annotated[int, Depends(_upload_limit)]
"""The largest source tarball a build may be sent with, in bytes (``serve --max-upload-mb``)."""

_bearer = HTTPBearer(auto_error=False, description="A token from `harmont-exec token create`.")


async def caller(
    request: Request,
    store: StoreDep,
    _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TokenRow:
    """The request's Bearer token, usable now (401 envelope for anything else)."""
    # Parsed here, not by HTTPBearer (which only documents it): the scheme must be exactly
    # "Bearer", and every failure must be the envelope.
    header = request.headers.get("authorization")
    if header is None:
        raise unauthorized_error(
            "no Authorization header; send 'Authorization: Bearer hm_...' with a token "
            "from `harmont-exec token create`"
        )
    scheme, _, secret = header.partition(" ")
    if scheme != "Bearer" or not secret.startswith("hm_"):
        raise unauthorized_error(
            "the Authorization header is not 'Bearer hm_...' (the scheme is "
            "case-sensitive); send a token from `harmont-exec token create`"
        )
    token = await read(store.token_for_secret, secret)
    if token is None:
        raise unauthorized_error(
            "this token is not known here; create one with `harmont-exec token create`"
        )
    if not token.usable_at(datetime.now(UTC)):
        why = "revoked" if token.revoked_at is not None else "expired"
        raise unauthorized_error(
            f"token {token.id} is {why}; create a new one with `harmont-exec token create`"
        )
    return token


Caller = Annotated[TokenRow, Depends(caller)]
"""The caller's token (``caller``)."""

# Query parameters, not dependencies: a dependency's validation errors would be reported
# before the path's, and a 422's message lists them in the order FastAPI found them.
Limit = Annotated[int, Query(description="Page size (1-100, default 50; clamped).")]
"""``?limit=``: the page size, clamped by ``pagination.clamp``."""
Cursor = Annotated[
    str | None, Query(description="Opaque cursor from a previous page's next_cursor.")
]
"""``?cursor=``: a previous page's ``next_cursor``."""
