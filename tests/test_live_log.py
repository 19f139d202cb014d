"""Live logs (SPEC §6): the SSE stream of a job that a real `harmont-exec run` process is
running, read by an httpx streaming client from the real `harmont-exec serve`; resume with
Last-Event-ID; the log tokens' refusals; lossless bytes; heartbeats; `logs --follow`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from serving import (
    TIMEOUT_S,
    Server,
    asgi_client,
    bounded,
    cli,
    create_token,
    log_token_for,
    mint_token,
    output,
    poll,
    poll_async,
    read_until,
    server,
    start,
    stop,
)

import executor
from executor.api import create_app
from executor.api.live import LOG_TOKEN_TTL, mint_log_token
from executor.store import JobRow, open_store

__all__ = ["server"]  # a fixture, used here

API = "/api/v0/organizations"
# The job talks, then waits for the test to create `go`, talks again (including bytes that
# are not UTF-8), waits for `go2`, and ends.
TALKER = """\
steps:
  - key: talk
    command: >-
      echo first;
      while [ ! -e go ]; do sleep 0.05; done;
      echo second; printf '\\377\\376 not utf-8\\n';
      while [ ! -e go2 ]; do sleep 0.05; done;
      echo third
"""


@dataclass
class Event:
    name: str = "message"
    data: str = ""
    id: str | None = None


@dataclass
class Stream:
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)


def _events(lines: Iterator[str], stream: Stream) -> Iterator[Event]:
    """SSE parsing (the WHATWG rules this server uses): fields until a blank line; bounded, so
    a stream that never ends (its heartbeats keep each read alive) fails the test."""
    current = Event()
    for line in bounded(lines, "the event stream to end"):
        if line == "":
            if current.data or current.name != "message":
                stream.events.append(current)
                yield current
            current = Event()
        elif line.startswith(":"):
            stream.comments.append(line)
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                current.name = value
            elif name == "data":
                current.data += value
            elif name == "id":
                current.id = value


def _chunks(event: Event) -> list[dict[str, Any]]:
    body = json.loads(event.data)
    return list(body["chunks"]) if event.name == "history" else [body]


def _text(chunks: list[dict[str, Any]]) -> str:
    return "".join(str(c["content"]) for c in chunks)


@dataclass(frozen=True)
class Live:
    server: Server
    work: Path
    run: subprocess.Popen[bytes]
    headers: dict[str, str]
    job: dict[str, Any]
    stream_url: str


@pytest.fixture
def live(server: Server, tmp_path: Path) -> Iterator[Live]:
    """A real `run` process running TALKER into the server's store, its job running."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "talker.yaml").write_text(TALKER)
    out = tmp_path / "run"
    run = start(["run", "talker.yaml", "--db", str(server.db)], work, out)
    try:
        headers = {"Authorization": f"Bearer {create_token(server.db, tmp_path)}"}
        build = f"{server.url.removesuffix('/api/v0')}{API}/local/pipelines/talker/builds/1"

        def running() -> dict[str, Any] | None:
            response = httpx.get(f"{build}/jobs", headers=headers, timeout=TIMEOUT_S)
            if response.status_code == 404:
                return None  # not recorded yet
            (job,) = response.json()["data"]
            return job if job["state"] == "running" else None  # type: ignore[no-any-return]

        job = poll(running, "the job to run", (run, out))
        token = httpx.get(f"{build}/log-token", headers=headers, timeout=TIMEOUT_S).json()
        expires = datetime.fromisoformat(token["expires_at"])
        assert timedelta(minutes=55) < expires - datetime.now(UTC) <= timedelta(hours=1)
        base = server.url.removesuffix("/api/v0")
        url = f"{base}/v0/jobs/{job['id']}/logs?token={token['token']}"
        yield Live(server, work, run, headers, job, url)
        (work / "go").touch()
        (work / "go2").touch()
        assert run.wait(timeout=TIMEOUT_S) == 0, output(out)
    finally:
        stop(run)


def _job_state(live: Live) -> str:
    base = live.server.url
    url = f"{base}/organizations/local/pipelines/talker/builds/1/jobs/{live.job['id']}"
    return str(httpx.get(url, headers=live.headers, timeout=TIMEOUT_S).json()["state"])


def _recorded_log(live: Live) -> bytes:
    with open_store(live.server.db) as store:
        return b"".join(c.content for c in store.read_log(live.job["id"]))


