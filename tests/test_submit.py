"""`harmont-exec submit` (SPEC §6.3): what it packs (real git checkouts and plain directories
in tmp_path), and the command end to end against a real `harmont-exec serve` on a free loopback
port: pass, fail, Ctrl-C, a server that is not there, a token it refuses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from serving import (
    TIMEOUT_S,
    Server,
    cli,
    create_token,
    free_port,
    output,
    poll,
    server,
    start,
    stop,
)

from executor.cli.pack import Packed, SourceTooLargeError, open_packed
from executor.cli.polled import PolledBuild
from executor.cli.view import plain_line

__all__ = ["server"]  # a fixture, used here


@pytest.fixture(autouse=True)
def _workspaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL store's server keeps its workspaces in HARMONT_WORKSPACES (else in the home
    directory): here, the test's own directory (set before `server` starts)."""
    monkeypatch.setenv("HARMONT_WORKSPACES", str(tmp_path / "workspaces"))


# --- packing ---------------------------------------------------------------------------------


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _checkout(root: Path) -> Path:
    """A git checkout with a tracked build file and source, a tracked file deleted since, an
    untracked file, ignored files and a store."""
    root.mkdir()
    _git(root, "init", "-q", "-b", "main")
    _write(
        root,
        {
            ".gitignore": "build/\n*.log\n",
            "ci/b.yaml": "steps:\n  - {key: a, command: 'true'}\n",
            "src/main.py": "print('hi')\n",
            "gone.txt": "deleted after the commit\n",
        },
    )
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "first")
    (root / "gone.txt").unlink()
    _write(
        root,
        {
            "notes.txt": "untracked, not ignored\n",
            "build/out.o": "ignored\n",
            "debug.log": "ignored\n",
            ".harmont/harmont.db": "a store: token hashes, every log\n",
        },
    )
    return root


def _members(packed: Packed) -> dict[str, tarfile.TarInfo]:
    packed.archive.seek(0)
    with tarfile.open(fileobj=packed.archive, mode="r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def test_pack_git_checkout_holds_tracked_and_untracked_files_not_ignored_ones(
    tmp_path: Path,
) -> None:
    root = _checkout(tmp_path / "repo")
    with open_packed(root, limit_bytes=1 << 20) as packed:
        assert packed.git and packed.root == root.resolve()
        names = set(_members(packed))
    assert names == {".gitignore", "ci/b.yaml", "src/main.py", "notes.txt"}


def test_pack_build_file_in_a_checkouts_subdirectory_packs_that_directory(
    tmp_path: Path,
) -> None:
    # Where `run` would run the file's jobs: its own directory, git's files there.
    root = _checkout(tmp_path / "repo")
    _write(root, {"ci/scripts/check.sh": "untracked, not ignored\n", "ci/trace.log": "ignored\n"})
    with open_packed(root / "ci", limit_bytes=1 << 20) as packed:
        assert packed.git and packed.root == (root / "ci").resolve()
        names = set(_members(packed))
    assert names == {"b.yaml", "scripts/check.sh"}


def test_pack_git_checkout_never_holds_a_store_even_when_git_does_not_ignore_it(
    tmp_path: Path,
) -> None:
    root = _checkout(tmp_path / "repo")
    _write(root, {"sub/.harmont/harmont.db": "another store\n"})
    _git(root, "add", "-f", ".harmont/harmont.db")  # even tracked
    with open_packed(root, limit_bytes=1 << 20) as packed:
        names = set(_members(packed))
    assert not [n for n in names if ".harmont" in n.split("/") or ".git" in n.split("/")]
    assert "notes.txt" in names


