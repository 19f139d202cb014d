"""The web view's routes (SPEC §9): the pages at Harmont's front-end paths, their live parts,
sign-in and the actions. Every page reads the record through the API's own lookups (the same
tenancy: an organization the session's token may not see is the same "not found" as one that
does not exist), shows the API's own wire objects where it hands data to its scripts, and acts
through the build service the API uses. Routes are thin: ``view`` computes what is shown,
``layout`` draws the DAG, ``session`` says who is signed in, the templates render.
"""

# No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.
import json
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from executor.api import wire
from executor.api.deps import LiveLogDep, StoreDep
from executor.api.errors import ApiError, not_found_error
from executor.api.live import LiveLog, chunk_json
from executor.api.logtext import STREAM_KINDS, LogText, ends_of_streams
from executor.api.lookup import (
    build_of,
    job_in,
    organization_of,
    organizations_of,
    pipeline_of,
    read,
)
from executor.api.routes import artifacts as artifact_routes
from executor.api.routes import logs as log_routes
from executor.api.service import BuildService
from executor.errors import BuildStateError, ErrorCode, ExecutorError
from executor.load import plan_build_text
from executor.store import BuildRow, JobRow, Store
from executor.web.layout import Layout, layout_plan, svg_path
from executor.web.pages import render
from executor.web.session import (
    COOKIE,
    Session,
    SignInLinks,
    csrf_ok,
    csrf_token,
    end_session,
    mint_session,
    read_session,
)
from executor.web.view import (
    JOBS_PAGE,
    STATE_ICONS,
    counts_by_state,
    duration_text,
    job_note,
    page_of,
    seconds_text,
    timeline_of,
)

__all__ = ["SignInRequired", "router"]

router = APIRouter(include_in_schema=False)

FORM_LIMIT = 8 << 10
"""The largest form a page posts (bytes)."""
LOG_WINDOW_BYTES = 128 << 10
"""Output sent per log window: a log opens at its last 128 KiB (some thousands of lines, drawn
at once); earlier parts on demand."""
_WINDOW_PAGE = 8  # chunks read per step back (then trimmed to the window's size)
_BUILD = "/{org}/pipelines/{pipeline}/builds/{number}"
_MAX_SEQ = (1 << 63) - 1  # the largest number the stores compare
LAYOUT_CACHE = 64
"""Builds whose graph layout is kept (a build's plan never changes; its page is opened again
and again while it runs)."""
_LAYOUTS: OrderedDict[str, Layout] = OrderedDict()
_LAYOUTS_LOCK = threading.Lock()


class SignInRequired(Exception):
    """A page asked for without a session: answered with the sign-in page (``web.app``)."""

    def __init__(self, after: str) -> None:
        self.after = after


class PageError(Exception):
    """A page that cannot be shown (not found, refused): an HTML page with the API's status,
    code and message."""

    def __init__(self, status: int, code: ErrorCode | str, message: str) -> None:
        self.status, self.code, self.message = status, code, message


def _now() -> datetime:
    return datetime.now(UTC)


async def _session(request: Request, store: StoreDep) -> Session:
    session = await read(read_session, store, request.cookies.get(COOKIE), _now())
    if session is None:
        after = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(after)
    return session


SessionDep = Annotated[Session, Depends(_session)]


def _service(request: Request) -> BuildService | None:
    service: BuildService | None = request.app.state.service
    return service


def _links(request: Request) -> SignInLinks:
    links: SignInLinks = request.app.state.sign_in_links
    return links


