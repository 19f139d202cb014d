"""The build queue in the record and the executors that serve it (SPEC §5, §6.3): schema 6 and
the `local` organization, claims taken exactly once by concurrent processes, cancel requests of
queued, running and finished builds reaching whoever runs the build (a `run` in a terminal
exits 130), `--max-builds` never exceeded, and builds queued and running when `serve` is
killed or stopped all ending terminal once it starts again. On both backends (``store_url``)."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest
from serving import TIMEOUT_S, alive, assert_sound, output, poll, start, stop

from executor.api.service import BuildRequest
from executor.errors import BuildNotFoundError, ErrorCode
from executor.load import plan_build_text
from executor.service import BuildService
from executor.states import BuildState, Event, JobState
from executor.store import LOCAL_ORGANIZATION, SCHEMA_VERSION, BuildRow, Store, open_store, sql
from executor.store.opening import resolve_backend

ONE_STEP = "steps:\n  - key: only\n    command: echo done\n"
# A job that waits for the file $RELEASE/<its build number>, writing its pid to
# $RELEASE/pid-<number> first: a build that runs until the test lets it go.
HELD = (
    "steps:\n"
    "  - key: held\n"
    '    command: echo $$ > "$RELEASE/pid-$HARMONT_BUILD_NUMBER"; '
    'until [ -e "$RELEASE/$HARMONT_BUILD_NUMBER" ]; do sleep 0.02; done\n'
)


def now() -> datetime:
    return datetime.now(UTC)


def queue_builds(store: Store, count: int, text: str = ONE_STEP) -> list[str]:
    plan = plan_build_text(text)
    return [
        store.create_build(
            org="local",
            pipeline="q",
            plan=plan,
            build_file=None,
            working_dir=str(Path.cwd()),
            queued=True,
            now=now(),
        ).id
        for _ in range(count)
    ]


def job_processes(job_ids: set[str]) -> list[int]:
    """Pids of live processes that carry one of the jobs' HARMONT_JOB_ID."""
    wanted = {f"HARMONT_JOB_ID={j}".encode() for j in job_ids}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if not wanted.isdisjoint(environ.split(b"\0")) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def all_job_ids(store: Store) -> set[str]:
    return {j.id for b in store.list_builds(limit=1000) for j in store.list_jobs(b.id)}


# --- schema 6 -----------------------------------------------------------------------------------


def test_queue_fresh_store_has_the_local_organization(store_url: str) -> None:
    with open_store(store_url) as store:
        assert [o.slug for o in store.list_organizations()] == [LOCAL_ORGANIZATION]
        local = store.get_organization("local")
        assert local is not None and local.name is None and local.url is None
        assert_sound(store)


def test_queue_migration_6_upgrades_a_version_5_store(store_url: str) -> None:
    backend = resolve_backend(store_url)
    backend.prepare()
    db = backend.connect()
    try:  # a store as version 5 left it, with an organization and a pipeline of its own
        db.execute(sql.CREATE_SCHEMA_MIGRATIONS)
        for version, script in enumerate(sql.migrations(backend.dialect)[:5], start=1):
            for statement in script:
                db.execute(statement)
            db.execute(sql.RECORD_MIGRATION, (version, "2026-01-01T00:00:00.000000Z"))
        db.execute(
            "INSERT INTO organizations (id, slug, created_at) VALUES "
            "('00000000-0000-4000-8000-000000000001', 'acme', '2026-01-01T00:00:00.000000Z')"
        )
        db.execute(
            "INSERT INTO pipelines (id, organization_id, slug, created_at) VALUES "
            "('00000000-0000-4000-8000-000000000002', '00000000-0000-4000-8000-000000000001', "
            "'web', '2026-01-01T00:00:00.000000Z')"
        )
    finally:
        db.close()
    with open_store(store_url) as store:
        assert [o.slug for o in store.list_organizations()] == ["acme", "local"]
        web = store.get_pipeline("acme", "web")
        assert web is not None and web.name is None and web.repository is None
        created = store.create_pipeline(
            "acme",
            name="API Server",
            repository="git@example.com:acme/api.git",
            default_branch="main",
            description=None,
            repo_name="acme/api",
            now=now(),
        )
        assert (created.slug, created.repo_name) == ("api-server", "acme/api")
        version = store._rows(sql.SCHEMA_VERSION_NOW)[0][0]
        assert version == SCHEMA_VERSION == 6
        assert_sound(store)


# --- claims -----------------------------------------------------------------------------------

