"""The ``harmont-exec`` command line: the only code that parses argv or prints.

Exit codes (SPEC §4): ``run`` exits 0 passed, 1 failed, 124 build timeout, 130 canceled; every
command exits 2 for an invalid build file or usage. Errors print on stderr without a traceback.
Commands live in one module each (``common`` holds the group and the shared options);
importing them registers them on the group.
"""

from __future__ import annotations

import sys

from executor.cli import artifacts, browse, plan, run, serve, submit, verify  # noqa: F401  (registers the commands)
from executor.cli.common import EXIT_INVALID, cli
from executor.cli.output import guard_standard_streams, output_lost

__all__ = ["EXIT_INVALID", "cli", "main"]


# Commands whose point is their output: if stdout could not be written (a full disk under a
# redirect), they fail. The others (run, resume, retry) exit with their build's status.
_READERS = frozenset({"builds", "jobs", "logs", "artifacts", "plan", "token", "verify"})


def main() -> None:
    guard_standard_streams()  # a closed stdout or stderr never touches a build
    try:
        cli(prog_name="harmont-exec")
    except SystemExit as done:
        lost = output_lost()
        if lost is not None:
            command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
            print(f"harmont-exec: the output could not be written: {lost}", file=sys.stderr)
            if command in _READERS and done.code in (0, None):
                raise SystemExit(1) from None
        raise
