"""The build queue `serve` runs (SPEC §6.3): submit, cancel, retry, restart; uses run + store.

``BuildService`` (``service``) records what the API's write routes send and runs it from a
queue kept in the store (``queue``), each build in its own workspace (``workspace``), its
source tarball unpacked safely (``source``). This package re-exports the public names and
holds no logic.
"""

from __future__ import annotations

from executor.service.queue import QUEUE_POLL_S, RunnerFactory, local_runner
from executor.service.service import (
    UNPACKED_PER_UPLOAD,
    BuildService,
    Submission,
    SubmitRequest,
    plan_submission,
)
from executor.service.source import MAX_MEMBERS, unpack_source
from executor.service.workspace import WORKSPACES_ENV, workspace_path, workspaces_for

__all__ = [
    "MAX_MEMBERS",
    "QUEUE_POLL_S",
    "UNPACKED_PER_UPLOAD",
    "WORKSPACES_ENV",
    "BuildService",
    "RunnerFactory",
    "Submission",
    "SubmitRequest",
    "local_runner",
    "plan_submission",
    "unpack_source",
    "workspace_path",
    "workspaces_for",
]
