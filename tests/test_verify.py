"""`harmont-exec verify`: a real record is clean, and each way of breaking one is reported.

Every test runs a real build (a passing job with an artifact, a job retried once, a failing job
and the job it skips) into a real store, breaks the record the way the test names with plain
SQL from outside harmont-exec (or by touching the artifact files), and runs `verify` as a user
would: exit 1, one line naming the build, the job and what is wrong.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from serving import cli

from executor.store import open_store

BUILD = {
    "steps": [
        {"key": "ok", "command": "echo kept > report.txt", "artifact_paths": ["report.txt"]},
        {
            "key": "flaky",
            "command": "test -e flaked || { touch flaked; exit 3; }",
            "retry_policy": {"limit": 1, "exit_codes": [3]},
        },
        {"key": "broken", "command": "exit 1"},
        {"key": "after", "command": "true", "depends_on": ["broken"]},
    ]
}
NAME = "local/b #1"


@dataclass
class Record:
    db: str  # a SQLite file or a PostgreSQL URL
    work: Path
    ids: dict[str, str]  # step key -> job id

    def execute(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        """Run ``statements`` on the record from outside harmont-exec, references unchecked
        (as a hand edit, a bad restore or a bug would)."""
        if self.db.startswith("postgresql://"):
            import psycopg

            with psycopg.connect(self.db, autocommit=False) as pg:
                pg.execute("SET session_replication_role = replica")  # foreign keys off
                for statement, args in statements:
                    pg.execute(statement.replace("?", "%s"), args)
            return
        db = sqlite3.connect(self.db)
        try:
            for statement, args in statements:
                db.execute(statement, args)
            db.commit()
        finally:
            db.close()

    def verify(self) -> tuple[int, str, str]:
        done = cli("verify", "--db", self.db, cwd=self.work)
        return done.returncode, done.stdout, done.stderr


@pytest.fixture
def record(tmp_path: Path, store_url: str) -> Iterator[Record]:
    work = tmp_path / "work"
    work.mkdir()
    (work / "b.json").write_text(json.dumps(BUILD))
    ran = cli("run", "b.json", "--db", store_url, cwd=work)
    assert ran.returncode == 1, ran.stderr  # `broken` fails the build
    with open_store(store_url, must_exist=True, recover=False) as store:
        build = store.get_build(1)
        assert build is not None
        ids = {j.step_key: j.id for j in store.list_jobs(build.id)}
        assert len(store.list_attempts(ids["flaky"])) == 2
    yield Record(store_url, work, ids)


def test_verify_a_real_record_is_clean(record: Record) -> None:
    code, out, _ = record.verify()
    assert code == 0, out
    assert out.strip().endswith("ok: 1 build, 4 jobs, 20 transitions, 4 attempts, 1 artifact"), out
    assert out.count("\n") == 1, out


def _problems(record: Record) -> str:
    code, out, err = record.verify()
    assert code == 1, (out, err)
    assert "verify repairs nothing" in err and "restore it from a backup" in err, err
    return out


Breakage = Callable[[Record], None]


def _job_state_moved(r: Record) -> None:
    r.execute(("UPDATE jobs SET state = 'running' WHERE id = ?", (r.ids["ok"],)))


def _history_row_lost(r: Record) -> None:
    r.execute(("DELETE FROM job_transitions WHERE job_id = ? AND seq = 2", (r.ids["ok"],)))


def _history_event_changed(r: Record) -> None:
    r.execute(
        (
            "UPDATE job_transitions SET event = 'exited_nonzero' WHERE job_id = ? "
            "AND event = 'exited_zero'",
            (r.ids["ok"],),
        )
    )


def _history_start_changed(r: Record) -> None:
    r.execute(
        ("UPDATE job_transitions SET event = 'ready' WHERE job_id = ? AND seq = 0", (r.ids["ok"],))
    )


def _attempt_renumbered(r: Record) -> None:
    r.execute(("UPDATE attempts SET number = 3 WHERE job_id = ? AND number = 2", (r.ids["flaky"],)))


def _build_state_changed(r: Record) -> None:
    r.execute(("UPDATE builds SET state = 'passed'", ()))


def _job_points_nowhere(r: Record) -> None:
    r.execute(("UPDATE jobs SET build_id = 'gone' WHERE id = ?", (r.ids["after"],)))


BREAKAGES: dict[str, tuple[Breakage, str]] = {
    "a job's state is not where its history ends": (
        _job_state_moved,
        f"{NAME} job 'ok': its state is 'running' but its history ends in 'passed'",
    ),
    "a history row is missing": (
        _history_row_lost,
        f"{NAME} job 'ok': its history's seq numbers are [0, 1, 3, 4]; they must be 0, 1, "
        "2... in order",
    ),
    "a history step is not in the transition table": (
        _history_event_changed,
        f"{NAME} job 'ok': history seq 4: 'running' --exited_nonzero--> leads to 'failed', "
        "but the history says 'passed'",
    ),
    "a history does not start with the job's creation": (
        _history_start_changed,
        f"{NAME} job 'ok': its history starts with None --ready--> 'pending'; it must start "
        "with its creation (None --created--> 'pending')",
    ),
    "attempts are not numbered 1, 2, 3": (
        _attempt_renumbered,
        f"{NAME} job 'flaky': its attempts are numbered [1, 3]; they must be 1, 2, 3... "
        "without gaps",
    ),
    "a build is not in the state its jobs roll up to": (
        _build_state_changed,
        f"{NAME}: it is 'passed' but its jobs roll up to 'failed' (cancel requested: no, "
        "error code: None)",
    ),
    "a row points at a row that is not there": (
        _job_points_nowhere,
        "1 row of jobs point at builds that are not there (jobs.build_id); restore the record "
        "from a backup",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_verify_reports_a_broken_record(record: Record, breakage: str) -> None:
    breaks, said = BREAKAGES[breakage]
    assert record.verify()[0] == 0  # the same record was clean
    breaks(record)
    out = _problems(record)
    assert said in out.splitlines(), out


def _blob(record: Record) -> Path:
    with open_store(record.db, must_exist=True, recover=False) as store:
        (artifact,) = store.list_artifacts(job_id=record.ids["ok"])
        return store.blobs.path_of(artifact.sha256)


def test_verify_reports_an_artifact_whose_file_is_gone(record: Record) -> None:
    blob = _blob(record)
    blob.unlink()
    out = _problems(record)
    assert "job 'ok': artifact 'report.txt'" in out, out
    assert f"its content is missing (no file {blob})" in out, out


def test_verify_reports_an_artifact_whose_file_changed(record: Record) -> None:
    blob = _blob(record)
    blob.chmod(0o600)
    blob.write_bytes(b"KEPT\n")  # same size, other bytes
    out = _problems(record)
    assert f"its content {blob} has SHA-256 " in out and f", not {blob.name}" in out, out


def test_verify_reports_a_sqlite_file_whose_structure_is_damaged(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "b.json").write_text(json.dumps(BUILD))
    db = str(tmp_path / "harmont.db")
    assert cli("run", "b.json", "--db", db, cwd=work).returncode == 1
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA writable_schema = ON")  # an index's pages swapped for another's
    (other,) = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = 'artifacts_by_job'")
    raw.execute("UPDATE sqlite_master SET rootpage = ? WHERE name = 'jobs_by_build'", other)
    raw.commit()
    raw.close()
    out = _problems(Record(db, work, {}))
    assert "the database's structure: wrong # of entries in index jobs_by_build" in out, out


def test_verify_reports_a_postgresql_constraint_left_unvalidated(
    tmp_path: Path, postgresql_url: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "b.json").write_text(json.dumps(BUILD))
    assert cli("run", "b.json", "--db", postgresql_url, cwd=work).returncode == 1
    record = Record(postgresql_url, work, {})
    record.execute(
        ("ALTER TABLE jobs ADD CONSTRAINT positions_small CHECK (position < 2) NOT VALID", ())
    )
    out = _problems(record)
    assert "the database's structure: constraint positions_small is not validated" in out, out


def test_verify_of_a_store_that_is_not_there_exits_2(tmp_path: Path) -> None:
    done = cli("verify", "--db", str(tmp_path / "typo.db"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"no store at {tmp_path / 'typo.db'}" in done.stderr, done.stderr
    assert not (tmp_path / "typo.db").exists()
