"""The store (SPEC §5): real SQLite files in tmp_path and a real PostgreSQL server (each test
that takes ``db`` runs on both backends), real processes, no mocks."""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import with_schema
from faults import Faults, open_faulty_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import assert_sound

import executor
from executor.errors import StoreError
from executor.states import TRANSITIONS, BuildState, Event, JobState
from executor.store import (
    SCHEMA_VERSION,
    CreatedBuild,
    Store,
    open_store,
    resolve_backend,
    resolve_db_path,
)
from executor.store.backend import Connection

T0 = datetime(2026, 11, 28, 15, 55, 42, 123456, tzinfo=UTC)

PLAN_TEXT = """
steps:
  - key: deps
    label: Install deps
    command: make deps
  - key: lint
    command: make lint
    soft_fail_policy: true
  - key: test
    command: make test
    depends_on: [deps]
    retry_policy: {limit: 2, exit_codes: [1]}
  - wait
  - key: deploy
    command: ./deploy.sh
    builds_in: test
"""


def _plan(text: str = PLAN_TEXT) -> executor.Plan:
    return executor.plan_build_text(text)


def _create(
    store: Store, pipeline: str = "demo", org: str = "local", now: datetime = T0
) -> CreatedBuild:
    return store.create_build(
        org=org, pipeline=pipeline, plan=_plan(), build_file=None, working_dir="/w", now=now
    )


@pytest.fixture
def db(store_url: str) -> str:
    """A new store on each backend (conftest's ``store_url``)."""
    return store_url


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Path:
    """A new SQLite store's path, for what only SQLite has (its file, its version, PRAGMAs)."""
    return tmp_path / "db" / "harmont.db"


@pytest.fixture
def store(db: str) -> Iterator[Store]:
    with open_store(db) as s:
        yield s


def _is_pg(url: str) -> bool:
    return url.startswith("postgresql://")


@contextmanager
def _raw(url: str | Path) -> Iterator[Connection]:
    """A plain connection beside the store's (autocommit, ``?`` placeholders, foreign keys
    not enforced, as a tool editing the database by hand would be; closed on exit)."""
    backend = resolve_backend(url)
    if backend.path is not None:
        backend.path.parent.mkdir(parents=True, exist_ok=True)
        db: Connection = sqlite3.connect(backend.path, isolation_level=None)
    else:
        db = backend.connect()
        db.execute("SET session_replication_role = replica")  # no foreign-key triggers
    try:
        yield db
    finally:
        db.close()


def _hold_write_lock(raw: Connection, url: str) -> None:
    """Begin a transaction that keeps the store's writer waiting (SQLite: the file's write
    lock; PostgreSQL: the tables, which stay readable)."""
    raw.execute("BEGIN IMMEDIATE")
    if _is_pg(url):
        raw.execute(
            "LOCK TABLE builds, jobs, job_transitions, attempts, log_chunks IN EXCLUSIVE MODE"
        )


def _walk(store: Store, job_id: str, *steps: tuple[JobState, Event, JobState]) -> None:
    for i, (old, event, new) in enumerate(steps):
        store.record_job_transition(
            job_id, from_state=old, event=event, to_state=new, at=T0 + timedelta(seconds=i)
        )


# --- schema -----------------------------------------------------------------------------------


def test_store_migrations_apply_once_and_reopening_is_a_no_op(db: str) -> None:
    query = "SELECT version, applied_at FROM schema_migrations ORDER BY version"
    open_store(db).close()
    with _raw(db) as raw:
        first = [tuple(r) for r in raw.execute(query).fetchall()]
    open_store(db).close()
    with _raw(db) as raw:
        again = [tuple(r) for r in raw.execute(query).fetchall()]
    assert [v for v, _ in first] == list(range(1, SCHEMA_VERSION + 1))
    assert again == first


