"""The web view without a browser (SPEC §9): the real ASGI app (``create_app`` +
``add_web_view``, with the real, unstarted build service) over httpx, on a real SQLite record
made by running real builds; the build events stream, also from a real `serve` while a real
`run` records; the store reads the pages use, on both backends; reserved organization slugs;
the pure functions of ``executor.web.view``.

tests/test_web_browser.py drives the same pages in chromium; this file checks what a browser
does not show: statuses, headers, cookies, CSRF and tenancy refusals, escaping, and the exact
text of the log windows.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.lowlevel
import httpx
import pytest
from fastapi import FastAPI
from markupsafe import escape

from executor import run_build, run_build_sync
from executor.api import create_app
from executor.api.errors import LogStreamError
from executor.api.live import MAX_STREAMS_PER_TOKEN, LiveLog, LogGrant
from executor.api.service import BuildService as ApiBuildService
from executor.errors import ErrorCode, InvalidNameError
from executor.service import BuildService
from executor.states import BuildState, JobState
from executor.store import AttemptRow, BuildRow, JobRow, Store, open_store
from executor.store.names import RESERVED_ORGANIZATIONS
from executor.web import SignInLinks, add_web_view
from executor.web.pages import STATIC
from executor.web.routes import LOG_WINDOW_BYTES
from executor.web.session import COOKIE, LINK_TTL, SESSION_TTL, mint_session
from executor.web.view import (
    Bar,
    counts_by_state,
    duration_text,
    page_of,
    seconds_text,
    timeline_of,
)
from tests.conftest import with_schema
from tests.serving import (
    TIMEOUT_S,
    Server,
    bounded,
    cli,
    mint_token,
    output,
    poll,
    poll_async,
    server,
    start,
    stop,
)

__all__ = ["server"]  # a fixture, used here

API = "/api/v0/organizations"
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
ORIGIN = "http://test"  # the ASGI client's own origin (its base URL)
EVIL = "https://evil.example"
RESERVED = ", ".join(sorted(RESERVED_ORGANIZATIONS))
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_PAGE_DATA = re.compile(r'<script type="application/json" id="page-data">(.*?)</script>', re.S)

APP = """\
steps:
  - {key: compile, command: echo compiled}
  - {key: test, depends_on: compile, command: exit 3}
  - {key: lint, command: echo linted}
"""
SECRET = """\
steps:
  - key: make
    command: echo secret > out.txt; echo made
    artifact_paths: [out.txt]
"""
# 40 pieces of about 16 KB, each ending in the first half of a 4-byte emoji that the next write
# completes after a pause: the reads of the pipe, hence the chunks, end mid-character.
BIG = """\
steps:
  - key: big
    command: |
      python3 -c '
      import os, time
      emoji = "\\U0001F600".encode()
      for i in range(40):
          os.write(1, (b"%04d " % i) + b"x" * 16500 + b"\\n" + emoji[:2])
          time.sleep(0.03)
          os.write(1, emoji[2:])
      os.write(1, b"\\nend\\n")
      '
"""
HOSTILE = {
    "steps": [
        {"key": SCRIPT, "label": IMG, "command": f"echo '{SCRIPT}'"},
        {"key": IMG, "label": SCRIPT, "depends_on": SCRIPT, "command": "true"},
    ]
}


# --- the record the pages show -----------------------------------------------------------------


@dataclass(frozen=True)
class Web:
    store: Store
    app: FastAPI  # with the real build service, not started: what it queues stays queued
    bare_app: FastAPI  # without a service
    links: SignInLinks
    db: Path
    token: str  # sees every organization
    second_token: str  # sees every organization too: another person's session
    acme_token: str  # `harmont-exec token create --org acme`
    builds: dict[str, BuildRow]  # pipeline -> its build #1


def _git_repo(directory: Path) -> None:
    """A checkout on branch SCRIPT whose last commit's message is IMG (`run` records both)."""
    git = ["git", "-C", str(directory), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    git += ["-c", "commit.gpgsign=false"]
    for args in (["init", "-q", "-b", SCRIPT], ["commit", "-q", "--allow-empty", "-m", IMG]):
        done = subprocess.run([*git, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    work = tmp_path_factory.mktemp("web")
    db = work / "db" / "harmont.db"
    files = {
        "app": ("acme", "app.yml", APP),
        "secret": ("other", "secret.yml", SECRET),
        "hostile": ("acme", "hostile.json", json.dumps(HOSTILE)),
        "big": ("acme", "big.yml", BIG),
    }
    expected = {"app": "failed", "secret": "passed", "hostile": "passed", "big": "passed"}
    with open_store(db) as store:
        builds = {}
        for pipeline, (org, name, text) in files.items():
            (work / pipeline).mkdir()
            if pipeline == "hostile":
                _git_repo(work / pipeline)
            (work / pipeline / name).write_text(text)
            result = run_build_sync(work / pipeline / name, store=store, org=org)
            assert result.state.value == expected[pipeline], pipeline
            row = store.get_build(1, org=org, pipeline=pipeline)
            assert row is not None
            builds[pipeline] = row
        now = datetime.now(UTC)
        _, token = store.create_token(
            description="all", organizations=None, expires_at=None, now=now
        )
        _, second = store.create_token(
            description="2nd", organizations=None, expires_at=None, now=now
        )
        made = cli("token", "create", "--db", str(db), "--org", "acme", "--description", "acme")
        assert made.returncode == 0, made.stderr
        service = BuildService(store, workspaces=work / "workspaces", max_upload_bytes=1 << 20)
        app = create_app(store=store, service=cast(ApiBuildService, service))
        links = add_web_view(app)
        bare_app = create_app(store=store)
        add_web_view(bare_app)
        yield Web(store, app, bare_app, links, db, token, second, made.stdout.strip(), builds)
        service.stop()


@asynccontextmanager
async def _client(
    app: FastAPI, token: str | None = None, base: str = ORIGIN
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client of the app, signed in with ``token`` (the /login form) when given;
    bounded by TIMEOUT_S."""
    with anyio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=base
        ) as client:
            if token is not None:
                signed = await client.post("/login", data={"token": token, "next": "/"})
                assert signed.status_code == 303, signed.text
                assert COOKIE in client.cookies
            yield client


async def _csrf_of(client: httpx.AsyncClient) -> str:
    page = await client.get("/acme/pipelines")
    assert page.status_code == 200, page.text
    found = _CSRF.search(page.text)
    assert found is not None
    return found.group(1)


def _cookie_attributes(response: httpx.Response) -> tuple[str, dict[str, str]]:
    """The session cookie's value and its attributes (lowercase names) from Set-Cookie."""
    (header,) = [h for h in response.headers.get_list("set-cookie") if h.startswith(COOKIE)]
    first, *rest = header.split(";")
    attributes = {}
    for part in rest:
        name, _, value = part.strip().partition("=")
        attributes[name.lower()] = value
    return first.partition("=")[2], attributes


def _error_page(status: int, code: str, message: str) -> str:
    """What error.html.j2 shows of a refusal (autoescaped as the template does)."""
    return f"<h1>{status} <code>{code}</code></h1>\n  <p>{escape(message)}</p>"


def _state_of(store: Store, org: str = "acme", pipeline: str = "app") -> list[tuple[Any, ...]]:
    """What an action could change: the pipeline's builds, their states and cancel flags."""
    rows = store.builds_page(org, pipeline, limit=1000)
    return [(b.number, b.state, b.cancel_requested) for b in rows]


def _only_job(web: Web, pipeline: str) -> JobRow:
    (job,) = web.store.list_jobs(web.builds[pipeline].id)
    return job


# --- 1. sign-in ---------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_login_with_a_good_token_sets_a_strict_http_only_session_cookie(
    web: Web, scheme: str
) -> None:
    async with _client(web.app, base=f"{scheme}://test") as client:
        response = await client.post(
            "/login", data={"token": web.token, "next": "/acme/pipelines/app"}
        )
        assert response.status_code == 303, response.text
        assert response.headers["location"] == "/acme/pipelines/app"
        value, attributes = _cookie_attributes(response)
        assert set(attributes) == {"httponly", "max-age", "path", "samesite"} | (
            {"secure"} if scheme == "https" else set()
        )
        assert attributes["path"] == "/"
        assert attributes["samesite"].lower() == "strict"
        assert 0 < int(attributes["max-age"]) <= SESSION_TTL.total_seconds()
        assert web.token not in value and web.token[3:] not in value
        row = web.store.token_for_secret(web.token)
        assert row is not None
        payload = json.loads(base64.urlsafe_b64decode(value.split(".")[0] + "=="))
        assert set(payload) == {"t", "i"} and payload["t"] == row.id  # the token's id, signed
        page = await client.get("/acme/pipelines/app")
        assert page.status_code == 200, page.text


def _revoked(web: Web) -> str:
    row, secret = web.store.create_token(
        description="gone", organizations=None, expires_at=None, now=datetime.now(UTC)
    )
    web.store.revoke_token(row.id, now=datetime.now(UTC))
    return secret


def _expired(web: Web) -> str:
    now = datetime.now(UTC)
    _, secret = web.store.create_token(
        description="old", organizations=None, expires_at=now - timedelta(minutes=1), now=now
    )
    return secret


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["unknown", "not hm_", "empty", "revoked", "expired"])
async def test_login_refuses_a_token_it_cannot_use_with_a_401_saying_what_to_do(
    web: Web, kind: str
) -> None:
    secret = {
        "unknown": lambda: "hm_" + "A" * 43,
        "not hm_": lambda: "letmein",
        "empty": lambda: "",
        "revoked": lambda: _revoked(web),
        "expired": lambda: _expired(web),
    }[kind]()
    row = web.store.token_for_secret(secret) if secret.startswith("hm_") else None
    why = {
        "unknown": "that token is not known here",
        "not hm_": "that is not an API token (they start with hm_)",
        "empty": "that is not an API token (they start with hm_)",
        "revoked": f"token {row.id if row else ''} is revoked or expired",
        "expired": f"token {row.id if row else ''} is revoked or expired",
    }[kind]
    async with _client(web.app) as client:
        response = await client.post("/login", data={"token": secret, "next": "/acme/pipelines"})
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    message = f"{why}; create one with `harmont-exec token create`"
    assert f'<p class="error" role="alert">{escape(message)}</p>' in response.text
    assert '<input type="hidden" name="next" value="/acme/pipelines">' in response.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    "after",
    [
        "//evil.example",
        "https://evil.example",
        "/\\evil.example",
        "evil.example",
        "",
        "/\t/evil.example",  # a browser drops tabs and newlines: //evil.example
        "/\n/evil.example",
        "/\r/evil.example",
        "/ /evil.example",
        "/\x7f/evil.example",
    ],
)
async def test_login_never_redirects_off_site(web: Web, after: str) -> None:
    async with _client(web.app) as client:
        response = await client.post("/login", data={"token": web.token, "next": after})
    assert response.status_code == 303
    assert response.headers["location"] == "/"


@pytest.mark.anyio
async def test_login_from_another_sites_origin_is_refused(web: Web) -> None:
    async with _client(web.app) as client:
        response = await client.post("/login", data={"token": web.token}, headers={"origin": EVIL})
        assert response.status_code == 403
        assert "set-cookie" not in response.headers
        assert _error_page(403, "csrf_failed", f"a sign-in from another site ({EVIL})") in (
            response.text
        )
        for origin in (ORIGIN, "https://test"):  # this host (https: a TLS proxy in front)
            same_site = await client.post(
                "/login", data={"token": web.token}, headers={"origin": origin}
            )
            assert same_site.status_code == 303, origin
        other_port = await client.post(
            "/login", data={"token": web.token}, headers={"origin": "http://test:8080"}
        )
        assert other_port.status_code == 403


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("form", "status", "code"),
    [
        ({"token": "x" * (9 << 10)}, 413, "payload_too_large"),
        ({f"f{i}": "1" for i in range(21)}, 400, "invalid_request"),
    ],
)
async def test_login_refuses_a_form_no_page_sends(
    web: Web, form: dict[str, str], status: int, code: str
) -> None:
    async with _client(web.app) as client:
        response = await client.post("/login", data=form)
    assert response.status_code == status
    assert f"<h1>{status} <code>{code}</code></h1>" in response.text
    assert "set-cookie" not in response.headers


