"""Live logs, Harmont's way (SPEC §6.2): a build-scoped log token, then a Server-Sent Events
stream of one job's output, frame for frame as Harmont sends it.

``GET …/builds/{number}/log-token`` (Bearer auth) answers ``{"token", "expires_at"}``: an HMAC
(SHA-256) over the build's id and an expiry an hour out, keyed by a secret kept in the store
(``Store.store_key``), so every server of one record accepts it. ``GET /v0/jobs/{job_id}/logs
?token=…`` (no Bearer: browsers' EventSource cannot send headers) then streams:

- ``event: history`` with no ``id:``, ``{"chunks": [chunk, ...]}``: the chunks after the resume
  point (all of them on a first connection, up to about a megabyte: the rest of a long log
  follows as ``chunk`` events);
- ``event: chunk`` per new chunk, ``id: <seq>``;
- ``event: done`` with ``{"state", "exit_code"}`` (Harmont sends ``{}``; clients ignore extra
  keys) once the job is terminal and every chunk was sent, then the stream ends;
- a ``: heartbeat`` comment after ``heartbeat_s`` (15 s) without an event.

A chunk is ``{"seq", "stream_kind", "content", "ts", "attempt"}``: ``stream_kind`` 0 stdout,
1 stderr, 2 meta (harmont-exec's own lines); ``ts`` unix nanoseconds; ``content`` text, decoded
per stream and attempt so that a character is never split between chunks (``logtext``).
The bytes stay exact on the raw log route. Resume: ``Last-Event-ID`` or ``?last_event_id=``
(the header first) replays from seq N+1; a negative N counts as 0, one that is not an integer
is ignored. Refusals are Harmont's flat bodies: 401 ``log_stream_unauthorized`` (no token, not
ours, altered, expired), 403 ``log_stream_forbidden`` (a job that is not in the token's build).

When the server stops (``closing``), open streams end without ``done``. The stream polls the
store (``poll_s``): the writer commits at most every 50 ms.

This module is the protocol (tokens, frames, the stream's loop: ``LiveLog``); the two routes
are ``routes/live.py``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import anyio

from executor.api.errors import LogStreamError
from executor.api.logtext import STREAM_KINDS, LogText, ends_of_streams
from executor.api.lookup import is_uuid, read
from executor.api.paths import BUILD
from executor.errors import ErrorCode
from executor.store import JobProgress, JobRow, LogChunk, Store, TokenRow
from executor.store.reads import LOG_PAGE_ROWS
from executor.store.rows import format_time

__all__ = [
    "EVENT_SCHEMA",
    "LOG_TOKEN_TTL",
    "MAX_STREAMS_PER_TOKEN",
    "LiveLog",
    "LogGrant",
    "chunk_json",
    "mint_log_token",
    "resume_point",
    "unix_ns",
    "verify_log_token",
]

LOG_TOKEN_TTL = timedelta(hours=1)
READ_BUDGET_BYTES = 1 << 20
"""Output read from the store per hop: a long log goes out as a bounded ``history`` and then
``chunk`` events, never as one event the size of the log."""
_KEY_NAME = "log_token_hmac"
MAX_STREAMS_PER_TOKEN = 32
"""Live streams (logs and build events) one API token may have open on one server."""
GRANT_CHECK_S = 2.0
"""How often an open stream checks that its log token still holds (expiry, revocation)."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_INTEGER = re.compile(r"[+-]?[0-9]{1,30}")
_MAX_SEQ = 1 << 62  # beyond any seq, and within what SQLite compares


EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["history", "chunk", "done"]},
        "data": {"type": "string"},
        "id": {"type": "string"},
    },
    "required": ["event", "data"],
}
"""One event of the stream, as OpenAPI 3.2 describes Server-Sent Events (the data is JSON
text)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_log_token(
    key: bytes, build_id: str, expires_at: datetime, *, api_token_id: str, issued_at: datetime
) -> str:
    """``<payload>.<mac>``, both base64url: the payload names the build, the expiry, the API
    token that minted it (the log token dies with it) and when it was minted (the server caps
    its life at LOG_TOKEN_TTL from then, whatever expiry it claims)."""
    payload = json.dumps(
        {
            "b": build_id,
            "e": int(expires_at.timestamp()),
            "t": api_token_id,
            "i": int(issued_at.timestamp()),
        },
        separators=(",", ":"),
    ).encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


_HOW = f"mint a log token with GET {BUILD}/log-token and pass it as ?token="


def _unauthorized(why: str) -> LogStreamError:
    return LogStreamError(401, ErrorCode.LOG_STREAM_UNAUTHORIZED, f"{why}; {_HOW}")


class LogGrant(NamedTuple):
    """What a verified log token allows: one build's streams, until ``expires_at``, while the
    API token ``api_token_id`` is not revoked."""

    build_id: str
    api_token_id: str
    expires_at: datetime


def verify_log_token(
    key: bytes, token: str, now: datetime, api_token: Callable[[str], TokenRow | None]
) -> LogGrant:
    """What a token is good for; LogStreamError 401 if it is not one of ours, it expired (at
    the earliest of its own expiry, LOG_TOKEN_TTL after it was minted, and its API token's
    expiry), or the API token that minted it was revoked (``api_token`` looks that up by
    id)."""
    payload_text, _, mac_text = token.partition(".")
    try:
        payload, mac = _unb64(payload_text), _unb64(mac_text)
    except (ValueError, binascii.Error):
        raise _unauthorized("the log token is not one this server minted") from None
    expected = hmac.new(key, payload, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise _unauthorized("the log token is not one this server minted (or it was altered)")
    try:
        data = json.loads(payload)
        build_id, minted_by = str(data["b"]), str(data["t"])
        claimed = datetime.fromtimestamp(int(data["e"]), UTC)
        issued = datetime.fromtimestamp(int(data["i"]), UTC)
    except (ValueError, KeyError, TypeError, OverflowError, OSError):
        # signed by this store's key but not in this form: minted by an older harmont-exec
        raise _unauthorized("the log token is of an older form; mint a new one") from None
    expires = min(claimed, issued + LOG_TOKEN_TTL)
    owner = api_token(minted_by)
    if owner is not None and owner.expires_at is not None:
        expires = min(expires, owner.expires_at)
    if owner is None or owner.revoked_at is not None:
        raise _unauthorized("the API token that minted this log token was revoked")
    if expires <= now:
        raise _unauthorized(f"the log token expired at {format_time(expires)}")
    return LogGrant(build_id, minted_by, expires)


def still_granted(
    grant: LogGrant, now: datetime, api_token: Callable[[str], TokenRow | None]
) -> bool:
    """Whether an open stream may go on: its log token has not expired and its API token has
    not been revoked since it was opened."""
    owner = api_token(grant.api_token_id)
    return now < grant.expires_at and owner is not None and owner.revoked_at is None


def unix_ns(at: datetime) -> int:
    """``at`` in unix nanoseconds (the store keeps microseconds: exact)."""
    return (at - _EPOCH) // _MICROSECOND * 1000


def chunk_json(chunk: LogChunk, text: str) -> dict[str, Any]:
    """A log chunk on the wire, with its ``text`` (``LogText.decode``)."""
    return {
        "seq": chunk.seq,
        "stream_kind": STREAM_KINDS[chunk.stream],
        "content": text,
        "ts": unix_ns(chunk.at),
        "attempt": chunk.attempt,
    }


def resume_point(header: str | None, query: str | None) -> int:
    """The seq a stream resumes after: the ``Last-Event-ID`` header, else the
    ``last_event_id`` query parameter (as Harmont: a negative value counts as 0, one that is not
    an integer is ignored); 0 (from the start) when neither says."""
    for value in (header, query):
        if value is not None and _INTEGER.fullmatch(value):
            return min(max(int(value), 0), _MAX_SEQ)
    return 0


def _event(name: str, data: Any, event_id: int | None = None) -> bytes:
    head = "" if event_id is None else f"id: {event_id}\n"
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"{head}event: {name}\ndata: {text}\n\n".encode()


class _Reader:
    """One stream's reads of the store (in a worker thread) and its text decoder."""

    def __init__(self, store: Store, job_id: str, after: int) -> None:
        self.store = store
        self.job_id = job_id
        self.after = after
        self.text = LogText()
        self.primed = after == 0  # from the start, no earlier bytes to continue

    def _prime(self) -> None:
        # Resuming after seq N: each stream continues the bytes it had up to N.
        for stream in STREAM_KINDS:
            tail = self.store.log_tail(self.job_id, stream, through_seq=self.after)
            if tail:
                attempt = tail[0].attempt
                before = b"".join(c.content for c in reversed(tail) if c.attempt == attempt)
                self.text.prime(stream, attempt, before)
        self.primed = True

    def poll(self) -> tuple[bool, JobProgress | None, list[dict[str, Any]]]:
        """(the job is over and this is the last of its output, where the job stands, the
        chunks after the last poll as wire objects, at most about READ_BUDGET_BYTES of them)."""
        if not self.primed:
            self._prime()
        # The job first, then the chunks: a job seen terminal has all its chunks in, and so
        # has every attempt seen finished.
        now = self.store.job_progress(self.job_id)
        chunks: list[LogChunk] = []
        size = 0
        after = self.after
        over = False
        read_all = False
        while True:
            page = self.store.log_page(self.job_id, after_seq=after)
            chunks.extend(page)
            size += sum(len(c.content) for c in page)
            if len(page) < LOG_PAGE_ROWS:
                read_all = True
                # A job that is gone (its build was pruned) sends nothing more either.
                over = now is None or now.state.is_terminal
                break
            after = page[-1].seq
            if size >= READ_BUDGET_BYTES:
                break  # more to read: the caller comes back at once
        finished = now.finished_attempt if now is not None and not over else 1 << 30
        ends = ends_of_streams(chunks, finished_attempt=finished, complete=read_all)
        wire = [chunk_json(c, self.text.decode(c, final=c.seq in ends)) for c in chunks]
        if chunks:
            self.after = chunks[-1].seq
        return over, now, wire


