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
memory; the write methods must therefore not be called from two threads at once. Nothing here
decides states: the transition table lives in ``executor.states`` and the runner applies it
before it records; the store only refuses (as a bug) a change whose ``from_state`` is not the
job's state in the store.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import uuid
import weakref
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from executor.errors import StoreError, StoreReadOnlyError
from executor.plan import Plan
from executor.states import BuildState, Event, JobState
from executor.store import sql
from executor.store.backend import Backend, migrate
from executor.store.blobs import Blob
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
from executor.store.reads import Reader, token_hash
from executor.store.recovery import LostBuild, abandon_build, reopen_build, reuse_results
from executor.store.rows import UNSET, CreatedBuild, TokenRow, Unset, format_time, parse_time
from executor.store.writer import Writer

__all__ = ["TOKEN_PREFIX", "LostBuild", "Store"]

TOKEN_PREFIX = "hm_"
"""Every API token starts with this (Harmont's format: ``hm_`` + 43 url-safe characters)."""

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


class Store(Reader):
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
        working_dir: str,
        source: str = "api",
        branch: str | None = None,
        commit: str | None = None,
        message: str | None = None,
        now: datetime,
    ) -> CreatedBuild:
        """DbRow a new build of ``plan`` (state ``scheduled``) with one ``pending`` job per
        step, in plan order, and each job's first history row; committed when it returns.
        Creates the organization and pipeline on first use."""
        self._check_open()
        at = format_time(now)
        build_id = str(uuid.uuid4())
        job_ids = {key: str(uuid.uuid4()) for key in plan.order}
        jobs = [
            (
                job_ids[step.key],
                build_id,
                position,
                step.key,
                step.label,
                step.command,
                JobState.PENDING.value,
                None
                if step.retry_policy is None
                else json.dumps(step.retry_policy.model_dump(mode="json")),
                None
                if step.soft_fail_policy is None
                else json.dumps(step.soft_fail_policy.model_dump(mode="json")),
                at,
            )
            for position, step in enumerate(plan)
        ]
        edges = [
            (job_ids[e.target], job_ids[e.source], ",".join(k.value for k in e.kinds))
            for e in plan.edges
        ]
        created = [
            (job_id, 0, None, "created", JobState.PENDING.value, at) for job_id in job_ids.values()
        ]
        plan_json = json.dumps(plan.spec.to_data())
        try:
            with self._lock:
                db = self._db
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute(sql.ENSURE_ORGANIZATION, (str(uuid.uuid4()), org, at))
                    org_id = db.execute(sql.ORGANIZATION_ID, (org,)).fetchone()[0]
                    db.execute(sql.ENSURE_PIPELINE, (str(uuid.uuid4()), org_id, pipeline, at))
                    pipeline_id = db.execute(sql.PIPELINE_ID, (org_id, pipeline)).fetchone()[0]
                    number = int(db.execute(sql.TAKE_BUILD_NUMBER, (pipeline_id,)).fetchone()[0])
                    db.execute(
                        sql.INSERT_BUILD,
                        (
                            build_id,
                            pipeline_id,
                            number,
                            BuildState.SCHEDULED.value,
                            source,
                            branch,
                            commit,
                            message,
                            at,
                            at,
                            build_file,
                            working_dir,
                            plan_json,
                            socket.gethostname(),
                            os.getpid(),
                            _PROCESS_STARTED_AT,
                            at,
                            _IDENTITY,
                        ),
                    )
                    db.executemany(sql.INSERT_JOB, jobs)
                    db.executemany(sql.INSERT_DEPENDENCY, edges)
                    db.executemany(sql.INSERT_TRANSITION, created)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
        except self._errors as exc:
            raise self._backend.error(f"record a new build of {org}/{pipeline}", exc) from None
        for job_id in job_ids.values():
            self._transition_seq[job_id] = 1
            self._log_seq[job_id] = 0
            self._job_columns[job_id] = list(_NEW_JOB)
        return CreatedBuild(build_id, number, org, pipeline, job_ids)

    # --- API tokens (synchronous) ------------------------------------------------------------

    def create_token(
        self,
        *,
        description: str | None,
        organizations: Sequence[str] | None,
        expires_at: datetime | None,
        now: datetime,
    ) -> tuple[TokenRow, str]:
        """DbRow a new API token; return its row and its secret (``hm_`` + 43 url-safe
        characters), which is not stored and cannot be shown again. ``organizations`` limits
        what it sees (None: every organization)."""
        self._check_open()
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = str(uuid.uuid4())
        orgs = None if organizations is None else json.dumps(sorted(set(organizations)))
        expires = None if expires_at is None else format_time(expires_at)
        args = (token_id, token_hash(secret), description, orgs, format_time(now), expires)
        try:
            with self._lock:
                self._db.execute(sql.INSERT_TOKEN, args)
                row = self._db.execute(sql.TOKEN_BY_ID, (token_id,)).fetchone()
        except self._errors as exc:
            raise self._backend.error("record a new API token", exc) from None
        return TokenRow.from_db(row), secret

    def revoke_token(self, token_id: str, *, now: datetime) -> TokenRow | None:
        """Revoke a token (at once: the next request with it gets 401). Returns its row, or
        None if there is no such token; revoking twice keeps the first time."""
        self._check_open()
        try:
            with self._lock:
                self._db.execute(sql.REVOKE_TOKEN, (format_time(now), token_id))
                row = self._db.execute(sql.TOKEN_BY_ID, (token_id,)).fetchone()
        except self._errors as exc:
            raise self._backend.error(f"revoke API token {token_id}", exc) from None
        return None if row is None else TokenRow.from_db(row)

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

    # --- the store's own keys (synchronous) -------------------------------------------------

    def store_key(self, name: str) -> bytes:
        """A 32-byte secret kept in the store under ``name``, made by the first process that
        asks; every process sharing the store gets the same one (e.g. the live-log tokens'
        HMAC key, so a token minted by one server is good at another)."""
        self._check_open()
        try:
            with self._lock:
                found = self._db.execute(sql.STORE_KEY, (name,)).fetchone()
                if found is None:  # (only then a write: a read-only store with one works)
                    now = format_time(datetime.now(UTC))
                    self._db.execute(sql.ENSURE_STORE_KEY, (name, secrets.token_hex(32), now))
                    found = self._db.execute(sql.STORE_KEY, (name,)).fetchone()
        except self._errors as exc:
            if self._backend.failure(exc) is Failure.READ_ONLY or self._backend.read_only():
                raise StoreReadOnlyError(
                    f"the store {self.location} is read-only and has no {name!r} key yet (it "
                    "is made the first time it is needed); open the store once where it can be "
                    "written"
                ) from None
            raise self._backend.error(f"read or create the key {name!r}", exc) from None
        return bytes.fromhex(found[0])

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

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store {self._backend.location} is closed; open it again")

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
