"""The exception hierarchy of harmont-exec, and nothing else.

Every error the package raises on purpose is an ``ExecutorError`` whose ``code`` is an
``ErrorCode``. ``ErrorCode`` is the one catalog of error words: the ``error_code`` the record keeps
on a job or a build, the ``code`` of the API's error envelope, and an exception's ``code``. Each is
documented under its own heading in docs/api.md or docs/reliability.md (a test holds the two in
step). Library exceptions (pydantic, yaml, networkx, database drivers) are translated into these
at module boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

__all__ = [
    "BuildFileError",
    "BuildNotFoundError",
    "BuildStateError",
    "CycleError",
    "Diagnostic",
    "ErrorCode",
    "ExecutorError",
    "InternalError",
    "InvalidNameError",
    "InvalidSourceError",
    "InvalidTransitionError",
    "OrganizationNotFoundError",
    "RecordFailedError",
    "SlugTakenError",
    "SourceTooLargeError",
    "StoreError",
    "StoreLocationError",
    "StoreNotFoundError",
    "StoreReadOnlyError",
]

Loc = tuple[str | int, ...]


class ErrorCode(StrEnum):
    """Every error word harmont-exec writes: in the record, on the API, in an exception."""

    # Why a job or a build ended as it did (their ``error_code``; SPEC §3, §5).
    DEPENDENCY_FAILED = "dependency_failed"
    JOB_TIMEOUT = "job_timeout"
    PIPELINE_TIMEOUT = "pipeline_timeout"
    BUILD_CANCELED = "build_canceled"
    SPAWN_FAILED = "spawn_failed"
    EXECUTOR_LOST = "executor_lost"
    BUILD_ABANDONED = "build_abandoned"
    RECORD_FAILED = "record_failed"
    ARTIFACT_UPLOAD_FAILED = "artifact_upload_failed"
    INVALID_SOURCE = "invalid_source"  # a build refused at createBuild: its tarball (SPEC §6.3)
    # The API's error envelope (SPEC §6; docs/api.md).
    UNAUTHORIZED = "unauthorized"
    ORGANIZATION_NOT_FOUND = "organization_not_found"
    PIPELINE_NOT_FOUND = "pipeline_not_found"
    BUILD_NOT_FOUND = "build_not_found"
    JOB_NOT_FOUND = "job_not_found"
    ARTIFACT_NOT_FOUND = "artifact_not_found"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INVALID_REQUEST = "invalid_request"
    CORS_REFUSED = "cors_refused"
    LOG_STREAM_UNAUTHORIZED = "log_stream_unauthorized"
    LOG_STREAM_FORBIDDEN = "log_stream_forbidden"
    TOO_MANY_STREAMS = "too_many_streams"
    INVALID_CURSOR = "invalid_cursor"
    ARTIFACT_CONTENT_MISSING = "artifact_content_missing"
    STORE_READ_ONLY = "store_read_only"
    STORE_UNAVAILABLE = "store_unavailable"
    INTERNAL_ERROR = "internal_error"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    SERVICE_UNAVAILABLE = "service_unavailable"
    TOKEN_SCOPE_FORBIDDEN = "token_scope_forbidden"
    API_TOKEN_NOT_FOUND = "api_token_not_found"
    # The web view's pages (SPEC §9; docs/web.md).
    CSRF_FAILED = "csrf_failed"
    # Exceptions only (the CLI prints them; the API answers them as one of the above).
    EXECUTOR_ERROR = "executor_error"
    INVALID_BUILD_FILE = "invalid_build_file"
    DEPENDENCY_CYCLE = "dependency_cycle"
    INVALID_TRANSITION = "invalid_transition"
    STORE_ERROR = "store_error"
    STORE_NOT_FOUND = "store_not_found"
    INVALID_STORE_LOCATION = "invalid_store_location"
    INVALID_BUILD_STATE = "invalid_build_state"
    SLUG_TAKEN = "slug_taken"
    INVALID_NAME = "invalid_name"


class ExecutorError(Exception):
    """Base of every error harmont-exec raises on purpose; ``code`` says which."""

    code: ErrorCode = ErrorCode.EXECUTOR_ERROR


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem found in a build file.

    ``loc`` is the path of the offending value inside the normalized build (``("steps", 3,
    "depends_on", 0)``); the loader turns it into ``file:line:column`` of the source.
    """

    message: str
    loc: Loc = ()
    step_key: str | None = None
    file: str | None = None
    line: int | None = None
    column: int | None = None

    def located(self, file: str, line: int | None, column: int | None) -> Diagnostic:
        return replace(self, file=file, line=line, column=column)

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        step = ""
        if self.step_key is not None:
            key = repr(self.step_key)  # cut as model.show_value cuts values: a key can be huge
            step = f"step {key if len(key) <= 80 else key[:77] + '...'}: "
        return f"{where}{step}{self.message}"


