"""The store's read side: builds, jobs, histories, attempts and logs, as typed rows.

``Reader`` reads through one connection per thread (so concurrent readers, such as the API's
worker threads, do not wait for one another) and reads committed data while another connection
or process is writing (SQLite: WAL mode; PostgreSQL: MVCC). A PostgreSQL connection that the
server dropped is replaced at the next read. Reads never see a write the
writer has not committed. This module must not write.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from executor.errors import StoreError
from executor.store import sql
from executor.store.backend import Backend, Connection
from executor.store.blobs import BlobStore
from executor.store.rows import (
    ArtifactRow,
    AttemptRow,
    BuildRow,
    JobProgress,
    JobRow,
    JobText,
    LogChunk,
    OrganizationRow,
    PipelineRow,
    TokenRow,
    TransitionRow,
)
from executor.store.verify import Verification, check_record

__all__ = ["CHANGES_PAGE_ROWS", "JOB_ID_PREFIX_MIN", "LOG_PAGE_ROWS", "Reader", "token_hash"]

LOG_PAGE_ROWS = 64
"""Log chunks fetched per query by ``read_log`` (so a huge log is never loaded at once)."""

CHANGES_PAGE_ROWS = 2000
"""Job changes read per ``job_changes`` call."""

JOB_ID_PREFIX_MIN = 8
"""The shortest job id prefix ``get_job`` accepts."""

_ID_PREFIX = re.compile(r"[0-9a-f-]+")
_IN_LIST = 500  # ids per IN (...) list: below every driver's limit on parameters


def token_hash(secret: str) -> str:
    """What the store keeps of a token: the SHA-256 of its text, in hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class Reader:
    def __init__(self, backend: Backend, db: Connection) -> None:
        self._backend = backend
        self._errors = backend.errors
        self._db = db  # the synchronous writes' connection (in Store), behind _lock
        self._lock = threading.Lock()
        # Reads use one connection per thread, so that concurrent readers (the API's worker
        # threads) do not queue behind one another; WAL lets them all read while a writer
        # commits. Store.close closes them all.
        self._local = threading.local()
        self._readers: list[Connection] = []
        self._reads_closed = False

    @property
    def blobs(self) -> BlobStore:
        """The artifact files: SQLite: ``artifacts/`` beside the database file; PostgreSQL:
        ``HARMONT_ARTIFACTS`` (see store/postgresql.py)."""
        return BlobStore(self._backend.blob_root)

    @property
    def path(self) -> Path | None:
        """The SQLite file, or None for a PostgreSQL store."""
        return self._backend.path

    @property
    def location(self) -> str:
        """The store for people: the SQLite file, or the PostgreSQL URL without its password."""
        return self._backend.location

    @property
    def url(self) -> str:
        """The store as a URL (``sqlite:////abs/path`` or ``postgresql://...``, password
        included: never print it), accepted by ``open_store``."""
        return self._backend.url

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._backend.dialect.name

    def _reader(self) -> Connection:
        reader: Connection | None = getattr(self._local, "db", None)
        if reader is not None and getattr(reader, "broken", False):
            with self._lock:
                if reader in self._readers:
                    self._readers.remove(reader)
            reader.close()
            reader = None
        if reader is None:
            if self._reads_closed:
                raise StoreError(f"the store {self._backend.location} is closed; open it again")
            reader = self._backend.connect()
            with self._lock:
                self._readers.append(reader)
            self._local.db = reader
        return reader

    def _rows(self, query: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            rows: list[Any] = self._reader().execute(query, args).fetchall()
        except self._errors as exc:
            raise self._backend.error("read the record", exc) from None
        return rows

    def _close_readers(self) -> None:
        with self._lock:
            self._reads_closed = True
            readers, self._readers = self._readers, []
        for reader in readers:
            reader.close()

    # --- organizations and pipelines -------------------------------------------------------

    def list_organizations(self) -> list[OrganizationRow]:
        """Every organization, by slug."""
        return [OrganizationRow.from_db(r) for r in self._rows(sql.ORGANIZATIONS)]

    def get_organization(self, slug: str) -> OrganizationRow | None:
        rows = self._rows(sql.ORGANIZATION, (slug,))
        return OrganizationRow.from_db(rows[0]) if rows else None

    def list_pipelines(self, org: str, *, after: str = "", limit: int = 50) -> list[PipelineRow]:
        """The organization's pipelines by slug, those after slug ``after`` (a page)."""
        rows = self._rows(sql.PIPELINES_PAGE, (org, after, max(limit, 0)))
        return [PipelineRow.from_db(r) for r in rows]

    def get_pipeline(self, org: str, pipeline: str) -> PipelineRow | None:
        rows = self._rows(sql.PIPELINE, (org, pipeline))
        return PipelineRow.from_db(rows[0]) if rows else None

    # --- builds ----------------------------------------------------------------------------

    def builds_page(
        self, org: str, pipeline: str, *, before: int | None = None, limit: int = 50
    ) -> list[BuildRow]:
        """The pipeline's builds, newest (highest number) first, those numbered below
        ``before`` (a page)."""
        below = (1 << 62) if before is None else before
        rows = self._rows(sql.BUILDS_PAGE, (org, pipeline, below, max(limit, 0)))
        return [BuildRow.from_db(r) for r in rows]

    def list_builds(
        self, *, org: str | None = None, pipeline: str | None = None, limit: int = 50
    ) -> list[BuildRow]:
        """Builds, newest first (by ``created_at``, then number), optionally of one org and/or
        pipeline."""
        query = sql.list_builds(org=org is not None, pipeline=pipeline is not None)
        args = [a for a in (org, pipeline) if a is not None]
        return [BuildRow.from_db(r) for r in self._rows(query, (*args, max(limit, 0)))]

    def get_build(
        self, number: int, *, org: str | None = None, pipeline: str | None = None
    ) -> BuildRow | None:
        """Build ``number`` of the given pipeline; without org/pipeline, the only build with
        that number (StoreError naming the pipelines when several have one)."""
        query = sql.builds_numbered(org=org is not None, pipeline=pipeline is not None)
        args = [a for a in (org, pipeline) if a is not None]
        rows = self._rows(query, (*args, number))
        if len(rows) > 1:
            names = ", ".join(f"{r['org']}/{r['pipeline']}" for r in rows)
            raise StoreError(
                f"build #{number} exists in several pipelines ({names}); pass --pipeline "
                "(and --org if pipeline names repeat across organizations) to choose one"
            )
        return BuildRow.from_db(rows[0]) if rows else None

    def get_build_by_id(self, build_id: str) -> BuildRow | None:
        rows = self._rows(sql.BUILD_BY_ID, (build_id,))
        return BuildRow.from_db(rows[0]) if rows else None

    def cancel_requested(self, build_id: str) -> bool:
        """Whether a cancel of the build was requested (``Store.request_cancel``): its executor
        asks about every second."""
        rows = self._rows(sql.CANCEL_REQUESTED, (build_id,))
        return bool(rows and rows[0][0])

    def abandoned_queued_builds(self, host: str) -> list[BuildRow]:
        """Builds of ``host``'s `serve` queue whose executor died before they ended, with jobs
        that ``resume`` would run again; oldest first."""
        return [BuildRow.from_db(r) for r in self._rows(sql.ABANDONED_QUEUED_BUILDS, (host,))]

    # --- jobs ------------------------------------------------------------------------------

    def list_jobs(self, build_id: str) -> list[JobRow]:
        """The build's jobs in plan order (topological), each with its prerequisites' ids."""
        rows, depends_on = self._jobs_of(build_id)
        return [JobRow.from_db(r, tuple(depends_on.get(r["id"], ()))) for r in rows]

    def list_jobs_text(self, build_id: str) -> list[JobText]:
        """``list_jobs`` with states and timestamps left as stored text (see ``JobText``)."""
        rows, depends_on = self._jobs_of(build_id)
        return [JobText.from_db(r, tuple(depends_on.get(r["id"], ()))) for r in rows]

    def _jobs_of(self, build_id: str) -> tuple[list[Any], dict[str, list[str]]]:
        rows = self._rows(sql.JOBS_OF_BUILD, (build_id,))
        depends_on: dict[str, list[str]] = {}
        for job_id, prerequisite in self._rows(sql.DEPENDENCIES_OF_BUILD, (build_id,)):
            depends_on.setdefault(job_id, []).append(prerequisite)
        return rows, depends_on

    def get_job(self, job_id: str) -> JobRow | None:
        """A job by id, or by a prefix of at least 8 characters that only one job id has
        (StoreError when several do)."""
        rows = self._rows(sql.JOB_BY_ID, (job_id,))
        prefix = job_id.lower()
        if not rows and len(prefix) >= JOB_ID_PREFIX_MIN and _ID_PREFIX.fullmatch(prefix):
            rows = self._rows(sql.JOBS_BY_ID_PREFIX, (prefix, prefix + "~"))
            if len(rows) > 1:
                raise StoreError(
                    f"job id prefix {job_id!r} matches several jobs ({rows[0]['id']}, "
                    f"{rows[1]['id']}, ...); give more of the id"
                )
        if not rows:
            return None
        deps = tuple(r[0] for r in self._rows(sql.DEPENDENCIES_OF_JOB, (rows[0]["id"],)))
        return JobRow.from_db(rows[0], deps)

    def last_change(self) -> int:
        """Where the record's history of job changes is now: ``job_changes`` after this
        gives only what happens from here on."""
        return int(self._rows(sql.LAST_TRANSITION)[0][0])

    def job_changes(
        self, build_id: str, *, after: int, limit: int = CHANGES_PAGE_ROWS
    ) -> tuple[int, list[JobText]]:
        """(where these changes end, the build's jobs that changed after ``after``, as they are
        now, in plan order). At most ``limit`` changes are read: call again from the point
        returned until it stops moving. Within one build the changes are written by its one
        executor, in order, so a point never skips one committed later."""
        rows = self._rows(sql.CHANGES_OF_BUILD, (after, build_id, limit))
        if not rows:
            return after, []
        ids = list(dict.fromkeys(r[1] for r in rows))
        return int(rows[-1][0]), self.jobs_by_ids(ids)

    def jobs_by_ids(self, job_ids: Sequence[str]) -> list[JobText]:
        """The jobs with these ids, by build, each build's in plan order, as
        ``list_jobs_text``."""
        rows: list[Any] = []
        depends_on: dict[str, list[str]] = {}
        for start in range(0, len(job_ids), _IN_LIST):
            ids = list(job_ids[start : start + _IN_LIST])
            marks = ", ".join("?" * len(ids))
            for job_id, prerequisite in self._rows(
                sql.DEPENDENCIES_OF_JOBS.format(marks=marks), ids
            ):
                depends_on.setdefault(job_id, []).append(prerequisite)
            rows.extend(self._rows(sql.JOBS_BY_IDS.format(marks=marks), ids))
        # Each IN list comes in plan order; together they are put in it.
        rows.sort(key=lambda r: (r["build_id"], r["position"]))
        return [JobText.from_db(r, tuple(depends_on.get(r["id"], ()))) for r in rows]

    def job_progress(self, job_id: str) -> JobProgress | None:
        """The job's state, exit code and last finished attempt, in one read (a live log
        stream asks this several times a second)."""
        rows = self._rows(sql.JOB_PROGRESS, (job_id,))
        return JobProgress.from_db(rows[0]) if rows else None

    def job_transitions(self, job_id: str) -> list[TransitionRow]:
        """The job's history in order, from its creation (seq 0)."""
        return [TransitionRow.from_db(r) for r in self._rows(sql.TRANSITIONS_OF_JOB, (job_id,))]

    def attempts_of_build(self, build_id: str) -> dict[str, list[AttemptRow]]:
        """Every attempt of the build's jobs (job id -> its attempts, in order), in one read."""
        found: dict[str, list[AttemptRow]] = {}
        for r in self._rows(sql.ATTEMPTS_OF_BUILD, (build_id,)):
            found.setdefault(r["job_id"], []).append(AttemptRow.from_db(r))
        return found

    def list_attempts(self, job_id: str) -> list[AttemptRow]:
        return [AttemptRow.from_db(r) for r in self._rows(sql.ATTEMPTS_OF_JOB, (job_id,))]

    def read_log(self, job_id: str, *, after_seq: int = 0) -> Iterator[LogChunk]:
        """The job's output chunks with ``seq > after_seq``, in order, fetched a page at a
        time: a log of any size streams in bounded memory. Chunks committed while iterating
        are included."""
        seq = after_seq
        while True:
            page = self.log_page(job_id, after_seq=seq)
            yield from page
            if len(page) < LOG_PAGE_ROWS:
                return
            seq = page[-1].seq

    def log_page(self, job_id: str, *, after_seq: int = 0) -> list[LogChunk]:
        """Up to ``LOG_PAGE_ROWS`` of the job's chunks with ``seq > after_seq``, in order."""
        rows = self._rows(sql.LOG_PAGE, (job_id, after_seq, LOG_PAGE_ROWS))
        return [LogChunk.from_db(r) for r in rows]

    def log_page_before(
        self, job_id: str, *, before_seq: int, limit: int = LOG_PAGE_ROWS
    ) -> list[LogChunk]:
        """Up to ``limit`` of the job's chunks with ``seq < before_seq``, in order: the page
        that ends just before it (a log opened at its tail, read backwards)."""
        rows = self._rows(sql.LOG_PAGE_BEFORE, (job_id, before_seq, limit))
        return [LogChunk.from_db(r) for r in reversed(rows)]

    def log_tail(
        self, job_id: str, stream: str, *, through_seq: int, limit: int = 3
    ) -> list[LogChunk]:
        """The last ``limit`` chunks of one of the job's streams with ``seq <= through_seq``,
        newest first."""
        rows = self._rows(sql.LOG_TAIL_OF_STREAM, (job_id, stream, through_seq, limit))
        return [LogChunk.from_db(r) for r in rows]

    def build_plan(self, build_id: str) -> tuple[str, str] | None:
        """(the build's plan as recorded: its build file's data as JSON, its working
        directory), or None if there is no such build."""
        rows = self._rows(sql.BUILD_PLAN, (build_id,))
        return (rows[0]["plan_json"], rows[0]["working_dir"]) if rows else None

    def attempt_counts(self, build_id: str) -> dict[str, int]:
        """How many attempts each of the build's jobs has recorded (job id -> count)."""
        return {r[0]: int(r[1]) for r in self._rows(sql.ATTEMPT_COUNTS_OF_BUILD, (build_id,))}

    # --- artifacts -------------------------------------------------------------------------

    def get_artifact(self, artifact_id: str) -> ArtifactRow | None:
        rows = self._rows(sql.ARTIFACT_BY_ID, (artifact_id,))
        return ArtifactRow.from_db(rows[0]) if rows else None

    def list_artifacts(
        self,
        *,
        build_id: str | None = None,
        job_id: str | None = None,
        after: str | None = None,
        limit: int = 50,
    ) -> list[ArtifactRow]:
        """A build's artifacts (its jobs in plan order, then by path) or one job's (by path),
        those after the artifact with id ``after`` (a page; give one of build_id, job_id)."""
        limit = max(limit, 0)
        if (build_id is None) == (job_id is None):
            raise StoreError("list_artifacts needs exactly one of build_id and job_id")
        if build_id is not None:
            rows = (
                self._rows(sql.ARTIFACTS_OF_BUILD_FIRST, (build_id, limit))
                if after is None
                else self._rows(sql.ARTIFACTS_OF_BUILD_PAGE, (build_id, after, limit))
            )
        else:
            rows = (
                self._rows(sql.ARTIFACTS_OF_JOB_FIRST, (job_id, limit))
                if after is None
                else self._rows(sql.ARTIFACTS_OF_JOB_PAGE, (job_id, after, limit))
            )
        return [ArtifactRow.from_db(r) for r in rows]

    def artifact_file(self, artifact: ArtifactRow) -> Path:
        """Where the artifact's content is (StoreError if it is missing from the directory)."""
        path = self.blobs.path_of(artifact.sha256)
        if not path.is_file():
            raise StoreError(
                f"the content of artifact {artifact.id} ({artifact.path}) is missing from "
                f"{self.blobs.root}; the artifact directory must stay beside the database "
                "(PostgreSQL: HARMONT_ARTIFACTS must name the same directory for every process)"
            )
        return path

    # --- API tokens ------------------------------------------------------------------------

    def list_tokens(self) -> list[TokenRow]:
        """Every token (revoked and expired ones too), oldest first."""
        return [TokenRow.from_db(r) for r in self._rows(sql.TOKENS)]

    def get_token(self, token_id: str) -> TokenRow | None:
        """A token by id (revoked and expired ones too)."""
        rows = self._rows(sql.TOKEN_BY_ID, (token_id,))
        return TokenRow.from_db(rows[0]) if rows else None

    def token_for_secret(self, secret: str) -> TokenRow | None:
        """The token whose secret is ``secret`` (compared by SHA-256), usable or not."""
        rows = self._rows(sql.TOKEN_BY_HASH, (token_hash(secret),))
        return TokenRow.from_db(rows[0]) if rows else None

    def verify(self) -> Verification:
        """Check the whole record (``harmont-exec verify``; see ``store.verify``): read only."""
        return check_record(self._rows, self._backend.dialect, self.blobs)
