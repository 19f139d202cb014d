"""The write API (SPEC §6.3) as a client sees it: the real ASGI app over httpx, writing to a real
SQLite record. Organizations, pipelines and tokens are the store's own writes; the build writes
go to a fake build service (the API's ``BuildService`` Protocol) that records each call and
makes its builds with the real store, as httpx's ``MockTransport`` stands in for a server.
Every answer is checked against Harmont's schemas, and every refusal is tried."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from openapi_schema_validator import OAS30Validator, oas30_format_checker

from executor.api import create_app
from executor.api.body import SMALL_BODY_LIMIT, build_body_limit
from executor.api.service import BuildRequest, Submitted
from executor.errors import (
    BuildFileError,
    BuildStateError,
    ExecutorError,
    InvalidSourceError,
    SourceTooLargeError,
)
from executor.load import plan_build_text
from executor.states import BuildState
from executor.store import BuildRow, Store, open_store

pytestmark = pytest.mark.anyio

API = "/api/v0"
NOW = datetime.now(UTC)
TINY = "steps:\n  - {key: hello, command: 'echo hello'}\n"
MAX_UPLOAD = 3000  # bytes of decoded tarball: small, so that the limits are quick to pass
CHUNK = 64 << 10

ERROR_TYPES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "invalid_request",
    409: "conflict",
    413: "invalid_request",
    422: "invalid_request",
    503: "server_error",
}


# --- the fake build service --------------------------------------------------------------------


@dataclass
class FakeService:
    """A ``BuildService`` that records its calls and makes real rows: a submitted build is
    queued in the store, a cancel is the store's ``request_cancel``, a retry a new queued build;
    ``refusal`` makes ``submit`` answer as the service does for an IR or a tarball it refuses."""

    store: Store
    workspace: Path
    refusal: ExecutorError | None = None
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def _queue(self, org: str, pipeline: str, text: str, **recorded: Any) -> BuildRow:
        created = self.store.create_build(
            org=org,
            pipeline=pipeline,
            plan=plan_build_text(text),
            build_file=text,
            working_dir=str(self.workspace),
            queued=True,
            now=datetime.now(UTC),
            **recorded,
        )
        self.store.flush()
        row = self.store.get_build(created.number, org=org, pipeline=pipeline)
        assert row is not None
        return row

    def submit(self, request: BuildRequest) -> Submitted:
        self.calls.append(("submit", request))
        build = self._queue(
            request.org,
            request.pipeline,
            TINY,
            source=request.origin,
            branch=request.branch,
            commit=request.commit,
            message=request.message,
        )
        if self.refusal is None:
            return Submitted(build)
        refused = replace(
            build,
            state=BuildState.FAILED,
            error_code=self.refusal.code.value,
            error_message=str(self.refusal),
        )
        return Submitted(refused, self.refusal)

    def cancel(self, build: BuildRow) -> BuildRow:
        self.calls.append(("cancel", build.number))
        return self.store.request_cancel(build.id, datetime.now(UTC))

    def retry(self, build: BuildRow, *, failed_only: bool) -> BuildRow:
        self.calls.append(("retry", (build.number, failed_only)))
        if not build.state.is_terminal:
            raise BuildStateError(f"build #{build.number} has not finished; cancel it first")
        return self._queue(build.org, build.pipeline, TINY, source=build.source)


@dataclass(frozen=True)
class Api:
    store: Store
    service: FakeService
    app: FastAPI  # with the fake service
    bare_app: FastAPI  # without a service
    token: str  # sees every organization
    acme_token: str  # limited to acme


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with open_store(tmp_path / "db" / "harmont.db") as store:
        store.create_organization(name="Acme", url=None, now=NOW)
        store.create_organization(name="Other", url=None, now=NOW)
        for org in ("acme", "other"):
            store.create_pipeline(
                org,
                name="CI",
                repository="https://example.com/x/ci.git",
                default_branch="main",
                description=None,
                repo_name=None,
                now=NOW,
            )
        _, token = store.create_token(
            description="all", organizations=None, expires_at=None, now=NOW
        )
        _, acme_token = store.create_token(
            description="acme", organizations=["acme"], expires_at=None, now=NOW
        )
        service = FakeService(store, tmp_path / "workspace")
        yield Api(
            store=store,
            service=service,
            app=create_app(store=store, service=service, max_upload_bytes=MAX_UPLOAD),
            bare_app=create_app(store=store),
            token=token,
            acme_token=acme_token,
        )


@asynccontextmanager
async def _client(app: FastAPI, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    with anyio.fail_after(30):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers
        ) as client:
            yield client


def _pipe(org: str = "acme", pipeline: str = "ci") -> str:
    return f"{API}/organizations/{org}/pipelines/{pipeline}"


BUILDS = f"{_pipe()}/builds"


def _tarball(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Harmont's envelope with this status, type and code; returns its ``error``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"type", "code", "message", "doc_url", "request_id"}, error
    assert (error["type"], error["code"]) == (ERROR_TYPES[status], code), error
    assert error["doc_url"].endswith("#" + code), error
    assert response.headers["x-request-id"] == error["request_id"]
    return error  # type: ignore[no-any-return]


def _inline(node: Any, schemas: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return _inline(schemas[ref.removeprefix("#/components/schemas/")], schemas)
        return {k: _inline(v, schemas) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, schemas) for v in node]
    return node


@pytest.fixture(scope="module")
def harmont(harmont_openapi: dict[str, Any]) -> dict[str, Any]:
    schemas: dict[str, Any] = harmont_openapi["components"]["schemas"]
    return schemas


def _conforms(harmont: dict[str, Any], name: str, body: Any) -> None:
    """``body`` is valid by Harmont's schema ``name`` and has no field outside it."""
    schema = _inline(harmont[name], harmont)
    validator = OAS30Validator(schema, format_checker=oas30_format_checker)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
    assert not errors, f"{name} does not conform to Harmont's schema: {errors}\n{body}"
    assert set(body) <= set(schema["properties"]), (name, set(body) - set(schema["properties"]))


