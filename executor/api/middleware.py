"""HTTP behaviour around every route: the request id and the last-resort error envelope, HEAD
on every GET route, and CORS for named origins.

``RequestIdMiddleware`` gives every request an id first (``x-request-id`` on every response,
``request_id`` in every envelope) and answers what escapes the routes: a read-only store 503
``store_read_only``, a store that cannot be read 503 ``store_unavailable`` with Retry-After,
anything else 500 ``internal_error`` (logged with its traceback).

``HeadRouter`` gives each GET route a twin that answers HEAD (SPEC §6: Harmont's clients and
HTTP tools probe with it), left out of the OpenAPI document. ``HeadMiddleware`` makes a
HEAD answer end with its headers: the body is dropped (the server would drop it too) and the
route is told the client has gone as soon as the headers are out, so a HEAD of the live log
stream does not keep streaming. ``CorsMiddleware`` is Starlette's, with the origins
``serve --cors-origin`` names (never ``*``: tokens travel in a header, not in cookies), and a
refused preflight answered with the error envelope.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from executor.api.errors import ApiError, ErrorType, envelope, error_response
from executor.errors import ErrorCode, StoreError, StoreReadOnlyError

__all__ = [
    "CORS_HEADERS",
    "STORE_RETRY_AFTER_S",
    "CorsMiddleware",
    "HeadMiddleware",
    "HeadRouter",
    "RequestIdMiddleware",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

CORS_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID", "X-CSRF-Token")
"""Request headers a browser client on an allowed origin may send."""
_CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE")
_CORS_EXPOSED = ("x-request-id", "retry-after", "repr-digest", "content-disposition")

STORE_RETRY_AFTER_S = 5
"""The Retry-After of a 503 store_unavailable."""

log = logging.getLogger("executor.api")


class RequestIdMiddleware:
    """See the module docstring."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req_" + uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except StoreReadOnlyError as exc:  # retrying will not help: say what would
            if started:
                raise
            response = error_response(
                ApiError(503, ErrorType.SERVER_ERROR, ErrorCode.STORE_READ_ONLY, str(exc)),
                request_id,
            )
            await response(scope, receive, send_with_id)
        except StoreError as exc:  # the database is down or refusing: not a bug, no traceback
            log.warning(
                "store unavailable answering %s %s (%s): %s",
                scope["method"],
                scope["path"],
                request_id,
                exc,
            )
            if started:
                raise
            response = error_response(
                ApiError(
                    503,
                    ErrorType.SERVER_ERROR,
                    ErrorCode.STORE_UNAVAILABLE,
                    "the record cannot be read now (its database is unreachable or refusing); "
                    f"retry in a moment; the server's log says why (request id {request_id})",
                ),
                request_id,
                {"retry-after": str(STORE_RETRY_AFTER_S)},
            )
            await response(scope, receive, send_with_id)
        except Exception:
            log.exception("internal error answering %s %s", scope["method"], scope["path"])
            if started:
                raise
            response = error_response(
                ApiError(
                    500,
                    ErrorType.SERVER_ERROR,
                    ErrorCode.INTERNAL_ERROR,
                    f"harmont-exec failed to answer this request; report it with request id "
                    f"{request_id} and the server's log",
                ),
                request_id,
            )
            await response(scope, receive, send_with_id)


class HeadRouter(APIRouter):
    """An ``APIRouter`` that gives every GET route a HEAD twin (same path, handler and
    dependencies), left out of the OpenAPI document."""

    def add_api_route(
        self, path: str, endpoint: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        super().add_api_route(path, endpoint, *args, **kwargs)
        route = self.routes[-1]
        if isinstance(route, APIRoute) and route.methods and "GET" in route.methods:
            super().add_api_route(
                route.path,
                route.endpoint,
                methods=["HEAD"],
                include_in_schema=False,
                response_class=route.response_class,
                dependencies=route.dependencies,
                name=f"{route.name}_head",
            )


class HeadMiddleware:
    """See the module docstring."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        answered = anyio.Event()

        async def receive_until_answered() -> Message:
            # A route may already be waiting for a message (a streaming response listens for
            # the disconnect from the start): once the headers are out, it gets one.
            message: Message = {"type": "http.disconnect"}
            if answered.is_set():
                return message
            async with anyio.create_task_group() as tg:

                async def client() -> None:
                    nonlocal message
                    message = await receive()
                    tg.cancel_scope.cancel()

                tg.start_soon(client)
                await answered.wait()
                tg.cancel_scope.cancel()
            return message

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.start":
                await send(message)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                answered.set()
            elif message["type"] != "http.response.body":
                await send(message)

        await self.app(scope, receive_until_answered, send_headers_only)


class CorsMiddleware(CORSMiddleware):
    """Starlette's CORS for ``origins`` (see the module docstring)."""

    def __init__(self, app: App, origins: Collection[str]) -> None:
        super().__init__(
            app,
            allow_origins=tuple(origins),
            allow_methods=_CORS_METHODS,
            allow_headers=CORS_HEADERS,
            allow_credentials=False,
            expose_headers=_CORS_EXPOSED,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        preflight = (
            scope["type"] == "http"
            and scope["method"] == "OPTIONS"
            and "origin" in headers
            and "access-control-request-method" in headers
        )
        if not preflight:
            await super().__call__(scope, receive, send)
            return
        response = self.preflight_response(request_headers=headers)
        if response.status_code != 200:
            refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
            request_id = str(scope.get("state", {}).get("request_id", "req_unknown"))
            message = (
                f"the CORS preflight from origin {headers['origin'][:200]!r} for "
                f"{headers['access-control-request-method'][:20]!r} is refused ({refused}); "
                "harmont-exec serve allows a browser client only on the origins named with "
                "--cors-origin, the methods GET, HEAD, POST, PUT, DELETE and the headers "
                f"{', '.join(CORS_HEADERS)}"
            )
            body = envelope(ErrorType.INVALID_REQUEST, ErrorCode.CORS_REFUSED, message, request_id)
            response = JSONResponse(
                body,
                status_code=400,
                headers={
                    k: v
                    for k, v in response.headers.items()
                    if k.lower() not in ("content-length", "content-type")
                },
            )
        await response(scope, receive, send)
