"""The exception hierarchy of harmont-exec, and nothing else.

Every error the package raises on purpose is an ``ExecutorError`` with a stable ``code`` (the
same snake_case word the CLI prints and, later, the API returns). Library exceptions (pydantic,
yaml, networkx, database drivers) are translated into these at module boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = [
    "BuildFileError",
    "CycleError",
    "Diagnostic",
    "ExecutorError",
    "InternalError",
    "InvalidTransitionError",
    "RecordFailedError",
    "StoreError",
    "StoreNotFoundError",
    "StoreReadOnlyError",
]

Loc = tuple[str | int, ...]


class ExecutorError(Exception):
    """Base of every error harmont-exec raises on purpose."""

    code = "executor_error"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem found in a build file.

    ``loc`` is the path of the offending value inside the normalized build (``("steps", 3,
    "depends_on", 0)``); the loader turns it into ``file:line:column`` of the source.
    """

    message: str
    loc: Loc = ()
    step_key: str | None = None
    file: str | None = None
    line: int | None = None
    column: int | None = None

    def located(self, file: str, line: int | None, column: int | None) -> Diagnostic:
        return replace(self, file=file, line=line, column=column)

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        step = f"step {self.step_key!r}: " if self.step_key is not None else ""
        return f"{where}{step}{self.message}"


class BuildFileError(ExecutorError):
    """A build file (or an in-memory build spec) is invalid; carries every problem found."""

    code = "invalid_build_file"

    def __init__(self, diagnostics: list[Diagnostic] | tuple[Diagnostic, ...]) -> None:
        if not diagnostics:
            raise ValueError("BuildFileError needs at least one diagnostic")
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics)
        super().__init__(str(self))

    @classmethod
    def single(cls, message: str, *, loc: Loc = (), step_key: str | None = None) -> BuildFileError:
        return cls([Diagnostic(message, loc=loc, step_key=step_key)])

    def with_diagnostics(self, diagnostics: list[Diagnostic]) -> BuildFileError:
        """The same error (same class and extra fields) with re-located diagnostics."""
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        clone.diagnostics = tuple(diagnostics)
        Exception.__init__(clone, str(clone))
        return clone

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self.diagnostics)


class CycleError(BuildFileError):
    """The dependencies form a cycle; ``cycle`` lists it, first node repeated at the end."""

    code = "dependency_cycle"

    def __init__(self, cycle: list[str], diagnostic: Diagnostic) -> None:
        self.cycle = tuple(cycle)
        super().__init__([diagnostic])


class InternalError(ExecutorError):
    """A bug in harmont-exec: an invariant was broken. Please report it."""

    code = "internal_error"


class InvalidTransitionError(InternalError):
    """A job or build was asked to make a state change the transition table does not allow."""

    code = "invalid_transition"


class StoreError(ExecutorError):
    """The record could not be read or written (bad URL, disk full, newer schema, ...)."""

    code = "store_error"


class StoreNotFoundError(StoreError):
    """A command that only reads the record was pointed at a SQLite file that does not exist
    (a mistyped --db); the CLI exits 2, as for other bad arguments."""

    code = "store_not_found"


class StoreReadOnlyError(StoreError):
    """A write was refused because the store is read-only (its disk, or its file): reading
    still works; read commands go on without the recovery writes."""

    code = "store_read_only"


class RecordFailedError(StoreError):
    """A build was stopped because its record could not be written (a full disk, a file
    turned read-only, a database gone): its number and pipeline, for the message and the
    summary (read back from what the record holds)."""

    code = "record_failed"

    def __init__(self, message: str, *, build_id: str, number: int, org: str, pipeline: str):
        super().__init__(message)
        self.build_id = build_id
        self.number = number
        self.org = org
        self.pipeline = pipeline
