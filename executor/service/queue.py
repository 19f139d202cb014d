"""The queue runner: one thread with its own event loop that runs `serve`'s builds.

``BuildQueue.start`` starts the thread and returns once it runs: builds of this host's queue
that a dead executor left (recovered as in SPEC §5, ``build_abandoned``) are resumed first,
then queued builds are claimed oldest first (``Store.claim_queued_build``), at most
``max_builds`` running at once, each with its own concurrency. A new submission wakes it
(``nudge``); it also looks every ``QUEUE_POLL_S``, for builds another process queued.

Every build runs on this one event loop, so the store's write methods are only ever called
from this thread (the store requires it). Other threads only ask, through
``call_soon_threadsafe``: wake up, cancel a build now, stop.

Stopping (``stop``): no new build is claimed, and each running build is interrupted
(``Scheduler.interrupt``: its jobs' process groups get SIGTERM, the grace period, SIGKILL) and
left ``failed`` with ``build_abandoned``, so the next start resumes it; with ``kill`` (a second
Ctrl-C) the process groups are killed at once. Queued builds stay queued. Nothing is left
running: each build's runner reaps its processes before the thread ends.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from functools import partial

import anyio
import structlog

from executor.errors import ExecutorError, InternalError, StoreError
from executor.run.build import resume_build, run_queued_build
from executor.run.process import ProcessRunner
from executor.run.scheduler import RunOptions, Scheduler
from executor.store import BuildRow, Store

__all__ = ["QUEUE_POLL_S", "BuildQueue", "RunnerFactory", "local_runner"]

log = structlog.get_logger("executor.service")

QUEUE_POLL_S = 2.0
"""How often the queue looks for builds without being woken (queued by another process)."""

RunnerFactory = Callable[[], AbstractAsyncContextManager[ProcessRunner | None]]
"""Opens the runner every build of the queue uses (None: each build runs its jobs here)."""

STOPPED_REASON = (
    "serve stopped before the build ended; `harmont-exec serve` resumes it when it starts"
)


@asynccontextmanager
async def local_runner() -> AsyncIterator[ProcessRunner | None]:
    """The default: jobs run as processes of this host (each build makes its own runner)."""
    yield None


class BuildQueue:
    """Runs the builds queued on this host; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        max_builds: int,
        runner_factory: RunnerFactory,
        options: RunOptions,
    ) -> None:
        self._store = store
        self._max_builds = max_builds
        self._runner_factory = runner_factory
        self._options = options
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: ProcessRunner | None = None
        self._wake: anyio.Event | None = None
        self._feeding: anyio.CancelScope | None = None
        self._stopping = False
        self._schedulers: dict[str, Scheduler] = {}  # build id -> the scheduler running it

    # --- any thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; return once builds left by a dead executor are resumed and the
        queue is served. Raises what stopped it from starting (a store it cannot use)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._thread_main, name="harmont-build-queue")
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            self._thread.join()
            failure, self._failure = self._failure, None
            raise failure

    def nudge(self) -> None:
        """A build was queued: look now."""
        self._call(self._wake_up)

    def cancel_now(self, build_id: str) -> None:
        """A cancel of ``build_id`` was recorded: if this queue runs it, cancel it at once
        (it would notice within a second anyway)."""
        self._call(self._cancel, build_id)

    def begin_stop(self, *, kill: bool = False) -> None:
        """Ask the queue to stop (see the module docstring); returns at once."""
        self._call(self._stop, kill)

    def stop(self, *, kill: bool = False) -> None:
        """Stop and wait until every build it ran has stopped and been recorded."""
        thread = self._thread
        if thread is None:
            return
        self.begin_stop(kill=kill)
        thread.join()

    @property
    def running(self) -> int:
        """How many builds it is running now."""
        return len(self._schedulers)

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop is closed: the queue has stopped, nothing to ask it

    # --- the queue's thread ---------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            anyio.run(self._main)
        except BaseException as exc:  # for start() to raise, or the log if it was running
            if self._started.is_set():
                log.error("build_queue_stopped", error=repr(exc))
            self._failure = exc
        finally:
            self._loop = None
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with self._runner_factory() as runner:
            self._runner = runner
            left = await anyio.to_thread.run_sync(self._recover)
            log.info("build_queue_started", max_builds=self._max_builds, resuming=len(left))
            self._started.set()
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as feeding:
                    self._feeding = feeding
                    if self._stopping:
                        feeding.cancel()
                    await self._feed(tg, left)
                # The builds it started finish (or stop) before the task group ends.
        log.info("build_queue_ended")

    def _recover(self) -> list[BuildRow]:
        """Finish builds whose executor died (SPEC §5); those of this host's queue with jobs
        to run again, for resuming."""
        self._store.recover_lost_builds(datetime.now(UTC))
        return self._store.abandoned_queued_builds(socket.gethostname())

    async def _feed(self, tg: anyio.abc.TaskGroup, left: list[BuildRow]) -> None:
        slots = anyio.Semaphore(self._max_builds)
        for lost in left:
            await slots.acquire()
            tg.start_soon(self._run, lost, slots, True)
        while True:
            await slots.acquire()
            wake = self._wake = anyio.Event()
            with anyio.CancelScope(shield=True):  # a claimed build is never dropped
                build = await anyio.to_thread.run_sync(self._claim)
            if build is None:
                slots.release()
                with anyio.move_on_after(QUEUE_POLL_S):
                    await wake.wait()
                continue
            tg.start_soon(self._run, build, slots, False)

    def _claim(self) -> BuildRow | None:
        try:
            return self._store.claim_queued_build(datetime.now(UTC))
        except StoreError as exc:  # the database is away: try again at the next look
            log.warning("build_queue_claim_failed", error=str(exc))
            return None

    async def _run(self, build: BuildRow, slots: anyio.Semaphore, resume: bool) -> None:
        name = f"{build.org}/{build.pipeline} #{build.number}"
        track = partial(self._track, build.id)
        try:
            if resume:
                await resume_build(
                    build.number,
                    store=self._store,
                    org=build.org,
                    pipeline=build.pipeline,
                    options=self._options,
                    runner=self._runner,
                    on_scheduler=track,
                )
            else:
                await run_queued_build(
                    build,
                    store=self._store,
                    options=self._options,
                    runner=self._runner,
                    on_scheduler=track,
                )
        except ExecutorError as exc:
            log.error("build_not_finished", build=name, error=str(exc))
        except Exception:  # a bug: the other builds go on, and it is in the log
            log.exception("build_crashed", build=name)
        finally:
            scheduler = self._schedulers.pop(build.id, None)
            if scheduler is not None:
                self._store.forget_jobs(scheduler.build.job_ids.values())
            slots.release()

    def _track(self, build_id: str, scheduler: Scheduler) -> None:
        if build_id in self._schedulers:
            raise InternalError(f"build {build_id} is run twice by this serve")
        self._schedulers[build_id] = scheduler
        if self._stopping:  # claimed as the queue stopped: left to be resumed
            scheduler.interrupt(STOPPED_REASON)

    # --- what other threads ask (on the loop) ---------------------------------------------

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _cancel(self, build_id: str) -> None:
        scheduler = self._schedulers.get(build_id)
        if scheduler is not None:
            scheduler.cancel("the build was canceled on request")

    def _stop(self, kill: bool) -> None:
        self._stopping = True
        if self._feeding is not None:
            self._feeding.cancel()
        for scheduler in self._schedulers.values():
            scheduler.interrupt(STOPPED_REASON)
            if kill:
                scheduler.kill()
