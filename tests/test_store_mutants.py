"""The store's transition writes (the writer's batches, recovery, reuse), one behaviour per test
(docs/mutation.md: each test here kills mutants the broader store tests let survive)."""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from executor import build_plan, parse_build_text
from executor.errors import ErrorCode, InternalError, StoreError
from executor.states import BuildState, Event, JobState, transition
from executor.store import CreatedBuild, Store, open_store, resolve_backend, sql
from executor.store.backend import Connection
from executor.store.changes import (
    ArtifactRecorded,
    AttemptFinished,
    AttemptStarted,
    BuildChanged,
    JobChanged,
    LogAppended,
    apply_batch,
    apply_one,
)
from executor.store.recovery import abandon_build, reopen_build, reuse_results
from executor.store.rows import format_time

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
LATER = NOW + timedelta(minutes=5)
EXECUTOR = "pid 1 on gone-host"
LOST = f"the executor ({EXECUTOR}) stopped before the build ended"

# Where each job of the lost build was left when its executor died.
LEFT = {
    "run": (Event.READY, Event.SLOT_ACQUIRED, Event.STARTED),
    "assigned": (Event.READY, Event.SLOT_ACQUIRED),
    "waiting": (),
    "retrying": (Event.READY, Event.SLOT_ACQUIRED, Event.STARTED, Event.RETRY_SCHEDULED),
    "stopping": (Event.READY, Event.SLOT_ACQUIRED, Event.STARTED, Event.CANCEL_REQUESTED),
    "timing": (Event.READY, Event.SLOT_ACQUIRED, Event.STARTED, Event.TIMEOUT_EXPIRED),
    "done": (Event.READY, Event.SLOT_ACQUIRED, Event.STARTED, Event.EXITED_ZERO),
}
UNFINISHED = ["run", "assigned", "waiting", "retrying", "stopping", "timing"]


def _create(store: Store, keys: list[str]) -> CreatedBuild:
    text = "steps:\n" + "".join(f"  - {{key: {k}, command: x}}\n" for k in keys)
    return store.create_build(
        org="local",
        pipeline="p",
        plan=build_plan(parse_build_text(text)),
        build_file=None,
        working_dir="/tmp",
        now=T0,
    )


def _walk(store: Store, job_id: str, events: tuple[Event, ...]) -> None:
    state = JobState.PENDING
    for event in events:
        new = transition(state, event)
        fields: dict[str, Any] = {}
        if event is Event.RETRY_SCHEDULED:
            fields = {"exit_code": 1, "retries_count": 2}
        elif event is Event.CANCEL_REQUESTED:
            fields = {"error_code": ErrorCode.BUILD_CANCELED, "error_message": "stop it"}
        elif event is Event.TIMEOUT_EXPIRED:
            fields = {"error_code": ErrorCode.JOB_TIMEOUT, "error_message": "too slow"}
        elif event is Event.EXITED_ZERO:
            fields = {"exit_code": 0, "finished_at": T0}
        store.record_job_transition(
            job_id, from_state=state, event=event, to_state=new, at=T0, **fields
        )
        state = new


