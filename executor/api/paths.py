"""The API's URL paths (SPEC §6): its prefix and each resource's path, written once.

Routes are declared on these paths and messages name them; nothing else lives here.
"""

from __future__ import annotations

__all__ = [
    "API_PREFIX",
    "API_TOKEN",
    "API_TOKENS",
    "BUILD",
    "BUILDS",
    "BUILD_EVENTS",
    "JOB",
    "JOBS",
    "LIVE_LOG",
    "ORGANIZATION",
    "ORGANIZATIONS",
    "PIPELINE",
    "PIPELINES",
    "USER",
]

API_PREFIX = "/api/v0"
ORGANIZATIONS = f"{API_PREFIX}/organizations"
ORGANIZATION = f"{ORGANIZATIONS}/{{org}}"
PIPELINES = f"{ORGANIZATION}/pipelines"
PIPELINE = f"{PIPELINES}/{{pipeline}}"
BUILDS = f"{PIPELINE}/builds"
BUILD = f"{BUILDS}/{{number}}"
JOBS = f"{BUILD}/jobs"
JOB = f"{JOBS}/{{job_id}}"
USER = f"{API_PREFIX}/user"
API_TOKENS = f"{USER}/api-tokens"
API_TOKEN = f"{API_TOKENS}/{{id}}"
LIVE_LOG = "/v0/jobs/{job_id}/logs"
"""The live log stream: Harmont serves it outside ``API_PREFIX``."""
BUILD_EVENTS = "/v0/builds/{build_id}/events"
"""A build's live state changes **(extension)**: beside the log stream, authorised the same way."""
