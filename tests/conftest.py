"""Shared test settings: Hypothesis never uses wall-clock deadlines (this machine is noisy)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from executor.store import Store

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "ci",
    parent=settings.get_profile("default"),
    derandomize=False,
    max_examples=100,
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


import pytest  # noqa: E402


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def absent(message: str, *, allow_module_level: bool = False) -> NoReturn:
    """Something a test needs is not here (a server, a package, a file): skip, with
    ``message`` saying what and how to get it; under CI (``CI`` set to anything) fail instead,
    so that CI never passes without having tested it."""
    if os.environ.get("CI"):
        pytest.fail(f"under CI nothing is skipped: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=allow_module_level)


# --- stores: every store test runs on SQLite and on PostgreSQL ----------------------------------

PG_ENV = "HARMONT_TEST_POSTGRESQL"
"""A PostgreSQL server URL for the tests (a superuser; each test gets its own schema).
``.ci/run`` starts a throwaway server and sets it; locally: eval "$(bash .ci/postgres start)"."""


@pytest.fixture(scope="session")
def postgresql_server() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        message = (
            f"{PG_ENV} is not set, so the PostgreSQL store is not tested; start a throwaway "
            'server with: eval "$(bash .ci/postgres start)"'
        )
        if os.environ.get("CI"):
            pytest.fail(f"under CI every backend is tested: {message}")
        pytest.skip(message)
    return url


def with_schema(url: str, schema: str) -> str:
    """``url`` whose connections use ``schema`` (libpq's ``options``)."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


@pytest.fixture
def postgresql_url(
    postgresql_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """A PostgreSQL store URL of its own (a new schema, dropped afterwards); artifact files and
    `serve`'s build workspaces go under tmp_path (HARMONT_ARTIFACTS, HARMONT_WORKSPACES,
    inherited by child processes)."""
    import psycopg

    schema = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgresql_server, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    monkeypatch.setenv("HARMONT_ARTIFACTS", str(tmp_path / "pg-artifacts"))
    monkeypatch.setenv("HARMONT_WORKSPACES", str(tmp_path / "pg-workspaces"))
    yield with_schema(postgresql_server, schema)
    with psycopg.connect(postgresql_server, autocommit=True) as admin:
        admin.execute("SET lock_timeout = '10s'")
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A new, open SQLite store in tmp_path (tests that must run on every backend take
    ``store_url`` instead; tests/test_store.py's own ``store`` does)."""
    from executor.store import open_store

    with open_store(tmp_path / "db" / "harmont.db") as opened:
        yield opened


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty store of each backend: a SQLite file path, or a PostgreSQL URL."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgresql_url"))
    return str(tmp_path / "db" / "harmont.db")


# --- Harmont's API document: the wire's reference --------------------------------------------

HARMONT_OPENAPI = Path(__file__).resolve().parent / "harmont-openapi.json"
"""The excerpt of Harmont's OpenAPI document the contract names (SPEC §6), kept with the tests
so that the conformance tests always run; ``HARMONT_OPENAPI`` points them at another copy."""


@pytest.fixture(scope="session")
def harmont_openapi() -> dict[str, Any]:
    path = Path(os.environ.get("HARMONT_OPENAPI") or HARMONT_OPENAPI)
    document: dict[str, Any] = json.loads(path.read_text())
    return document
