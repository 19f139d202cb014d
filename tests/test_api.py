"""The read API (SPEC §6) as a client sees it: the real ASGI app over httpx, reading a real
SQLite record filled by running real builds. Harmont conformance, semantics, auth, tenancy,
error envelopes, and the `harmont-exec token` commands (real processes)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from fastapi import FastAPI
from openapi_schema_validator import OAS30Validator, oas30_format_checker

import executor
from executor.api import create_app
from executor.store import Store, open_store

pytestmark = pytest.mark.anyio

API = "/api/v0"
PY = sys.executable
NOW = datetime.now(UTC)

# A build whose file order is not its plan order (report comes first in the file), with a
# retried job, a soft failure, raw non-UTF-8 output and a builds_in edge.
CI = {
    "steps": [
        {
            "key": "report",
            "label": "Report",
            "command": "echo report",
            "depends_on": ["flaky", "lint", "package"],
        },
        {"key": "deps", "command": "printf 'deps\\n'"},
        {
            "key": "flaky",
            "command": 'echo "attempt $HARMONT_ATTEMPT"; test "$HARMONT_ATTEMPT" -ge 2',
            "depends_on": "deps",
            "retry_policy": {
                "limit": 2,
                "exit_codes": [1],
                "backoff": {"initial_seconds": 0, "jitter": False},
            },
        },
        {"key": "lint", "command": "echo lint; exit 3", "soft_fail_policy": {"exit_codes": [3]}},
        {"key": "bytes", "command": "printf '\\377\\376raw\\n'", "depends_on": ["deps"]},
        {"key": "package", "command": "echo package", "builds_in": "bytes"},
    ]
}
CI_PREREQUISITES = {
    "report": {"flaky", "lint", "package"},
    "deps": set(),
    "flaky": {"deps"},
    "lint": set(),
    "bytes": {"deps"},
    "package": {"bytes"},
}
BROKEN = {
    "steps": [
        {"key": "compile", "command": "echo compiling; exit 7"},
        {"key": "test", "command": "echo never", "depends_on": "compile"},
    ]
}
TINY = {"steps": [{"key": "hello", "command": "echo hello"}]}

ERROR_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "invalid_request",
    422: "invalid_request",
    500: "server_error",
    503: "server_error",
}


# --- the record ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    db: Path
    store: Store
    app: FastAPI
    token: str  # sees every organization
    acme_token: str  # limited to organization acme
    empty_app: FastAPI  # over a store with no organization at all
    empty_token: str


def _run(path: Path, db: Path | str, org: str, pipeline: str, expected_exit: int) -> None:
    result = executor.run_build_sync(path, db=db, org=org, pipeline=pipeline)
    assert result.exit_status == expected_exit, result


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Record]:
    root = tmp_path_factory.mktemp("api")
    files = {}
    for name, spec in (("ci", CI), ("broken", BROKEN), ("tiny", TINY)):
        files[name] = root / f"{name}.json"
        files[name].write_text(json.dumps(spec))
    db = root / "db" / "harmont.db"
    for _ in range(3):
        _run(files["ci"], db, "acme", "ci", 0)
    _run(files["broken"], db, "acme", "broken", 1)
    _run(files["tiny"], db, "acme", "tiny", 0)
    _run(files["tiny"], db, "other", "ci", 0)
    with open_store(db) as store, open_store(root / "empty" / "harmont.db") as empty:
        _, token = store.create_token(
            description="all", organizations=None, expires_at=None, now=NOW
        )
        _, acme_token = store.create_token(
            description="acme", organizations=["acme"], expires_at=None, now=NOW
        )
        _, empty_token = empty.create_token(
            description="all", organizations=None, expires_at=None, now=NOW
        )
        yield Record(
            db=db,
            store=store,
            app=create_app(store=store),
            token=token,
            acme_token=acme_token,
            empty_app=create_app(store=empty),
            empty_token=empty_token,
        )


@asynccontextmanager
async def _client(app: FastAPI, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    with anyio.fail_after(30):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers
        ) as client:
            yield client


def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def _assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is Harmont's envelope with this status and code, its request id also in
    the x-request-id header; returns the envelope's ``error``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"type", "code", "message", "doc_url", "request_id"}, error
    assert all(isinstance(v, str) and v for v in error.values()), error
    assert error["code"] == code, error
    assert error["type"] == ERROR_TYPES[status], error
    assert error["doc_url"].endswith("#" + code), error
    assert response.headers["x-request-id"] == error["request_id"]
    return error  # type: ignore[no-any-return]


def _without_request_id(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    body = response.json()
    error = dict(body["error"])
    assert error.pop("request_id") == response.headers["x-request-id"]
    return response.status_code, {**body, "error": error}


def _pipe(org: str, pipeline: str) -> str:
    return f"{API}/organizations/{org}/pipelines/{pipeline}"


async def _jobs(client: httpx.AsyncClient, org: str, pipeline: str, number: int) -> list[Any]:
    jobs: list[Any] = _ok(await client.get(f"{_pipe(org, pipeline)}/builds/{number}/jobs"))["data"]
    return jobs


async def _job(client: httpx.AsyncClient, pipeline: str, number: int, key: str) -> dict[str, Any]:
    (job,) = [j for j in await _jobs(client, "acme", pipeline, number) if j["step_key"] == key]
    return job  # type: ignore[no-any-return]


async def _walk(client: httpx.AsyncClient, path: str, limit: int) -> list[Any]:
    """Every item of a paginated list, following next_cursor."""
    items: list[Any] = []
    cursor = None
    for _ in range(1000):
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        page = _ok(await client.get(path, params=params))
        assert len(page["data"]) <= limit
        items.extend(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items
        assert page["data"], "a page with a next_cursor must not be empty"
    raise AssertionError(f"{path}: next_cursor never ended")


# --- conformance to Harmont's OpenAPI document ---------------------------------------------


def _inline(node: Any, schemas: dict[str, Any]) -> Any:
    """The schema with every '#/components/schemas/X' reference replaced by X itself."""
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
    """Harmont's component schemas (conftest's ``harmont_openapi``)."""
    schemas: dict[str, Any] = harmont_openapi["components"]["schemas"]
    return schemas


def _conforms(harmont: dict[str, Any], name: str, body: Any) -> None:
    validator = OAS30Validator(_inline(harmont[name], harmont), format_checker=oas30_format_checker)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
    assert not errors, f"{name} does not conform to Harmont's schema: {errors}\n{body}"


async def _everything(client: httpx.AsyncClient) -> list[tuple[str, Any]]:
    """(Harmont schema name, body) for every list and object of the record."""
    seen: list[tuple[str, Any]] = []
    orgs = _ok(await client.get(f"{API}/organizations"))
    seen.append(("OrganizationList", orgs))
    seen.append(("CurrentUserResponse", _ok(await client.get(f"{API}/user"))))
    for org in orgs["data"]:
        seen.append(("Organization", org))
        seen.append(("Organization", _ok(await client.get(f"{API}/organizations/{org['slug']}"))))
        pipelines = _ok(await client.get(f"{API}/organizations/{org['slug']}/pipelines"))
        seen.append(("PipelineList", pipelines))
        for listed in pipelines["data"]:
            path = _pipe(org["slug"], listed["slug"])
            seen.append(("Pipeline", listed))
            seen.append(("Pipeline", _ok(await client.get(path))))
            builds = _ok(await client.get(f"{path}/builds"))
            seen.append(("BuildList", builds))
            for build in builds["data"]:
                seen.append(("Build", build))
                number = build["number"]
                seen.append(("Build", _ok(await client.get(f"{path}/builds/{number}"))))
                token = _ok(await client.get(f"{path}/builds/{number}/log-token"))
                seen.append(("LogTokenResponse", token))
                jobs = _ok(await client.get(f"{path}/builds/{number}/jobs"))
                seen.append(("JobList", jobs))
                for job in jobs["data"]:
                    seen.append(("Job", job))
                    one = await client.get(f"{path}/builds/{number}/jobs/{job['id']}")
                    seen.append(("Job", _ok(one)))
    return seen


async def test_api_every_object_conforms_to_harmont_schemas(
    record: Record, harmont: dict[str, Any]
) -> None:
    async with _client(record.app, record.token) as client:
        seen = await _everything(client)
    kinds = {name for name, _ in seen}
    assert kinds == {
        "OrganizationList",
        "CurrentUserResponse",
        "LogTokenResponse",
        "Organization",
        "PipelineList",
        "Pipeline",
        "BuildList",
        "Build",
        "JobList",
        "Job",
    }
    assert sum(name == "Build" for name, _ in seen) == 2 * 6
    for name, body in seen:
        _conforms(harmont, name, body)


async def test_api_objects_have_no_field_outside_harmont_schemas(
    record: Record, harmont: dict[str, Any]
) -> None:
    async with _client(record.app, record.token) as client:
        seen = await _everything(client)
    for name, body in seen:
        allowed = set(harmont[name]["properties"]) | ({"retries_count"} if name == "Job" else set())
        assert set(body) <= allowed, (name, set(body) - allowed)


async def test_api_job_has_exactly_harmont_job_fields_plus_retries_count(
    record: Record, harmont: dict[str, Any]
) -> None:
    expected = set(harmont["Job"]["properties"]) | {"retries_count"}
    async with _client(record.app, record.token) as client:
        jobs = await _jobs(client, "acme", "ci", 1)
        one = _ok(await client.get(f"{_pipe('acme', 'ci')}/builds/1/jobs/{jobs[0]['id']}"))
    assert len(jobs) == len(CI["steps"])
    for job in [*jobs, one]:
        assert set(job) == expected, set(job) ^ expected


async def test_api_build_has_exactly_harmont_build_fields(
    record: Record, harmont: dict[str, Any]
) -> None:
    expected = set(harmont["Build"]["properties"])
    async with _client(record.app, record.token) as client:
        builds = _ok(await client.get(f"{_pipe('acme', 'ci')}/builds"))["data"]
        one = _ok(await client.get(f"{_pipe('acme', 'broken')}/builds/1"))
    for build in [*builds, one]:
        assert set(build) == expected, set(build) ^ expected


async def test_api_error_responses_conform_to_harmont_error_schema(
    record: Record, harmont: dict[str, Any]
) -> None:
    async with _client(record.app, record.token) as client:
        responses = [
            (await client.get(f"{API}/organizations", headers={"Authorization": ""}), 401),
            (await client.get(f"{API}/organizations/ghost/pipelines"), 404),
            (await client.get(f"{_pipe('acme', 'ghost')}/builds"), 404),
            (await client.get(f"{_pipe('acme', 'ci')}/builds/99"), 404),
            (await client.get(f"{_pipe('acme', 'ci')}/builds/1/jobs/nope"), 404),
            (await client.get(f"{API}/nowhere"), 404),
            (await client.post(f"{API}/organizations/acme"), 405),
            (await client.get(f"{_pipe('acme', 'ci')}/builds/one"), 422),
            (await client.get(f"{_pipe('acme', 'ci')}/builds", params={"cursor": "x"}), 400),
        ]
    for response, status in responses:
        assert response.status_code == status, response.text
        _conforms(harmont, "Error", response.json())


# --- semantics -------------------------------------------------------------------------------


def test_api_job_list_from_text_is_exactly_the_typed_jobs_json(record: Record) -> None:
    """The job list skips parsing (``list_jobs_text``); it must say exactly what the typed
    path (``list_jobs`` + ``job_json``, used for a single job) says, for every job."""
    from executor.api import wire

    compared = 0
    for build in record.store.list_builds(limit=100):
        typed = [wire.job_json(j) for j in record.store.list_jobs(build.id)]
        text = [wire.job_json(j) for j in record.store.list_jobs_text(build.id)]
        assert text == typed
        compared += len(typed)
    assert compared > 10


async def test_api_jobs_listed_in_topological_order_with_prerequisite_ids(
    record: Record,
) -> None:
    async with _client(record.app, record.token) as client:
        jobs = await _jobs(client, "acme", "ci", 2)
    keys = [j["step_key"] for j in jobs]
    assert sorted(keys) == sorted(CI_PREREQUISITES)
    assert keys != [s["key"] for s in CI["steps"]], "plan order is not the file's order here"
    index = {j["id"]: i for i, j in enumerate(jobs)}
    id_of = {j["step_key"]: j["id"] for j in jobs}
    for i, job in enumerate(jobs):
        assert set(job["depends_on"]) == {id_of[k] for k in CI_PREREQUISITES[job["step_key"]]}
        assert len(job["depends_on"]) == len(set(job["depends_on"]))
        assert all(index[p] < i for p in job["depends_on"]), keys
    assert jobs[-1]["step_key"] == "report"
    assert jobs[-1]["name"] == "Report"


async def test_api_soft_failed_job_is_failed_with_its_exit_code(record: Record) -> None:
    async with _client(record.app, record.token) as client:
        lint = await _job(client, "ci", 1, "lint")
        build = _ok(await client.get(f"{_pipe('acme', 'ci')}/builds/1"))
    assert (lint["state"], lint["soft_failed"], lint["exit_code"]) == ("failed", True, 3)
    assert lint["soft_fail_policy"] is not None
    assert build["state"] == "passed"


async def test_api_retried_job_counts_retries_and_lists_every_attempt(record: Record) -> None:
    async with _client(record.app, record.token) as client:
        flaky = await _job(client, "ci", 3, "flaky")
        path = f"{_pipe('acme', 'ci')}/builds/3/jobs/{flaky['id']}"
        attempts = _ok(await client.get(f"{path}/attempts"))["data"]
        log = await client.get(f"{path}/log")
    assert (flaky["state"], flaky["exit_code"], flaky["retries_count"]) == ("passed", 0, 1)
    assert flaky["retry_policy"]["limit"] == 2
    assert [a["number"] for a in attempts] == [1, 2]
    assert [a["exit_code"] for a in attempts] == [1, 0]
    assert all(a["started_at"] and a["finished_at"] for a in attempts)
    assert attempts[0]["finished_at"] <= attempts[1]["started_at"]
    assert log.content == b"attempt 1\nattempt 2\n"


async def test_api_failed_job_has_exit_code_and_its_dependent_is_skipped(
    record: Record,
) -> None:
    async with _client(record.app, record.token) as client:
        compile_ = await _job(client, "broken", 1, "compile")
        test = await _job(client, "broken", 1, "test")
        build = _ok(await client.get(f"{_pipe('acme', 'broken')}/builds/1"))
    assert (compile_["state"], compile_["exit_code"], compile_["soft_failed"]) == (
        "failed",
        7,
        False,
    )
    assert compile_["finished_at"] is not None
    assert (test["state"], test["error_code"], test["exit_code"]) == (
        "skipped",
        "dependency_failed",
        None,
    )
    assert test["depends_on"] == [compile_["id"]]
    assert build["state"] == "failed"


async def test_api_builds_newest_first(record: Record) -> None:
    async with _client(record.app, record.token) as client:
        page = _ok(await client.get(f"{_pipe('acme', 'ci')}/builds"))
    assert [b["number"] for b in page["data"]] == [3, 2, 1]
    assert {b["pipeline_slug"] for b in page["data"]} == {"ci"}
    assert page["next_cursor"] is None


async def test_api_builds_pages_of_one_walk_every_build_once(record: Record) -> None:
    async with _client(record.app, record.token) as client:
        builds = await _walk(client, f"{_pipe('acme', 'ci')}/builds", limit=1)
    assert [b["number"] for b in builds] == [3, 2, 1]


async def test_api_pipelines_and_organizations_pages_of_one_walk_each_once(
    record: Record,
) -> None:
    async with _client(record.app, record.token) as client:
        pipelines = await _walk(client, f"{API}/organizations/acme/pipelines", limit=1)
        orgs = await _walk(client, f"{API}/organizations", limit=1)
    assert [p["slug"] for p in pipelines] == ["broken", "ci", "tiny"]
    assert [o["slug"] for o in orgs] == ["acme", "local", "other"]  # every store has local


@pytest.mark.parametrize(("limit", "count"), [(0, 1), (-5, 1), (1, 1), (2, 2), (1000, 3)])
async def test_api_limit_out_of_range_is_clamped(record: Record, limit: int, count: int) -> None:
    async with _client(record.app, record.token) as client:
        page = _ok(await client.get(f"{_pipe('acme', 'ci')}/builds", params={"limit": limit}))
    assert len(page["data"]) == count
    assert (page["next_cursor"] is None) == (count == 3)


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, str, str]]:
    """A store (written through its own API) with 101 builds of one pipeline, and a job of
    the last one with 200 log chunks: more than a page of builds and of log rows."""
    plan = executor.plan_build_text(json.dumps(TINY))
    with open_store(tmp_path_factory.mktemp("many") / "harmont.db") as store:
        for _ in range(101):
            created = store.create_build(
                org="acme", pipeline="many", plan=plan, build_file=None, working_dir="/", now=NOW
            )
        job_id = created.job_ids["hello"]
        for i in range(200):
            store.append_log(job_id, 1, "stdout", b"%d\xff\n" % i, at=NOW)
        store.flush()
        _, token = store.create_token(
            description=None, organizations=None, expires_at=None, now=NOW
        )
        yield create_app(store=store), token, job_id


async def test_api_limit_above_100_gives_100(many: tuple[FastAPI, str, str]) -> None:
    app, token, _ = many
    async with _client(app, token) as client:
        page = _ok(await client.get(f"{_pipe('acme', 'many')}/builds", params={"limit": 1000}))
        default = _ok(await client.get(f"{_pipe('acme', 'many')}/builds"))
        rest = await client.get(
            f"{_pipe('acme', 'many')}/builds", params={"limit": 100, "cursor": page["next_cursor"]}
        )
    assert [b["number"] for b in page["data"]] == list(range(101, 1, -1))
    assert len(default["data"]) == 50
    assert [b["number"] for b in _ok(rest)["data"]] == [1]
    assert _ok(rest)["next_cursor"] is None


async def test_api_log_of_many_chunks_is_every_byte_in_order(
    many: tuple[FastAPI, str, str],
) -> None:
    app, token, job_id = many
    async with _client(app, token) as client:
        log = await client.get(f"{_pipe('acme', 'many')}/builds/101/jobs/{job_id}/log")
    assert log.status_code == 200
    assert log.content == b"".join(b"%d\xff\n" % i for i in range(200))


async def test_api_log_is_the_jobs_raw_bytes_as_text_plain(record: Record) -> None:
    async with _client(record.app, record.token) as client:
        job = await _job(client, "ci", 1, "bytes")
        log = await client.get(f"{_pipe('acme', 'ci')}/builds/1/jobs/{job['id']}/log")
    assert log.status_code == 200
    assert log.content == b"\xff\xferaw\n"
    assert log.headers["content-type"].split(";")[0].strip() == "text/plain"
    assert log.headers["x-request-id"].startswith("req_")


# --- auth ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unusable(record: Record) -> dict[str, str]:
    """Secrets of a revoked token and of an expired one, made through the store's API."""
    _, expired = record.store.create_token(
        description="expired",
        organizations=None,
        expires_at=NOW - timedelta(days=1),
        now=NOW - timedelta(days=2),
    )
    row, revoked = record.store.create_token(
        description="revoked", organizations=None, expires_at=None, now=NOW
    )
    assert record.store.revoke_token(row.id, now=NOW) is not None
    return {"expired": expired, "revoked": revoked}


