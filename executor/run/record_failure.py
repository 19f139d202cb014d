"""When a build's record cannot be written: the error its run ends with, and the cut logs' note.

The scheduler stops the build at the first write the store refuses (or when the store's disk
fills and its reserve takes the last writes); at the end it raises one of the
``RecordFailedError``s made here, whose message says what happened and how to resume. Only
messages and the courtesy lines in cut logs: the scheduler decides when.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from executor.errors import ErrorCode, RecordFailedError, StoreError
from executor.store import CreatedBuild, Store

__all__ = ["disk_full_error", "mark_cut_logs", "write_failed_error"]


def write_failed_error(build: CreatedBuild, exc: StoreError) -> RecordFailedError:
    """A write was refused (``exc``): the build was stopped there."""
    return _record_failed(
        build,
        f"{exc}. Build #{build.number} was stopped there: its running jobs "
        "were stopped and the others canceled; the record keeps everything "
        "written before the failure. Once that is fixed, any harmont-exec command "
        f"marks the build abandoned, and {_resume_hint(build)} runs its unfinished "
        "jobs again",
    )


def disk_full_error(
    build: CreatedBuild, trouble: StoreError | None, dropped: Mapping[str, int]
) -> RecordFailedError:
    """The disk filled (``trouble``) and the build was recorded as stopped; ``dropped``: the
    bytes of each job's output (by step key) that could not be recorded."""
    lost = (
        " (not recorded, the output written after the disk filled: "
        + ", ".join(f"{n} bytes of {key!r}" for key, n in dropped.items())
        + ")"
        if dropped
        else ""
    )
    return _record_failed(
        build,
        f"{trouble}. Build #{build.number} was stopped and recorded as "
        "stopped: its running jobs were stopped, the others canceled "
        f"({ErrorCode.RECORD_FAILED}), and everything shown is in the record{lost}. Free "
        f"space there, then {_resume_hint(build)} runs its unfinished jobs again",
    )


def mark_cut_logs(store: Store, cuts: Sequence[tuple[str, int, int]]) -> None:
    """Say in each cut log itself that its job's output after that point is missing. ``cuts``:
    (job id, its attempts, the bytes of its output dropped)."""
    at = datetime.now(UTC)
    for job_id, attempts, size in cuts:
        line = (
            f"[harmont-exec] the record's disk was full: {size} bytes of this job's output "
            "after this point were not recorded\n"
        ).encode()
        store.append_log(job_id, max(attempts, 1), "meta", line, at=at)
    try:
        store.flush()
    except StoreError:
        pass  # the message at the end says it; these lines are a courtesy


def _resume_hint(build: CreatedBuild) -> str:
    org = "" if build.org == "local" else f" --org {build.org}"
    return f"`harmont-exec resume {build.number} --pipeline {build.pipeline}{org}`"


def _record_failed(build: CreatedBuild, message: str) -> RecordFailedError:
    return RecordFailedError(
        message,
        build_id=build.id,
        number=build.number,
        org=build.org,
        pipeline=build.pipeline,
    )
