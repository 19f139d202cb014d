"""Where the builds `serve` runs keep their files: one workspace directory per build.

``<workspaces>/<org>/<pipeline>/<number>/`` is a build's working directory (its source unpacked
there). The root is ``workspaces/`` beside a SQLite store's file, or ``HARMONT_WORKSPACES``
(default ``~/.local/share/harmont-exec/workspaces``) for a PostgreSQL store: give each
PostgreSQL store its own. Everything is created private (0700): it holds the builds' sources.

An upload is unpacked into ``<workspaces>/.incoming/<random>/`` first and moved into place
inside the transaction that records its build (``Store.create_build`` with a ``working_dir``
function), so a queued build's workspace is complete before any executor can claim it, and a
crash leaves at most a directory under ``.incoming`` (swept after a day). Files only: no SQL.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from executor.store import Store

__all__ = [
    "WORKSPACES_ENV",
    "place_workspace",
    "remove_workspace",
    "stage_workspace",
    "sweep_incoming",
    "workspace_path",
    "workspaces_for",
]

WORKSPACES_ENV = "HARMONT_WORKSPACES"
"""Where a PostgreSQL store's builds keep their workspaces on this host."""

_INCOMING = ".incoming"
_STALE_S = 24 * 3600.0
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def workspaces_for(store: Store) -> Path:
    """The workspace root of ``store`` (see the module docstring); not created here."""
    if store.path is not None:
        return store.path.parent / "workspaces"
    given = os.environ.get(WORKSPACES_ENV)
    if given:
        return Path(given).expanduser().absolute()
    return Path.home() / ".local" / "share" / "harmont-exec" / "workspaces"


def workspace_path(root: Path, org: str, pipeline: str, number: int) -> Path:
    """Build ``number``'s workspace: a slug that is a plain file name is used as it is; any
    other (a pipeline `run --pipeline` named ``a/b`` or ``..``) by a digest of it."""
    return root / _component(org) / _component(pipeline) / str(number)


def _component(slug: str) -> str:
    if _PLAIN.fullmatch(slug):
        return slug
    return "_" + hashlib.sha256(slug.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def stage_workspace(root: Path) -> Path:
    """A new, empty, private directory under ``<root>/.incoming`` to unpack an upload into."""
    incoming = root / _INCOMING
    incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    staging = incoming / uuid.uuid4().hex
    staging.mkdir(mode=0o700)
    return staging


def place_workspace(staging: Path, final: Path) -> Path:
    """Move ``staging`` to ``final`` (a build's workspace), replacing what a crash may have
    left there (a build number taken by a transaction that did not commit)."""
    final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    return final


def sweep_incoming(root: Path) -> int:
    """Remove what uploads a crash interrupted left under ``.incoming`` (a day old: another
    `serve` of this root may be unpacking one now); how many were removed."""
    incoming = root / _INCOMING
    try:
        entries = list(incoming.iterdir())
    except OSError:
        return 0
    removed = 0
    now = time.time()
    for entry in entries:
        try:
            if now - entry.lstat().st_mtime < _STALE_S:
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed


def remove_workspace(path: Path) -> None:
    """Remove an unpacked upload that will not run (refused, or its build not recorded)."""
    shutil.rmtree(path, ignore_errors=True)
