"""Serving the record: `harmont-exec serve` and the API tokens it accepts (`token ...`)."""

from __future__ import annotations

import sys
import threading
from datetime import UTC, datetime, timedelta
from types import FrameType
from urllib.parse import urlsplit

import click
from rich.table import Table

from executor.cli.common import EXIT_INTERRUPTED, Refused, cli, db_option, make_console
from executor.store import open_store

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
def serve(db: str | None, host: str, port: int, cors_origins: tuple[str, ...]) -> None:
    """Serve the record over HTTP in Harmont's wire format (/api/v0/...; needs a token)."""
    import uvicorn  # here: only serve needs the web stack

    from executor.api import API_PREFIX, create_app

    store = open_store(db)
    click.echo(
        f"serving {store.location} on http://{host}:{port}{API_PREFIX}/ "
        "(Authorization: Bearer <token from `harmont-exec token create`>)",
        err=True,
    )
    # Live-log streams stay open until their job ends. At SIGINT/SIGTERM, `closing` ends them
    # (EventSource clients reconnect with Last-Event-ID and lose nothing), so that uvicorn's
    # graceful shutdown finds them done; SHUTDOWN_GRACE_S is the backstop for anything else.
    closing = threading.Event()

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            closing.set()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        create_app(
            store=store,
            closing=closing,
            recover_every_s=RECOVER_EVERY_S,
            cors_origins=cors_origins,
        ),
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
        store.close()


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
