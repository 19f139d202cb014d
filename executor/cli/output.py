"""Printing that can never touch a build: standard streams that may be closed or go away.

``harmont-exec run FILE | head`` closes the pipe after a line; a terminal can go away; a CI
runner may start the command with stderr closed. None of that may stop a build, leave its
record unfinished, or print a traceback: the build runs to its end, is recorded, and exits
with its usual status. ``guard_standard_streams`` (called first thing by ``main``) makes sure
file descriptors 0-2 are open (else the first file the store opens would become "stderr" and
a log line would be written into the database), and wraps ``sys.stdout`` and ``sys.stderr``
so that a write that fails because the reader is gone (EPIPE, EIO) quietly turns the stream
into /dev/null, at the descriptor too, so nothing later (rich, click, structlog, the
interpreter's exit flush) fails either.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import sys
from typing import Any, TextIO

__all__ = ["GuardedStream", "guard_standard_streams", "output_lost"]

_GONE = frozenset({errno.EPIPE, errno.EIO, errno.ENXIO, errno.EBADF, errno.ENOSPC, errno.EDQUOT})
"""A write failing so means nobody will read what follows: the reader is gone (EPIPE), the
terminal went away (EIO, ENXIO), the descriptor is not there, or the file it goes to is on a
full disk (ENOSPC, EDQUOT)."""


def _open_missing_descriptors() -> None:
    """Open /dev/null on each of 0, 1, 2 that is closed."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # the lowest free number is taken: it is fd, unless a lower is free
                os.dup2(null, fd)
                os.close(null)


class GuardedStream(io.TextIOBase):
    """A text stream over another that turns into /dev/null the first time writing to it
    fails because whoever read it is gone. ``gone`` says whether that happened."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self.gone = False
        self.why: int | None = None  # the errno that ended it

    def _drop(self, why: int | None) -> None:
        self.gone = True
        self.why = why
        try:  # later writes by anyone (a C library, the exit flush) go nowhere too
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def write(self, text: str) -> int:
        if self.gone:
            return len(text)
        try:
            return self._stream.write(text)
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            self._drop(exc.errno)
            return len(text)

    def flush(self) -> None:
        if self.gone:
            return
        try:
            self._stream.flush()
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            self._drop(exc.errno)

    def isatty(self) -> bool:
        return not self.gone and self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._stream, "encoding", "utf-8") or "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._stream, "errors", None)

    @property
    def buffer(self) -> Any:
        """The binary stream under it (``harmont-exec logs`` writes the log's bytes)."""
        return getattr(self._stream, "buffer", None)


def _block(fd: int) -> None:
    """Make writes to ``fd`` wait instead of failing half-done (a CI runner may hand over a
    non-blocking pipe, on which Python drops what does not fit): a pipe or a terminal is
    reopened as a description of our own (``/proc/self/fd``), so the caller's flags on the
    one it shares stay as they are."""
    try:
        if os.get_blocking(fd):
            return
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            return  # a regular file never blocks; a socket cannot be reopened
        fresh = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    os.dup2(fresh, fd)
    os.close(fresh)


def output_lost() -> str | None:
    """Why stdout could not be written, if it could not and not because its reader left on
    purpose (``| head``): for a command whose output is the point, an error."""
    stream = sys.stdout
    if isinstance(stream, GuardedStream) and stream.gone and stream.why != errno.EPIPE:
        return os.strerror(stream.why) if stream.why is not None else "it went away"
    return None


def guard_standard_streams() -> None:
    """See the module docstring. Idempotent."""
    _open_missing_descriptors()
    for fd in (1, 2):
        _block(fd)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if isinstance(stream, GuardedStream):
            continue
        if stream is None:  # the descriptor was closed when Python started
            stream = open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        setattr(sys, name, GuardedStream(stream))
