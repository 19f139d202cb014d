"""``BuildService``: what `serve` does with the builds it is sent (SPEC §6.3).

It has the methods the API's write routes need (``executor.api.service.BuildService``;
``cli/serve.py`` hands it to ``create_app``) and the queue that runs what they record:

- ``submit`` loads the build's ``pipeline_ir`` (Harmont's v0 IR, either form, or our build file;
  ``env`` overlays its build-level env), unpacks its source tarball safely (``source``) into a
  staging directory, and records the build queued, its workspace moved into place in the same
  transaction (``workspace``). A build whose IR does not load or whose tarball cannot be unpacked
  is still recorded, ``failed`` at once with the reason (``invalid_build_file``,
  ``invalid_source``, ``payload_too_large`` when it unpacks to more than the limit).
- ``cancel`` records the request (``Store.request_cancel``): a queued build is canceled there
  and then, a running one by whoever runs it within about a second.
- ``retry`` queues a new build of a finished one, as ``harmont-exec retry`` would record it.
- ``start`` / ``stop`` run the queue (``queue.BuildQueue``): at most ``max_builds`` at once.

What a CI user expects when the server stops (SIGINT/SIGTERM of `serve`, a restart for an
upgrade) is to lose no accepted build: so a stop does not cancel. Running builds are
interrupted: their jobs' process groups are stopped as a cancel would stop them (SIGTERM, the
grace period, SIGKILL; a second Ctrl-C kills them at once), and each build is left ``failed``
with ``build_abandoned``, exactly as after a crash, so the next `serve` resumes it (its finished
jobs keep their results; the stopped ones run again). Queued builds stay queued and start then.
Nothing is left running either way. A user who wants a build ended cancels it.

Every method may be called from any thread (the API's worker threads); the builds themselves
run on the queue's own thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple, Protocol

import structlog

from executor.errors import (
    BuildFileError,
    ErrorCode,
    ExecutorError,
    InternalError,
    InvalidSourceError,
)
from executor.load import plan_build_text
from executor.model import parse_build_spec
from executor.plan import Plan, build_plan
from executor.run.build import record_retry
from executor.run.scheduler import RunOptions
from executor.service.queue import BuildQueue, RunnerFactory, local_runner
from executor.service.source import unpack_source
from executor.service.workspace import (
    place_workspace,
    remove_workspace,
    stage_workspace,
    sweep_incoming,
    workspace_path,
)
from executor.store import BuildRow, Store

__all__ = ["UNPACKED_PER_UPLOAD", "BuildService", "Submission", "SubmitRequest", "plan_submission"]

log = structlog.get_logger("executor.service")

UNPACKED_PER_UPLOAD = 10
"""A source tarball may unpack to this many times the upload limit (source compresses well)."""


class SubmitRequest(Protocol):
    """What ``submit`` reads of a ``createBuild`` (``executor.api.service.BuildRequest``)."""

    @property
    def org(self) -> str: ...
    @property
    def pipeline(self) -> str: ...
    @property
    def pipeline_ir(self) -> str: ...
    @property
    def source(self) -> bytes | None: ...
    @property
    def env(self) -> Mapping[str, str]: ...
    @property
    def branch(self) -> str | None: ...
    @property
    def commit(self) -> str | None: ...
    @property
    def message(self) -> str | None: ...
    @property
    def origin(self) -> str: ...


class Submission(NamedTuple):
    """A build ``submit`` recorded: queued (``error`` None) or refused, with why."""

    build: BuildRow
    error: ExecutorError | None = None


class BuildService:
    """Runs the builds `serve` is sent; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        max_builds: int = 2,
        runner_factory: RunnerFactory | None = None,
        workspaces: Path,
        max_upload_bytes: int,
        max_unpacked_bytes: int | None = None,
        options: RunOptions | None = None,
    ) -> None:
        """``workspaces``: where builds keep their files (``workspace.workspaces_for``);
        ``max_upload_bytes``: the largest source tarball, as sent; what it unpacks to is
        limited to ``max_unpacked_bytes`` (default ``UNPACKED_PER_UPLOAD`` times that).
        ``runner_factory`` opens the runner of every build (default: processes here);
        ``options`` are every build's run options (its working directory is its own)."""
        if max_builds < 1:
            raise ExecutorError(f"max_builds must be at least 1, got {max_builds}")
        self.store = store
        self.workspaces = workspaces
        self.max_builds = max_builds
        self.max_unpacked_bytes = (
            max_unpacked_bytes
            if max_unpacked_bytes is not None
            else max_upload_bytes * UNPACKED_PER_UPLOAD
        )
        self._queue = BuildQueue(
            store,
            max_builds=max_builds,
            runner_factory=runner_factory or local_runner,
            options=options or RunOptions(),
        )

    # --- the queue ------------------------------------------------------------------------

    def start(self) -> None:
        """Serve the queue: resume what a dead `serve` left, then start queued builds; returns
        once it runs."""
        self.workspaces.mkdir(parents=True, exist_ok=True, mode=0o700)
        swept = sweep_incoming(self.workspaces)
        log.info("workspaces", root=str(self.workspaces), interrupted_uploads_removed=swept)
        self._queue.start()

    def begin_stop(self, *, kill: bool = False) -> None:
        """Start stopping (see the module docstring); returns at once. ``kill``: the jobs'
        process groups are killed now instead of after the grace period."""
        self._queue.begin_stop(kill=kill)

    def stop(self, *, kill: bool = False) -> None:
        """Stop, and return once every build it ran is stopped and recorded. Idempotent."""
        self._queue.stop(kill=kill)

    @property
    def running(self) -> int:
        """How many builds it runs now."""
        return self._queue.running

    # --- the API's writes -----------------------------------------------------------------

    def submit(self, request: SubmitRequest) -> Submission:
        """Record a new build of ``request.pipeline`` and queue it, or record it refused."""
        now = datetime.now(UTC)
        root, org, pipeline = self.workspaces, request.org, request.pipeline

        def refused(error: ExecutorError, code: ErrorCode, plan: Plan | None) -> Submission:
            build = self.store.record_refused_build(
                org=org,
                pipeline=pipeline,
                error_code=code,
                error_message=str(error),
                plan=plan,
                working_dir=lambda number: str(workspace_path(root, org, pipeline, number)),
                source=request.origin,
                branch=request.branch,
                commit=request.commit,
                message=request.message,
                now=now,
            )
            log.info("build_refused", build=f"{org}/{pipeline} #{build.number}", code=code.value)
            return Submission(build, error)

        try:
            plan = plan_submission(request.pipeline_ir, request.env)
        except BuildFileError as exc:
            return refused(exc, ErrorCode.INVALID_BUILD_FILE, None)
        staging = stage_workspace(root)
        try:
            if request.source is not None:
                unpack_source(request.source, staging, max_bytes=self.max_unpacked_bytes)
        except InvalidSourceError as exc:
            remove_workspace(staging)
            return refused(exc, exc.code, plan)
        except OSError as exc:  # this server's disk, not the upload
            remove_workspace(staging)
            raise ExecutorError(
                f"could not unpack a build's source into {staging}: {exc.strerror or exc}; free "
                f"space there (or point {root} elsewhere)"
            ) from None
        placed: list[Path] = []

        def place(number: int) -> str:
            placed.append(place_workspace(staging, workspace_path(root, org, pipeline, number)))
            return str(placed[0])

        try:
            created = self.store.create_build(
                org=org,
                pipeline=pipeline,
                plan=plan,
                build_file=None,
                working_dir=place,
                source=request.origin,
                branch=request.branch,
                commit=request.commit,
                message=request.message,
                queued=True,
                now=now,
            )
        except BaseException:
            remove_workspace(placed[0] if placed else staging)
            raise
        self._queue.nudge()
        log.info("build_queued", build=f"{org}/{pipeline} #{created.number}", jobs=len(plan))
        return Submission(self._row(created.id))

    def cancel(self, build: BuildRow) -> BuildRow:
        """Record that ``build`` is to be canceled, wherever it runs; its row as recorded now
        (a running one is canceled by its executor within about a second)."""
        row = self.store.request_cancel(build.id, datetime.now(UTC))
        if not row.state.is_terminal:
            self._queue.cancel_now(build.id)
        return row

    def retry(self, build: BuildRow, *, failed_only: bool) -> BuildRow:
        """Queue a new build of ``build``'s recorded plan in its working directory (``retry``;
        ``failed_only``: the jobs that passed keep their result). BuildStateError for a build
        that has not finished, or that was refused when it was submitted."""
        retry = record_retry(build, store=self.store, failed_only=failed_only, queued=True)
        self._queue.nudge()
        log.info("build_queued", build=f"{build.org}/{build.pipeline} #{retry.created.number}")
        return self._row(retry.created.id)

    def _row(self, build_id: str) -> BuildRow:
        row = self.store.get_build_by_id(build_id)
        if row is None:  # recorded by this process a moment ago
            raise InternalError(f"build {build_id} is not in {self.store.location} after writing")
        return row


def plan_submission(text: str, env: Mapping[str, str]) -> Plan:
    """The plan of a ``createBuild``'s ``pipeline_ir`` (JSON when it starts with ``{`` or
    ``[``, else YAML; messages name it ``pipeline_ir``), its build env overlaid by ``env``.
    BuildFileError with the loader's located message."""
    json_format = text.lstrip().startswith(("{", "["))
    plan = plan_build_text(text, name="pipeline_ir", json_format=json_format)
    if not env:
        return plan
    data = plan.spec.to_data()
    data["env"] = {**plan.spec.env, **env}
    try:
        return build_plan(parse_build_spec(data))
    except BuildFileError as exc:
        raise exc.with_diagnostics(
            [d.located("env", None, None) if d.file is None else d for d in exc.diagnostics]
        ) from None