def _authorization(case: str, record: Record, unusable: dict[str, str]) -> dict[str, str]:
    unknown = "hm_" + "A" * 43
    return {
        "none": {},
        "empty": {"Authorization": ""},
        "no secret": {"Authorization": "Bearer"},
        "other scheme": {"Authorization": f"Token {record.token}"},
        "lowercase scheme": {"Authorization": f"bearer {record.token}"},
        "not a token": {"Authorization": "Bearer " + record.token.removeprefix("hm_")},
        "unknown": {"Authorization": f"Bearer {unknown}"},
        "expired": {"Authorization": f"Bearer {unusable['expired']}"},
        "revoked": {"Authorization": f"Bearer {unusable['revoked']}"},
    }[case]


@pytest.mark.parametrize(
    "case",
    [
        "none",
        "empty",
        "no secret",
        "other scheme",
        "lowercase scheme",
        "not a token",
        "unknown",
        "expired",
        "revoked",
    ],
)
async def test_api_unusable_authorization_is_401(
    record: Record, unusable: dict[str, str], case: str
) -> None:
    headers = _authorization(case, record, unusable)
    async with _client(record.app) as client:
        orgs = await client.get(f"{API}/organizations", headers=headers)
        job = await client.get(f"{_pipe('acme', 'ci')}/builds/1/jobs", headers=headers)
    for response in (orgs, job):
        _assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"


