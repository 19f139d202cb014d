"""Attempts on Dask distributed workers (SPEC §8, ``--executor dask``).

``DaskProcessRunner`` is a ``ProcessRunner``: the scheduler hands it one attempt at a time and
keeps planning, retries, soft-fail, state and the store to itself. The runner submits the
attempt as one Dask task; on the worker, the task runs it with ``LocalProcessRunner`` (the same
spawn, process group, stop and reap as a local attempt) on the worker's event loop and reports
back through Dask's event log, on one topic per client, in order: ``start``, ``out`` chunks and
``end``, each numbered, so the attempt's result is acted on only after every chunk before it.

Stopping: Dask cannot stop a running task, so a stop reaches the worker that runs the attempt
(``Client.run``), where it is the local runner's stop (SIGTERM to the group, grace, SIGKILL). A
stop before the attempt started cancels the task and tells every worker to refuse it.

Losing a worker: the attempt ends ``EXECUTOR_LOST``. Dask must not run it again elsewhere:
the task claims its attempt in the scheduler's metadata before it starts the command and
refuses to run an attempt that was claimed before (run the scheduler with
``distributed.scheduler.allowed-failures: 0`` so it does not even try). The worker's own
``LocalProcessRunner`` has a watchdog (``watchdog.py``) that kills the attempt's processes on
the worker's machine the moment the worker process dies, whatever the build does next.

Losing the executor (the harmont-exec process that submitted the attempt): the scheduler
releases its tasks, and the worker stops an attempt whose task was released (checked every
``ORPHAN_CHECK_S``), so no job outlives its executor on the cluster.

``distributed`` is imported only here and only when a runner is opened: ``import executor``
and the local executor never load it. This module must not know about jobs, states or the store.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import structlog

from executor.errors import ExecutorError, InternalError
from executor.run.process import (
    AttemptResult,
    AttemptSpec,
    LocalProcessRunner,
    OutputSink,
    Reason,
    StopRequest,
    Stream,
)

if TYPE_CHECKING:
    from distributed import Client, Future, Worker

__all__ = [
    "CONNECT_TIMEOUT_S",
    "INSTALL_HINT",
    "ORPHAN_CHECK_S",
    "DaskProcessRunner",
    "check_address",
    "open_dask_runner",
]

log = structlog.get_logger("executor.run")

CONNECT_TIMEOUT_S = 10.0
INSTALL_HINT = "pip install 'harmont-exec[dask]'"
_ADDRESS = re.compile(r"(?:(?:tcp|tls|ucx|ws|wss)://)?(?:\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):\d{1,5}")
_END_WAIT_S = 30.0  # after a task's result, the wait for its last events (they come first)
_REFUSAL_WAIT_S = 10.0  # how long a stop of a running attempt waits for the refusals before it
ORPHAN_CHECK_S = 1.0
"""How often a worker checks that the harmont-exec process that submitted an attempt still
wants it; when it is gone, the attempt is stopped (SIGTERM, grace period, SIGKILL)."""
_META = "harmont-exec"  # the scheduler metadata key under which attempts are claimed


def _now() -> datetime:
    return datetime.now(UTC)


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ExecutorError(
            f"--executor dask needs the `distributed` package, which cannot be imported "
            f"({exc}); install it with `{INSTALL_HINT}`"
        ) from None
    return distributed


def check_address(address: str) -> str:
    """``address`` if it has the form of a Dask scheduler address (``tcp://HOST:PORT``; the
    scheme may be another of Dask's or left out), else ExecutorError saying so."""
    if _ADDRESS.fullmatch(address) is None:
        raise ExecutorError(
            f"{address!r} is not a Dask scheduler address; use the form tcp://HOST:PORT, e.g. "
            "tcp://127.0.0.1:8786 (the address `dask scheduler` prints when it starts)"
        )
    return address


@asynccontextmanager
async def open_dask_runner(
    address: str, *, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> AsyncIterator[DaskProcessRunner]:
    """Connect to the Dask scheduler at ``address`` (e.g. ``tcp://127.0.0.1:8786``) and yield a
    runner for ``run_build(runner=...)``; the connection closes on exit. Raises
    ``ExecutorError`` naming the address when it is malformed or cannot be reached within
    ``connect_timeout_s``."""
    check_address(address)
    distributed = _import_distributed()
    try:
        client = await distributed.Client(
            address,
            asynchronous=True,
            timeout=connect_timeout_s,
            set_as_default=False,
        )
    except (OSError, TimeoutError, ValueError) as exc:
        raise ExecutorError(
            f"cannot reach the Dask scheduler at {address!r} within {connect_timeout_s:g}s "
            f"({type(exc).__name__}: {exc}); start one there with `dask scheduler --host HOST "
            f"--port PORT` and workers with `dask worker {address} --nthreads 1`, or pass the "
            "right address with --scheduler (env HARMONT_DASK_SCHEDULER)"
        ) from None
    runner = DaskProcessRunner(client)
    try:
        workers = (await client.scheduler.identity()).get("workers", {})
        if not workers:
            log.warning(
                "dask_no_workers",
                scheduler=address,
                hint=f"jobs wait until a worker joins: `dask worker {address} --nthreads 1`",
            )
        yield runner
    finally:
        await client.close()


@dataclass(eq=False, slots=True)
class _Remote:
    """The client side of one attempt: where it runs, its next event, how it ended."""

    id: str
    on_start: Callable[[], None]
    on_output: OutputSink
    ended: asyncio.Future[list[Any]]
    worker: str | None = None
    next_seq: int = 0
    early: dict[int, list[Any]] = field(default_factory=dict)  # out-of-order events, by seq
    stop_kill: bool | None = None  # a stop requested: False graceful, True kill
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class DaskProcessRunner:
    """Runs each attempt on a worker of the Dask cluster behind ``client`` (an asynchronous
    ``distributed.Client`` on this event loop; ``open_dask_runner`` makes one)."""

    def __init__(self, client: Client) -> None:
        self.client: Any = client  # distributed is only partly typed: calls are unchecked
        self.topic = f"harmont-exec-{client.id}"
        self._remotes: dict[str, _Remote] = {}
        self._subscribed = False
        self._refusing: set[asyncio.Task[None]] = set()  # cancels of not-started attempts

    async def run(
        self,
        spec: AttemptSpec,
        *,
        on_start: Callable[[], None],
        on_output: OutputSink,
        stop: StopRequest,
    ) -> AttemptResult:
        started_at = _now()
        if spec.resources:
            missing = await self._missing_resources(spec.resources)
            if missing is not None:
                return AttemptResult(Reason.SPAWN_FAILED, None, None, started_at, _now(), missing)
        if not self._subscribed:  # before the first task: the scheduler sees them in order
            self.client.subscribe_topic(self.topic, self._on_event)
            self._subscribed = True
        loop = asyncio.get_running_loop()
        remote = _Remote(uuid4().hex, on_start, on_output, loop.create_future())
        self._remotes[remote.id] = remote
        future = self.client.submit(
            _run_attempt,
            remote.id,
            self.topic,
            spec.command,
            str(spec.cwd),
            dict(spec.env),
            spec.grace_period_s,
            key=_task_key(remote.id),
            pure=False,
            retries=0,
            resources=dict(spec.resources) if spec.resources else None,
        )
        stop.on_stop(partial(self._stop, remote, future))
        try:
            end = await self._outcome(remote, future)
            if end[0] == "lost" and remote.worker is None and await self._claimed(remote):
                # The worker died before its "start" reached us (a loaded machine), but the
                # attempt's claim says the command did start: it is an attempt that ran and
                # was lost, which a retry policy retries, not one that never started.
                remote.on_start()
        finally:
            del self._remotes[remote.id]
            for task in list(remote.tasks):
                task.cancel()
            future.release()
        kind = end[0]
        reason = stop.reason
        if kind == "end":
            _, worker_reason, exit_code, sig, error = end
            if reason is None:
                reason = Reason(worker_reason)
            return AttemptResult(reason, exit_code, sig, started_at, _now(), error)
        # "lost" or "never": the attempt has no exit status
        if reason is None:
            reason = Reason.EXECUTOR_LOST if kind == "lost" else Reason.SPAWN_FAILED
        return AttemptResult(reason, None, None, started_at, _now(), end[1])

    async def _claimed(self, remote: _Remote) -> bool:
        """Whether a worker claimed the attempt (it does so just before starting the command)."""
        try:
            claim = await self.client.get_metadata(keys=[_META, remote.id], default=None)
        except (OSError, TimeoutError):
            return False  # the scheduler is gone too: nothing says it started
        return claim is not None

    async def _missing_resources(self, needed: Mapping[str, float]) -> str | None:
        """Why no worker connected now can run an attempt needing ``needed`` (Dask would keep
        it waiting for one forever), or None."""
        workers = (await self.client.scheduler.identity()).get("workers", {})
        for info in workers.values():
            offered = info.get("resources") or {}
            if all(offered.get(name, 0) >= amount for name, amount in needed.items()):
                return None
        wanted = ", ".join(f"{name}={amount:g}" for name, amount in needed.items())
        offers = "; ".join(
            f"{address}: "
            + (", ".join(f"{k}={v:g}" for k, v in (info.get("resources") or {}).items()) or "none")
            for address, info in workers.items()
        )
        return (
            f"the step needs resources {wanted}, which no worker of the Dask cluster offers "
            f"(workers: {offers or 'none connected'}); start a worker with `dask worker "
            f"SCHEDULER --resources {wanted.replace(', ', ',')}` or lower the step's resources"
        )

    async def _outcome(self, remote: _Remote, future: Future[Any]) -> list[Any]:
        """The attempt's end: its ``end`` event, else what the task's future says."""
        watch = asyncio.ensure_future(_settle(future))
        try:
            either: set[asyncio.Future[Any]] = {remote.ended, watch}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if remote.ended.done():
                return remote.ended.result()
            kind, detail = watch.result()
            if kind == "done":  # the result is back: its events were sent before it
                try:
                    return await asyncio.wait_for(asyncio.shield(remote.ended), _END_WAIT_S)
                except TimeoutError:
                    return ["lost", f"the attempt's last output never arrived: {detail}"]
            if kind == "cancelled":  # canceled by a stop before it started: _cancel decides
                return await remote.ended
            if kind == "refused":
                return ["lost", detail]
            where = f"the Dask worker {remote.worker}" if remote.worker else "a Dask worker"
            if remote.worker is None and kind == "error":
                return [
                    "never",
                    f"the attempt's Dask task failed before the command started ({detail}); "
                    "check that harmont-exec (the same version) is installed on the workers",
                ]
            return [
                "lost",
                f"{where} running the attempt went away ({detail}); the command's processes "
                "there are killed by its watcher",
            ]
        finally:
            watch.cancel()

    # --- events from the workers --------------------------------------------------------

    def _on_event(self, event: tuple[float, list[Any]]) -> None:
        message = event[1]
        remote = self._remotes.get(message[0])
        if remote is None:  # an attempt that already ended (e.g. refused after a stop)
            return
        seq = message[1]
        if seq != remote.next_seq:  # one stream per worker keeps them in order; just in case
            remote.early[seq] = message
            return
        while True:
            self._deliver(remote, message)
            remote.next_seq += 1
            following = remote.early.pop(remote.next_seq, None)
            if following is None:
                return
            message = following

    def _deliver(self, remote: _Remote, message: list[Any]) -> None:
        kind = message[2]
        if kind == "out":
            remote.on_output(Stream(message[3]), message[4])
        elif kind == "start":
            remote.worker = message[3]
            remote.on_start()
            if remote.stop_kill is not None:  # stopped while it was starting
                self._signal(remote, remote.stop_kill)
        elif kind == "end" and not remote.ended.done():
            remote.ended.set_result(["end", *message[3:]])

    # --- stopping -----------------------------------------------------------------------

    def _stop(self, remote: _Remote, future: Future[Any], kill: bool) -> None:
        first = remote.stop_kill is None
        remote.stop_kill = kill or bool(remote.stop_kill)
        if remote.ended.done():
            return
        if remote.worker is not None:
            self._signal(remote, kill)
        elif first:
            refusal = self._spawn(remote, self._cancel(remote, future))
            self._refusing.add(refusal)
            refusal.add_done_callback(self._refusing.discard)

    def _signal(self, remote: _Remote, kill: bool) -> None:
        self._spawn(remote, self._signal_after_refusals(remote, kill))

    async def _signal_after_refusals(self, remote: _Remote, kill: bool) -> None:
        """Stop a running attempt, once the attempts stopped before they started (in the same
        cancel: the scheduler stops every job in one go, before this task runs) are refused by
        every worker: stopping a running attempt frees its worker's thread, which would
        otherwise start a waiting attempt of the canceled build."""
        pending = list(self._refusing)
        if pending:
            await asyncio.wait(pending, timeout=_REFUSAL_WAIT_S)
        if remote.worker is None:  # only an attempt a worker started is signalled
            raise InternalError(f"attempt {remote.id!r} was signalled before a worker started it")
        await _ignore_result(
            self.client.run(
                _stop_attempt, remote.id, kill, workers=[remote.worker], on_error="return"
            )
        )

    async def _cancel(self, remote: _Remote, future: Future[Any]) -> None:
        """A stop before the attempt started: cancel its task, and have every worker refuse
        it (one may be starting it now). If one says it runs it, its events end it."""
        await self.client.cancel(future)
        answers = await self.client.run(_stop_attempt, remote.id, False, on_error="return")
        if any(answer in ("running", "finished") for answer in answers.values()):
            return  # its start (then our stop) and its end are on their way
        if not remote.ended.done():
            remote.ended.set_result(["never", "stopped before it started on a worker"])

    def _spawn(self, remote: _Remote, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        remote.tasks.add(task)
        task.add_done_callback(remote.tasks.discard)
        return task


async def _ignore_result(call: Any) -> None:
    # A worker that has gone away cannot be stopped; the attempt's future reports the loss.
    await call


async def _settle(future: Future[Any]) -> tuple[str, str]:
    """How the attempt's Dask task ended, as (kind, detail); never raises but for our own
    cancellation."""
    distributed = _import_distributed()
    try:
        result = await future
    except distributed.client.FutureCancelledError:  # ours (a stop), not this task's cancel
        return "cancelled", "canceled"
    except distributed.scheduler.KilledWorker as exc:
        return "lost", f"KilledWorker: {exc}"
    except Exception as exc:  # the task's own error, raised again here: it becomes the result
        return "error", f"{type(exc).__name__}: {exc}"
    if result[0] == "refused":
        return "refused", str(result[1])
    return "done", "the task finished"


# --- on the worker ---------------------------------------------------------------------------

_lock = threading.Lock()
_running: dict[str, StopRequest] = {}
_finished: OrderedDict[str, None] = OrderedDict()  # recent attempt ids, so a late stop knows
_refused: OrderedDict[str, None] = OrderedDict()  # attempts stopped before they started here
_KEEP = 10_000
_local_runner: LocalProcessRunner | None = None


def _remember(ids: OrderedDict[str, None], attempt_id: str) -> None:
    ids[attempt_id] = None
    if len(ids) > _KEEP:
        ids.popitem(last=False)


def _run_attempt(
    attempt_id: str,
    topic: str,
    command: str,
    cwd: str,
    env: dict[str, str],
    grace_period_s: float,
) -> list[Any]:
    """The Dask task (in a worker thread): run the attempt on the worker's event loop."""
    from distributed import get_worker
    from distributed.utils import sync

    worker = get_worker()
    spec = AttemptSpec(command, Path(cwd), env, grace_period_s)
    result: list[Any] = sync(worker.loop, _run_on_loop, worker, attempt_id, topic, spec)
    return result


async def _run_on_loop(worker: Worker, attempt_id: str, topic: str, spec: AttemptSpec) -> list[Any]:
    global _local_runner
    numbers = itertools.count()

    def send(kind: str, *payload: Any) -> None:
        worker.log_event(topic, [attempt_id, next(numbers), kind, *payload])

    # Claim the attempt before anything runs: if Dask runs this task again after a worker was
    # lost, the claim is there and the command does not start twice.
    claimed = await worker.scheduler.get_metadata(keys=[_META, attempt_id], default=None)
    if claimed is not None:
        return ["refused", f"the attempt already started on {claimed}, which was lost"]
    await worker.scheduler.set_metadata(keys=[_META, attempt_id], value=worker.address)
    with _lock:
        if attempt_id in _refused:
            return ["refused", "stopped before it started"]
        stop = _running[attempt_id] = StopRequest()
    if _local_runner is None:  # one per worker process: its watchdog outlives a killed worker
        _local_runner = LocalProcessRunner()
    orphaned = asyncio.ensure_future(_stop_when_orphaned(worker, _task_key(attempt_id), stop))
    try:
        result = await _local_runner.run(
            spec,
            on_start=lambda: send("start", worker.address, os.getpid()),
            on_output=lambda stream, data: send("out", stream.value, data),
            stop=stop,
        )
    finally:
        orphaned.cancel()
        with _lock:
            del _running[attempt_id]
            _remember(_finished, attempt_id)
    end = [result.reason.value, result.exit_code, result.signal, result.error]
    send("end", *end)
    return ["end", *end]


def _task_key(attempt_id: str) -> str:
    """The Dask key of an attempt's task."""
    return f"harmont-exec-attempt-{attempt_id}"


async def _stop_when_orphaned(worker: Worker, key: str, stop: StopRequest) -> None:
    """Stop the attempt (as a cancel: SIGTERM, grace, SIGKILL) once no client wants its task
    any more: the harmont-exec process that submitted it died (kill -9, a lost machine), so the
    scheduler released the task and nobody will record what it does. Dask itself lets a
    running task go on."""
    while True:
        await asyncio.sleep(ORPHAN_CHECK_S)
        task = worker.state.tasks.get(key)
        if task is None or task.state in ("cancelled", "released", "forgotten"):
            log.warning("dask_attempt_orphaned", task=key, worker=worker.address)
            stop.stop(Reason.CANCELED)
            return


def _stop_attempt(attempt_id: str, kill: bool) -> str:
    """Run by ``Client.run`` on the worker's event loop: stop the attempt if it runs here
    ("running"), else make sure it never starts here ("finished" or "unknown")."""
    with _lock:
        stop = _running.get(attempt_id)
        if stop is None:
            if attempt_id in _finished:
                return "finished"
            _remember(_refused, attempt_id)
            return "unknown"
    # The reason is the client's (it keeps its own StopRequest); only the signals matter here.
    if kill:
        stop.kill(Reason.CANCELED)
    else:
        stop.stop(Reason.CANCELED)
    return "running"
