r"""No job process outlives its executor by more than a moment, even a ``kill -9`` of it.

Each job runs in a process group of its own, which a ``kill -9`` of the executor does not
reach, and a ``posix_spawn``ed child cannot ask the kernel for a parent-death signal. So every
executor (a ``LocalProcessRunner``: a ``run``, a ``serve``, a Dask worker) starts one watchdog:
this file, run as ``python -I -S watchdog.py MARK`` in a session of its own, its standard
input the read end of a pipe whose only write end the executor holds. Every job process gets
``HARMONT_EXECUTOR_ID=MARK`` in its environment (and passes it to its children). The watchdog
reads its pipe until end of file, which comes when the executor is gone, however it went
(or when it closes the pipe at its end); the executor also writes each job's process group
down it as the job starts and ends. At the end the watchdog SIGKILLs every job group still
open and every process whose environment carries the mark, with its process group, until none
is left. TERM traps, backgrounded grandchildren, a job that ``exec``\ s into ``env -i`` and
daemons that left the job's group all go; only a process that both left the group and has no
mark (it cleared its environment, or overwrote it with a long process title) escapes (the next
harmont-exec command that finds the build abandoned kills what carries its jobs'
``HARMONT_JOB_ID``).

The watchdog ignores the signals a terminal or a kill of the executor's group sends (it is in
another session anyway), so it outlives the executor by the moment it needs. Run as a file,
it imports nothing from harmont-exec: only the standard library (``Watchdog`` below is the
executor's handle on it, used by ``process.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

__all__ = ["MARK_ENV", "Watchdog", "kill_marked"]

MARK_ENV = "HARMONT_EXECUTOR_ID"
"""The environment variable that marks every job process of one executor."""

_IGNORED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGPIPE", "SIGTSTP", "SIGTTIN", "SIGTTOU")
_ROUNDS = 50  # scans until nothing is found (a dying job may fork meanwhile)


def _marked(marker: bytes) -> Iterator[int]:
    """Pids of the processes (not zombies: their environment reads empty) carrying
    ``marker`` (``NAME=VALUE``) in their environment; this user's only, as /proc allows."""
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                data = environ.read()
        except OSError:
            continue  # gone, or not ours
        if marker in data.split(b"\0"):
            yield int(entry)


def kill_marked(mark: str) -> int:
    """SIGKILL every process carrying ``HARMONT_EXECUTOR_ID=mark``, and its process group,
    until none is left; return how many were found."""
    marker = f"{MARK_ENV}={mark}".encode()
    own_group = os.getpgrp()
    found = 0
    for _ in range(_ROUNDS):
        pids = list(_marked(marker))
        if not pids:
            break
        found += len(pids)
        for pid in pids:
            try:
                group = os.getpgid(pid)
                if group != own_group:
                    os.killpg(group, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)  # let the kernel finish them before the next look
    return found


class Watchdog:
    """The executor's handle: starts the watchdog, gives the mark job processes carry, and
    closes the pipe (``close``) at the executor's end, when the watchdog kills any job
    process left (a daemon that left its group)."""

    def __init__(self) -> None:
        self.mark = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k != MARK_ENV}
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__, self.mark],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a kill of the executor's group does not reach it
            close_fds=True,
        )
        if self._proc.stdin is None:  # stdin=PIPE always gives one
            raise OSError("the watchdog was started without its pipe")
        self._fd = self._proc.stdin.fileno()
        os.set_blocking(self._fd, False)

    def track(self, pgid: int) -> None:
        """A job's process group exists (its leader was just spawned)."""
        self._send(b"+%d\n" % pgid)

    def untrack(self, pgid: int) -> None:
        """A job's process group is gone (killed, its leader reaped): never kill that number."""
        self._send(b"-%d\n" % pgid)

    def _send(self, line: bytes) -> None:
        # A write of a few bytes to a pipe the watchdog drains: it never waits in practice;
        # if the pipe were ever full, the group is still found by the job's mark.
        stdin = self._proc.stdin
        if stdin is None or stdin.closed:
            return
        try:
            os.write(self._fd, line)
        except BlockingIOError:
            pass
        except OSError:  # the watchdog is gone (killed): the mark is all there is
            stdin.close()

    def close(self) -> None:
        """The executor's end: the watchdog kills what is left of its jobs, then exits."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass  # it goes on by itself; nothing here must wait longer


def main() -> None:
    """The watchdog process: learn the job groups as they come and go (``+PGID`` / ``-PGID``
    lines), wait for the executor's end, then kill those groups and every marked process."""
    for name in _IGNORED:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    groups: set[int] = set()
    pending = b""
    while True:
        try:
            data = os.read(0, 65536)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break  # end of file: the executor closed its end or is gone
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if line[:1] == b"+":
                groups.add(int(line[1:]))
            elif line[:1] == b"-":
                groups.discard(int(line[1:]))
    own = os.getpgrp()
    for group in groups - {own}:  # a job whose process cleared its environment is still here
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
    kill_marked(sys.argv[1])


if __name__ == "__main__":
    main()
