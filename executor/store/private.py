"""The record is private by default (SPEC §5): directories 0700, files 0600, whatever the umask.

The store holds every job's log, the API tokens' hashes and the key that signs log tokens: a
second user on the machine must not read any of it. New directories and files of the store
are created with those modes (and set again, as a umask only ever removes bits); an existing
store is tightened when it is opened (``tighten``), and the caller says so once.

Only what is the store's is touched: the database file and SQLite's files beside it (``-wal``,
``-shm``, the reserve), the artifact directories, and the directory holding the database when
harmont-exec made it or it is the default ``.harmont``, never a directory the user pointed
``--db`` into. Tightening only ever removes permissions. No SQL here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "check_owned",
    "create_private_file",
    "make_private_dirs",
    "tighten",
]

DIR_MODE = 0o700
FILE_MODE = 0o600
_DEFAULT_DIR = ".harmont"


def make_private_dirs(path: Path, *, top: Path | None = None) -> None:
    """``mkdir -p path``, every directory it creates 0700; with ``top``, also make every
    existing directory from ``top`` down to ``path`` 0700 (they are the store's)."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for created in missing:
        _chmod(created, DIR_MODE)
    if top is not None:
        current = path
        while True:
            _chmod(current, DIR_MODE, only_looser=True)
            if current == top or current.parent == current or top not in current.parents:
                break
            current = current.parent


def create_private_file(path: Path) -> bool:
    """Create ``path`` (0600) if it does not exist; True if it was created."""
    if path.exists():  # (a read-only file system may answer EROFS, not EEXIST)
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return True


def _chmod(path: Path, mode: int, *, only_looser: bool = False) -> bool:
    """Set ``path``'s permission bits to ``mode`` (if ``only_looser``: only when it grants
    more); True if it changed. A path that vanished is left alone."""
    try:
        current = stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)
    except OSError:
        return False
    if current == mode or (only_looser and current & ~mode == 0):
        return False
    try:
        os.chmod(path, mode, follow_symlinks=False)
    except (OSError, NotImplementedError):
        return False
    return True


def tighten(database: Path | None, artifacts: Path) -> list[str]:
    """Make an existing store private: what was changed, for the caller to say once."""
    changed: list[str] = []
    files: Iterable[Path] = ()
    if database is not None:
        files = [database, *(database.with_name(database.name + s) for s in _SIDE_FILES)]
        parent = database.parent
        if parent.name == _DEFAULT_DIR and _chmod(parent, DIR_MODE, only_looser=True):
            changed.append(str(parent))
    for path in files:
        if _chmod(path, FILE_MODE, only_looser=True):
            changed.append(str(path))
    # The artifact directories (a few hundred at most); blobs inside a 0700 directory are
    # out of everyone else's reach, whatever their own bits.
    if artifacts.is_dir():
        for directory in (artifacts, artifacts / "tmp", artifacts / "sha256"):
            if _chmod(directory, DIR_MODE, only_looser=True):
                changed.append(str(directory))
        try:
            fanout = list((artifacts / "sha256").iterdir())
        except OSError:
            fanout = []
        for directory in fanout:
            if directory.is_dir() and _chmod(directory, DIR_MODE, only_looser=True):
                changed.append(str(directory))
    return changed


_SIDE_FILES = ("-wal", "-shm", "-journal", ".reserve")


def check_owned(path: Path) -> None:
    """Refuse a directory of the store that another user owns (a pre-made ``/tmp/...``): they
    could read or swap what is kept there. OSError (PermissionError) if so; nothing if it is
    missing."""
    try:
        owner = path.stat().st_uid
    except FileNotFoundError:
        return
    if owner != os.geteuid():
        raise PermissionError(
            f"{path} belongs to another user (uid {owner}), who could read or change what the "
            "store keeps there; remove it, or put the store elsewhere"
        )
