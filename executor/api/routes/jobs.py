"""A build's jobs (in topological order), one job, and a job's attempts."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from executor.api import models, wire
from executor.api.deps import Caller, StoreDep
from executor.api.errors import documented
from executor.api.lookup import build_of, job_of, read
from executor.api.middleware import HeadRouter
from executor.api.paths import JOB, JOBS
from executor.store import AttemptRow, JobText, Store, TokenRow

__all__ = ["router"]

router = HeadRouter()


@router.get(
    JOBS,
    tags=["jobs"],
    operation_id="listJobs",
    summary="A build's jobs, in topological order",
    **documented(models.JobList),
)
async def jobs(
    org: str, pipeline: str, number: int, store: StoreDep, token: Caller
) -> JSONResponse:
    rows = await read(_jobs, store, token, org, pipeline, number)
    return JSONResponse({"data": [wire.job_json(j) for j in rows]})


def _jobs(store: Store, token: TokenRow, org: str, pipeline: str, number: int) -> list[JobText]:
    # Read as text: the jobs go out as stored, with nothing parsed on the way.
    return store.list_jobs_text(build_of(store, token, org, pipeline, number).id)


@router.get(
    JOB,
    tags=["jobs"],
    operation_id="getJob",
    summary="A job",
    **documented(models.Job),
)
async def job(
    org: str, pipeline: str, number: int, job_id: str, store: StoreDep, token: Caller
) -> JSONResponse:
    row = await read(job_of, store, token, org, pipeline, number, job_id)
    return JSONResponse(wire.job_json(row))


@router.get(
    f"{JOB}/attempts",
    tags=["jobs"],
    operation_id="listJobAttempts",
    summary="A job's attempts (extension)",
    **documented(models.AttemptList, openapi_extra={"x-harmont-extension": True}),
)
async def attempts(
    org: str, pipeline: str, number: int, job_id: str, store: StoreDep, token: Caller
) -> JSONResponse:
    rows = await read(_attempts, store, token, org, pipeline, number, job_id)
    return JSONResponse({"data": [wire.attempt_json(a) for a in rows]})


def _attempts(
    store: Store, token: TokenRow, org: str, pipeline: str, number: int, job_id: str
) -> list[AttemptRow]:
    return store.list_attempts(job_of(store, token, org, pipeline, number, job_id).id)
