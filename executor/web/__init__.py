"""The web view (SPEC §9): pages for people, served by `harmont-exec serve` beside the API.

``add_web_view(app)`` adds them to the API's app: the pages at Harmont's front-end paths
(``routes``), their scripts and styles (``static/``, served from this server only), sign-in
(``session``), the DAG's layout (``layout``) and what the pages compute (``view``). The web
view reads through the API's lookups and wire objects and acts through its build service: it
adds no state of its own but the sessions' keys in the store. See docs/web.md.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from executor.web.pages import SECURITY_HEADERS, STATIC, render
from executor.web.routes import PageError, SignInRequired, router
from executor.web.session import SignInLinks

__all__ = ["SignInLinks", "add_web_view"]


class _Static(StaticFiles):
    async def get_response(self, path: str, scope: dict) -> Response:  # type: ignore[override,type-arg]
        response = await super().get_response(path, scope)
        for name, value in SECURITY_HEADERS.items():
            if name != "cache-control":
                response.headers[name] = value
        return response


def add_web_view(app: FastAPI, links: SignInLinks | None = None) -> SignInLinks:
    """Serve the web view from ``app`` (an app of ``executor.api.create_app``); returns the
    sign-in links it accepts (``links``, or new ones): `serve` issues one at start-up."""
    links = links or SignInLinks()
    app.state.sign_in_links = links
    app.include_router(router)
    app.mount("/static", _Static(directory=STATIC), name="static")

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
