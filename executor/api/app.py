"""The API: ``create_app(db)`` serves a store in Harmont's wire format (SPEC §6), and, given a
build service, runs the builds it is sent (SPEC §6.3).

``create_app`` assembles the app and owns nothing else: the store, the live log settings, the
build service and the upload limit on ``app.state`` (the routes get them through ``deps``),
the middleware (``middleware``), the exception handlers (``errors``) and one router per
resource (``routes``). Every handler is async and reads the store in a worker thread, so a
slow read never blocks the event loop; the store's reads see only committed data, so a build
that ``harmont-exec run`` is recording shows its live state. The build writes go to the
service (``executor.api.service``: the API never imports the runner); organizations,
pipelines and tokens are written to the store by the routes. Auth is a Bearer token (see
``harmont-exec token``); a token limited to some organizations gets, for every other one, the
same 404 as for something that does not exist (``lookup``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI

from executor.api.body import REQUEST_MODELS
from executor.api.errors import EXCEPTION_HANDLERS
from executor.api.live import LiveLog
from executor.api.middleware import (
    STORE_RETRY_AFTER_S,
    CorsMiddleware,
    HeadMiddleware,
    RequestIdMiddleware,
)
from executor.api.paths import API_PREFIX
from executor.api.routes import (
    artifacts,
    builds,
    jobs,
    live,
    logs,
    meta,
    organizations,
    pipelines,
    tokens,
)
from executor.api.service import BuildService
from executor.store import Store, open_store

__all__ = ["API_PREFIX", "STORE_RETRY_AFTER_S", "create_app"]

log = logging.getLogger("executor.api")


def create_app(
    db: str | Path | None = None,
    *,
    store: Store | None = None,
    heartbeat_s: float = 15.0,
    poll_s: float = 0.1,
    closing: threading.Event | None = None,
    recover_every_s: float | None = None,
    cors_origins: Sequence[str] = (),
    service: BuildService | None = None,
    max_upload_bytes: int = 100 << 20,
) -> FastAPI:
    """The ASGI app over the store at ``db`` (path or URL, default as for ``run``; opened now,
        so a bad path fails here, and closed when the app shuts down), or over an already open
        ``store`` (left open: its owner closes it). ``heartbeat_s`` and ``poll_s`` tune the live
        log stream (``live``): a comment after that long without an event, and how often it reads
        the store for new chunks; once ``closing`` is set (the server is stopping), open streams
        end. With ``recover_every_s``, builds whose executor died are finished that often while
        the app runs (``Store.recover_lost_builds``). ``cors_origins`` are the browser origins
        allowed to call the API (``serve --cors-origin``; none by default). ``service`` runs the
    builds ``createBuild`` / ``cancelBuild`` / ``retry`` ask for (without one they answer 503
    ``service_unavailable``); ``max_upload_bytes`` limits a build's source tarball, decoded
    (``serve --max-upload-mb``; the body may be that in base64 plus 4 MiB)."""
    opened = open_store(db) if store is None else store
    app = _App(
        lifespan=_lifespan(opened, close=store is None, recover_every_s=recover_every_s),
        exception_handlers=EXCEPTION_HANDLERS,
        title="harmont-exec API",
        version=importlib.metadata.version("harmont-exec"),
        description="Harmont's v0 API over a harmont-exec record: Harmont's paths, operationIds "
        "and schema names. Operations marked x-harmont-extension are not in Harmont's API.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.store = opened
    app.state.service = service
    app.state.max_upload_bytes = max_upload_bytes
    app.state.live_log = LiveLog(
        heartbeat_s=heartbeat_s, poll_s=poll_s, closing=closing or threading.Event()
    )
    # Outermost last: the request id first, then CORS (its refusals carry the id), then HEAD.
    app.add_middleware(HeadMiddleware)
    if cors_origins:
        app.add_middleware(CorsMiddleware, origins=tuple(cors_origins))
    app.add_middleware(RequestIdMiddleware)
    # In this order: it is the order of the OpenAPI document's paths.
    routers = (
        meta.router,
        organizations.router,
        tokens.router,
        pipelines.router,
        builds.router,
        jobs.router,
        logs.router,
        artifacts.router,
        live.router,
    )
    for router in routers:
        app.include_router(router)
    app.state.routes = tuple(route for router in routers for route in router.routes)
    return app


class _App(FastAPI):
    """FastAPI, with the write routes' request bodies among the document's schemas: the
    routes read their bodies themselves (``body``), so FastAPI does not know the models."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            document = super().openapi()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in REQUEST_MODELS:
                schemas[model.__name__] = model.model_json_schema(
                    ref_template="#/components/schemas/{model}"
                )
            document["components"]["schemas"] = dict(sorted(schemas.items()))
            self.openapi_schema = document
        return self.openapi_schema


def _lifespan(
    store: Store, *, close: bool, recover_every_s: float | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """While the app runs: recover lost builds every ``recover_every_s`` (if set); when it
    stops, close the store if the app opened it (``close``)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            async with anyio.create_task_group() as tg:
                if recover_every_s is not None:
                    tg.start_soon(_recover_now_and_then, store, recover_every_s)
                yield
                tg.cancel_scope.cancel()
        finally:
            if close:
                store.close()

    return lifespan


async def _recover_now_and_then(store: Store, every_s: float) -> None:
    # A long-running server must not show a dead executor's build as running forever: it
    # looks for lost builds as every other command does when it opens the store.
    while True:
        await anyio.sleep(every_s)
        lost = await anyio.to_thread.run_sync(store.recover_lost_builds, datetime.now(UTC))
        for build in lost:
            log.warning(
                "build %s/%s #%d abandoned: its executor (%s) is gone",
                build.org,
                build.pipeline,
                build.number,
                build.executor,
            )
