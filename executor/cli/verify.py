"""`harmont-exec verify`: the record's own fsck (see ``executor.store.verify``)."""

from __future__ import annotations

import click

from executor.cli.common import EXIT_FAILED, cli, db_option
from executor.store import open_store


@cli.command()
@db_option
def verify(db: str | None) -> None:
    """Check the whole record and report what is wrong with it.

    Checks the database's own structure (SQLite's integrity_check; PostgreSQL: every
    constraint and index valid), that no row points at one that is not there, that every
    job's history is a legal path through the transition table ending in its state, that
    attempts are numbered without gaps, that every finished build is in the state its jobs
    roll up to, and that every artifact's file is there with its SHA-256. Reads only: it
    repairs nothing and finishes no abandoned build. Exit 0 with a one-line summary when all
    is well; exit 1 with one line per problem (build, job, what is wrong) otherwise."""
    with open_store(db, must_exist=True, recover=False) as store:
        found = store.verify()
    for problem in found.problems:
        click.echo(str(problem))
    if found.omitted:
        click.echo(f"... and {found.omitted} more problems of the same kinds")
    click.echo(f"{store.location}: {found.summary()}")
    if not found.ok:
        click.echo(
            "harmont-exec: verify repairs nothing. Keep a copy of the store as it is, then "
            "restore it from a backup; a problem in a history, an attempt or a roll-up that no "
            "one made by hand is a bug in harmont-exec: please report it with this output",
            err=True,
        )
        raise SystemExit(EXIT_FAILED)
