"""The read API under load (SPEC §6, reliability): `harmont-exec serve` keeps answering
correctly while four builds of 1,000 jobs record into its store at once (real processes on
127.0.0.1; the longer soak and its figures: `python -m benchmarks.bench_soak`)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_soak import soak_round


def test_soak_api_answers_correctly_while_four_builds_of_1000_jobs_record(tmp_path: Path) -> None:
    result = soak_round(
        tmp_path, builds=4, steps=1000, jobs=2, shape="layered", concurrency=8, timeout=300
    )
    # Every answer was checked as it came (status, job count, states, finished jobs never
    # going down); the runs all passed (soak_round raises otherwise).
    assert result.errors == 0, result.error_samples
    assert result.requests > result.not_yet  # the builds were read while they recorded
    print(
        f"soak: {result.requests} requests, {result.req_per_s} req/s, p99 {result.p99_ms} ms, "
        f"{result.errors} errors, {result.jobs_per_s} jobs/s recorded"
    )
