"""The store's artifact files: content-addressed blobs in a directory beside the database.

A blob lives at ``<root>/sha256/<first two hex digits>/<sha256>``, so equal files are kept
once. ``put`` copies from an open file in bounded memory (``CHUNK_BYTES`` at a time) while
hashing it (SHA-1 for Harmont's ``sha1_sum``, SHA-256 for the address) into a temporary file in
``<root>/tmp``, fsyncs it and renames it into place: a crash never leaves a partial file at an
address, and two processes storing the same content race harmlessly. A blob is never modified
once in place; the partial copy a killed executor leaves in ``tmp`` is swept at the next start
(``sweep``). This module does not touch the database.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, NamedTuple

from executor.errors import StoreError
from executor.store.private import make_private_dirs

__all__ = ["CHUNK_BYTES", "Blob", "BlobStore"]

CHUNK_BYTES = 1 << 20
"""How much of a file is in memory at once while it is stored or served."""

_SHA256 = re.compile(r"[0-9a-f]{64}")


class Blob(NamedTuple):
    sha1: str
    sha256: str
    size: int


class BlobStore:
    """Artifact contents under ``root`` (created on first ``put``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, sha256: str) -> Path:
        """Where the blob with this SHA-256 (64 lowercase hex digits) is kept."""
        if not _SHA256.fullmatch(sha256):
            raise StoreError(f"{sha256!r} is not a SHA-256 in hex; artifact records hold one")
        return self.root / "sha256" / sha256[:2] / sha256

    def put(self, source: BinaryIO, *, max_bytes: int | None = None) -> Blob:
        """Store what is left to read of ``source`` (StoreError past ``max_bytes``: a file
        that grows while it is copied); return its hashes and size. A failure to write (disk
        full, permissions) is a StoreError; a failure to read ``source`` is the OSError it
        raised. Either way nothing is left behind."""
        sha1 = hashlib.sha1(usedforsecurity=False)
        sha256 = hashlib.sha256()
        size = 0
        try:
            tmp_dir = self.root / "tmp"
            make_private_dirs(tmp_dir, top=self.root)
            fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="incoming-")  # 0600
        except OSError as exc:
            raise self._error("create a file", self.root, exc) from None
        tmp = Path(tmp_name)
        fcntl.flock(fd, fcntl.LOCK_EX)  # "being written": ``sweep`` leaves it alone
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK_BYTES):
                    sha1.update(chunk)
                    sha256.update(chunk)
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise StoreError(
                            f"it grew past the limit of {max_bytes / (1 << 20):g} MB per file "
                            "while it was copied; raise --max-artifact-mb or keep it smaller"
                        )
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise self._error("write", tmp, exc) from None
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise self._error("write", tmp, exc) from None
            digest = sha256.hexdigest()
            target = self.path_of(digest)
            if target.exists():
                tmp.unlink()
            else:
                try:
                    make_private_dirs(target.parent, top=self.root)
                    tmp.chmod(0o400)  # never modified once in place; only this user reads it
                    os.replace(tmp, target)
                except OSError as exc:
                    raise self._error("store", target, exc) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Blob(sha1.hexdigest(), digest, size)

    def sweep(self) -> int:
        """Remove the partial copies an executor killed mid-copy left in ``tmp/`` (each copy
        holds a lock on its file while it is written: one nobody holds is abandoned); return
        how many bytes were freed."""
        freed = 0
        try:
            leftovers = list((self.root / "tmp").glob("incoming-*"))
        except OSError:
            return 0
        for path in leftovers:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # gone meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # being written right now
            try:
                freed += os.fstat(fd).st_size
                path.unlink(missing_ok=True)
            except OSError:
                pass
            finally:
                os.close(fd)
        return freed

    @staticmethod
    def _error(action: str, where: Path, exc: OSError) -> StoreError:
        hint = "check the disk and the permissions of the artifact directory"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = "free disk space where the store lives"
        return StoreError(f"could not {action} {where} for an artifact: {exc.strerror}; {hint}")
