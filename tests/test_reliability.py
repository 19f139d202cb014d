"""Nothing lost, nothing leaks (SPEC §5, §7), under real faults: a `kill -9` of the executor
with jobs that background grandchildren, trap SIGTERM and leave their process group; a closed
stdout or stderr; changes shown only once durable; a disk that fills (a real tmpfs); artifacts
that cannot be kept; a record no other user can read; a read-only store."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import TIMEOUT_S, poll, start, stop
from test_recovery import assert_histories_are_legal, job_processes

from executor.store import open_store

PY = sys.executable

# Three jobs a dead executor must not leave behind: one with a backgrounded grandchild in its
# group, one that ignores SIGTERM, one whose child left the group (a new session).
LEAKY = {
    "steps": [
        {"key": "background", "command": "sleep 300 & touch ready-background; wait"},
        {
            "key": "trapping",
            "command": "trap '' TERM; sleep 301 & touch ready-trapping; "
            "while true; do sleep 0.05; done",
        },
        {
            "key": "daemon",
            "command": "setsid sleep 302 & touch ready-daemon; while true; do sleep 0.05; done",
        },
    ]
}


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_kill_9_of_run_leaves_no_job_process_with_no_other_command(tmp_path: Path) -> None:
    (tmp_path / "leaky.json").write_text(json.dumps(LEAKY))
    db = tmp_path / "harmont.db"
    out = tmp_path / "run"
    run = start(["run", "leaky.json", "--db", str(db), "-j", "3"], tmp_path, out)
    try:
        for name in ("background", "trapping", "daemon"):
            poll(lambda n=name: (tmp_path / f"ready-{n}").exists() or None, name, (run, out))
        with open_store(db, recover=False) as store:
            (build,) = store.list_builds()
            job_ids = {j.id for j in store.list_jobs(build.id)}
        before = job_processes(job_ids)
        # the shells, their sleeps, the loops' sleeps; one sleep in a session of its own
        assert len(before) >= 6, before
        sessions = {_session(pid) for pid in before} - {None}
        assert len(sessions) >= 4, "the daemon's sleep left its job's session"
        os.kill(run.pid, signal.SIGKILL)  # the executor alone, as a crash would
        run.wait(timeout=TIMEOUT_S)
        poll(lambda: True if not job_processes(job_ids) else None, "no job process left")
        with open_store(db, recover=False) as store:  # nobody else looked at the record
            (build,) = store.list_builds()
            assert not build.state.is_terminal
    finally:
        stop(run)


BUILD = """\
steps:
  - {key: first, command: 'echo one'}
  - {key: second, command: 'echo two', depends_on: first}
  - {key: third, command: 'echo three', depends_on: second}
"""


def _recorded(db: Path) -> dict[str, str]:
    with open_store(db) as store:
        (build,) = store.list_builds()
        return {"build": build.state.value} | {
            j.step_key: j.state.value for j in store.list_jobs(build.id)
        }


def test_run_piped_into_head_runs_the_build_to_its_end_quietly(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(BUILD)
    shell = subprocess.run(
        [
            "bash",
            "-c",
            f'{PY} -m executor run b.yaml --db h.db | head -1; echo "status ${{PIPESTATUS[0]}}"',
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    lines = shell.stdout.splitlines()
    assert len(lines) == 2 and lines[1] == "status 0", shell.stdout + shell.stderr
    assert "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr, shell.stderr
    assert _recorded(tmp_path / "h.db") == {
        "build": "passed",
        "first": "passed",
        "second": "passed",
        "third": "passed",
    }


def test_run_with_stdout_or_stderr_closed_runs_and_records_the_build(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(BUILD.replace("echo three", "echo three; exit 3"))
    for closed in ("2>&-", ">&-", ">&- 2>&-"):
        db = tmp_path / f"h{len(closed)}.db"
        shell = subprocess.run(
            ["bash", "-c", f"{PY} -m executor run b.yaml --db {db} {closed}; echo status $?"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        assert shell.stdout.strip().endswith("status 1"), (closed, shell.stdout, shell.stderr)
        assert "Traceback" not in shell.stdout + shell.stderr
        assert _recorded(db) == {
            "build": "failed",
            "first": "passed",
            "second": "passed",
            "third": "failed",
        }, closed
        with open_store(db) as store:  # nothing was written into the database by "stderr"
            assert store.check_integrity() == "ok"


# --- a disk that fills: a real tmpfs ----------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (tests run as root in CI), unmounted after.
    Skips, saying why, where mounting is not permitted, but never under CI."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs here ({mounted.stderr.strip()}): run the tests as root"
        if os.environ.get("CI"):
            pytest.fail(f"under CI the disk faults are real: {message}")
        pytest.skip(message)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def _remount(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


FILLING = """\
steps:
  - {key: before, command: echo recorded-before}
  - {key: flood, command: 'head -c 4000000 /dev/zero | base64', depends_on: before}
  - {key: waiting, command: 'while [ ! -e go ]; do sleep 0.05; done', depends_on: before}
  - {key: never, command: 'echo never', depends_on: [flood, waiting]}
