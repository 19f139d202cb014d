"""One mapping from an error to an exit code, whatever the command (SPEC §4, cli/common.py):
2 for what the user typed (an invalid build file, a store location that is not one, a store that
is not there, no such build / job / token / artifact), 1 for what went wrong beyond that; the
message on stderr names the thing, without a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving import cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
INVALID = EXAMPLES / "invalid" / "missing-prerequisite.yaml"
GOOD = EXAMPLES / "soft-fail-lint.yaml"

# (the arguments, with {db} an existing store and {missing} a store that is not there)
BAD_ARGUMENTS: dict[str, list[str]] = {
    "plan: an invalid build file": ["plan", str(INVALID)],
    "run: an invalid build file": ["run", str(INVALID), "--db", "{db}"],
    "run: a store location that is not one": ["run", str(GOOD), "--db", "ftp://host/x"],
    "builds: a store location that is not one": ["builds", "--db", "ftp://host/x"],
    "serve: a store location that is not one": ["serve", "--db", ":memory:"],
    "builds: a store that is not there": ["builds", "--db", "{missing}"],
    "jobs: a store that is not there": ["jobs", "1", "--db", "{missing}"],
    "logs: a store that is not there": ["logs", "0123456789", "--db", "{missing}"],
    "artifacts: a store that is not there": ["artifacts", "1", "--db", "{missing}"],
    "verify: a store that is not there": ["verify", "--db", "{missing}"],
    "jobs: no such build": ["jobs", "99", "--db", "{db}"],
    "logs: no such job": ["logs", "0123456789", "--db", "{db}"],
    "artifacts: no such build": ["artifacts", "99", "--db", "{db}"],
    "download: no such artifact": ["artifacts", "download", "nope", "--db", "{db}"],
    "token revoke: no such token": ["token", "revoke", "nope", "--db", "{db}"],
    "resume: no such build": ["resume", "99", "--db", "{db}"],
}
SAID = {
    "plan: an invalid build file": "missing-prerequisite.yaml:",
    "run: an invalid build file": "missing-prerequisite.yaml:",
    "run: a store location that is not one": "harmont-exec: --db='ftp://host/x' is not a store",
    "builds: a store location that is not one": "harmont-exec: --db='ftp://host/x' is not a",
    "serve: a store location that is not one": "harmont-exec: --db=':memory:': the store must",
    "jobs: no such build": "harmont-exec: no build #99",
    "logs: no such job": "harmont-exec: no job '0123456789'",
    "artifacts: no such build": "harmont-exec: no build #99",
    "download: no such artifact": "harmont-exec: no artifact 'nope'",
    "token revoke: no such token": "harmont-exec: no token 'nope'",
    "resume: no such build": "harmont-exec: no build #99",
}


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with one finished build."""
    work = tmp_path_factory.mktemp("work")
    store = work / "harmont.db"
    ran = cli("run", str(GOOD), "--db", str(store), cwd=work)
    assert ran.returncode == 0, ran.stderr
    return store


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_cli_a_bad_argument_exits_2_saying_what(case: str, db: Path, tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    args = [a.format(db=db, missing=missing) for a in BAD_ARGUMENTS[case]]
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr)
    said = SAID.get(case, f"harmont-exec: no store at {missing}")
    assert said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not missing.exists()


def test_cli_a_store_that_cannot_be_read_exits_1(tmp_path: Path) -> None:
    garbage = tmp_path / "harmont.db"
    garbage.write_bytes(b"not a database at all, but long enough to look like a header" * 20)
    for args in (["builds"], ["verify"], ["run", str(GOOD)]):
        done = cli(*args, "--db", str(garbage), cwd=tmp_path)
        assert done.returncode == 1, (args, done.returncode, done.stderr)
        assert f"harmont-exec: cannot open the store {garbage}: file is not a database" in (
            done.stderr
        ), (args, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
