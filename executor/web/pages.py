"""Rendering a page: the Jinja2 environment (autoescaping on for every template: every string
from the record is escaped unless a template says otherwise, and none does) and the headers
every page and file of the web view carries.

The Content-Security-Policy allows scripts, styles, images and connections from this server
only, no inline script or style, no frames, no plugins, and forms that post only here: a
string that got past escaping still could not run. ``Referrer-Policy: same-origin`` keeps the
pages' URLs (and the log tokens the scripts put in stream URLs) out of other sites' logs
(``no-referrer`` would also make the browser send ``Origin: null`` on the pages' own forms,
which the CSRF check refuses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

__all__ = ["SECURITY_HEADERS", "STATIC", "render"]

HERE = Path(__file__).parent
STATIC = HERE / "static"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
"""On every page of the web view (the static files get all but cache-control)."""

_ENV = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(
    request: Request, template: str, context: dict[str, Any], *, status: int = 200
) -> HTMLResponse:
    """``template`` rendered with ``context`` (and ``request``), with SECURITY_HEADERS."""
    html = _ENV.get_template(template).render(request=request, **context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