async def test_api_valid_token_is_accepted(record: Record) -> None:
    async with _client(record.app) as client:
        response = await client.get(
            f"{API}/organizations", headers={"Authorization": f"Bearer {record.token}"}
        )
    assert [o["slug"] for o in _ok(response)["data"]] == ["acme", "local", "other"]


async def test_api_ping_and_openapi_need_no_token(record: Record) -> None:
    async with _client(record.app) as client:
        ping = await client.get(f"{API}/ping")
        document = await client.get(f"{API}/openapi.json")
    assert _ok(ping) == {"status": "ok"}
    assert ping.headers["x-request-id"].startswith("req_")
    paths = _ok(document)["paths"]
    assert f"{API}/organizations/{{org}}/pipelines/{{pipeline}}/builds" in paths


# --- tenancy ---------------------------------------------------------------------------------


async def test_api_token_limited_to_an_org_lists_only_it(record: Record) -> None:
    async with _client(record.app, record.acme_token) as client:
        orgs = _ok(await client.get(f"{API}/organizations"))
        mine = _ok(await client.get(f"{API}/organizations/acme/pipelines"))
    assert [o["slug"] for o in orgs["data"]] == ["acme"]
    assert [p["slug"] for p in mine["data"]] == ["broken", "ci", "tiny"]


