"""One attempt of one command: spawn, stream its output, stop it, reap it (SPEC §4).

Each attempt runs ``/bin/sh -c COMMAND`` in a new session (its own process group), stdin from
/dev/null, stdout and stderr read as they arrive and handed to ``on_output`` as bytes. When the
scheduler asks it to stop (timeout or cancel), the whole group gets SIGTERM, then SIGKILL after
the grace period. When the shell exits, whatever is left of its group is killed too: no process
of a job outlives it. Reaping is shielded from cancellation. The outcome is a value
(``AttemptResult``), never an exception.

It must not know about jobs, states or the store: the scheduler owns those.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Protocol

import anyio
import structlog

from executor.run.watchdog import MARK_ENV, Watchdog

__all__ = [
    "AttemptResult",
    "AttemptSpec",
    "LocalProcessRunner",
    "OutputSink",
    "ProcessRunner",
    "Reason",
    "StopRequest",
    "Stream",
]

log = structlog.get_logger("executor.run")

_READ_SIZE = 64 * 1024


class Stream(StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"


class Reason(StrEnum):
    """Why an attempt ended."""

    EXITED = "exited"  # the command exited on its own (any status)
    TIMED_OUT = "timed_out"  # stopped because its timeout expired
    CANCELED = "canceled"  # stopped because the build was canceled
    SPAWN_FAILED = "spawn_failed"  # the shell could not be started at all
    EXECUTOR_LOST = "executor_lost"  # the machine running it went away (remote executors)


@dataclass(frozen=True, slots=True)
class AttemptSpec:
    """What to run: the shell command, where, with which complete environment."""

    command: str
    cwd: Path
    env: Mapping[str, str]
    grace_period_s: float = 10.0
    # What the attempt needs of the machine (the step's `resources`): a remote executor asks
    # its scheduler for a worker that has them; the local runner ignores them.
    resources: Mapping[str, float] | None = None


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """How an attempt ended. ``exit_code`` is 128+N when signal N killed the shell."""

    reason: Reason
    exit_code: int | None
    signal: int | None
    started_at: datetime
    finished_at: datetime
    error: str | None = None


class StopRequest:
    """The scheduler's handle to stop a running attempt: ``stop`` (graceful) or ``kill``.

    Runners register callbacks with ``on_stop`` or wait on the ``requested`` / ``killed``
    events (made on first use: most attempts are never stopped, and an event costs more than
    the flag).
    """

    def __init__(self) -> None:
        self.reason: Reason | None = None
        self.stopped = False
        self.killed_now = False
        self._requested: anyio.Event | None = None
        self._killed: anyio.Event | None = None
        self._callbacks: list[Callable[[bool], None]] = []

    @property
    def requested(self) -> anyio.Event:
        """Set once a stop or a kill was requested."""
        if self._requested is None:
            self._requested = anyio.Event()
            if self.stopped:
                self._requested.set()
        return self._requested

    @property
    def killed(self) -> anyio.Event:
        """Set once a kill was requested."""
        if self._killed is None:
            self._killed = anyio.Event()
            if self.killed_now:
                self._killed.set()
        return self._killed

    def on_stop(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(kill)`` on every stop or kill request (at once if one was made)."""
        self._callbacks.append(callback)
        if self.stopped:
            callback(self.killed_now)

    def stop(self, reason: Reason) -> None:
        """SIGTERM the group now, SIGKILL after the grace period. The first reason wins."""
        self._request(reason, kill=False)

    def kill(self, reason: Reason) -> None:
        """SIGKILL the group now (a second interrupt)."""
        self._request(reason, kill=True)

    def _request(self, reason: Reason, *, kill: bool) -> None:
        if self.reason is None:
            self.reason = reason
        self.stopped = True
        if self._requested is not None:
            self._requested.set()
        if kill:
            self.killed_now = True
            if self._killed is not None:
                self._killed.set()
        for callback in self._callbacks:
            callback(kill)


OutputSink = Callable[[Stream, bytes], None]


class ProcessRunner(Protocol):
    """Runs one attempt. The scheduler takes one as a parameter, so tests can pass a fake."""

    async def run(
        self,
        spec: AttemptSpec,
        *,
        on_start: Callable[[], None],
        on_output: OutputSink,
        stop: StopRequest,
    ) -> AttemptResult:
        """Run ``spec``; call ``on_start`` once the process exists (not if it cannot start)."""
        ...


def _now() -> datetime:
    return datetime.now(UTC)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


