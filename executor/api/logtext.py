"""A job's log as text, the way Harmont's clients show it (SPEC §6.2).

The store keeps every chunk of output byte for byte. A client of the live log stream wants
text: each chunk's bytes decoded as UTF-8, invalid sequences replaced by U+FFFD, and a
multi-byte character never split between two chunks, although the process may have written
it in two pieces that two reads of its pipe returned separately. ``LogText`` decodes a job's
chunks in order, one incremental UTF-8 state per stream (stdout, stderr, meta) and attempt
(a new attempt is a new process): the incomplete end of a chunk is held back and given to the
next chunk of the same stream and attempt. ``prime`` restores that state from the bytes before
a resume point, so a client that resumes gets exactly the text it would have got without the
break. Held bytes that no later chunk completes become U+FFFD when the chunk is known to be the
last of its stream and attempt (``final``).

Pure: no I/O; the callers read the chunks.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from typing import Protocol

__all__ = ["STREAM_KINDS", "LogText", "ends_of_streams", "held_back", "text_of"]

STREAM_KINDS = {"stdout": 0, "stderr": 1, "meta": 2}
"""Harmont's ``stream_kind`` of each stored stream: 0 stdout, 1 stderr, 2 meta (harmont-exec's
own lines about the job)."""

_MAX_HELD = 3  # the longest incomplete UTF-8 sequence: a 4-byte character less one byte


def _decoder() -> codecs.BufferedIncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("replace")


def held_back(data: bytes) -> bytes:
    """The incomplete character at the end of ``data`` that a UTF-8 decoder would wait for the
    rest of (0 to 3 bytes). It only depends on the last 3 bytes: an incomplete character
    starts with a lead byte, which no earlier byte can absorb."""
    decoder = _decoder()
    decoder.decode(data[-_MAX_HELD:])
    return bytes(decoder.getstate()[0])


class Chunk(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def attempt(self) -> int: ...

    @property
    def stream(self) -> str: ...

    @property
    def content(self) -> bytes: ...


class LogText:
    """The text of one job's chunks, decoded in seq order (see the module docstring)."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], bytes] = {}

    def prime(self, stream: str, attempt: int, before: bytes) -> None:
        """The chunks to come continue ``before``, the end of that stream and attempt's bytes
        so far (its last 3 bytes are enough)."""
        held = held_back(before)
        if held:
            self._held[stream, attempt] = held
        else:
            self._held.pop((stream, attempt), None)

    def decode(self, chunk: Chunk, *, final: bool = False) -> str:
        """The text of ``chunk``: what it completes of the previous chunk's last character, its
        own characters, and, unless ``final``, not its own incomplete last character (the next
        chunk of its stream and attempt gets it)."""
        key = (chunk.stream, chunk.attempt)
        data = self._held.pop(key, b"") + chunk.content
        if not data or data[-1] < 0x80:  # ends in ASCII (the usual case): nothing held back
            return data.decode("utf-8", "replace")
        decoder = _decoder()
        text = decoder.decode(data, final=final)
        if not final:
            held = bytes(decoder.getstate()[0])
            if held:
                self._held[key] = held
        return text


def ends_of_streams(
    chunks: Sequence[Chunk], *, finished_attempt: int = 0, complete: bool = False
) -> set[int]:
    """The seqs of the chunks in ``chunks`` (in seq order) known to be the last of their
    stream and attempt. An attempt's output is all in the record once the attempt has
    finished, so the last chunk of each stream of an attempt up to ``finished_attempt`` is its
    last, provided ``complete``: nothing recorded after ``chunks`` is missing from them
    (``chunks`` were read after ``finished_attempt`` was, to their end). A chunk followed in
    ``chunks`` by one of a later attempt is the last of its stream and attempt too."""
    last: dict[tuple[str, int], int] = {}
    for chunk in chunks:
        last[chunk.stream, chunk.attempt] = chunk.seq
    if not last:
        return set()
    newest = max(attempt for _, attempt in last)
    return {
        seq
        for (_, attempt), seq in last.items()
        if attempt < newest or (complete and attempt <= finished_attempt)
    }


def text_of(chunks: Iterable[Chunk]) -> str:
    """The whole text of a finished job's chunks (all of them, in seq order)."""
    listed = list(chunks)
    newest = max((c.attempt for c in listed), default=0)
    ends = ends_of_streams(listed, finished_attempt=newest, complete=True)
    decoder = LogText()
    return "".join(decoder.decode(c, final=c.seq in ends) for c in listed)
