"""The build service of `serve` (SPEC §6.3): what ``submit`` records from Harmont's IR or our build
file, its source tarball unpacked into the build's own workspace and nothing written outside it
whatever the tarball holds, refusals recorded as failed builds, ``env``, ``cancel`` and
``retry``. Real store files (and PostgreSQL where the record is the point), real job
processes."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from serving import assert_sound, poll

from executor.api.service import BuildRequest
from executor.errors import BuildFileError, BuildStateError, ErrorCode, InvalidSourceError
from executor.service import BuildService, Submission, workspace_path
from executor.states import BuildState, JobState
from executor.store import BuildRow, Store, open_store

MB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "db" / "harmont.db") as opened:
        yield opened


@pytest.fixture
def idle(store: Store, tmp_path: Path) -> BuildService:
    """A service that records but does not run (never started): what submit writes."""
    return BuildService(store, workspaces=tmp_path / "ws", max_upload_bytes=MB)


@pytest.fixture
def running(store: Store, tmp_path: Path) -> Iterator[BuildService]:
    service = BuildService(store, workspaces=tmp_path / "ws", max_upload_bytes=MB)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def tarball(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def ended(store: Store, build_id: str) -> BuildRow | None:
    row = store.get_build_by_id(build_id)
    return row if row is not None and row.state.is_terminal else None


def log_of(store: Store, build: BuildRow, key: str) -> bytes:
    job = next(j for j in store.list_jobs(build.id) if j.step_key == key)
    return b"".join(c.content for c in store.read_log(job.id))


STEPS = 'steps:\n  - key: show\n    command: cat src/hello.txt; echo "CI=$CI MODE=$MODE"\n'

# --- submit --------------------------------------------------------------------------------------


def test_service_submit_runs_the_build_in_its_workspace_with_the_source_and_env(
    store: Store, running: BuildService, tmp_path: Path
) -> None:
    source = tarball((member("src/hello.txt"), b"hello from the upload\n"))
    text = "env:\n  CI: 'true'\n  MODE: file\n" + STEPS
    submitted = running.submit(
        BuildRequest("local", "web", text, source=source, env={"MODE": "api"}, branch="main")
    )
    assert submitted.error is None and submitted.build.state is BuildState.SCHEDULED
    assert submitted.build.queued or submitted.build.executor_host is not None
    build = poll(lambda: ended(store, submitted.build.id), "the build to end")
    assert build.state is BuildState.PASSED, build
    workspace = workspace_path(tmp_path / "ws", "local", "web", build.number)
    assert build.working_dir == str(workspace)
    assert (workspace / "src" / "hello.txt").read_bytes() == b"hello from the upload\n"
    assert log_of(store, build, "show") == b"hello from the upload\nCI=true MODE=api\n"
    assert (build.branch, build.source) == ("main", "api")
    assert list((tmp_path / "ws" / ".incoming").iterdir()) == []
    assert_sound(store)


def test_service_submit_takes_harmont_ir_in_the_graph_form(
    store: Store, running: BuildService
) -> None:
    ir = {
        "version": "0",
        "graph": {
            "nodes": [
                {"step": {"key": "first", "cmd": "echo one > one.txt"}, "env": {}},
                {"step": {"key": "second", "cmd": "cat one.txt"}, "env": {}},
            ],
            "node_holes": [],
            "edge_property": "directed",
            "edges": [[0, 1, "depends_on"]],
        },
    }
    submitted = running.submit(BuildRequest("local", "ir", json.dumps(ir), origin="ui"))
    build = poll(lambda: ended(store, submitted.build.id), "the build to end")
    assert build.state is BuildState.PASSED and build.source == "ui"
    assert log_of(store, build, "second") == b"one\n"


def test_service_submit_of_an_ir_that_does_not_load_records_a_failed_build(
    store_url: str, tmp_path: Path
) -> None:
    with open_store(store_url) as store:
        service = BuildService(store, workspaces=tmp_path / "ws", max_upload_bytes=MB)
        text = (
            "steps:\n  - key: a\n    command: x\n  - key: b\n    command: y\n    depends_on: nope\n"
        )
        submitted = service.submit(BuildRequest("local", "bad", text))
        assert isinstance(submitted.error, BuildFileError)
        assert "pipeline_ir:" in str(submitted.error) and "nope" in str(submitted.error)
        build = submitted.build
        assert (build.state, build.error_code) == (BuildState.FAILED, ErrorCode.INVALID_BUILD_FILE)
        assert build.error_message == str(submitted.error)
        assert build.finished_at is not None and store.list_jobs(build.id) == []
        assert store.claim_queued_build(build.created_at) is None
        assert_sound(store)
        with pytest.raises(BuildStateError, match="refused when it was submitted"):
            service.retry(build, failed_only=False)


def test_service_submit_with_a_bad_env_name_is_refused(idle: BuildService) -> None:
    submitted = idle.submit(BuildRequest("local", "p", STEPS, env={"A=B": "x"}))
    assert isinstance(submitted.error, BuildFileError) and "A=B" in str(submitted.error)
    assert submitted.build.error_code == ErrorCode.INVALID_BUILD_FILE


# --- hostile tarballs -----------------------------------------------------------------------------


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    return outside


HOSTILE: dict[str, Callable[[Path], tuple[bytes, str]]] = {
    # name -> (tarball, the member the refusal must name), given a directory outside it all
    "absolute path": lambda out: (
        tarball((member(str(out / "abs.txt")), b"x")),
        str(out / "abs.txt"),
    ),
    "dot-dot": lambda out: (tarball((member("src/../../../escape.txt"), b"x")), "escape.txt"),
    "symlink out, then a file through it": lambda out: (
        tarball(
            (member("link", tarfile.SYMTYPE, linkname=str(out)), None),
            (member("link/evil.txt"), b"x"),
        ),
        "link",
    ),
    "relative symlink out": lambda out: (
        tarball(
            (member("deep/link", tarfile.SYMTYPE, linkname="../../outside"), None),
            (member("deep/link/evil.txt"), b"x"),
        ),
        "deep/link",
    ),
    "symlinks that lead out together": lambda out: (
        tarball(  # each one alone stays inside; "a" leads out once "b" is "."
            (member("a", tarfile.SYMTYPE, linkname="b/.."), None),
            (member("b", tarfile.SYMTYPE, linkname="."), None),
            (member("a/evil.txt"), b"x"),
        ),
        "a/evil.txt",
    ),
    "hardlink out": lambda out: (
        tarball((member("passwd", tarfile.LNKTYPE, linkname="/etc/passwd"), None)),
        "passwd",
    ),
    "hardlink up": lambda out: (
        tarball((member("up", tarfile.LNKTYPE, linkname="../outside/x"), None)),
        "up",
    ),
    "device node": lambda out: (
        tarball((member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)),
        "dev/null",
    ),
    "fifo": lambda out: (tarball((member("pipe", tarfile.FIFOTYPE), None)), "pipe"),
    "not gzip": lambda out: (b"just some bytes, not a tarball", "not a gzip tarball"),
    "gzip, not tar": lambda out: (
        __import__("gzip").compress(b"hello " * 1000),
        "not a readable gzip tarball",
    ),
    "over the size limit": lambda out: (
        tarball((member("ok.txt"), b"fine"), (member("big.bin"), bytes(11 * MB))),
        "big.bin",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_service_submit_refuses_a_hostile_tarball_naming_the_member(
    case: str, store: Store, idle: BuildService, tmp_path: Path
) -> None:
    outside = _outside(tmp_path)
    source, named = HOSTILE[case](outside)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "ws" not in p.parts)
    submitted = idle.submit(BuildRequest("local", "hostile", STEPS, source=source))
    error = submitted.error
    assert isinstance(error, InvalidSourceError), submitted
    assert named in str(error)
    expected = (
        ErrorCode.PAYLOAD_TOO_LARGE if case == "over the size limit" else (ErrorCode.INVALID_SOURCE)
    )
    assert error.code is expected
    build = submitted.build
    assert (build.state, build.error_code) == (BuildState.FAILED, expected)
    assert build.error_message == str(error) and store.list_jobs(build.id) == []
    # Nothing outside the workspaces, and nothing left in them: no workspace, no staging.
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "ws" not in p.parts)
    assert after == before and list(outside.iterdir()) == []
    assert not Path(build.working_dir).exists()
    assert list((tmp_path / "ws" / ".incoming").iterdir()) == []
    assert_sound(store)


def test_service_submit_drops_setuid_bits_and_keeps_links_inside(
    store: Store, idle: BuildService
) -> None:
    source = tarball(
        (member("bin/tool", mode=0o6777), b"#!/bin/sh\necho tool\n"),
        (member("bin/shared", tarfile.DIRTYPE, mode=0o1777), None),
        (member("bin/alias", tarfile.SYMTYPE, linkname="tool"), None),
        (member("docs/copy", tarfile.LNKTYPE, linkname="bin/tool"), None),
        (member("./", tarfile.DIRTYPE), None),
    )
    submitted = idle.submit(BuildRequest("local", "modes", STEPS, source=source))
    assert submitted.error is None, submitted.error
    workspace = Path(submitted.build.working_dir)
    tool = (workspace / "bin" / "tool").stat()
    assert stat.S_IMODE(tool.st_mode) == 0o755  # setuid, setgid gone; no group/other write
    assert stat.S_IMODE((workspace / "bin" / "shared").stat().st_mode) == 0o755  # no sticky
    assert os.readlink(workspace / "bin" / "alias") == "tool"
    copy = workspace / "docs" / "copy"
    assert copy.read_bytes() == b"#!/bin/sh\necho tool\n"
    assert copy.stat().st_ino != tool.st_ino  # a copy, not a link to the file
    assert stat.S_IMODE((workspace).stat().st_mode) == 0o700


# --- cancel and retry -----------------------------------------------------------------------------


def test_service_cancel_of_a_queued_build_cancels_it_at_once(
    store: Store, idle: BuildService
) -> None:
    submitted = idle.submit(BuildRequest("local", "p", STEPS))
    canceled = idle.cancel(submitted.build)
    assert canceled.state is BuildState.CANCELED
    assert idle.cancel(canceled) == canceled  # idempotent
    assert_sound(store)


HOLD = "steps:\n  - key: hold\n    command: echo $$ > pid; exec sleep 300\n"


def test_service_cancel_of_a_running_build_stops_its_jobs(
    store: Store, running: BuildService
) -> None:
    submitted = running.submit(BuildRequest("local", "p", HOLD))
    workspace = Path(submitted.build.working_dir)

    def holding() -> BuildRow | None:
        [job] = store.list_jobs(submitted.build.id)
        return (
            submitted.build
            if job.state is JobState.RUNNING and (workspace / "pid").exists()
            else None
        )

    build = poll(holding, "the job to run")
    pid = int((workspace / "pid").read_text())
    requested = running.cancel(build)
    assert requested.cancel_requested
    done = poll(lambda: ended(store, build.id), "the build to end")
    assert done.state is BuildState.CANCELED
    [job] = store.list_jobs(build.id)
    assert (job.state, job.error_code) == (JobState.CANCELED, ErrorCode.BUILD_CANCELED)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert_sound(store)


def test_service_retry_failed_only_queues_a_build_that_keeps_what_passed(
    store: Store, running: BuildService
) -> None:
    text = (
        "steps:\n  - key: ok\n    command: echo ran >> ok.log\n"
        "  - key: flaky\n    command: test -e fixed\n    depends_on: ok\n"
    )
    first = running.submit(BuildRequest("local", "r", text)).build
    failed = poll(lambda: ended(store, first.id), "the build to fail")
    assert failed.state is BuildState.FAILED
    with pytest.raises(BuildStateError):
        running.retry(running.submit(BuildRequest("local", "r", HOLD)).build, failed_only=True)
    (Path(failed.working_dir) / "fixed").touch()
    again = running.retry(failed, failed_only=True)
    assert again.number > failed.number and again.state is BuildState.SCHEDULED
    assert again.working_dir == failed.working_dir
    done = poll(lambda: ended(store, again.id), "the retry to end")
    assert done.state is BuildState.PASSED
    jobs = {j.step_key: j for j in store.list_jobs(done.id)}
    assert jobs["ok"].reused_from_job_id is not None
    assert (Path(failed.working_dir) / "ok.log").read_text() == "ran\n"  # not run again
    for build in store.list_builds(pipeline="r", limit=10):
        if not build.state.is_terminal:
            running.cancel(build)
    poll(
        lambda: (
            True
            if all(b.state.is_terminal for b in store.list_builds(pipeline="r", limit=10))
            else None
        ),
        "every build to end",
    )
    assert_sound(store)


def test_service_submission_is_a_build_and_an_error(idle: BuildService) -> None:
    submitted = idle.submit(BuildRequest("local", "p", STEPS))
    assert isinstance(submitted, Submission)
    build, error = submitted
    assert error is None and build.number == 1