async def _lookup(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a worker thread; the API's 404s become the page's."""
    try:
        return await read(fn, *args)
    except ApiError as exc:
        raise PageError(exc.status, exc.code, exc.message) from None


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form (the pages' forms are: a token, a CSRF token, a flag); the
    first value of each field. A body over FORM_LIMIT is refused."""
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > FORM_LIMIT:
            raise PageError(
                413,
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"a form of more than {FORM_LIMIT} bytes; the pages' own forms are far smaller: "
                "act from the page",
            )
    try:
        fields = parse_qs(
            body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=20
        )
    except ValueError:
        raise PageError(
            400,
            ErrorCode.INVALID_REQUEST,
            "a form of more than 20 fields; the pages' own forms have three: act from the page",
        ) from None
    return {name: values[0] for name, values in fields.items()}


async def _check_action(request: Request, store: Store, session: Session) -> dict[str, str]:
    """An action is the session's own: its CSRF token, and no other site's Origin. Returns
    the action's form."""
    form = await _form(request)
    sent = form.get("csrf")
    origin = _foreign(request)
    if origin is not None:
        raise PageError(
            403, ErrorCode.CSRF_FAILED, f"this action came from another site ({origin[:100]})"
        )
    if not await read(csrf_ok, store, session, sent):
        raise PageError(
            403,
            ErrorCode.CSRF_FAILED,
            "this form is out of date (its CSRF token is not this session's); reload the "
            "page and try again",
        )
    return form


def _foreign(request: Request) -> str | None:
    """The request's ``Origin`` if it is another site's (its host is not the one the request
    was sent to), else None. Hosts, not schemes, are compared: behind a TLS proxy the page's
    origin is https while `serve` itself is spoken to in http."""
    origin = request.headers.get("origin")
    if origin is None:
        return None
    host = request.headers.get("host", request.url.netloc)
    return None if urlsplit(origin).netloc == host else origin


def _local(after: str | None) -> str:
    """Where to go after signing in: a path on this server, never another host. A browser
    drops tabs and newlines from a URL and reads ``\\`` as ``/``, so ``/<tab>/evil.example``
    would be ``//evil.example``: a path with any of those, or any control character, goes
    to ``/`` instead."""
    if (
        not after
        or not after.startswith("/")
        or after.startswith("//")
        or any(c == "\\" or ord(c) < 0x21 or ord(c) == 0x7F for c in after)
    ):
        return "/"
    return after


# --- sign-in ----------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
async def login_page(
    request: Request,
    store: StoreDep,
    once: Annotated[str | None, Query()] = None,
    after: Annotated[str | None, Query(alias="next")] = None,
) -> Response:
    if once is not None:
        token = await read(_links(request).redeem, store, once, _now())
        if token is None:
            return render(
                request,
                "login.html.j2",
                {
                    "after": _local(after),
                    "error": "this sign-in link was used already or has expired; sign in "
                    "with a token from `harmont-exec token create`, or restart `serve` for "
                    "a new link",
                },
                status=401,
            )
        session = await read(partial(mint_session, store, token, _now(), link=True))
        return _signed_in(request, session, "/")
    return render(request, "login.html.j2", {"after": _local(after), "error": None})


@router.get("/login/session")
async def login_session(request: Request, store: StoreDep) -> JSONResponse:
    """Whether this browser is signed in: the sign-in page asks (same-origin, so the
    SameSite=Strict cookie goes along), and goes on to its ``next`` page if so. A link to a
    page followed from another site arrives without the cookie; this is how it still opens."""
    session = await read(read_session, store, request.cookies.get(COOKIE), _now())
    return JSONResponse({"signed_in": session is not None}, headers={"cache-control": "no-store"})


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, store: StoreDep) -> Response:
    form = await _form(request)
    token, after = form.get("token", ""), form.get("next", "/")
    origin = _foreign(request)
    if origin is not None:
        raise PageError(403, ErrorCode.CSRF_FAILED, f"a sign-in from another site ({origin[:100]})")
    secret = token.strip()
    row = await read(store.token_for_secret, secret) if secret.startswith("hm_") else None
    if row is None or not row.usable_at(_now()):
        why = (
            "that is not an API token (they start with hm_)"
            if not secret.startswith("hm_")
            else "that token is not known here"
            if row is None
            else f"token {row.id} is revoked or expired"
        )
        return render(
            request,
            "login.html.j2",
            {
                "after": _local(after),
                "error": f"{why}; create one with `harmont-exec token create`",
            },
            status=401,
        )
    session = await read(mint_session, store, row, _now())
    return _signed_in(request, session, _local(after))


