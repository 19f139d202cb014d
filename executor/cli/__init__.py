"""The ``harmont-exec`` command line: the only code that parses argv or prints.

Exit codes (SPEC §4): ``run`` exits 0 passed, 1 failed, 124 build timeout, 130 canceled; every
command exits 2 for an invalid build file or usage. Errors print on stderr without a traceback.
Commands live in one module each (``common`` holds the group, ``plan`` and the shared options);
importing them registers them on the group.
"""

from __future__ import annotations

from executor.cli import artifacts, record, run, serve  # noqa: F401  (registers the commands)
from executor.cli.common import EXIT_INVALID, cli
from executor.cli.output import guard_standard_streams

__all__ = ["EXIT_INVALID", "cli", "main"]


def main() -> None:
    guard_standard_streams()  # a closed stdout or stderr never touches a build
    cli(prog_name="harmont-exec")