@pytest.mark.anyio
async def test_login_session_says_whether_this_browser_is_signed_in(web: Web) -> None:
    row, secret = web.store.create_token(
        description="asks", organizations=None, expires_at=None, now=datetime.now(UTC)
    )
    async with _client(web.app) as anonymous:
        out = await anonymous.get("/login/session")
    async with _client(web.app, secret) as client:
        signed = await client.get("/login/session")
        web.store.revoke_token(row.id, now=datetime.now(UTC))
        revoked = await client.get("/login/session")
    for response, expected in ((out, False), (signed, True), (revoked, False)):
        assert response.status_code == 200
        assert response.json() == {"signed_in": expected}
        assert response.headers["cache-control"] == "no-store"


# --- 2. sessions --------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "after"),
    [
        ("/", "/"),
        ("/acme/pipelines/app?before=3", "/acme/pipelines/app%3Fbefore%3D3"),
        ("/acme/pipelines/app/builds/1", "/acme/pipelines/app/builds/1"),
    ],
)
async def test_a_page_without_a_session_redirects_to_sign_in(
    web: Web, path: str, after: str
) -> None:
    async with _client(web.app) as client:
        response = await client.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == f"/login?next={after}"


async def _with_cookie(app: FastAPI, cookie: str, path: str = "/acme/pipelines") -> int:
    async with _client(app) as client:
        response = await client.get(path, headers={"cookie": f"{COOKIE}={cookie}"})
    if response.status_code == 303:
        assert response.headers["location"] == f"/login?next={path}"
    return response.status_code


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.mark.anyio
async def test_an_altered_session_cookie_is_signed_out(web: Web) -> None:
    async with _client(web.app, web.token) as client:
        cookie = client.cookies[COOKIE]
    assert await _with_cookie(web.app, cookie) == 200
    payload, mac = cookie.split(".")
    flipped = ("B" if mac[0] == "A" else "A") + mac[1:]
    assert await _with_cookie(web.app, f"{payload}.{flipped}") == 303
    # the payload naming another token (the second one), the MAC left as it was
    other = web.store.token_for_secret(web.second_token)
    assert other is not None
    data = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged = _b64(json.dumps({**data, "t": other.id}, separators=(",", ":")).encode())
    assert await _with_cookie(web.app, f"{forged}.{mac}") == 303
    assert await _with_cookie(web.app, "") == 303
    assert await _with_cookie(web.app, "garbage") == 303


@pytest.mark.anyio
async def test_a_session_cookie_signed_for_another_store_is_signed_out(
    web: Web, tmp_path: Path
) -> None:
    row = web.store.token_for_secret(web.token)
    assert row is not None
    now = datetime.now(UTC)
    own = mint_session(web.store, row, now)
    with open_store(tmp_path / "other" / "harmont.db") as other:
        foreign = mint_session(other, row, now)  # the same token's id, another store's key
    assert foreign.cookie != own.cookie
    assert await _with_cookie(web.app, own.cookie) == 200
    assert await _with_cookie(web.app, foreign.cookie) == 303


@pytest.mark.anyio
async def test_a_session_older_than_its_ttl_is_signed_out(web: Web) -> None:
    row = web.store.token_for_secret(web.token)
    assert row is not None
    old = mint_session(web.store, row, datetime.now(UTC) - SESSION_TTL - timedelta(seconds=5))
    assert await _with_cookie(web.app, old.cookie) == 303


@pytest.mark.anyio
async def test_revoking_the_api_token_signs_its_session_out_at_the_next_request(web: Web) -> None:
    row, secret = web.store.create_token(
        description="soon revoked", organizations=None, expires_at=None, now=datetime.now(UTC)
    )
    async with _client(web.app, secret) as client:
        assert (await client.get("/acme/pipelines")).status_code == 200
        web.store.revoke_token(row.id, now=datetime.now(UTC))
        response = await client.get("/acme/pipelines")
        assert response.status_code == 303
        assert response.headers["location"] == "/login?next=/acme/pipelines"


