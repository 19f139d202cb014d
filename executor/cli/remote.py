"""`submit`'s client of a harmont-exec server (Harmont's v0 API, SPEC §6): the calls it makes,
and what each refusal means to the person who typed the command.

Every answer that is not what was asked becomes a ``Refused`` (exit 2: a server that is not
there, a token it does not take, an organization it does not have, a request it rejects) or a
``Failed`` (exit 1: the server broke), with a message that says what to do. Imported only by
`submit`, when it runs: the other commands never load httpx.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx

from executor.cli.common import Failed, Refused
from executor.errors import ErrorCode

__all__ = ["API_PATH", "Api", "Rejected", "Unreachable", "api_base", "open_api", "segment"]

API_PATH = "/api/v0"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
_TAIL_BUFFER_BYTES = 4 << 20  # the end of a log kept to cut its last lines from


def api_base(server: str) -> str:
    """The server's root URL, without a trailing ``/api/v0`` (both forms are accepted)."""
    base = server.strip().rstrip("/")
    return base[: -len(API_PATH)] if base.endswith(API_PATH) else base


class Unreachable(Refused):
    """The server could not be reached (nothing listens there, the network is down)."""


class Rejected(Exception):
    """A 4xx answer the caller handles itself (``Api.call`` with ``own``)."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Api:
    """The calls `submit` makes, on one connection pool; paths are below ``/api/v0``."""

    def __init__(self, client: httpx.AsyncClient, server: str, org: str) -> None:
        self._client = client
        self.server = server
        self.org = org

    def url(self, path: str) -> str:
        return f"{self.server}{API_PATH}{path}"

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        content: AsyncIterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        own: tuple[int, ...] = (),
    ) -> Any:
        """The JSON of a 2xx answer (None for 204). A 4xx whose status is in ``own`` raises
        ``Rejected``; every other refusal raises ``Refused`` or ``Failed`` (see the module)."""
        try:
            response = await self._client.request(
                method, self.url(path), json=body, content=content, headers=headers
            )
        except httpx.TimeoutException as exc:
            raise Failed(
                f"the server at {self.server} did not answer {method} {API_PATH}{path} in time "
                f"({type(exc).__name__}); check that it is not overloaded, then try again"
            ) from None
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        return self._answer(method, path, response, own)

    def unreachable(self, exc: httpx.TransportError) -> Unreachable:
        return Unreachable(
            f"cannot reach a harmont-exec server at {self.server} ({exc or type(exc).__name__}): "
            "start one there with `harmont-exec serve`, or point --server (env HARMONT_API_URL) "
            "at the one you use"
        )

    def _answer(
        self, method: str, path: str, response: httpx.Response, own: tuple[int, ...]
    ) -> Any:
        status = response.status_code
        if 200 <= status < 300:
            if status == 204 or not response.content:
                return None
            try:
                return response.json()
            except ValueError:
                raise self._stranger(method, path, response) from None
        code, message = _envelope(response)
        if code is None:  # not our envelope: not a harmont-exec server
            raise self._stranger(method, path, response)
        if status in own:
            raise Rejected(status, code, message)
        if status == 401:
            raise Refused(
                f"the server at {self.server} refused the token: {message.rstrip('.')} (pass "
                "the token with --token or HARMONT_TOKEN)"
            )
        if code == ErrorCode.ORGANIZATION_NOT_FOUND:
            raise Refused(
                f"the server at {self.server} has no organization {self.org!r} that this token "
                "can see: pass --org with one it has (`local` is always there), or use a token "
                "that is not limited to other organizations"
            )
        if code == ErrorCode.SERVICE_UNAVAILABLE:
            raise Failed(f"the server at {self.server} does not run builds: {message}")
        if status == 413:
            raise Refused(
                f"the server at {self.server} refused the upload as too large: {message}; "
                "leave out what the build does not need (.gitignore it)"
            )
        if 400 <= status < 500:
            raise Refused(f"{method} {API_PATH}{path}: the server refused it ({code}): {message}")
        raise Failed(f"the server at {self.server} failed ({status} {code}): {message}")

    def _stranger(self, method: str, path: str, response: httpx.Response) -> Refused:
        kind = response.headers.get("content-type", "no content type")
        return Refused(
            f"{self.server} answered {method} {API_PATH}{path} with {response.status_code} "
            f"({kind}), not as a harmont-exec server does: check --server (env HARMONT_API_URL)"
        )

    async def log_tail(self, path: str, count: int) -> list[str]:
        """The last ``count`` lines of the raw log at ``path`` (`…/jobs/{id}/log`), decoded
        as `run` does; only the log's last few MB are held."""
        kept = bytearray()
        cut = False
        try:
            async with self._client.stream("GET", self.url(path)) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._answer("GET", path, response, ())
                async for piece in response.aiter_bytes():
                    kept += piece
                    if len(kept) > 2 * _TAIL_BUFFER_BYTES:
                        del kept[:-_TAIL_BUFFER_BYTES]
                        cut = True
        except httpx.TimeoutException:
            return []  # the summary goes on without this tail
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        lines = kept.decode("utf-8", "replace").splitlines()
        if cut:
            lines = lines[1:]  # the first was cut somewhere in its middle
        return lines[-count:]


def _envelope(response: httpx.Response) -> tuple[str | None, str]:
    """(code, message) of Harmont's error envelope, or (None, the start of the body)."""
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return None, response.text[:200]


def segment(value: str) -> str:
    """``value`` as one path segment."""
    return quote(value, safe="")


@asynccontextmanager
async def open_api(server: str, token: str, org: str) -> AsyncIterator[Api]:
    """A client of the server at ``server`` (its root URL) that sends ``token``."""
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    async with httpx.AsyncClient(
        headers={"authorization": f"Bearer {token}", "accept": "application/json"},
        timeout=timeout,
        follow_redirects=False,
    ) as client:
        yield Api(client, api_base(server), org)
