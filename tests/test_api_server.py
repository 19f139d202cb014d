"""The read API as a user meets it: `harmont-exec serve` as a real server process over a store
that a real `harmont-exec run` process is writing, and the ASGI app fuzzed by schemathesis
against the OpenAPI document it serves itself (SPEC §6)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from serving import (
    TIMEOUT_S,
    Server,
    cli,
    create_token,
    log_token_for,
    mint_token,
    output,
    poll,
    server,
    start,
    stop,
)

from executor.api import API_PREFIX, create_app
from executor.store import open_store

__all__ = ["server"]  # a fixture, used here

# --- end to end: serve while another process runs a build -------------------------------------


NOT_YET = ("organization_not_found", "pipeline_not_found")
BLOCKING_BUILD = """\
steps:
  - {key: first, command: echo first-output}
  - {key: middle, command: 'while [ ! -e go ]; do sleep 0.05; done', depends_on: first}
  - {key: last, command: 'true', depends_on: middle}
"""


def test_api_server_shows_a_build_live_while_another_process_runs_it(
    server: Server, tmp_path: Path
) -> None:
    secret = create_token(server.db, tmp_path)  # after the server started: it must see it
    (tmp_path / "build.yaml").write_text(BLOCKING_BUILD)
    out = tmp_path / "run"
    run = start(["run", "build.yaml", "--db", str(server.db)], tmp_path, out)
    builds = f"{server.url}/organizations/local/pipelines/build/builds"
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {secret}"}, timeout=30) as client:

            def get(url: str) -> Any:
                response = client.get(url)
                assert response.status_code == 200, response.text
                assert response.headers["x-request-id"].startswith("req_")
                return response.json()

            def middle_running() -> list[dict[str, Any]] | None:
                response = client.get(builds)
                if response.status_code == 404:  # the run has not recorded its pipeline yet
                    assert response.json()["error"]["code"] in NOT_YET, response.text
                    return None
                assert response.status_code == 200, response.text
                if not response.json()["data"]:
                    return None  # nor its build
                jobs: list[dict[str, Any]] = get(f"{builds}/1/jobs")["data"]
                states = {j["step_key"]: j["state"] for j in jobs}
                return jobs if states.get("middle") == "running" else None

            jobs = poll(
                middle_running, "job 'middle' running", (run, out), (server.proc, server.out)
            )
            first, middle, last = jobs  # topological order
            assert [j["step_key"] for j in jobs] == ["first", "middle", "last"]
            assert (first["state"], first["exit_code"]) == ("passed", 0)
            assert middle["started_at"] is not None and middle["finished_at"] is None
            assert middle["exit_code"] is None
            assert last["state"] == "pending"
            assert get(f"{builds}/1")["state"] == "running"
            assert get(f"{builds}/1/jobs/{middle['id']}")["state"] == "running"
            assert [b["state"] for b in get(builds)["data"]] == ["running"]
            assert run.poll() is None  # the other process is still running it

            (tmp_path / "go").touch()

            def finished() -> dict[str, Any] | None:
                exited = run.poll() is not None  # before the read: an exited run committed all
                build: dict[str, Any] = get(f"{builds}/1")
                if build["state"] in ("scheduled", "running"):
                    assert not exited, f"the run exited, the build is {build}" + output(out)
                    return None
                return build

            build = poll(finished, "the build to finish", (server.proc, server.out))
            assert build["state"] == "passed", build
            assert build["finished_at"] is not None
            jobs = get(f"{builds}/1/jobs")["data"]
            assert [(j["step_key"], j["state"], j["exit_code"]) for j in jobs] == [
                ("first", "passed", 0),
                ("middle", "passed", 0),
                ("last", "passed", 0),
            ]
            log = client.get(f"{builds}/1/jobs/{first['id']}/log")
            assert log.status_code == 200 and log.text == "first-output\n"
            assert run.wait(timeout=TIMEOUT_S) == 0, output(out)
    finally:
        (tmp_path / "go").touch()  # lets the job end even if the test failed before
        stop(run)


def test_api_server_answers_a_request_without_token_with_the_401_envelope(
    server: Server,
) -> None:
    response = httpx.get(f"{server.url}/organizations", timeout=30)
    assert response.status_code == 401
    request_id = response.headers["x-request-id"]
    assert request_id.startswith("req_")
    error = response.json()["error"]
    assert (error["type"], error["code"], error["request_id"]) == (
        "unauthorized",
        "unauthorized",
        request_id,
    )


def test_api_server_answers_an_unsupported_method_with_405_and_allow(server: Server) -> None:
    # RFC 9110 §15.5.6: a 405 MUST carry Allow (schemathesis's unsupported_method check too).
    response = httpx.post(f"{server.url}/ping", timeout=30)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]
    assert response.headers.get("allow") == "GET, HEAD"  # every GET route answers HEAD too


# --- schemathesis against the app's own OpenAPI document --------------------------------------


PASSING = """\
steps:
  - {key: compile, command: 'echo compiled > compiled.txt', artifact_paths: ['*.txt']}
  - key: flaky
    command: 'echo "attempt $HARMONT_ATTEMPT"; test "$HARMONT_ATTEMPT" -ge 2'
    retry_policy: {limit: 2, exit_codes: [1], backoff: {initial_seconds: 0}}
  - {key: lint, command: 'echo warned >&2; exit 3', soft_fail_policy: true, depends_on: compile}
  - wait
  - {key: summary, command: echo done}
