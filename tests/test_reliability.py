"""Nothing lost, nothing leaks (SPEC §5, §7), under real faults: a `kill -9` of the executor
with jobs that background grandchildren, trap SIGTERM and leave their process group; a closed
stdout or stderr; changes shown only once durable; a disk that fills (a real tmpfs); artifacts
that cannot be kept; a record no other user can read; a read-only store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from serving import TIMEOUT_S, poll, start, stop
from test_recovery import job_processes

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