async def _other_org_paths(record: Record) -> list[tuple[str, str | None]]:
    """(path to a real thing of org 'other', path to a missing thing of org 'other')."""
    async with _client(record.app, record.token) as client:
        (job,) = await _jobs(client, "other", "ci", 1)
    real = f"{_pipe('other', 'ci')}/builds/1/jobs/{job['id']}"
    missing = f"{_pipe('other', 'ci')}/builds/1/jobs/{'0' * 8}-0000-4000-8000-{'0' * 12}"
    return [
        (f"{API}/organizations/other/pipelines", None),
        (_pipe("other", "ci"), _pipe("other", "ghost")),
        (f"{_pipe('other', 'ci')}/builds", f"{_pipe('other', 'ghost')}/builds"),
        (f"{_pipe('other', 'ci')}/builds/1", f"{_pipe('other', 'ci')}/builds/2"),
        (f"{_pipe('other', 'ci')}/builds/1/jobs", f"{_pipe('other', 'ci')}/builds/9/jobs"),
        (real, missing),
        (f"{real}/attempts", f"{missing}/attempts"),
        (f"{real}/log", f"{missing}/log"),
    ]


async def test_api_other_orgs_things_are_404_as_if_missing(record: Record) -> None:
    pairs = await _other_org_paths(record)
    async with (
        _client(record.app, record.acme_token) as limited,
        _client(record.app, record.token) as full,
        _client(record.empty_app, record.empty_token) as nowhere,
    ):
        for real, missing in pairs:
            assert (await full.get(real)).status_code == 200, real  # it does exist
            hidden = await limited.get(real)
            _assert_error(hidden, 404, "organization_not_found")
            expected = _without_request_id(hidden)
            # The same path where nothing exists, and a missing thing of the hidden org.
            assert _without_request_id(await nowhere.get(real)) == expected, real
            if missing is not None:
                assert _without_request_id(await limited.get(missing)) == expected, missing
                assert _without_request_id(await nowhere.get(missing)) == expected, missing