@pytest.mark.anyio
async def test_a_one_time_link_signs_in_once(web: Web) -> None:
    code = web.links.issue(datetime.now(UTC))
    async with _client(web.app) as client:
        response = await client.get(f"/login?once={code}")
        assert response.status_code == 303, response.text
        assert response.headers["location"] == "/"
        _, attributes = _cookie_attributes(response)
        assert "httponly" in attributes
        home = await client.get("/")
        assert home.status_code == 303
        assert home.headers["location"] == "/acme/pipelines"  # the first organization it sees
        assert (await client.get("/other/pipelines")).status_code == 200
    async with _client(web.app) as client:
        again = await client.get(f"/login?once={code}")
        assert again.status_code == 401
        assert "set-cookie" not in again.headers
        assert "this sign-in link was used already or has expired" in again.text


@pytest.mark.anyio
async def test_an_unknown_or_expired_one_time_link_is_refused(web: Web) -> None:
    expired = web.links.issue(datetime.now(UTC) - LINK_TTL - timedelta(seconds=1))
    async with _client(web.app) as client:
        for code in ("not-a-code", expired):
            response = await client.get(f"/login?once={code}")
            assert response.status_code == 401
            assert "set-cookie" not in response.headers
            assert "this sign-in link was used already or has expired" in response.text


# --- 3. CSRF ------------------------------------------------------------------------------------

ACTIONS = [
    "/acme/pipelines/app/builds/1/cancel",
    "/acme/pipelines/app/builds/1/retry",
    "/login/out",
]
OUT_OF_DATE = (
    "this form is out of date (its CSRF token is not this session's); reload the page and try again"
)


@pytest.mark.anyio
@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("forgery", ["no csrf", "a wrong csrf", "another session's", "foreign"])
async def test_an_action_without_this_sessions_csrf_is_refused_and_changes_nothing(
    web: Web, action: str, forgery: str
) -> None:
    async with _client(web.app, web.token) as client, _client(web.app, web.second_token) as other:
        own, theirs = await _csrf_of(client), await _csrf_of(other)
        assert own != theirs
        form, headers = {
            "no csrf": ({}, {}),
            "a wrong csrf": ({"csrf": own[:-2] + ("AA" if own[-2:] != "AA" else "BB")}, {}),
            "another session's": ({"csrf": theirs}, {"origin": ORIGIN}),
            "foreign": ({"csrf": own}, {"origin": EVIL}),
        }[forgery]
        before = _state_of(web.store)
        response = await client.post(action, data=form, headers=headers)
        assert response.status_code == 403, response.text
        message = (
            f"this action came from another site ({EVIL})"
            if forgery == "foreign"
            else (OUT_OF_DATE)
        )
        assert _error_page(403, "csrf_failed", message) in response.text
        assert "set-cookie" not in response.headers
        _assert_secure_headers(response, "the refusal")
        assert _state_of(web.store) == before
        assert (await client.get("/acme/pipelines")).status_code == 200  # still signed in


@pytest.mark.anyio
async def test_retry_with_this_sessions_csrf_queues_the_next_build(web: Web) -> None:
    async with _client(web.app, web.token) as client:
        csrf = await _csrf_of(client)
        number = web.store.builds_page("acme", "app", limit=1)[0].number
        response = await client.post(
            "/acme/pipelines/app/builds/1/retry",
            data={"csrf": csrf, "failed_only": "true"},
            headers={"origin": ORIGIN},
        )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == f"/acme/pipelines/app/builds/{number + 1}"
    new = web.store.get_build(number + 1, org="acme", pipeline="app")
    assert new is not None and new.queued
    jobs = {j.step_key: j for j in web.store.list_jobs(new.id)}
    assert jobs["compile"].reused_from_job_id is not None  # failed_only: what passed is kept
    assert jobs["lint"].reused_from_job_id is not None
    assert jobs["test"].reused_from_job_id is None
    assert jobs["test"].state is JobState.PENDING


@pytest.mark.anyio
async def test_cancel_with_this_sessions_csrf_cancels_a_queued_build(web: Web) -> None:
    async with _client(web.app, web.token) as client:
        csrf = await _csrf_of(client)
        queued = await client.post(
            "/acme/pipelines/app/builds/1/retry", data={"csrf": csrf, "failed_only": "false"}
        )
        assert queued.status_code == 303
        page = queued.headers["location"]
        response = await client.post(f"{page}/cancel", data={"csrf": csrf})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == page
    number = int(page.rsplit("/", 1)[1])
    canceled = web.store.get_build(number, org="acme", pipeline="app")
    assert canceled is not None and canceled.state is BuildState.CANCELED


@pytest.mark.anyio
async def test_sign_out_with_this_sessions_csrf_deletes_the_cookie(web: Web) -> None:
    async with _client(web.app, web.token) as client:
        csrf = await _csrf_of(client)
        response = await client.post("/login/out", data={"csrf": csrf})
        assert response.status_code == 303
        assert response.headers["location"] == "/login"
        value, attributes = _cookie_attributes(response)
        assert value in ("", '""') and attributes["max-age"] == "0"
        after = await client.get("/acme/pipelines")
        assert after.status_code == 303
        assert after.headers["location"] == "/login?next=/acme/pipelines"


@pytest.mark.anyio
async def test_signing_out_of_a_link_session_ends_it_for_good(web: Web) -> None:
    code = web.links.issue(datetime.now(UTC))
    before = {t.id for t in web.store.list_tokens()}
    async with _client(web.app) as client:
        assert (await client.get(f"/login?once={code}")).status_code == 303
        cookie = client.cookies["harmont_session"]
        csrf = await _csrf_of(client)
        assert (await client.post("/login/out", data={"csrf": csrf})).status_code == 303
    # the cookie, kept by someone, is worth nothing: the link's own token is revoked
    async with _client(web.app) as client:
        client.cookies.set("harmont_session", cookie)
        after = await client.get("/acme/pipelines")
    assert after.status_code == 303 and after.headers["location"].startswith("/login")
    (made,) = [t for t in web.store.list_tokens() if t.id not in before]
    assert (made.description or "").startswith("web sign-in link")
    assert made.revoked_at is not None


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["cancel", "retry"])
async def test_an_action_without_a_build_service_is_503(web: Web, action: str) -> None:
    async with _client(web.bare_app, web.token) as client:
        csrf = await _csrf_of(client)
        before = _state_of(web.store)
        response = await client.post(f"/acme/pipelines/app/builds/1/{action}", data={"csrf": csrf})
    assert response.status_code == 503
    message = "this server runs no builds; cancel and retry from a `harmont-exec serve`"
    assert _error_page(503, "service_unavailable", message) in response.text
    assert _state_of(web.store) == before


# --- 4. tenancy ---------------------------------------------------------------------------------


def _other_org_paths(web: Web) -> list[str]:
    job = _only_job(web, "secret")
    (artifact,) = web.store.list_artifacts(job_id=job.id)
    build = "/other/pipelines/secret/builds/1"
    return [
        "/other/pipelines",
        "/other/pipelines/secret",
        "/other/pipelines/secret?part=rows",
        build,
        f"{build}?part=live",
        f"{build}?job=make",
        f"{build}/jobs/{job.id}/window",
        f"{build}/jobs/{job.id}/log",
        f"{build}/artifacts/{artifact.id}",
    ]


def _shown(response: httpx.Response, org: str) -> Any:
    """A 404 as the client sees it, less what must differ: the organization's name in the
    message, the request's id."""
    if response.headers["content-type"].startswith("application/json"):
        error = dict(response.json()["error"])
        del error["request_id"]
        error["message"] = error["message"].replace(repr(org), "ORG")
        return error
    return response.text.replace(str(escape(repr(org))), "ORG")


