"""What Harmont's own clients need of `serve` beyond the reads' bodies (SPEC §6, §6.1): our
OpenAPI document in Harmont's names (operationIds, schema names, formats), the reads its
front-end calls (getOrganization, getCurrentUser), HEAD on every GET route, and CORS for the
origins `serve --cors-origin` names. The real ASGI app over httpx, and the real `serve`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import HARMONT_OPENAPI
from serving import (
    TIMEOUT_S,
    asgi_client,
    cli,
    free_port,
    log_token_for,
    mint_token,
    poll,
    poll_async,
    start,
    stop,
)

import executor
from executor.api import create_app
from executor.store import JobRow, open_store

API = "/api/v0"
ORIGIN = "http://localhost:5173"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "harmont-openapi.json"


@pytest.fixture(scope="module")
def harmont_document(harmont_openapi: dict[str, Any]) -> dict[str, Any]:
    return harmont_openapi


def test_harmont_openapi_kept_with_the_tests_is_the_contracts_copy() -> None:
    """tests/harmont-openapi.json must not drift from the contract's copy (../shared), when
    that is there to compare with. Not a CI failure when it is not: the copy lives outside this
    repository, a fresh clone anywhere has none, and every conformance test below runs on the
    kept copy whatever happens here."""
    if not SHARED.is_file():
        pytest.skip(
            f"no contract copy at {SHARED}, so tests/harmont-openapi.json is not checked "
            "against it: check the contract (shared/, with harmont-openapi.json) out beside "
            "this repository"
        )
    assert json.loads(SHARED.read_text()) == json.loads(HARMONT_OPENAPI.read_text())


@dataclass(frozen=True)
class Record:
    db: Path
    token: str  # every organization
    acme_token: str  # acme only
    job_id: str  # of acme/ci #1
    build_id: str


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Record:
    root = tmp_path_factory.mktemp("clients")
    (root / "ci.yaml").write_text(
        "steps:\n"
        "  - {key: hello, command: 'echo hello', artifact_paths: [out.txt]}\n"
        "  - {key: write, command: 'echo kept > out.txt', depends_on: hello}\n"
    )
    (root / "out.txt").write_text("kept\n")
    db = root / "harmont.db"
    result = executor.run_build_sync(root / "ci.yaml", db=db, org="acme", pipeline="ci")
    executor.run_build_sync(root / "ci.yaml", db=db, org="other", pipeline="ci")
    token, acme = mint_token(db), mint_token(db, organizations=["acme"])
    return Record(db, token, acme, result.jobs["hello"].job_id, result.build_id)


# --- the OpenAPI document in Harmont's names -------------------------------------------------


@pytest.fixture(scope="module")
def ours(record: Record) -> dict[str, Any]:
    """Our OpenAPI document, as `serve` serves it."""
    document: dict[str, Any] = create_app(db=record.db).openapi()
    return document


def _ref_name(response: dict[str, Any]) -> str | None:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def test_openapi_shared_operations_have_harmonts_operation_ids_and_schema_names(
    harmont_document: dict[str, Any], ours: dict[str, Any]
) -> None:
    compared = 0
    for path, operations in ours["paths"].items():
        for method, operation in operations.items():
            theirs = harmont_document["paths"].get(path, {}).get(method)
            if theirs is None:
                assert operation.get("x-harmont-extension") or path.startswith("/v0/"), (
                    f"{method.upper()} {path} is not Harmont's and not marked an extension"
                )
                continue
            compared += 1
            assert operation["operationId"] == theirs["operationId"], (method, path)
            assert not operation.get("x-harmont-extension"), (method, path)
            for status, response in theirs["responses"].items():
                name = _ref_name(response)
                if name is None:
                    continue
                assert status in operation["responses"], (method, path, status)
                assert _ref_name(operation["responses"][status]) == name, (method, path, status)
    # Every read Harmont's clients call: ping, orgs (list, get), user, pipelines (list, get),
    # builds (list, get), jobs (list, get), the log token; and every write (SPEC §6.3):
    # createOrganization, createPipeline, createBuild, cancelBuild, the three token routes.
    assert compared == 18


def _formats(schema: dict[str, Any]) -> dict[str, str | None]:
    """property -> the format it has (looking into arrays and nullable unions)."""
    out: dict[str, str | None] = {}
    for name, prop in schema.get("properties", {}).items():
        options = prop.get("anyOf", [prop])
        formats = set()
        for option in options:
            target = option.get("items", option)
            formats.add(target.get("format"))
        formats.discard(None)
        out[name] = formats.pop() if formats else None
    return out


def test_openapi_shared_schemas_have_harmonts_formats(
    harmont_document: dict[str, Any], ours: dict[str, Any]
) -> None:
    theirs = harmont_document["components"]["schemas"]
    mine_all = ours["components"]["schemas"]
    shared = sorted(set(theirs) & set(mine_all))
    assert {"Job", "Build", "Pipeline", "Organization", "LogTokenResponse", "Error"} <= set(shared)
    for name in shared:
        mine, harmonts = _formats(mine_all[name]), _formats(theirs[name])
        for prop in set(mine) & set(harmonts):
            assert mine[prop] == harmonts[prop], (name, prop, mine[prop], harmonts[prop])
    assert _formats(mine_all["Job"])["depends_on"] == "uuid"
    assert _formats(mine_all["Job"])["created_at"] == "date-time"


# --- getOrganization and getCurrentUser -----------------------------------------------------


@pytest.mark.anyio
async def test_api_get_organization_answers_a_visible_one_and_the_same_404_otherwise(
    record: Record,
) -> None:
    async with asgi_client(create_app(db=record.db), record.acme_token) as client:
        acme = await client.get(f"{API}/organizations/acme")
        hidden = await client.get(f"{API}/organizations/other")
        missing = await client.get(f"{API}/organizations/nobody")
    assert acme.status_code == 200, acme.text
    body = acme.json()
    assert body["slug"] == "acme" and body["name"] == "acme" and body["url"] is None
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None

    def same(response: httpx.Response, org: str) -> dict[str, Any]:
        assert response.status_code == 404, response.text
        error = dict(response.json()["error"])
        assert error.pop("request_id") == response.headers["x-request-id"]
        error["message"] = error["message"].replace(repr(org), "ORG")
        return error

    assert same(hidden, "other") == same(missing, "nobody")
    assert same(hidden, "other")["code"] == "organization_not_found"


@pytest.mark.anyio
async def test_api_current_user_is_the_local_user_and_needs_a_token(record: Record) -> None:
    app = create_app(db=record.db)
    async with asgi_client(app, record.token) as client:
        user = await client.get(f"{API}/user")
    async with asgi_client(app) as anonymous:
        refused = await anonymous.get(f"{API}/user")
    assert user.status_code == 200, user.text
    assert user.json() == {
        "uuid": "4c0ca1e5-0000-4000-8000-000000000001",
        "email": "local@localhost",
        "name": "local",
        "personal_org_slug": "local",
    }
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    # A token limited to other organizations: its user's organization is one it can open.
    async with asgi_client(app, record.acme_token) as acme:
        limited = (await acme.get(f"{API}/user")).json()
        opened = await acme.get(f"{API}/organizations/{limited['personal_org_slug']}")
    assert limited["personal_org_slug"] == "acme" and opened.status_code == 200


# --- HEAD on every GET route -----------------------------------------------------------------


def _concrete(path: str, record: Record, artifact_id: str, log_token: str) -> str:
    return (
        path.replace("{org}", "acme")
        .replace("{pipeline}", "ci")
        .replace("{number}", "1")
        .replace("{job_id}", record.job_id)
        .replace("{artifact_id}", artifact_id)
        .replace("{build_id}", record.build_id)
    ) + (f"?token={log_token}" if path.startswith("/v0/") else "")


@pytest.mark.anyio
async def test_api_every_get_route_answers_head_with_the_get_headers_and_no_body(
    record: Record,
) -> None:
    app = create_app(db=record.db)
    async with asgi_client(app, record.token) as client:
        artifacts = await client.get(f"{API}/organizations/acme/pipelines/ci/builds/1/artifacts")
        (artifact,) = artifacts.json()["data"]
        log_token = (
            await client.get(f"{API}/organizations/acme/pipelines/ci/builds/1/log-token")
        ).json()["token"]
        paths = [path for path, operations in app.openapi()["paths"].items() if "get" in operations]
        assert len(paths) == 19
        for path in paths:
            url = _concrete(path, record, artifact["id"], log_token)
            get = await client.get(url)
            head = await client.head(url)
            assert get.status_code == 200, (path, get.text)
            assert head.status_code == 200, (path, head.text)
            assert head.content == b"", path
            for name in ("content-type", "content-length", "content-disposition", "repr-digest"):
                assert head.headers.get(name) == get.headers.get(name), (path, name)
        missing = await client.head(f"{API}/organizations/nobody")
    assert missing.status_code == 404 and missing.content == b""


@pytest.mark.anyio
async def test_api_head_of_a_running_jobs_log_stream_ends_at_once(tmp_path: Path) -> None:
    """A HEAD of the live stream of a job that is still running ends with its headers: the app
    returns by itself (the client never says it left), while the job goes on."""
    (tmp_path / "wait.yaml").write_text(
        "steps:\n  - {key: wait, command: 'echo started; while [ ! -e go ]; do sleep 0.05; done'}\n"
    )
    db = tmp_path / "harmont.db"
    with anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(executor.run_build, tmp_path / "wait.yaml", db=db))
            with open_store(db) as store:

                def running() -> JobRow | None:
                    builds = store.list_builds()
                    jobs = store.list_jobs(builds[0].id) if builds else []
                    return jobs[0] if jobs and jobs[0].state.value == "running" else None

                job = await poll_async(running, "the job to run")
                token = log_token_for(store, job.build_id)
            app = create_app(db=db)
            sent: list[dict[str, Any]] = []
            never = anyio.Event()

            async def receive() -> dict[str, Any]:
                await never.wait()  # a client that stays connected
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            path = f"/v0/jobs/{job.id}/logs"
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "HEAD",
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "query_string": f"token={token}".encode(),
                "headers": [(b"host", b"test")],
                "client": ("127.0.0.1", 1),
                "server": ("test", 80),
                "root_path": "",
            }
            async with app.router.lifespan_context(app):
                await app(scope, receive, send)  # returns: it does not stream on
            assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
            bodies = [m for m in sent if m["type"] == "http.response.body"]
            assert b"".join(m.get("body", b"") for m in bodies) == b""
            with open_store(db) as store:
                assert store.get_job(job.id).state.value == "running"  # type: ignore[union-attr]
            (tmp_path / "go").touch()


# --- CORS --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_api_cors_is_off_by_default(record: Record) -> None:
    async with asgi_client(create_app(db=record.db), record.token) as client:
        response = await client.get(f"{API}/organizations", headers={"Origin": ORIGIN})
        preflight = await client.options(
            f"{API}/organizations",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"},
        )
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code == 405


@pytest.fixture
def cors_server(tmp_path: Path, record: Record) -> Iterator[str]:
    port = free_port()
    out = tmp_path / "serve"
    proc = start(
        ["serve", "--db", str(record.db), "--port", str(port), "--cors-origin", ORIGIN],
        tmp_path,
        out,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool | None:
            try:
                return httpx.get(f"{base}{API}/ping", timeout=TIMEOUT_S).status_code == 200 or None
            except httpx.TransportError:
                return None

        poll(up, "the server to answer /ping", (proc, out))
        yield base
    finally:
        stop(proc)


def test_serve_cors_allows_the_named_origin_on_the_api_and_the_log_stream(
    cors_server: str, record: Record
) -> None:
    builds = f"{cors_server}{API}/organizations/acme/pipelines/ci/builds"
    preflight = httpx.options(
        builds,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
        timeout=TIMEOUT_S,
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "GET" in preflight.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in preflight.headers
    auth = {"Authorization": f"Bearer {record.token}", "Origin": ORIGIN}
    simple = httpx.get(builds, headers=auth, timeout=TIMEOUT_S)
    assert simple.status_code == 200
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in simple.headers["access-control-expose-headers"]
    token = httpx.get(f"{builds}/1/log-token", headers=auth, timeout=TIMEOUT_S).json()["token"]
    stream = httpx.get(
        f"{cors_server}/v0/jobs/{record.job_id}/logs?token={token}",
        headers={"Origin": ORIGIN},
        timeout=TIMEOUT_S,
    )
    assert stream.status_code == 200
    assert stream.headers["access-control-allow-origin"] == ORIGIN
    assert "event: done" in stream.text


def test_serve_cors_refuses_another_origin(cors_server: str, record: Record) -> None:
    builds = f"{cors_server}{API}/organizations/acme/pipelines/ci/builds"
    other = "http://evil.example"
    preflight = httpx.options(
        builds,
        headers={"Origin": other, "Access-Control-Request-Method": "GET"},
        timeout=TIMEOUT_S,
    )
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    error = preflight.json()["error"]
    assert error["code"] == "cors_refused"
    assert "'http://evil.example'" in error["message"] and "--cors-origin" in error["message"]
    assert error["request_id"] == preflight.headers["x-request-id"]
    simple = httpx.get(
        builds,
        headers={"Authorization": f"Bearer {record.token}", "Origin": other},
        timeout=TIMEOUT_S,
    )
    assert simple.status_code == 200  # the browser, not the server, withholds it: no ACAO
    assert "access-control-allow-origin" not in simple.headers


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("*", "wildcard"),
        ("https://*.example.com", "wildcard"),
        ("http://localhost:5173/", "is not an origin"),
        ("localhost:5173", "is not an origin"),
        ("ftp://host", "is not an origin"),
        ("http://user@host", "is not an origin"),
        ("http://x:99999", "is not an origin"),
        ("http://x:0", "is not an origin"),
        (" http://x", "is not an origin"),
    ],
)
def test_cli_serve_refuses_a_cors_origin_that_is_not_one(
    tmp_path: Path, value: str, says: str
) -> None:
    result = cli("serve", "--db", str(tmp_path / "h.db"), "--cors-origin", value, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and repr(value) in result.stderr, result.stderr
    assert not (tmp_path / "h.db").exists()  # refused before anything was opened


@pytest.mark.anyio
async def test_api_cors_origins_match_as_a_browser_sends_them(record: Record) -> None:
    """`--cors-origin` values are kept as a browser writes its Origin header: lowercase, no
    default port."""
    from executor.cli.serve import _origin

    given = ("http://LocalHost:5173", "https://X.example:443", "http://h:80", "http://[::1]:8")
    normalized = _origin(None, None, given)  # type: ignore[arg-type]
    assert normalized == (
        "http://localhost:5173",
        "https://x.example",
        "http://h",
        "http://[::1]:8",
    )
    app = create_app(db=record.db, cors_origins=normalized)
    async with asgi_client(app) as client:
        preflight = await client.options(
            f"{API}/organizations",
            headers={"Origin": "https://x.example", "Access-Control-Request-Method": "GET"},
        )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://x.example"


@pytest.mark.anyio
async def test_api_405_allows_get_and_head(record: Record) -> None:
    async with asgi_client(create_app(db=record.db), record.token) as client:
        response = await client.post(f"{API}/user")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