def _same_404(response: httpx.Response, name: str) -> dict[str, Any]:
    """The 404's envelope without what differs between two requests (the id, the name)."""
    error = dict(_assert_error(response, 404, response.json()["error"]["code"]))
    error.pop("request_id")
    error["message"] = error["message"].replace(repr(name), "NAME")
    return error


BUILD_BODY = {
    "pipeline_ir": TINY,
    "branch": "main",
    "commit": "0123abcd",
    "message": "from a test",
    "env": {"GREETING": "hi"},
}


async def _create_build(client: httpx.AsyncClient, **extra: Any) -> httpx.Response:
    return await client.post(BUILDS, json={**BUILD_BODY, **extra})


# --- organizations -------------------------------------------------------------------------


async def test_create_organization_answers_201_with_the_organization(
    api: Api, harmont: dict[str, Any]
) -> None:
    async with _client(api.app, api.token) as client:
        created = await client.post(
            f"{API}/organizations", json={"name": "Big Corp!", "url": "https://big.example"}
        )
        got = await client.get(f"{API}/organizations/big-corp")
        listed = (await client.get(f"{API}/organizations")).json()["data"]
    assert created.status_code == 201, created.text
    _conforms(harmont, "Organization", created.json())
    assert created.json()["slug"] == "big-corp"
    assert created.json()["name"] == "Big Corp!"
    assert created.json()["url"] == "https://big.example"
    assert created.headers["location"] == f"{API}/organizations/big-corp"
    assert got.json() == created.json()
    assert created.json() in listed


async def test_create_organization_with_a_taken_slug_is_422_slug_taken(api: Api) -> None:
    async with _client(api.app, api.token) as client:
        response = await client.post(f"{API}/organizations", json={"name": "ACME"})
    assert "acme" in _assert_error(response, 422, "slug_taken")["message"]


async def test_create_organization_with_a_name_that_makes_no_slug_is_422_invalid_name(
    api: Api,
) -> None:
    async with _client(api.app, api.token) as client:
        response = await client.post(f"{API}/organizations", json={"name": "!!!"})
    _assert_error(response, 422, "invalid_name")


async def test_create_organization_with_a_token_limited_to_orgs_is_403(api: Api) -> None:
    async with _client(api.app, api.acme_token) as client:
        response = await client.post(f"{API}/organizations", json={"name": "Mine"})
    assert "acme" in _assert_error(response, 403, "token_scope_forbidden")["message"]
    assert api.store.get_organization("mine") is None


# --- pipelines -----------------------------------------------------------------------------


