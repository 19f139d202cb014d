"""The source `submit` uploads: the working directory as a gzip tarball (SPEC §6.3).

The directory is the build file's own, where `run` would run its jobs: inside a git checkout,
the files git lists there (tracked, and untracked ones it does not ignore: `git ls-files -co
--exclude-standard`), else every file under it, walked. Never a `.git` or `.harmont` directory
(a store holds token hashes and every log), wherever it is. Symlinks go in as symlinks, not
followed: the server decides whether one is safe. Devices, FIFOs and sockets are left out
(``Packed.skipped``). The tarball is written to a temporary file (in memory while small) and
refused as soon as it passes the limit, so neither memory nor disk grows past it. Prints
nothing: the command says what was packed.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import os
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

__all__ = ["EXCLUDED", "Packed", "SourceTooLargeError", "open_packed", "source_files"]

EXCLUDED = frozenset({".git", ".harmont"})
"""Directory (or file) names never packed, at any depth."""

_IN_MEMORY_BYTES = 8 << 20
_LARGEST_SHOWN = 3


class SourceTooLargeError(Exception):
    """The tarball passed ``limit_bytes``; ``largest`` names the biggest files (path, size)."""

    def __init__(self, limit_bytes: int, largest: list[tuple[int, str]]) -> None:
        super().__init__(f"the tarball passed {limit_bytes} bytes")
        self.limit_bytes = limit_bytes
        self.largest = largest


@dataclass
class Packed:
    """The packed directory: ``archive`` (positioned at 0) holds ``size_bytes`` of gzip
    tarball with ``file_count`` entries from ``root``."""

    root: Path
    git: bool  # packed from a git checkout's file list (else walked)
    archive: IO[bytes]
    size_bytes: int = 0
    sha256: str = ""  # of the archive, hex
    file_count: int = 0
    skipped: list[str] = field(default_factory=list)  # special files left out


def source_root(directory: Path) -> tuple[Path, bool]:
    """The directory to pack for a build file in ``directory``: ``directory`` itself, as `run`
    runs a build file's jobs in its own directory, so the server's copy is what `run` would see
    here; and True when it is inside a git checkout (its files are then git's list, ignored ones
    left out), else False."""
    try:
        out = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "--is-inside-work-tree"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return directory, False  # no git here: a plain directory
    return directory, out.returncode == 0 and out.stdout.strip() == "true"


def source_files(root: Path, git: bool) -> Iterator[str]:
    """The paths to pack, relative to ``root``, in POSIX form, sorted; a directory git lists
    (a submodule) is walked."""
    listed = _git_files(root) if git else _walk(root, "")
    for path in sorted(set(listed)):
        if EXCLUDED.intersection(PurePosixPath(path).parts):
            continue
        full = root / path
        try:
            mode = full.lstat().st_mode
        except FileNotFoundError:
            continue  # tracked but deleted in the working tree
        if stat.S_ISDIR(mode):
            yield from sorted(_walk(root, path))
        else:
            yield path


def _git_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
        capture_output=True,
        timeout=300,
        check=True,
    )
    return [p for p in os.fsdecode(out.stdout).split("\0") if p]


def _walk(root: Path, below: str) -> Iterator[str]:
    """Every non-directory under ``root / below`` (symlinks to directories included, not
    followed), skipping ``EXCLUDED`` names."""
    for current, dirnames, filenames in os.walk(root / below):
        rel = Path(current).relative_to(root)
        for name in list(dirnames):
            if name in EXCLUDED:
                dirnames.remove(name)
            elif (Path(current) / name).is_symlink():
                dirnames.remove(name)  # a link, packed as one: os.walk does not follow it
                yield (rel / name).as_posix()
        for name in filenames:
            if name not in EXCLUDED:
                yield (rel / name).as_posix()


class _Bounded(io.RawIOBase):
    """A write-only file that raises ``_Full`` once more than ``limit`` bytes are written."""

    def __init__(self, inner: IO[bytes], limit: int) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.written = 0
        self.sha256 = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = len(data)
        self.written += size
        if self.written > self.limit:
            raise _Full
        self.sha256.update(data)
        self.inner.write(data)
        return size


class _Full(Exception):
    pass


@contextmanager
def open_packed(directory: Path, *, limit_bytes: int) -> Iterator[Packed]:
    """Pack the source for a build file in ``directory`` (see the module); the archive is
    deleted on exit. Raises ``SourceTooLargeError`` past ``limit_bytes`` of tarball."""
    root, git = source_root(directory.resolve())
    with tempfile.SpooledTemporaryFile(max_size=_IN_MEMORY_BYTES) as spool:
        packed = Packed(root=root, git=git, archive=spool)
        bounded = _Bounded(spool, limit_bytes)
        largest: list[tuple[int, str]] = []
        try:
            with tarfile.open(fileobj=bounded, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
                for path in source_files(root, git):
                    info = _entry(tar, root, path)
                    if info is None:
                        packed.skipped.append(path)
                        continue
                    heapq.heappush(largest, (info.size, path))
                    if len(largest) > _LARGEST_SHOWN:
                        heapq.heappop(largest)
                    if info.isreg():
                        with (root / path).open("rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
                    packed.file_count += 1
        except _Full:
            raise SourceTooLargeError(limit_bytes, sorted(largest, reverse=True)) from None
        packed.size_bytes = bounded.written
        packed.sha256 = bounded.sha256.hexdigest()
        spool.seek(0)
        yield packed


def _entry(tar: tarfile.TarFile, root: Path, path: str) -> tarfile.TarInfo | None:
    """The tar header of a regular file or symlink (owner anonymised: the server unpacks as
    its own user), or None for anything else."""
    try:
        info = tar.gettarinfo(str(root / path), arcname=path)
    except OSError:
        return None  # vanished or unreadable since it was listed
    if info is None or not (info.isreg() or info.issym()):  # a socket gives None
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
