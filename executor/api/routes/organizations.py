"""Organizations the token may see, one of them, a new one, and the token's user (SPEC §6.1,
§6.3).

Only a token that sees every organization may create one (403 ``token_scope_forbidden``): a
token limited to some organizations would not see what it made. The store derives the slug
from the name; a taken or empty one is its refusal, answered 422 with the store's code.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import Request
from fastapi.responses import JSONResponse

from executor.api import models, wire
from executor.api.body import (
    SMALL_BODY_LIMIT,
    CreateOrganizationRequest,
    parse,
    read_body,
    request_body,
)
from executor.api.deps import Caller, Cursor, Limit, StoreDep
from executor.api.errors import (
    ApiError,
    ErrorType,
    documented,
    documented_write,
    store_refusals,
)
from executor.api.lookup import organization_of, organizations_of, read
from executor.api.middleware import HeadRouter
from executor.api.pagination import clamp, decode_cursor, page_json
from executor.api.paths import API_PREFIX, ORGANIZATION, ORGANIZATIONS
from executor.errors import ErrorCode
from executor.store import OrganizationRow, Store, TokenRow

__all__ = ["router"]

router = HeadRouter()


@router.get(
    ORGANIZATIONS,
    tags=["organizations"],
    operation_id="listOrganizations",
    summary="The organizations the token may see",
    **documented(models.OrganizationList, 400),
)
async def organizations(
    store: StoreDep, token: Caller, limit: Limit = 50, cursor: Cursor = None
) -> JSONResponse:
    after = "" if cursor is None else decode_cursor(cursor, "organizations", str)
    # Every organization is one small row: the page is cut here, not by the store.
    orgs = [o for o in await read(organizations_of, store, token) if o.slug > after]
    page = page_json(orgs, clamp(limit), "organizations", wire.organization_json, lambda o: o.slug)
    return JSONResponse(page)


@router.post(
    ORGANIZATIONS,
    tags=["organizations"],
    operation_id="createOrganization",
    summary="Create an organization; its slug is derived from the name",
    **documented_write(
        models.Organization,
        201,
        403,
        413,
        s422="Not a CreateOrganizationRequest, or the name's slug is taken or empty",
        openapi_extra=request_body(CreateOrganizationRequest),
    ),
)
async def create_organization(request: Request, store: StoreDep, token: Caller) -> JSONResponse:
    if token.organizations is not None:
        raise ApiError(
            403,
            ErrorType.FORBIDDEN,
            ErrorCode.TOKEN_SCOPE_FORBIDDEN,
            f"token {token.id} is limited to the organizations "
            f"{', '.join(token.organizations) or '(none)'}, so it cannot create one; use a "
            "token that sees every organization (`harmont-exec token create` without --org)",
        )
    body = parse(CreateOrganizationRequest, await read_body(request, SMALL_BODY_LIMIT))
    row = await read(_create_organization, store, body)
    return JSONResponse(
        wire.organization_json(row),
        status_code=201,
        headers={"location": ORGANIZATION.format(org=row.slug)},
    )


def _create_organization(store: Store, body: CreateOrganizationRequest) -> OrganizationRow:
    with store_refusals():
        return store.create_organization(name=body.name, url=body.url, now=datetime.now(UTC))


@router.get(
    ORGANIZATION,
    tags=["organizations"],
    operation_id="getOrganization",
    summary="An organization",
    **documented(models.Organization),
)
async def organization(org: str, store: StoreDep, token: Caller) -> JSONResponse:
    return JSONResponse(wire.organization_json(await read(organization_of, store, token, org)))


@router.get(
    f"{API_PREFIX}/user",
    tags=["user"],
    operation_id="getCurrentUser",
    summary="The token's user (locally one fixed user)",
    **documented(models.CurrentUserResponse),
)
async def current_user(store: StoreDep, token: Caller) -> JSONResponse:
    return JSONResponse(wire.current_user_json(await read(_personal_org, store, token)))


def _personal_org(store: Store, token: TokenRow) -> str | None:
    # The user's "personal" organization is local, unless the token may not see it: then the
    # first one it sees (so a front-end that starts there finds one).
    if token.sees("local"):
        return "local"
    return next((o.slug for o in organizations_of(store, token)), None)
