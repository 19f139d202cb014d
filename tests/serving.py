"""Running harmont-exec as real processes in tests: `python -m executor ...` to its end or in
its own session, a `serve` fixture on a free loopback port, bounded polling for a condition and
bounded reads of a child's output; and the read API's usual start: tokens, an ASGI client."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import anyio
import httpx
import pytest

from executor.api import API_PREFIX
from executor.store import Store, open_store

T = TypeVar("T")
TIMEOUT_S = 120.0
"""Bound on every wait for another process: generous, so a slow CI machine does not fail; only
a hang reaches it."""


# --- processes -------------------------------------------------------------------------------


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m executor ARGS`` to its end (bounded), text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "executor", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=TIMEOUT_S,
        check=False,
        env=env,
    )


def cli_bytes(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """`cli`, with the output as the bytes it wrote (a job's log, an artifact)."""
    return subprocess.run(
        [sys.executable, "-m", "executor", *args],
        capture_output=True,
        cwd=cwd,
        timeout=TIMEOUT_S,
        check=False,
    )


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(args: list[str], cwd: Path, out: Path) -> subprocess.Popen[bytes]:
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


def output(out: Path) -> str:
    return "".join(
        f"\n--- {p.name}:\n{p.read_text(errors='replace')}"
        for p in (out.with_suffix(".out"), out.with_suffix(".err"))
        if p.exists()
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
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


def poll(
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
                output(out)
            )
        assert time.monotonic() < deadline, f"{what}: not within {TIMEOUT_S}s"
        time.sleep(0.02)


async def poll_async(check: Callable[[], T | None], what: str) -> T:
    """`poll` for a test whose own event loop runs what it waits for (a build in a task):
    sleeps between calls without blocking the loop; bounded by TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while (result := check()) is None:  # a file or a row: nothing to wait on as an event
        assert time.monotonic() < deadline, f"{what}: not within {TIMEOUT_S}s"
        await anyio.sleep(0.02)
    return result


def read_until(pipe: IO[Any], needle: bytes, what: str) -> bytes:
    """Read a child's output pipe until ``needle`` has come, bounded by TIMEOUT_S (a select
    on the descriptor: a child that stops talking fails the test instead of hanging it); all
    that was read. Reads the descriptor itself, past the file object's buffer: read the rest
    with ``communicate`` (it has buffered nothing)."""
    fd = pipe.fileno()
    seen = b""
    deadline = time.monotonic() + TIMEOUT_S
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while needle not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{what}: not within {TIMEOUT_S}s; the output so far: {seen!r}"
            if selector.select(timeout=left):
                data = os.read(fd, 65536)
                assert data, f"the output ended before {what}: {seen!r}"
                seen += data
    return seen


def bounded(items: Iterable[T], what: str) -> Iterator[T]:
    """``items`` (an SSE stream's lines, say), failing the test once TIMEOUT_S have passed:
    a stream whose heartbeats keep every read under its timeout cannot then go on forever."""
    deadline = time.monotonic() + TIMEOUT_S
    for item in items:
        assert time.monotonic() < deadline, f"{what}: not within {TIMEOUT_S}s"
        yield item


@dataclass(frozen=True)
class Server:
    url: str
    db: str  # a SQLite file or a PostgreSQL URL: every test that takes `server` runs on both
    proc: subprocess.Popen[bytes]
    out: Path


@pytest.fixture
def server(tmp_path: Path, store_url: str) -> Iterator[Server]:
    """`harmont-exec serve --db DB --port P` on a free loopback port, answering /ping; on
    each backend (conftest's ``store_url``)."""
    db = store_url
    port = free_port()
    out = tmp_path / "serve"
    proc = start(["serve", "--db", db, "--port", str(port)], tmp_path, out)
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

        poll(pong, "the server to answer /ping", (proc, out))
        yield Server(url, db, proc, out)
    finally:
        stop(proc)


def create_token(db: str | Path, cwd: Path | None = None) -> str:
    """A new API token's secret, as `harmont-exec token create` shows it."""
    result = cli("token", "create", "--db", str(db), cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    secret = result.stdout.strip()
    assert result.stdout == secret + "\n"  # the secret alone on stdout
    assert secret.startswith("hm_") and len(secret) == 3 + 43, secret
    return secret


def mint_token(
    db: str | Path, *, organizations: list[str] | None = None, now: datetime | None = None
) -> str:
    """A new API token's secret, created straight in the store at ``db`` (once the test's
    builds are recorded there: the usual start of a read-API test); ``create_token`` goes
    through `harmont-exec token create` instead."""
    with open_store(db) as store:
        _, secret = store.create_token(
            description=None,
            organizations=organizations,
            expires_at=None,
            now=now or datetime.now(UTC),
        )
    return secret


@asynccontextmanager
async def asgi_client(app: Any, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client of the real ASGI app (no server), with the token as a Bearer header
    when given; the whole use bounded by TIMEOUT_S."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    with anyio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers
        ) as client:
            yield client


def job_log(store: Store, job_id: str) -> bytes:
    """A job's whole recorded output."""
    return b"".join(c.content for c in store.read_log(job_id))


def log_token_for(
    store: Store,
    build_id: str,
    expires_at: datetime | None = None,
    *,
    api_token_id: str | None = None,
) -> str:
    """A live-log token for the build, as `…/log-token` mints it: signed with the store's key,
    tied to an API token (a new one unless ``api_token_id`` names one), an hour long unless
    ``expires_at`` says otherwise."""
    from executor.api.live import LOG_TOKEN_TTL, mint_log_token

    now = datetime.now(UTC)
    if api_token_id is None:
        row, _ = store.create_token(
            description="log token", organizations=None, expires_at=None, now=now
        )
        api_token_id = row.id
    return mint_log_token(
        store.store_key("log_token_hmac"),
        build_id,
        expires_at or now + LOG_TOKEN_TTL,
        api_token_id=api_token_id,
        issued_at=now,
    )


def assert_sound(store: Store) -> None:
    """The whole record passes `verify` (store/verify.py): histories, attempts, roll-ups,
    references, artifact files and the database's own structure."""
    found = store.verify()
    assert found.ok, "\n".join([*map(str, found.problems), found.summary()])