async def test_api_missing_things_in_a_visible_org_are_their_404(record: Record) -> None:
    async with _client(record.app, record.acme_token) as client:
        ghost_org = await client.get(f"{API}/organizations/ghost/pipelines")
        pipeline = await client.get(_pipe("acme", "ghost"))
        builds = await client.get(f"{_pipe('acme', 'ghost')}/builds")
        build = await client.get(f"{_pipe('acme', 'ci')}/builds/4")
        zero = await client.get(f"{_pipe('acme', 'ci')}/builds/0")
        negative = await client.get(f"{_pipe('acme', 'ci')}/builds/-1")
    _assert_error(ghost_org, 404, "organization_not_found")
    _assert_error(pipeline, 404, "pipeline_not_found")
    _assert_error(builds, 404, "pipeline_not_found")
    _assert_error(build, 404, "build_not_found")
    _assert_error(zero, 404, "build_not_found")
    _assert_error(negative, 404, "build_not_found")


async def test_api_job_of_another_build_or_malformed_id_is_job_not_found(
    record: Record,
) -> None:
    async with _client(record.app, record.token) as client:
        of_build_1 = (await _jobs(client, "acme", "ci", 1))[0]["id"]
        (of_other_org,) = await _jobs(client, "other", "ci", 1)
        path = f"{_pipe('acme', 'ci')}/builds/2/jobs"
        responses = [
            await client.get(f"{path}/{of_build_1}"),
            await client.get(f"{path}/{of_build_1}/attempts"),
            await client.get(f"{path}/{of_build_1}/log"),
            await client.get(f"{path}/{of_other_org['id']}"),
            await client.get(f"{path}/not-a-uuid"),
            await client.get(f"{path}/{of_build_1[:8]}"),  # a prefix is not an id here
            await client.get(f"{path}/{of_build_1.replace('-', '')}"),
        ]
    for response in responses:
        _assert_error(response, 404, "job_not_found")