def test_pack_plain_directory_is_the_build_files_directory_without_git_and_store(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    _write(
        project,
        {
            "b.yaml": "steps:\n  - {key: a, command: 'true'}\n",
            "data/input.txt": "hello\n",
            "build/out.o": "no .gitignore here: packed\n",
            ".harmont/harmont.db": "a store\n",
            ".git/config": "not a repository, still never packed\n",
        },
    )
    _write(tmp_path, {"outside.txt": "not under the build file's directory\n"})
    with open_packed(project, limit_bytes=1 << 20) as packed:
        assert not packed.git and packed.root == project.resolve()
        members = _members(packed)
        names = set(members)
        assert packed.file_count == len(names)
        packed.archive.seek(0)
        with tarfile.open(fileobj=packed.archive, mode="r:gz") as tar:
            extracted = tar.extractfile("data/input.txt")
            assert extracted is not None and extracted.read() == b"hello\n"
    assert names == {"b.yaml", "data/input.txt", "build/out.o"}


def test_pack_symlinks_are_packed_as_symlinks_not_followed(tmp_path: Path) -> None:
    project = tmp_path / "project"
    _write(project, {"b.yaml": "steps: []\n", "real/file.txt": "x\n"})
    _write(tmp_path, {"secret.txt": "outside\n"})
    (project / "to-file").symlink_to("real/file.txt")
    (project / "to-dir").symlink_to("real")
    (project / "out").symlink_to(tmp_path / "secret.txt")
    with open_packed(project, limit_bytes=1 << 20) as packed:
        members = _members(packed)
    assert members["to-file"].issym() and members["to-file"].linkname == "real/file.txt"
    assert members["to-dir"].issym() and members["to-dir"].linkname == "real"
    assert members["out"].issym() and members["out"].linkname == str(tmp_path / "secret.txt")
    assert "to-dir/file.txt" not in members  # the link is not followed


def test_pack_leaves_out_fifos(tmp_path: Path) -> None:
    project = tmp_path / "project"
    _write(project, {"b.yaml": "steps: []\n"})
    os.mkfifo(project / "pipe")
    with open_packed(project, limit_bytes=1 << 20) as packed:
        assert packed.skipped == ["pipe"]
        assert set(_members(packed)) == {"b.yaml"}


def test_pack_refuses_a_tarball_over_the_limit_naming_the_biggest_files(tmp_path: Path) -> None:
    project = tmp_path / "project"
    _write(project, {"b.yaml": "steps: []\n"})
    (project / "blob.bin").write_bytes(os.urandom(2 << 20))  # does not compress
    with pytest.raises(SourceTooLargeError) as refused, open_packed(project, limit_bytes=1 << 20):
        pass
    assert refused.value.largest[0] == (2 << 20, "blob.bin")


# --- what a poll shows ------------------------------------------------------------------------


def _job(key: str, state: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"id-{key}",
        "step_key": key,
        "name": key,
        "state": state,
        "exit_code": None,
        "soft_failed": False,
        "error_message": None,
        "retries_count": 0,
        "started_at": None,
        "finished_at": None,
        **fields,
    }


def _build(state: str, **fields: Any) -> dict[str, Any]:
    return {"number": 1, "state": state, "started_at": None, "finished_at": None, **fields}


def _lines(polled: PolledBuild, build: dict[str, Any], jobs: list[dict[str, Any]]) -> list[str]:
    async def attempts(job: dict[str, Any]) -> int:
        return int(job["retries_count"]) + 1

    return [plain_line(c) for c in anyio.run(polled.changes, build, jobs, attempts)]


def test_poll_shows_a_job_that_ran_between_two_polls_as_running_then_ended() -> None:
    polled = PolledBuild()
    assert _lines(polled, _build("scheduled"), [_job("a", "pending")]) == []
    at = {
        "started_at": "2026-01-02T03:04:05.000001Z",
        "finished_at": "2026-01-02T03:04:07.000001Z",
    }
    ended = _lines(
        polled,
        _build("failed", started_at="2026-01-02T03:04:05.5Z", finished_at=at["finished_at"]),
        [
            _job("a", "failed", exit_code=3, **at),
            _job(
                "b",
                "skipped",
                error_message="skipped because 'a' failed",
                finished_at=at["finished_at"],
            ),
        ],
    )
    # In the order of their times, as `run` shows them; the build's running too.
    assert ended == [
        "03:04:05 a running (attempt 1)",
        "03:04:05 build running",
        "03:04:07 a failed (exit 3)",
        "03:04:07 b skipped (skipped because 'a' failed)",
        "03:04:07 build failed",
    ]
    assert _lines(polled, _build("failed"), [_job("a", "failed"), _job("b", "skipped")]) == []


def test_poll_shows_a_retry_as_its_next_attempt() -> None:
    polled = PolledBuild()
    started = {"started_at": "2026-01-02T03:04:05Z"}
    first = _lines(polled, _build("running", **started), [_job("a", "running", **started)])
    assert first == ["03:04:05 a running (attempt 1)", "03:04:05 build running"]
    retry = _lines(
        polled,
        _build("running", **started),
        [_job("a", "scheduled", exit_code=2, retries_count=1, **started)],
    )
    assert [line[9:] for line in retry] == ["a scheduled (retry after attempt 1, exit 2)"]
    again = _lines(
        polled,
        _build("running", **started),
        [_job("a", "running", exit_code=2, retries_count=1, **started)],
    )
    assert [line[9:] for line in again] == ["a running (attempt 2)"]


# --- the command, end to end -----------------------------------------------------------------


def _project(tmp_path: Path, build: str, files: dict[str, str] | None = None) -> Path:
    project = tmp_path / "project"
    _write(project, {"b.yaml": textwrap.dedent(build), **(files or {})})
    return project


def _env(server: str, token: str) -> dict[str, str]:
    return {**os.environ, "HARMONT_API_URL": server, "HARMONT_TOKEN": token}


def _get(server: Server, token: str, path: str) -> Any:
    response = httpx.get(
        f"{server.url}{path}", headers={"authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


_BUILD_1 = "/organizations/local/pipelines/b/builds/1"


def test_submit_passing_build_exits_0_with_runs_lines_and_summary(
    server: Server, tmp_path: Path
) -> None:
    token = create_token(server.db, tmp_path)
    project = _project(
        tmp_path,
        """
        steps:
          - {key: check, command: 'test "$(cat data/input.txt)" = uploaded'}
          - {key: after, command: 'echo done', depends_on: check}
        """,
        {"data/input.txt": "uploaded\n"},
    )
    _git(project, "init", "-q", "-b", "trunk")
    _git(project, "add", ".")
    _git(project, "commit", "-q", "-m", "the message")
    result = cli("submit", "b.yaml", cwd=project, env=_env(server.url, token))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.endswith(" check passed (exit 0)") for line in lines), result.stdout
    assert any(line.endswith(" build passed") for line in lines), result.stdout
    assert "local/b build #1: passed" in result.stdout  # the summary table's title
    assert lines[-1].startswith("build #1 passed in ") and lines[-1].endswith("(exit 0)")
    build = _get(server, token, _BUILD_1)
    assert (build["state"], build["source"]) == ("passed", "api")
    assert (build["branch"], build["commit"], build["message"]) == (
        "trunk",
        _git(project, "rev-parse", "HEAD"),
        "the message",
    )


def test_submit_again_builds_in_the_pipeline_it_created(server: Server, tmp_path: Path) -> None:
    token = create_token(server.db, tmp_path)
    project = _project(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    env = _env(server.url, token)
    first = cli("submit", "b.yaml", "--pipeline", "My App", cwd=project, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    second = cli("submit", "b.yaml", "--pipeline", "My App", cwd=project, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "local/my-app build #2: passed" in second.stdout
    assert second.stdout.splitlines()[-1].startswith("build #2 passed in ")


def test_submit_failing_build_exits_1_and_shows_the_log_tail(
    server: Server, tmp_path: Path
) -> None:
    token = create_token(server.db, tmp_path)
    project = _project(
        tmp_path,
        """
        steps:
          - {key: broken, command: 'echo compiling; echo boom >&2; exit 3'}
          - {key: after, command: 'true', depends_on: broken}
        """,
    )
    result = cli("submit", "b.yaml", cwd=project, env=_env(server.url, token))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "broken failed (exit 3" in result.stdout
    assert "after skipped (skipped because 'broken' failed)" in result.stdout
    assert "broken: last 2 log lines" in result.stdout  # the tail, read from the server
    assert "compiling\nboom\n" in result.stdout
    assert result.stdout.splitlines()[-1].endswith("(exit 1)")


def test_submit_invalid_build_file_exits_2_with_the_servers_located_message(
    server: Server, tmp_path: Path
) -> None:
    token = create_token(server.db, tmp_path)
    project = _project(tmp_path, "steps:\n  - {key: a, command: 'true', depends: x}\n")
    result = cli("submit", "b.yaml", cwd=project, env=_env(server.url, token))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pipeline_ir:2:" in result.stderr and "depends" in result.stderr, result.stderr
    assert _get(server, token, _BUILD_1)["error_code"] == "invalid_build_file"


def test_submit_sigint_cancels_the_remote_build_and_exits_130(
    server: Server, tmp_path: Path
) -> None:
    token = create_token(server.db, tmp_path)
    project = _project(
        tmp_path,
        """
        steps:
          - {key: busy, command: 'sleep 60'}
          - {key: later, command: 'true', depends_on: busy}
        """,
    )
    out = tmp_path / "submit"
    proc = _start_submit(project, server, token, out)
    try:
        _wait_for_running_job(server, token, proc, out)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT_S) == 130, output(out)
    finally:
        stop(proc)
    stdout = out.with_suffix(".out").read_text()
    assert "busy canceled" in stdout and "later canceled" in stdout, output(out)
    assert stdout.splitlines()[-1].endswith("(exit 130)"), output(out)
    assert _get(server, token, _BUILD_1)["state"] == "canceled"
    jobs = _get(server, token, f"{_BUILD_1}/jobs")["data"]
    assert {j["state"] for j in jobs} == {"canceled"}


def test_submit_second_sigint_stops_following_at_once(server: Server, tmp_path: Path) -> None:
    token = create_token(server.db, tmp_path)
    # The job ignores SIGTERM: the server waits its grace period before SIGKILL, so the build
    # stays canceling while submit is told to stop following it.
    project = _project(
        tmp_path,
        """
        steps:
          - {key: stubborn, command: "trap '' TERM; while :; do sleep 1; done"}
        """,
    )
    out = tmp_path / "submit"
    proc = _start_submit(project, server, token, out)
    try:
        _wait_for_running_job(server, token, proc, out)
        proc.send_signal(signal.SIGINT)
        poll(
            lambda: "canceling build #1" in out.with_suffix(".err").read_text() or None,
            "submit to ask the server to cancel",
            (proc, out),
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT_S) == 130, output(out)
    finally:
        stop(proc)
    assert "stopped following" in out.with_suffix(".err").read_text(), output(out)
    # The server goes on canceling it, to its end.
    poll(
        lambda: _get(server, token, _BUILD_1)["state"] == "canceled" or None,
        "the build to end canceled",
    )


def _start_submit(project: Path, server: Server, token: str, out: Path) -> subprocess.Popen[bytes]:
    """`harmont-exec submit b.yaml` in the background, in its own session, output to files
    (as serving.start, with the server and the token in its environment)."""
    with out.with_suffix(".out").open("wb") as stdout, out.with_suffix(".err").open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "executor", "submit", "b.yaml"],
            cwd=project,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=err,
            start_new_session=True,
            env=_env(server.url, token),
        )


def _wait_for_running_job(
    server: Server, token: str, proc: subprocess.Popen[bytes], out: Path
) -> None:
    def running() -> bool | None:
        response = httpx.get(
            f"{server.url}{_BUILD_1}/jobs",
            headers={"authorization": f"Bearer {token}"},
            timeout=30,
        )
        if response.status_code == 404:
            return None  # not created yet
        assert response.status_code == 200, response.text
        return any(j["state"] == "running" for j in response.json()["data"]) or None

    poll(running, "a job of the submitted build to run", (proc, out))


def test_submit_unreachable_server_exits_2_with_one_line(tmp_path: Path) -> None:
    project = _project(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    # A port bound and held but never listening: connections to it are refused, and no other
    # process (another test's server) can take it meanwhile.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        nothing = f"http://127.0.0.1:{held.getsockname()[1]}"
        result = cli("submit", "b.yaml", "--server", nothing, cwd=project, env=_env("", "hm_x"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"harmont-exec: cannot reach a harmont-exec server at {nothing}")
    assert "harmont-exec serve" in line and "--server" in line


def test_submit_without_a_token_exits_2_before_sending_anything(tmp_path: Path) -> None:
    project = _project(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    env = {k: v for k, v in os.environ.items() if k != "HARMONT_TOKEN"}
    result = cli("submit", "b.yaml", cwd=project, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert "no API token" in line and "HARMONT_TOKEN" in line


def test_submit_refused_token_exits_2_with_one_line(server: Server, tmp_path: Path) -> None:
    project = _project(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    wrong = "hm_" + "x" * 43
    result = cli("submit", "b.yaml", cwd=project, env=_env(server.url, wrong))
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert "refused the token" in line and "--token" in line


def test_submit_unknown_org_exits_2_with_one_line(server: Server, tmp_path: Path) -> None:
    token = create_token(server.db, tmp_path)
    project = _project(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    result = cli("submit", "b.yaml", "--org", "nope", cwd=project, env=_env(server.url, token))
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert "no organization 'nope'" in line and "--org" in line


def test_submit_over_the_upload_limit_exits_2_before_sending(tmp_path: Path) -> None:
    project = _project(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    (project / "big.bin").write_bytes(os.urandom(1 << 20))
    nothing = f"http://127.0.0.1:{free_port()}"  # refused before any connection is tried
    result = cli(
        "submit", "b.yaml", "--max-upload-mb", "0.5", cwd=project, env=_env(nothing, "hm_x")
    )
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert "more than 0.5 MB" in line and "big.bin (1.0 MB)" in line, line


def test_submit_upload_over_the_servers_limit_exits_2(tmp_path: Path) -> None:
    db = tmp_path / "db" / "harmont.db"
    port = free_port()
    out = tmp_path / "serve"
    proc = start(
        ["serve", "--db", str(db), "--port", str(port), "--max-upload-mb", "0.5"], tmp_path, out
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def pong() -> bool | None:
            try:
                return httpx.get(f"{url}/api/v0/ping", timeout=10).status_code == 200 or None
            except httpx.TransportError:
                return None  # not listening yet

        poll(pong, "the server to answer /ping", (proc, out))
        token = create_token(db, tmp_path)
        project = _project(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
        (project / "big.bin").write_bytes(os.urandom(1 << 20))
        result = cli("submit", "b.yaml", cwd=project, env=_env(url, token))
    finally:
        stop(proc)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refused the upload as too large" in result.stderr.splitlines()[-1], result.stderr
