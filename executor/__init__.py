"""harmont-exec: plan and run CI builds as DAGs of shell jobs.

The public API, re-exported from the modules that own it::

    import executor

    plan = executor.load_plan("build.yaml")      # validate + order; raises BuildFileError
    for level in plan.levels: ...
    frontier = plan.frontier()                    # graphlib-like: ready() / done(key, state)

Hypothesis strategies for your own tests live in ``executor.testing``. ``DaskProcessRunner``
(``open_dask_runner``) runs attempts on a Dask cluster; it imports ``distributed`` only when
opened (``pip install 'harmont-exec[dask]'``).
"""

from executor.errors import (
    BuildFileError,
    CycleError,
    Diagnostic,
    ExecutorError,
    InternalError,
    InvalidTransitionError,
    StoreError,
)
from executor.load import CLOUD_FIELDS, load_build, load_plan, parse_build_text, plan_build_text
from executor.model import (
    Backoff,
    BuildSpec,
    RetryPolicy,
    SoftFailPolicy,
    StepSpec,
    WaitSpec,
    parse_build_spec,
)
from executor.plan import Decision, Edge, EdgeKind, Frontier, Plan, Readiness, Settled, build_plan
from executor.run.build import resume_build, retry_build, run_build, run_build_sync
from executor.run.dask import DaskProcessRunner, open_dask_runner
from executor.run.results import BuildResult, JobResult, RunOptions
from executor.states import (
    TRANSITIONS,
    BuildState,
    Event,
    JobState,
    JobStatus,
    roll_up,
    transition,
)

__version__ = "0.1.0"

__all__ = [
    "CLOUD_FIELDS",
    "TRANSITIONS",
    "Backoff",
    "BuildFileError",
    "BuildResult",
    "BuildSpec",
    "BuildState",
    "CycleError",
    "DaskProcessRunner",
    "Decision",
    "Diagnostic",
    "Edge",
    "EdgeKind",
    "Event",
    "ExecutorError",
    "Frontier",
    "InternalError",
    "InvalidTransitionError",
    "JobResult",
    "JobState",
    "JobStatus",
    "Plan",
    "Readiness",
    "RetryPolicy",
    "RunOptions",
    "Settled",
    "SoftFailPolicy",
    "StepSpec",
    "StoreError",
    "WaitSpec",
    "__version__",
    "build_plan",
    "load_build",
    "load_plan",
    "open_dask_runner",
    "parse_build_spec",
    "parse_build_text",
    "plan_build_text",
    "resume_build",
    "retry_build",
    "roll_up",
    "run_build",
    "run_build_sync",
    "transition",
]
