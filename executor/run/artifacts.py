"""Collecting a job's artifacts (SPEC §7) after its final attempt.

``match_artifacts`` expands the step's ``artifact_paths`` globs (``**`` recursive, hidden files
only when a pattern names them) in the working directory; ``collect_artifacts`` copies each
match into the store's blob directory. Both run in a worker thread (they read and write files)
and return values: the scheduler records them on its own thread.

Never a file outside the working directory. The build file's validation already refuses
absolute patterns and ``..``; what is left is symlinks (a link pointing out, or a directory
swapped for a link between the match and the copy), so the check is made on the OPENED file:
its real path (``/proc/self/fd/N``) must be inside the working directory's real path, and it
must be a regular file. Everything refused, vanished or unreadable, and every glob that matched
nothing, is a note for the job's log, never a failure of the job; so is a failure to write the
copy into the store (a full disk), which names the store's directory and what to do.
"""

from __future__ import annotations

import glob
import mimetypes
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from executor.errors import StoreError
from executor.store import Blob, BlobStore

__all__ = ["Collected", "Collection", "collect_artifacts", "match_artifacts"]


@dataclass(frozen=True, slots=True)
class Collected:
    path: str  # relative to the working directory, "/"-separated
    mime_type: str
    blob: Blob


@dataclass(slots=True)
class Collection:
    artifacts: list[Collected] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # lines for the job's log


def match_artifacts(working_dir: Path, patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """The relative paths (sorted, each once) that ``patterns`` match and that are not
    directories, and a note per pattern that matched none."""
    found: set[str] = set()
    notes: list[str] = []
    for pattern in patterns:
        try:
            hits = glob.glob(pattern, root_dir=working_dir, recursive=True)
        except (OSError, ValueError) as exc:
            notes.append(f"artifact_paths: cannot expand {pattern!r}: {exc}")
            continue
        files = [h for h in hits if not os.path.isdir(working_dir / h)]
        if not files:
            notes.append(
                f"artifact_paths: {pattern!r} matched no file in {working_dir} (warning: "
                "nothing collected for it)"
            )
        found.update(Path(h).as_posix() for h in files)
    return sorted(found), notes


# A compressed file is its compression's type (a .tar.gz is gzip bytes, not a tar).
_COMPRESSED = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}


def _mime_type(path: str) -> str:
    """The content type a download says, guessed from the name."""
    guessed, encoding = mimetypes.guess_type(path, strict=False)
    if encoding is not None:
        return _COMPRESSED.get(encoding, "application/octet-stream")
    return guessed or "application/octet-stream"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _opened_path(fd: int, name: Path) -> str:
    """The real path of the file open as ``fd`` (Linux: from /proc; elsewhere the name's real
    path, which a concurrent swap could fool)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(name)


def collect_artifacts(working_dir: Path, paths: Sequence[str], blobs: BlobStore) -> Collection:
    """Copy each of ``paths`` (from ``match_artifacts``) into ``blobs``; refuse any that is not
    a regular file inside ``working_dir`` once opened."""
    result = Collection()
    root = os.path.realpath(working_dir)
    for rel in paths:
        try:
            fd = os.open(working_dir / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            result.notes.append(f"artifact {rel}: it was deleted before it could be collected")
            continue
        except OSError as exc:
            if os.path.islink(working_dir / rel):
                target = os.path.realpath(working_dir / rel)
                if not _inside(target, root):
                    result.notes.append(
                        f"artifact {rel}: refused, it is a symlink to {target}, outside the "
                        f"working directory {root}"
                    )
                    continue
                # A link inside the working directory: follow it, then check what it opened.
                try:
                    fd = os.open(working_dir / rel, os.O_RDONLY | os.O_NONBLOCK)
                except OSError as again:
                    result.notes.append(f"artifact {rel}: cannot open it: {again.strerror}")
                    continue
            else:
                result.notes.append(f"artifact {rel}: cannot open it: {exc.strerror}")
                continue
        with open(fd, "rb", closefd=True) as source:
            opened = _opened_path(fd, working_dir / rel)
            if not _inside(opened, root):
                result.notes.append(
                    f"artifact {rel}: refused, it resolves to {opened}, outside the working "
                    f"directory {root}"
                )
                continue
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                result.notes.append(f"artifact {rel}: skipped, not a regular file")
                continue
            try:
                blob = blobs.put(source)
            except StoreError as exc:  # writing into the store: say so, keep the job's result
                result.notes.append(f"artifact {rel}: not collected: {exc}")
                continue
            except OSError as exc:  # reading the job's file
                result.notes.append(f"artifact {rel}: cannot read it: {exc.strerror}")
                continue
        result.artifacts.append(Collected(rel, _mime_type(rel), blob))
    return result
