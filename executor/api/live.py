"""Live logs, Harmont's way (SPEC §6): a build-scoped log token, then a Server-Sent Events
stream of one job's output.

``GET …/builds/{number}/log-token`` (Bearer auth) answers ``{"token", "expires_at"}``: an HMAC
(SHA-256) over the build's id and an expiry an hour out, keyed by a secret kept in the store
(``Store.store_key``), so every server of one record accepts it. ``GET /v0/jobs/{job_id}/logs
?token=…`` (no Bearer: browsers' EventSource cannot send headers) then streams:

- ``event: history``: ``{"chunks": [chunk, ...]}``, the chunks after ``Last-Event-ID`` (all of
  them on a first connection, up to about a megabyte: the rest of a long log follows as
  ``chunk`` events); its ``id`` is the last chunk's seq;
- ``event: chunk`` per new chunk, ``id: <seq>``, data ``{seq, stream_kind, content, ts,
  attempt}``;
- ``event: done`` with ``{"state", "exit_code"}`` once the job is terminal and every chunk was
  sent, then the stream ends;
- a ``: heartbeat`` comment after ``heartbeat_s`` (15 s) without an event.

When the server stops (``closing``), open streams end without ``done``.

Chunks are the store's, byte for byte. ``content`` is the chunk decoded as UTF-8 when it is
valid UTF-8; otherwise it is the chunk in base64 and the chunk carries ``"encoding": "base64"``
(a chunk can also end inside a multi-byte character: it is then base64 too). Nothing is lost or
replaced. The stream polls the store (``poll_s``): the writer commits at most every 50 ms.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations at runtime.
import base64
import binascii
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from executor.api import models
from executor.api.errors import ApiError, not_found, unauthorized
from executor.api.lookup import API_PREFIX, STATUS_TEXT, Lookups, is_uuid
from executor.store import JobRow, LogChunk, TokenRow
from executor.store.reads import LOG_PAGE_ROWS
from executor.store.rows import format_time

__all__ = ["LOG_TOKEN_TTL", "add_live_log_routes", "chunk_json", "mint_log_token"]

LOG_TOKEN_TTL = timedelta(hours=1)
READ_BUDGET_BYTES = 1 << 20
"""Output read from the store per hop: a long log goes out as a bounded ``history`` and then
``chunk`` events, never as one event the size of the log."""
_KEY_NAME = "log_token_hmac"


class LogToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str
    expires_at: str


# One event of the stream, as OpenAPI 3.2 describes Server-Sent Events (the data is JSON text).
_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["history", "chunk", "done"]},
        "data": {"type": "string"},
        "id": {"type": "string"},
    },
    "required": ["event", "data"],
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_log_token(key: bytes, build_id: str, expires_at: datetime) -> str:
    """``<payload>.<mac>``, both base64url: the payload names the build and the expiry."""
    payload = json.dumps(
        {"b": build_id, "e": int(expires_at.timestamp())}, separators=(",", ":")
    ).encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def _bad_token(why: str) -> ApiError:
    return unauthorized(
        f"{why}; mint a log token with GET {API_PREFIX}/organizations/{{org}}/pipelines/"
        "{pipeline}/builds/{number}/log-token and pass it as ?token="
    )


def verify_log_token(key: bytes, token: str, now: datetime) -> str:
    """The build id a token is good for; ApiError 401 if it is not one of ours or expired."""
    payload_text, _, mac_text = token.partition(".")
    try:
        payload, mac = _unb64(payload_text), _unb64(mac_text)
    except (ValueError, binascii.Error):
        raise _bad_token("the log token is not one this server minted") from None
    expected = hmac.new(key, payload, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise _bad_token("the log token is not one this server minted (or it was altered)")
    data = json.loads(payload)
    expires = datetime.fromtimestamp(int(data["e"]), UTC)
    if expires <= now:
        raise _bad_token(f"the log token expired at {format_time(expires)}")
    return str(data["b"])


def chunk_json(chunk: LogChunk) -> dict[str, Any]:
    """A log chunk on the wire (see the module docstring for ``encoding``)."""
    body: dict[str, Any] = {
        "seq": chunk.seq,
        "stream_kind": chunk.stream,
        "ts": format_time(chunk.at),
        "attempt": chunk.attempt,
    }
    try:
        body["content"] = chunk.content.decode("utf-8")
    except UnicodeDecodeError:
        body["content"] = base64.b64encode(chunk.content).decode("ascii")
        body["encoding"] = "base64"
    return body


def _event(name: str, data: Any, event_id: int | None = None) -> bytes:
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def add_live_log_routes(
    app: FastAPI, lookups: Lookups, *, heartbeat_s: float, poll_s: float, closing: threading.Event
) -> None:
    store = lookups.store
    Caller = Annotated[TokenRow, Depends(lookups.caller)]
    keys: list[bytes] = []

    def hmac_key() -> bytes:
        # Made once per store (a write), then the same forever: read once per process.
        if not keys:
            keys.append(store.store_key(_KEY_NAME))
        return keys[0]

    builds_path = f"{API_PREFIX}/organizations/{{org}}/pipelines/{{pipeline}}/builds"

    @app.get(
        f"{builds_path}/{{number}}/log-token",
        tags=["builds"],
        summary="Mint a build-scoped log token for the SSE log stream",
        responses={
            200: {"model": LogToken},
            **{
                status: {"model": models.ErrorEnvelope, "description": STATUS_TEXT[status]}
                for status in (401, 404, 422)
            },
        },
    )
    async def log_token(org: str, pipeline: str, number: int, token: Caller) -> JSONResponse:
        def lookup() -> tuple[str, bytes]:
            build = lookups.build_of(token, org, pipeline, number)
            return build.id, hmac_key()

        build_id, key = await lookups.read(lookup)
        expires_at = datetime.now(UTC).replace(microsecond=0) + LOG_TOKEN_TTL
        return JSONResponse(
            {
                "token": mint_log_token(key, build_id, expires_at),
                "expires_at": format_time(expires_at),
            }
        )

    @app.get(
        "/v0/jobs/{job_id}/logs",
        tags=["jobs"],
        summary="A job's log as Server-Sent Events (history, chunk, done)",
        openapi_extra={
            "parameters": [
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "description": "Resume after this chunk seq (EventSource sends it).",
                    "schema": {"type": "integer", "minimum": 0, "maximum": 10**18 - 1},
                }
            ]
        },
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "history, then chunk events, then done (module docstring)",
                "content": {"text/event-stream": {"schema": _EVENT_SCHEMA}},
            },
            **{
                status: {"model": models.ErrorEnvelope, "description": STATUS_TEXT[status]}
                for status in (401, 404, 422)
            },
        },
    )
    async def job_log_stream(
        job_id: str,
        request: Request,
        token: Annotated[
            str | None, Query(description="A token from …/builds/{number}/log-token.")
        ] = None,
    ) -> StreamingResponse:
        # Read here rather than declared: FastAPI would document an optional header as
        # nullable, and "null" is no seq. Documented in openapi_extra.
        raw_last = request.headers.get("last-event-id")
        last_event_id = None
        if raw_last is not None:
            if not raw_last.strip().isdigit() or len(raw_last.strip()) > 18:
                raise ApiError(
                    422,
                    "invalid_request",
                    "invalid_request",
                    f"Last-Event-ID {raw_last[:40]!r} is not a chunk seq; send the id of the "
                    "last event received (EventSource does), or no header to start over",
                )
            last_event_id = int(raw_last)

        def lookup() -> JobRow:
            if token is None:
                raise _bad_token("no ?token= on the log stream's URL")
            build_id = verify_log_token(hmac_key(), token, datetime.now(UTC))
            job = store.get_job(job_id.lower()) if is_uuid(job_id) else None
            if job is None or job.build_id != build_id:
                raise not_found(
                    "job_not_found",
                    f"no job {job_id!r} in the build this log token is for; log tokens are "
                    "build-scoped: mint one for the job's build",
                )
            return job

        job = await lookups.read(lookup)

        def poll(after: int) -> tuple[bool, JobRow | None, list[LogChunk]]:
            """(the job is over and this is the last of its output, the job, the chunks after
            ``after``, at most about READ_BUDGET_BYTES of them)."""
            # The state first, then the chunks: a job seen terminal has all its chunks in.
            now = store.get_job(job.id)
            chunks: list[LogChunk] = []
            size = 0
            while True:
                page = store.log_page(job.id, after_seq=after)
                chunks.extend(page)
                size += sum(len(c.content) for c in page)
                if len(page) < LOG_PAGE_ROWS:
                    over = now is not None and now.state.is_terminal
                    return over, now, chunks
                after = page[-1].seq
                if size >= READ_BUDGET_BYTES:
                    return False, now, chunks  # more to read: the caller comes back at once

        async def events() -> AsyncIterator[bytes]:
            after = last_event_id or 0
            done, now, chunks = await lookups.read(poll, after)
            more = not done and len(chunks) > 0
            if chunks:
                after = chunks[-1].seq
            yield _event(
                "history",
                {"chunks": [chunk_json(c) for c in chunks]},
                after if after else None,
            )
            quiet_since = time.monotonic()
            while not done:
                if not more:
                    await anyio.sleep(poll_s)
                if closing.is_set():
                    return  # the server is stopping: the client reconnects elsewhere
                done, now, chunks = await lookups.read(poll, after)
                more = not done and len(chunks) > 0
                for chunk in chunks:
                    yield _event("chunk", chunk_json(chunk), chunk.seq)
                    after = chunk.seq
                if chunks:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= heartbeat_s:
                    yield b": heartbeat\n\n"
                    quiet_since = time.monotonic()
            assert now is not None
            yield _event("done", {"state": now.state.value, "exit_code": now.exit_code})

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