@pytest.mark.anyio
async def test_another_organizations_pages_are_the_same_404_as_nothing(web: Web) -> None:
    paths = _other_org_paths(web)
    async with _client(web.app, web.token) as everyone:
        for path in paths:  # they are there, for a token that sees them
            assert (await everyone.get(path)).status_code == 200, path
    async with _client(web.app, web.acme_token) as acme:
        for path in paths:
            hidden = await acme.get(path)
            missing = await acme.get(path.replace("/other/", "/ghost/", 1))
            assert hidden.status_code == missing.status_code == 404, path
            assert _shown(hidden, "other") == _shown(missing, "ghost"), path
            assert "organization_not_found" in hidden.text
            assert "secret" not in hidden.text.replace("/other/pipelines/secret", "")


@pytest.mark.anyio
async def test_a_job_of_another_organization_is_not_found_under_a_build_one_may_see(
    web: Web,
) -> None:
    job = _only_job(web, "secret")
    base = "/acme/pipelines/app/builds/1"
    async with _client(web.app, web.token) as client:
        for suffix in ("window", "log"):
            hidden = await client.get(f"{base}/jobs/{job.id}/{suffix}")
            missing = await client.get(f"{base}/jobs/{uuid.uuid4()}/{suffix}")
            assert hidden.status_code == missing.status_code == 404
            assert "job_not_found" in hidden.text and "job_not_found" in missing.text


# --- 5. escaping --------------------------------------------------------------------------------


def _assert_inert(html: str) -> None:
    assert "<script>alert" not in html
    assert "<img src=x" not in html


@pytest.mark.anyio
async def test_a_hostile_builds_strings_are_escaped_on_every_page(web: Web) -> None:
    build = "/acme/pipelines/hostile/builds/1"
    escaped_script = "&lt;script&gt;alert(1)&lt;/script&gt;"
    escaped_img = "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;"
    async with _client(web.app, web.token) as client:
        pages = {
            path: await client.get(path)
            for path in (
                "/acme/pipelines",
                "/acme/pipelines/hostile",
                "/acme/pipelines/hostile?part=rows",
                build,
                f"{build}?part=live",
            )
        }
        selected = await client.get(build, params={"job": IMG})
        selected_too = await client.get(build, params={"job": SCRIPT})
        unknown = await client.get(build, params={"job": SCRIPT + "x"})
        # no spaces: a `next` with a space (or a tab, a newline) is refused outright
        hostile_next = "/" + (IMG + SCRIPT).replace(" ", "/")
        login = await client.get("/login", params={"next": hostile_next})
    for path, response in pages.items():
        assert response.status_code == 200, path
        _assert_inert(response.text)
    live = pages[f"{build}?part=live"].text
    assert f"<dd>{escaped_script}</dd>" in live  # the branch
    assert f"<dd>{escaped_img}</dd>" in live  # the commit message
    rows = pages["/acme/pipelines/hostile?part=rows"].text
    assert f"<td>{escaped_script}</td>" in rows
    assert f">{escaped_script}</a>" in live and f'<span class="muted">{escaped_img}</span>' in live
    for response in (selected, selected_too, unknown, login):
        _assert_inert(response.text)
    assert selected.status_code == selected_too.status_code == 200
    assert unknown.status_code == 404 and escape(repr(SCRIPT + "x")) in unknown.text
    assert login.status_code == 200
    assert f'value="{escape(hostile_next)}"' in login.text  # next, in its attributes


@pytest.mark.anyio
async def test_the_page_data_block_holds_no_closing_script_tag(web: Web) -> None:
    async with _client(web.app, web.token) as client:
        response = await client.get("/acme/pipelines/hostile/builds/1", params={"job": SCRIPT})
    assert response.status_code == 200
    (block,) = _PAGE_DATA.findall(response.text)
    assert "<" not in block and ">" not in block  # tojson writes them as \\u003c, \\u003e
    data = json.loads(block)  # the whole object: no </script> cut it short
    assert [job[1] for job in data["jobs"]] == [SCRIPT, IMG]
    assert data["build"]["branch"] == SCRIPT and data["build"]["message"] == IMG
    assert data["selected"] == web.store.list_jobs(web.builds["hostile"].id)[0].id


@pytest.mark.anyio
async def test_the_sign_in_page_never_carries_an_off_site_next(web: Web) -> None:
    # login.js goes on to `next` when the browser turns out to be signed in: the page must
    # only ever carry a local path there
    async with _client(web.app) as client:
        for after in ("/%09/evil.example", "/%0A/evil.example", "//evil.example"):
            page = await client.get(f"/login?next={after}")
            assert 'data-next="/"' in page.text, after


@pytest.mark.anyio
async def test_a_sign_out_with_a_pasted_token_described_like_a_link_keeps_the_token(
    web: Web,
) -> None:
    # whether signing out revokes the token is in the signed cookie, not in the token's
    # description, which anyone who makes a token chooses
    row, secret = web.store.create_token(
        description="web sign-in link (a deploy token)",
        organizations=None,
        expires_at=None,
        now=datetime.now(UTC),
    )
    async with _client(web.app, secret) as client:
        csrf = await _csrf_of(client)
        assert (await client.post("/login/out", data={"csrf": csrf})).status_code == 303
    kept = web.store.get_token(row.id)
    assert kept is not None and kept.revoked_at is None


@pytest.mark.anyio
async def test_the_page_of_a_build_refused_at_submission_shows_why(web: Web) -> None:
    api = {"authorization": f"Bearer {web.token}"}
    async with _client(web.app, web.token) as client:
        made = await client.post(
            "/api/v0/organizations/acme/pipelines",
            json={"name": "Refused", "repository": "r", "default_branch": "main"},
            headers=api,
        )
        assert made.status_code == 201, made.text
        refused = await client.post(
            "/api/v0/organizations/acme/pipelines/refused/builds",
            json={"pipeline_ir": "steps:\n  - {key: a, command: 1}\n"},
            headers=api,
        )
        assert refused.status_code == 422, refused.text
        page = await client.get("/acme/pipelines/refused/builds/1")
    assert page.status_code == 200, page.text
    assert "This build has no jobs." in page.text
    row = web.store.get_build(1, org="acme", pipeline="refused")
    assert row is not None and row.error_message
    assert row.error_message in refused.json()["error"]["message"]
    assert str(escape(row.error_message)) in page.text


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["builds", "window"])
async def test_a_cursor_past_what_a_store_can_compare_is_a_422_not_a_500(
    web: Web, where: str
) -> None:
    job = web.store.list_jobs(web.builds["app"].id)[0]
    path = {
        "builds": "/acme/pipelines/app",
        "window": f"/acme/pipelines/app/builds/1/jobs/{job.id}/window",
    }[where]
    async with _client(web.app, web.token) as client:
        response = await client.get(path, params={"before": str(1 << 63)})
        assert response.status_code == 422, response.text
        fine = await client.get(path, params={"before": str((1 << 63) - 1)})
        assert fine.status_code == 200, fine.text


@pytest.mark.anyio
async def test_redirects_errors_files_and_json_of_the_web_view_carry_the_headers(
    web: Web,
) -> None:
    job = web.store.list_jobs(web.builds["app"].id)[0]
    async with _client(web.app) as anonymous:
        answers = {
            "a redirect to sign in": await anonymous.get("/acme/pipelines"),
            "a missing file": await anonymous.get("/static/nope.js"),
            "the session probe": await anonymous.get("/login/session"),
        }
    async with _client(web.app, web.token) as client:
        answers["the log window"] = await client.get(
            f"/acme/pipelines/app/builds/1/jobs/{job.id}/window"
        )
        answers["a 422"] = await client.get("/acme/pipelines/app/builds/1?page=0")
        answers["an unknown path"] = await client.get("/acme/nowhere/at/all")
        answers["a raw log"] = await client.get(f"/acme/pipelines/app/builds/1/jobs/{job.id}/log")
    statuses = {what: r.status_code for what, r in answers.items()}
    assert statuses == {
        "a redirect to sign in": 303,
        "a missing file": 404,
        "the session probe": 200,
        "the log window": 200,
        "a 422": 422,
        "an unknown path": 404,
        "a raw log": 200,
    }
    for what, response in answers.items():
        _assert_secure_headers(response, what)
    assert answers["the log window"].headers["cache-control"] == "no-store"
    assert answers["the session probe"].json() == {"signed_in": False}