"""
FAILING = """\
steps:
  - {key: broken, command: 'echo boom >&2; exit 2'}
  - {key: after, command: 'true', depends_on: broken}
"""
OPERATIONS = [
    f"{API_PREFIX}{path}"
    for path in (
        "/ping",
        "/organizations",
        "/organizations/{org}",
        "/user",
        "/user/api-tokens",
        "/organizations/{org}/pipelines",
        "/organizations/{org}/pipelines/{pipeline}",
        "/organizations/{org}/pipelines/{pipeline}/builds",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}/jobs",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}/jobs/{job_id}",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}/jobs/{job_id}/attempts",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}/jobs/{job_id}/log",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}/jobs/{job_id}/artifacts",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}/artifacts",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}/artifacts/{artifact_id}/download",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}/log-token",
    )
] + [
    "/v0/builds/{build_id}/events",  # the build's live changes, beside Harmont's log stream
    "/v0/jobs/{job_id}/logs",  # Harmont's live log stream is outside /api
]
LIVE_STREAMS = ("/v0/builds/{build_id}/events", "/v0/jobs/{job_id}/logs")
"""Authorised by a log token in the query, refused with Harmont's flat bodies."""
# /ping, /user and its token list have no parameter to make invalid: no negative case exists.
CASES = [(path, GenerationMode.POSITIVE) for path in OPERATIONS] + [
    (path, GenerationMode.NEGATIVE)
    for path in OPERATIONS
    if path not in (f"{API_PREFIX}/ping", f"{API_PREFIX}/user", f"{API_PREFIX}/user/api-tokens")
]


@dataclass(frozen=True)
class Record:
    db: Path
    config: SchemathesisConfig