CLAIMER = """
import json, sys
from datetime import UTC, datetime
from executor.store import open_store
with open_store(sys.argv[1]) as store:
    print("ready", flush=True)
    sys.stdin.readline()
    claimed = []
    while (build := store.claim_queued_build(datetime.now(UTC))) is not None:
        claimed.append(build.id)
    print(json.dumps(claimed), flush=True)
"""


def test_queue_claim_takes_each_build_exactly_once_under_two_claimers(store_url: str) -> None:
    with open_store(store_url) as store:
        queued = set(queue_builds(store, 60))
    claimers = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, store_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for claimer in claimers:  # both have opened the store: now they race
            assert claimer.stdout is not None and claimer.stdout.readline() == "ready\n"
        for claimer in claimers:
            assert claimer.stdin is not None
            claimer.stdin.write("go\n")
            claimer.stdin.flush()
        results = [claimer.communicate(timeout=TIMEOUT_S)[0] for claimer in claimers]
    finally:
        for claimer in claimers:
            if claimer.poll() is None:
                claimer.kill()
                claimer.wait()
    first, second = (set(json.loads(r.splitlines()[-1])) for r in results)
    assert not first & second
    assert first | second == queued
    with open_store(store_url, recover=False) as store:
        assert store.claim_queued_build(now()) is None
        rows = [store.get_build_by_id(b) for b in queued]
        assert all(r is not None and r.executor_host is not None for r in rows)


def test_queue_recovery_leaves_queued_builds_alone(store_url: str) -> None:
    with open_store(store_url) as store:
        [build_id] = queue_builds(store, 1)
        assert store.recover_lost_builds(now()) == []
        row = store.get_build_by_id(build_id)
        assert row is not None and row.queued and row.heartbeat_at is None


# --- cancel requests --------------------------------------------------------------------------


def test_queue_request_cancel_of_a_queued_build_cancels_it_and_its_jobs(store_url: str) -> None:
    with open_store(store_url) as store:
        [build_id] = queue_builds(
            store,
            1,
            "steps:\n  - key: a\n    command: 'true'\n"
            "  - key: b\n    command: 'true'\n    depends_on: a\n",
        )
        row = store.request_cancel(build_id, now())
        assert row.state is BuildState.CANCELED and row.cancel_requested
        assert row.finished_at is not None and row.started_at is None
        for job in store.list_jobs(build_id):
            assert (job.state, job.error_code) == (JobState.CANCELED, ErrorCode.BUILD_CANCELED)
            events = [t.event for t in store.job_transitions(job.id)]
            assert events == ["created", Event.CANCEL_REQUESTED.value]
        assert store.claim_queued_build(now()) is None  # nothing to run any more
        assert store.request_cancel(build_id, now()) == row  # idempotent
        assert_sound(store)


def test_queue_request_cancel_of_a_running_build_marks_it(store_url: str) -> None:
    with open_store(store_url) as store:
        [build_id] = queue_builds(store, 1)
        claimed = store.claim_queued_build(now())
        assert claimed is not None and claimed.id == build_id
        assert not store.cancel_requested(build_id)
        row = store.request_cancel(build_id, now())
        assert row.state is BuildState.SCHEDULED and row.cancel_requested  # its executor ends it
        assert store.cancel_requested(build_id)
        assert [j.state for j in store.list_jobs(build_id)] == [JobState.PENDING]


def test_queue_request_cancel_of_a_finished_build_changes_nothing(
    store_url: str, tmp_path: Path
) -> None:
    with open_store(store_url) as store:
        service = BuildService(store, workspaces=tmp_path / "ws", max_upload_bytes=1 << 20)
        service.start()
        try:
            submitted = service.submit(BuildRequest("local", "q", ONE_STEP))
            done = poll(lambda: terminal(store, submitted.build.id), "the build to end")
        finally:
            service.stop()
        assert done.state is BuildState.PASSED
        assert store.request_cancel(done.id, now()) == done
        assert not store.cancel_requested(done.id)
        with pytest.raises(BuildNotFoundError):
            store.request_cancel("00000000-0000-4000-8000-00000000dead", now())


def terminal(store: Store, build_id: str) -> BuildRow | None:
    row = store.get_build_by_id(build_id)
    return row if row is not None and row.state.is_terminal else None


# --- a `run` in a terminal, canceled from another process -------------------------------------