def _recorded_text(live: Live) -> str:
    """The job's (stdout-only) log as the stream's text: decoded, invalid bytes replaced."""
    return _recorded_log(live).decode("utf-8", "replace")


def test_live_log_streams_chunks_while_the_job_runs_then_done(live: Live) -> None:
    stream = Stream()
    received: list[dict[str, Any]] = []
    with httpx.stream("GET", live.stream_url, timeout=TIMEOUT_S) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in _events(response.iter_lines(), stream):
            if event.name == "done":
                assert json.loads(event.data) == {"state": "passed", "exit_code": 0}
                break
            received.extend(_chunks(event))
            text = _text(received)
            if "first" in text and not (live.work / "go").exists():
                # Received while the command is still running: it waits for this file.
                assert _job_state(live) == "running"
                (live.work / "go").touch()
            if "second" in text and not (live.work / "go2").exists():
                assert _job_state(live) == "running"
                (live.work / "go2").touch()
    assert stream.events[0].name == "history"
    assert [e.name for e in stream.events[1:-1]] == ["chunk"] * (len(stream.events) - 2)
    assert [c["seq"] for c in received] == list(range(1, len(received) + 1))
    for event in stream.events[1:-1]:
        assert event.id == str(json.loads(event.data)["seq"])
    assert _text(received) == _recorded_text(live)
    assert "\ufffd" in _text(received)  # the bytes that are not UTF-8, as Harmont sends them
    assert set(received[0]) == {"seq", "stream_kind", "content", "ts", "attempt"}
    assert {c["stream_kind"] for c in received} == {0}


def test_live_log_resumes_from_last_event_id_without_gaps_or_duplicates(live: Live) -> None:
    first: list[dict[str, Any]] = []
    last_id = None
    with httpx.stream("GET", live.stream_url, timeout=TIMEOUT_S) as response:
        for event in _events(response.iter_lines(), Stream()):
            first.extend(_chunks(event))
            if first:
                last_id = str(first[-1]["seq"])
            if "first" in _text(first):
                break  # the client goes away mid-job
    assert last_id is not None
    (live.work / "go").touch()

    def has_second() -> bool | None:
        return True if b"second" in _recorded_log(live) else None

    poll(has_second, "the job's second line to be recorded")
    rest: list[dict[str, Any]] = []
    stream = Stream()
    headers = {"Last-Event-ID": last_id}
    with httpx.stream("GET", live.stream_url, headers=headers, timeout=TIMEOUT_S) as response:
        for event in _events(response.iter_lines(), stream):
            if event.name == "done":
                break
            rest.extend(_chunks(event))
            if "second" in _text(rest):
                (live.work / "go2").touch()
    assert stream.events[0].name == "history"
    assert rest and rest[0]["seq"] == int(last_id) + 1  # the history starts after the id
    seqs = [c["seq"] for c in first + rest]
    assert seqs == list(range(1, len(seqs) + 1))
    assert _text(first + rest) == _recorded_text(live)


# --- the ASGI app over a finished build: tokens, content, heartbeats --------------------------


@dataclass(frozen=True)
class Finished:
    db: Path
    token: str
    job: JobRow  # of build 1: prints bytes that are not UTF-8
    other_build_id: str


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    work = tmp_path_factory.mktemp("finished")
    (work / "b.json").write_text(
        json.dumps(
            {
                "steps": [
                    # Two pipes, so two chunks: text on stdout, other bytes on stderr.
                    {
                        "key": "bytes",
                        "command": "printf 'h\\303\\251llo\\n'; printf '\\377\\376' >&2",
                    }
                ]
            }
        )
    )
    db = work / "harmont.db"
    first = executor.run_build_sync(work / "b.json", db=db)
    second = executor.run_build_sync(work / "b.json", db=db)
    token = mint_token(db)
    with open_store(db) as store:
        job = store.get_job(first.jobs["bytes"].job_id)
    assert job is not None
    return Finished(db, token, job, second.build_id)


async def _get(
    db: Path, path: str, headers: dict[str, str] | None = None, **app_options: Any
) -> httpx.Response:
    async with asgi_client(create_app(db=db, **app_options)) as client:
        return await client.get(path, headers=headers)


def _log_token(db: Path, build_id: str, expires_at: datetime) -> str:
    with open_store(db) as store:
        return log_token_for(store, build_id, expires_at)


def _stream_path(finished: Finished, token: str) -> str:
    return f"/v0/jobs/{finished.job.id}/logs?token={token}"


