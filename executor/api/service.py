"""What the write routes need from the thing that runs builds (SPEC §6.3), as a Protocol.

The API never imports the runner: ``cli/serve.py`` hands ``create_app`` an object with this
interface (``executor.service.BuildService`` implements it), and the API's own tests pass a fake
one. Organizations, pipelines and tokens are plain records: the routes write those through the
store themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from executor.errors import ExecutorError
from executor.store import BuildRow

__all__ = ["BuildRequest", "BuildService", "Submitted"]


@dataclass(frozen=True, slots=True)
class BuildRequest:
    """A ``createBuild`` body, checked for shape and decoded (``source`` is the gzip tarball's
    bytes, at most the server's upload limit)."""

    org: str
    pipeline: str
    pipeline_ir: str  # Harmont v0 IR JSON (either form) or a harmont-exec build file's text
    source: bytes | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    branch: str | None = None
    commit: str | None = None
    message: str | None = None
    origin: str = "api"  # the build's ``source`` field (Harmont: "api", "ui", "webhook", ...)


@dataclass(frozen=True, slots=True)
class Submitted:
    """A build the service recorded: queued (``error`` None), or refused with its row created
    and ``error_code`` / ``error_message`` set (``error`` says why: a ``BuildFileError`` for an
    IR that does not load, an ``ExecutorError`` with code ``invalid_source`` for a tarball that
    cannot be unpacked safely); the route answers 201 or 422."""

    build: BuildRow
    error: ExecutorError | None = None


class BuildService(Protocol):
    """Runs the builds ``serve`` is sent. Every method is called from a worker thread and
    returns once the record says what it did."""

    def submit(self, request: BuildRequest) -> Submitted:
        """Record a new build of ``request.pipeline`` (which exists) and queue it."""
        ...

    def cancel(self, build: BuildRow) -> BuildRow:
        """Record that ``build`` is to be canceled, wherever it runs, and return it as recorded
        now: a queued build is canceled at once; a running one is canceled by its executor
        within about a second; a finished one is returned unchanged (idempotent)."""
        ...

    def retry(self, build: BuildRow, *, failed_only: bool) -> BuildRow:
        """Queue a new build of ``build``'s recorded plan in the same pipeline (``harmont-exec
        retry``: with ``failed_only`` the jobs that passed keep their result). Raises
        ``BuildStateError`` for a build that has not finished."""
        ...