# --- errors ----------------------------------------------------------------------------------


async def test_api_unknown_route_is_not_found_envelope(record: Record) -> None:
    async with _client(record.app, record.token) as client:
        for path in (f"{API}/nowhere", "/nowhere", f"{_pipe('acme', 'ci')}/builds/1/nope"):
            _assert_error(await client.get(path), 404, "not_found")


async def test_api_post_is_method_not_allowed(record: Record) -> None:
    async with _client(record.app, record.token) as client:
        for path in (f"{API}/ping", f"{API}/organizations/acme", f"{_pipe('acme', 'ci')}/builds/1"):
            _assert_error(await client.post(path, json={}), 405, "method_not_allowed")


async def test_api_wrong_typed_path_or_query_value_is_422(record: Record) -> None:
    async with _client(record.app, record.token) as client:
        number = await client.get(f"{_pipe('acme', 'ci')}/builds/latest")
        limit = await client.get(f"{_pipe('acme', 'ci')}/builds", params={"limit": "ten"})
    assert "latest" in _assert_error(number, 422, "invalid_request")["message"]
    assert "ten" in _assert_error(limit, 422, "invalid_request")["message"]


async def test_api_huge_build_number_is_build_not_found(record: Record) -> None:
    async with _client(record.app, record.token) as client:
        response = await client.get(f"{_pipe('acme', 'ci')}/builds/{10**30}/jobs")
    _assert_error(response, 404, "build_not_found")


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