def test_one_token_may_hold_only_so_many_live_streams() -> None:
    live = LiveLog(heartbeat_s=15, poll_s=0.1, closing=threading.Event())
    grant = LogGrant("build", "token-a", datetime.now(UTC) + timedelta(hours=1))
    other = LogGrant("build", "token-b", datetime.now(UTC) + timedelta(hours=1))

    async def forever() -> AsyncIterator[bytes]:
        while True:
            yield b": heartbeat\n\n"
            await anyio.lowlevel.checkpoint()

    async def main() -> None:
        streams = [live.counted(grant, forever()) for _ in range(MAX_STREAMS_PER_TOKEN)]
        for stream in streams:
            assert await anext(stream) == b": heartbeat\n\n"  # each is open, and counted
        with pytest.raises(LogStreamError) as refused:
            live.check_room(grant)
        assert (refused.value.status, refused.value.code) == (429, ErrorCode.TOO_MANY_STREAMS)
        live.check_room(other)  # another token's room is its own
        await streams[0].aclose()  # a stream that ends makes room
        live.check_room(grant)
        for stream in streams[1:]:
            await stream.aclose()

    anyio.run(main)


# --- 6. headers ---------------------------------------------------------------------------------


def _assert_secure_headers(response: httpx.Response, what: str) -> None:
    policy = response.headers.get("content-security-policy")
    assert policy is not None, what
    directives = {
        name: values for name, *values in (d.split() for d in policy.split(";") if d.strip())
    }
    assert directives["script-src"] == ["'self'"], what
    assert directives["default-src"] == ["'none'"], what
    assert directives["frame-ancestors"] == ["'none'"], what
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy, what
    assert response.headers["x-content-type-options"] == "nosniff", what
    assert response.headers["referrer-policy"] == "same-origin", what
    assert response.headers["x-frame-options"] == "DENY", what


@pytest.mark.anyio
async def test_every_page_and_static_file_carries_the_security_headers(web: Web) -> None:
    build = "/acme/pipelines/app/builds/1"
    _, nobody = web.store.create_token(
        description="none", organizations=["nobody"], expires_at=None, now=datetime.now(UTC)
    )
    statics = sorted(p.name for p in STATIC.iterdir() if p.is_file())
    assert {"app.css", "build.js", "log.js"} <= set(statics)
    async with _client(web.app) as anonymous:
        login = await anonymous.get("/login")
        refused = await anonymous.post("/login", data={"token": "nope"})
        link = await anonymous.get("/login?once=nope")
        files = [(name, await anonymous.get(f"/static/{name}")) for name in statics]
    async with _client(web.app, web.token) as client:
        pages = [
            (path, await client.get(path))
            for path in (
                "/acme/pipelines",
                "/acme/pipelines/app",
                "/acme/pipelines/app?part=rows",
                build,
                f"{build}?part=live",
                f"{build}?job=test",
                "/ghost/pipelines",
            )
        ]
    async with _client(web.app, nobody) as client:
        empty = await client.get("/")
    assert [r.status_code for _, r in pages] == [200] * 6 + [404]
    assert (login.status_code, refused.status_code, link.status_code, empty.status_code) == (
        200,
        401,
        401,
        200,
    )
    for what, response in [*pages, ("login", login), ("401", refused), ("link", link)]:
        _assert_secure_headers(response, what)
        assert response.headers["cache-control"] == "no-store", what
        assert response.headers["content-type"] == "text/html; charset=utf-8", what
    _assert_secure_headers(empty, "empty")
    for name, response in files:
        assert response.status_code == 200, name
        _assert_secure_headers(response, name)
    for what, response in [*pages, ("login", login)]:  # no inline script: the CSP blocks it
        for tag in re.findall(r"<script[^>]*>", response.text):
            assert re.fullmatch(
                r'<script type="module" src="/static/\w+\.js">'
                r'|<script type="application/json" id="page-data">',
                tag,
            ), (what, tag)


# --- 7. the log window --------------------------------------------------------------------------


def _held_back(data: bytes) -> bool:
    """``data`` ends inside a multi-byte UTF-8 character."""
    try:
        data[-3:].decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.reason == "unexpected end of data"
    return False


@pytest.mark.anyio
async def test_the_log_window_opens_at_the_tail_of_a_big_log(web: Web) -> None:
    job = _only_job(web, "big")
    recorded = list(web.store.read_log(job.id))
    raw = b"".join(c.content for c in recorded)
    assert len(raw) > 2 * LOG_WINDOW_BYTES
    async with _client(web.app, web.token) as client:
        response = await client.get(f"/acme/pipelines/big/builds/1/jobs/{job.id}/window")
    assert response.status_code == 200
    window = response.json()
    assert set(window) == {"chunks", "first", "last", "more"}
    assert window["more"] is True
    assert window["last"] == recorded[-1].seq
    assert [c["seq"] for c in window["chunks"]] == list(range(window["first"], window["last"] + 1))
    assert window["first"] > recorded[0].seq
    text = "".join(c["content"] for c in window["chunks"])
    assert text.endswith("\nend\n")
    assert raw.decode("utf-8", "replace").endswith(text)
    sizes = {c.seq: len(c.content) for c in recorded}
    # as much as fits in the window: the chunk before it would not
    size = sum(sizes[s] for s in range(window["first"], window["last"] + 1))
    assert size <= LOG_WINDOW_BYTES < size + sizes[window["first"] - 1]


@pytest.mark.anyio
async def test_the_log_windows_read_back_to_the_start_are_the_raw_log(web: Web) -> None:
    job = _only_job(web, "big")
    recorded = {c.seq: c for c in web.store.read_log(job.id)}
    split = [seq for seq, c in recorded.items() if _held_back(c.content)]
    assert len(split) >= 10  # the chunks end mid-character (the job pauses there)
    base = f"/acme/pipelines/big/builds/1/jobs/{job.id}"
    windows: list[dict[str, Any]] = []
    async with _client(web.app, web.token) as client:
        raw = await client.get(f"{base}/log")
        window = (await client.get(f"{base}/window")).json()
        windows.append(window)
        while window["more"]:
            window = (await client.get(f"{base}/window", params={"before": window["first"]})).json()
            assert window["last"] == windows[-1]["first"] - 1
            windows.append(window)
    assert raw.status_code == 200
    assert raw.headers["content-disposition"] == f'attachment; filename="1-{job.id[:8]}.log"'
    assert len(windows) >= 3
    assert windows[-1]["first"] == min(recorded)
    # a window that starts after a chunk ending mid-character: its first chunk completes it
    assert any(w["first"] - 1 in split for w in windows[:-1])
    text = "".join(c["content"] for w in reversed(windows) for c in w["chunks"])
    assert text == raw.content.decode("utf-8", "replace")
    assert raw.content == b"".join(c.content for c in recorded.values())
    assert "\ufffd" not in text and text.count("\U0001f600") == 40


# --- 8. the build events stream -----------------------------------------------------------------


@dataclass
class Event:
    name: str = "message"
    data: Any = None
    id: int | None = None


def _events(lines: Iterator[str]) -> Iterator[Event]:
    """SSE: fields until a blank line; comments (heartbeats) skipped; bounded."""
    current, data = Event(), ""
    for line in bounded(lines, "the events stream to end"):
        if line == "":
            if data or current.name != "message":
                current.data = json.loads(data)
                yield current
            current, data = Event(), ""
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                current.name = value
            elif name == "data":
                data += value
            elif name == "id":
                current.id = int(value)


def _parse(text: str) -> list[Event]:
    return list(_events(iter(text.split("\n"))))