@pytest.fixture
def terminal_run(tmp_path: Path, store_url: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`harmont-exec run` on a pseudo-terminal (its live view on), its one job holding."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "b.yaml").write_text(
        "steps:\n  - key: hold\n    command: echo $$ > pid; exec sleep 300\n"
    )
    parent, child = pty.openpty()
    out = tmp_path / "run.out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "executor",
            "run",
            "b.yaml",
            "--db",
            store_url,
            "--grace-seconds",
            "5",
        ],
        cwd=work,
        stdin=child,
        stdout=child,
        stderr=child,
        start_new_session=True,
    )
    os.close(child)

    def drain() -> None:  # the terminal's other end: read everything, keep it for failures
        with out.open("wb") as sink:
            while True:
                try:
                    data = os.read(parent, 65536)
                except OSError:
                    return
                if not data:
                    return
                sink.write(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield proc, work
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT_S)
        os.close(parent)
        reader.join(timeout=TIMEOUT_S)


def test_queue_run_in_a_terminal_is_canceled_through_the_store(
    terminal_run: tuple[subprocess.Popen[bytes], Path], store_url: str, tmp_path: Path
) -> None:
    proc, work = terminal_run
    with open_store(store_url, recover=False) as store:

        def running() -> BuildRow | None:
            builds = store.list_builds(limit=1)
            if not builds or not (work / "pid").exists():
                return None
            jobs = store.list_jobs(builds[0].id)
            return builds[0] if jobs[0].state is JobState.RUNNING else None

        build = poll(running, "the job to run", (proc, tmp_path / "run"))
        job_pid = int((work / "pid").read_text())
        assert alive(job_pid)
        store.request_cancel(build.id, now())
        assert proc.wait(timeout=TIMEOUT_S) == 130, (tmp_path / "run.out").read_text(
            errors="replace"
        )
        ended = store.get_build_by_id(build.id)
        assert ended is not None and ended.state is BuildState.CANCELED
        [job] = store.list_jobs(build.id)
        assert (job.state, job.error_code) == (JobState.CANCELED, ErrorCode.BUILD_CANCELED)
        assert not alive(job_pid)
        assert not job_processes({job.id})
        assert_sound(store)


# --- the service's queue ----------------------------------------------------------------------


def claimed_now(store: Store) -> list[BuildRow]:
    """Builds an executor holds and that have not ended: what counts against --max-builds."""
    return [
        b
        for b in store.list_builds(limit=1000)
        if b.executor_host is not None and not b.state.is_terminal
    ]


class Peak:
    """The most builds seen running at once, from the store's states at every look."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.value = 0

    def running(self) -> list[BuildRow]:
        running = claimed_now(self.store)
        self.value = max(self.value, len(running))
        return running

    def holding(self, release: Path, expected: int) -> list[BuildRow] | None:
        """Exactly ``expected`` builds running, each one's job holding (its pid file made)."""
        running = self.running()
        assert len(running) <= expected, [b.number for b in running]
        ok = len(running) == expected and all(
            (release / f"pid-{b.number}").exists() for b in running
        )
        return running if ok else None

    def ended(self, build_id: str) -> BuildRow | None:
        self.running()
        return terminal(self.store, build_id)