async def test_create_pipeline_answers_201_with_the_pipeline_as_given(
    api: Api, harmont: dict[str, Any]
) -> None:
    body = {
        "name": "Web App",
        "repository": "git@github.com:acme/web.git",
        "default_branch": "trunk",
        "description": "the site",
    }
    async with _client(api.app, api.acme_token) as client:
        created = await client.post(f"{API}/organizations/acme/pipelines", json=body)
        got = await client.get(_pipe("acme", "web-app"))
    assert created.status_code == 201, created.text
    _conforms(harmont, "Pipeline", created.json())
    assert created.json() == {
        **created.json(),
        **body,
        "slug": "web-app",
        "repo_name": "acme/web",  # derived from the repository, as Harmont does
    }
    assert created.headers["location"] == _pipe("acme", "web-app")
    assert got.json() == created.json()


async def test_create_pipeline_keeps_a_given_repo_name(api: Api) -> None:
    body = {"name": "x", "repository": "local", "default_branch": "main", "repo_name": "me/x"}
    async with _client(api.app, api.token) as client:
        created = await client.post(f"{API}/organizations/acme/pipelines", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["repo_name"] == "me/x"


async def test_create_pipeline_with_a_taken_slug_is_422_slug_taken(api: Api) -> None:
    body = {"name": "ci", "repository": "local", "default_branch": "main"}
    async with _client(api.app, api.token) as client:
        response = await client.post(f"{API}/organizations/acme/pipelines", json=body)
    _assert_error(response, 422, "slug_taken")


async def test_create_pipeline_without_its_required_fields_is_422_naming_them(api: Api) -> None:
    async with _client(api.app, api.token) as client:
        response = await client.post(f"{API}/organizations/acme/pipelines", json={"name": "x"})
    message = _assert_error(response, 422, "invalid_request")["message"]
    assert "repository: required" in message and "default_branch: required" in message


async def test_create_pipeline_in_a_foreign_org_is_the_404_of_a_missing_one(api: Api) -> None:
    body = {"name": "sneaky", "repository": "local", "default_branch": "main"}
    async with _client(api.app, api.acme_token) as client:
        foreign = await client.post(f"{API}/organizations/other/pipelines", json=body)
        missing = await client.post(f"{API}/organizations/nobody/pipelines", json=body)
    assert _same_404(foreign, "other") == _same_404(missing, "nobody")
    assert foreign.json()["error"]["code"] == "organization_not_found"
    assert api.store.get_pipeline("other", "sneaky") is None


# --- createBuild ---------------------------------------------------------------------------


async def test_create_build_answers_201_with_the_queued_build(
    api: Api, harmont: dict[str, Any]
) -> None:
    async with _client(api.app, api.token) as client:
        created = await _create_build(client)
        got = await client.get(f"{BUILDS}/1")
    assert created.status_code == 201, created.text
    _conforms(harmont, "Build", created.json())
    build = created.json()
    assert (build["number"], build["state"], build["pipeline_slug"]) == (1, "scheduled", "ci")
    assert (build["branch"], build["commit"], build["message"]) == (
        "main",
        "0123abcd",
        "from a test",
    )
    assert build["source"] == "api"
    assert created.headers["location"] == f"{BUILDS}/1"
    assert got.json() == build


async def test_create_build_hands_the_service_the_checked_request(api: Api) -> None:
    tarball = _tarball({"src/data.txt": b"uploaded\n"})
    body = {
        "source_b64": _b64(tarball),
        "source_sha256": hashlib.sha256(tarball).hexdigest(),
        "source": "ui",
    }
    async with _client(api.app, api.token) as client:
        created = await _create_build(client, **body)
    assert created.status_code == 201, created.text
    ((call, request),) = api.service.calls
    assert call == "submit"
    assert request == BuildRequest(
        org="acme",
        pipeline="ci",
        pipeline_ir=TINY,
        source=tarball,
        env={"GREETING": "hi"},
        branch="main",
        commit="0123abcd",
        message="from a test",
        origin="ui",
    )


async def test_create_build_takes_a_tarball_of_exactly_the_limit(api: Api) -> None:
    source = bytes(range(256)) * (MAX_UPLOAD // 256) + b"x" * (MAX_UPLOAD % 256)
    assert len(source) == MAX_UPLOAD
    async with _client(api.app, api.token) as client:
        created = await _create_build(client, source_b64=_b64(source))
    assert created.status_code == 201, created.text
    assert api.service.calls[0][1].source == source


async def test_create_build_with_only_harmonts_required_fields_and_an_ir_is_201(api: Api) -> None:
    async with _client(api.app, api.token) as client:
        created = await client.post(BUILDS, json={"pipeline_ir": TINY})
    assert created.status_code == 201, created.text
    assert api.service.calls[0][1].env == {} and api.service.calls[0][1].source is None


async def test_create_build_the_service_refuses_is_422_with_the_build_recorded(
    api: Api, harmont: dict[str, Any]
) -> None:
    api.service.refusal = BuildFileError.single("pipeline_ir:1:1: no steps")
    async with _client(api.app, api.token) as client:
        response = await _create_build(client)
    _conforms(harmont, "Error", response.json())
    message = _assert_error(response, 422, "invalid_build_file")["message"]
    assert "build #1 of acme/ci" in message and "no steps" in message


async def test_create_build_with_an_unsafe_tarball_is_422_invalid_source(api: Api) -> None:
    api.service.refusal = InvalidSourceError("member '../etc/passwd' leads out of the workspace")
    async with _client(api.app, api.token) as client:
        response = await _create_build(client, source_b64=_b64(b"tar"))
    assert "../etc/passwd" in _assert_error(response, 422, "invalid_source")["message"]


async def test_create_build_whose_tarball_unpacks_too_large_is_413(api: Api) -> None:
    api.service.refusal = SourceTooLargeError("the tarball unpacks to more than 30000 bytes")
    async with _client(api.app, api.token) as client:
        response = await _create_build(client, source_b64=_b64(b"tar"))
    assert "build #1" in _assert_error(response, 413, "payload_too_large")["message"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"branch": "main"}, "pipeline_ir is missing"),
        ({"pipeline_ir": "  \n"}, "pipeline_ir is missing"),
        ({"pipeline_ir": 7}, "pipeline_ir=7"),
        ({"pipeline_ir": TINY, "source_b64": "not base64!"}, "source_b64 is not base64"),
        ({"pipeline_ir": TINY, "source_b64": "QUJD\nREVG"}, "source_b64 is not base64"),
        ({"pipeline_ir": TINY, "source_b64": "QUJDRA"}, "source_b64 is not base64"),  # unpadded
        ({"pipeline_ir": TINY, "source_b64": "w6k="}, None),  # ok: control for the next
        ({"pipeline_ir": TINY, "source_b64": "é"}, "source_b64 is not base64"),
        ({"pipeline_ir": TINY, "source_b64": 12}, "source_b64=12"),
        ({"pipeline_ir": TINY, "source_b64": ["QUJD"]}, "source_b64=['QUJD']"),
        ({"pipeline_ir": TINY, "env": {"A": 1}}, "env.A=1"),
        ({"pipeline_ir": TINY, "env": ["A=1"]}, "env=['A=1']"),
        ({"pipeline_ir": TINY, "branch": 3}, "branch=3"),
        ({"pipeline_ir": TINY, "pipline": "typo"}, "pipline: not a field of CreateBuildRequest"),
        ({"pipeline_ir": TINY, "source_url": "https://x.example/s.tgz"}, "source_url is not"),
        (
            {"pipeline_ir": TINY, "source_b64": _b64(b"abc"), "source_sha256": "00" * 32},
            "source_sha256",
        ),
    ],
)
async def test_create_build_with_a_bad_body_is_422_and_reaches_no_service(
    api: Api, body: dict[str, Any], named: str | None
) -> None:
    async with _client(api.app, api.token) as client:
        response = await client.post(BUILDS, json=body)
    if named is None:
        assert response.status_code == 201, response.text
        return
    assert named in _assert_error(response, 422, "invalid_request")["message"]
    assert api.service.calls == []


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"", "the request body is empty"),
        (b"{not json", "the body is not JSON"),
        (b'{"pipeline_ir": "x"', "the body is not JSON"),
        (b"[1, 2]", "the body is not a JSON object"),
        (b'"steps: []"', "the body is not a JSON object"),
        (b"\xff\xfe", "the body is not JSON"),
    ],
)
async def test_create_build_with_a_body_that_is_not_a_json_object_is_422(
    api: Api, content: bytes, named: str
) -> None:
    async with _client(api.app, api.token) as client:
        response = await client.post(
            BUILDS, content=content, headers={"content-type": "application/json"}
        )
    assert named in _assert_error(response, 422, "invalid_request")["message"]
    assert api.service.calls == []