class BuildFileError(ExecutorError):
    """A build file (or an in-memory build spec) is invalid; carries every problem found."""

    code = ErrorCode.INVALID_BUILD_FILE

    def __init__(self, diagnostics: list[Diagnostic] | tuple[Diagnostic, ...]) -> None:
        if not diagnostics:
            raise ValueError("BuildFileError needs at least one diagnostic")
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics)
        super().__init__(str(self))

    @classmethod
    def single(cls, message: str, *, loc: Loc = (), step_key: str | None = None) -> BuildFileError:
        return cls([Diagnostic(message, loc=loc, step_key=step_key)])

    def with_diagnostics(self, diagnostics: list[Diagnostic]) -> BuildFileError:
        """The same error (same class and extra fields) with re-located diagnostics."""
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        clone.diagnostics = tuple(diagnostics)
        Exception.__init__(clone, str(clone))
        return clone

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self.diagnostics)


class BuildNotFoundError(ExecutorError):
    """No recorded build has the number (in the organization and pipeline) asked for."""

    code = ErrorCode.BUILD_NOT_FOUND


class BuildStateError(ExecutorError):
    """The build is not in a state that allows what was asked (resume a build that finished
    by itself, retry one still running): the message says what would."""

    code = ErrorCode.INVALID_BUILD_STATE


class CycleError(BuildFileError):
    """The dependencies form a cycle; ``cycle`` lists it, first node repeated at the end."""

    code = ErrorCode.DEPENDENCY_CYCLE

    def __init__(self, cycle: list[str], diagnostic: Diagnostic) -> None:
        self.cycle = tuple(cycle)
        super().__init__([diagnostic])


class InvalidNameError(ExecutorError):
    """A name given for a new organization or pipeline cannot be one: empty, too long, or
    without a letter or digit to make its slug from."""

    code = ErrorCode.INVALID_NAME


class InvalidSourceError(ExecutorError):
    """A build's source tarball (``createBuild``'s ``source_b64``) cannot be unpacked safely:
    not a gzip tarball, or a member that would write outside the workspace (an absolute path,
    ``..``, a link leading out), a device or FIFO; the message names the member."""

    code = ErrorCode.INVALID_SOURCE


class SourceTooLargeError(InvalidSourceError):
    """A build's source tarball unpacks to more than the server takes (``serve
    --max-upload-mb``): the API answers 413, as for an upload over the limit."""

    code = ErrorCode.PAYLOAD_TOO_LARGE


class OrganizationNotFoundError(ExecutorError):
    """No organization has the slug asked for (a pipeline created in it, ...)."""

    code = ErrorCode.ORGANIZATION_NOT_FOUND


class SlugTakenError(ExecutorError):
    """A new organization's or pipeline's name makes a slug that one already has."""

    code = ErrorCode.SLUG_TAKEN


class InternalError(ExecutorError):
    """A bug in harmont-exec: an invariant was broken. Please report it."""

    code = ErrorCode.INTERNAL_ERROR


class InvalidTransitionError(InternalError):
    """A job or build was asked to make a state change the transition table does not allow."""

    code = ErrorCode.INVALID_TRANSITION


class StoreError(ExecutorError):
    """The record could not be read or written (bad URL, disk full, newer schema, ...)."""

    code = ErrorCode.STORE_ERROR


class StoreNotFoundError(StoreError):
    """A command that only reads the record was pointed at a SQLite file that does not exist
    (a mistyped --db); the CLI exits 2, as for other bad arguments."""

    code = ErrorCode.STORE_NOT_FOUND


class StoreLocationError(StoreError):
    """A --db / HARMONT_DB value that is not a store location (an unknown URL scheme, a
    directory, ``:memory:``, a libpq key=value string): a bad argument, so the CLI exits 2."""

    code = ErrorCode.INVALID_STORE_LOCATION


class StoreReadOnlyError(StoreError):
    """A write was refused because the store is read-only (its disk, or its file): reading
    still works; read commands go on without the recovery writes."""

    code = ErrorCode.STORE_READ_ONLY


class RecordFailedError(StoreError):
    """A build was stopped because its record could not be written (a full disk, a file
    turned read-only, a database gone): its number and pipeline, for the message and the
    summary (read back from what the record holds)."""

    code = ErrorCode.RECORD_FAILED

    def __init__(self, message: str, *, build_id: str, number: int, org: str, pipeline: str):
        super().__init__(message)
        self.build_id = build_id
        self.number = number
        self.org = org
        self.pipeline = pipeline