def test_queue_twenty_builds_at_once_run_at_most_two_at_a_time(
    store_url: str, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    release.mkdir()
    with open_store(store_url) as store:
        service = BuildService(
            store, max_builds=2, workspaces=tmp_path / "ws", max_upload_bytes=1 << 20
        )
        service.start()
        try:
            request = BuildRequest("local", "many", HELD, env={"RELEASE": str(release)})
            with ThreadPoolExecutor(max_workers=20) as pool:
                submitted = list(pool.map(lambda _: service.submit(request), range(20)))
            assert all(s.error is None for s in submitted)
            assert sorted(s.build.number for s in submitted) == list(range(1, 21))
            peak = Peak(store)
            for finished in range(20):
                # Every held build that runs waits for its release file: the running set is
                # stable, so the store must show exactly min(2, what is left) of them running.
                expected = min(2, 20 - finished)
                running = poll(
                    partial(peak.holding, release, expected), f"{expected} builds to run"
                )
                first = min(running, key=lambda b: b.number)
                (release / str(first.number)).touch()
                ended = poll(partial(peak.ended, first.id), f"build #{first.number} to end")
                assert ended.state is BuildState.PASSED
        finally:
            for n in range(1, 21):
                (release / str(n)).touch()
            service.stop()
        assert peak.value == 2
        builds = store.list_builds(pipeline="many", limit=100)
        assert sorted(b.number for b in builds) == list(range(1, 21))
        assert all(b.state is BuildState.PASSED for b in builds)
        assert not job_processes(all_job_ids(store))
        assert_sound(store)


def serve(db: str, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    return start(
        ["serve", "--db", db, "--port", "0", "--max-builds", "2"], tmp_path, tmp_path / name
    )


def submit_held(store: Store, tmp_path: Path, release: Path, count: int) -> list[str]:
    """``count`` held builds queued by a service that is not started (the record only)."""
    service = BuildService(store, workspaces=tmp_path / "ws", max_upload_bytes=1 << 20)
    request = BuildRequest("local", "held", HELD, env={"RELEASE": str(release)})
    return [service.submit(request).build.id for _ in range(count)]


def two_running(store: Store, release: Path) -> list[BuildRow] | None:
    """Two builds running, each one's job recorded running and holding."""
    running = claimed_now(store)
    ok = len(running) == 2 and all(
        (release / f"pid-{b.number}").exists()
        and [j.state for j in store.list_jobs(b.id)] == [JobState.RUNNING]
        for b in running
    )
    return running if ok else None


def finish_after_restart(store: Store, db: str, tmp_path: Path, release: Path) -> None:
    """Start `serve` again, let every held build go, and check what the record says."""
    again = serve(db, tmp_path, "serve-again")
    try:
        for n in range(1, 6):
            (release / str(n)).touch()

        def all_ended() -> list[BuildRow] | None:
            builds = store.list_builds(pipeline="held", limit=100)
            return builds if all(b.state.is_terminal for b in builds) else None

        builds = poll(all_ended, "every build to end", (again, tmp_path / "serve-again"))
        assert len(builds) == 5
        assert all(b.state is BuildState.PASSED for b in builds), [
            (b.number, b.state, b.error_code) for b in builds
        ]
    finally:
        stop(again)
    # stop() sent SIGTERM: `serve` stops, then re-raises it (as in test_live_log).
    assert again.returncode == -signal.SIGTERM, output(tmp_path / "serve-again")
    assert not job_processes(all_job_ids(store))
    assert_sound(store)


def test_queue_serve_killed_with_builds_queued_and_running_finishes_them_all_after_a_restart(
    store_url: str, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    release.mkdir()
    with open_store(store_url) as store:
        submit_held(store, tmp_path, release, 5)
        first = serve(store_url, tmp_path, "serve")
        try:
            running = poll(
                lambda: two_running(store, release),
                "two builds to run",
                (first, tmp_path / "serve"),
            )
            pids = [int((release / f"pid-{b.number}").read_text()) for b in running]
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=TIMEOUT_S)
        finally:
            stop(first)
        # Its watchdog kills the jobs the moment it dies; the next start finds their builds.
        poll(lambda: True if not any(alive(p) for p in pids) else None, "the jobs to die")
        finish_after_restart(store, store_url, tmp_path, release)
        resumed = [store.get_build_by_id(b.id) for b in running]
        for build in resumed:
            assert build is not None
            [job] = store.list_jobs(build.id)
            assert job.retries_count == 0 and len(store.list_attempts(job.id)) == 2


def test_queue_serve_stopped_leaves_its_running_builds_to_resume(
    store_url: str, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    release.mkdir()
    with open_store(store_url) as store:
        submit_held(store, tmp_path, release, 5)
        first = serve(store_url, tmp_path, "serve")
        try:
            running = poll(
                lambda: two_running(store, release),
                "two builds to run",
                (first, tmp_path / "serve"),
            )
            pids = [int((release / f"pid-{b.number}").read_text()) for b in running]
            os.kill(first.pid, signal.SIGTERM)
            first.wait(timeout=TIMEOUT_S)
        finally:
            stop(first)
        assert not any(alive(p) for p in pids)
        for build in running:  # stopped, recorded, resumable: as after a crash, but at once
            row = store.get_build_by_id(build.id)
            assert row is not None
            assert (row.state, row.error_code) == (BuildState.FAILED, ErrorCode.BUILD_ABANDONED)
            [job] = store.list_jobs(build.id)
            assert (job.state, job.error_code) == (JobState.CANCELED, ErrorCode.BUILD_ABANDONED)
        queued = [b for b in store.list_builds(pipeline="held", limit=100) if b.queued]
        assert len(queued) == 3
        assert_sound(store)
        finish_after_restart(store, store_url, tmp_path, release)