def test_store_sqlite_file_is_in_wal_mode(sqlite_db: Path) -> None:
    open_store(sqlite_db).close()
    with _raw(sqlite_db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _migrate(url: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait(timeout=60)
    open_store(url).close()


def test_store_migrates_once_when_processes_open_a_new_store_at_once(db: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    children = [ctx.Process(target=_migrate, args=(db, barrier)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [c.exitcode for c in children] == [0, 0, 0]
    with _raw(db) as raw:
        versions = [r[0] for r in raw.execute("SELECT version FROM schema_migrations").fetchall()]
    assert sorted(versions) == list(range(1, SCHEMA_VERSION + 1))


def test_store_refuses_a_newer_schema_version(db: str) -> None:
    open_store(db).close()
    with _raw(db) as raw:
        raw.execute("INSERT INTO schema_migrations VALUES (?, 'x')", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match=r"newer than this harmont-exec.*upgrade harmont-exec"):
        open_store(db)


def test_store_refuses_a_database_it_did_not_create(db: str) -> None:
    with _raw(db) as raw:
        raw.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(StoreError, match="did not create"):
        open_store(db)


def test_store_refuses_an_sqlite_too_old_for_its_queries(
    sqlite_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = sqlite_db
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(StoreError, match=r"needs SQLite 3\.33\.0 or newer.*uses SQLite 3\.31\.1"):
        open_store(db)
    assert not db.exists()


def test_store_refuses_a_file_that_is_not_a_database(sqlite_db: Path) -> None:
    db = sqlite_db
    db.parent.mkdir()
    db.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(StoreError, match=str(db)):
        open_store(db)


# --- builds -----------------------------------------------------------------------------------


def test_store_numbers_builds_per_pipeline(store: Store) -> None:
    numbers = [_create(store, "a").number for _ in range(3)]
    other = [_create(store, "b").number for _ in range(2)]
    other_org = _create(store, "a", org="acme").number
    assert (numbers, other, other_org) == ([1, 2, 3], [1, 2], 1)


def _create_many(path: str, count: int, barrier: multiprocessing.synchronize.Barrier) -> None:
    with open_store(path) as store:
        barrier.wait(timeout=60)
        for _ in range(count):
            _create(store, "shared")


def test_store_numbers_builds_uniquely_across_two_processes(db: str) -> None:
    open_store(db).close()  # both children find the schema in place
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    children = [ctx.Process(target=_create_many, args=(db, 20, barrier)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [c.exitcode for c in children] == [0, 0]
    with open_store(db) as store:
        builds = store.list_builds(pipeline="shared", limit=100)
    assert sorted(b.number for b in builds) == list(range(1, 41))
    assert len({b.executor_pid for b in builds}) == 2


def test_store_records_a_new_build_as_scheduled(store: Store) -> None:
    created = _create(store)
    build = store.get_build_by_id(created.id)
    assert build is not None
    assert (build.number, build.org, build.pipeline) == (1, "local", "demo")
    assert build.state is BuildState.SCHEDULED
    assert build.created_at == build.scheduled_at == build.heartbeat_at == T0
    assert (build.started_at, build.finished_at, build.cancel_requested) == (None, None, False)
    assert (build.source, build.working_dir, build.executor_pid) == ("api", "/w", os.getpid())


def test_store_records_build_changes_with_a_heartbeat(store: Store) -> None:
    created = _create(store)
    later = T0 + timedelta(minutes=5)
    store.record_build(created.id, state=BuildState.RUNNING, at=T0, started_at=T0)
    store.record_build(
        created.id,
        state=BuildState.CANCELED,
        at=later,
        finished_at=later,
        cancel_requested=True,
        error_code="build_canceled",
    )
    store.flush()
    build = store.get_build(1, pipeline="demo")
    assert build is not None
    assert (build.state, build.started_at, build.finished_at) == (BuildState.CANCELED, T0, later)
    assert (build.heartbeat_at, build.cancel_requested, build.error_code) == (
        later,
        True,
        "build_canceled",
    )


def test_store_lists_builds_newest_first_and_by_pipeline(store: Store) -> None:
    for i, pipeline in enumerate(["a", "b", "a"]):
        _create(store, pipeline, now=T0 + timedelta(seconds=i))
    everything = store.list_builds()
    assert [(b.pipeline, b.number) for b in everything] == [("a", 2), ("b", 1), ("a", 1)]
    assert [b.number for b in store.list_builds(pipeline="a", limit=1)] == [2]
    assert store.list_builds(org="nobody") == []


def test_store_get_build_refuses_an_ambiguous_number(store: Store) -> None:
    _create(store, "a")
    _create(store, "b")
    with pytest.raises(StoreError, match=r"local/a, local/b.*--pipeline"):
        store.get_build(1)
    build = store.get_build(1, pipeline="b")
    assert build is not None and build.pipeline == "b"
    assert store.get_build(2, pipeline="b") is None


# --- jobs -------------------------------------------------------------------------------------


def test_store_creates_jobs_in_plan_order_with_dependency_ids(store: Store) -> None:
    plan = _plan()
    created = _create(store)
    jobs = store.list_jobs(created.id)
    assert [j.step_key for j in jobs] == list(plan.order)
    assert [j.position for j in jobs] == list(range(len(plan)))
    ids = created.job_ids
    for job in jobs:
        assert job.id == ids[job.step_key]
        assert job.state is JobState.PENDING and job.created_at == T0
        assert set(job.depends_on) == {ids[k] for k in plan.prerequisites(job.step_key)}
    by_key = {j.step_key: j for j in jobs}
    assert by_key["deps"].name == "Install deps" and by_key["deps"].command == "make deps"
    assert by_key["test"].retry_policy == plan.step("test").retry_policy.model_dump(mode="json")  # type: ignore[union-attr]
    assert by_key["lint"].soft_fail_policy == {"exit_codes": "*"}
    assert by_key["deps"].retry_policy is None and by_key["deps"].soft_fail_policy is None


def test_store_starts_every_job_history_with_its_creation(store: Store) -> None:
    created = _create(store)
    for job_id in created.job_ids.values():
        (first,) = store.job_transitions(job_id)
        assert (first.seq, first.from_state, first.event, first.to_state, first.at) == (
            0,
            None,
            "created",
            JobState.PENDING,
            T0,
        )


def test_store_transition_updates_the_job_and_appends_history_in_order(store: Store) -> None:
    job_id = _create(store).job_ids["deps"]
    _walk(
        store,
        job_id,
        (JobState.PENDING, Event.READY, JobState.SCHEDULED),
        (JobState.SCHEDULED, Event.SLOT_ACQUIRED, JobState.ASSIGNED),
    )
    store.record_job_transition(
        job_id,
        from_state=JobState.ASSIGNED,
        event=Event.STARTED,
        to_state=JobState.RUNNING,
        at=T0,
        started_at=T0,
    )
    done = T0 + timedelta(seconds=9)
    store.record_job_transition(
        job_id,
        from_state=JobState.RUNNING,
        event=Event.EXITED_NONZERO,
        to_state=JobState.FAILED,
        at=done,
        exit_code=3,
        soft_failed=True,
        error_message=None,
        retries_count=1,
        finished_at=done,
    )
    store.flush()
    job = store.get_job(job_id)
    assert job is not None
    assert (job.state, job.exit_code, job.soft_failed, job.retries_count) == (
        JobState.FAILED,
        3,
        True,
        1,
    )
    assert (job.started_at, job.finished_at) == (T0, done)
    history = store.job_transitions(job_id)
    assert [h.seq for h in history] == [0, 1, 2, 3, 4]
    assert [h.event for h in history[1:]] == ["ready", "slot_acquired", "started", "exited_nonzero"]
    assert all(h.from_state is p.to_state for p, h in itertools.pairwise(history))


def test_store_transition_from_a_state_the_job_is_not_in_raises_from_flush(store: Store) -> None:
    job_id = _create(store).job_ids["deps"]
    _walk(store, job_id, (JobState.PENDING, Event.READY, JobState.SCHEDULED))
    _walk(store, job_id, (JobState.RUNNING, Event.EXITED_ZERO, JobState.PASSED))
    with pytest.raises(StoreError, match=r"running -\(exited_zero\)-> passed.*'scheduled'"):
        store.flush()
    job = store.get_job(job_id)
    assert job is not None and job.state is JobState.SCHEDULED  # the write before it is kept
    assert [h.seq for h in store.job_transitions(job_id)] == [0, 1]


def test_store_keeps_exactly_the_writes_queued_before_a_bad_one(store: Store, db: str) -> None:
    ids = _create(store).job_ids
    ready = (JobState.PENDING, Event.READY, JobState.SCHEDULED)
    with _raw(db) as locker:
        _hold_write_lock(locker, db)  # so that the writes below wait, and mostly share a batch
        _walk(store, ids["deps"], ready)
        _walk(store, ids["lint"], (JobState.SCHEDULED, Event.SLOT_ACQUIRED, JobState.ASSIGNED))
        _walk(store, ids["test"], ready)
        locker.execute("ROLLBACK")
    with pytest.raises(StoreError, match="this is a bug"):
        store.flush()
    states = [store.get_job(ids[key]).state for key in ("deps", "lint", "test")]  # type: ignore[union-attr]
    assert states == [JobState.SCHEDULED, JobState.PENDING, JobState.PENDING]


def test_store_get_job_accepts_a_unique_id_prefix(store: Store, db: str) -> None:
    ids = sorted(_create(store).job_ids.values())
    with _raw(db) as raw:  # two ids sharing their first 12 characters
        raw.execute(
            "UPDATE jobs SET id = 'abcdef01-2345-4000-8000-000000000001' WHERE id = ?", (ids[0],)
        )
        raw.execute(
            "UPDATE jobs SET id = 'abcdef01-2345-4000-8000-000000000002' WHERE id = ?", (ids[1],)
        )
    job = store.get_job(ids[2][:8].upper())
    assert job is not None and job.id == ids[2]
    with pytest.raises(StoreError, match="matches several jobs"):
        store.get_job("abcdef01-2345")
    assert store.get_job("abcdef01-2345-4000-8000-000000000002") is not None
    assert store.get_job("abcdef0") is None  # too short to be a prefix
    assert store.get_job("ffffffff-ffff") is None


def test_store_records_attempts_including_one_that_never_started(store: Store) -> None:
    job_id = _create(store).job_ids["test"]
    store.record_attempt_started(job_id, 1, at=T0)
    store.record_attempt_finished(job_id, 1, outcome="exited", exit_code=1, signal=None, at=T0)
    later = T0 + timedelta(seconds=1)
    store.record_attempt_finished(
        job_id, 2, outcome="spawn_failed", exit_code=None, signal=None, at=later
    )
    store.flush()
    first, second = store.list_attempts(job_id)
    assert (first.number, first.outcome, first.exit_code, first.started_at) == (1, "exited", 1, T0)
    assert (second.number, second.outcome, second.started_at, second.finished_at) == (
        2,
        "spawn_failed",
        later,
        later,
    )


def test_store_continues_sequences_for_jobs_created_by_an_earlier_process(db: str) -> None:
    with open_store(db) as first:
        job_id = _create(first).job_ids["deps"]
        _walk(first, job_id, (JobState.PENDING, Event.READY, JobState.SCHEDULED))
        first.append_log(job_id, 1, "stdout", b"one", at=T0)
    with open_store(db) as second:  # e.g. `harmont-exec resume`
        _walk(second, job_id, (JobState.SCHEDULED, Event.SLOT_ACQUIRED, JobState.ASSIGNED))
        second.append_log(job_id, 1, "stdout", b"two", at=T0)
        second.flush()
        assert [h.seq for h in second.job_transitions(job_id)] == [0, 1, 2]
        assert [(c.seq, c.content) for c in second.read_log(job_id)] == [(1, b"one"), (2, b"two")]


# --- logs -------------------------------------------------------------------------------------


def test_store_logs_round_trip_bytes_exactly(store: Store) -> None:
    job_id = _create(store).job_ids["deps"]
    chunks: list[tuple[int, str, bytes | bytearray]] = [
        (1, "stdout", b"hello \xff\xfe not utf-8 \x00 nul\n"),
        (1, "stderr", "caf\u00e9\r\n".encode()),
        (2, "stdout", bytearray(b"\x80partial \xe2\x82")),
    ]
    for attempt, stream, content in chunks:
        store.append_log(job_id, attempt, stream, content, at=T0)
    store.flush()
    read = list(store.read_log(job_id))
    assert [(c.seq, c.attempt, c.stream, c.content) for c in read] == [
        (i + 1, a, s, bytes(c)) for i, (a, s, c) in enumerate(chunks)
    ]
    assert all(type(c.content) is bytes for c in read)
    assert [c.seq for c in store.read_log(job_id, after_seq=2)] == [3]


def test_store_refuses_an_unknown_log_stream(store: Store) -> None:
    job_id = _create(store).job_ids["deps"]
    with pytest.raises(StoreError, match="'stdin'"):
        store.append_log(job_id, 1, "stdin", b"x", at=T0)


def test_store_streams_a_large_log_in_bounded_memory(store: Store) -> None:
    job_id = _create(store).job_ids["deps"]
    chunk_size, count = 64 * 1024, 320  # 20 MiB
    written = hashlib.sha256()
    for i in range(count):
        content = i.to_bytes(4, "big") * (chunk_size // 4)
        written.update(content)
        store.append_log(job_id, 1, "stdout", content, at=T0)
    store.flush()
    read, chunks = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        for chunk in store.read_log(job_id):
            read.update(chunk.content)
            chunks += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (chunks, read.hexdigest()) == (count, written.hexdigest())
    assert peak < chunk_size * count // 2  # a page at a time, never the whole log


def test_store_read_log_picks_up_chunks_committed_while_iterating(store: Store) -> None:
    job_id = _create(store).job_ids["deps"]
    for i in range(100):
        store.append_log(job_id, 1, "stdout", b"%d\n" % i, at=T0)
    store.flush()
    reader = store.read_log(job_id)
    assert next(reader).content == b"0\n"
    store.append_log(job_id, 1, "stdout", b"late\n", at=T0)
    store.flush()
    assert [c.content for c in reader][-1] == b"late\n"


# --- concurrency and failures -----------------------------------------------------------------


def test_store_reads_committed_data_while_another_connection_writes(store: Store, db: str) -> None:
    created = _create(store)
    job_id = created.job_ids["deps"]
    store.flush()
    with _raw(db) as locker:
        _hold_write_lock(locker, db)  # a writer mid-transaction holds the write lock
        locker.execute("UPDATE jobs SET name = 'uncommitted' WHERE id = ?", (job_id,))
        # The store's writer now waits for the lock with this transition queued, uncommitted.
        _walk(store, job_id, (JobState.PENDING, Event.READY, JobState.SCHEDULED))
        with open_store(db) as reader:  # opening does not wait for the lock either
            job = reader.get_job(job_id)
            assert job is not None
            assert (job.state, job.name) == (JobState.PENDING, "Install deps")
        locker.execute("ROLLBACK")
    store.flush()
    job = store.get_job(job_id)
    assert job is not None and job.state is JobState.SCHEDULED


def _fill_disk(store: Store, faults: Faults, job_id: str) -> str:
    """Make the database refuse the writer's writes (on its connection, ``faults``) and queue
    one; return what the error says (SQLite: the file turned read-only; PostgreSQL: the server
    went read-only, as a standby). A full disk, which a reserve helps with, is the reliability
    tests' (a real tmpfs)."""
    if store.dialect == "sqlite":
        faults.inject("PRAGMA query_only = 1")
        expected = r"readonly.*make the database file"
    else:
        faults.inject(
            "SET TRANSACTION READ ONLY",  # first in its transaction
            "SET default_transaction_read_only = on",  # and later ones
        )
        expected = r"read-only.*point --db / HARMONT_DB at the primary"
    store.append_log(job_id, 1, "stdout", b"x" * 1_000_000, at=T0)
    return expected


def test_store_failed_write_raises_from_flush_and_keeps_committed_data(db: str) -> None:
    store, faults = open_faulty_store(db)
    job_id = _create(store).job_ids["deps"]
    store.append_log(job_id, 1, "stdout", b"kept", at=T0)
    store.flush()
    expected = _fill_disk(store, faults, job_id)
    with pytest.raises(StoreError, match=expected):
        store.flush()
    store.close()  # already reported: close does not raise it again
    with open_store(db) as again:
        assert [c.content for c in again.read_log(job_id)] == [b"kept"]
        assert_sound(again)


def test_store_refuses_writes_after_a_failed_write(db: str) -> None:
    store, faults = open_faulty_store(db)
    job_id = _create(store).job_ids["deps"]
    expected = _fill_disk(store, faults, job_id)
    with pytest.raises(StoreError, match=expected):
        store.flush()
    with pytest.raises(StoreError, match=expected):
        store.record_attempt_started(job_id, 1, at=T0)
    store.close()  # already reported: close does not raise it again


def test_store_close_raises_a_failed_write_not_yet_reported(db: str) -> None:
    store, faults = open_faulty_store(db)
    expected = _fill_disk(store, faults, _create(store).job_ids["deps"])
    with pytest.raises(StoreError, match=expected):
        store.close()
    store.close()  # idempotent


def test_store_refuses_writes_after_close(store: Store) -> None:
    job_id = _create(store).job_ids["deps"]
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.append_log(job_id, 1, "stdout", b"x", at=T0)


def test_store_refuses_naive_datetimes(store: Store) -> None:
    job_id = _create(store).job_ids["deps"]
    with pytest.raises(executor.InternalError, match="naive datetime"):
        store.record_attempt_started(job_id, 1, at=datetime(2026, 1, 1))


def test_store_commits_queued_writes_when_a_process_exits_without_close(db: str) -> None:
    with open_store(db) as store:
        job_id = _create(store).job_ids["deps"]
    child = (
        "import sys; from datetime import datetime, UTC; from executor.store import open_store\n"
        "store = open_store(sys.argv[1])\n"
        "for i in range(1000):\n"
        "    store.append_log(sys.argv[2], 1, 'stdout', b'%d' % i, at=datetime.now(UTC))\n"
    )
    subprocess.run([sys.executable, "-c", child, db, job_id], check=True, timeout=60)
    with open_store(db) as store:
        assert [c.content for c in store.read_log(job_id)] == [b"%d" % i for i in range(1000)]


def test_store_a_new_build_passes_verify(store: Store) -> None:
    _create(store)
    assert_sound(store)


# --- locations --------------------------------------------------------------------------------


def test_store_url_defaults_to_HARMONT_DB_then_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HARMONT_DB", raising=False)
    assert resolve_db_path(None) == tmp_path / ".harmont" / "harmont.db"
    monkeypatch.setenv("HARMONT_DB", "sqlite:///elsewhere/x.db")
    assert resolve_db_path(None) == tmp_path / "elsewhere" / "x.db"
    with open_store() as store:
        assert store.path == tmp_path / "elsewhere" / "x.db"
        assert store.path.exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rel/h.db", "rel/h.db"),
        ("sqlite:///rel/h.db", "rel/h.db"),
        ("sqlite:////abs/h.db", "/abs/h.db"),
        (Path("rel") / "p.db", "rel/p.db"),
        ("weird:name.db", "weird:name.db"),
    ],
)
def test_store_url_accepts_paths_and_sqlite_urls(
    url: str | Path, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_db_path(url) == tmp_path / expected


def test_store_url_names_an_unreachable_postgresql_server_without_its_password() -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://ci:s3cret@127.0.0.1:{port}/harmont"
    with pytest.raises(StoreError, match=r"could not connect.*running and reachable") as info:
        open_store(url)
    assert "s3cret" not in str(info.value)
    assert f"postgresql://ci:***@127.0.0.1:{port}/harmont" in str(info.value)


@pytest.mark.parametrize("url", ["mysql://db/x", "https://example.com/h.db", "sqlite://host/h.db"])
def test_store_url_refuses_other_forms_naming_them(url: str) -> None:
    with pytest.raises(StoreError, match=f"{url}.*sqlite:///"):
        open_store(url)


def test_store_url_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        open_store(tmp_path)


# --- batching -------------------------------------------------------------------------------


_FORWARD = {  # the usual way through, so that walks often get to run attempts
    JobState.PENDING: Event.READY,
    JobState.SCHEDULED: Event.SLOT_ACQUIRED,
    JobState.ASSIGNED: Event.STARTED,
}


@st.composite
def _recordings(draw: st.DrawFn) -> list[tuple[str, object]]:
    """Legal walks of the demo build's jobs through THE table with attempts and log chunks,
    interleaved, with flushes at random points (so changes split across batches anywhere)."""
    keys = ["deps", "lint", "test", "deploy"]
    walks: dict[str, list[tuple[str, object]]] = {}
    for key in keys:
        state, attempt, steps = JobState.PENDING, 0, []
        for _ in range(draw(st.integers(0, 8))):
            events = sorted((e for (s, e) in TRANSITIONS if s is state), key=lambda e: e.value)
            if not events:
                break
            forward = _FORWARD.get(state)
            event = (
                forward if forward and draw(st.integers(0, 3)) else draw(st.sampled_from(events))
            )
            new = TRANSITIONS[(state, event)]
            if new is JobState.RUNNING:
                attempt += 1
                steps.append((key, ("start", attempt)))
            fields = {"exit_code": draw(st.none() | st.integers(0, 255))} if new.is_terminal else {}
            steps.append((key, ("transition", state, event, new, fields)))
            if state is JobState.RUNNING:
                steps.append((key, ("log", attempt, draw(st.binary(max_size=8)))))
                steps.append((key, ("finish", attempt, draw(st.integers(0, 3)))))
            state = new
        walks[key] = steps
    merged: list[tuple[str, object]] = []
    while any(walks.values()):
        key = draw(st.sampled_from([k for k in keys if walks[k]]))
        merged.append(walks[key].pop(0))
        if draw(st.integers(0, 3)) == 0:
            merged.append(("", ("flush",)))
    return merged


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(recording=_recordings())
def test_store_batches_record_exactly_what_one_by_one_writes_would(
    db: str, recording: list[tuple[str, object]]
) -> None:
    expected_state: dict[str, JobState] = {}
    expected_history: dict[str, list[str]] = {}
    expected_attempts: dict[str, dict[int, tuple[datetime, int | None]]] = {}
    expected_exit: dict[str, int | None] = {}
    expected_log: dict[str, list[bytes]] = {}
    with open_store(db) as store:
        ids = _create(store).job_ids
        for i, (key, (kind, *args)) in enumerate(recording):  # type: ignore[misc]
            at = T0 + timedelta(seconds=i)
            if kind == "flush":
                store.flush()
                continue
            job_id = ids[key]
            if kind == "transition":
                old, event, new, fields = args
                store.record_job_transition(
                    job_id, from_state=old, event=event, to_state=new, at=at, **fields
                )
                expected_state[key] = new
                expected_history.setdefault(key, []).append(event.value)
                expected_exit[key] = fields.get("exit_code", expected_exit.get(key))
            elif kind == "start":
                store.record_attempt_started(job_id, args[0], at=at)
                expected_attempts.setdefault(key, {})[args[0]] = (at, None)
            elif kind == "finish":
                number, code = args
                store.record_attempt_finished(
                    job_id, number, outcome="exited", exit_code=code, signal=None, at=at
                )
                expected_attempts.setdefault(key, {})[number] = (
                    expected_attempts[key][number][0],
                    code,
                )
            else:
                store.append_log(job_id, args[0], "stdout", args[1], at=at)
                expected_log.setdefault(key, []).append(args[1])
    with open_store(db) as store:
        for key, job_id in ids.items():
            job = store.get_job(job_id)
            assert job is not None
            assert job.state is expected_state.get(key, JobState.PENDING)
            assert job.exit_code == expected_exit.get(key)
            history = store.job_transitions(job_id)
            assert [h.event for h in history[1:]] == expected_history.get(key, [])
            assert [h.seq for h in history] == list(range(len(history)))
            assert all(h.from_state is p.to_state for p, h in itertools.pairwise(history))
            attempts = {a.number: (a.started_at, a.exit_code) for a in store.list_attempts(job_id)}
            assert attempts == expected_attempts.get(key, {})
            assert [c.content for c in store.read_log(job_id)] == expected_log.get(key, [])
        assert_sound(store)


# --- PostgreSQL: what a user gets wrong -------------------------------------------------------


def _on(server: str, *, user: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(server)
    netloc = parts.netloc if user is None else f"{user}:s3cret@{parts.hostname}:{parts.port}"
    return parts._replace(netloc=netloc, path=f"/{database}" if database else parts.path).geturl()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"database": "no_such_db"}, r'database "no_such_db" does not exist.*createdb NAME'),
        ({"user": "no_such_role"}, r'role "no_such_role" does not exist.*user name and password'),
    ],
)
def test_store_postgresql_says_what_to_fix_in_the_url(
    postgresql_server: str, change: dict[str, str], expected: str
) -> None:
    url = _on(postgresql_server, **change)
    with pytest.raises(
        StoreError, match=r"could not connect to the PostgreSQL store.*" + expected
    ) as info:
        open_store(url)
    assert "s3cret" not in str(info.value)


def test_store_postgresql_names_a_missing_schema(postgresql_server: str) -> None:
    url = with_schema(postgresql_server, "no_such_schema")
    with pytest.raises(StoreError, match=r"no_such_schema.*CREATE SCHEMA name"):
        open_store(url)


def test_store_postgresql_without_psycopg_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    with pytest.raises(
        StoreError, match=r"needs psycopg.*pip install 'harmont-exec\[postgresql\]'"
    ):
        open_store("postgresql://ci:s3cret@127.0.0.1/harmont")


def test_store_postgresql_tests_fail_under_ci_without_a_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HARMONT_TEST_POSTGRESQL"}
    test = f"{__file__}::test_store_postgresql_names_a_missing_schema"

    def pytest_with(ci: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test],
            env={**env, "CI": ci},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    under_ci, locally = pytest_with("true"), pytest_with("")
    assert under_ci.returncode == 1, under_ci.stdout + under_ci.stderr
    assert "under CI every backend is tested" in under_ci.stdout, under_ci.stdout
    assert locally.returncode == 0 and "1 skipped" in locally.stdout, locally.stdout
    for result in (under_ci, locally):  # both say how to get a server
        assert 'eval "$(bash .ci/postgres start)"' in result.stdout, result.stdout


def test_store_never_shows_a_password_given_as_a_url_parameter() -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://ci@127.0.0.1:{port}/harmont?sslmode=disable&password=s3cret"
    with pytest.raises(StoreError, match=r"could not connect") as info:
        open_store(url)
    assert "s3cret" not in str(info.value)
    assert "sslmode=disable&password=***" in str(info.value)


def test_store_refuses_a_libpq_key_value_string_instead_of_making_a_file_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=r"key=value connection string.*postgresql://") as info:
        open_store("host=127.0.0.1 user=ci password='s 3cret' dbname=harmont")
    assert "s 3cret" not in str(info.value) and "password=***" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no SQLite file named after it


@pytest.mark.parametrize(
    ("message", "hint"),
    [
        ("connection failed: fe_sendauth: no password supplied", "user name and password"),
        ('FATAL: password authentication failed for user "ci"', "user name and password"),
        ("connection failed: Connection refused", "running and reachable"),
    ],
)
def test_store_postgresql_connection_errors_get_the_right_hint(message: str, hint: str) -> None:
    import psycopg

    from executor.store.postgresql import postgresql_backend

    backend = postgresql_backend("postgresql://ci:s3cret@db.example/harmont", "--db")
    error = backend.error("connect", psycopg.OperationalError(message))
    assert str(error).startswith(
        "could not connect to the PostgreSQL store postgresql://ci:***@db.example/harmont: "
    )
    assert hint in str(error) and "s3cret" not in str(error)