def _refused(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    return str(error["message"])


@pytest.mark.anyio
async def test_live_log_of_a_finished_job_is_history_then_done_and_lossless(
    finished: Finished,
) -> None:
    token = _log_token(finished.db, finished.job.build_id, datetime.now(UTC) + LOG_TOKEN_TTL)
    response = await _get(finished.db, _stream_path(finished, token))
    assert response.status_code == 200, response.text
    stream = Stream()
    events = list(_events(iter(response.text.split("\n")), stream))
    assert [e.name for e in events] == ["history", "done"]
    chunks = _chunks(events[0])
    by_stream = {c["stream_kind"]: c["content"] for c in chunks}
    assert by_stream == {0: "h\u00e9llo\n", 1: "\ufffd\ufffd"}  # stdout, stderr
    assert events[0].id is None  # history has no id (Harmont's frames)
    with open_store(finished.db) as store:  # the record keeps the bytes
        raw = {c.stream: c.content for c in store.read_log(finished.job.id)}
    assert raw == {"stdout": b"h\xc3\xa9llo\n", "stderr": b"\xff\xfe"}


@pytest.mark.anyio
async def test_live_log_of_a_long_log_is_a_bounded_history_then_chunks(tmp_path: Path) -> None:
    (tmp_path / "long.yaml").write_text(
        "steps:\n  - {key: long, command: 'head -c 9000000 /dev/urandom | base64'}\n"
    )
    db = tmp_path / "harmont.db"
    result = await executor.run_build(tmp_path / "long.yaml", db=db)
    job_id = result.jobs["long"].job_id
    token = _log_token(db, result.build_id, datetime.now(UTC) + LOG_TOKEN_TTL)
    response = await _get(db, f"/v0/jobs/{job_id}/logs?token={token}")
    assert response.status_code == 200, response.text[:500]
    events = list(_events(iter(response.text.split("\n")), Stream()))
    names = [e.name for e in events]
    assert names[0] == "history" and names[-1] == "done"
    assert set(names[1:-1]) == {"chunk"}  # the rest of the log, after a bounded history
    history = _chunks(events[0])
    assert sum(len(c["content"]) for c in history) < 8 * 1024 * 1024
    chunks = [c for e in events[:-1] for c in _chunks(e)]
    assert [c["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
    with open_store(db) as store:
        assert _text(chunks) == b"".join(c.content for c in store.read_log(job_id)).decode()


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["expired", "tampered", "garbage", "missing"])
async def test_live_log_unusable_token_is_401(finished: Finished, case: str) -> None:
    good = _log_token(finished.db, finished.job.build_id, datetime.now(UTC) + LOG_TOKEN_TTL)
    token = {
        "expired": _log_token(
            finished.db, finished.job.build_id, datetime.now(UTC) - timedelta(seconds=1)
        ),
        "tampered": good[:-2] + ("AA" if not good.endswith("AA") else "BB"),
        "garbage": "not-a-token",
        "missing": None,
    }[case]
    path = f"/v0/jobs/{finished.job.id}/logs" + ("" if token is None else f"?token={token}")
    message = _flat_refusal(await _get(finished.db, path), 401, "log_stream_unauthorized")
    assert "log-token" in message  # says how to get a good one
    if case == "expired":
        assert "expired" in message


def _flat_refusal(response: httpx.Response, status: int, code: str) -> str:
    """Harmont's flat error body of the log stream: {"code", "message"}, no envelope."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message"}, body
    assert body["code"] == code
    return str(body["message"])


@pytest.mark.anyio
async def test_live_log_token_of_another_build_is_forbidden(finished: Finished) -> None:
    other = _log_token(finished.db, finished.other_build_id, datetime.now(UTC) + LOG_TOKEN_TTL)
    response = await _get(finished.db, _stream_path(finished, other))
    assert finished.job.id in _flat_refusal(response, 403, "log_stream_forbidden")


@pytest.mark.anyio
async def test_live_log_token_needs_a_bearer_token_and_a_visible_build(
    finished: Finished,
) -> None:
    path = f"{API}/local/pipelines/b/builds/1/log-token"
    _refused(await _get(finished.db, path), 401, "unauthorized")
    bearer = {"Authorization": f"Bearer {finished.token}"}
    missing = path.replace("/builds/1/", "/builds/99/")
    _refused(await _get(finished.db, missing, bearer), 404, "build_not_found")
    response = await _get(finished.db, path, bearer)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"token", "expires_at"}


@pytest.mark.anyio
async def test_live_log_garbage_last_event_id_is_ignored_as_harmont_does(
    finished: Finished,
) -> None:
    token = _log_token(finished.db, finished.job.build_id, datetime.now(UTC) + LOG_TOKEN_TTL)
    plain = await _get(finished.db, _stream_path(finished, token))
    garbage = await _get(
        finished.db, _stream_path(finished, token), headers={"Last-Event-ID": "abc"}
    )
    assert garbage.status_code == 200, garbage.text
    history = [e for e in _events(iter(garbage.text.split("\n")), Stream()) if e.name == "history"]
    assert _chunks(history[0]) == _chunks(
        next(e for e in _events(iter(plain.text.split("\n")), Stream()) if e.name == "history")
    )
    assert len(_chunks(history[0])) == 2  # from the start: both chunks


@pytest.mark.anyio
async def test_live_log_sends_heartbeats_while_a_job_is_quiet(tmp_path: Path) -> None:
    """The app's ASGI interface driven directly (httpx's ASGI transport buffers a whole
    response): a heartbeat comment arrives while the job is silent, `done` after it ends."""
    (tmp_path / "quiet.yaml").write_text(
        "steps:\n  - {key: quiet, command: 'while [ ! -e go ]; do sleep 0.05; done'}\n"
    )
    db = tmp_path / "harmont.db"
    with anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run_in_background, tmp_path / "quiet.yaml", db)
            job = await _wait_running(db)
            token = _log_token(db, job.build_id, datetime.now(UTC) + LOG_TOKEN_TTL)
            app = create_app(db=db, heartbeat_s=0.2, poll_s=0.05)
            body = b""
            async for part in _asgi_body(app, f"/v0/jobs/{job.id}", f"token={token}"):
                body += part
                if b": heartbeat" in body and not (tmp_path / "go").exists():
                    assert b"event: done" not in body
                    (tmp_path / "go").touch()
            assert body.index(b": heartbeat") < body.index(b"event: done")
            assert b'"state":"passed"' in body


async def _run_in_background(path: Path, db: Path) -> None:
    await executor.run_build(path, db=db)


async def _wait_running(db: Path) -> JobRow:
    with open_store(db) as store:

        def running() -> JobRow | None:
            builds = store.list_builds()
            if not builds:
                return None
            (job,) = store.list_jobs(builds[0].id)
            return job if job.state.value == "running" else None

        return await poll_async(running, "the job to run")


async def _asgi_body(app: Any, path: str, query: str) -> AsyncIterator[bytes]:
    """Call the ASGI app once for GET ``path/logs?query``; yield body parts as they are sent."""
    send_to, receive_from = anyio.create_memory_object_stream[dict[str, Any]](100)
    disconnected = anyio.Event()

    async def receive() -> dict[str, Any]:
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await send_to.send(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"{path}/logs",
        "raw_path": f"{path}/logs".encode(),
        "query_string": query.encode(),
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "root_path": "",
    }
    async with anyio.create_task_group() as tg:

        async def call() -> None:
            async with send_to:
                await app(scope, receive, send)

        tg.start_soon(call)
        async with receive_from:
            async for message in receive_from:
                if message["type"] == "http.response.start":
                    assert message["status"] == 200
                elif message["type"] == "http.response.body":
                    yield message.get("body", b"")
                    if not message.get("more_body", False):
                        break
        disconnected.set()


# --- logs --follow ----------------------------------------------------------------------------


def test_cli_logs_follow_prints_output_as_it_comes_and_ends_with_the_job(
    live: Live, tmp_path: Path
) -> None:
    follow = subprocess.Popen(
        [
            *(sys.executable, "-m", "executor", "logs", live.job["id"]),
            "--follow",
            "--db",
            live.server.db,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follow.stdout is not None
        seen = read_until(follow.stdout, b"first\n", "`logs --follow` to print the first line")
        assert _job_state(live) == "running"  # printed while the job still runs
        (live.work / "go").touch()
        (live.work / "go2").touch()
        rest, err = follow.communicate(timeout=TIMEOUT_S)
        assert follow.returncode == 0, err
        assert seen + rest == _recorded_log(live)
        assert rest.endswith(b"third\n")
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_quietly_while_a_stream_is_open(live: Live, signum: signal.Signals) -> None:
    """An open stream of a job that never ends (it waits for a file) must not keep `serve`
    from exiting, nor make it print a traceback: the stream ends, without `done`."""
    with httpx.stream("GET", live.stream_url, timeout=TIMEOUT_S) as response:
        lines = response.iter_lines()
        assert next(_events(lines, Stream())).name == "history"
        live.server.proc.send_signal(signum)
        rest = Stream()
        try:
            list(_events(lines, rest))  # ends when the server ends it...
        except httpx.HTTPError:
            pass  # (or cuts it)
        assert [e.name for e in rest.events if e.name == "done"] == []  # ...without `done`
        # 130 for Ctrl-C (as `run`); SIGTERM is re-raised once the server has stopped.
        expected = 130 if signum == signal.SIGINT else -signal.SIGTERM
        assert live.server.proc.wait(timeout=TIMEOUT_S) == expected
    log = output(live.server.out)
    assert "Traceback" not in log and "ERROR" not in log, log


def test_cli_logs_of_a_too_short_id_prefix_says_how_long_it_must_be(tmp_path: Path) -> None:
    open_store(tmp_path / "h.db").close()
    result = cli("logs", "e77fe5b", "--db", str(tmp_path / "h.db"), cwd=tmp_path)
    assert result.returncode == 2
    assert "no job 'e77fe5b' (a prefix needs at least 8 characters)" in result.stderr


@pytest.mark.anyio
async def test_live_log_token_dies_with_the_api_token_that_minted_it(finished: Finished) -> None:
    with open_store(finished.db) as store:
        row, _ = store.create_token(
            description="short", organizations=None, expires_at=None, now=datetime.now(UTC)
        )
        token = log_token_for(store, finished.job.build_id, api_token_id=row.id)
    assert (await _get(finished.db, _stream_path(finished, token))).status_code == 200
    with open_store(finished.db) as store:
        store.revoke_token(row.id, now=datetime.now(UTC))
    response = await _get(finished.db, _stream_path(finished, token))
    assert "was revoked" in _flat_refusal(response, 401, "log_stream_unauthorized")


@pytest.mark.anyio
async def test_live_log_token_expiry_is_the_servers_not_the_tokens(finished: Finished) -> None:
    """A token (properly signed) that claims a day of life, minted two hours ago: the server
    caps it at an hour from its minting."""
    now = datetime.now(UTC)
    with open_store(finished.db) as store:
        row, _ = store.create_token(description="x", organizations=None, expires_at=None, now=now)
        token = mint_log_token(
            store.store_key("log_token_hmac"),
            finished.job.build_id,
            now + timedelta(days=1),
            api_token_id=row.id,
            issued_at=now - timedelta(hours=2),
        )
    response = await _get(finished.db, _stream_path(finished, token))
    assert "expired" in _flat_refusal(response, 401, "log_stream_unauthorized")


@pytest.mark.anyio
async def test_live_log_token_lives_no_longer_than_its_api_token(finished: Finished) -> None:
    now = datetime.now(UTC)
    with open_store(finished.db) as store:
        soon = now + timedelta(minutes=5)
        _, secret = store.create_token(
            description="brief", organizations=None, expires_at=soon, now=now
        )
    path = f"{API}/local/pipelines/b/builds/1/log-token"
    minted = await _get(finished.db, path, {"Authorization": f"Bearer {secret}"})
    assert minted.status_code == 200, minted.text
    expires = datetime.fromisoformat(minted.json()["expires_at"])
    assert expires <= soon  # not the hour a log token would otherwise get


def test_live_log_stream_open_ends_once_its_api_token_is_revoked(live: Live) -> None:
    secret = live.headers["Authorization"].removeprefix("Bearer ")
    with open_store(live.server.db) as store:
        row = store.token_for_secret(secret)
        assert row is not None
    with httpx.stream("GET", live.stream_url, timeout=TIMEOUT_S) as response:
        lines = response.iter_lines()
        assert next(_events(lines, Stream())).name == "history"
        with open_store(live.server.db) as store:
            store.revoke_token(row.id, now=datetime.now(UTC))
        rest = Stream()
        list(_events(lines, rest))  # the server ends the stream (the job still runs)
        assert [e.name for e in rest.events if e.name == "done"] == []
    with open_store(live.server.db) as store:  # it was the token that ended, not the job
        job = store.get_job(live.job["id"])
        assert job is not None and job.state.value == "running"
    again = httpx.get(live.stream_url, timeout=TIMEOUT_S)
    assert again.status_code == 401 and "revoked" in again.json()["message"]
    # (the fixture's teardown lets the job finish)
