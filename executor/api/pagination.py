"""Pages of a list (SPEC §6): the page size, the opaque cursor, and the page's JSON.

A page is ``{"data": [...], "next_cursor": ...}``: ``limit`` is clamped to 1-100 (out of range
is clamped, not refused), and ``next_cursor`` is set when there is more, as the page's last
key in base64url JSON: opaque to clients, checked on the way in (anything this server did not
hand out for this list is ``invalid_cursor``). A route reads one row more than the page to
know whether there is more. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from executor.api.errors import ApiError, ErrorType
from executor.errors import ErrorCode

__all__ = ["clamp", "decode_cursor", "encode_cursor", "invalid_cursor_error", "page_json"]

T = TypeVar("T")
K = TypeVar("K", str, int)

_CURSOR_VERSION = 1


def clamp(limit: int) -> int:
    """A page size within 1-100."""
    return max(1, min(100, limit))


def encode_cursor(kind: str, after: str | int) -> str:
    raw = json.dumps({"v": _CURSOR_VERSION, "k": kind, "a": after}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _storable(key: object) -> bool:
    """A key SQLite can compare: a positive 64-bit integer or a UTF-8-encodable string (an
    edited cursor can hold anything JSON can)."""
    if isinstance(key, int):
        return 0 < key < 1 << 63
    try:
        str(key).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def invalid_cursor_error(cursor: str) -> ApiError:
    """The 400 for a cursor this server did not hand out for this list."""
    shown = cursor if len(cursor) <= 60 else cursor[:57] + "..."
    return ApiError(
        400,
        ErrorType.INVALID_REQUEST,
        ErrorCode.INVALID_CURSOR,
        f"cursor {shown!r} is not a cursor of this list; pass the next_cursor of the "
        "previous page unchanged, or leave cursor out to start from the first page",
    )


def decode_cursor(cursor: str, kind: str, key_type: type[K]) -> K:
    """The key a cursor of ``kind`` stands for; ApiError 400 for anything this server did not
    hand out (garbage, truncated, edited, or a cursor of another list)."""
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        after = data["a"]
        valid = (
            isinstance(data, dict)
            and data.get("v") == _CURSOR_VERSION
            and data.get("k") == kind
            and type(after) is key_type
            and _storable(after)
        )
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError):
        valid = False
    if not valid:
        raise invalid_cursor_error(cursor)
    return key_type(after)  # already of that type: only says so to the type checker


def page_json(
    rows: Sequence[T],
    size: int,
    kind: str,
    item: Callable[[T], dict[str, Any]],
    key: Callable[[T], str | int],
) -> dict[str, Any]:
    """The first ``size`` of ``rows`` as ``item``s, and the cursor after the last of them
    (its ``key``) when ``rows`` holds more."""
    page = rows[:size]
    more = len(rows) > size
    return {
        "data": [item(r) for r in page],
        "next_cursor": encode_cursor(kind, key(page[-1])) if more else None,
    }