@pytest.fixture
def lost(store: Store) -> CreatedBuild:
    """A running build whose jobs were left as ``LEFT`` says."""
    created = _create(store, list(LEFT))
    store.record_build(created.id, state=BuildState.RUNNING, at=T0, started_at=T0)
    for key, events in LEFT.items():
        _walk(store, created.job_ids[key], events)
    store.record_attempt_started(created.job_ids["run"], 1, at=T0)
    store.flush()
    return created


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A new store of each backend (the transition writes have a dialect)."""
    with open_store(store_url) as opened:
        yield opened


@pytest.fixture
def db(store: Store) -> Iterator[Connection]:
    """A second connection to the store, as another process would have."""
    connection = resolve_backend(store.url).connect()
    yield connection
    connection.close()


class Refused(Exception):
    """What ``_Refusing`` raises for the statement it refuses (a full disk, say)."""


class _Refusing:
    """A driver connection that refuses ``statement`` as the database would, with ``Refused``."""

    def __init__(self, db: Connection, statement: str) -> None:
        self._db = db
        self._statement = statement

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    def execute(self, statement: str, parameters: Any = (), /) -> Any:
        if statement == self._statement:
            raise Refused(statement)
        return self._db.execute(statement, parameters)

    def executemany(self, statement: str, parameters: Any, /) -> Any:
        return self._db.executemany(statement, parameters)

    def cursor(self) -> Any:
        return self._db.cursor()

    def close(self) -> None:
        self._db.close()


def _states(store: Store, created: CreatedBuild) -> dict[str, tuple[Any, ...]]:
    jobs = {j.step_key: j for j in store.list_jobs(created.id)}
    return {k: (j.state, j.error_code, j.error_message) for k, j in jobs.items()}


def _abandon(store: Store, db: Connection, created: CreatedBuild) -> Any:
    return abandon_build(db, store._backend.dialect, created.id, "running", EXECUTOR, NOW)


# --- recovery: a build whose executor is gone --------------------------------------------------


def test_abandon_build_returns_the_jobs_it_ended_and_how_many_of_each_kind(
    store: Store, lost: CreatedBuild, db: Connection
) -> None:
    job_ids, live, not_started, stopping, resumable = _abandon(store, db, lost)
    assert job_ids == [lost.job_ids[k] for k in UNFINISHED]
    assert (live, not_started, stopping, resumable) == (2, 2, 2, 4)


def test_abandon_build_records_why_each_job_ended(
    store: Store, lost: CreatedBuild, db: Connection
) -> None:
    _abandon(store, db, lost)
    assert _states(store, lost) == {
        "run": (JobState.FAILED, ErrorCode.EXECUTOR_LOST, LOST),
        "assigned": (JobState.FAILED, ErrorCode.EXECUTOR_LOST, LOST),
        "waiting": (JobState.CANCELED, ErrorCode.BUILD_ABANDONED, f"not started: {LOST}"),
        "retrying": (
            JobState.CANCELED,
            ErrorCode.BUILD_ABANDONED,
            f"waiting to retry (after attempt 2): {LOST}",
        ),
        "stopping": (JobState.CANCELED, ErrorCode.BUILD_CANCELED, "stop it"),  # its own error
        "timing": (JobState.TIMED_OUT, ErrorCode.JOB_TIMEOUT, "too slow"),
        "done": (JobState.PASSED, None, None),
    }


def test_abandon_build_appends_each_ended_jobs_move_to_its_history(
    store: Store, lost: CreatedBuild, db: Connection
) -> None:
    _abandon(store, db, lost)
    last = {k: store.job_transitions(lost.job_ids[k])[-1] for k in UNFINISHED}
    assert {k: (t.seq, t.from_state, t.event, t.to_state, t.at) for k, t in last.items()} == {
        "run": (4, JobState.RUNNING, "executor_lost", JobState.FAILED, NOW),
        "assigned": (3, JobState.ASSIGNED, "executor_lost", JobState.FAILED, NOW),
        "waiting": (1, JobState.PENDING, "cancel_requested", JobState.CANCELED, NOW),
        "retrying": (5, JobState.SCHEDULED, "cancel_requested", JobState.CANCELED, NOW),
        "stopping": (5, JobState.CANCELING, "process_gone", JobState.CANCELED, NOW),
        "timing": (5, JobState.TIMING_OUT, "process_gone", JobState.TIMED_OUT, NOW),
    }


def test_abandon_build_leaves_alone_a_build_another_process_moved_first(
    store: Store, lost: CreatedBuild, db: Connection
) -> None:
    before = _states(store, lost)
    assert abandon_build(db, store._backend.dialect, lost.id, "scheduled", EXECUTOR, NOW) is None
    assert not db.in_transaction
    assert _states(store, lost) == before


def test_abandon_build_rolls_back_and_reraises_a_refused_write(
    store: Store, lost: CreatedBuild, db: Connection
) -> None:
    before = _states(store, lost)
    refusing = _Refusing(db, sql.END_OPEN_ATTEMPTS)
    with pytest.raises(Refused):
        abandon_build(refusing, store._backend.dialect, lost.id, "running", EXECUTOR, NOW)
    assert not db.in_transaction
    assert _states(store, lost) == before


# --- recovery: resume ------------------------------------------------------------------------


@pytest.fixture
def abandoned(store: Store, lost: CreatedBuild, db: Connection) -> CreatedBuild:
    _abandon(store, db, lost)
    return lost


def test_store_reopen_abandoned_build_makes_its_lost_and_unstarted_jobs_pending(
    store: Store, abandoned: CreatedBuild
) -> None:
    reopened = store.reopen_abandoned_build(abandoned.id, LATER)
    assert reopened == [abandoned.job_ids[k] for k in ("run", "assigned", "waiting", "retrying")]
    jobs = {j.step_key: j for j in store.list_jobs(abandoned.id)}
    for key in ("run", "assigned", "waiting", "retrying"):
        job = jobs[key]
        assert (job.state, job.exit_code, job.soft_failed) == (JobState.PENDING, None, False)
        assert (job.error_code, job.error_message, job.finished_at) == (None, None, None)
    assert jobs["stopping"].state is JobState.CANCELED
    assert jobs["timing"].state is JobState.TIMED_OUT
    assert jobs["done"].state is JobState.PASSED


def test_store_reopen_abandoned_build_appends_a_resumed_move_to_each_history(
    store: Store, abandoned: CreatedBuild
) -> None:
    store.reopen_abandoned_build(abandoned.id, LATER)
    last = store.job_transitions(abandoned.job_ids["run"])[-2:]
    assert [(t.seq, t.from_state, t.event, t.to_state, t.at) for t in last] == [
        (4, JobState.RUNNING, "executor_lost", JobState.FAILED, NOW),
        (5, JobState.FAILED, "resumed", JobState.PENDING, LATER),
    ]


def test_store_reopen_abandoned_build_runs_it_again_under_this_process(
    store: Store, abandoned: CreatedBuild
) -> None:
    store.reopen_abandoned_build(abandoned.id, LATER)
    build = store.get_build_by_id(abandoned.id)
    assert build is not None
    assert (build.state, build.error_code, build.error_message, build.finished_at) == (
        BuildState.RUNNING,
        None,
        None,
        None,
    )
    assert (build.executor_host, build.executor_pid) == (socket.gethostname(), os.getpid())
    assert (build.heartbeat_at, build.cancel_requested) == (LATER, False)


def test_store_reopen_abandoned_build_refuses_a_build_that_is_not_abandoned(
    store: Store, lost: CreatedBuild
) -> None:
    before = _states(store, lost)
    assert store.reopen_abandoned_build(lost.id, LATER) is None
    assert _states(store, lost) == before


def test_reopen_build_rolls_back_and_reraises_a_refused_write(
    store: Store, abandoned: CreatedBuild, db: Connection
) -> None:
    before = _states(store, abandoned)
    refusing = _Refusing(db, sql.INSERT_TRANSITION)
    executor = ("host", 1, format_time(T0), None)
    with pytest.raises(Refused):
        reopen_build(refusing, abandoned.id, executor, LATER)
    assert not db.in_transaction
    assert _states(store, abandoned) == before


# --- recovery: retry --failed takes passed results ----------------------------------------------


@pytest.fixture
def earlier(store: Store) -> CreatedBuild:
    """A build whose job ``a`` passed, with two artifacts, and whose ``b`` failed."""
    created = _create(store, ["a", "b"])
    _walk(store, created.job_ids["a"], LEFT["done"])
    fail = (Event.READY, Event.SLOT_ACQUIRED, Event.STARTED, Event.EXITED_NONZERO)
    _walk(store, created.job_ids["b"], fail)
    for name in ("log.txt", "report.txt"):
        blob = store.blobs.put(io.BytesIO(name.encode()))
        store.record_artifact(
            created.job_ids["a"], path=f"out/{name}", mime_type="text/plain", blob=blob, at=T0
        )
    store.flush()
    return created


def test_store_reuse_passed_results_takes_the_earlier_jobs_result(
    store: Store, earlier: CreatedBuild
) -> None:
    again = _create(store, ["a", "b"])
    old_id, new_id = earlier.job_ids["a"], again.job_ids["a"]
    store.reuse_passed_results([(new_id, old_id)], LATER)
    old, new = store.get_job(old_id), store.get_job(new_id)
    assert old is not None and new is not None
    assert (new.state, new.exit_code, new.reused_from_job_id) == (JobState.PASSED, 0, old_id)
    assert (new.started_at, new.finished_at) == (old.started_at, old.finished_at)


def test_store_reuse_passed_results_records_the_reuse_in_the_history(
    store: Store, earlier: CreatedBuild
) -> None:
    again = _create(store, ["a", "b"])
    store.reuse_passed_results([(again.job_ids["a"], earlier.job_ids["a"])], LATER)
    history = store.job_transitions(again.job_ids["a"])
    assert [(t.seq, t.from_state, t.event, t.to_state, t.at) for t in history[1:]] == [
        (1, JobState.PENDING, "reused", JobState.PASSED, LATER)
    ]


def test_store_reuse_passed_results_copies_the_artifact_records(
    store: Store, earlier: CreatedBuild
) -> None:
    again = _create(store, ["a", "b"])
    store.reuse_passed_results([(again.job_ids["a"], earlier.job_ids["a"])], LATER)
    old = store.list_artifacts(job_id=earlier.job_ids["a"])
    new = store.list_artifacts(job_id=again.job_ids["a"])
    fields = ("path", "filename", "mime_type", "file_size", "sha1_sum", "sha256", "state")
    assert [[getattr(a, f) for f in fields] for a in new] == [
        [getattr(a, f) for f in fields] for a in old
    ]
    assert [a.created_at for a in new] == [a.created_at for a in old]
    assert {a.job_id for a in new} == {again.job_ids["a"]}
    assert not {a.id for a in new} & {a.id for a in old}


def test_store_reuse_passed_results_continues_the_jobs_history(
    store: Store, abandoned: CreatedBuild
) -> None:
    store.reopen_abandoned_build(abandoned.id, LATER)  # "waiting" is pending again
    waiting, done = abandoned.job_ids["waiting"], abandoned.job_ids["done"]
    store.reuse_passed_results([(waiting, done)], LATER)
    history = store.job_transitions(waiting)
    assert [(t.seq, t.event) for t in history] == [
        (0, "created"),
        (1, "cancel_requested"),
        (2, "resumed"),
        (3, "reused"),
    ]


def test_store_reuse_passed_results_refuses_a_job_that_did_not_pass(
    store: Store, earlier: CreatedBuild
) -> None:
    again = _create(store, ["a", "b"])
    pairs = [(again.job_ids["a"], earlier.job_ids["a"]), (again.job_ids["b"], earlier.job_ids["b"])]
    message = f"job {earlier.job_ids['b']} did not pass: its result cannot be reused; this is a bug"
    with pytest.raises(StoreError, match=f"^{message} in harmont-exec$"):
        store.reuse_passed_results(pairs, LATER)
    assert [j.state for j in store.list_jobs(again.id)] == [JobState.PENDING] * 2  # nothing kept


def test_store_reuse_passed_results_refuses_a_job_that_is_not_pending(
    store: Store, earlier: CreatedBuild
) -> None:
    again = _create(store, ["a", "b"])
    _walk(store, again.job_ids["a"], (Event.READY,))
    store.flush()
    message = f"job {again.job_ids['a']} is not pending: it cannot take a result"
    with pytest.raises(StoreError, match=f"^{message}; this is a bug in harmont-exec$"):
        store.reuse_passed_results([(again.job_ids["a"], earlier.job_ids["a"])], LATER)


def test_reuse_results_rolls_back_and_reraises_a_refused_write(
    store: Store, earlier: CreatedBuild, db: Connection
) -> None:
    again = _create(store, ["a", "b"])
    store.flush()
    refusing = _Refusing(db, sql.INSERT_ARTIFACT)
    with pytest.raises(Refused):
        reuse_results(refusing, [(again.job_ids["a"], earlier.job_ids["a"])], LATER)
    assert not db.in_transaction
    assert store.get_job(again.job_ids["a"]).state is JobState.PENDING  # type: ignore[union-attr]


# --- the writer's changes, applied on a connection of their own --------------------------------


def _columns(state: JobState) -> tuple[Any, ...]:
    return (state.value, None, 0, None, None, 0, None, None)


def _in_transaction(db: Connection, apply: Any) -> Any:
    cursor = db.cursor()
    cursor.execute("BEGIN IMMEDIATE")
    try:
        return apply(cursor)
    finally:
        cursor.execute("COMMIT")
        cursor.close()


def test_apply_batch_takes_several_moves_of_one_job_in_one_statement(
    store: Store, db: Connection
) -> None:
    created = _create(store, ["a"])
    store.flush()
    job_id, at = created.job_ids["a"], format_time(T0)
    moves = [
        JobChanged(job_id, 1, "pending", "ready", "scheduled", at, _columns(JobState.SCHEDULED)),
        JobChanged(
            job_id, 2, "scheduled", "slot_acquired", "assigned", at, _columns(JobState.ASSIGNED)
        ),
    ]
    assert _in_transaction(db, lambda c: apply_batch(c, moves, store._backend.dialect)) is True
    assert store.get_job(job_id).state is JobState.ASSIGNED  # type: ignore[union-attr]
    assert [t.event for t in store.job_transitions(job_id)] == ["created", "ready", "slot_acquired"]


def test_apply_batch_applies_a_build_change_in_the_batch(store: Store, db: Connection) -> None:
    created = _create(store, ["a"])
    store.flush()
    change = BuildChanged(created.id, ("state",), ("running",))
    assert _in_transaction(db, lambda c: apply_batch(c, [change], store._backend.dialect)) is True
    assert store.get_build_by_id(created.id).state is BuildState.RUNNING  # type: ignore[union-attr]


def test_apply_batch_says_when_a_build_change_is_refused(store: Store, db: Connection) -> None:
    change = BuildChanged("nope", ("state",), ("running",))
    assert _in_transaction(db, lambda c: apply_batch(c, [change], store._backend.dialect)) is False


def test_apply_one_records_attempts_logs_and_artifacts(store: Store, db: Connection) -> None:
    created = _create(store, ["a"])
    store.flush()
    job_id, at, later = created.job_ids["a"], format_time(T0), format_time(NOW)
    changes = [
        AttemptStarted(job_id, 1, at),
        AttemptFinished(job_id, 1, "exited", 3, 9, later),
        LogAppended(job_id, 1, 1, "stdout", b"out", at),
        ArtifactRecorded(
            "art-1", job_id, "o/r.txt", "r.txt", "text/plain", 6, "s1", "s256", "uploaded", at
        ),
    ]
    for change in changes:
        assert _in_transaction(db, lambda c, change=change: apply_one(c, change)) is None
    (attempt,) = store.list_attempts(job_id)
    assert (attempt.outcome, attempt.exit_code, attempt.signal) == ("exited", 3, 9)
    assert (attempt.started_at, attempt.finished_at) == (T0, NOW)
    assert [(c.seq, c.content) for c in store.read_log(job_id)] == [(1, b"out")]
    (artifact,) = store.list_artifacts(job_id=job_id)
    assert (artifact.id, artifact.path, artifact.file_size) == ("art-1", "o/r.txt", 6)


def test_apply_one_says_when_the_job_does_not_exist(store: Store, db: Connection) -> None:
    change = JobChanged(
        "nope", 1, "pending", "ready", "scheduled", format_time(T0), _columns(JobState.SCHEDULED)
    )
    refused = _in_transaction(db, lambda c: apply_one(c, change))
    assert refused == "job nope pending -(ready)-> scheduled: it does not exist"


def test_apply_one_says_when_the_build_does_not_exist(db: Connection) -> None:
    change = BuildChanged("nope", ("state", "heartbeat_at"), ("running", "t"))
    refused = _in_transaction(db, lambda c: apply_one(c, change))
    assert refused == "build nope {'state': 'running', 'heartbeat_at': 't'}: it does not exist"


def test_apply_one_refuses_a_change_it_was_not_taught(db: Connection) -> None:
    message = (
        "the store's writer cannot apply object changes; this is a bug in harmont-exec, please "
        "report it"
    )
    with pytest.raises(InternalError) as info:
        _in_transaction(db, lambda c: apply_one(c, object()))  # type: ignore[arg-type]
    assert str(info.value) == message


# --- the store's own bookkeeping of sequences and rows ------------------------------------------


def test_store_numbers_the_first_log_chunk_of_a_job_another_store_created_one(
    store: Store,
) -> None:
    created = _create(store, ["a"])
    store.flush()
    with open_store(store.url) as second:  # e.g. `harmont-exec resume`
        second.append_log(created.job_ids["a"], 1, "stdout", b"first", at=T0)
        second.flush()
        assert [(c.seq, c.content) for c in second.read_log(created.job_ids["a"])] == [
            (1, b"first")
        ]


def test_store_refuses_a_transition_of_a_job_it_has_no_row_for(store: Store) -> None:
    with pytest.raises(StoreError) as info:
        store.record_job_transition(
            "nope",
            from_state=JobState.PENDING,
            event=Event.READY,
            to_state=JobState.SCHEDULED,
            at=T0,
        )
    assert str(info.value) == f"no job nope in {store.location}; record changes of its own jobs"
