"""A build's source tarball, unpacked safely into its workspace (SPEC §6.3).

``unpack_source`` takes the bytes ``createBuild`` decoded from ``source_b64`` (a gzip tarball)
and writes them under one directory, refusing, with the member named, anything that would put
a file outside it or is not a plain file tree:

- an absolute path, or a path with a ``..`` component;
- a symbolic link whose target is absolute or resolves outside the directory, and a member
  written through a link that leads out (the check is made on the real file system at every
  write, and once more over every link at the end, so no order of members gets round it);
- a hard link to anything but a regular file unpacked before it (it is copied, not linked);
- a device node, a FIFO, or any other kind of member;
- more than ``max_bytes`` of file content, or more than ``MAX_MEMBERS`` members.

What is unpacked belongs to the server's user: owners in the archive are ignored, setuid,
setgid and sticky bits are dropped, and nothing is writable by group or others. A refusal
leaves whatever was unpacked in the directory: the caller removes it. No database, no store:
files only.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from executor.errors import InvalidSourceError, SourceTooLargeError

__all__ = ["MAX_MEMBERS", "unpack_source"]

MAX_MEMBERS = 200_000
"""The most members a source tarball may have (a bomb of empty files is refused too)."""

_GZIP_MAGIC = b"\x1f\x8b"
_COPY_BYTES = 1 << 20
# What reading a damaged or truncated archive raises (writing the workspace raises OSError).
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
_Writer = Callable[[IO[bytes]], None]


def unpack_source(data: bytes, into: Path, *, max_bytes: int) -> int:
    """Unpack the gzip tarball ``data`` into the existing, empty directory ``into``; return
    the bytes of file content written. InvalidSourceError (SourceTooLargeError over
    ``max_bytes``) names the first member refused; see the module docstring."""
    if not data.startswith(_GZIP_MAGIC):
        raise InvalidSourceError(
            "the source is not a gzip tarball (it does not start with gzip's magic bytes); "
            "send the output of `tar -czf`, base64-encoded"
        )
    root = Path(os.path.realpath(into))
    unpacker = _Unpacker(root, max_bytes)
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    except _READ_ERRORS as exc:
        raise _unreadable(exc) from None
    with archive:
        for member in _members(archive):
            unpacker.add(archive, member)
    unpacker.check_links()
    return unpacker.written


def _members(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    members = iter(archive)
    while True:
        try:
            member = next(members)
        except StopIteration:
            return
        except _READ_ERRORS as exc:
            raise _unreadable(exc) from None
        yield member


def _unreadable(exc: BaseException) -> InvalidSourceError:
    return InvalidSourceError(
        f"the source is not a readable gzip tarball ({exc or type(exc).__name__}); send the "
        "output of `tar -czf`, base64-encoded"
    )


class _Unpacker:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.written = 0
        self.members = 0
        self.links: list[tuple[str, Path]] = []  # (member name, where) of every symlink made

    def add(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.members += 1
        name = member.name
        if self.members > MAX_MEMBERS:
            raise SourceTooLargeError(
                f"the source has more than {MAX_MEMBERS} members (at {name!r}); send fewer files"
            )
        parts = _parts(name)
        if not parts:
            return  # the archive's root ("./"): the workspace itself
        if member.isdir():
            self._directory(name, parts, member.mode)
        elif member.isreg():
            self._count(name, member.size)
            source = archive.extractfile(member)
            if source is None:  # not expected for a regular file
                raise _refused(name, "has no content")
            with source:
                self._file(name, parts, member.mode, member.mtime, lambda out: _copy(source, out))
        elif member.issym():
            self._symlink(name, parts, member.linkname)
        elif member.islnk():
            self._hardlink(name, parts, member)
        elif member.ischr() or member.isblk():
            raise _refused(name, "is a device node; a source tree holds files and directories")
        elif member.isfifo():
            raise _refused(name, "is a FIFO; a source tree holds files and directories")
        else:
            raise _refused(name, f"is a tar member of type {member.type!r}, not a file")

    def check_links(self) -> None:
        """Every symbolic link made still resolves inside the workspace (a later link in its
        path could have changed where it leads)."""
        for name, where in self.links:
            target = Path(os.path.realpath(where))
            if not _inside(target, self.root):
                raise _refused(name, "is a symbolic link that leads outside the workspace")

    # --- members --------------------------------------------------------------------------

    def _count(self, name: str, size: int) -> None:
        self.written += size
        if self.written > self.max_bytes:
            raise SourceTooLargeError(
                f"the source unpacks to more than {_mb(self.max_bytes)} (at member {name!r}); "
                "leave build outputs and dependencies out of it, or start serve with a larger "
                "--max-upload-mb"
            )

    def _parent(self, name: str, parts: tuple[str, ...]) -> Path:
        """The member's directory, created if needed, as a real path inside the workspace."""
        parent = Path(os.path.realpath(self.root.joinpath(*parts[:-1])))
        if not _inside(parent, self.root):
            raise _refused(
                name, "would be written through a symbolic link that leads outside the workspace"
            )
        try:
            parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except FileExistsError:
            raise _refused(name, "is inside a path that an earlier member made a file") from None
        return parent

    def _clear(self, name: str, target: Path) -> None:
        """A later member of the same name replaces the earlier one (as tar does), but never
        a directory, and never by writing through a link."""
        try:
            found = target.lstat()
        except FileNotFoundError:
            return
        if stat.S_ISDIR(found.st_mode):
            raise _refused(name, "has the name of a directory an earlier member made")
        target.unlink()

    def _directory(self, name: str, parts: tuple[str, ...], mode: int) -> None:
        where = self._parent(name, parts) / parts[-1]
        try:
            found = where.lstat()
        except FileNotFoundError:
            where.mkdir(mode=0o700)
        else:
            if stat.S_ISLNK(found.st_mode):
                raise _refused(name, "is a directory where an earlier member made a link")
            if not stat.S_ISDIR(found.st_mode):
                raise _refused(name, "is a directory where an earlier member made a file")
        os.chmod(where, _directory_mode(mode))

    def _file(
        self,
        name: str,
        parts: tuple[str, ...],
        mode: int,
        mtime: float,
        write: _Writer,
    ) -> None:
        target = self._parent(name, parts) / parts[-1]
        self._clear(name, target)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(target, flags, 0o600)
        with os.fdopen(fd, "wb") as out:
            write(out)
            os.fchmod(out.fileno(), _file_mode(mode))
        with contextlib.suppress(OSError, OverflowError, ValueError):
            os.utime(target, (mtime, mtime), follow_symlinks=False)

    def _symlink(self, name: str, parts: tuple[str, ...], linkname: str) -> None:
        if not linkname or linkname.startswith("/") or "\0" in linkname:
            raise _refused(
                name, f"is a symbolic link to {linkname!r}, outside the workspace (absolute)"
            )
        parent = self._parent(name, parts)
        if not _inside(Path(os.path.realpath(parent / linkname)), self.root):
            raise _refused(
                name, f"is a symbolic link to {linkname!r}, which leads outside the workspace"
            )
        target = parent / parts[-1]
        self._clear(name, target)
        os.symlink(linkname, target)
        self.links.append((name, target))

    def _hardlink(self, name: str, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        linkname = member.linkname
        link_parts = tuple(p for p in PurePosixPath(linkname).parts if p != ".")
        if linkname.startswith("/") or ".." in link_parts or not link_parts:
            raise _refused(name, f"is a hard link to {linkname!r}, outside the workspace")
        source = Path(os.path.realpath(self.root.joinpath(*link_parts[:-1]))) / link_parts[-1]
        try:
            found = source.lstat()
        except FileNotFoundError:
            found = None
        if not _inside(source.parent, self.root) or found is None:
            raise _refused(
                name, f"is a hard link to {linkname!r}, which is not a file of the workspace"
            )
        if not stat.S_ISREG(found.st_mode):
            raise _refused(name, f"is a hard link to {linkname!r}, which is not a regular file")
        self._count(name, found.st_size)
        with source.open("rb") as original:
            self._file(name, parts, member.mode, member.mtime, lambda out: _copy(original, out))


def _copy(source: IO[bytes], out: IO[bytes]) -> None:
    while True:
        try:
            chunk = source.read(_COPY_BYTES)
        except _READ_ERRORS as exc:  # the archive ends early: the upload's fault
            raise _unreadable(exc) from None
        if not chunk:
            return
        out.write(chunk)


def _parts(name: str) -> tuple[str, ...]:
    """The member's path components (``.`` dropped); refuses absolute ones and ``..``."""
    if name.startswith("/"):
        raise _refused(name, "is an absolute path; a source tarball holds relative paths")
    if "\0" in name:
        raise _refused(name, "has a NUL byte in its name")
    parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
    if ".." in parts:
        raise _refused(name, "has a '..' component: it would be written outside the workspace")
    return parts


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _file_mode(mode: int) -> int:
    """Owner read/write and every execute bit kept; no setuid, setgid or sticky bit, nothing
    writable by group or others."""
    return (mode & 0o755) | 0o600


def _directory_mode(mode: int) -> int:
    return (mode & 0o755) | 0o700


def _refused(name: str, why: str) -> InvalidSourceError:
    return InvalidSourceError(f"the source's member {name!r} {why}; nothing was unpacked")


def _mb(size: int) -> str:
    return f"{size / (1 << 20):g} MB"