async def _log_token(client: httpx.AsyncClient, token: str, pipeline: str = "app") -> str:
    response = await client.get(
        f"{API}/acme/pipelines/{pipeline}/builds/1/log-token",
        headers={"authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


@pytest.mark.anyio
async def test_events_of_a_finished_build_from_the_start_then_done(web: Web) -> None:
    build = web.builds["app"]
    async with _client(web.app) as client:
        log_token = await _log_token(client, web.token)
        response = await client.get(
            f"/v0/builds/{build.id}/events", params={"token": log_token, "after": "0"}
        )
        listed = await client.get(
            f"{API}/acme/pipelines/app/builds/1/jobs",
            headers={"authorization": f"Bearer {web.token}"},
        )
        shown = await client.get(
            f"{API}/acme/pipelines/app/builds/1", headers={"authorization": f"Bearer {web.token}"}
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _parse(response.text)
    jobs = web.store.list_jobs(build.id)
    assert [e.name for e in events] == ["job"] * len(jobs) + ["build", "done"]
    job_events = events[: len(jobs)]
    assert [e.data for e in job_events] == listed.json()["data"]  # the wire Job, as it is now
    assert [(e.data["step_key"], e.data["state"], e.data["exit_code"]) for e in job_events] == [
        ("compile", "passed", 0),
        ("test", "failed", 3),
        ("lint", "passed", 0),
    ]
    # the last job event of a batch carries the point to resume from; the others none
    ids = [e.id for e in job_events]
    assert ids[-1] is not None and ids[:-1] == [None] * (len(ids) - 1)
    assert ids[-1] == web.store.job_changes(build.id, after=0)[0]
    assert events[-2].data == shown.json() and events[-2].id is None
    assert events[-1].data == {} and events[-1].id is None


@pytest.mark.anyio
async def test_events_resumed_after_the_first_job_event_miss_no_job(web: Web) -> None:
    build = web.builds["app"]
    async with _client(web.app) as client:
        log_token = await _log_token(client, web.token)
        url = f"/v0/builds/{build.id}/events"
        whole = _parse((await client.get(url, params={"token": log_token, "after": "0"})).text)
        first = whole[0]
        assert first.name == "job" and first.id is None  # mid-batch: no point to resume from
        # EventSource reconnects with the id of the last event that had one: cut off after
        # the first job event, it has none, and resumes from the start it was given
        resumed = await client.get(url, params={"token": log_token}, headers={"last-event-id": "0"})
    got = {e.data["step_key"] for e in _parse(resumed.text) if e.name == "job"}
    assert got == {e.data["step_key"] for e in whole if e.name == "job"}


@pytest.mark.anyio
async def test_events_from_the_last_change_of_a_finished_build_are_the_build_then_done(
    web: Web,
) -> None:
    build = web.builds["app"]
    async with _client(web.app) as client:
        log_token = await _log_token(client, web.token)
        for params in ({"after": str(web.store.last_change())}, {}):  # no after: from now
            response = await client.get(
                f"/v0/builds/{build.id}/events", params={"token": log_token, **params}
            )
            assert response.status_code == 200
            events = _parse(response.text)
            assert [e.name for e in events] == ["build", "done"], params
            assert events[0].data["state"] == "failed"


@pytest.mark.anyio
async def test_the_page_hands_its_script_a_log_token_for_the_events_stream(web: Web) -> None:
    build = web.builds["hostile"]
    async with _client(web.app, web.token) as client:
        page = await client.get("/acme/pipelines/hostile/builds/1")
        data = json.loads(_PAGE_DATA.findall(page.text)[0])
        assert data["build_id"] == build.id
        assert data["point"] <= web.store.last_change()
        response = await client.get(
            f"/v0/builds/{build.id}/events",
            params={"token": data["log_token"], "after": str(data["point"])},
        )
    assert response.status_code == 200
    assert [e.name for e in _parse(response.text)] == ["build", "done"]


@pytest.mark.anyio
async def test_events_without_a_good_log_token_are_401(web: Web) -> None:
    build = web.builds["app"]
    async with _client(web.app) as client:
        missing = await client.get(f"/v0/builds/{build.id}/events")
        garbage = await client.get(f"/v0/builds/{build.id}/events", params={"token": "x.y"})
    for response in (missing, garbage):
        assert response.status_code == 401
        body = response.json()
        assert set(body) == {"code", "message"}
        assert body["code"] == "log_stream_unauthorized"
    assert missing.json()["message"].startswith("no ?token= on the build events stream's URL")


@pytest.mark.anyio
async def test_events_with_another_builds_log_token_are_403(web: Web) -> None:
    async with _client(web.app) as client:
        big_token = await _log_token(client, web.token, "big")
        for build_id in (web.builds["app"].id, str(uuid.uuid4()), "short"):
            response = await client.get(
                f"/v0/builds/{build_id}/events", params={"token": big_token}
            )
            assert response.status_code == 403, build_id
            body = response.json()
            assert set(body) == {"code", "message"}
            assert body["code"] == "log_stream_forbidden"


GATE = """\
steps:
  - key: gate
    command: while [ ! -e go ]; do sleep 0.05; done; echo through
  - key: later
    depends_on: gate
    command: echo later
"""
_STATE_ORDER = [s.value for s in JobState]


def test_events_of_a_running_build_arrive_as_its_jobs_change(
    server: Server, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "gate.yml").write_text(GATE)
    out = tmp_path / "run"
    run = start(["run", "gate.yml", "--db", server.db], work, out)
    try:
        headers = {"authorization": f"Bearer {mint_token(server.db)}"}
        build_url = f"{server.url}/organizations/local/pipelines/gate/builds/1"

        def gate_running() -> bool | None:
            response = httpx.get(f"{build_url}/jobs", headers=headers, timeout=TIMEOUT_S)
            if response.status_code == 404:
                return None  # not recorded yet
            states = {j["step_key"]: j["state"] for j in response.json()["data"]}
            return True if states["gate"] == "running" else None

        poll(gate_running, "the gate job to run", (run, out))
        with open_store(server.db) as store:
            build = store.get_build(1, org="local", pipeline="gate")
        assert build is not None
        token = httpx.get(f"{build_url}/log-token", headers=headers, timeout=TIMEOUT_S).json()
        base = server.url.removesuffix("/api/v0")
        url = f"{base}/v0/builds/{build.id}/events?token={token['token']}"
        with httpx.stream("GET", url, timeout=TIMEOUT_S) as response:
            assert response.status_code == 200
            events = _events(response.iter_lines())
            first = next(events)
            assert (first.name, first.data["state"]) == ("build", "running")
            (work / "go").touch()
            rest = list(events)
        assert run.wait(timeout=TIMEOUT_S) == 0, output(out)
    finally:
        stop(run)
    assert [e.name for e in rest[-2:]] == ["build", "done"]
    assert rest[-2].data["state"] == "passed"
    changes = [(e.data["step_key"], e.data["state"], e.id) for e in rest if e.name == "job"]
    assert {e.name for e in rest[:-2]} <= {"job", "build"}
    ids = [i for _, _, i in changes if i is not None]
    assert changes[-1][2] is not None and ids == sorted(set(ids))  # points only move on
    for key in ("gate", "later"):
        states = [s for k, s, _ in changes if k == key]
        assert states and states[-1] == "passed", changes
        assert states == sorted(states, key=_STATE_ORDER.index), changes
    # from now: the gate's running, before the stream opened, is not sent; it passes before
    # `later` moves
    assert changes[0][:2] == ("gate", "passed"), changes
    assert all(k == "later" for k, _, _ in changes[1:]), changes


# --- 9. the store reads, on both backends -------------------------------------------------------

READS = """\
steps:
  - key: talk
    command: |
      python3 -c '
      import os, time
      for i in range(10):
          os.write(1, b"line %d\\n" % i)
          time.sleep(0.03)
      '
  - key: flaky
    retry_policy: {limit: 2}
    command: if [ -e flaky.once ]; then echo second; else touch flaky.once; exit 1; fi
  - key: broken
    command: exit 3
  - key: after_broken
    depends_on: broken
    command: echo never
"""
WIDE_JOBS = 520  # more than one IN (...) list of ids (500)


@dataclass
class Record:
    store: Store
    reads: BuildRow  # READS: a log of several chunks, a retried job, a skipped one
    wide: BuildRow  # WIDE_JOBS jobs after one root
    points: list[int] = field(default_factory=list)  # last_change: empty, after READS, after wide


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def record(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Record]:
    """Two real builds in a store of each backend (once per backend: the wide one takes a
    while); a PostgreSQL store gets a schema of its own, dropped afterwards."""
    work = tmp_path_factory.mktemp(f"reads-{request.param}")
    (work / "reads.yml").write_text(READS)
    wide = ["concurrency: 64", "steps:", "  - {key: root, command: 'true'}"]
    wide += [f"  - {{key: j{i:03d}, command: 'true', depends_on: root}}" for i in range(WIDE_JOBS)]
    (work / "wide.yml").write_text("\n".join(wide) + "\n")
    schema = None
    with pytest.MonkeyPatch.context() as env:
        if request.param == "postgresql":
            import psycopg

            server_url = str(request.getfixturevalue("postgresql_server"))
            schema = f"test_{uuid.uuid4().hex[:16]}"
            with psycopg.connect(server_url, autocommit=True) as admin:
                admin.execute(f'CREATE SCHEMA "{schema}"')
            env.setenv("HARMONT_ARTIFACTS", str(work / "pg-artifacts"))
            url = with_schema(server_url, schema)
        else:
            url = str(work / "db" / "harmont.db")
        try:
            with open_store(url) as store:
                points = [store.last_change()]
                builds = []
                for name, state in (("reads.yml", "failed"), ("wide.yml", "passed")):
                    assert run_build_sync(work / name, store=store).state.value == state
                    (row,) = store.builds_page("local", name.removesuffix(".yml"), limit=5)
                    builds.append(row)
                    points.append(store.last_change())
                yield Record(store, builds[0], builds[1], points)
        finally:
            if schema is not None:
                with psycopg.connect(server_url, autocommit=True) as admin:
                    admin.execute("SET lock_timeout = '10s'")
                    admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_last_change_grows_with_each_build(record: Record) -> None:
    empty, after_reads, after_wide = record.points
    assert empty == 0
    assert empty < after_reads < after_wide == record.store.last_change()
    # each build's last change is where the record was when it ended
    assert record.store.job_changes(record.reads.id, after=0)[0] == after_reads


def test_job_changes_from_the_start_are_every_job_in_plan_order(record: Record) -> None:
    store, build = record.store, record.reads
    point, jobs = store.job_changes(build.id, after=0)
    assert jobs == store.list_jobs_text(build.id)
    assert [j.step_key for j in jobs] == ["talk", "flaky", "broken", "after_broken"]
    assert store.job_changes(build.id, after=point) == (point, [])
    # another build's later changes are not this one's
    assert record.points[2] > point
    assert store.job_changes(build.id, after=point - 1)[0] == point


def test_job_changes_read_in_pages_move_the_point_to_the_end(record: Record) -> None:
    store, build = record.store, record.wide
    plan = [j.id for j in store.list_jobs(build.id)]
    after, seen, calls = record.points[1], set(), 0
    while True:
        point, jobs = store.job_changes(build.id, after=after, limit=400)
        calls += 1
        if point == after:
            assert jobs == []
            break
        assert point > after
        positions = [plan.index(j.id) for j in jobs]
        assert positions == sorted(positions)  # each page in plan order
        seen |= {j.id for j in jobs}
        after = point
    assert after == record.points[2]
    assert seen == set(plan)
    assert calls > 3  # a job changes several times: more changes than jobs


def test_jobs_by_ids_reads_more_than_500_jobs(record: Record) -> None:
    store, build = record.store, record.wide
    listed = store.list_jobs_text(build.id)
    assert len(listed) == WIDE_JOBS + 1 > 500
    assert store.jobs_by_ids([j.id for j in listed]) == listed
    root = listed[0].id
    assert all(j.depends_on == (root,) for j in listed[1:])
    assert store.jobs_by_ids([]) == []
    assert store.jobs_by_ids([str(uuid.uuid4())]) == []


def test_jobs_by_ids_answers_in_plan_order_whatever_the_order_of_the_ids(record: Record) -> None:
    store, build = record.store, record.wide
    listed = store.list_jobs_text(build.id)
    assert store.jobs_by_ids([j.id for j in reversed(listed)]) == listed


def test_log_page_before_is_the_page_that_ends_just_before_a_seq(record: Record) -> None:
    store = record.store
    talk = next(j for j in store.list_jobs(record.reads.id) if j.step_key == "talk")
    chunks = list(store.read_log(talk.id))
    assert len(chunks) >= 3, chunks  # the job pauses between its lines
    seqs = [c.seq for c in chunks]
    for before in range(seqs[0], seqs[-1] + 2):
        for limit in (1, 2, 64):
            expected = [c for c in chunks if c.seq < before][-limit:]
            assert store.log_page_before(talk.id, before_seq=before, limit=limit) == expected
    assert store.log_page_before(talk.id, before_seq=1 << 62) == chunks
    assert store.log_page_before(str(uuid.uuid4()), before_seq=1 << 62) == []


def test_attempts_of_build_are_each_jobs_list_attempts(record: Record) -> None:
    store, build = record.store, record.reads
    jobs = store.list_jobs(build.id)
    expected = {j.id: store.list_attempts(j.id) for j in jobs if store.list_attempts(j.id)}
    found = store.attempts_of_build(build.id)
    assert found == expected
    assert list(found) == [j.id for j in jobs if j.id in expected]  # plan order
    by_key = {j.step_key: j.id for j in jobs}
    assert [(a.number, a.exit_code) for a in found[by_key["flaky"]]] == [(1, 1), (2, 0)]
    assert by_key["after_broken"] not in found  # skipped: it never ran
    assert store.attempts_of_build(str(uuid.uuid4())) == {}


TWO_GATES = """\
concurrency: 4
steps:
  - {key: early, command: echo early}
  - {key: one, depends_on: early, command: "while [ ! -e go1 ]; do sleep 0.05; done"}
  - {key: two, depends_on: early, command: "while [ ! -e go2 ]; do sleep 0.05; done"}
"""


@pytest.mark.anyio
async def test_job_changes_after_a_point_are_only_the_jobs_changed_since(
    store_url: str, tmp_path: Path
) -> None:
    (tmp_path / "gates.yml").write_text(TWO_GATES)
    with open_store(store_url) as store, anyio.fail_after(TIMEOUT_S):

        def running(*keys: str) -> BuildRow | None:
            build = store.get_build(1, org="local", pipeline="gates")
            if build is None:
                return None
            states = {j.step_key: j.state for j in store.list_jobs(build.id)}
            return build if all(states[k] is JobState.RUNNING for k in keys) else None

        def finished(key: str) -> bool | None:
            build = store.get_build(1, org="local", pipeline="gates")
            assert build is not None
            jobs = {j.step_key: j for j in store.list_jobs(build.id)}
            return True if jobs[key].state.is_terminal else None

        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(run_build, tmp_path / "gates.yml", store=store))
            build = await poll_async(lambda: running("one", "two"), "both gates to run")
            point = store.last_change()
            assert store.job_changes(build.id, after=point) == (point, [])
            (tmp_path / "go2").touch()  # `two` ends first, then `one`: not in plan order
            await poll_async(lambda: finished("two"), "two to pass")
            (tmp_path / "go1").touch()
        moved, jobs = store.job_changes(build.id, after=point)
        assert [j.step_key for j in jobs] == ["one", "two"]  # plan order; `early` is not there
        assert [j.state for j in jobs] == ["passed", "passed"]
        assert moved == store.last_change() > point
        assert store.job_changes(build.id, after=moved) == (moved, [])


# --- 10. reserved organization slugs ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "slug"), [("API", "api"), ("static", "static"), ("V0", "v0"), ("Login!", "login")]
)
def test_create_organization_refuses_a_reserved_slug(store_url: str, name: str, slug: str) -> None:
    with open_store(store_url) as store:
        before = store.list_organizations()
        with pytest.raises(InvalidNameError) as refused:
            store.create_organization(name=name, url=None, now=datetime.now(UTC))
        assert str(refused.value) == (
            f"the organization slug {slug!r} is reserved (the web view's paths use {RESERVED}); "
            "choose another name"
        )
        assert store.list_organizations() == before
        assert store.create_organization(name="API users", url=None, now=datetime.now(UTC)).slug


@pytest.mark.anyio
async def test_the_api_refuses_an_organization_with_a_reserved_slug(web: Web) -> None:
    before = web.store.list_organizations()
    async with _client(web.app) as client:
        response = await client.post(
            API, json={"name": "static"}, headers={"authorization": f"Bearer {web.token}"}
        )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request", "invalid_name")
    assert error["message"] == (
        f"the organization slug 'static' is reserved (the web view's paths use {RESERVED}); "
        "choose another name"
    )
    assert web.store.list_organizations() == before


def _run_into_login(tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    (tmp_path / "b.yml").write_text("steps:\n  - {key: a, command: echo ran > ran.txt}\n")
    db = tmp_path / "db" / "harmont.db"
    return cli("run", "b.yml", "--db", str(db), "--org", "login", cwd=tmp_path), db


def test_run_into_a_reserved_organization_records_nothing(tmp_path: Path) -> None:
    result, db = _run_into_login(tmp_path)
    assert result.returncode != 0
    assert result.stderr == (
        f"harmont-exec: the organization slug 'login' is reserved (the web view's paths use "
        f"{RESERVED}); choose another name\n"
    )
    assert not (tmp_path / "ran.txt").exists()
    with open_store(db) as store:
        assert store.list_builds() == []
        assert [o.slug for o in store.list_organizations()] == ["local"]  # made with the store


def test_run_into_a_reserved_organization_exits_2(tmp_path: Path) -> None:
    result, _ = _run_into_login(tmp_path)
    assert result.returncode == 2, result.stderr


# --- 11. what the pages compute -----------------------------------------------------------------

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def _at(seconds: float | None) -> datetime | None:
    return None if seconds is None else T0 + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0ms"),
        (0.035, "35ms"),
        (1.0, "1.0s"),
        (1.24, "1.2s"),
        (59.9, "59.9s"),
        (60.0, "1m00.0s"),
        (184.5, "3m04.5s"),
        (3599.9, "59m59.9s"),
        (3600.0, "1h00m"),
        (7500.0, "2h05m"),
        (-5.0, "0ms"),  # a clock that went back: never negative
    ],
)
def test_duration_text(seconds: float, text: str) -> None:
    assert duration_text(T0, _at(seconds)) == text


