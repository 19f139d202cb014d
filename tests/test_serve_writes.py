"""Harmont's SDK flow against a real `harmont-exec serve` on a loopback port, as a client of
Harmont's TypeScript SDK makes it: createPipeline -> createBuild (a source tarball and a build
file) -> poll getBuild -> listJobs -> the log stream (log-token, then SSE) -> cancel and retry.
On both backends (conftest's ``store_url``, through serving's ``server`` fixture)."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serving import TIMEOUT_S, Server, bounded, create_token, poll, server

__all__ = ["server"]  # the fixture, imported for the tests below

BUILD_FILE = """
steps:
  - key: read
    command: cat data/input.txt && echo "env=$GREETING"
  - key: after
    depends_on: [read]
    command: test -e data/input.txt
"""
HELD = """
steps:
  - key: hold
    command: while [ ! -e "$RELEASE" ]; do sleep 0.05; done
"""


def _tarball(files: dict[str, bytes]) -> str:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return base64.b64encode(raw.getvalue()).decode()


class Client:
    """The SDK's calls: paths, bodies and statuses as Harmont's client makes them."""

    def __init__(self, server: Server) -> None:
        self.base = server.url
        self.http = httpx.Client(
            headers={"Authorization": f"Bearer {create_token(server.db)}"}, timeout=TIMEOUT_S
        )

    def call(self, method: str, path: str, status: int, body: Any = None) -> Any:
        response = self.http.request(method, f"{self.base}{path}", json=body)
        assert response.status_code == status, (method, path, response.text)
        return response.json() if response.content else None

    def build(self, number: int) -> dict[str, Any]:
        return self.call("GET", f"/organizations/local/pipelines/app/builds/{number}", 200)  # type: ignore[no-any-return]

    def ended(self, number: int) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            build = self.build(number)
            return build if build["state"] in ("passed", "failed", "canceled") else None

        return poll(done, f"build #{number} to end")


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    client = Client(server)
    pipeline = client.call(
        "POST",
        "/organizations/local/pipelines",
        201,
        {
            "name": "App",
            "repository": "https://example.invalid/acme/app.git",
            "default_branch": "main",
        },
    )
    assert (pipeline["slug"], pipeline["name"]) == ("app", "App")
    yield client
    client.http.close()


def test_serve_runs_a_build_it_is_sent_with_its_source_and_streams_its_log(
    client: Client, server: Server
) -> None:
    created = client.call(
        "POST",
        "/organizations/local/pipelines/app/builds",
        201,
        {
            "branch": "main",
            "commit": "0" * 40,
            "message": "from the SDK",
            "pipeline_ir": BUILD_FILE,
            "source_b64": _tarball({"data/input.txt": b"uploaded bytes\n"}),
            "env": {"GREETING": "hello"},
        },
    )
    assert (created["number"], created["state"], created["source"]) == (1, "scheduled", "api")
    assert client.ended(1)["state"] == "passed"
    jobs = client.call("GET", "/organizations/local/pipelines/app/builds/1/jobs", 200)["data"]
    assert [(j["step_key"], j["state"], j["exit_code"]) for j in jobs] == [
        ("read", "passed", 0),
        ("after", "passed", 0),
    ]
    token = client.call("GET", "/organizations/local/pipelines/app/builds/1/log-token", 200)
    stream = f"{server.url.removesuffix('/api/v0')}/v0/jobs/{jobs[0]['id']}/logs"
    text = ""
    with httpx.stream(
        "GET", stream, params={"token": token["token"]}, timeout=TIMEOUT_S
    ) as response:
        assert response.status_code == 200
        event = None
        for line in bounded(response.iter_lines(), "the log stream to end"):
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event in ("history", "chunk"):
                data = json.loads(line.removeprefix("data: "))
                for chunk in data["chunks"] if event == "history" else [data]:
                    text += chunk["content"]
            elif event == "done":
                break
    assert "uploaded bytes\n" in text and "env=hello\n" in text, text


def test_serve_refuses_a_build_file_that_does_not_load_and_records_it(client: Client) -> None:
    refused = client.call(
        "POST",
        "/organizations/local/pipelines/app/builds",
        422,
        {
            "branch": "main",
            "commit": "0" * 40,
            "pipeline_ir": "steps:\n  - key: a\n    command: [\n",
        },
    )
    assert refused["error"]["code"] == "invalid_build_file", refused
    assert "build #1 of local/app" in refused["error"]["message"], refused
    build = client.build(1)  # the row exists, ended with the loader's error
    assert (build["state"], build["error_code"]) == ("failed", "invalid_build_file"), build


def test_serve_cancel_reaches_a_running_build_and_retry_runs_it_again(
    client: Client, server: Server, tmp_path: Any
) -> None:
    release = tmp_path / "release"
    body = {
        "branch": "main",
        "commit": "0" * 40,
        "pipeline_ir": HELD,
        "env": {"RELEASE": str(release)},
    }
    client.call("POST", "/organizations/local/pipelines/app/builds", 201, body)

    def holding() -> bool | None:
        jobs = client.call("GET", "/organizations/local/pipelines/app/builds/1/jobs", 200)
        return True if jobs["data"][0]["state"] == "running" else None

    poll(holding, "the job to run")
    canceling = client.call("PUT", "/organizations/local/pipelines/app/builds/1/cancel", 200)
    assert canceling["number"] == 1
    ended = client.ended(1)
    assert ended["state"] == "canceled", ended
    again = client.call("PUT", "/organizations/local/pipelines/app/builds/1/cancel", 200)
    assert again["state"] == "canceled"  # idempotent: a finished build unchanged
    release.touch()
    retried = client.call(
        "POST", "/organizations/local/pipelines/app/builds/1/retry", 201, {"failed_only": False}
    )
    assert retried["number"] == 2
    assert client.ended(2)["state"] == "passed"
