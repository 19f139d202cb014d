"""A build's live state changes as Server-Sent Events **(extension)**: what the web view's build
page listens to, one stream per open page instead of a poll per job (SPEC §9).

``GET /v0/builds/{build_id}/events?token=<log token>`` is authorised like the live log stream
(``live``): a build-scoped log token from ``…/builds/{number}/log-token``, the same 401 / 403
flat bodies, the same end when the token lapses or the server stops. It sends:

- ``event: build`` with the Build (``wire.build_json``) at once, then whenever it changes;
- ``event: job`` with the Job (``wire.job_json``) each time one of the build's jobs changes;
  the last of each batch read has ``id: <change>``, the change's place in the record's history
  (``Store.job_changes``), to resume from;
- ``event: done`` once the build is finished and every change was sent; the stream ends;
- a ``: heartbeat`` comment after ``heartbeat_s`` without an event.

Resume: ``Last-Event-ID`` (EventSource sends it on reconnect), else ``?after=``; a client that
rendered the build at change N (``Store.last_change``, read before the jobs) passes N and
misses nothing. Without either the stream starts from now: it sends no job it has not seen
change. Several changes of one job between two polls are sent once, as the job is now.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio

from executor.api.errors import LogStreamError
from executor.api.live import LiveLog, LogGrant, resume_point, still_granted, verify_log_token
from executor.api.lookup import read
from executor.api.wire import build_json, job_json
from executor.errors import ErrorCode
from executor.store import BuildRow, Store

__all__ = ["BuildEvents", "admit_build", "build_events"]

GRANT_CHECK_S = 2.0


def _event(name: str, data: Any, event_id: int | None = None) -> bytes:
    head = "" if event_id is None else f"id: {event_id}\n"
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"{head}event: {name}\ndata: {text}\n\n".encode()


def admit_build(
    live_log: LiveLog, store: Store, token: str | None, build_id: str
) -> tuple[BuildRow, LogGrant]:
    """The build a stream of ``build_id`` with log token ``token`` shows; LogStreamError 401
    (no token, or not a good one) or 403 (another build's token)."""
    if not token:
        raise LogStreamError(
            401,
            ErrorCode.LOG_STREAM_UNAUTHORIZED,
            "no ?token= on the build events stream's URL; mint a log token with GET "
            "…/builds/{number}/log-token and pass it as ?token=",
        )
    grant = verify_log_token(live_log.key(store), token, datetime.now(UTC), store.get_token)
    build = store.get_build_by_id(build_id.lower()) if len(build_id) == 36 else None
    if build is None or build.id != grant.build_id:
        raise LogStreamError(
            403,
            ErrorCode.LOG_STREAM_FORBIDDEN,
            f"this log token is not scoped to build {build_id[:80]!r}; mint a log token for "
            "that build",
        )
    return build, grant


class BuildEvents:
    """One stream's reads (synchronous, for ``read``'s worker thread)."""

    def __init__(self, store: Store, build: BuildRow, after: int) -> None:
        self.store = store
        self.build_id = build.id
        self.after = after
        self.shown: tuple[Any, ...] | None = None

    def poll(self) -> tuple[bool, list[bytes]]:
        """(the build is over and everything was sent, the events since the last poll)."""
        # The build first: a build seen finished has all its jobs' changes in.
        build = self.store.get_build_by_id(self.build_id)
        events: list[bytes] = []
        while True:
            point, jobs = self.store.job_changes(self.build_id, after=self.after)
            if point == self.after:
                break
            self.after = point
            # Only the last job of a batch carries the point: a client that resumes from it
            # has every job of the batch; one cut off mid-batch resumes before it and gets
            # the batch again (a job sent twice is the same job, as it is now).
            for n, job in enumerate(jobs, 1):
                events.append(_event("job", job_json(job), point if n == len(jobs) else None))
        if build is None:  # pruned while watched: nothing more will come
            return True, events
        now = (build.state, build.started_at, build.finished_at, build.error_code)
        if now != self.shown:
            self.shown = now
            events.append(_event("build", build_json(build)))
        return build.state.is_terminal, events


async def build_events(
    live_log: LiveLog, store: Store, build: BuildRow, grant: LogGrant, after: int
) -> AsyncIterator[bytes]:
    """The stream (see the module docstring)."""
    reader = BuildEvents(store, build, after)
    quiet_since = checked = time.monotonic()
    while True:
        done, events = await read(reader.poll)
        for event in events:
            yield event
        if done:
            yield _event("done", {})
            return
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= live_log.heartbeat_s:
            yield b": heartbeat\n\n"
            quiet_since = time.monotonic()
        await anyio.sleep(live_log.poll_s)
        if live_log.closing.is_set():
            return
        if time.monotonic() - checked >= GRANT_CHECK_S:
            checked = time.monotonic()
            if not await read(still_granted, grant, datetime.now(UTC), store.get_token):
                return


def resume_after(header: str | None, query: str | None, now: int) -> int:
    """Where a stream starts: ``Last-Event-ID``, else ``?after=``, else ``now`` (the record's
    last change: only what happens from here on)."""
    if header is None and query is None:
        return now
    return resume_point(header, query)
