"""`harmont-exec submit`: a build sent to a harmont-exec server and followed there as `run`
follows one here (SPEC §6.3).

Packs the working directory (``pack``), creates the pipeline when it is missing and then the
build (``remote``, the only code that speaks HTTP), and polls the build and its jobs: what
changed between two polls becomes the same ``JobUpdate``s `run`'s scheduler reports, for the same
views (``view``): the live view on a terminal, one line per change when piped, then the summary
(the last log lines of each failed job read from the server) and `run`'s exit status. A first
Ctrl-C (or SIGTERM) asks the server to cancel the build and goes on following it to its end; a
second one stops following at once (the server goes on canceling it).
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import click
from anyio import CancelScope
from rich.console import Console
from rich.live import Live

from executor.cli.common import EXIT_INTERRUPTED, Failed, Refused, cli, make_console
from executor.cli.pack import Packed, SourceTooLargeError, open_packed
from executor.cli.polled import PolledBuild, job_key, parse_time
from executor.cli.view import (
    LiveView,
    PlainLines,
    Summary,
    print_summary,
    tail_option,
    verdict,
    wants_tail,
)
from executor.errors import ErrorCode, ExecutorError
from executor.run.build import git_metadata
from executor.run.results import JobResult, JobUpdate, exit_status
from executor.states import BuildState, JobState
from executor.store import slug_for

if TYPE_CHECKING:
    from executor.cli.remote import Api

DEFAULT_SERVER = "http://127.0.0.1:8080"
POLL_S = 0.3
"""How often the build and its jobs are read while it runs."""
LOST_S = 60.0
"""How long the server may be unreachable while a build is followed before `submit` gives up
(the build goes on there)."""
_MB = 1 << 20


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--server",
    envvar="HARMONT_API_URL",
    default=DEFAULT_SERVER,
    show_default=True,
    help="The harmont-exec server (`harmont-exec serve`) [env HARMONT_API_URL].",
)
@click.option(
    "--token", envvar="HARMONT_TOKEN", help="An API token of that server [env HARMONT_TOKEN]."
)
@click.option("--org", default="local", show_default=True, help="Organization to build in.")
@click.option(
    "--pipeline",
    "pipeline_name",
    help="Pipeline to build in, created if missing [default: the file's name].",
)
@tail_option
@click.option(
    "--max-upload-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=100.0,
    show_default=True,
    help="Largest source tarball sent, in MB (the server takes at most its own "
    "`serve --max-upload-mb`, default 100).",
)
def submit(
    file: Path,
    server: str,
    token: str | None,
    org: str,
    pipeline_name: str | None,
    tail_lines: int,
    max_upload_mb: float,
) -> None:
    """Run the build in FILE on a harmont-exec server, following it as `run` does.

    Uploads FILE's directory, where `run` would run its jobs (in a git checkout: the files git
    lists there, tracked and untracked-not-ignored); never .git or .harmont. The jobs run in
    the server's copy of it, as the server's user. Ctrl-C cancels the build on the server and
    waits for it to end; a second Ctrl-C stops waiting. Exits like `run`: 0 passed, 1 failed,
    124 timed out, 130 canceled; 2 when the server cannot be reached or refuses the build."""
    if not token:
        raise Refused(
            "no API token: pass --token or set HARMONT_TOKEN (create one where the server's "
            "store is, with `harmont-exec token create`)"
        )
    try:
        ir = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Refused(f"{file}: cannot be read as UTF-8 text ({exc})") from None
    limit = int(max_upload_mb * _MB)
    started = time.monotonic()
    try:
        with open_packed(file.parent, limit_bytes=limit) as packed:
            job = _Submission(
                server=server,
                token=token,
                org=org,
                name=pipeline_name or file.stem,
                ir=ir,
                packed=packed,
                tail_lines=tail_lines,
                console=make_console(),
            )
            status = anyio.run(job.run)
    except SourceTooLargeError as exc:
        biggest = ", ".join(f"{path} ({_size(size)})" for size, path in exc.largest)
        raise Refused(
            f"the working directory packs to more than {_size(limit)} (--max-upload-mb); the "
            f"biggest files: {biggest}: leave out what the build does not need (.gitignore it), "
            "or raise --max-upload-mb (and the server's own `serve --max-upload-mb`)"
        ) from None
    except KeyboardInterrupt:  # before the build was sent: nothing to cancel
        click.echo("harmont-exec: interrupted; nothing was submitted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if job.number is not None and job.final_state and not job.abandoned:  # followed to its end
        elapsed = time.monotonic() - started
        job.console.print(verdict(job.number, job.final_state, elapsed, status))
    sys.exit(status)


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    return f"{count / _MB:.1f} MB" if count >= _MB // 10 else f"{count / 1024:.1f} KB"


@dataclass
class _Submission:
    """One `submit`: the build it creates and what it has shown of it."""

    server: str
    token: str
    org: str
    name: str
    ir: str
    packed: Packed
    tail_lines: int
    console: Console
    slug: str = ""
    number: int | None = None
    final_state: str = ""  # once followed to its end
    creating: bool = False  # createBuild was sent
    abandoned: bool = False  # stopped by a signal before the build ended
    cancel_wanted: anyio.Event = field(default_factory=anyio.Event)
    cancel_sent: bool = False
    polled: PolledBuild = field(default_factory=PolledBuild)

    async def run(self) -> int:
        """Create the build and follow it; its exit status."""
        from executor.cli.remote import open_api  # httpx: only when submit runs

        async with open_api(self.server, self.token, self.org) as api:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                status: int | None = None
                refusal: click.ClickException | ExecutorError | None = None
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch, signals, tg.cancel_scope)
                    try:
                        status = await self._submit_and_follow(api)
                    except (click.ClickException, ExecutorError) as exc:
                        refusal = exc  # raised as itself, not in the task group's ExceptionGroup
                    tg.cancel_scope.cancel()
                if refusal is not None:
                    raise refusal
        if status is None or self.abandoned:
            if not self.creating:
                where = "nothing was submitted"
            elif self.final_state:
                where = f"build #{self.number} {self.final_state}: {self._url(api)}"
            elif self.number is None:
                where = (
                    "the build may have been created, and is not canceled: see "
                    f"{api.url(self._pipeline_path())}/builds"
                )
            elif self.cancel_sent:
                where = f"the server goes on canceling build #{self.number}: {self._url(api)}"
            else:
                where = f"build #{self.number} goes on: {self._url(api)}"
            click.echo(f"harmont-exec: stopped following; {where}", err=True)
            return EXIT_INTERRUPTED
        return status

    async def _watch(self, signals: AsyncIterator[int], scope: CancelScope) -> None:
        """A first signal cancels the build (before it was sent, or once it ended: stops); a
        second one stops following."""
        async for _ in signals:
            if not self.creating or self.final_state or self.cancel_wanted.is_set():
                self.abandoned = True
                scope.cancel()
                return
            self.cancel_wanted.set()

    # --- the build --------------------------------------------------------------------------

    def _pipeline_path(self) -> str:
        from executor.cli.remote import segment

        return f"/organizations/{segment(self.org)}/pipelines/{segment(self.slug or self.name)}"

    def _build_path(self) -> str:
        return f"{self._pipeline_path()}/builds/{self.number}"

    def _url(self, api: Api) -> str:
        return api.url(self._build_path())

    async def _submit_and_follow(self, api: Api) -> int:
        self.slug = await self._ensure_pipeline(api)
        packed = self.packed
        if packed.size_bytes >= _MB:  # an upload that takes a moment: say what it is first
            click.echo(
                f"uploading {_size(packed.size_bytes)} ({packed.file_count} files from "
                f"{packed.root})",
                err=True,
            )
        self.creating = True
        build = await self._create(api)
        self.number = int(build["number"])
        click.echo(
            f"{self.org}/{self.slug} build #{self.number} submitted: {self._url(api)} "
            f"({packed.file_count} file{'' if packed.file_count == 1 else 's'}, "
            f"{_size(packed.size_bytes)} from {packed.root})",
            err=True,
        )
        build, jobs = await self._follow(api)
        self.final_state = build["state"]
        await self._summary(api, build, jobs)
        return exit_status(BuildState(build["state"]), build.get("error_code"))

    async def _ensure_pipeline(self, api: Api) -> str:
        """The pipeline's slug, created now if it is not there."""
        from executor.cli.remote import Rejected, segment

        branch, _, _ = git_metadata(self.packed.root) if self.packed.git else (None, None, None)
        body = {
            "name": self.name,
            "repository": _repository(self.packed) or "local",
            "default_branch": branch or "main",
        }
        try:
            created = await api.call(
                "POST", f"/organizations/{segment(self.org)}/pipelines", body=body, own=(422,)
            )
        except Rejected as refused:
            if refused.code != ErrorCode.SLUG_TAKEN:
                raise Refused(
                    f"cannot create the pipeline {self.name!r} in {self.org}: {refused.message}"
                ) from None
            return slug_for(self.name)  # there already: the server made its slug so
        return str(created["slug"])

    async def _create(self, api: Api) -> dict[str, Any]:
        from executor.cli.remote import Rejected

        packed = self.packed
        fields: dict[str, Any] = {"pipeline_ir": self.ir, "source": "api"}
        if packed.git:
            branch, commit, message = git_metadata(packed.root)
            fields.update(branch=branch or "", commit=commit or "", message=message)
        fields["source_sha256"] = packed.sha256
        head = json.dumps(fields)[:-1].encode() + b', "source_b64": "'
        tail = b'"}'
        length = len(head) + 4 * -(-packed.size_bytes // 3) + len(tail)

        async def body() -> AsyncIterator[bytes]:
            yield head
            packed.archive.seek(0)
            while chunk := packed.archive.read(3 << 16):  # a multiple of 3: no padding inside
                yield base64.b64encode(chunk)
            yield tail

        try:
            build: dict[str, Any] = await api.call(
                "POST",
                f"{self._pipeline_path()}/builds",
                content=body(),
                headers={"content-type": "application/json", "content-length": str(length)},
                own=(422,),
            )
        except Rejected as refused:
            raise Refused(refused.message) from None  # e.g. the build file's located errors
        return build

    # --- following --------------------------------------------------------------------------

    async def _follow(self, api: Api) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Poll until the build ends, showing each change; the build and its jobs then."""
        live = self.console.is_terminal
        if not live:
            lines = PlainLines(sys.stdout)
            try:
                return await self._poll(api, lines)
            finally:
                lines.close()
        view = LiveView(self.console, 0)
        with Live(view, console=self.console, refresh_per_second=8, transient=True):
            return await self._poll(api, view, view)

    async def _poll(
        self, api: Api, show: Callable[[JobUpdate], None], view: LiveView | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from executor.cli.remote import Unreachable

        lost_since: float | None = None
        while True:
            try:
                # The build first: once it is terminal, the jobs read after it are too.
                build = await api.call("GET", self._build_path())
                listed = await api.call("GET", f"{self._build_path()}/jobs")
            except Unreachable as exc:
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    click.echo(f"harmont-exec: {exc.message}; trying again", err=True)
                elif now - lost_since > LOST_S:
                    raise Failed(
                        f"lost the server for {LOST_S:.0f}s; build #{self.number} goes on "
                        f"there: {self._url(api)}"
                    ) from None
                await anyio.sleep(POLL_S)
                continue
            lost_since = None
            jobs: list[dict[str, Any]] = listed["data"]
            if view is not None:
                view.progress.update(view.task, total=len(jobs))
            for change in await self.polled.changes(build, jobs, partial(self._attempts, api)):
                show(change)
            if BuildState(build["state"]).is_terminal:
                return build, jobs
            if self.cancel_wanted.is_set():
                if not self.cancel_sent:
                    await self._cancel(api)
                await anyio.sleep(POLL_S)
            else:
                with anyio.move_on_after(POLL_S):
                    await self.cancel_wanted.wait()

    async def _cancel(self, api: Api) -> None:
        """Ask the server to cancel the build (again at the next poll if it was not reached);
        a second signal does not cut the request short."""
        from executor.cli.remote import Unreachable

        click.echo(
            f"harmont-exec: canceling build #{self.number} on the server "
            "(Ctrl-C again to stop waiting for it)",
            err=True,
        )
        with anyio.CancelScope(shield=True):
            try:
                await api.call("PUT", f"{self._build_path()}/cancel")
            except Unreachable as exc:
                click.echo(f"harmont-exec: {exc.message}; trying again", err=True)
                return
        self.cancel_sent = True

    async def _attempts(self, api: Api, job: dict[str, Any]) -> int:
        found = await api.call("GET", f"{self._build_path()}/jobs/{job['id']}/attempts")
        return len(found["data"])

    # --- the end ----------------------------------------------------------------------------

    async def _summary(self, api: Api, build: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
        results = [
            JobResult(
                job_key(job),
                job["id"],
                JobState(job["state"]),
                job["exit_code"],
                bool(job["soft_failed"]),
                await self.polled.attempts(job, partial(self._attempts, api)),
                job["error_code"],
                job["error_message"],
                parse_time(job["started_at"]),
                parse_time(job["finished_at"]),
                int(job["retries_count"]),
            )
            for job in jobs
        ]
        tails = {}
        if self.tail_lines:
            for job in results:
                if wants_tail(job):
                    path = f"{self._build_path()}/jobs/{job.job_id}/log"
                    tails[job.job_id] = await api.log_tail(path, self.tail_lines)
        artifacts = await api.call("GET", f"{self._build_path()}/artifacts?limit=100")
        print_summary(
            self.console,
            Summary(
                org=self.org,
                pipeline=self.slug,
                number=int(build["number"]),
                state=build["state"],
                jobs=results,
                tails=tails,
                artifacts_kept=len(artifacts["data"]),
                artifacts_capped=artifacts.get("next_cursor") is not None,
                error_message=build.get("error_message"),
                # Below the build's URL, shown when it was submitted: short enough for a
                # terminal's width.
                jobs_hint="GET …/jobs",
                log_hint=lambda job_id: f"GET …/jobs/{job_id}/log",
                artifacts_hint="GET …/artifacts",
            ),
        )


def _repository(packed: Packed) -> str | None:
    """The checkout's `origin` remote, to name the pipeline's repository."""
    if not packed.git:
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(packed.root), "remote", "get-url", "origin"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