async def test_create_build_with_a_tarball_over_the_limit_is_413(api: Api) -> None:
    async with _client(api.app, api.token) as client:
        response = await _create_build(client, source_b64=_b64(b"x" * (MAX_UPLOAD + 1)))
    message = _assert_error(response, 413, "payload_too_large")["message"]
    assert f"{MAX_UPLOAD + 1} bytes" in message and "--max-upload-mb" in message
    assert api.service.calls == []


class _Body:
    """A request body streamed in chunks, counting what the app pulled."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.pulled < self.total:
            chunk = b" " * min(CHUNK, self.total - self.pulled)
            self.pulled += len(chunk)
            yield chunk


async def test_create_build_with_a_content_length_over_the_limit_is_413_unread(api: Api) -> None:
    limit = build_body_limit(MAX_UPLOAD)
    body = _Body(limit + 1)
    async with _client(api.app, api.token) as client:
        response = await client.post(
            BUILDS, content=body, headers={"content-length": str(limit + 1)}
        )
    assert f"({limit + 1} bytes)" in _assert_error(response, 413, "payload_too_large")["message"]
    assert body.pulled == 0  # refused from the header alone


async def test_create_build_with_a_chunked_body_over_the_limit_is_413_once_past_it(
    api: Api,
) -> None:
    limit = build_body_limit(MAX_UPLOAD)
    body = _Body(4 * limit)
    async with _client(api.app, api.token) as client:
        request = client.build_request("POST", BUILDS, content=body)
        assert "content-length" not in request.headers  # chunked: nothing declared
        response = await client.send(request)
    _assert_error(response, 413, "payload_too_large")
    assert limit < body.pulled <= limit + CHUNK  # read until past the limit, no further


async def test_create_build_with_a_body_longer_than_its_content_length_is_413(api: Api) -> None:
    limit = build_body_limit(MAX_UPLOAD)
    body = _Body(4 * limit)
    async with _client(api.app, api.token) as client:
        response = await client.post(BUILDS, content=body, headers={"content-length": "10"})
    _assert_error(response, 413, "payload_too_large")
    assert limit < body.pulled <= limit + CHUNK


async def test_create_build_body_limit_allows_the_tarball_in_base64_and_the_rest() -> None:
    # 4/3 of the tarball, rounded up to whole base64 quanta, plus 4 MiB for the rest.
    assert build_body_limit(3) == 4 + (4 << 20)
    assert build_body_limit(4) == 8 + (4 << 20)
    assert build_body_limit(100 << 20) == len(_b64(b"\0" * (100 << 20))) + (4 << 20)


async def test_small_write_body_over_its_limit_is_413(api: Api) -> None:
    name = "x" * SMALL_BODY_LIMIT
    async with _client(api.app, api.token) as client:
        response = await client.post(f"{API}/organizations", json={"name": name})
    _assert_error(response, 413, "payload_too_large")


async def test_create_build_in_an_unknown_pipeline_is_404_before_the_body_is_read(
    api: Api,
) -> None:
    body = _Body(1 << 20)
    async with _client(api.app, api.token) as client:
        response = await client.post(
            f"{_pipe('acme', 'ghost')}/builds", content=body, headers={"content-length": "9"}
        )
    _assert_error(response, 404, "pipeline_not_found")
    assert body.pulled == 0 and api.service.calls == []


async def test_create_build_in_a_foreign_org_is_the_404_of_a_missing_one(api: Api) -> None:
    async with _client(api.app, api.acme_token) as client:
        foreign = await client.post(f"{_pipe('other', 'ci')}/builds", json=BUILD_BODY)
        missing = await client.post(f"{_pipe('nobody', 'ci')}/builds", json=BUILD_BODY)
    assert _same_404(foreign, "other") == _same_404(missing, "nobody")
    assert foreign.json()["error"]["code"] == "organization_not_found"
    assert api.service.calls == []


# --- cancelBuild and retry -------------------------------------------------------------------


async def test_cancel_build_answers_200_with_the_build_as_canceled(
    api: Api, harmont: dict[str, Any]
) -> None:
    async with _client(api.app, api.token) as client:
        await _create_build(client)
        canceled = await client.put(f"{BUILDS}/1/cancel")
        got = await client.get(f"{BUILDS}/1")
    assert canceled.status_code == 200, canceled.text
    _conforms(harmont, "Build", canceled.json())
    assert canceled.json()["state"] == "canceled"  # queued: canceled at once
    assert got.json() == canceled.json()
    assert api.service.calls[1:] == [("cancel", 1)]


async def test_cancel_build_of_a_finished_build_returns_it_unchanged(api: Api) -> None:
    async with _client(api.app, api.token) as client:
        await _create_build(client)
        first = await client.put(f"{BUILDS}/1/cancel")
        second = await client.put(f"{BUILDS}/1/cancel")
    assert first.status_code == second.status_code == 200, second.text
    assert second.json() == first.json()


async def test_cancel_build_of_an_unknown_build_is_404(api: Api) -> None:
    async with _client(api.app, api.token) as client:
        unknown = await client.put(f"{BUILDS}/9/cancel")
        foreign = await client.put(f"{_pipe('other', 'ci')}/builds/1/cancel")
    _assert_error(unknown, 404, "build_not_found")
    _assert_error(foreign, 404, "build_not_found")  # other/ci has no build 1 either
    assert api.service.calls == []


async def test_cancel_build_in_a_foreign_org_is_the_404_of_a_missing_one(api: Api) -> None:
    async with _client(api.app, api.token) as client:
        await client.post(f"{_pipe('other', 'ci')}/builds", json=BUILD_BODY)
    async with _client(api.app, api.acme_token) as client:
        foreign = await client.put(f"{_pipe('other', 'ci')}/builds/1/cancel")
        missing = await client.put(f"{_pipe('nobody', 'ci')}/builds/1/cancel")
    assert _same_404(foreign, "other") == _same_404(missing, "nobody")
    assert api.service.calls == [("submit", api.service.calls[0][1])]


async def test_retry_answers_201_with_the_new_build(api: Api, harmont: dict[str, Any]) -> None:
    async with _client(api.app, api.token) as client:
        await _create_build(client)
        await client.put(f"{BUILDS}/1/cancel")
        retried = await client.post(f"{BUILDS}/1/retry", json={"failed_only": True})
        default = await client.post(f"{BUILDS}/1/retry")
    assert retried.status_code == 201, retried.text
    _conforms(harmont, "Build", retried.json())
    assert (retried.json()["number"], retried.json()["state"]) == (2, "scheduled")
    assert retried.headers["location"] == f"{BUILDS}/2"
    assert default.status_code == 201 and default.json()["number"] == 3
    assert api.service.calls[2:] == [("retry", (1, True)), ("retry", (1, False))]


async def test_retry_of_a_build_not_finished_is_409_invalid_build_state(api: Api) -> None:
    async with _client(api.app, api.token) as client:
        await _create_build(client)
        response = await client.post(f"{BUILDS}/1/retry", json={"failed_only": False})
    assert "has not finished" in _assert_error(response, 409, "invalid_build_state")["message"]


@pytest.mark.parametrize("body", [{"failed_only": "yes"}, {"failed_only": 1}, {"only": True}])
async def test_retry_with_a_bad_body_is_422(api: Api, body: dict[str, Any]) -> None:
    async with _client(api.app, api.token) as client:
        await _create_build(client)
        response = await client.post(f"{BUILDS}/1/retry", json=body)
    _assert_error(response, 422, "invalid_request")
    assert [c for c, _ in api.service.calls] == ["submit"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", BUILDS), ("PUT", f"{BUILDS}/1/cancel"), ("POST", f"{BUILDS}/1/retry")],
)
async def test_build_writes_without_a_service_are_503(api: Api, method: str, path: str) -> None:
    async with _client(api.bare_app, api.token) as client:
        response = await client.request(method, path, json=BUILD_BODY)
    assert "runs no builds" in _assert_error(response, 503, "service_unavailable")["message"]


# --- every write needs a token ----------------------------------------------------------------

WRITES = [
    ("POST", f"{API}/organizations"),
    ("POST", f"{API}/organizations/acme/pipelines"),
    ("POST", BUILDS),
    ("PUT", f"{BUILDS}/1/cancel"),
    ("POST", f"{BUILDS}/1/retry"),
    ("GET", f"{API}/user/api-tokens"),
    ("POST", f"{API}/user/api-tokens"),
    ("DELETE", f"{API}/user/api-tokens/00000000-0000-4000-8000-000000000000"),
]


@pytest.mark.parametrize(("method", "path"), WRITES)
@pytest.mark.parametrize("authorization", [None, "Bearer hm_unknown", "Token x"])
async def test_write_without_a_usable_token_is_401(
    api: Api, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with _client(api.bare_app) as client:  # no service: still a 401 first
        response = await client.request(method, path, json={"name": "x"}, headers=headers)
    _assert_error(response, 401, "unauthorized")
    assert api.store.get_organization("x") is None


async def test_write_method_a_route_does_not_take_is_405_naming_the_ones_it_does(
    api: Api,
) -> None:
    async with _client(api.app, api.token) as client:
        organizations = await client.delete(f"{API}/organizations")
        build = await client.post(f"{BUILDS}/1")
        cancel = await client.get(f"{BUILDS}/1/cancel")
    assert organizations.headers["allow"] == "GET, HEAD, POST"
    assert (
        "it takes GET, HEAD, POST"
        in _assert_error(organizations, 405, "method_not_allowed")["message"]
    )
    assert build.headers["allow"] == "GET, HEAD"
    assert cancel.headers["allow"] == "PUT"
    _assert_error(cancel, 405, "method_not_allowed")


# --- API tokens -----------------------------------------------------------------------------


async def test_create_api_token_answers_201_with_the_secret_once(
    api: Api, harmont: dict[str, Any]
) -> None:
    async with _client(api.app, api.token) as client:
        created = await client.post(f"{API}/user/api-tokens", json={"description": "laptop"})
        listed = await client.get(f"{API}/user/api-tokens")
    assert created.status_code == 201, created.text
    _conforms(harmont, "ApiTokenCreateResponse", created.json())
    _conforms(harmont, "ApiToken", created.json()["api_token"])
    secret = created.json()["token"]
    assert secret.startswith("hm_") and len(secret) == 46
    assert created.json()["api_token"]["description"] == "laptop"
    assert created.headers["cache-control"] == "no-store"
    assert secret not in listed.text
    async with _client(api.app, secret) as client:
        assert (await client.get(f"{API}/organizations/other")).status_code == 200


async def test_list_api_tokens_answers_the_tokens_not_revoked(
    api: Api, harmont: dict[str, Any]
) -> None:
    gone, _ = api.store.create_token(
        description="gone", organizations=None, expires_at=None, now=NOW
    )
    api.store.revoke_token(gone.id, now=NOW)
    async with _client(api.app, api.token) as client:
        listed = await client.get(f"{API}/user/api-tokens")
    assert listed.status_code == 200, listed.text
    _conforms(harmont, "ApiTokenListResponse", listed.json())
    assert sorted(t["description"] for t in listed.json()["api_tokens"]) == ["acme", "all"]
    for token in listed.json()["api_tokens"]:
        _conforms(harmont, "ApiToken", token)


async def test_list_api_tokens_of_a_limited_token_shows_only_tokens_within_its_scope(
    api: Api,
) -> None:
    for orgs in (["acme", "other"], ["other"]):
        api.store.create_token(description=str(orgs), organizations=orgs, expires_at=None, now=NOW)
    async with _client(api.app, api.acme_token) as client:
        listed = await client.get(f"{API}/user/api-tokens")
    assert [t["description"] for t in listed.json()["api_tokens"]] == ["acme"]


async def test_api_token_made_by_a_limited_token_is_limited_and_outlived_by_its_maker(
    api: Api,
) -> None:
    ends = NOW + timedelta(days=1)
    _, maker_secret = api.store.create_token(
        description="maker", organizations=["acme"], expires_at=ends, now=NOW
    )
    async with _client(api.app, maker_secret) as client:
        forever = await client.post(f"{API}/user/api-tokens", json={"description": "forever"})
        later = await client.post(
            f"{API}/user/api-tokens",
            json={"description": "later", "expires_at": (ends + timedelta(days=9)).isoformat()},
        )
        sooner_at = (NOW + timedelta(hours=1)).isoformat()
        sooner = await client.post(
            f"{API}/user/api-tokens", json={"description": "sooner", "expires_at": sooner_at}
        )
    for response in (forever, later):
        assert response.status_code == 201, response.text
        assert datetime.fromisoformat(response.json()["api_token"]["expires_at"]) == ends
    assert datetime.fromisoformat(
        sooner.json()["api_token"]["expires_at"]
    ) == datetime.fromisoformat(sooner_at)
    async with _client(api.app, forever.json()["token"]) as client:
        acme = await client.get(f"{API}/organizations/acme")
        other = await client.get(f"{API}/organizations/other")
    assert acme.status_code == 200
    _assert_error(other, 404, "organization_not_found")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({}, "description: required"),
        ({"description": 5}, "description=5"),
        ({"description": "x", "expires_at": "2020-01-01T00:00:00Z"}, "has passed"),
        ({"description": "x", "expires_at": "2999-01-01T00:00:00"}, "timezone"),
        ({"description": "x", "expires_at": "soon"}, "expires_at='soon'"),
        ({"description": "x", "organizations": ["other"]}, "organizations: not a field"),
    ],
)
async def test_create_api_token_with_a_bad_body_is_422(
    api: Api, body: dict[str, Any], named: str
) -> None:
    async with _client(api.app, api.token) as client:
        response = await client.post(f"{API}/user/api-tokens", json=body)
    assert named in _assert_error(response, 422, "invalid_request")["message"]
    assert len(api.store.list_tokens()) == 2


async def test_revoke_api_token_answers_204_and_the_token_stops_at_once(api: Api) -> None:
    doomed, secret = api.store.create_token(
        description="doomed", organizations=None, expires_at=None, now=NOW
    )
    async with _client(api.app, api.token) as client:
        revoked = await client.delete(f"{API}/user/api-tokens/{doomed.id}")
        again = await client.delete(f"{API}/user/api-tokens/{doomed.id}")
    assert revoked.status_code == 204 and revoked.content == b""
    _assert_error(again, 404, "api_token_not_found")
    async with _client(api.app, secret) as client:
        _assert_error(await client.get(f"{API}/organizations"), 401, "unauthorized")


async def test_revoke_api_token_unknown_is_404(api: Api, harmont: dict[str, Any]) -> None:
    async with _client(api.app, api.token) as client:
        unknown = await client.delete(f"{API}/user/api-tokens/00000000-0000-4000-8000-0000000000ff")
        garbage = await client.delete(f"{API}/user/api-tokens/not-an-id")
    for response in (unknown, garbage):
        _assert_error(response, 404, "api_token_not_found")
        _conforms(harmont, "Error", response.json())


async def test_revoke_api_token_outside_a_limited_tokens_scope_is_404(api: Api) -> None:
    (everything,) = [t for t in api.store.list_tokens() if t.organizations is None]
    async with _client(api.app, api.acme_token) as client:
        refused = await client.delete(f"{API}/user/api-tokens/{everything.id}")
    _assert_error(refused, 404, "api_token_not_found")
    async with _client(api.app, api.token) as client:
        assert (await client.get(f"{API}/organizations")).status_code == 200


# --- the OpenAPI document ----------------------------------------------------------------------


def test_openapi_write_bodies_have_harmonts_schema_names_and_accept_its_fields(
    api: Api, harmont_openapi: dict[str, Any]
) -> None:
    ours = api.app.openapi()
    bodies = {
        ("post", "/api/v0/organizations"): "CreateOrganizationRequest",
        ("post", "/api/v0/organizations/{org}/pipelines"): "CreatePipelineRequest",
        ("post", "/api/v0/organizations/{org}/pipelines/{pipeline}/builds"): "CreateBuildRequest",
        ("post", "/api/v0/user/api-tokens"): "ApiTokenCreateRequest",
    }
    for (method, path), name in bodies.items():
        for document in (ours, harmont_openapi):
            body = document["paths"][path][method]["requestBody"]["content"]["application/json"]
            assert body["schema"] == {"$ref": f"#/components/schemas/{name}"}, (path, document)
        mine = ours["components"]["schemas"][name]
        theirs = harmont_openapi["components"]["schemas"][name]
        # A body Harmont's clients send is one we take: every field, and no more required.
        assert set(theirs["properties"]) <= set(mine["properties"]), name
        assert set(mine.get("required", [])) <= set(theirs.get("required", [])), name
    retry = ours["paths"][f"{_pipe('{org}', '{pipeline}')}/builds/{{number}}/retry"]["post"]
    assert retry["x-harmont-extension"] is True
    assert retry["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RetryBuildRequest"
    }


async def test_sdk_flow_creates_a_pipeline_and_a_build_and_reads_them_back(api: Api) -> None:
    """createOrganization -> createPipeline -> createBuild -> getBuild -> listJobs, with the
    paths, bodies and statuses Harmont's TypeScript SDK uses."""
    async with _client(api.app, api.token) as client:
        org = await client.post(f"{API}/organizations", json={"name": "Team"})
        pipeline = await client.post(
            f"{API}/organizations/team/pipelines",
            json={
                "name": "Site",
                "repository": "https://example.com/team/site",
                "default_branch": "main",
            },
        )
        build = await client.post(
            f"{_pipe('team', 'site')}/builds",
            content=json.dumps({"pipeline_ir": TINY, "branch": "main", "commit": "c0ffee"}),
            headers={"content-type": "application/json"},
        )
        number = build.json()["number"]
        got = await client.get(f"{_pipe('team', 'site')}/builds/{number}")
        jobs = await client.get(f"{_pipe('team', 'site')}/builds/{number}/jobs")
    assert [r.status_code for r in (org, pipeline, build, got, jobs)] == [201, 201, 201, 200, 200]
    assert got.json()["state"] == "scheduled"
    assert [(j["step_key"], j["state"]) for j in jobs.json()["data"]] == [("hello", "pending")]
