"""Serving the record: `harmont-exec serve` and the API tokens it accepts (`token ...`).

`serve` also runs the builds it is sent (SPEC §6.3): ``executor.service.BuildService``, started
once the server listens and stopped before it exits (see that module for what a stop does to
running builds), handed to the API behind the API's own ``BuildService`` protocol."""

from __future__ import annotations

import getpass
import socket
import sys
import threading
from datetime import UTC, datetime, timedelta
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import click
from rich.table import Table

from executor.cli.common import EXIT_INTERRUPTED, Refused, cli, db_option, make_console
from executor.cli.run import _executor_choice, _executor_option, _open_runner, _scheduler_option
from executor.service import BuildService, workspaces_for
from executor.store import BuildRow, open_store

if TYPE_CHECKING:  # at run time only `serve` loads the API (FastAPI): every command would pay it
    from executor.api.service import BuildRequest, Submitted

RECOVER_EVERY_S = 10.0
"""How often a running `serve` finishes builds whose executor died (as any command does when
it opens the store)."""
SHUTDOWN_GRACE_S = 3
"""How long `serve` waits for open requests after SIGINT/SIGTERM before cutting them."""


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """``--cors-origin`` values, each exactly an origin, ``scheme://host[:port]``, in the form a
    browser sends in its Origin header (lowercase, no default port), so it can match."""
    out = []
    for value in values:
        if "*" in value:
            raise click.BadParameter(
                f"{value!r}: a wildcard would let every web page on the internet call this "
                "server with a token a user pasted; name each origin, e.g. https://ci.example.com"
            )
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = -1
        ok = (
            parts.scheme in _DEFAULT_PORTS
            and bool(parts.hostname)
            and not parts.path
            and not parts.query
            and not parts.fragment
            and "@" not in parts.netloc
            and value == value.strip()
            and not any(c.isspace() for c in value)
            and (port is None or 1 <= port <= 65535)
        )
        if not ok:
            raise click.BadParameter(
                f"{value!r} is not an origin; give scheme://host[:port] (http or https, a port "
                "from 1 to 65535) with no path or trailing slash, e.g. http://localhost:5173"
            )
        host = str(parts.hostname)
        host = f"[{host}]" if ":" in host else host
        shown = f"{parts.scheme}://{host}"
        if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
            shown += f":{port}"
        out.append(shown)
    return tuple(out)


class _Service:
    """The API's ``BuildService`` (``executor.api.service``) over ``executor.service``'s: the
    two packages may not import each other (STYLE.md's layers), so the command line, which sees
    both, makes the one the other's."""

    def __init__(self, service: BuildService) -> None:
        self._service = service

    def submit(self, request: BuildRequest) -> Submitted:
        from executor.api.service import Submitted

        build, error = self._service.submit(request)
        return Submitted(build, error)

    def cancel(self, build: BuildRow) -> BuildRow:
        return self._service.cancel(build)

    def retry(self, build: BuildRow, *, failed_only: bool) -> BuildRow:
        return self._service.retry(build, failed_only=failed_only)


