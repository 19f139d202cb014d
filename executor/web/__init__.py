"""The web view (SPEC §9): pages for people, served by `harmont-exec serve` beside the API.

``add_web_view(app)`` adds them to the API's app: the pages at Harmont's front-end paths
(``routes``), their scripts and styles (``static/``, served from this server only), sign-in
(``session``), the DAG's layout (``layout``) and what the pages compute (``view``). The web
view reads through the API's lookups and wire objects and acts through its build service: it
adds no state of its own but the sessions' keys in the store. See docs/web.md.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from executor.web.pages import SECURITY_HEADERS, STATIC, render
from executor.web.routes import PageError, SignInRequired, router
from executor.web.session import SignInLinks

__all__ = ["SignInLinks", "add_web_view"]


class _SecurityHeaders:
    """SECURITY_HEADERS on every response of the web view, whatever answered it (a page, a
    redirect, a file, an error, a route's JSON), unless it set its own; not on the API's
    (``/api``, ``/v0``: JSON and event streams for programs, answered as Harmont does).
    Files under ``/static`` may be cached; nothing else is."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else "/api"
        if path.startswith(("/api/", "/v0/")):
            await self.app(scope, receive, send)
            return
        static = path.startswith("/static/")

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present and not (static and name == "cache-control"):
                        headers.append((name.encode(), value.encode()))
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_web_view(app: FastAPI, links: SignInLinks | None = None) -> SignInLinks:
    """Serve the web view from ``app`` (an app of ``executor.api.create_app``); returns the
    sign-in links it accepts (``links``, or new ones): `serve` issues one at start-up."""
    links = links or SignInLinks()
    app.state.sign_in_links = links
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(_SecurityHeaders)

    async def sign_in(request: Request, exc: Exception) -> Response:
        after = exc.after if isinstance(exc, SignInRequired) else "/"
        return RedirectResponse(f"/login?next={quote(after, safe='/')}", status_code=303)

    async def page_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, PageError):
            raise exc
        return render(
            request,
            "error.html.j2",
            {"status": exc.status, "code": str(exc.code), "message": exc.message},
            status=exc.status,
        )

    app.add_exception_handler(SignInRequired, sign_in)
    app.add_exception_handler(PageError, page_error)
    return links