BUILDS = f"{API}/organizations/acme/pipelines/ci/builds"
PIPELINES = f"{API}/organizations/acme/pipelines"
ORGANIZATIONS = f"{API}/organizations"
# name: (list the cursor is sent to, the cursor made from real next_cursors of the three lists).
Cursors = dict[str, str]
BAD_CURSORS: dict[str, tuple[str, Callable[[Cursors], str]]] = {
    "empty": (BUILDS, lambda c: ""),
    "garbage": (BUILDS, lambda c: "garbage!"),
    "non-ascii": (BUILDS, lambda c: "é"),
    "one character": (BUILDS, lambda c: "a"),
    "first character changed": (BUILDS, lambda c: "A" + c["builds"][1:]),
    "truncated": (BUILDS, lambda c: c["builds"][:-5]),
    "extended": (BUILDS, lambda c: c["builds"] + "xyz"),
    "pipelines cursor on builds": (BUILDS, lambda c: c["pipelines"]),
    "organizations cursor on builds": (BUILDS, lambda c: c["organizations"]),
    "builds cursor on pipelines": (PIPELINES, lambda c: c["builds"]),
    "pipelines cursor on organizations": (ORGANIZATIONS, lambda c: c["pipelines"]),
    "json list": (BUILDS, lambda c: _b64("[1, 2]")),
    "string key on builds": (BUILDS, lambda c: _b64('{"v": 1, "k": "builds", "a": "2"}')),
    "boolean key on builds": (BUILDS, lambda c: _b64('{"v": 1, "k": "builds", "a": true}')),
    "other version": (BUILDS, lambda c: _b64('{"v": 2, "k": "builds", "a": 2}')),
    "integer key on pipelines": (PIPELINES, lambda c: _b64('{"v": 1, "k": "pipelines", "a": 3}')),
    "huge integer key on builds": (
        BUILDS,
        lambda c: _b64('{"v": 1, "k": "builds", "a": 1%s}' % ("0" * 30)),
    ),
    "lone surrogate key on pipelines": (
        PIPELINES,
        lambda c: _b64('{"v": 1, "k": "pipelines", "a": "\\ud800"}'),
    ),
}


@pytest.mark.parametrize("case", list(BAD_CURSORS))
async def test_api_invalid_cursor_is_400_invalid_cursor(record: Record, case: str) -> None:
    path, template = BAD_CURSORS[case]
    async with _client(record.app, record.token) as client:
        real = {
            name: _ok(await client.get(listed, params={"limit": 1}))["next_cursor"]
            for name, listed in (
                ("builds", BUILDS),
                ("pipelines", PIPELINES),
                ("organizations", ORGANIZATIONS),
            )
        }
        assert all(real.values()), real
        assert real["builds"][0] != "A"
        assert _ok(await client.get(BUILDS, params={"cursor": real["builds"]}))["data"]
        cursor = template(real)
        response = await client.get(path, params={"cursor": cursor})
    assert response.status_code != 500, (cursor, response.text)
    _assert_error(response, 400, "invalid_cursor")


async def test_api_app_closes_its_own_store_on_shutdown(tmp_path: Path) -> None:
    db = tmp_path / "own.db"
    with open_store(db) as store:
        _, token = store.create_token(
            description=None, organizations=None, expires_at=None, now=NOW
        )

    def open_files() -> list[str]:
        """This process's open files of the store (the database, its WAL and shm)."""
        names = []
        for fd in Path("/proc/self/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(db)):
                names.append(target)
        return names

    assert open_files() == []
    app = create_app(db)
    shutdown = anyio.Event()
    sent: list[str] = []
    started = anyio.Event()

    async def receive() -> dict[str, Any]:
        if not sent:
            return {"type": "lifespan.startup"}
        await shutdown.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        started.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope, receive, send)
            await started.wait()
            assert sent == ["lifespan.startup.complete"]
            async with _client(app, token) as client:
                organizations = _ok(await client.get(f"{API}/organizations"))
                assert [o["slug"] for o in organizations["data"]] == ["local"]
            assert open_files(), "the app reads its own store"
            shutdown.set()
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert open_files() == [], "the app's own store is still open after shutdown"


# --- harmont-exec token ----------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "executor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_cli_token_create_list_revoke(record: Record) -> None:
    db = str(record.db)
    created = _cli(
        "token", "create", "--db", db, "--org", "acme", "--description", "d", "--expires-in", "1"
    )
    assert created.returncode == 0, created.stderr
    assert re.fullmatch(r"hm_[A-Za-z0-9_-]{43}\n", created.stdout), created.stdout
    secret = created.stdout.strip()
    token_id = re.search(r"token ([0-9a-f-]{36})", created.stderr)
    assert token_id, created.stderr
    token_id_s = token_id.group(1)

    async with _client(record.app, secret) as client:
        orgs = _ok(await client.get(f"{API}/organizations"))
    assert [o["slug"] for o in orgs["data"]] == ["acme"]

    listed = _cli("token", "list", "--db", db)
    assert listed.returncode == 0, listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if token_id_s in line]
    assert "acme" in line and "active" in line and " d " in line
    assert secret not in listed.stdout + listed.stderr
    assert secret[3:20] not in listed.stdout

    revoked = _cli("token", "revoke", token_id_s, "--db", db)
    assert revoked.returncode == 0, revoked.stderr
    assert token_id_s in revoked.stdout
    async with _client(record.app, secret) as client:
        _assert_error(await client.get(f"{API}/organizations"), 401, "unauthorized")
    relisted = _cli("token", "list", "--db", db)
    (line,) = [line for line in relisted.stdout.splitlines() if token_id_s in line]
    assert "revoked" in line