class LiveLog:
    """One app's live log streams: how often they read the store (``poll_s``), the heartbeat
    (``heartbeat_s``), the event that ends them all (``closing``), and the log tokens' key.
    The methods that read the store are synchronous, for ``read``'s worker thread."""

    def __init__(self, *, heartbeat_s: float, poll_s: float, closing: threading.Event) -> None:
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s
        self.closing = closing
        self._key: bytes | None = None
        self._open: dict[str, int] = {}  # API token id -> its live streams open here

    def check_room(self, grant: LogGrant) -> None:
        """LogStreamError 429 ``too_many_streams`` if the API token behind ``grant`` already
        has MAX_STREAMS_PER_TOKEN streams open on this server (checked as a stream is asked
        for; counted while it runs, by ``counted``)."""
        if self._open.get(grant.api_token_id, 0) >= MAX_STREAMS_PER_TOKEN:
            raise LogStreamError(
                429,
                ErrorCode.TOO_MANY_STREAMS,
                f"API token {grant.api_token_id} already has {MAX_STREAMS_PER_TOKEN} live "
                "streams open here; close the ones no longer read",
            )

    async def counted(self, grant: LogGrant, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``stream``, counted as one of its API token's open streams while it runs."""
        token = grant.api_token_id
        self._open[token] = self._open.get(token, 0) + 1
        try:
            async for frame in stream:
                yield frame
        finally:
            left = self._open[token] - 1
            if left:
                self._open[token] = left
            else:
                del self._open[token]

    def key(self, store: Store) -> bytes:
        """The HMAC key of the log tokens of ``store``."""
        # Made once per store (a write), then the same forever: read once per app.
        if self._key is None:
            self._key = store.store_key(_KEY_NAME)
        return self._key

    def issue(self, store: Store, build_id: str, api_token: TokenRow) -> dict[str, Any]:
        """A LogTokenResponse for build ``build_id``, minted for ``api_token``: an hour, or
        less if the API token expires before."""
        key = self.key(store)
        now = datetime.now(UTC).replace(microsecond=0)
        expires_at = now + LOG_TOKEN_TTL
        if api_token.expires_at is not None:
            expires_at = min(expires_at, api_token.expires_at)  # it dies with its API token
        return {
            "token": mint_log_token(
                key, build_id, expires_at, api_token_id=api_token.id, issued_at=now
            ),
            "expires_at": format_time(expires_at),
        }

    def admit(self, store: Store, token: str | None, job_id: str) -> tuple[JobRow, LogGrant]:
        """The job a stream of ``job_id`` with log token ``token`` shows, and what the token
        grants; LogStreamError 401 (no token, or not a good one) or 403 (not the token's
        build's job)."""
        if not token:
            raise _unauthorized("no ?token= on the log stream's URL")
        grant = verify_log_token(self.key(store), token, datetime.now(UTC), store.get_token)
        job = store.get_job(job_id.lower()) if is_uuid(job_id) else None
        if job is None or job.build_id != grant.build_id:
            raise LogStreamError(
                403,
                ErrorCode.LOG_STREAM_FORBIDDEN,
                f"this log token is not scoped to job {job_id[:80]!r}: the token's build "
                "has no such job; mint a log token for the build the job belongs to",
            )
        return job, grant

    async def events(
        self, store: Store, job: JobRow, grant: LogGrant, after: int
    ) -> AsyncIterator[bytes]:
        """The stream of ``job``'s output after seq ``after``: ``history``, ``chunk``s,
        heartbeats, then ``done``; it ends early when the server stops or the grant lapses."""
        reader = _Reader(store, job.id, after)

        def granted() -> bool:
            return still_granted(grant, datetime.now(UTC), store.get_token)

        done, now, chunks = await read(reader.poll)
        more = not done and len(chunks) > 0
        yield _event("history", {"chunks": chunks})
        quiet_since = checked = time.monotonic()
        while not done:
            if not more:
                await anyio.sleep(self.poll_s)
            if self.closing.is_set():
                return  # the server is stopping: the client reconnects elsewhere
            if time.monotonic() - checked >= GRANT_CHECK_S:
                checked = time.monotonic()
                if not await read(granted):
                    return  # revoked or expired: a reconnect gets the 401 that says so
            done, now, chunks = await read(reader.poll)
            more = not done and len(chunks) > 0
            for chunk in chunks:
                yield _event("chunk", chunk, chunk["seq"])
            if chunks:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= self.heartbeat_s:
                yield b": heartbeat\n\n"
                quiet_since = time.monotonic()
        state = None if now is None else now.state.value
        yield _event("done", {"state": state, "exit_code": None if now is None else now.exit_code})
