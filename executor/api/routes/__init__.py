"""The API's routes, one ``APIRouter`` per resource (FastAPI's "bigger applications" layout):
``meta`` (ping), ``organizations`` (and the token's user), ``tokens`` (the user's API tokens),
``pipelines``, ``builds`` (and the build writes), ``jobs``, ``logs`` (a job's raw log),
``artifacts`` and ``live`` (log tokens and the live log stream).

Each handler finds what its path names through ``lookup`` (the tenancy rule), reads the store
from its dependencies (``deps``) in one worker-thread hop, and answers ``wire`` JSON. A write
finds what its path names first, then reads its body (``body``), then writes: to the store, or
through the build service. Handlers
have no docstrings: FastAPI would publish them as the operations' descriptions.
``create_app`` includes the routers in the order of the OpenAPI document.
"""
