"""Who runs a build, whether it still does, and clearing up after one that does not (SPEC §5).

A build records its executor: host name, pid, and on Linux an identity ``boot_id/pid/start``
(the kernel's boot id and the process's start time in clock ticks, from /proc), which a reused
pid or a reboot cannot fake. On the executor's own host that identity decides at once whether
it is alive; a build recorded on another host (a shared store) is judged by its heartbeat, and
only as lost when the heartbeat is older than ``LOST_AFTER_S``: a live build elsewhere is never
touched.

The processes of a lost build's jobs outlive their executor (each job runs in its own process
group, which a kill -9 of the executor does not reach). Every job process carries its job's id
in its environment (``HARMONT_JOB_ID``), so whoever finishes a lost build on that host finds
them in /proc and SIGKILLs them and their groups: ``kill_job_processes``.

No SQL here: ``Store.recover_lost_builds`` uses these to decide and to clear up.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Collection
from pathlib import Path

__all__ = [
    "HEARTBEAT_S",
    "LOST_AFTER_S",
    "executor_alive",
    "kill_job_processes",
    "process_identity",
]

HEARTBEAT_S = 5.0
"""How often a running build records that its executor is alive."""
LOST_AFTER_S = 300.0
"""A build recorded on another host is lost only when its heartbeat is this old."""

_PROC = Path("/proc")


def _boot_id() -> str | None:
    try:
        return (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    """The process's start time after boot in clock ticks (field 22 of /proc/PID/stat); None
    if there is no such process, or only its zombie (dead, not yet reaped by its parent)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def process_identity(pid: int | None = None) -> str | None:
    """``boot_id/pid/start`` of a process (default: this one); None where /proc is missing."""
    pid = os.getpid() if pid is None else pid
    boot, start = _boot_id(), _start_ticks(pid)
    return None if boot is None or start is None else f"{boot}/{pid}/{start}"


def executor_alive(identity: str | None, pid: int | None) -> bool | None:
    """Whether the executor recorded as ``identity`` (or, lacking one, ``pid``) on THIS host
    is still running: True, False, or None when it cannot be told."""
    if identity is not None:
        boot, _, rest = identity.partition("/")
        recorded_pid, _, start = rest.partition("/")
        if _boot_id() is None:
            return None
        if boot != _boot_id():
            return False  # the machine rebooted since: every process of that boot is gone
        return _start_ticks(int(recorded_pid)) == start
    if pid is None:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return None  # a process with that pid exists, but it may be another one


def kill_job_processes(job_ids: Collection[str]) -> int:
    """SIGKILL every process (and its process group) whose environment says it belongs to one
    of ``job_ids``; return how many processes were found. Only this user's processes can be
    read and killed; the executor's own group is never signalled."""
    if not job_ids:
        return 0
    wanted = {f"HARMONT_JOB_ID={job_id}".encode() for job_id in job_ids}
    own_group = os.getpgrp()
    found = 0
    try:
        entries = list(_PROC.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone, or not ours
        if wanted.isdisjoint(environ.split(b"\0")):
            continue
        pid = int(entry.name)
        found += 1
        with contextlib.suppress(OSError):
            group = os.getpgid(pid)
            if group != own_group:
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return found
