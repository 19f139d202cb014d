"""The Harmont error envelope: every error the API returns, and how it is built.

``{"error": {"type", "code", "message", "doc_url", "request_id"}}``, with the same request id
in the ``x-request-id`` header. ``type`` and ``code`` are public API (Harmont's catalog words
where Harmont has one); ``doc_url`` points at the code's section of docs/api.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DOC_BASE", "ApiError", "LogStreamError", "envelope", "not_found", "unauthorized"]

DOC_BASE = "docs/api.md#"
"""Where each error code is documented: the section of the repository's docs/api.md that has
the code as its title (no host: harmont-exec has no public docs site yet)."""


class ApiError(Exception):
    """An error response: HTTP ``status``, catalog ``type`` and ``code``, and a message that
    names the thing, shows the value and says what to do."""

    def __init__(self, status: int, type_: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message


def envelope(type_: str, code: str, message: str, request_id: str) -> dict[str, Any]:
    return {
        "error": {
            "type": type_,
            "code": code,
            "message": message,
            "doc_url": DOC_BASE + code,
            "request_id": request_id,
        }
    }


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", "unauthorized", message)


def not_found(code: str, message: str) -> ApiError:
    return ApiError(404, "not_found", code, message)


class LogStreamError(Exception):
    """A refusal of the live log stream: Harmont answers those with a flat body,
    ``{"code", "message"}``, not the envelope (``log_stream_unauthorized`` 401,
    ``log_stream_forbidden`` 403)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
