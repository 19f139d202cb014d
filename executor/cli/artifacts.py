"""A build's artifacts from the terminal: `artifacts NUMBER` lists, `artifacts download ID`
copies one out of the store (checking its SHA-256 on the way)."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

import click
from rich.table import Table

from executor.cli.browse import build_or_exit
from executor.cli.common import Failed, Refused, cli, db_option, make_console
from executor.errors import StoreError
from executor.store import ArtifactRow, Store, open_store
from executor.store.blobs import CHUNK_BYTES


class _ListByDefault(click.Group):
    """`artifacts NUMBER` means `artifacts list NUMBER`."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["list", *args]
        return super().resolve_command(ctx, args)


@cli.group(cls=_ListByDefault)
def artifacts() -> None:
    """List a build's artifacts (`artifacts NUMBER`) or copy one out (`artifacts download ID`)."""


def _size_text(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@artifacts.command("list")
@click.argument("number", type=int)
@db_option
@click.option("--org", help="Organization of the build.")
@click.option("--pipeline", help="Pipeline of the build (needed when the number is ambiguous).")
def list_artifacts(number: int, db: str | None, org: str | None, pipeline: str | None) -> None:
    """List the artifacts of build NUMBER (its jobs in plan order, then by path)."""
    with open_store(db, must_exist=True) as store:
        build = build_or_exit(store, number, org, pipeline)
        keys = {j.id: j.step_key for j in store.list_jobs(build.id)}
        rows: list[ArtifactRow] = []
        while page := store.list_artifacts(
            build_id=build.id, after=rows[-1].id if rows else None, limit=500
        ):
            rows.extend(page)
    if not rows:
        click.echo(
            f"build #{build.number} of {build.org}/{build.pipeline} has no artifacts (steps "
            "collect them with artifact_paths)",
            err=True,
        )
        return
    table = Table(title=f"{build.org}/{build.pipeline} build #{build.number}: artifacts")
    for column in ("job", "path", "size", "type", "id"):
        table.add_column(column)
    for a in rows:
        table.add_row(
            keys.get(a.job_id, a.job_id), a.path, _size_text(a.file_size), a.mime_type, a.id
        )
    make_console().print(table)


class _Discard:
    """A binary sink that keeps nothing (to check an artifact before writing it out)."""

    def write(self, data: bytes) -> int:
        return len(data)


def _copy_checked(store: Store, artifact: ArtifactRow, out: BinaryIO | _Discard) -> None:
    digest = hashlib.sha256()
    with store.artifact_file(artifact).open("rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != artifact.sha256:
        raise StoreError(
            f"the stored content of artifact {artifact.id} ({artifact.path}) does not match its "
            f"recorded sha256 {artifact.sha256}: the artifact directory "
            f"{store.blobs.root} was modified; nothing was written"
        )


@artifacts.command("download")
@click.argument("artifact_id")
@db_option
@click.option(
    "-o",
    "--output",
    help="Where to write it: a file (replaced if it exists), a directory, or '-' for stdout "
    "[default: its file name in the current directory, never replacing a file].",
)
def download(artifact_id: str, db: str | None, output: str | None) -> None:
    """Copy artifact ARTIFACT_ID (from `artifacts NUMBER`) out of the store."""
    try:
        with open_store(db, must_exist=True) as store:
            artifact = store.get_artifact(artifact_id.lower())
            if artifact is None:
                raise Refused(
                    f"no artifact {artifact_id!r}; `harmont-exec artifacts NUMBER` "
                    "lists a build's artifacts and their ids",
                )
            if output == "-":
                # Checked before a byte goes out: what is written to a pipe cannot be taken back.
                _copy_checked(store, artifact, _Discard())
                _copy_checked(store, artifact, sys.stdout.buffer)
                sys.stdout.buffer.flush()
                return
            target = Path(output) if output is not None else Path(artifact.filename)
            if output is None and target.exists():
                raise Refused(
                    f"{target} already exists; choose where to write the "
                    "artifact with -o PATH (or -o - for stdout)",
                )
            if target.is_dir():
                target = target / artifact.filename
            if not target.parent.is_dir():
                raise Refused(
                    f"cannot write {target}: the directory {target.parent} does "
                    "not exist; create it or choose another -o PATH",
                )
            # Into a temporary file beside the target, renamed at the end: a failed or
            # interrupted copy never leaves a partial file under the artifact's name.
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            try:
                with os.fdopen(fd, "wb") as out:
                    _copy_checked(store, artifact, out)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # as a new file would be, not mkstemp's 0600
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except OSError as exc:
        raise Failed(f"cannot write the artifact: {exc}") from None
    click.echo(f"{target} ({_size_text(artifact.file_size)}, sha256 {artifact.sha256})", err=True)
