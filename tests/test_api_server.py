"""The read API as a user meets it: `harmont-exec serve` as a real server process over a store
that a real `harmont-exec run` process is writing, and the ASGI app fuzzed by schemathesis
against the OpenAPI document it serves itself (SPEC §6)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from executor.api import API_PREFIX, create_app
from executor.store import open_store

T = TypeVar("T")
TIMEOUT_S = 120.0
"""Bound on every wait for another process: generous, so a slow CI machine does not fail; only
a hang reaches it."""


# --- processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(args: list[str], cwd: Path, out: Path) -> subprocess.Popen[bytes]:
    """`python -m executor ARGS` in its own session (so its whole process group can be
    signalled), output to files (a pipe nobody reads could fill up and block it)."""
    with out.with_suffix(".out").open("wb") as stdout, out.with_suffix(".err").open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "executor", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=err,
            start_new_session=True,
        )


def _output(out: Path) -> str:
    return "".join(
        f"\n--- {p.name}:\n{p.read_text(errors='replace')}"
        for p in (out.with_suffix(".out"), out.with_suffix(".err"))
        if p.exists()
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still there; always reap."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything left of its group
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


def _poll(
    check: Callable[[], T | None], what: str, *alive: tuple[subprocess.Popen[bytes], Path]
) -> T:
    """Call ``check`` until it returns something other than None, bounded by TIMEOUT_S; fail
    at once if one of the ``alive`` processes exits meanwhile."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        result = check()
        if result is not None:
            return result
        for proc, out in alive:
            assert proc.poll() is None, f"exited {proc.returncode} while waiting for {what}" + (
                _output(out)
            )
        assert time.monotonic() < deadline, f"{what}: not within {TIMEOUT_S}s"
        time.sleep(0.02)


@dataclass(frozen=True)
class Server:
    url: str
    db: Path
    proc: subprocess.Popen[bytes]
    out: Path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """`harmont-exec serve --db DB --port P` on a free loopback port, answering /ping."""
    db = tmp_path / "store" / "harmont.db"
    port = _free_port()
    out = tmp_path / "serve"
    proc = _start(["serve", "--db", str(db), "--port", str(port)], tmp_path, out)
    url = f"http://127.0.0.1:{port}{API_PREFIX}"
    try:

        def pong() -> bool | None:
            try:
                response = httpx.get(f"{url}/ping", timeout=10)
            except httpx.TransportError:
                return None  # not listening yet
            assert response.status_code == 200, response.text
            assert response.json() == {"status": "ok"}
            return True

        _poll(pong, "the server to answer /ping", (proc, out))
        yield Server(url, db, proc, out)
    finally:
        _stop(proc)


def _create_token(db: Path, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "executor", "token", "create", "--db", str(db)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    secret = result.stdout.strip()
    assert result.stdout == secret + "\n"  # the secret alone on stdout
    assert secret.startswith("hm_") and len(secret) == 3 + 43, secret
    return secret


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
    secret = _create_token(server.db, tmp_path)  # after the server started: it must see it
    (tmp_path / "build.yaml").write_text(BLOCKING_BUILD)
    out = tmp_path / "run"
    run = _start(["run", "build.yaml", "--db", str(server.db)], tmp_path, out)
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

            jobs = _poll(
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
                    assert not exited, f"the run exited, the build is {build}" + _output(out)
                    return None
                return build

            build = _poll(finished, "the build to finish", (server.proc, server.out))
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
            assert run.wait(timeout=TIMEOUT_S) == 0, _output(out)
    finally:
        (tmp_path / "go").touch()  # lets the job end even if the test failed before
        _stop(run)


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
    assert response.headers.get("allow") == "GET"


# --- schemathesis against the app's own OpenAPI document --------------------------------------


PASSING = """\
steps:
  - {key: compile, command: echo compiled}
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
        "/organizations/{org}/pipelines",
        "/organizations/{org}/pipelines/{pipeline}",
        "/organizations/{org}/pipelines/{pipeline}/builds",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}/jobs",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}/jobs/{job_id}",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}/jobs/{job_id}/attempts",
        "/organizations/{org}/pipelines/{pipeline}/builds/{number}/jobs/{job_id}/log",
    )
]
# /ping has no parameter to make invalid: no negative case exists for it.
CASES = [(path, GenerationMode.POSITIVE) for path in OPERATIONS] + [
    (path, GenerationMode.NEGATIVE) for path in OPERATIONS[1:]
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
        result = subprocess.run(
            [sys.executable, "-m", "executor", "run", f"{name}.yaml", "--db", str(db)],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        assert result.returncode == status, result.stdout + result.stderr
    with open_store(db) as store:
        _, secret = store.create_token(
            description=None, organizations=None, expires_at=None, now=datetime.now(UTC)
        )
        job_ids = [
            job.id
            for pipeline in ("ci", "broken")
            for job in store.list_jobs(store.get_build(1, org="local", pipeline=pipeline).id)  # type: ignore[union-attr]
        ]
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
            },
            "parameters": {
                "path.org": drawn("org", 0.8),
                "path.pipeline": drawn("pipeline", 0.8),
                "path.number": drawn("number", 0.8),
                "path.job_id": drawn("job_id", 0.8),
                "query.cursor": drawn("cursor", 0.3),
            },
            "checks": {
                # A cursor is opaque: the schema can only say "string", so a schema-valid but
                # made-up cursor is rightly a 400 invalid_cursor (documented on the lists).
                # 400 is accepted here; _check_extra holds it to exactly that case.
                "positive_data_acceptance": {"expected-statuses": [200, 400, 404]},
            },
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
    if response.status_code >= 400:
        assert response.json()["error"]["request_id"] == request_id
    if response.status_code == 400:
        assert "cursor" in (case.query or {}), response.text
        assert response.json()["error"]["code"] == "invalid_cursor", response.text


def test_api_openapi_document_lists_exactly_the_fuzzed_operations(api_schema: Any) -> None:
    # A new route must be added to OPERATIONS, so that it is fuzzed below.
    assert sorted(api_schema.raw_schema["paths"]) == sorted(OPERATIONS)
    for path in OPERATIONS:
        assert list(api_schema.raw_schema["paths"][path]) == ["get"], path


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