async def _first_page_of_pipelines(db: Path, secret: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_app(db=db))  # runs no lifespan: store left open
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.get(
            f"{API_PREFIX}/organizations/local/pipelines",
            params={"limit": 1},
            headers={"Authorization": f"Bearer {secret}"},
        )


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Record:
    """A store with two real builds (one passed with a retry and a soft failure, one failed
    with a skip) and a real token, and schemathesis's settings for it: the token, and path
    parameters drawn mostly from the real records (so that requests reach them), otherwise
    generated."""
    work = tmp_path_factory.mktemp("fuzz")
    db = work / "harmont.db"
    for name, text, status in (("ci", PASSING, 0), ("broken", FAILING, 1)):
        (work / f"{name}.yaml").write_text(text)
        result = cli("run", f"{name}.yaml", "--db", str(db), cwd=work)
        assert result.returncode == status, result.stdout + result.stderr
    secret = mint_token(db)
    with open_store(db) as store:
        job_ids = [
            job.id
            for pipeline in ("ci", "broken")
            for job in store.list_jobs(store.get_build(1, org="local", pipeline=pipeline).id)  # type: ignore[union-attr]
        ]
        ci = store.get_build(1, org="local", pipeline="ci")
        assert ci is not None
        artifact_ids = [a.id for a in store.list_artifacts(build_id=ci.id)]
        assert artifact_ids, "the ci build collects an artifact"
        # A log token for build ci #1: streams of its (finished) jobs end with `done`.
        log_token = log_token_for(store, ci.id)
    first = anyio.run(_first_page_of_pipelines, db, secret)
    cursor = first.json()["next_cursor"]
    assert cursor is not None, first.text  # a real cursor, so that some pages are not the first

    def drawn(name: str, probability: float) -> dict[str, Any]:
        return {"dictionary": name, "probability": probability}

    config = SchemathesisConfig.from_dict(
        {
            "auth": {"openapi": {"HTTPBearer": {"bearer": secret}}},
            "dictionaries": {
                "org": {"values": ["local"]},
                "pipeline": {"values": ["ci", "broken"]},
                "number": {"values": [1]},
                "job_id": {"values": job_ids},
                "cursor": {"values": [cursor]},
                "artifact_id": {"values": artifact_ids},
                "log_token": {"values": [log_token]},
            },
            "parameters": {
                "path.org": drawn("org", 0.8),
                "path.pipeline": drawn("pipeline", 0.8),
                "path.number": drawn("number", 0.8),
                "path.job_id": drawn("job_id", 0.8),
                "query.cursor": drawn("cursor", 0.3),
                "path.artifact_id": drawn("artifact_id", 0.8),
                "query.token": drawn("log_token", 1.0),
            },
            "checks": {
                # A cursor is opaque: the schema can only say "string", so a schema-valid but
                # made-up cursor is rightly a 400 invalid_cursor (documented on the lists).
                # 400 is accepted here; _check_extra holds it to exactly that case.
                "positive_data_acceptance": {"expected-statuses": [200, 400, 404]},
            },
            # The live log stream answers a job outside the token's build (any schema-valid
            # job id but the build's own) with Harmont's 403 log_stream_forbidden.
            "operations": [
                {
                    "include-path": path,
                    "checks": {"positive_data_acceptance": {"expected-statuses": [200, 403]}},
                }
                for path in LIVE_STREAMS
            ],
        }
    )
    return Record(db, config)


@pytest.fixture
def api_schema(record: Record) -> Any:
    """The app's own OpenAPI document, loaded by schemathesis from a fresh ASGI app (one per
    test: schemathesis ends the app's lifespan, which closes its store, after each test)."""
    app = create_app(db=record.db)
    return schemathesis.openapi.from_asgi(f"{API_PREFIX}/openapi.json", app, config=record.config)


def _header(response: Any, name: str) -> str:
    value = response.headers.get(name, "")
    return value[0] if isinstance(value, list) else str(value)  # schemathesis: lists of values


def _check_extra(case: Any, response: Any) -> None:
    """What the schema cannot say: every response has a request id, a 400 is only ever a
    cursor this server did not hand out, and an error's request id is the header's."""
    request_id = _header(response, "x-request-id")
    assert request_id.startswith("req_"), response.headers
    if case.path in LIVE_STREAMS and response.status_code in (401, 403):
        body = response.json()  # Harmont's flat body, not the envelope
        assert set(body) == {"code", "message"}, body
        assert (
            body["code"]
            == {401: "log_stream_unauthorized", 403: "log_stream_forbidden"}[response.status_code]
        )
        return
    if response.status_code >= 400:
        assert response.json()["error"]["request_id"] == request_id
    if response.status_code == 400:
        assert "cursor" in (case.query or {}), response.text
        assert response.json()["error"]["code"] == "invalid_cursor", response.text


def test_api_openapi_document_lists_exactly_the_fuzzed_operations(api_schema: Any) -> None:
    # A new read must be added to OPERATIONS, so that it is fuzzed below. The writes are not
    # fuzzed here (they would write to the shared record): tests/test_api_write.py has them.
    paths = api_schema.raw_schema["paths"]
    assert sorted(p for p, operations in paths.items() if "get" in operations) == sorted(OPERATIONS)


@pytest.mark.parametrize(
    ("path", "mode"), CASES, ids=[f"{m.value}:{p.removeprefix(API_PREFIX)}" for p, m in CASES]
)
def test_api_operation_conforms_to_its_openapi_document(
    api_schema: Any, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path]["GET"]

    @settings(
        max_examples=30,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def conforms(case: Any) -> None:
        # All of schemathesis's default checks: no 5xx, status code, content type, headers
        # and body conform to the document, valid data accepted, invalid data rejected, auth
        # not ignored.
        response = case.call_and_validate()
        _check_extra(case, response)

    conforms()
