"""HTTP behaviour around every route: HEAD on every GET route, and CORS for named origins.

``add_head_routes`` gives each GET route a twin that answers HEAD (SPEC §6: Harmont's clients
and HTTP tools probe with it), left out of the OpenAPI document. ``HeadMiddleware`` makes a
HEAD answer end with its headers: the body is dropped (the server would drop it too) and the
route is told the client has gone as soon as the headers are out, so a HEAD of the live log
stream does not keep streaming. ``CorsMiddleware`` is Starlette's, with the origins
``serve --cors-origin`` names (never ``*``: tokens travel in a header, not in cookies), and a
refused preflight answered with the error envelope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from executor.api.errors import envelope

__all__ = ["CORS_HEADERS", "CorsMiddleware", "HeadMiddleware", "add_head_routes"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

CORS_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID", "X-CSRF-Token")
"""Request headers a browser client on an allowed origin may send."""
_CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE")
_CORS_EXPOSED = ("x-request-id", "retry-after", "repr-digest", "content-disposition")


def add_head_routes(app: FastAPI) -> None:
    """Give every GET route of ``app`` a HEAD twin (same path, handler and dependencies), not
    in the OpenAPI document. Call it once every route is added."""
    for route in list(app.router.routes):
        if isinstance(route, APIRoute) and route.methods and "GET" in route.methods:
            app.router.add_api_route(
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
            body = envelope("invalid_request", "cors_refused", message, request_id)
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
