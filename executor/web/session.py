"""Who is looking at the web view: sign-in sessions, their CSRF tokens and `serve`'s one-time
sign-in link (SPEC §9).

A person signs in with an API token (the ``/login`` form), or with the one-time link ``serve``
prints at start-up, which makes a token for them. Either way the browser gets a session
cookie, never the token: ``<payload>.<mac>``, base64url, the payload naming the API token and
when the session was made, the MAC an HMAC-SHA-256 keyed by a secret kept in the store (as the
live log's tokens are, so every server of one record accepts it). The cookie is HttpOnly (no
script reads it) and SameSite=Strict (no other site's page sends it); the session ends at
SESSION_TTL, or when its API token expires or is revoked, whichever comes first, checked on
every request.

Every action (cancel, retry, sign-out) is a POST carrying a CSRF token: an HMAC of the session
under another key, so it is worth nothing without the cookie and the cookie is worth nothing
for an action without it. A POST whose ``Origin`` is another site's is refused as well.

The one-time link carries a random code, kept only in this process's memory as its SHA-256,
good for one use within LINK_TTL: the link is a secret in a URL, so it must not outlive one
use. Pure but for ``Store`` calls: no HTTP here (``routes`` binds it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from executor.store import Store, TokenRow

__all__ = [
    "COOKIE",
    "LINK_TTL",
    "SESSION_TTL",
    "Session",
    "SignInLinks",
    "csrf_token",
    "end_session",
    "mint_session",
    "read_session",
]

COOKIE = "harmont_session"
"""The session cookie's name."""
SESSION_TTL = timedelta(hours=12)
LINK_TTL = timedelta(minutes=30)
"""How long the one-time sign-in link ``serve`` prints is good for (once)."""
LINK_TOKEN_TTL = SESSION_TTL
"""The life of the API token a sign-in link makes (the session's)."""
LINK_TOKEN_DESCRIPTION = "web sign-in link"
"""How the API token a sign-in link makes is described (``token list``)."""
_SESSION_KEY = "web_session_hmac"
_CSRF_KEY = "web_csrf_hmac"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: its API token (what it may see: the token's organizations) and
    the cookie that carries it."""

    token: TokenRow
    cookie: str
    expires_at: datetime
    link: bool = False
    """Made by a sign-in link, with an API token of its own (signing out revokes it)."""


def mint_session(store: Store, token: TokenRow, now: datetime, *, link: bool = False) -> Session:
    """A session for ``token``, made now (``link``: by a sign-in link, which made the token
    for it): its cookie value and when it ends. The cookie says ``link`` under its MAC, so
    only the server can make a session that signing out revokes the token of."""
    issued = int(now.timestamp())
    fields = {"t": token.id, "i": issued, **({"l": 1} if link else {})}
    payload = json.dumps(fields, separators=(",", ":")).encode()
    mac = hmac.new(store.store_key(_SESSION_KEY), payload, hashlib.sha256).digest()
    return Session(token, f"{_b64(payload)}.{_b64(mac)}", _ends(token, issued), link)


def _ends(token: TokenRow, issued: int) -> datetime:
    ends = datetime.fromtimestamp(issued, UTC) + SESSION_TTL
    if token.expires_at is not None:
        ends = min(ends, token.expires_at)
    return ends


def read_session(store: Store, cookie: str | None, now: datetime) -> Session | None:
    """The session a cookie carries, or None: no cookie, not one this record's servers made
    (or altered), older than SESSION_TTL, or its API token expired or was revoked."""
    if not cookie or len(cookie) > 512:
        return None
    payload_text, _, mac_text = cookie.partition(".")
    try:
        payload, mac = _unb64(payload_text), _unb64(mac_text)
    except (ValueError, binascii.Error):
        return None
    expected = hmac.new(store.store_key(_SESSION_KEY), payload, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        return None
    try:
        data = json.loads(payload)
        token_id, issued, link = str(data["t"]), int(data["i"]), data.get("l") == 1
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    token = store.get_token(token_id)
    if token is None or not token.usable_at(now):
        return None
    ends = _ends(token, issued)
    if ends <= now:
        return None
    return Session(token, cookie, ends, link)


def end_session(store: Store, session: Session, now: datetime) -> None:
    """Signing out: a session made by a sign-in link ends for good (its own API token is
    revoked, so the cookie is worth nothing even if kept). A session made with a token the
    person pasted ends in this browser only (the cookie is deleted): revoke that token
    (`harmont-exec token revoke`) to end every session made with it."""
    if session.link:
        store.revoke_token(session.token.id, now=now)


def csrf_token(store: Store, session: Session) -> str:
    """The CSRF token of ``session``'s actions: the same for the session's whole life."""
    mac = hmac.new(store.store_key(_CSRF_KEY), session.cookie.encode(), hashlib.sha256)
    return _b64(mac.digest())


def csrf_ok(store: Store, session: Session, sent: str | None) -> bool:
    """Whether an action's ``sent`` CSRF token is ``session``'s."""
    return sent is not None and hmac.compare_digest(sent, csrf_token(store, session))


class SignInLinks:
    """`serve`'s one-time sign-in links: ``issue`` makes one at start-up (the code goes in the
    printed URL), ``redeem`` takes it once, within LINK_TTL, and makes the API token the
    session will use. Only the codes' SHA-256 is kept, in memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._codes: dict[str, datetime] = {}

    def issue(self, now: datetime) -> str:
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[_digest(code)] = now + LINK_TTL
        return code

    def redeem(self, store: Store, code: str, now: datetime) -> TokenRow | None:
        """The new API token a good code signs in with (the code is spent), or None."""
        with self._lock:
            expires = self._codes.pop(_digest(code), None)
        if expires is None or expires <= now:
            return None
        token, _ = store.create_token(
            description=f"{LINK_TOKEN_DESCRIPTION} ({now:%Y-%m-%d %H:%M} UTC)",
            organizations=None,
            expires_at=now + LINK_TOKEN_TTL,
            now=now,
        )
        return token


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()