def _signed_in(request: Request, session: Session, to: str) -> Response:
    response = RedirectResponse(to, status_code=303)
    response.set_cookie(
        COOKIE,
        session.cookie,
        max_age=max(int((session.expires_at - _now()).total_seconds()), 1),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/login/out")
async def logout(request: Request, store: StoreDep, session: SessionDep) -> Response:
    await _check_action(request, store, session)
    await read(end_session, store, session, _now())
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


# --- organizations and pipelines --------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def home(request: Request, store: StoreDep, session: SessionDep) -> Response:
    orgs = await read(organizations_of, store, session.token)
    if not orgs:
        return render(request, "empty.html.j2", await read(_base, store, session))
    return RedirectResponse(f"/{quote(orgs[0].slug)}/pipelines", status_code=303)


@router.get("/{org}/pipelines", response_class=HTMLResponse)
async def pipelines(request: Request, org: str, store: StoreDep, session: SessionDep) -> Response:
    def lookup() -> dict[str, Any]:
        organization = organization_of(store, session.token, org)
        rows = store.list_pipelines(org, limit=100)
        latest = {p.slug: store.builds_page(org, p.slug, before=None, limit=1) for p in rows}
        return {
            "org": organization,
            "orgs": organizations_of(store, session.token),
            "pipelines": [(p, next(iter(latest[p.slug]), None)) for p in rows],
        }

    data = await _lookup(lookup)
    return render(request, "pipelines.html.j2", {**(await read(_base, store, session)), **data})


@router.get("/{org}/pipelines/{pipeline}", response_class=HTMLResponse)
async def builds(
    request: Request,
    org: str,
    pipeline: str,
    store: StoreDep,
    session: SessionDep,
    before: Annotated[int | None, Query(ge=1, le=_MAX_SEQ)] = None,
    part: Annotated[str | None, Query()] = None,
) -> Response:
    def lookup() -> dict[str, Any]:
        row = pipeline_of(store, session.token, org, pipeline)
        rows = store.builds_page(org, pipeline, before=before, limit=51)
        return {
            "pipeline": row,
            "builds": rows[:50],
            "more": rows[50].number + 1 if len(rows) > 50 else None,
        }

    data = await _lookup(lookup)
    context = {**(await read(_base, store, session)), **data, "org": org, "before": before}
    if part == "rows":  # the live list's refresh (in a table: a bare <tbody> would not parse)
        return render(request, "builds_part.html.j2", context)
    return render(request, "builds.html.j2", context)


# --- the build page ---------------------------------------------------------------------------


@router.get(_BUILD, response_class=HTMLResponse)
async def build_page(
    request: Request,
    org: str,
    pipeline: str,
    number: int,
    store: StoreDep,
    session: SessionDep,
    live_log: LiveLogDep,
    job: Annotated[str | None, Query(max_length=200)] = None,
    page: Annotated[int, Query(ge=1, le=1 << 20)] = 1,
    part: Annotated[str | None, Query()] = None,
) -> Response:
    live = part == "live"  # the page's refresh: the header, jobs table and timeline only
    data = await _lookup(
        _build_data, store, session, live_log, org, pipeline, number, job, page, not live
    )
    context = {**(await read(_base, store, session)), **data}
    return render(request, "build_live.html.j2" if live else "build.html.j2", context)


def _build_data(
    store: Store,
    session: Session,
    live_log: LiveLog,
    org: str,
    pipeline: str,
    number: int,
    selected: str | None,
    page: int,
    whole: bool = True,
) -> dict[str, Any]:
    """What the build page shows; without ``whole``, only what its live parts (header, jobs
    table, timeline) need: no graph, no data for the script (the page's refresh, while the
    build runs, costs no layout)."""
    # The point of the record's history first, then the rows: the page's events stream
    # starts there and misses nothing that happens after the rows were read.
    point = store.last_change()
    build = build_of(store, session.token, org, pipeline, number)
    jobs = store.list_jobs(build.id)
    by_key = {j.step_key: j for j in jobs}
    chosen = None
    if selected:
        chosen = by_key.get(selected) or next((j for j in jobs if j.id == selected.lower()), None)
        if chosen is None:
            raise not_found_error(
                ErrorCode.JOB_NOT_FOUND,
                f"build #{number} has no job {selected[:80]!r} (give a step key or a job id)",
            )
    attempts = store.attempts_of_build(build.id)
    shown, first, pages = page_of(len(jobs), page)
    rows = jobs[first : first + JOBS_PAGE]
    reused = {j.id: _reused_build(store, j) for j in rows if j.reused_from_job_id}
    now = _now()
    base = f"/{quote(org)}/pipelines/{quote(pipeline)}/builds/{number}"
    shown_now = {
        "org": org,
        "pipeline": pipeline,
        "build": build,
        "jobs": jobs,
        "rows": [(j, job_note(j, reused.get(j.id)), len(attempts.get(j.id, ()))) for j in rows],
        "page": shown,
        "pages": pages,
        "counts": counts_by_state(j.state for j in jobs),
        "timeline": timeline_of(build, jobs, attempts, now),
        "selected": chosen,
        "now": now,
    }
    if not whole:
        return {**shown_now, "data": {"base": base}}
    layout = _layout(store, build)
    artifacts = store.list_artifacts(job_id=chosen.id, after=None, limit=100) if chosen else []
    return {
        **shown_now,
        "layout": layout,
        "by_key": by_key,
        "svg_path": lambda link: svg_path(link, layout.direction),
        "artifacts": artifacts,
        "data": {
            "build": wire.build_json(build),
            "build_id": build.id,
            "point": point,
            "log_token": live_log.issue(store, build.id, session.token)["token"],
            "jobs": [
                [j.id, j.step_key, layout.node_of.get(j.step_key, ""), j.state.value] for j in jobs
            ],
            "collapsed": layout.collapsed,
            "selected": chosen.id if chosen else None,
            "selected_state": chosen.state.value if chosen else None,
            "base": base,
        },
    }


def _reused_build(store: Store, job: JobRow) -> int | None:
    original = store.get_job(job.reused_from_job_id) if job.reused_from_job_id else None
    build = None if original is None else store.get_build_by_id(original.build_id)
    return None if build is None else build.number


def _layout(store: Store, build: BuildRow) -> Layout:
    """The build's graph, laid out once (a build's plan never changes) and kept."""
    with _LAYOUTS_LOCK:
        if build.id in _LAYOUTS:
            _LAYOUTS.move_to_end(build.id)
            return _LAYOUTS[build.id]
    recorded = store.build_plan(build.id)
    plan = None
    if recorded is not None:
        try:
            plan = plan_build_text(
                recorded[0], name=build.build_file or "build.json", json_format=True
            )
        except ExecutorError:  # a build refused at submission records the IR it could not load
            plan = None
    if plan is None:
        plan = plan_build_text('{"steps": []}', name="build.json", json_format=True)
    layout = layout_plan(plan)
    with _LAYOUTS_LOCK:
        _LAYOUTS[build.id] = layout
        while len(_LAYOUTS) > LAYOUT_CACHE:
            _LAYOUTS.popitem(last=False)
    return layout


# --- a job's log, artifacts -------------------------------------------------------------------


@router.get(f"{_BUILD}/jobs/{{job_id}}/window")
async def log_window(
    org: str,
    pipeline: str,
    number: int,
    job_id: str,
    store: StoreDep,
    session: SessionDep,
    before: Annotated[int | None, Query(ge=1, le=_MAX_SEQ)] = None,
) -> JSONResponse:
    """The last LOG_WINDOW_BYTES of the job's output before seq ``before`` (the end if not
    given), decoded as the live stream decodes it: ``{"chunks", "first", "last", "more"}``.
    The page shows it, then streams from ``last`` and reads earlier windows on demand."""

    def window() -> dict[str, Any]:
        job = job_in(store, build_of(store, session.token, org, pipeline, number), job_id)
        end = before if before is not None else 1 << 62
        chunks: list[Any] = []
        size = 0
        while size < LOG_WINDOW_BYTES:
            page = store.log_page_before(job.id, before_seq=end, limit=_WINDOW_PAGE)
            if not page:
                break
            chunks[:0] = page
            size += sum(len(c.content) for c in page)
            end = page[0].seq
        # No more than the window's size (a chunk can be tens of KiB), but at least a chunk.
        while len(chunks) > 1 and size > LOG_WINDOW_BYTES:
            size -= len(chunks.pop(0).content)
        if not chunks:
            return {"chunks": [], "first": None, "last": None, "more": False}
        text = LogText()
        for stream in STREAM_KINDS:  # continue each stream's bytes before the window
            tail = store.log_tail(job.id, stream, through_seq=chunks[0].seq - 1)
            if tail:
                attempt = tail[0].attempt
                text.prime(
                    stream,
                    attempt,
                    b"".join(c.content for c in reversed(tail) if c.attempt == attempt),
                )
        ends = ends_of_streams(chunks)
        wire_chunks = [chunk_json(c, text.decode(c, final=c.seq in ends)) for c in chunks]
        more = bool(store.log_page_before(job.id, before_seq=chunks[0].seq, limit=1))
        return {"chunks": wire_chunks, "first": chunks[0].seq, "last": chunks[-1].seq, "more": more}

    return JSONResponse(await _lookup(window), headers={"cache-control": "no-store"})


@router.get(f"{_BUILD}/jobs/{{job_id}}/log")
async def raw_log(
    org: str, pipeline: str, number: int, job_id: str, store: StoreDep, session: SessionDep
) -> Response:
    response = await log_routes.job_log(org, pipeline, number, job_id, store, session.token)
    response.headers["content-disposition"] = f'attachment; filename="{number}-{job_id[:8]}.log"'
    response.headers["x-content-type-options"] = "nosniff"
    return response


@router.get(f"{_BUILD}/artifacts/{{artifact_id}}")
async def artifact(
    org: str, pipeline: str, number: int, artifact_id: str, store: StoreDep, session: SessionDep
) -> Response:
    return await artifact_routes.download(org, pipeline, number, artifact_id, store, session.token)


# --- actions ----------------------------------------------------------------------------------


@router.post(f"{_BUILD}/cancel")
async def cancel(
    request: Request,
    org: str,
    pipeline: str,
    number: int,
    store: StoreDep,
    session: SessionDep,
) -> Response:
    await _check_action(request, store, session)
    service = _need_service(request)
    build = await _lookup(build_of, store, session.token, org, pipeline, number)
    await read(service.cancel, build)
    return RedirectResponse(_page_of(build), status_code=303)


@router.post(f"{_BUILD}/retry")
async def retry(
    request: Request,
    org: str,
    pipeline: str,
    number: int,
    store: StoreDep,
    session: SessionDep,
) -> Response:
    form = await _check_action(request, store, session)
    failed_only = form.get("failed_only", "true") != "false"
    service = _need_service(request)
    build = await _lookup(build_of, store, session.token, org, pipeline, number)

    def again() -> BuildRow:
        try:
            return service.retry(build, failed_only=failed_only)
        except BuildStateError as exc:
            raise PageError(409, exc.code, str(exc)) from None

    new = await read(again)
    return RedirectResponse(_page_of(new), status_code=303)


def _need_service(request: Request) -> BuildService:
    service = _service(request)
    if service is None:
        raise PageError(
            503,
            ErrorCode.SERVICE_UNAVAILABLE,
            "this server runs no builds; cancel and retry from a `harmont-exec serve`",
        )
    return service


def _page_of(build: BuildRow) -> str:
    return f"/{quote(build.org)}/pipelines/{quote(build.pipeline)}/builds/{build.number}"


def _base(store: Store, session: Session) -> dict[str, Any]:
    """What every page's frame needs."""
    return {
        "csrf": csrf_token(store, session),
        "icons": STATE_ICONS,
        "duration": duration_text,
        "seconds": seconds_text,
        "token_description": session.token.description or session.token.id[:8],
        "json": json,
    }