def test_duration_text_of_what_has_not_started_or_ended() -> None:
    assert duration_text(None, _at(5)) == ""
    assert duration_text(T0, None, now=_at(2.5)) == "2.5s"


@pytest.mark.parametrize(
    ("seconds", "text"), [(119.96, "2m00.0s"), (3599.99, "1h00m"), (0.9996, "1.0s")]
)
def test_duration_text_rounds_up_into_the_next_unit(seconds: float, text: str) -> None:
    assert duration_text(T0, _at(seconds)) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.5, "500ms"),
        (2.5, "2.5s"),
        (60, "1m00s"),
        (90, "1m30s"),
        (3900, "1h05m"),
    ],
)
def test_seconds_text(seconds: float, text: str) -> None:
    assert seconds_text(seconds) == text


def test_counts_by_state_counts_the_states_present_in_state_order() -> None:
    states = ["passed", "failed", JobState.PASSED, JobState.RUNNING, "skipped", "passed"]
    assert counts_by_state(states) == [("running", 1), ("passed", 3), ("failed", 1), ("skipped", 1)]
    assert counts_by_state([]) == []
    assert counts_by_state(["failing"]) == []  # a build's state, not a job's


@pytest.mark.parametrize(
    ("count", "page", "expected"),
    [
        (0, 1, (1, 0, 1)),
        (0, 7, (1, 0, 1)),
        (100, 2, (1, 0, 1)),
        (101, 2, (2, 100, 2)),
        (250, 3, (3, 200, 3)),
        (250, 99, (3, 200, 3)),
        (250, 0, (1, 0, 3)),
        (250, -4, (1, 0, 3)),
    ],
)
def test_page_of_clamps_to_the_pages_there_are(
    count: int, page: int, expected: tuple[int, int, int]
) -> None:
    assert page_of(count, page) == expected