def test_cli_token_revoke_unknown_id_exits_2(tmp_path: Path) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"
    result = _cli("token", "revoke", unknown, "--db", str(tmp_path / "harmont.db"))
    assert result.returncode == 2, result
    assert unknown in result.stderr
    assert result.stdout == ""


def test_cli_token_store_keeps_only_the_sha256(tmp_path: Path) -> None:
    db = tmp_path / "harmont.db"
    created = _cli("token", "create", "--db", str(db), "--description", "d")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("hm_")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        rows = connection.execute("SELECT * FROM api_tokens").fetchall()
        (digest,) = connection.execute("SELECT token_sha256 FROM api_tokens").fetchone()
    connection.close()
    assert len(rows) == 1
    assert digest == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret in str(value) for value in rows[0])
    files = [p for p in tmp_path.iterdir() if p.name.startswith("harmont.db")]
    assert files
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


@contextmanager
def _tiny_record(tmp_path: Path, db: Path | str) -> Iterator[tuple[Store, str]]:
    """The TINY build run into ``db`` as acme/tiny #1, the store open, and a token for it."""
    build = tmp_path / "b.json"
    build.write_text(json.dumps(TINY))
    _run(build, db, "acme", "tiny", 0)
    with open_store(db) as store:
        _, token = store.create_token(
            description=None, organizations=None, expires_at=None, now=NOW
        )
        yield store, token


def test_api_a_store_that_fails_is_a_503_envelope_saying_retry(tmp_path: Path) -> None:
    """The record cannot be read (a table lost behind its back; a PostgreSQL server that is
    down): 503 store_unavailable with Retry-After, no store address in it; other routes still
    work."""
    db = tmp_path / "harmont.db"
    with _tiny_record(tmp_path, db) as (store, token):
        with sqlite3.connect(db) as raw:
            raw.execute("DROP TABLE job_dependencies")

        async def check() -> None:
            async with _client(create_app(store=store), token) as client:
                base = "/api/v0/organizations/acme/pipelines/tiny/builds/1"
                response = await client.get(f"{base}/jobs")
                error = _assert_error(response, 503, "store_unavailable")
                assert response.headers["retry-after"] == "5"
                assert error["request_id"] in error["message"]  # to find it in the log
                assert str(tmp_path) not in error["message"]
                assert (await client.get(base)).status_code == 200

        anyio.run(check)


def test_api_an_unexpected_failure_is_a_500_envelope_with_the_request_id(
    tmp_path: Path,
) -> None:
    """A record this code cannot read (a job in a state it does not know): the client gets the
    envelope, never a bare page, and the request id to report; other routes still work."""
    db = tmp_path / "harmont.db"
    with _tiny_record(tmp_path, db) as (store, token):
        build_row = store.get_build(1)
        assert build_row is not None
        job_id = store.list_jobs(build_row.id)[0].id
        with sqlite3.connect(db) as raw:
            raw.execute("UPDATE jobs SET state = 'bogus' WHERE id = ?", (job_id,))

        async def check() -> None:
            async with _client(create_app(store=store), token) as client:
                base = "/api/v0/organizations/acme/pipelines/tiny/builds/1"
                response = await client.get(f"{base}/jobs/{job_id}")
                error = _assert_error(response, 500, "internal_error")
                assert error["request_id"] in error["message"]  # what to report
                assert (await client.get(base)).status_code == 200

        anyio.run(check)


def test_api_reconnects_after_the_postgresql_server_dropped_its_connections(
    tmp_path: Path, postgresql_url: str, postgresql_server: str
) -> None:
    """The server ends every harmont-exec connection (as a restart does): requests answered
    with a dead connection are 503 store_unavailable, and the next ones reconnect."""
    with _tiny_record(tmp_path, postgresql_url) as (store, token):

        async def check() -> None:
            async with _client(create_app(store=store), token) as client:
                base = "/api/v0/organizations/acme/pipelines/tiny/builds/1"
                assert (await client.get(base)).status_code == 200  # connected
                with psycopg.connect(postgresql_server, autocommit=True) as admin:
                    ended = admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'harmont-exec' AND pid <> pg_backend_pid()"
                    ).fetchall()
                assert ended and all(row[0] for row in ended)
                unavailable = 0
                for _ in range(100):  # each worker thread finds its connection dead once
                    response = await client.get(base)
                    if response.status_code == 200:
                        break
                    _assert_error(response, 503, "store_unavailable")
                    unavailable += 1
                assert response.status_code == 200, response.text
                assert unavailable >= 1
                assert _ok(await client.get(f"{base}/jobs"))["data"]

        anyio.run(check)
