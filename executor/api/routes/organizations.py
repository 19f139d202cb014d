"""Organizations the token may see, one of them, and the token's user (SPEC §6.1)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from executor.api import models, wire
from executor.api.deps import Caller, Cursor, Limit, StoreDep
from executor.api.errors import documented
from executor.api.lookup import organization_of, organizations_of, read
from executor.api.middleware import HeadRouter
from executor.api.pagination import clamp, decode_cursor, page_json
from executor.api.paths import API_PREFIX, ORGANIZATION, ORGANIZATIONS
from executor.store import Store, TokenRow

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
