"""Nothing lost, nothing leaks (SPEC §5, §7), under real faults: a `kill -9` of the executor
with jobs that background grandchildren, trap SIGTERM and leave their process group; a closed
stdout or stderr; changes shown only once durable; a disk that fills (a real tmpfs); artifacts
that cannot be kept; a record no other user can read; a read-only store."""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import termios
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from serving import TIMEOUT_S, alive, assert_sound, cli, mint_token, output, poll, start, stop
from test_recovery import assert_histories_are_legal, job_processes

from executor.api import create_app
from executor.errors import StoreError
from executor.store import open_store
from executor.store.sqlite import artifacts_beside

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
        # its own process clears its environment: no mark, but it leads the job's group
        {"key": "unmarked", "command": "touch ready-unmarked; exec env -i /bin/sleep 303"},
    ]
}


def _pids_of(command: str) -> list[int]:
    """Pids whose command line is exactly ``command`` (by /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip()
            except OSError:
                continue
            if line.decode(errors="replace") in (command, f"/bin/{command}"):
                found.append(int(entry.name))
    return found


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_kill_9_of_run_leaves_no_job_process_with_no_other_command(tmp_path: Path) -> None:
    (tmp_path / "leaky.json").write_text(json.dumps(LEAKY))
    db = tmp_path / "harmont.db"
    out = tmp_path / "run"
    run = start(["run", "leaky.json", "--db", str(db), "-j", "4"], tmp_path, out)
    try:
        for name in ("background", "trapping", "daemon", "unmarked"):
            poll(lambda n=name: (tmp_path / f"ready-{n}").exists() or None, name, (run, out))

        def unmarked() -> list[int] | None:
            found = [p for p in _pids_of("sleep 303")]
            return found or None

        cleared = poll(unmarked, "the job that cleared its environment")
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
        poll(lambda: True if not any(alive(p) for p in cleared) else None, "the unmarked one gone")
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
            assert_sound(store)


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
  - key: cleanup
    command: echo cleanup
    depends_on: [flood, waiting]
    allow_dependency_failure: true
  - {key: notify, command: 'echo notify', depends_on: cleanup}
"""
_LINE = re.compile(r"^\d\d:\d\d:\d\d (\S+) (\S+)")