class LocalProcessRunner:
    """Runs attempts as local subprocesses (the default executor).

    It drives the pipes and the exit through the event loop's reader callbacks (a pidfd for the
    exit), which costs a fraction of a task per pipe: with thousands of short jobs that is what
    keeps harmont-exec close to ninja. It therefore needs anyio's asyncio backend (the default).

    Its first attempt starts a ``Watchdog`` (``watchdog.py``) that kills every job process of
    this runner the moment the process holding it dies, even by ``kill -9``; ``close`` (or the
    runner's garbage collection) ends it, killing any job process still left (a daemon that
    left its job's process group).
    """

    def __init__(self) -> None:
        self._pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Poller] = (
            weakref.WeakKeyDictionary()
        )
        self._watchdog: Watchdog | None = None
        self._no_watchdog = False

    def _mark(self) -> str | None:
        """The mark this runner's job processes carry (its watchdog started on first use)."""
        if self._watchdog is None and not self._no_watchdog:
            try:
                self._watchdog = Watchdog()
            except OSError as exc:
                self._no_watchdog = True
                log.warning(
                    "watchdog_unavailable",
                    error=str(exc),
                    consequence="job processes outlive a killed executor until the next "
                    "harmont-exec command finds its build abandoned",
                )
                return None
            weakref.finalize(self, self._watchdog.close)
        return None if self._watchdog is None else self._watchdog.mark

    def close(self) -> None:
        """End the watchdog: whatever is left of this runner's job processes is killed."""
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None

    def _poller(self, loop: asyncio.AbstractEventLoop) -> _Poller:
        poller = self._pollers.get(loop)
        if poller is None:
            poller = self._pollers[loop] = _Poller(loop)
        return poller

    async def run(
        self,
        spec: AttemptSpec,
        *,
        on_start: Callable[[], None],
        on_output: OutputSink,
        stop: StopRequest,
    ) -> AttemptResult:
        loop = asyncio.get_running_loop()
        started_at = _now()
        mark = self._mark()
        if mark is not None:
            spec = replace(spec, env={**spec.env, MARK_ENV: mark})
        try:
            process = _spawn(spec)
            if self._watchdog is not None:
                self._watchdog.track(process.pid)  # its group: the shell leads it
        except OSError as exc:
            return AttemptResult(
                Reason.SPAWN_FAILED,
                None,
                None,
                started_at,
                _now(),
                error=f"cannot start /bin/sh in {spec.cwd}: {exc.strerror or exc}; check that the "
                "working directory exists and /bin/sh is executable",
            )
        on_start()
        watchdog = self._watchdog
        watch = _Watch(
            loop,
            self._poller(loop),
            process,
            on_output,
            spec.grace_period_s,
            on_reaped=None if watchdog is None else watchdog.untrack,
        )
        stop.on_stop(watch.stop)
        try:
            await watch.exited
            await watch.drained
        finally:
            if not watch.exited.done():  # cancelled from outside: never leave the group
                with anyio.CancelScope(shield=True):
                    watch.stop(True)
                    await watch.exited
            watch.close()
        status = watch.exited.result()
        code = os.waitstatus_to_exitcode(status)
        sig = -code if code < 0 else None
        exit_code = 128 + sig if sig is not None else code
        reason = stop.reason if stop.reason is not None else Reason.EXITED
        return AttemptResult(reason, exit_code, sig, started_at, _now())


@dataclass(frozen=True, slots=True)
class _Process:
    pid: int
    stdout: int  # read ends of the pipes, owned by the watcher
    stderr: int


_devnull: int | None = None


def _spawn(spec: AttemptSpec) -> _Process:
    """Start ``/bin/sh -c COMMAND`` as the leader of a new session, stdin from /dev/null.

    posix_spawn (vfork + exec) is the cheap way, but it cannot change directory; when the job
    runs elsewhere than harmont-exec's own directory, Popen does the chdir.
    """
    global _devnull
    if _devnull is None:
        _devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    argv = ["/bin/sh", "-c", spec.command]
    out_r, out_w = os.pipe()  # close-on-exec; dup2 makes the child's copies inheritable
    err_r, err_w = os.pipe()
    try:
        if str(spec.cwd) == os.getcwd():
            pid = os.posix_spawn(
                "/bin/sh",
                argv,
                spec.env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, _devnull, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
                setsid=True,
            )
        else:
            popen = subprocess.Popen(
                argv,
                stdin=_devnull,
                stdout=out_w,
                stderr=err_w,
                cwd=spec.cwd,
                env=spec.env,
                start_new_session=True,
            )
            popen.returncode = 0  # reaped by the watcher, not by Popen
            pid = popen.pid
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    return _Process(pid, out_r, err_r)


