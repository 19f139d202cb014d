"""Collecting a job's artifacts (SPEC §7) after its final attempt.

``match_artifacts`` expands the step's ``artifact_paths`` globs (``**`` for any depth, never
through a symbolic link; hidden files only when a pattern names the dot) in the working
directory; ``collect_artifacts`` copies each match into the store's blob directory;
``gather_artifacts`` does both for one job. They run in a worker thread (they read and write
files) and return values: the scheduler records them on its own thread.

Never a file outside the working directory. The build file's validation already refuses
absolute patterns and ``..``; what is left is symlinks (a link pointing out, or a directory
swapped for a link between the match and the copy), so the check is made on the OPENED file:
its real path (``/proc/self/fd/N``) must be inside the working directory's real path, and it
must be a regular file. Everything refused, vanished or unreadable, and every glob that matched
nothing, is a note for the job's log, never a failure of the job. A matched file that could not
be kept (the store's disk is full, an I/O error, over the size limit) is a failure: the
scheduler fails the job with ``artifact_upload_failed`` (SPEC §7).
"""

from __future__ import annotations

import fnmatch
import mimetypes
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from executor.errors import StoreError
from executor.store import Blob, BlobStore

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Collected",
    "Collection",
    "collect_artifacts",
    "gather_artifacts",
    "match_artifacts",
]


@dataclass(frozen=True, slots=True)
class Collected:
    path: str  # relative to the working directory, "/"-separated
    mime_type: str
    blob: Blob


DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
"""The largest file kept as one artifact (``--max-artifact-mb``, default 1024)."""


@dataclass(slots=True)
class Collection:
    artifacts: list[Collected] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # lines for the job's log
    failures: list[str] = field(default_factory=list)  # files that matched but were not kept


_MAX_NOTES = 50  # notes per job in its log (a glob over a big tree could make many)
_MAGIC = frozenset("*?[")


def _hidden_ok(name: str, segment: str) -> bool:
    """The shell's rule: a wildcard matches a name starting with '.' only if it says so."""
    return not name.startswith(".") or segment.startswith(".")


def _expand(root: Path, rel: tuple[str, ...], segments: tuple[str, ...]) -> Iterator[str]:
    """Relative paths under ``root`` that match ``segments`` from ``rel`` on. ``**`` is any
    number of directories, but never enters a symbolic link (a link to ``.`` or ``/`` would
    make it loop or walk the disk) nor a hidden directory; other segments are matched one
    level at a time, so they are bounded by the pattern's length."""
    if not segments:
        yield "/".join(rel)
        return
    segment, rest = segments[0], segments[1:]
    here = root.joinpath(*rel)
    if segment == "**":
        yield from _expand(root, rel, rest)  # zero directories
        for entry in _entries(here):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                yield from _expand(root, (*rel, entry.name), segments)
    elif _MAGIC.isdisjoint(segment):
        if os.path.lexists(here / segment):
            yield from _expand(root, (*rel, segment), rest)
    else:
        for entry in _entries(here):
            if fnmatch.fnmatchcase(entry.name, segment) and _hidden_ok(entry.name, segment):
                yield from _expand(root, (*rel, entry.name), rest)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError:  # not a directory, gone, or not readable: nothing matches below it
        return []


def match_artifacts(working_dir: Path, patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """The relative paths (sorted, each once) that ``patterns`` match and that are not
    directories, and a note per pattern that matched no file. A name that is not valid UTF-8
    cannot be recorded: it is left out with a note."""
    found: set[str] = set()
    notes: list[str] = []
    for pattern in patterns:
        segments = tuple(part for part in pattern.split("/") if part not in ("", "."))
        if segments and segments[-1] == "**":  # "dir/**": every file below dir
            segments = (*segments, "*")
        hits = sorted(set(_expand(working_dir, (), segments)))
        files = [h for h in hits if not os.path.isdir(working_dir / h)]
        for name in files:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                notes.append(  # the name's own bytes in the log (see Scheduler's notes)
                    f"artifact {name}: skipped, its name is not valid UTF-8 (rename it, or "
                    "put it in an archive with a UTF-8 name)"
                )
                continue
            found.add(name)
        if not files:
            what = "only directories" if hits else "no file"
            hint = f"; use '{pattern.rstrip('/')}/**' for the files in them" if hits else ""
            notes.append(
                f"artifact_paths: {pattern!r} matched {what} in {working_dir} (warning: "
                f"nothing collected for it{hint})"
            )
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


def collect_artifacts(
    working_dir: Path,
    paths: Sequence[str],
    blobs: BlobStore,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Collection:
    """Copy each of ``paths`` (from ``match_artifacts``) into ``blobs``; refuse any that is not
    a regular file inside ``working_dir`` once opened; fail (``failures``) one that is over
    ``max_bytes`` or that the store cannot take."""
    result = Collection()
    limit_mb = f"{max_bytes / (1 << 20):g} MB"
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
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                result.notes.append(f"artifact {rel}: skipped, not a regular file")
                continue
            if info.st_size > max_bytes:  # said by its size, before a byte is copied
                result.failures.append(
                    f"artifact {rel} is {info.st_size / (1 << 20):.1f} MB, over the limit of "
                    f"{limit_mb} per file: make it smaller (an archive), or raise "
                    "--max-artifact-mb"
                )
                continue
            try:
                blob = blobs.put(source, max_bytes=max_bytes)
            except StoreError as exc:  # writing into the store (a full disk): the job fails
                result.failures.append(f"artifact {rel} could not be kept: {exc}")
                continue
            except OSError as exc:  # reading the job's file
                result.notes.append(f"artifact {rel}: cannot read it: {exc.strerror}")
                continue
        result.artifacts.append(Collected(rel, _mime_type(rel), blob))
    return result


def gather_artifacts(
    working_dir: Path,
    patterns: Sequence[str],
    blobs: BlobStore,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Collection:
    """One job's artifacts: ``match_artifacts`` then ``collect_artifacts``. Its ``notes`` are
    every line for the job's log, the failures' too (at most 50, then how many more)."""
    paths, notes = match_artifacts(working_dir, patterns)
    collection = collect_artifacts(working_dir, paths, blobs, max_bytes=max_bytes)
    notes = notes + collection.notes + collection.failures
    if len(notes) > _MAX_NOTES:
        notes = [*notes[:_MAX_NOTES], f"... and {len(notes) - _MAX_NOTES} more like these"]
    return Collection(collection.artifacts, notes, collection.failures)