def test_full_disk_loses_nothing_shown_and_the_build_resumes(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(FILLING)
    with tmpfs(tmp_path / "disk", "2m") as disk:
        db = disk / "harmont.db"
        run = cli("run", "b.yaml", "--db", str(db), "-j", "2", cwd=tmp_path)
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
            assert_sound(store)
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
            # Stopped or not started, all of it is unfinished work for `resume`, down the DAG.
            for key in ("waiting", "never", "cleanup", "notify"):
                assert (jobs[key].state.value, jobs[key].error_code) == (
                    "canceled",
                    "record_failed",
                ), key
            log = b"".join(c.content for c in store.read_log(jobs["before"].id))
            assert log == b"recorded-before\n"
            cut = b"".join(
                c.content for c in store.read_log(jobs["flood"].id) if c.stream == "meta"
            )
            assert b"the record's disk was full" in cut  # the cut log says so itself
        assert not job_processes({j.id for j in jobs.values()})
        # Space freed: resume runs what did not end.
        _remount(disk, "64m")
        (tmp_path / "go").touch()
        resumed = cli("resume", "1", "--pipeline", "b", "--db", str(db), cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        with open_store(db) as store:
            (build,) = store.list_builds()
            assert build.state.value == "passed"
            assert_histories_are_legal(store, build.id)
            jobs = {j.step_key: j for j in store.list_jobs(build.id)}
            assert all(j.state.value == "passed" for j in jobs.values()), jobs
            notify = b"".join(c.content for c in store.read_log(jobs["notify"].id))
            assert notify == b"notify\n"


def test_full_artifact_store_fails_the_job_with_artifact_upload_failed(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "steps:\n"
        "  - {key: make, command: 'head -c 3000000 /dev/urandom > big.bin', "
        "artifact_paths: [big.bin]}\n"
        "  - {key: after, command: 'echo after', depends_on: make}\n"
    )
    db = tmp_path / "store" / "harmont.db"
    open_store(db).close()
    with tmpfs(artifacts_beside(db), "1m"):
        run = cli("run", "a.yaml", "--db", str(db), cwd=tmp_path)
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
    run = cli("run", "a.yaml", "--db", str(db), "--max-artifact-mb", "1", cwd=tmp_path)
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


def _open_as_nobody(db: Path) -> str:
    """Open the store ``db`` in a forked child that has become another user (its modules are
    already imported, so the interpreter's own files need not be readable to that user): the
    StoreError's message, or what else happened."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                open_store(db, must_exist=True).close()
                said = "opened"
            except StoreError as exc:
                said = str(exc)
            except BaseException as exc:
                said = f"unexpected: {exc!r}"
            os.write(write_end, said.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reading:
        said = reading.read().decode()
    os.waitpid(pid, 0)
    return said


def test_another_users_store_is_refused_naming_its_owner(request: pytest.FixtureRequest) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("under CI the tests run as root, to try the record as another user")
        pytest.skip("needs root, to read the record as another user")
    work = Path(tempfile.mkdtemp(prefix="harmont-private-"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    work.chmod(0o755)
    db = work / ".harmont" / "harmont.db"
    open_store(db).close()
    said = _open_as_nobody(db)
    assert said.startswith(f"cannot read the store {db}: permission denied"), said
    assert f"uid 0 owns {db.parent}" in said and "run as that user" in said, said
    (work / ".harmont").chmod(0o755)  # its directory opened up, the file itself is still 0600
    said = _open_as_nobody(db)
    assert said.startswith(f"cannot read the store {db}: permission denied"), said
    assert f"uid 0 owns {db})" in said, said
    db.chmod(0o644)  # made readable by its owner: it opens (read-only) for the other user
    assert _open_as_nobody(db) == "opened"


def test_an_existing_store_is_tightened_on_open_and_said_once(tmp_path: Path) -> None:
    store = tmp_path / ".harmont"
    db = store / "harmont.db"
    open_store(db).close()
    store.chmod(0o755)
    db.chmod(0o644)
    first = cli("builds", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("store_permissions_tightened") == 1, first.stderr
    assert _mode(store) == 0o700 and _mode(db) == 0o600
    again = cli("builds", cwd=tmp_path)
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
            result = cli(*args, "--db", str(db), cwd=tmp_path)
            assert result.returncode == 0, (args, result.stdout, result.stderr)
            assert "running" in result.stdout  # shown as left: nothing could be written
            assert result.stderr.count("recovery_skipped") == 1, result.stderr
            assert "Traceback" not in result.stderr


def test_run_goes_on_when_its_terminal_goes_away(tmp_path: Path) -> None:
    """SIGHUP (the terminal closed) changes nothing: the build runs to its end."""
    (tmp_path / "b.yaml").write_text(
        "steps:\n"
        "  - {key: wait, command: 'touch started; while [ ! -e go ]; do sleep 0.05; done'}\n"
    )
    out = tmp_path / "run"
    run = start(["run", "b.yaml", "--db", "h.db"], tmp_path, out)
    try:
        poll(lambda: (tmp_path / "started").exists() or None, "the job to start", (run, out))
        run.send_signal(signal.SIGHUP)
        (tmp_path / "go").touch()
        assert run.wait(timeout=TIMEOUT_S) == 0, output(out)
    finally:
        stop(run)
    assert _recorded(tmp_path / "h.db") == {"build": "passed", "wait": "passed"}


def test_output_to_a_full_disk_fails_a_read_command_not_a_build(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(BUILD)
    ran = subprocess.run(
        ["bash", "-c", f"{PY} -m executor run b.yaml --db h.db > /dev/full"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr  # the build's status: it passed
    assert "the output could not be written: No space left on device" in ran.stderr
    assert "Traceback" not in ran.stderr
    listed = subprocess.run(
        ["bash", "-c", f"{PY} -m executor builds --db h.db > /dev/full"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert listed.returncode == 1  # its output was the point
    assert "the output could not be written: No space left on device" in listed.stderr
    assert "Traceback" not in listed.stderr


def test_run_waits_for_a_slow_reader_of_a_non_blocking_pipe(tmp_path: Path) -> None:
    """A CI runner may hand over a non-blocking pipe: nothing printed may be dropped."""
    steps = [{"key": f"j{n}", "command": "true"} for n in range(2000)]  # far past 64 KB
    (tmp_path / "b.json").write_text(json.dumps({"steps": steps}))
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    proc = subprocess.Popen(
        [PY, "-m", "executor", "run", "b.json", "--db", "h.db", "-j", "2"],
        cwd=tmp_path,
        stdout=write_end,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)

    def pipe_full_and_run_past_it() -> bool | None:
        """Nobody has read yet: the pipe is full, and `run` either waits for the reader (as it
        must) or went on past it (dropping lines: the fault)."""
        waiting = array.array("i", [0])
        fcntl.ioctl(read_end, termios.FIONREAD, waiting)
        if waiting[0] < 60_000:
            return None
        with open(f"/proc/{proc.pid}/wchan") as wchan:
            if wchan.read().endswith("pipe_write"):
                return True  # blocked in a write to the pipe
        try:
            with open_store(tmp_path / "h.db", recover=False) as store:
                (build,) = store.list_builds()
                ended = sum(j.state.is_terminal for j in store.list_jobs(build.id))
        except (StoreError, ValueError):
            return None
        return True if ended >= 1800 else None

    poll(pipe_full_and_run_past_it, "the pipe to fill while nobody reads it")
    received = b""
    with os.fdopen(read_end, "rb") as reader:
        while chunk := reader.read(65536):
            received += chunk
    assert proc.wait(timeout=TIMEOUT_S) == 0
    text = received.decode()
    assert text.count(" passed (exit 0)") == 2000  # every job's end line
    assert "build #1 passed" in text  # and the summary, the last thing printed


def test_permissions_are_only_ever_tightened_and_a_users_artifacts_dir_is_left_alone(
    tmp_path: Path,
) -> None:
    # A user's own artifacts/ beside --db ./ci.db is not the store's: blobs go beside the db.
    (tmp_path / "artifacts").mkdir(mode=0o755)
    (tmp_path / "artifacts").chmod(0o755)
    (tmp_path / "b.yaml").write_text(
        "steps:\n  - {key: a, command: 'echo x > out.txt', artifact_paths: [out.txt]}\n"
    )
    run = cli("run", "b.yaml", "--db", "ci.db", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _mode(tmp_path / "artifacts") == 0o755 and not list((tmp_path / "artifacts").iterdir())
    assert _mode(tmp_path / "ci.db.artifacts") == 0o700
    assert list((tmp_path / "ci.db.artifacts" / "sha256").rglob("*"))
    # A store whose owner made it stricter stays so: nothing is ever loosened.
    store = tmp_path / "strict" / ".harmont"
    open_store(store / "harmont.db").close()
    store.chmod(0o500)
    try:
        listed = cli("builds", "--db", str(store / "harmont.db"), cwd=tmp_path)
        assert "store_permissions_tightened" not in listed.stderr, listed.stderr
        assert _mode(store) == 0o500
    finally:
        store.chmod(0o700)


def test_an_artifact_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to make a directory another user owns")
    foreign = tmp_path / "x.db.artifacts"
    foreign.mkdir()
    os.chown(foreign, NOBODY, NOBODY)
    (tmp_path / "b.yaml").write_text("steps:\n  - {key: a, command: 'true'}\n")
    result = cli("run", "b.yaml", "--db", str(tmp_path / "x.db"), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{foreign} belongs to another user (uid {NOBODY})" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_copy_killed_mid_way_is_swept_at_the_next_start(tmp_path: Path) -> None:
    db = tmp_path / ".harmont" / "harmont.db"
    open_store(db).close()
    tmp = tmp_path / ".harmont" / "artifacts" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "incoming-left").write_bytes(b"x" * 100_000)  # no one holds its lock
    held = tmp / "incoming-held"
    held.write_bytes(b"y")
    with open(held, "rb") as writing:  # one being written now (its writer holds the lock)
        fcntl.flock(writing.fileno(), fcntl.LOCK_EX)
        open_store(db).close()
        assert not (tmp / "incoming-left").exists()
        assert held.exists()


def test_a_read_only_copy_with_a_wal_but_no_shm_is_refused_not_shown_stale(
    tmp_path: Path,
) -> None:
    source = tmp_path / "src" / "harmont.db"
    open_store(source).close()
    with open_store(source) as store:  # keep a -wal: another connection holds it open
        (tmp_path / "b.yaml").write_text("steps:\n  - {key: a, command: 'true'}\n")
        import executor

        executor.run_build_sync(tmp_path / "b.yaml", store=store)
        wal = source.with_name("harmont.db-wal")
        assert wal.exists() and wal.stat().st_size > 0
        with tmpfs(tmp_path / "ro", "16m") as ro:
            shutil.copy(source, ro / "harmont.db")
            shutil.copy(wal, ro / "harmont.db-wal")  # but not the -shm
            subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
            result = cli("builds", "--db", str(ro / "harmont.db"), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "harmont.db-wal holds changes that cannot be read without its harmont.db-shm" in (
        result.stderr
    )


@contextlib.contextmanager
def ext4(where: Path, size: str = "64M") -> Iterator[tuple[Path, str]]:
    """A real ext4 filesystem on a loop device, mounted ``errors=remount-ro`` at ``where``:
    (the mount point, the device's name in /sys/fs/ext4). Skips where that is not permitted,
    but never under CI."""
    image = where.with_suffix(".img")
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0 or device.returncode != 0:
        message = f"cannot make an ext4 loop device here ({made.stderr}{device.stderr})"
        if os.environ.get("CI"):
            pytest.fail(f"under CI the disk faults are real: {message}")
        pytest.skip(message)
    loop = device.stdout.strip()
    where.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-o", "errors=remount-ro", loop, str(where)], check=True)
        try:
            yield where, Path(loop).name
        finally:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


def test_a_disk_the_kernel_turns_read_only_mid_build_stops_it_and_reads_still_work(
    tmp_path: Path,
) -> None:
    """ext4 remounted read-only by the kernel after an error (it still says it is writable):
    the run stops with its message, and read commands show the record, skipping recovery."""
    (tmp_path / "b.yaml").write_text(
        "steps:\n  - {key: before, command: 'echo before'}\n"
        "  - {key: wait, command: 'touch started; while [ ! -e go ]; do sleep 0.05; done', "
        "depends_on: before}\n"
    )
    with ext4(tmp_path / "disk") as (disk, device):
        db = disk / "harmont.db"
        out = tmp_path / "run"
        run = start(["run", "b.yaml", "--db", str(db)], tmp_path, out)
        try:
            poll(lambda: (tmp_path / "started").exists() or None, "the job to start", (run, out))
            trigger = Path(f"/sys/fs/ext4/{device}/trigger_fs_error")
            if not trigger.exists():
                message = f"{trigger} is missing: this kernel cannot fail an ext4 on purpose"
                if os.environ.get("CI"):
                    pytest.fail(message)
                pytest.skip(message)
            trigger.write_text("1")
            (tmp_path / "go").touch()
            assert run.wait(timeout=TIMEOUT_S) == 1, output(out)
            assert "Build #1 was stopped there" in output(out)
        finally:
            stop(run)
        for args in (["builds"], ["jobs", "1"]):
            result = cli(*args, "--db", str(db), cwd=tmp_path)
            assert result.returncode == 0, (args, result.stdout, result.stderr)
            assert result.stderr.count("recovery_skipped") == 1, result.stderr
            assert "Traceback" not in result.stderr


def test_serve_reads_a_read_only_store_and_says_why_it_cannot_mint_log_tokens(
    tmp_path: Path,
) -> None:
    (tmp_path / "b.yaml").write_text("steps:\n  - {key: a, command: 'echo a'}\n")
    source = tmp_path / "src" / "harmont.db"
    import executor

    executor.run_build_sync(tmp_path / "b.yaml", db=source)
    secret = mint_token(source)
    with tmpfs(tmp_path / "ro", "16m") as ro:
        shutil.copy(source, ro / "harmont.db")  # closed cleanly: no -wal to copy
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)

        async def ask() -> tuple[httpx.Response, httpx.Response]:
            app = create_app(db=ro / "harmont.db")
            headers = {"Authorization": f"Bearer {secret}"}
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers
            ) as client:
                build = "/api/v0/organizations/local/pipelines/b/builds/1"
                return await client.get(f"{build}/jobs"), await client.get(f"{build}/log-token")

        jobs, token = anyio.run(ask)
    assert jobs.status_code == 200 and jobs.json()["data"][0]["state"] == "passed"
    assert token.status_code == 503, token.text
    error = token.json()["error"]
    assert error["code"] == "store_read_only"
    assert "is read-only and has no 'log_token_hmac' key yet" in error["message"]
