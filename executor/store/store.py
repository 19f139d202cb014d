"""``Store`` ties the reads, the writer and the record, on either backend (``backend.py``).

Writes come from one executor process and one thread (its event loop). ``create_build`` is
synchronous (the runner needs the ids) and takes the build's number from its pipeline row in
the same transaction as the build (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the ``UPDATE ...
RETURNING`` locks the pipeline row until commit), so executors sharing a store never get the
same number. Everything else
(``record_*``, ``append_log``) becomes a change value (``changes``) queued for the writer
thread (group commit, see ``writer``) and returns at once; ``flush`` waits for it and raises the
first failed write. This process is the only writer of the builds it creates, so the per-job
sequence numbers of the history and the log, and each job's changing columns, are kept here, in
memory; the queued write methods must therefore not be called from two threads at once (the
synchronous ones take the store's lock: `serve`'s request threads create queued builds and
cancel while its queue's thread records the running builds). Nothing here
decides states: the transition table lives in ``executor.states`` and the runner applies it
before it records; the store only refuses (as a bug) a change whose ``from_state`` is not the
job's state in the store.

A build may also be created queued, for a `serve` of this host to claim
(``claim_queued_build``), or refused (``record_refused_build``); a cancel is requested of any
build (``request_cancel``): the transactions are in ``queue``. Organizations, pipelines, tokens
and keys are written by ``Catalog`` (``catalog``), which this class extends.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from executor.errors import (
    BuildNotFoundError,
    ErrorCode,
    InternalError,
    StoreError,
    StoreReadOnlyError,
)
from executor.plan import Plan
from executor.states import BuildState, Event, JobState
from executor.store import sql
from executor.store.backend import Backend, migrate
from executor.store.blobs import Blob
from executor.store.catalog import TOKEN_PREFIX, Catalog
from executor.store.changes import (
    ArtifactRecorded,
    AttemptFinished,
    AttemptStarted,
    BuildChanged,
    Change,
    JobChanged,
    LogAppended,
)
from executor.store.failures import Failure
from executor.store.liveness import (
    LOST_AFTER_S,
    executor_alive,
    kill_job_processes,
    process_identity,
)
from executor.store.names import check_organization_slug
from executor.store.queue import (
    QUEUED,
    Executor,
    NewBuild,
    cancel_build,
    claim_build,
    insert_build,
    plan_rows,
)
from executor.store.recovery import LostBuild, abandon_build, reopen_build, reuse_results
from executor.store.rows import (
    UNSET,
    BuildRow,
    CreatedBuild,
    Unset,
    format_time,
    parse_time,
)
from executor.store.writer import Writer

__all__ = ["TOKEN_PREFIX", "LostBuild", "Store"]


_STREAMS = frozenset({"stdout", "stderr", "meta"})
_NEW_JOB = (JobState.PENDING.value, None, 0, None, None, 0, None, None)  # sql.JOB_COLUMNS
# When this process loaded the store: with host and pid it tells a live executor from a pid
# that was reused after a crash.
_PROCESS_STARTED_AT = format_time(datetime.now(UTC))
_IDENTITY = process_identity()


def _value(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, bool):
        return int(value)
    return value


def _fields(**given: Any) -> tuple[tuple[str, ...], list[Any]]:
    """The names and database values of the keyword arguments that were passed (not UNSET)."""
    names = tuple(name for name, v in given.items() if v is not UNSET)
    return names, [_value(given[name]) for name in names]


class Store(Catalog):
    """The record of builds in one store (a SQLite file or a PostgreSQL database). Open it with
    ``open_store``; use it as a context manager or call ``close()``."""

    def __init__(self, backend: Backend) -> None:
        opening: tuple[type[Exception], ...] = (OSError, *backend.errors)
        try:
            self.tightened = backend.prepare()  # private, whatever the umask (SPEC §5)
            db = backend.connect()
        except opening as exc:
            raise StoreError(
                f"cannot open the store {backend.location}: {exc}; check the path and its "
                "permissions"
            ) from None
        super().__init__(backend, db)
        try:
            with self._lock:
                migrate(db, backend)
        except backend.errors as exc:
            db.close()
            raise backend.error("create or read the schema", exc) from None
        except BaseException:
            db.close()
            raise
        self._writer: Writer | None = None
        self._closed = False
        self._reported: StoreError | None = None
        self._trouble_reported: StoreError | None = None
        self._transition_seq: dict[str, int] = {}  # job id -> next history seq
        self._log_seq: dict[str, int] = {}  # job id -> last log chunk seq
        self._job_columns: dict[str, list[Any]] = {}  # job id -> its sql.JOB_COLUMNS, as queued
        self._commit_listeners: list[Callable[[int], None]] = []

    def __repr__(self) -> str:
        return f"Store({self.location!r})"  # never the URL: it may carry a password

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- creating a build (synchronous) ------------------------------------------------------

    def create_build(
        self,
        *,
        org: str,
        pipeline: str,
        plan: Plan,
        build_file: str | None,
        working_dir: str | Callable[[int], str],
        source: str = "api",
        branch: str | None = None,
        commit: str | None = None,
        message: str | None = None,
        queued: bool = False,
        reuse: Mapping[str, str] | None = None,
        now: datetime,
    ) -> CreatedBuild:
        """Record a new build of ``plan`` (state ``scheduled``) with one ``pending`` job per
        step, in plan order, and each job's first history row; committed when it returns.
        Creates the organization and pipeline on first use.

        This process is its executor, unless ``queued``: then it waits in the `serve` queue of
        this host for ``claim_queued_build``. ``working_dir`` may be a function of the build's
        number, called inside the transaction, that puts the directory in place and returns
        it (the service moves an unpacked upload there; if it raises, nothing is recorded).
        ``reuse`` (step key -> an earlier passed job's id; ``retry --failed``): those jobs
        take that result (event ``reused``) in the same transaction."""
        self._check_open()
        check_organization_slug(org)
        at = format_time(now)
        build_id = str(uuid.uuid4())
        job_ids = {key: str(uuid.uuid4()) for key in plan.order}
        jobs, edges, created = plan_rows(plan, build_id, job_ids, at)
        pairs = [(job_ids[key], old_id) for key, old_id in (reuse or {}).items()]
        new = NewBuild(
            build_id,
            org,
            pipeline,
            BuildState.SCHEDULED,
            source,
            branch,
            commit,
            message,
            at,
            build_file,
            working_dir,
            json.dumps(plan.spec.to_data()),
            QUEUED if queued else self._executor(),
            socket.gethostname() if queued else None,
        )
        number = self._insert(new, f"{org}/{pipeline}", jobs, edges, created, pairs)
        if not queued:  # counted from here; a queued build's executor reads them from the file
            reused = {new_id for new_id, _ in pairs}
            for job_id in job_ids.values():
                if job_id not in reused:
                    self._transition_seq[job_id] = 1
                    self._job_columns[job_id] = list(_NEW_JOB)
                self._log_seq[job_id] = 0
        return CreatedBuild(build_id, number, org, pipeline, job_ids)

    def record_refused_build(
        self,
        *,
        org: str,
        pipeline: str,
        error_code: ErrorCode,
        error_message: str,
        plan: Plan | None,
        working_dir: str | Callable[[int], str],
        source: str = "api",
        branch: str | None = None,
        commit: str | None = None,
        message: str | None = None,
        now: datetime,
    ) -> BuildRow:
        """Record a build refused when it was submitted (its IR does not load, its source
        cannot be unpacked): ``failed`` at once with ``error_code`` and ``error_message``, no
        jobs, nothing to run, as Harmont keeps it. Returns its row."""
        self._check_open()
        build_id = str(uuid.uuid4())
        new = NewBuild(
            build_id,
            org,
            pipeline,
            BuildState.FAILED,
            source,
            branch,
            commit,
            message,
            format_time(now),
            None,
            working_dir,
            "null" if plan is None else json.dumps(plan.spec.to_data()),
            QUEUED,
            socket.gethostname(),
            (error_code.value, error_message),
        )
        self._insert(new, f"{org}/{pipeline}")
        return self._build_row(build_id)

    def _insert(
        self,
        new: NewBuild,
        name: str,
        jobs: Sequence[tuple[Any, ...]] = (),
        edges: Sequence[tuple[Any, ...]] = (),
        created: Sequence[tuple[Any, ...]] = (),
        reuse: list[tuple[str, str]] | None = None,
    ) -> int:
        try:
            with self._lock:
                number, _ = insert_build(
                    self._db, new, jobs=jobs, edges=edges, created=created, reuse=reuse
                )
        except self._errors as exc:
            raise self._backend.error(f"record a new build of {name}", exc) from None
        except ValueError as exc:
            raise StoreError(f"{exc}; this is a bug in harmont-exec") from None
        return number

    def _executor(self) -> Executor:
        """This process, as a build's executor (see store/liveness.py)."""
        return (socket.gethostname(), os.getpid(), _PROCESS_STARTED_AT, _IDENTITY)

    def _build_row(self, build_id: str) -> BuildRow:
        row = self.get_build_by_id(build_id)
        if row is None:  # written by this process a moment ago
            raise InternalError(f"build {build_id} is not in {self.location} after writing it")
        return row

    # --- the build queue of `serve` (synchronous) --------------------------------------------

    def claim_queued_build(self, now: datetime) -> BuildRow | None:
        """Take the oldest build queued on this host (``create_build(queued=True)``) for this
        process to run: its row, now with this process as its executor, or None if none is
        queued. Atomic: two processes (on either backend) never claim the same build."""
        self._check_open()
        try:
            with self._lock:
                build_id = claim_build(
                    self._db, self._backend.dialect, self._executor(), format_time(now)
                )
        except self._errors as exc:
            raise self._backend.error("claim a queued build", exc) from None
        if build_id is None:
            return None
        # Its jobs are as create_build made them (those a retry --failed passed excepted):
        # counted from here, without a read per job on the executor's event loop.
        for job_id, state in self._rows(sql.JOBS_OF_BUILD_STATES, (build_id,)):
            if state == JobState.PENDING.value:
                self._transition_seq[job_id] = 1
                self._job_columns[job_id] = list(_NEW_JOB)
                self._log_seq[job_id] = 0
        return self._build_row(build_id)

    def request_cancel(self, build_id: str, now: datetime) -> BuildRow:
        """Cancel a build, whoever runs it (SPEC §6.3), and return its row as recorded now: a
        queued one is ``canceled`` at once (its jobs too, through the transition table, in one
        transaction); a running one is marked ``cancel_requested``, and its executor cancels
        it within about a second, as a first SIGINT would; a finished one is unchanged.
        BuildNotFoundError if there is no such build."""
        self._check_open()
        try:
            with self._lock:
                canceled = cancel_build(
                    self._db,
                    self._backend.dialect,
                    build_id,
                    format_time(now),
                    "the build was canceled before it started",
                )
        except self._errors as exc:
            raise self._backend.error(f"cancel build {build_id}", exc) from None
        if canceled is None:
            raise BuildNotFoundError(f"no build with id {build_id} in {self.location}")
        self.forget_jobs(canceled)
        return self._build_row(build_id)

    def forget_jobs(self, job_ids: Iterable[str]) -> None:
        """Drop what this process keeps in memory about jobs whose build has ended (a
        long-running `serve` runs many builds). Call it only once their writes are flushed."""
        for job_id in job_ids:
            self._transition_seq.pop(job_id, None)
            self._log_seq.pop(job_id, None)
            self._job_columns.pop(job_id, None)

    # --- builds whose executor is gone (synchronous) -----------------------------------------

    def recover_lost_builds(self, now: datetime) -> list[LostBuild]:
        """Finish every unfinished build whose executor is gone (SPEC §5): its running jobs
        ``failed`` with ``executor_lost``, the others ``canceled``, the build ``failed`` with
        ``build_abandoned``; then SIGKILL what is left of their jobs' processes on this host.

        Each build is finished in one ``BEGIN IMMEDIATE`` transaction that re-reads its state,
        so when several processes notice at once, exactly one finishes it. A build whose
        executor runs on another host is lost only when its heartbeat is older than
        ``LOST_AFTER_S``; one that cannot be judged is left alone."""
        self._check_open()
        host = socket.gethostname()
        lost: list[LostBuild] = []
        for row in self._rows(sql.ACTIVE_BUILDS):
            if row["executor_host"] == host:
                alive = executor_alive(row["executor_id"], row["executor_pid"])
                if alive is not False:
                    continue
            else:
                beat = parse_time(row["heartbeat_at"])
                if beat is None or (now - beat).total_seconds() < LOST_AFTER_S:
                    continue
            executor = f"pid {row['executor_pid']} on {row['executor_host']}"
            try:
                with self._lock:
                    done = abandon_build(
                        self._db, self._backend.dialect, row["id"], row["state"], executor, now
                    )
            except self._errors as exc:
                if self._backend.failure(exc) is Failure.READ_ONLY:
                    self._backend.found_read_only()
                    raise StoreReadOnlyError(
                        f"{self._backend.location} is read-only: abandoned build "
                        f"#{row['number']} cannot be finished now"
                    ) from None
                raise self._backend.error(f"finish abandoned build #{row['number']}", exc) from None
            if done is None:
                continue  # another process finished it first
            job_ids, lost_jobs, canceled, stopped, resumable = done
            killed = kill_job_processes(job_ids) if row["executor_host"] == host else 0
            lost.append(
                LostBuild(
                    row["id"],
                    row["number"],
                    row["org"],
                    row["pipeline"],
                    executor,
                    lost_jobs,
                    canceled,
                    stopped,
                    killed,
                    resumable,
                )
            )
        return lost

    def reopen_abandoned_build(self, build_id: str, now: datetime) -> list[str] | None:
        """Claim an abandoned build for this process and make its lost and never-started
        jobs ``pending`` again (``harmont-exec resume``); their ids, or None if the build is
        not abandoned (any more)."""
        self._check_open()
        executor = (socket.gethostname(), os.getpid(), _PROCESS_STARTED_AT, _IDENTITY)
        try:
            with self._lock:
                reopened = reopen_build(self._db, build_id, executor, now)
        except self._errors as exc:
            raise self._backend.error(f"reopen build {build_id}", exc) from None
        if reopened is not None:
            for job_id in reopened:  # the file has them now: counted from there
                self._transition_seq.pop(job_id, None)
                self._log_seq.pop(job_id, None)
                self._job_columns.pop(job_id, None)
        return reopened

    def reuse_passed_results(self, pairs: list[tuple[str, str]], now: datetime) -> None:
        """``retry --failed``: each (new pending job id, earlier passed job id) takes the
        earlier job's result (``passed``, event ``reused``), artifacts included."""
        self._check_open()
        try:
            with self._lock:
                reuse_results(self._db, pairs, now)
        except self._errors as exc:
            raise self._backend.error("take results from the earlier build", exc) from None
        except ValueError as exc:
            raise StoreError(f"{exc}; this is a bug in harmont-exec") from None
        for new_id, _ in pairs:  # the file has them now: counted from there
            self._transition_seq.pop(new_id, None)
            self._job_columns.pop(new_id, None)

    # --- queued writes -------------------------------------------------------------------------

    def record_job_transition(
        self,
        job_id: str,
        *,
        from_state: JobState,
        event: Event,
        to_state: JobState,
        at: datetime,
        exit_code: int | Unset | None = UNSET,
        soft_failed: bool | Unset = UNSET,
        error_code: str | Unset | None = UNSET,
        error_message: str | Unset | None = UNSET,
        retries_count: int | Unset = UNSET,
        started_at: datetime | Unset = UNSET,
        finished_at: datetime | Unset = UNSET,
    ) -> None:
        """Queue one state change: the job row moves ``from_state`` -> ``to_state`` (with the
        given fields) and its history gains a row, in one transaction. A job that is not in
        ``from_state`` when the write is applied is a bug: ``flush()`` raises StoreError."""
        # The job's whole row is queued (the writer keeps only a batch's last one per job), so
        # this process keeps it in memory; spelled out rather than looped: it runs several
        # times per job on the event loop.
        columns = self._job_columns.get(job_id)
        if columns is None:
            columns = self._job_columns[job_id] = self._current_columns(job_id)
        columns[0] = to_state.value
        if exit_code is not UNSET:
            columns[1] = exit_code
        if soft_failed is not UNSET:
            columns[2] = int(soft_failed)
        if error_code is not UNSET:
            columns[3] = error_code
        if error_message is not UNSET:
            columns[4] = error_message
        if retries_count is not UNSET:
            columns[5] = retries_count
        if started_at is not UNSET:
            columns[6] = format_time(started_at)
        if finished_at is not UNSET:
            columns[7] = format_time(finished_at)
        seq = self._transition_seq.get(job_id)
        if seq is None:
            last = self._last_seq(sql.LAST_TRANSITION_SEQ, job_id)
            seq = 1 if last is None else last + 1
        when = format_time(at)
        self._put(
            JobChanged(
                job_id, seq, from_state.value, event.value, to_state.value, when, tuple(columns)
            )
        )
        self._transition_seq[job_id] = seq + 1

    def record_build(
        self,
        build_id: str,
        *,
        state: BuildState,
        at: datetime,
        started_at: datetime | Unset = UNSET,
        finished_at: datetime | Unset = UNSET,
        error_code: str | Unset | None = UNSET,
        error_message: str | Unset | None = UNSET,
        cancel_requested: bool | Unset = UNSET,
    ) -> None:
        """Queue a change of the build row; also sets ``heartbeat_at`` to ``at``."""
        names, values = _fields(
            state=state.value,
            heartbeat_at=at,
            started_at=started_at,
            finished_at=finished_at,
            error_code=error_code,
            error_message=error_message,
            cancel_requested=cancel_requested,
        )
        self._put(BuildChanged(build_id, names, tuple(values)))

    def record_heartbeat(self, build_id: str, *, at: datetime) -> None:
        """Queue "the executor of this build is alive at ``at``" (see store/liveness.py)."""
        self._put(BuildChanged(build_id, ("heartbeat_at",), (format_time(at),)))

    def record_attempt_started(self, job_id: str, number: int, *, at: datetime) -> None:
        """Queue the start of attempt ``number`` (1, 2, ...) of a job."""
        self._put(AttemptStarted(job_id, number, format_time(at)))

    def record_attempt_finished(
        self,
        job_id: str,
        number: int,
        *,
        outcome: str,
        exit_code: int | None,
        signal: int | None,
        at: datetime,
    ) -> None:
        """Queue the end of an attempt (its row is created if it never started)."""
        self._put(AttemptFinished(job_id, number, outcome, exit_code, signal, format_time(at)))

    def append_log(
        self,
        job_id: str,
        attempt: int,
        stream: str,
        content: bytes | bytearray | memoryview,
        *,
        at: datetime,
    ) -> None:
        """Queue a chunk of a job's output (``stream`` stdout or stderr), or one of
        harmont-exec's own lines about the job (``meta``), stored byte for byte; chunks are
        numbered per job in call order from 1."""
        if stream not in _STREAMS:
            raise StoreError(
                f"log stream {stream!r} is not 'stdout', 'stderr' or 'meta' (harmont-exec's own "
                "lines); this is a bug in harmont-exec"
            )
        when = format_time(at)
        data = bytes(content)  # a copy: the caller may reuse its buffer before the write
        last = self._log_seq.get(job_id)
        if last is None:
            last = self._last_seq(sql.LAST_LOG_SEQ, job_id) or 0
        seq = last + 1
        self._put(LogAppended(job_id, seq, attempt, stream, data, when))
        self._log_seq[job_id] = seq

    def record_artifact(
        self, job_id: str, *, path: str, mime_type: str, blob: Blob, at: datetime
    ) -> str:
        """Queue the record of an artifact of a job whose content is already in ``blobs``
        (``blobs.put``); return its id. ``path`` is relative to the working directory."""
        try:
            path.encode("utf-8")  # checked now: a bad value must never reach the writer
        except UnicodeEncodeError:
            raise StoreError(
                f"artifact path {path!r} of job {job_id} is not valid UTF-8; the store keeps "
                "text paths (the collector skips such names: this is a bug)"
            ) from None
        artifact_id = str(uuid.uuid4())
        filename = path.rsplit("/", 1)[-1]
        self._put(
            ArtifactRecorded(
                artifact_id,
                job_id,
                path,
                filename,
                mime_type,
                blob.size,
                blob.sha1,
                blob.sha256,
                "uploaded",
                format_time(at),
            )
        )
        return artifact_id

    def _last_seq(self, query: str, job_id: str) -> int | None:
        """The last seq in the file, for a job this process did not create (a resumed build):
        read once, then counted in memory."""
        last = self._rows(query, (job_id,))[0][0]
        return None if last is None else int(last)

    def _current_columns(self, job_id: str) -> list[Any]:
        """The job's changing columns as in the file, for a job this process did not create."""
        rows = self._rows(sql.JOB_COLUMNS_NOW, (job_id,))
        if not rows:
            raise StoreError(
                f"no job {job_id} in {self._backend.location}; record changes of its own jobs"
            )
        return list(rows[0])

    def _check_writable(self) -> None:
        self._check_open()
        error = self._writer.error if self._writer is not None else None
        if error is not None:
            self._reported = error
            raise error

    def _put(self, change: Change) -> None:
        writer = self._writer
        if writer is not None and writer.error is None and not self._closed:
            writer.put(change)  # the usual case, several times per job: checks inlined
            return
        self._check_writable()
        if self._writer is None:
            try:
                self._writer = Writer(self._backend, on_commit=self._committed_to)
            except self._errors as exc:
                raise self._backend.error("start recording", exc) from None
            # A store dropped without close() still commits its queue (at exit at the latest).
            weakref.finalize(self, self._writer.close)
        self._writer.put(change)

    # --- what is on disk --------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """How many changes were queued so far (the ``record_*`` and ``append_log`` calls)."""
        return 0 if self._writer is None else self._writer.queued

    @property
    def committed(self) -> int:
        """How many of the queued changes are committed (on disk, synced): every change up
        to this count. A caller that must not show a change before it is durable (SPEC §5)
        compares ``queued`` right after its write with this."""
        return 0 if self._writer is None else self._writer.committed

    @property
    def trouble(self) -> StoreError | None:
        """The disk filled (the last writes went to the reserve): the build must stop now;
        its state changes are still recorded, its output no more."""
        return None if self._writer is None else self._writer.trouble

    @property
    def dropped_output(self) -> dict[str, int]:
        """Job id -> bytes of its output not recorded since the disk filled."""
        return {} if self._writer is None else dict(self._writer.dropped_output)

    def add_commit_listener(self, listener: Callable[[int], None]) -> Callable[[], None]:
        """Call ``listener(committed)`` after every commit, from the writer's thread (so it
        must only hand the news to its own thread); returns a function that removes it."""
        self._commit_listeners.append(listener)
        return lambda: self._commit_listeners.remove(listener)

    def _committed_to(self, count: int) -> None:
        for listener in list(self._commit_listeners):
            listener(count)

    # --- lifecycle -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Block until everything queued before this call is committed. Raises StoreError if
        any queued write failed (then nothing queued after it was saved), or once if the disk
        filled (``trouble``: state changes are still saved, output no more). Thread-safe."""
        writer = self._writer
        if writer is None:
            return
        writer.flush()
        if writer.error is not None:
            self._reported = writer.error
            raise writer.error
        if writer.trouble is not None and writer.trouble is not self._trouble_reported:
            self._trouble_reported = writer.trouble  # once: its writes still go on
            raise writer.trouble

    def close(self) -> None:
        """Flush, stop the writer and close the connections. Idempotent. Raises a failed
        write's StoreError unless ``flush`` or a record call already raised it."""
        if self._closed:
            return
        self._closed = True
        error: StoreError | None = None
        if self._writer is not None:
            self._writer.close()
            error = self._writer.error
        with self._lock:
            self._db.close()
        self._close_readers()
        if error is not None and error is not self._reported:
            self._reported = error
            raise error