"""
_LINE = re.compile(r"^\d\d:\d\d:\d\d (\S+) (\S+)")


def test_full_disk_loses_nothing_shown_and_the_build_resumes(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(FILLING)
    with tmpfs(tmp_path / "disk", "2m") as disk:
        db = disk / "harmont.db"
        run = subprocess.run(
            [PY, "-m", "executor", "run", "b.yaml", "--db", str(db), "-j", "2"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        assert run.returncode == 1, run.stdout + run.stderr
        message = run.stderr.strip().splitlines()[-1]
        assert "the disk is full" in message, message
        assert "Build #1 was stopped and recorded as stopped" in message
        assert "Free space there, then `harmont-exec resume 1 --pipeline b` runs" in message
        assert "bytes of 'flood'" in message  # its output after the disk filled is named
        shown: dict[str, list[str]] = {}
        for line in run.stdout.splitlines():
            match = _LINE.match(line)
            if match and match.group(1) != "build":
                shown.setdefault(match.group(1), []).append(match.group(2))
        assert shown["before"][-1] == "passed"
        with open_store(db) as store:
            assert store.check_integrity() == "ok"
            (build,) = store.list_builds()
            assert (build.state.value, build.error_code) == ("failed", "record_failed")
            jobs = {j.step_key: j for j in store.list_jobs(build.id)}
            assert_histories_are_legal(store, build.id)
            # Everything the console said is in the record: each state it showed is in the
            # job's history, and the last one it showed is the job's state.
            for key, states in shown.items():
                history = [t.to_state.value for t in store.job_transitions(jobs[key].id)]
                assert set(states) <= set(history), (key, states, history)
                assert states[-1] == jobs[key].state.value, (key, states, jobs[key].state)
            assert jobs["waiting"].state.value == "canceled"
            assert jobs["waiting"].error_code == "record_failed"
            log = b"".join(c.content for c in store.read_log(jobs["before"].id))
            assert log == b"recorded-before\n"
        assert not job_processes({j.id for j in jobs.values()})
        # Space freed: resume runs what did not end.
        _remount(disk, "64m")
        (tmp_path / "go").touch()
        resumed = subprocess.run(
            [PY, "-m", "executor", "resume", "1", "--pipeline", "b", "--db", str(db)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        with open_store(db) as store:
            (build,) = store.list_builds()
            assert build.state.value == "passed"
            assert_histories_are_legal(store, build.id)


def test_full_artifact_store_fails_the_job_with_artifact_upload_failed(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "steps:\n"
        "  - {key: make, command: 'head -c 3000000 /dev/urandom > big.bin', "
        "artifact_paths: [big.bin]}\n"
        "  - {key: after, command: 'echo after', depends_on: make}\n"
    )
    db = tmp_path / "store" / "harmont.db"
    open_store(db).close()
    with tmpfs(tmp_path / "store" / "artifacts", "1m"):
        run = subprocess.run(
            [PY, "-m", "executor", "run", "a.yaml", "--db", str(db)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        assert run.returncode == 1, run.stdout + run.stderr
        with open_store(db) as store:
            (build,) = store.list_builds()
            jobs = {j.step_key: j for j in store.list_jobs(build.id)}
            make = jobs["make"]
            assert (make.state.value, make.error_code) == ("failed", "artifact_upload_failed")
            assert make.exit_code == 0  # the command's own exit status is kept
            assert not make.soft_failed
            assert "big.bin could not be kept" in (make.error_message or "")
            assert "free disk space" in (make.error_message or "")
            assert jobs["after"].state.value == "skipped"
            assert build.state.value == "failed"
            assert store.list_artifacts(build_id=build.id) == []


def test_artifact_over_the_size_limit_fails_its_job_before_any_copy(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "steps:\n"
        "  - {key: sparse, command: 'truncate -s 2G huge.img', artifact_paths: [huge.img]}\n"
    )
    db = tmp_path / "h.db"
    run = subprocess.run(
        [PY, "-m", "executor", "run", "a.yaml", "--db", str(db), "--max-artifact-mb", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    with open_store(db) as store:
        (build,) = store.list_builds()
        (job,) = store.list_jobs(build.id)
        assert job.error_code == "artifact_upload_failed"
        assert "huge.img is 2048.0 MB, over the limit of 1 MB per file" in (job.error_message or "")
    blobs = list((tmp_path / "artifacts").rglob("*")) if (tmp_path / "artifacts").exists() else []
    assert sum(p.stat().st_size for p in blobs if p.is_file()) == 0  # nothing was copied


# --- a private record ---------------------------------------------------------------------------

NOBODY = 65534


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _as_nobody(script: str) -> subprocess.CompletedProcess[str]:
    """``/bin/sh -c script`` as another user (the tests run as root, who reads anything)."""
    return subprocess.run(
        ["/bin/sh", "-c", script],
        user=NOBODY,
        group=NOBODY,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
        cwd="/",
    )


def test_record_is_private_whatever_the_umask(request: pytest.FixtureRequest) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("under CI the tests run as root, to try the record as another user")
        pytest.skip("needs root, to read the record as another user")
    # Not under tmp_path: pytest makes that 0700, so nobody could reach anything in it anyway.
    work = Path(tempfile.mkdtemp(prefix="harmont-private-"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    work.chmod(0o755)
    (work / "b.yaml").write_text(
        "steps:\n  - {key: a, command: 'echo secret > out.txt', artifact_paths: [out.txt]}\n"
    )
    run = subprocess.run(
        ["bash", "-c", f"umask 022; {PY} -m executor run b.yaml"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    store = work / ".harmont"
    assert _mode(store) == 0o700
    assert _mode(store / "harmont.db") == 0o600
    assert _mode(store / "harmont.db.reserve") == 0o600
    for side in (store / "harmont.db-wal", store / "harmont.db-shm"):
        if side.exists():
            assert _mode(side) == 0o600, side
    directories = [p for p in (store / "artifacts").rglob("*") if p.is_dir()]
    assert directories and all(_mode(p) == 0o700 for p in [store / "artifacts", *directories])
    blobs = [p for p in (store / "sha256").rglob("*") if p.is_file()] or [
        p for p in (store / "artifacts").rglob("*") if p.is_file()
    ]
    assert blobs and all(_mode(p) & 0o077 == 0 for p in blobs), [oct(_mode(p)) for p in blobs]
    # Another user can open nothing of it.
    refused = _as_nobody(
        f"cat {work / 'b.yaml'} > /dev/null 2>&1 && echo opened || echo refused; "  # reachable
        f"cat {store / 'harmont.db'} > /dev/null 2>&1 && echo opened || echo refused; "
        f"ls {store} > /dev/null 2>&1 && echo opened || echo refused"
    )
    assert refused.stdout.split() == ["opened", "refused", "refused"], refused.stdout


def test_an_existing_store_is_tightened_on_open_and_said_once(tmp_path: Path) -> None:
    store = tmp_path / ".harmont"
    db = store / "harmont.db"
    open_store(db).close()
    store.chmod(0o755)
    db.chmod(0o644)
    first = subprocess.run(
        [PY, "-m", "executor", "builds"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("store_permissions_tightened") == 1, first.stderr
    assert _mode(store) == 0o700 and _mode(db) == 0o600
    again = subprocess.run(
        [PY, "-m", "executor", "builds"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert "store_permissions_tightened" not in again.stderr


# --- a read-only store ------------------------------------------------------------------------


def test_read_commands_work_on_a_read_only_store_and_skip_recovery(tmp_path: Path) -> None:
    (tmp_path / "slow.yaml").write_text(
        "steps:\n  - {key: a, command: 'echo a'}\n"
        "  - {key: b, command: 'while [ ! -e go ]; do sleep 0.05; done', depends_on: a}\n"
    )
    with tmpfs(tmp_path / "disk", "16m") as disk:
        db = disk / "harmont.db"
        out = tmp_path / "run"
        run = start(["run", "slow.yaml", "--db", str(db)], tmp_path, out)
        try:

            def b_running() -> bool | None:
                with open_store(db, recover=False) as store:
                    builds = store.list_builds()
                    jobs = {j.step_key: j for j in store.list_jobs(builds[0].id)} if builds else {}
                return True if "b" in jobs and jobs["b"].state.value == "running" else None

            poll(b_running, "job b to run", (run, out))
            os.kill(run.pid, signal.SIGKILL)  # its build is left running: a job for recovery
            run.wait(timeout=TIMEOUT_S)
        finally:
            stop(run)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for args in (["builds"], ["jobs", "1"]):
            result = subprocess.run(
                [PY, "-m", "executor", *args, "--db", str(db)],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
            assert result.returncode == 0, (args, result.stdout, result.stderr)
            assert "running" in result.stdout  # shown as left: nothing could be written
            assert result.stderr.count("recovery_skipped") == 1, result.stderr
            assert "Traceback" not in result.stderr
