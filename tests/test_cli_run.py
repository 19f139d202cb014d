"""`harmont-exec run`, `builds`, `jobs`, `logs` as a user runs them: real processes, real store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from serving import TIMEOUT_S, cli, cli_bytes, poll, read_until

from executor.store import open_store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _start_run(cwd: Path, *args: str) -> subprocess.Popen[str]:
    """`harmont-exec run b.yaml ARGS` in the background, output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "executor", "run", "b.yaml", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    """Wait until a job has created ``path`` (an event from the child), bounded."""

    def appeared() -> bool | None:
        assert proc.poll() is None, proc.communicate()
        return True if path.exists() else None

    poll(appeared, f"a job to create {path.name}")


@pytest.mark.parametrize(
    "name",
    [
        "python-ci.yaml",
        "flaky-retry.yaml",
        "soft-fail-lint.yaml",
        "live-log.yaml",
        "harmont-flat-ir.json",
        "harmont-graph-ir.json",
    ],
)
def test_cli_run_examples_pass(name: str, tmp_path: Path) -> None:
    result = cli("run", str(EXAMPLES / name), "--db", str(tmp_path / "h.db"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout.splitlines()[-1]


def test_cli_run_failure_exits_1_and_shows_the_log_tail(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(
        "steps:\n  - {key: broken, command: 'echo compiling; echo boom >&2; exit 3'}\n"
        "  - {key: after, command: 'true', depends_on: broken}\n"
    )
    result = cli("run", "b.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "broken failed (exit 3" in result.stdout
    assert "after skipped (skipped because 'broken' failed)" in result.stdout
    assert "boom" in result.stdout  # the tail of the failed job's log
    assert (tmp_path / ".harmont" / "harmont.db").exists()  # the default store


def test_cli_run_invalid_file_exits_2(tmp_path: Path) -> None:
    result = cli("run", str(EXAMPLES / "invalid" / "three-step-cycle.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "dependency cycle" in result.stderr
    assert not (tmp_path / ".harmont").exists()  # nothing recorded for an invalid file


def test_cli_run_build_timeout_exits_124(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(
        "timeout_seconds: 1\nsteps:\n  - {key: s, command: sleep 60}\n"
    )
    result = cli("run", "b.yaml", "--grace-seconds", "0.2", cwd=tmp_path)
    assert result.returncode == 124, result.stdout
    # After the summary: the build's own error, then the verdict.
    *_, error, verdict = result.stdout.splitlines()
    assert error == "the build exceeded its timeout_seconds=1"
    assert verdict.startswith("build #1 failed in ") and verdict.endswith("(exit 124)")
    assert "pipeline_timeout" in cli("builds", cwd=tmp_path).stdout


def test_cli_run_sigint_cancels_the_build_and_exits_130(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(
        textwrap.dedent("""
        steps:
          - {key: busy, command: 'touch started; sleep 60'}
          - {key: later, command: 'true', depends_on: busy}
    """)
    )
    proc = _start_run(tmp_path, "--grace-seconds", "5")
    _wait_for(tmp_path / "started", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "busy canceled" in out and "later canceled" in out
    jobs = cli("jobs", "1", cwd=tmp_path).stdout
    assert "canceled" in jobs and "running" not in jobs and "pending" not in jobs


def test_cli_run_second_sigint_kills_a_job_that_ignores_sigterm(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(
        "steps:\n  - {key: stubborn, command: \"trap '' TERM; touch started; "
        'while :; do sleep 1; done"}\n'
    )
    proc = _start_run(tmp_path, "--grace-seconds", "600")
    _wait_for(tmp_path / "started", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None
    # The first signal was handled once the build says it is canceling.
    seen = read_until(proc.stdout, b"canceling", "the build to report canceling").decode()
    proc.send_signal(signal.SIGINT)  # without the second one, the grace period is 10 minutes
    out, err = proc.communicate(timeout=TIMEOUT_S)
    out = seen + out
    assert proc.returncode == 130, out + err
    assert "stubborn canceled (exit 137" in out


def test_cli_builds_jobs_and_logs_read_the_record(tmp_path: Path) -> None:
    (tmp_path / "ci.yaml").write_text(
        "steps:\n  - {key: hello, command: \"printf 'hi\\\\377\\\\n'\"}\n"
    )
    assert cli("run", "ci.yaml", cwd=tmp_path).returncode == 0
    builds = cli("builds", cwd=tmp_path)
    assert builds.returncode == 0 and "local/ci" in builds.stdout and "passed" in builds.stdout
    jobs = cli("jobs", "1", cwd=tmp_path)
    assert "hello" in jobs.stdout
    job_id = next(w for w in jobs.stdout.split() if len(w) == 36 and w.count("-") == 4)
    logs = cli_bytes("logs", job_id, cwd=tmp_path)
    assert logs.stdout == b"hi\xff\n"


def test_cli_jobs_unknown_build_exits_2(tmp_path: Path) -> None:
    open_store(tmp_path / ".harmont" / "harmont.db").close()  # a store, without that build
    result = cli("jobs", "7", cwd=tmp_path)
    assert result.returncode == 2
    assert "no build #7" in result.stderr


def test_cli_logs_unknown_job_exits_2(tmp_path: Path) -> None:
    open_store(tmp_path / ".harmont" / "harmont.db").close()  # a store, without that job
    result = cli("logs", "00000000-0000-0000-0000-000000000000", cwd=tmp_path)
    assert result.returncode == 2
    assert "no job" in result.stderr


@pytest.mark.parametrize(
    "args",
    [("builds",), ("jobs", "1"), ("logs", "0" * 8), ("artifacts", "1")],
    ids=["builds", "jobs", "logs", "artifacts"],
)
def test_cli_read_commands_refuse_a_store_that_does_not_exist(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    missing = tmp_path / "typo" / "harmont.db"
    result = cli(*args, "--db", str(missing), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"no store at {missing}: nothing was recorded there" in result.stderr
    assert not missing.parent.exists()  # nothing was created


def test_cli_bad_db_url_is_a_clear_error(tmp_path: Path) -> None:
    result = cli("builds", "--db", "mysql://x", cwd=tmp_path, env={**os.environ})
    assert result.returncode == 2, result.stderr  # a bad argument (SPEC §4), as a missing store
    assert "mysql://x" in result.stderr and "Traceback" not in result.stderr