class _Poller:
    """Every attempt's pipes and pidfd in one epoll set, which the event loop watches as one
    file descriptor. Registering with epoll directly costs a system call; registering each fd
    with the event loop (three per attempt) costs several times that in Python. Where there is
    no epoll (not Linux), it is the event loop's own reader registration."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handlers: dict[int, Callable[[], None]] = {}
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        if self._epoll is not None:
            loop.add_reader(self._epoll.fileno(), self._dispatch, self._epoll)
            # Closed with the loop: a poller lives as long as its loop (see LocalProcessRunner).
            weakref.finalize(self, self._epoll.close)

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        if self._epoll is None:
            self._loop.add_reader(fd, handler)
            return
        self._epoll.register(fd, select.EPOLLIN)
        self._handlers[fd] = handler

    def remove(self, fd: int) -> None:
        if self._epoll is None:
            self._loop.remove_reader(fd)
            return
        if self._handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def _dispatch(self, epoll: select.epoll) -> None:
        for fd, _ in epoll.poll(0):
            # A handler may have removed this fd (or a new one may reuse its number, which
            # costs that one a read that finds nothing): look it up at each event.
            handler = self._handlers.get(fd)
            if handler is not None:
                handler()


class _Watch:
    """Event-loop callbacks for one process: its two pipes and its exit (through a pidfd)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        poller: _Poller,
        proc: _Process,
        on_output: OutputSink,
        grace_period_s: float,
        on_reaped: Callable[[int], None] | None = None,
    ) -> None:
        self.loop = loop
        self.on_reaped = on_reaped  # told the group's id once it is killed and reaped
        self.poller = poller
        self.proc = proc
        self.pgid = proc.pid  # a new session: the shell leads its own process group
        self.on_output = on_output
        self.grace_period_s = grace_period_s
        self.exited: asyncio.Future[int] = loop.create_future()
        self.drained: asyncio.Future[None] = loop.create_future()
        self.timers: list[asyncio.TimerHandle] = []
        self.streams = {proc.stdout: Stream.STDOUT, proc.stderr: Stream.STDERR}
        for fd in self.streams:
            os.set_blocking(fd, False)
            poller.add(fd, partial(self._read, fd))
        try:
            self.pidfd: int | None = os.pidfd_open(proc.pid)
        except OSError:  # no pidfd (old kernel): poll for the exit instead
            self.pidfd = None
            self.timers.append(loop.call_later(0.01, self._poll_exit))
        else:
            poller.add(self.pidfd, self._check_exit)

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        if data:
            self.on_output(self.streams[fd], data)
            return
        self.poller.remove(fd)
        del self.streams[fd]
        if not self.streams and not self.drained.done():
            self.drained.set_result(None)

    def _check_exit(self) -> None:
        # WNOWAIT: while the shell is a zombie its pid (the group id) cannot be reused, so the
        # group can still be killed safely: nothing of a job outlives it, and killing the rest
        # closes the pipes they inherited. Then reap.
        if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
            return
        if self.pidfd is not None:
            self.poller.remove(self.pidfd)
        _signal_group(self.pgid, signal.SIGKILL)
        _, status = os.waitpid(self.proc.pid, 0)
        if self.on_reaped is not None:  # at once: the number may be reused from now on
            self.on_reaped(self.pgid)
        for timer in self.timers:
            timer.cancel()
        if not self.exited.done():
            self.exited.set_result(status)
        if self.streams:  # only a daemon that left the group can still hold a pipe
            self.timers.append(self.loop.call_later(max(self.grace_period_s, 1.0), self._give_up))

    def _poll_exit(self) -> None:
        self._check_exit()
        if not self.exited.done():
            self.timers.append(self.loop.call_later(0.01, self._poll_exit))

    def _give_up(self) -> None:
        for fd in list(self.streams):
            self.poller.remove(fd)
        self.streams.clear()
        if not self.drained.done():
            self.drained.set_result(None)

    def stop(self, kill: bool) -> None:
        if self.exited.done():
            return
        if kill:
            _signal_group(self.pgid, signal.SIGKILL)
            return
        _signal_group(self.pgid, signal.SIGTERM)
        self.timers.append(
            self.loop.call_later(self.grace_period_s, _signal_group, self.pgid, signal.SIGKILL)
        )

    def close(self) -> None:
        self._give_up()
        for timer in self.timers:
            timer.cancel()
        if self.pidfd is not None:
            if not self.exited.done():
                self.poller.remove(self.pidfd)
            os.close(self.pidfd)
        os.close(self.proc.stdout)
        os.close(self.proc.stderr)
