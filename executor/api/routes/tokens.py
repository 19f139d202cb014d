"""The user's API tokens (SPEC §6.3: ``listApiTokens``, ``createApiToken``, ``revokeApiToken``),
in Harmont's shapes: the secret is in the creation's answer and nowhere else.

A token manages only tokens that see no more than it does: one that sees every organization
manages every token; one limited to some organizations, the tokens limited to some of those.
The others are not listed, and revoking one is the same 404 as revoking one that does not
exist. A token made here is limited as its maker is, and expires no later than it does, so no
token can make one that outlives it or sees more. Revoked tokens are gone from the list, as in
Harmont.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from executor.api import models, wire
from executor.api.body import (
    SMALL_BODY_LIMIT,
    ApiTokenCreateRequest,
    parse,
    read_body,
    request_body,
)
from executor.api.deps import Caller, StoreDep
from executor.api.errors import ApiError, ErrorType, documented, documented_write, not_found_error
from executor.api.lookup import read
from executor.api.middleware import HeadRouter
from executor.api.paths import API_TOKEN, API_TOKENS
from executor.errors import ErrorCode
from executor.store import Store, TokenRow

__all__ = ["router"]

router = HeadRouter()


def _manages(caller: TokenRow, token: TokenRow) -> bool:
    """``token`` sees no organization ``caller`` does not."""
    if caller.organizations is None:
        return True
    return token.organizations is not None and set(token.organizations) <= set(caller.organizations)


@router.get(
    API_TOKENS,
    tags=["user"],
    operation_id="listApiTokens",
    summary="The API tokens this token manages (not revoked), oldest first",
    **documented(models.ApiTokenListResponse),
)
async def api_tokens(store: StoreDep, token: Caller) -> JSONResponse:
    rows = await read(store.list_tokens)
    listed = [wire.token_json(t) for t in rows if t.revoked_at is None and _manages(token, t)]
    return JSONResponse({"api_tokens": listed})


@router.post(
    API_TOKENS,
    tags=["user"],
    operation_id="createApiToken",
    summary="Create an API token; its secret is shown only in this answer",
    **documented_write(
        models.ApiTokenCreateResponse,
        201,
        413,
        s422="The body is not an ApiTokenCreateRequest, or its expiry has passed",
        openapi_extra=request_body(ApiTokenCreateRequest),
    ),
)
async def create_api_token(request: Request, store: StoreDep, token: Caller) -> JSONResponse:
    body = parse(ApiTokenCreateRequest, await read_body(request, SMALL_BODY_LIMIT))
    now = datetime.now(UTC)
    expires_at = body.expires_at
    if expires_at is not None and expires_at <= now:
        raise ApiError(
            422,
            ErrorType.INVALID_REQUEST,
            ErrorCode.INVALID_REQUEST,
            f"expires_at {expires_at.isoformat()} has passed; send a time in the future, or "
            "null for a token that does not expire",
        )
    if token.expires_at is not None:
        expires_at = token.expires_at if expires_at is None else min(expires_at, token.expires_at)
    row, secret = await read(_create, store, body.description, token, expires_at, now)
    return JSONResponse(
        {"token": secret, "api_token": wire.token_json(row)},
        status_code=201,
        headers={"cache-control": "no-store"},
    )


def _create(
    store: Store, description: str, maker: TokenRow, expires_at: datetime | None, now: datetime
) -> tuple[TokenRow, str]:
    return store.create_token(
        description=description,
        organizations=maker.organizations,
        expires_at=expires_at,
        now=now,
    )


@router.delete(
    API_TOKEN,
    tags=["user"],
    operation_id="revokeApiToken",
    summary="Revoke an API token (at once: its next request is a 401)",
    response_class=Response,
    **documented_write(None, 204, 404, s422="Not answered here (the id is any string)"),
)
async def revoke_api_token(id: str, store: StoreDep, token: Caller) -> Response:
    await read(_revoke, store, token, id)
    return Response(status_code=204)


def _revoke(store: Store, caller: TokenRow, token_id: str) -> None:
    row = store.get_token(token_id)
    if row is None or row.revoked_at is not None or not _manages(caller, row):
        raise not_found_error(
            ErrorCode.API_TOKEN_NOT_FOUND,
            f"no API token {token_id!r} that this token manages (it may be revoked already); "
            f"list them with GET {API_TOKENS}",
        )
    store.revoke_token(token_id, now=datetime.now(UTC))
