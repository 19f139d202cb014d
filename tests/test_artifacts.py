"""Artifacts (SPEC §7): collected from real files after a job's final attempt, refused outside
the working directory, kept once per content, and served by the API and the CLI byte for byte
under the API's tenancy rules."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving import (
    TIMEOUT_S,
    Server,
    asgi_client,
    cli_bytes,
    create_token,
    mint_token,
    poll,
    server,
)

import executor
from executor.api import create_app
from executor.run.artifacts import collect_artifacts, match_artifacts
from executor.store import BlobStore, Store, open_store

__all__ = ["server"]  # a fixture, used here

pytestmark = pytest.mark.anyio

API = "/api/v0/organizations"
NOW = datetime.now(UTC)


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- matching and collecting real files ------------------------------------------------------


def test_artifacts_double_star_matches_every_depth_and_each_file_once(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {"out/a.txt": b"a", "out/x/b.txt": b"b", "out/x/y/c.txt": b"c", "out/skip.bin": b"-"},
    )
    paths, notes = match_artifacts(tmp_path, ["out/**/*.txt", "out/x/**/*.txt"])
    assert paths == ["out/a.txt", "out/x/b.txt", "out/x/y/c.txt"]
    assert notes == []


def test_artifacts_double_star_never_enters_a_symlink(tmp_path: Path) -> None:
    work = tmp_path / "work"
    _tree(work, {"out/a.txt": b"a"})
    _tree(tmp_path, {"outside/secret.txt": b"s"})
    (work / "out" / "self").symlink_to(work / "out", target_is_directory=True)  # a loop
    (work / "out" / "away").symlink_to(tmp_path / "outside", target_is_directory=True)
    paths, notes = match_artifacts(work, ["out/**/*.txt", "out/**"])
    assert paths == ["out/a.txt"]
    assert notes == []


def test_artifacts_trailing_double_star_is_every_file_below(tmp_path: Path) -> None:
    _tree(tmp_path, {"out/a": b"a", "out/x/b": b"b", "out/.hidden/c": b"c", "top": b"t"})
    paths, _ = match_artifacts(tmp_path, ["out/**"])
    assert paths == ["out/a", "out/x/b"]


def test_artifacts_hidden_names_match_only_a_pattern_with_the_dot(tmp_path: Path) -> None:
    _tree(tmp_path, {"a.txt": b"a", ".env.txt": b"e", ".cache/b.txt": b"b"})
    assert match_artifacts(tmp_path, ["*.txt"])[0] == ["a.txt"]
    assert match_artifacts(tmp_path, [".*.txt"])[0] == [".env.txt"]
    assert match_artifacts(tmp_path, ["**/*.txt"])[0] == ["a.txt"]
    assert match_artifacts(tmp_path, [".cache/*.txt"])[0] == [".cache/b.txt"]


def test_artifacts_pattern_naming_a_directory_says_so(tmp_path: Path) -> None:
    _tree(tmp_path, {"out/dir/a.txt": b"a"})
    paths, (note,) = match_artifacts(tmp_path, ["out/dir"])
    assert paths == []
    assert "'out/dir' matched only directories" in note and "'out/dir/**'" in note


def test_artifacts_name_that_is_not_utf8_is_skipped_with_a_note(tmp_path: Path) -> None:
    _tree(tmp_path, {"good.txt": b"g"})
    (tmp_path / os.fsdecode(b"bad\xff.txt")).write_bytes(b"b")
    paths, (note,) = match_artifacts(tmp_path, ["*.txt"])
    assert paths == ["good.txt"]
    assert "not valid UTF-8" in note


def test_artifacts_name_that_is_not_utf8_leaves_a_complete_record(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(
        "steps:\n"
        "  - key: make\n"
        "    command: printf x > \"$(printf 'bad\\377.txt')\"; printf y > good.txt\n"
        "    artifact_paths: ['*.txt']\n"
    )
    db = tmp_path / "harmont.db"
    result = executor.run_build_sync(tmp_path / "b.yaml", db=db)
    assert result.exit_status == 0
    with open_store(db) as store:
        build = store.get_build_by_id(result.build_id)
        assert build is not None and build.state.value == "passed"
        (artifact,) = store.list_artifacts(build_id=result.build_id)
        assert artifact.path == "good.txt"
        log = b"".join(c.content for c in store.read_log(result.jobs["make"].job_id))
    assert b"artifact bad\xff.txt: skipped, its name is not valid UTF-8" in log  # its bytes


def test_artifacts_glob_matching_nothing_is_a_note_not_an_error(tmp_path: Path) -> None:
    _tree(tmp_path, {"a.txt": b"a"})
    paths, notes = match_artifacts(tmp_path, ["*.txt", "reports/*.xml"])
    assert paths == ["a.txt"]
    (note,) = notes
    assert "'reports/*.xml' matched no file" in note


@pytest.mark.parametrize(
    ("name", "mime_type"),
    [
        ("report.xml", "application/xml"),
        ("dist/pkg-1.0.tar.gz", "application/gzip"),
        ("notes.txt", "text/plain"),
        ("blob.unknownext", "application/octet-stream"),
        ("Makefile", "application/octet-stream"),
    ],
)
def test_artifacts_content_type_is_guessed_from_the_name(
    tmp_path: Path, name: str, mime_type: str
) -> None:
    work = tmp_path / "work"
    _tree(work, {name: b"x"})
    (artifact,) = collect_artifacts(work, [name], BlobStore(tmp_path / "a")).artifacts
    assert artifact.mime_type == mime_type


def test_artifacts_equal_files_are_stored_once(tmp_path: Path) -> None:
    work = tmp_path / "work"
    _tree(work, {"a.txt": b"same", "b.txt": b"same", "c.txt": b"other"})
    blobs = BlobStore(tmp_path / "artifacts")
    result = collect_artifacts(work, ["a.txt", "b.txt", "c.txt"], blobs)
    assert [a.path for a in result.artifacts] == ["a.txt", "b.txt", "c.txt"]
    assert result.artifacts[0].blob == result.artifacts[1].blob
    stored = sorted(p.name for p in (tmp_path / "artifacts" / "sha256").rglob("*") if p.is_file())
    assert stored == sorted({_sha256(b"same"), _sha256(b"other")})
    assert not list((tmp_path / "artifacts" / "tmp").iterdir())  # no leftovers


def test_artifacts_symlink_pointing_outside_is_refused_with_a_note(tmp_path: Path) -> None:
    work = tmp_path / "work"
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not yours")
    _tree(work, {"in.txt": b"in"})
    (work / "leak.txt").symlink_to(secret)
    (work / "alias.txt").symlink_to(work / "in.txt")  # a link that stays inside is fine
    paths, _ = match_artifacts(work, ["*.txt"])
    result = collect_artifacts(work, paths, BlobStore(tmp_path / "artifacts"))
    assert sorted(a.path for a in result.artifacts) == ["alias.txt", "in.txt"]
    (note,) = result.notes
    assert "leak.txt: refused" in note and str(secret) in note


def test_artifacts_directory_symlink_pointing_outside_is_refused(tmp_path: Path) -> None:
    work = tmp_path / "work"
    elsewhere = tmp_path / "elsewhere"
    _tree(elsewhere, {"key.pem": b"private"})
    work.mkdir()
    (work / "out").symlink_to(elsewhere, target_is_directory=True)
    paths, _ = match_artifacts(work, ["out/*"])
    assert paths == ["out/key.pem"]
    result = collect_artifacts(work, paths, BlobStore(tmp_path / "artifacts"))
    assert result.artifacts == []
    (note,) = result.notes
    assert "refused" in note and "outside the working directory" in note


def test_artifacts_file_deleted_between_glob_and_copy_is_a_note(tmp_path: Path) -> None:
    work = tmp_path / "work"
    _tree(work, {"keep.txt": b"keep", "gone.txt": b"gone"})
    paths, _ = match_artifacts(work, ["*.txt"])
    (work / "gone.txt").unlink()
    result = collect_artifacts(work, paths, BlobStore(tmp_path / "artifacts"))
    assert [a.path for a in result.artifacts] == ["keep.txt"]
    (note,) = result.notes
    assert "gone.txt" in note and "deleted" in note


def test_artifacts_store_that_cannot_be_written_is_a_failure_not_a_crash(
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"
    _tree(work, {"a.txt": b"a"})
    blocked = tmp_path / "artifacts"
    blocked.write_bytes(b"a file where the artifact directory should be")
    result = collect_artifacts(work, ["a.txt"], BlobStore(blocked))
    assert result.artifacts == [] and result.notes == []
    (failure,) = result.failures  # the job fails for it (artifact_upload_failed)
    assert failure.startswith("artifact a.txt could not be kept: could not create a file")
    assert "check the disk and the permissions of the artifact directory" in failure


def test_artifacts_fifo_is_skipped_without_blocking(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    os.mkfifo(work / "pipe.txt")  # opening it for reading would block without O_NONBLOCK
    result = collect_artifacts(work, ["pipe.txt"], BlobStore(tmp_path / "artifacts"))
    assert result.artifacts == []
    assert "not a regular file" in result.notes[0]


def test_artifacts_large_file_is_copied_in_bounded_memory(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    size = 100 * 1024 * 1024
    digest = hashlib.sha256()
    with (work / "big.bin").open("wb") as out:
        block = os.urandom(1 << 20)
        for i in range(size >> 20):
            chunk = block[:-4] + i.to_bytes(4, "big")
            digest.update(chunk)
            out.write(chunk)
    tracemalloc.start()
    try:
        result = collect_artifacts(work, ["big.bin"], BlobStore(tmp_path / "artifacts"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (artifact,) = result.artifacts
    assert artifact.blob.size == size
    assert artifact.blob.sha256 == digest.hexdigest()
    assert peak < 16 * 1024 * 1024, f"peak {peak} bytes: the file was not streamed"


# --- recorded by real builds, served by the API -----------------------------------------------

BUILD = {
    "steps": [
        {
            "key": "make",
            "command": "mkdir -p out/deep/er && printf 'report' > out/report.txt && "
            "printf '{\"ok\": 1}' > out/deep/er/result.json && printf 'report' > out/same.txt",
            "artifact_paths": ["out/**/*", "missing/*.xml"],
        },
        {
            # Fails once, passes on the retry: only the final attempt's file is collected.
            "key": "flaky",
            "command": 'echo "attempt $HARMONT_ATTEMPT" > flaky.txt; test "$HARMONT_ATTEMPT" -ge 2',
            "retry_policy": {"limit": 1, "exit_codes": [1], "backoff": {"initial_seconds": 0}},
            "artifact_paths": ["flaky.txt"],
        },
        {
            # A dependent runs after the artifacts of its prerequisite are recorded.
            "key": "check",
            "command": "test -s out/report.txt",
            "depends_on": "make",
        },
    ]
}


@dataclass(frozen=True)
class Record:
    db: Path
    work: Path
    store: Store
    token: str
    other_token: str  # limited to organization "other"
    build_id: str
    second_build_id: str


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Record]:
    work = tmp_path_factory.mktemp("artifacts")
    (work / "ci.json").write_text(json.dumps(BUILD))
    db = work / ".harmont" / "harmont.db"
    first = executor.run_build_sync(work / "ci.json", db=db, org="acme", pipeline="ci")
    second = executor.run_build_sync(work / "ci.json", db=db, org="acme", pipeline="ci")
    assert first.exit_status == 0 and second.exit_status == 0
    executor.run_build_sync(work / "ci.json", db=db, org="other", pipeline="ci")
    token, other = mint_token(db, now=NOW), mint_token(db, organizations=["other"], now=NOW)
    with open_store(db) as store:
        yield Record(db, work, store, token, other, first.build_id, second.build_id)


def _client(
    record: Record, token: str | None = None
) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    return asgi_client(create_app(store=record.store), token or record.token)


def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    assert error["request_id"] == response.headers["x-request-id"]
    return error


async def _all(client: httpx.AsyncClient, path: str, limit: int) -> list[Any]:
    items: list[Any] = []
    cursor = None
    for _ in range(100):
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        page = _ok(await client.get(path, params=params))
        items.extend(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("next_cursor never ended")


async def test_artifacts_of_a_build_are_listed_in_job_order_then_path(record: Record) -> None:
    async with _client(record) as client:
        items = await _all(client, f"{API}/acme/pipelines/ci/builds/1/artifacts", limit=50)
    assert [a["path"] for a in items] == [
        "out/deep/er/result.json",
        "out/report.txt",
        "out/same.txt",
        "flaky.txt",
    ]
    result = items[0]
    assert set(result) == {
        "id",
        "job_id",
        "path",
        "filename",
        "mime_type",
        "file_size",
        "sha1_sum",
        "sha256",
        "state",
    }
    assert result["filename"] == "result.json"
    assert result["mime_type"] == "application/json"
    assert result["file_size"] == len(b'{"ok": 1}')
    assert result["sha1_sum"] == hashlib.sha1(b'{"ok": 1}').hexdigest()
    assert result["sha256"] == _sha256(b'{"ok": 1}')
    assert result["state"] == "uploaded"


async def test_artifacts_pages_of_one_walk_each_artifact_once(record: Record) -> None:
    async with _client(record) as client:
        whole = await _all(client, f"{API}/acme/pipelines/ci/builds/1/artifacts", limit=100)
        paged = await _all(client, f"{API}/acme/pipelines/ci/builds/1/artifacts", limit=1)
    assert [a["id"] for a in paged] == [a["id"] for a in whole]


async def test_artifacts_of_a_job_are_its_own_by_path(record: Record) -> None:
    async with _client(record) as client:
        jobs = _ok(await client.get(f"{API}/acme/pipelines/ci/builds/1/jobs"))["data"]
        ids = {j["step_key"]: j["id"] for j in jobs}
        path = f"{API}/acme/pipelines/ci/builds/1/jobs/{ids['make']}/artifacts"
        make = await _all(client, path, limit=2)
        check = _ok(await client.get(path.replace(ids["make"], ids["check"])))
    assert [a["path"] for a in make] == [
        "out/deep/er/result.json",
        "out/report.txt",
        "out/same.txt",
    ]
    assert {a["job_id"] for a in make} == {ids["make"]}
    assert check == {"data": [], "next_cursor": None}


async def test_artifacts_of_a_retried_job_come_from_its_final_attempt_only(
    record: Record,
) -> None:
    async with _client(record) as client:
        items = await _all(client, f"{API}/acme/pipelines/ci/builds/1/artifacts", limit=50)
        (flaky,) = [a for a in items if a["path"] == "flaky.txt"]
        body = await client.get(
            f"{API}/acme/pipelines/ci/builds/1/artifacts/{flaky['id']}/download"
        )
    assert body.content == b"attempt 2\n"


async def test_artifacts_download_is_the_files_bytes_with_type_length_and_digest(
    record: Record,
) -> None:
    async with _client(record) as client:
        items = await _all(client, f"{API}/acme/pipelines/ci/builds/1/artifacts", limit=50)
        for item in items:
            url = f"{API}/acme/pipelines/ci/builds/1/artifacts/{item['id']}/download"
            response = await client.get(url)
            assert response.status_code == 200, response.text
            assert _sha256(response.content) == item["sha256"]
            assert response.headers["content-type"] == item["mime_type"]
            assert int(response.headers["content-length"]) == item["file_size"]
            assert response.headers["content-disposition"].startswith("attachment")
            assert response.headers["repr-digest"].startswith("sha-256=:")
    on_disk = (record.work / "out" / "deep" / "er" / "result.json").read_bytes()
    assert _sha256(on_disk) == items[0]["sha256"]


async def test_artifacts_glob_matching_nothing_is_a_warning_in_the_job_log(
    record: Record,
) -> None:
    async with _client(record) as client:
        jobs = _ok(await client.get(f"{API}/acme/pipelines/ci/builds/1/jobs"))["data"]
        (make,) = [j for j in jobs if j["step_key"] == "make"]
        assert make["state"] == "passed"  # a warning, not a failure
        log = await client.get(f"{API}/acme/pipelines/ci/builds/1/jobs/{make['id']}/log")
    assert b"'missing/*.xml' matched no file" in log.content


async def test_artifacts_of_another_org_are_the_same_404_as_missing_ones(record: Record) -> None:
    async with _client(record) as client:
        items = await _all(client, f"{API}/acme/pipelines/ci/builds/1/artifacts", limit=50)
    artifact = items[0]["id"]
    async with _client(record, record.other_token) as client:
        hidden = [
            await client.get(f"{API}/acme/pipelines/ci/builds/1/artifacts"),
            await client.get(f"{API}/acme/pipelines/ci/builds/1/artifacts/{artifact}/download"),
        ]
        missing = [
            await client.get(f"{API}/nope/pipelines/ci/builds/1/artifacts"),
            await client.get(f"{API}/nope/pipelines/ci/builds/1/artifacts/{artifact}/download"),
        ]
    for seen, absent in zip(hidden, missing, strict=True):
        _error(seen, 404, "organization_not_found")
        assert seen.json()["error"]["message"].replace("acme", "X") == absent.json()["error"][
            "message"
        ].replace("nope", "X")


@pytest.mark.parametrize("which", ["other build", "malformed", "unknown"])
async def test_artifacts_id_not_of_this_build_is_artifact_not_found(
    record: Record, which: str
) -> None:
    async with _client(record) as client:
        second = await _all(client, f"{API}/acme/pipelines/ci/builds/2/artifacts", limit=50)
        artifact_id = {
            "other build": second[0]["id"],
            "malformed": "x' OR '1'='1",
            "unknown": "00000000-0000-4000-8000-000000000000",
        }[which]
        response = await client.get(
            f"{API}/acme/pipelines/ci/builds/1/artifacts/{artifact_id}/download"
        )
    _error(response, 404, "artifact_not_found")


@pytest.mark.parametrize("cursor", ["garbage", "other-build", "job-cursor"])
async def test_artifacts_cursor_not_of_this_list_is_400(record: Record, cursor: str) -> None:
    async with _client(record) as client:
        first = _ok(
            await client.get(f"{API}/acme/pipelines/ci/builds/2/artifacts", params={"limit": 1})
        )
        jobs = _ok(await client.get(f"{API}/acme/pipelines/ci/builds/1/jobs"))["data"]
        (make,) = [j for j in jobs if j["step_key"] == "make"]
        job_page = _ok(
            await client.get(
                f"{API}/acme/pipelines/ci/builds/1/jobs/{make['id']}/artifacts",
                params={"limit": 1},
            )
        )
        value = {
            "garbage": "not-a-cursor",
            "other-build": first["next_cursor"],
            "job-cursor": job_page["next_cursor"],
        }[cursor]
        response = await client.get(
            f"{API}/acme/pipelines/ci/builds/1/artifacts", params={"cursor": value}
        )
    _error(response, 400, "invalid_cursor")


async def test_artifacts_download_of_a_non_ascii_name_has_an_ascii_fallback(
    tmp_path: Path,
) -> None:
    (tmp_path / "b.yaml").write_text(
        'steps:\n  - {key: make, command: \'printf x > "r\u00e9sum\u00e9 \\"1\\".txt"\', '
        "artifact_paths: ['*.txt']}\n"
    )
    db = tmp_path / "harmont.db"
    result = await executor.run_build(tmp_path / "b.yaml", db=db)
    assert result.exit_status == 0
    secret = mint_token(db, now=NOW)
    with open_store(db) as store:
        (artifact,) = store.list_artifacts(build_id=result.build_id)
        url = f"{API}/local/pipelines/b/builds/1/artifacts/{artifact.id}/download"
        async with asgi_client(create_app(store=store), secret) as client:
            response = await client.get(url)
    assert response.status_code == 200, response.text
    assert response.content == b"x"
    assert response.headers["content-disposition"] == (
        "attachment; filename=\"r_sum_ _1_.txt\"; filename*=utf-8''r%C3%A9sum%C3%A9%20%221%22.txt"
    )


async def test_artifacts_download_of_a_missing_file_is_artifact_content_missing(
    tmp_path: Path,
) -> None:
    (tmp_path / "b.json").write_text(json.dumps({"steps": [BUILD["steps"][0]]}))  # type: ignore[index]
    db = tmp_path / "harmont.db"
    result = await executor.run_build(tmp_path / "b.json", db=db)
    secret = mint_token(db, now=NOW)
    with open_store(db) as store:
        artifact = store.list_artifacts(build_id=result.build_id)[0]
        store.blobs.path_of(artifact.sha256).unlink()
        url = f"{API}/local/pipelines/b/builds/1/artifacts/{artifact.id}/download"
        async with asgi_client(create_app(store=store), secret) as client:
            response = await client.get(url)
    message = _error(response, 500, "artifact_content_missing")["message"]
    assert artifact.id in message and str(tmp_path / "harmont.db.artifacts") in message


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_run_summary_says_how_many_artifacts_were_kept(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text(json.dumps({"steps": [BUILD["steps"][0]]}))  # type: ignore[index]
    result = cli_bytes("run", "b.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert b"3 artifacts kept (harmont-exec artifacts 1 --pipeline b)" in result.stdout


def test_cli_artifacts_lists_a_builds_artifacts(record: Record) -> None:
    result = cli_bytes("artifacts", "1", "--org", "acme", "--pipeline", "ci", cwd=record.work)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    for path in ("out/deep/er/result.json", "out/report.txt", "flaky.txt"):
        assert path in out


def test_cli_artifacts_download_writes_the_same_bytes(record: Record, tmp_path: Path) -> None:
    (artifact,) = [
        a
        for a in record.store.list_artifacts(build_id=record.build_id)
        if a.path == "out/deep/er/result.json"
    ]
    result = cli_bytes("artifacts", "download", artifact.id, cwd=tmp_path)
    assert result.returncode == 2  # there is no store here (the default place): said so
    assert b"no store at" in result.stderr and b".harmont/harmont.db" in result.stderr
    open_store(tmp_path / ".harmont" / "harmont.db").close()
    result = cli_bytes("artifacts", "download", artifact.id, cwd=tmp_path)
    assert result.returncode == 2  # the store here has no such artifact
    assert b"no artifact" in result.stderr
    db = str(record.db)
    target = tmp_path / "copy.json"
    result = cli_bytes(
        "artifacts", "download", artifact.id, "--db", db, "-o", str(target), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert _sha256(target.read_bytes()) == artifact.sha256
    # Without -o: its file name here, and never over an existing file.
    result = cli_bytes("artifacts", "download", artifact.id, "--db", db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "result.json").read_bytes() == target.read_bytes()
    (tmp_path / "result.json").write_bytes(b"mine")
    result = cli_bytes("artifacts", "download", artifact.id, "--db", db, cwd=tmp_path)
    assert result.returncode == 2
    assert b"already exists" in result.stderr and b"-o PATH" in result.stderr
    assert (tmp_path / "result.json").read_bytes() == b"mine"


def test_cli_artifacts_download_refuses_content_that_does_not_match(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "b.json").write_text(json.dumps({"steps": [BUILD["steps"][0]]}))  # type: ignore[index]
    db = work / "harmont.db"
    assert executor.run_build_sync(work / "b.json", db=db).exit_status == 0
    with open_store(db) as store:
        build = store.get_build(1)
        assert build is not None
        artifact = store.list_artifacts(build_id=build.id)[0]
        blob = store.blobs.path_of(artifact.sha256)
    blob.chmod(0o644)
    blob.write_bytes(b"tampered")
    target = tmp_path / "out.json"
    result = cli_bytes(
        "artifacts", "download", artifact.id, "--db", str(db), "-o", str(target), cwd=work
    )
    assert result.returncode == 1
    assert b"does not match its recorded sha256" in result.stderr
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.json")] == []


# --- a 100 MB artifact through the real server ------------------------------------------------


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_artifacts_100mb_download_streams_from_the_real_server(
    server: Server, tmp_path: Path
) -> None:
    work = tmp_path / "big"
    work.mkdir()
    (work / "big.json").write_text(
        json.dumps(
            {
                "steps": [
                    {
                        "key": "big",
                        "command": "head -c 104857600 /dev/urandom > big.bin",
                        "artifact_paths": ["big.bin"],
                    }
                ]
            }
        )
    )
    assert executor.run_build_sync(work / "big.json", db=server.db).exit_status == 0
    expected = hashlib.sha256((work / "big.bin").read_bytes()).hexdigest()
    token = create_token(server.db, tmp_path)
    before = _peak_rss_kib(server.proc.pid)
    base = f"{server.url}/organizations/local/pipelines/big/builds/1"
    headers = {"Authorization": f"Bearer {token}"}
    listed = httpx.get(f"{base}/artifacts", headers=headers, timeout=TIMEOUT_S).json()["data"]
    (artifact,) = listed
    digest = hashlib.sha256()
    received = 0
    with httpx.stream(
        "GET", f"{base}/artifacts/{artifact['id']}/download", headers=headers, timeout=TIMEOUT_S
    ) as response:
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == 100 * 1024 * 1024
        for chunk in response.iter_bytes():
            digest.update(chunk)
            received += len(chunk)
    assert received == 100 * 1024 * 1024
    assert digest.hexdigest() == expected == artifact["sha256"]
    grown_mib = (poll(lambda: _peak_rss_kib(server.proc.pid), "rss") - before) / 1024
    assert grown_mib < 50, f"the server's peak memory grew {grown_mib:.0f} MiB: not streamed"
