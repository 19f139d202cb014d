"""Slugs: how a new organization's or pipeline's name becomes the word in its URL (SPEC §6.3).

Harmont's rule: the name in lowercase (accents dropped: ``Über`` is ``uber``), every run of
characters other than ``a-z`` and ``0-9`` made one ``-``, trimmed of ``-`` at both ends. A name
that makes no slug (empty, only punctuation or other scripts) or is too long is refused. Pure:
no SQL, no I/O.
"""

from __future__ import annotations

import re
import unicodedata

from executor.errors import InvalidNameError

__all__ = ["MAX_NAME_LENGTH", "RESERVED_ORGANIZATIONS", "check_organization_slug", "slug_for"]

MAX_NAME_LENGTH = 100
"""The longest name an organization or a pipeline may be created with (in characters)."""

_OTHERS = re.compile(r"[^a-z0-9]+")

RESERVED_ORGANIZATIONS = frozenset({"api", "v0", "login", "static"})
"""Slugs no organization may have: the web view's pages are at ``/{org}/...`` beside the API
(``/api``), the live streams (``/v0``), sign-in (``/login``) and its files (``/static``)."""


def check_organization_slug(slug: str) -> str:
    """``slug``, or InvalidNameError if it is one of RESERVED_ORGANIZATIONS."""
    if slug in RESERVED_ORGANIZATIONS:
        taken = ", ".join(sorted(RESERVED_ORGANIZATIONS))
        raise InvalidNameError(
            f"the organization slug {slug!r} is reserved (the web view's paths use {taken}); "
            "choose another name"
        )
    return slug


def slug_for(name: str, *, what: str = "name") -> str:
    """The slug of ``name`` (``"My Project!"`` -> ``"my-project"``); InvalidNameError, naming
    ``what`` ("organization name", ...), for a name that cannot make one."""
    shown = name if len(name) <= 40 else name[:40] + "..."
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(
            f"the {what} {shown!r} is {len(name)} characters long; give at most {MAX_NAME_LENGTH}"
        )
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = _OTHERS.sub("-", plain.lower()).strip("-")
    if not slug:
        raise InvalidNameError(
            f"the {what} {shown!r} has no letter or digit (a-z, 0-9) to make its slug from; "
            "give a name with at least one"
        )
    return slug