def test_page_of_with_another_page_size() -> None:
    assert page_of(25, 3, size=10) == (3, 20, 3)
    assert page_of(25, 4, size=10) == (3, 20, 3)


def _build_row(started: float | None, finished: float | None) -> BuildRow:
    return BuildRow(
        id="b",
        number=1,
        org="o",
        pipeline="p",
        state=BuildState.PASSED if finished is not None else BuildState.RUNNING,
        source="local",
        branch=None,
        commit=None,
        message=None,
        error_code=None,
        error_message=None,
        created_at=T0 - timedelta(seconds=1),
        scheduled_at=None,
        started_at=_at(started),
        finished_at=_at(finished),
        build_file=None,
        working_dir="/",
        cancel_requested=False,
        executor_host=None,
        executor_pid=None,
        heartbeat_at=None,
    )


def _job_row(key: str, position: int, state: JobState, finished: float | None = None) -> JobRow:
    return JobRow(
        id=f"id-{key}",
        build_id="b",
        position=position,
        step_key=key,
        name=None,
        command="true",
        state=state,
        exit_code=None,
        soft_failed=False,
        error_code=None,
        error_message=None,
        retry_policy=None,
        soft_fail_policy=None,
        retries_count=0,
        created_at=T0,
        started_at=None,
        finished_at=_at(finished),
        depends_on=(),
    )


def _attempt(key: str, number: int, start: float, end: float | None) -> AttemptRow:
    outcome = None if end is None else "exited"
    return AttemptRow(
        f"id-{key}", number, outcome, None, None, T0 + timedelta(seconds=start), _at(end)
    )


def test_timeline_of_a_running_build_draws_a_bar_per_attempt() -> None:
    jobs = [
        _job_row("a", 0, JobState.PASSED, finished=7),
        _job_row("b", 1, JobState.RUNNING),
        _job_row("c", 2, JobState.PENDING),
    ]
    attempts = {
        "id-a": [_attempt("a", 1, 2, 4), _attempt("a", 2, 5, 7)],
        "id-b": [_attempt("b", 1, 1, None)],
    }
    timeline = timeline_of(_build_row(0, None), jobs, attempts, now=_at(10) or T0)
    assert timeline.rows == ("b", "a")  # by first start; `c` never ran
    assert timeline.bars == (
        Bar(0, "id-b", "b", 1, 1.0, 10.0, "running", 1.0),  # still running: it ends now
        Bar(1, "id-a", "a", 1, 2.0, 4.0, "failed", 2.0),  # an earlier attempt failed
        Bar(1, "id-a", "a", 2, 5.0, 7.0, "passed", 2.0),
    )
    assert timeline.span == 10.0
    assert timeline.ticks == (0, 2, 4, 6, 8, 10)


def test_timeline_of_a_finished_build_ends_at_its_end() -> None:
    jobs = [_job_row("a", 0, JobState.CANCELED, finished=6), _job_row("b", 1, JobState.PASSED)]
    attempts = {"id-a": [_attempt("a", 1, 3, None)], "id-b": [_attempt("b", 1, 3, 4)]}
    build = _build_row(None, 8)  # never marked started: the timeline starts at its creation
    timeline = timeline_of(build, jobs, attempts, now=_at(100) or T0)
    assert timeline.rows == ("a", "b")  # the same start: plan order
    assert timeline.bars == (
        Bar(0, "id-a", "a", 1, 4.0, 7.0, "canceled", 4.0),  # its attempt ends with the job
        Bar(1, "id-b", "b", 1, 4.0, 5.0, "passed", 4.0),
    )
    assert timeline.span == 9.0
    assert timeline.ticks == (0, 2, 4, 6, 8)
    assert timeline_of(build, jobs, attempts, now=T0, limit=1).rows == ("a",)
    empty = timeline_of(build, jobs, {}, now=T0)
    assert (empty.bars, empty.rows) == ((), ())