@cli.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port."
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    callback=_origin,
    metavar="ORIGIN",
    help="Let a browser client on this origin (scheme://host[:port]) call the API and the "
    "log stream; repeat for several [default: none].",
)
@click.option(
    "--max-builds",
    type=click.IntRange(1, 1024),
    default=2,
    show_default=True,
    help="Builds sent to this server that run at once (each with its own concurrency); the "
    "others wait in the queue.",
)
@_executor_option
@_scheduler_option
@click.option(
    "--max-upload-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=100.0,
    show_default=True,
    help="Largest source tarball a build may be sent with, in MB (what it unpacks to: 10 times "
    "that).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    db: str | None,
    host: str,
    port: int,
    cors_origins: tuple[str, ...],
    max_builds: int,
    executor: str,
    scheduler: str | None,
    max_upload_mb: float,
) -> None:
    """Serve the record over HTTP in Harmont's wire format (/api/v0/...; needs a token), and
    run the builds it is sent.

    The builds' jobs run as the user running serve, on this machine (or on the Dask cluster
    of --executor dask): run it as a dedicated user. A stop (Ctrl-C, SIGTERM) stops the
    running builds, to be resumed when serve starts again; queued builds wait until then."""
    import uvicorn  # here: only serve needs the web stack

    from executor.api import API_PREFIX, create_app
    from executor.web import add_web_view

    address = _executor_choice(ctx, executor, scheduler)
    max_upload_bytes = int(max_upload_mb * (1 << 20))
    store = open_store(db)
    service = BuildService(
        store,
        max_builds=max_builds,
        runner_factory=partial(_open_runner, address),
        workspaces=workspaces_for(store),
        max_upload_bytes=max_upload_bytes,
    )
    click.echo(
        f"serving {store.location} on http://{host}:{port}{API_PREFIX}/ "
        "(Authorization: Bearer <token from `harmont-exec token create`>)",
        err=True,
    )
    click.echo(
        f"builds sent here run as {_user()} on {address or socket.gethostname()}, at most "
        f"{max_builds} at once; their workspaces are in {service.workspaces}",
        err=True,
    )
    # Live-log streams stay open until their job ends. At SIGINT/SIGTERM, `closing` ends them
    # (EventSource clients reconnect with Last-Event-ID and lose nothing), so that uvicorn's
    # graceful shutdown finds them done; SHUTDOWN_GRACE_S is the backstop for anything else.
    closing = threading.Event()

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            closing.set()
            # The builds start stopping now, while open requests end (a second signal kills
            # their jobs at once).
            service.begin_stop(kill=self.should_exit)
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:  # listening: builds may start
                await anyio.to_thread.run_sync(service.start)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)
            # Before uvicorn re-raises the signal it handled (SIGTERM's default handler ends
            # the process at once): every build it ran is stopped and recorded.
            await anyio.to_thread.run_sync(service.stop)

    app = create_app(
        store=store,
        closing=closing,
        recover_every_s=RECOVER_EVERY_S,
        cors_origins=cors_origins,
        service=_Service(service),
        max_upload_bytes=max_upload_bytes,
    )
    links = add_web_view(app)
    shown_host = f"[{host}]" if ":" in host else host
    click.echo(
        f"web view: http://{shown_host}:{port}/login?once={links.issue(datetime.now(UTC))} "
        "(a one-time sign-in link, good for 30 minutes; or sign in with a token)",
        err=True,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, once it has stopped
        sys.exit(EXIT_INTERRUPTED)
    finally:
        service.stop()
        store.close()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid
        return "this server's user"


@cli.group()
def token() -> None:
    """Create, list and revoke the API tokens `serve` accepts."""


@token.command("create")
@db_option
@click.option("--description", help="What the token is for (shown by `token list`).")
@click.option(
    "--org",
    "orgs",
    multiple=True,
    help="Limit the token to this organization (repeat for several) [default: all].",
)
@click.option(
    "--expires-in",
    "expires_in",
    type=click.FloatRange(min=0, min_open=True),
    help="Days until the token stops working [default: never].",
)
def token_create(
    db: str | None, description: str | None, orgs: tuple[str, ...], expires_in: float | None
) -> None:
    """Create a token and print it (only this once: the store keeps its SHA-256)."""
    now = datetime.now(UTC)
    expires = None if expires_in is None else now + timedelta(days=expires_in)
    with open_store(db) as store:
        row, secret = store.create_token(
            description=description,
            organizations=list(orgs) or None,
            expires_at=expires,
            now=now,
        )
    click.echo(secret)
    scope = ", ".join(row.organizations) if row.organizations else "every organization"
    until = f"until {row.expires_at:%Y-%m-%d %H:%M} UTC" if row.expires_at else "with no expiry"
    click.echo(
        f"token {row.id}: sees {scope}, {until}; it is shown only now, store it safely",
        err=True,
    )


@token.command("list")
@db_option
def token_list(db: str | None) -> None:
    """List tokens (never their secrets)."""
    with open_store(db) as store:
        rows = store.list_tokens()
    now = datetime.now(UTC)
    table = Table()
    for column in ("id", "description", "organizations", "created", "expires", "status"):
        table.add_column(column)
    for t in rows:
        status = "revoked" if t.revoked_at else ("expired" if not t.usable_at(now) else "active")
        table.add_row(
            t.id,
            t.description or "",
            ", ".join(t.organizations) if t.organizations else "all",
            f"{t.created_at:%Y-%m-%d %H:%M}",
            f"{t.expires_at:%Y-%m-%d %H:%M}" if t.expires_at else "never",
            status,
        )
    make_console().print(table)


@token.command("revoke")
@click.argument("token_id")
@db_option
def token_revoke(token_id: str, db: str | None) -> None:
    """Revoke the token with id TOKEN_ID (from `token list`); it stops working at once."""
    with open_store(db) as store:
        row = store.revoke_token(token_id, now=datetime.now(UTC))
    if row is None:
        raise Refused(
            f"no token {token_id!r}; `harmont-exec token list` shows the ids",
        )
    click.echo(f"token {row.id} revoked")
