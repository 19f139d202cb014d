"""What a database's refusal means and what to do about it: THE table of store failures.

A backend only reads its driver's exception (``DriverError``: the driver's code, its message,
the free space where a file store lives); ``classify`` maps that to a ``Failure`` by ``RULES``,
the one table of what each failure looks like on either driver and what the user should do,
and ``store_failure`` makes the StoreError that names the store, shows the driver's message and
says that. The writer and the store ask ``classify`` too: whether the disk is full (free the
reserve) or the store is read-only (read on, skip the recovery writes). No driver is imported
here and no SQL runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from executor.errors import StoreError

__all__ = ["RULES", "DriverError", "Failure", "Rule", "classify", "store_failure"]


class Failure(StrEnum):
    """What kind of trouble a driver's error is."""

    FULL = "full"  # no space left for the database
    RESOURCES = "resources"  # the server is out of connections or memory
    READ_ONLY = "read_only"  # a write was refused: the file, its disk or the server is read-only
    BUSY = "busy"  # another connection held the lock too long
    NOT_A_STORE = "not_a_store"  # not a harmont-exec database, or its tables are gone
    NO_DATABASE = "no_database"
    NO_SCHEMA = "no_schema"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    UNREACHABLE = "unreachable"
    RESTARTING = "restarting"
    CONFLICT = "conflict"  # a serialization failure or a deadlock
    CLOSED = "closed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class DriverError:
    """A driver's exception as a backend reads it."""

    code: str | None  # SQLite's error name (``SQLITE_FULL``), PostgreSQL's SQLSTATE (``53100``)
    message: str  # what the driver said
    free_bytes: int | None = None  # free space where a file store lives (None: unknown, a server)

    @classmethod
    def read(cls, exc: Exception, code: object, free_bytes: int | None = None) -> DriverError:
        """``exc`` with the code its driver gives (not a string: none), its message (or, when
        it has none, its type's name)."""
        message = str(exc).strip() or type(exc).__name__
        return cls(code if isinstance(code, str) else None, message, free_bytes)


@dataclass(frozen=True, slots=True)
class Rule:
    """One failure: the codes (or code prefixes) and the message words that say it, and what to
    do about it in a file store and on a server (None: the rule does not apply there)."""

    failure: Failure
    codes: tuple[str, ...]
    words: str | None  # a regular expression, matched against the lowered message
    file: str | None  # ``{free_now}``: the free space there, when it is known
    server: str | None
    connecting: bool = False  # also any failure to connect that no code or word explained


LOW_SPACE_BYTES = 1 << 20
"""Below this much free space, an I/O error is taken for a full disk (SQLite may say either)."""

RULES: tuple[Rule, ...] = (
    Rule(
        Failure.FULL,
        ("SQLITE_FULL", "53100"),
        r"\bfull",
        "free disk space where the database lives{free_now}, then run the build again",
        "free disk space on the database server, then run the build again",
    ),
    Rule(
        Failure.RESOURCES,
        ("53",),
        None,
        None,
        "the database server is out of resources (connections, memory); retry, or raise its "
        "limits (max_connections)",
    ),
    Rule(
        Failure.READ_ONLY,
        ("SQLITE_READONLY", "25006"),
        r"\bread-?only",
        "make the database file and its directory writable (read commands work on a read-only "
        "store; recording needs to write)",
        "the server is read-only (a standby?); point --db / HARMONT_DB at the primary",
    ),
    Rule(
        Failure.BUSY,
        ("SQLITE_BUSY", "SQLITE_LOCKED"),
        r"\blocked|\bbusy",
        "another process held the database too long; retry when it is done",
        None,
    ),
    Rule(
        Failure.NOT_A_STORE,
        ("SQLITE_NOTADB", "SQLITE_CORRUPT", "42P01"),
        r"\bnot a database|\bmalformed|\bno such table",
        "point --db / HARMONT_DB at a harmont-exec database file",
        "the store's tables are missing: point --db / HARMONT_DB at a harmont-exec store",
    ),
    Rule(
        Failure.NO_DATABASE,
        ("3D000",),
        r"\bdatabase\b.*\bdoes not exist",
        None,
        "create the database first (e.g. createdb NAME), or fix its name in the URL",
    ),
    Rule(
        Failure.NO_SCHEMA,
        ("3F000",),
        None,
        None,
        "create the schema named in the URL's search_path first (CREATE SCHEMA name)",
    ),
    Rule(
        Failure.AUTHENTICATION,
        ("28",),
        r"\bpassword|\brole\b.*\bdoes not exist|\bauthentication failed",
        None,
        "check the user name and password in the URL (or ~/.pgpass)",
    ),
    Rule(
        Failure.PERMISSION,
        ("42501",),
        None,
        None,
        "grant the user in the URL rights to create and write tables in the schema",
    ),
    Rule(
        Failure.UNREACHABLE,
        ("08",),
        r"\bconnection|\btimeout",
        None,
        "check that the PostgreSQL server in the URL is running and reachable",
        connecting=True,
    ),
    Rule(
        Failure.RESTARTING,
        ("57P",),
        None,
        None,
        "the server is shutting down or restarting; retry when it is back",
    ),
    Rule(
        Failure.CONFLICT, ("40",), None, None, "another transaction conflicted with this one; retry"
    ),
    Rule(
        Failure.CLOSED,
        (),
        r"\bclosed",
        "the store was closed; open it again",
        "the store was closed; open it again",
    ),
    Rule(
        Failure.UNKNOWN,
        (),
        None,
        "check the disk and the file's permissions",
        "check the server's log",
    ),
)

_WORDS = {rule.failure: re.compile(rule.words) for rule in RULES if rule.words is not None}
_CONNECT = "connect"  # the action a backend names when it opens a connection


def _first_line(message: str) -> str:
    """The driver's message on one line (PostgreSQL's next lines quote the SQL)."""
    lines = message.strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


def _match(error: DriverError, *, server: bool, action: str) -> tuple[Failure, str]:
    """The first rule for this place whose codes match, else the first whose words do (or
    that explains any failure to connect), else UNKNOWN; with its hint there."""
    rules = [(r, hint) for r in RULES if (hint := r.server if server else r.file) is not None]
    if error.code:
        for rule, hint in rules:
            if rule.codes and error.code.startswith(rule.codes):
                return rule.failure, hint
    lowered = error.message.lower()
    low_space = error.free_bytes is not None and error.free_bytes < LOW_SPACE_BYTES
    for rule, hint in rules:
        words = _WORDS.get(rule.failure)
        if (
            (words is not None and words.search(lowered))
            or (rule.failure is Failure.FULL and low_space and "i/o" in lowered)
            or (rule.connecting and action == _CONNECT)
        ):
            return rule.failure, hint
    return rules[-1][0].failure, rules[-1][1]  # UNKNOWN, the last rule: it has both hints


def classify(error: DriverError, *, server: bool, action: str = "") -> Failure:
    """What ``error`` means in a file store (``server`` False) or on a database server."""
    return _match(error, server=server, action=action)[0]


def store_failure(action: str, error: DriverError, *, store: str, server: bool) -> StoreError:
    """``could not <action> in <store>: <the driver's message>; <what to do>``, where ``store``
    is how messages name it (the file, or ``the PostgreSQL store <URL without password>``)."""
    _, hint = _match(error, server=server, action=action)
    free = error.free_bytes
    hint = hint.format(free_now="" if free is None else f" ({free // 1024} KB free there now)")
    where = "to" if action == _CONNECT else "in"
    return StoreError(f"could not {action} {where} {store}: {_first_line(error.message)}; {hint}")
