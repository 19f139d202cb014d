"""The live log stream's frames, as a strict client of Harmont's wire reads them (SPEC §6.2):
the types of every field, the order of the frames, no ``id`` on ``history`` or ``done``, text
that never splits a character, resume by header and by query. A real `run` process writes
multi-byte characters in two pieces (split at every byte offset), on stdout and stderr, and
harmont-exec's own lines (meta); the real `serve` streams them. The text decoder itself gets
property tests."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from serving import (
    TIMEOUT_S,
    Server,
    bounded,
    create_token,
    output,
    poll,
    server,
    start,
    stop,
)

from executor.api.logtext import LogText, ends_of_streams, held_back, text_of
from executor.store import LogChunk, open_store

__all__ = ["server"]  # a fixture, used here

# Each case: a character written in two pieces, the first piece recorded before the second
# is written (the job waits for a file the test creates once it sees the first piece).
CHARACTERS = ["é", "€", "😀"]
CASES = [(c, k) for c in CHARACTERS for k in range(1, len(c.encode()))]


def _octal(data: bytes) -> str:
    return "".join(f"\\{b:03o}" for b in data)


def _script() -> tuple[str, list[bytes], bytes, bytes]:
    """The job's command, the first pieces (to wait for) in order, and the exact bytes it
    writes on stdout and on stderr."""
    lines = []
    firsts = []
    stdout = b""
    for n, (char, k) in enumerate(CASES):
        data = char.encode()
        lines.append(f"printf 'case {n}: {_octal(data[:k])}'")
        lines.append(f"while [ ! -e go{n} ]; do sleep 0.02; done")
        lines.append(f"printf '{_octal(data[k:])} ok\\n'")
        firsts.append(f"case {n}: ".encode() + data[:k])
        stdout += f"case {n}: ".encode() + data + b" ok\n"
    # stderr: a character split in two, then a byte that is never UTF-8
    euro = "€".encode()
    n = len(CASES)
    lines.append(f"printf 'err {_octal(euro[:2])}' >&2")
    lines.append(f"while [ ! -e go{n} ]; do sleep 0.02; done")
    lines.append(f"printf '{_octal(euro[2:])} \\377 end\\n' >&2")
    firsts.append(b"err " + euro[:2])
    stderr = b"err " + euro + b" \xff end\n"
    # the last thing on stdout: a character that is never completed
    lines.append(f"printf 'cut {_octal(euro[:2])}'")
    stdout += b"cut " + euro[:2]
    return "\n".join(lines), firsts, stdout, stderr


@dataclass(frozen=True)
class Finished:
    server: Server
    job_id: str
    stream_url: str  # with its log token
    stdout: bytes
    stderr: bytes
    started: datetime
    ended: datetime


@pytest.fixture
def finished(server: Server, tmp_path: Path) -> Iterator[Finished]:
    """A real `run` of the splitting job into the server's store, driven to its end."""
    command, firsts, stdout, stderr = _script()
    work = tmp_path / "work"
    work.mkdir()
    step = {"key": "split", "command": command, "artifact_paths": ["missing/*.txt"]}
    (work / "split.json").write_text(json.dumps({"steps": [step]}))
    started = datetime.now(UTC)
    out = tmp_path / "run"
    run = start(["run", "split.json", "--db", server.db], work, out)
    try:
        with open_store(server.db) as store:

            def recorded(stream: str) -> bytes | None:
                builds = store.list_builds()
                if not builds:
                    return None
                (job,) = store.list_jobs(builds[0].id)
                return b"".join(c.content for c in store.read_log(job.id) if c.stream == stream)

            for n, first in enumerate(firsts):
                stream = "stderr" if n == len(CASES) else "stdout"

                def has_first(stream: str = stream, first: bytes = first) -> bool | None:
                    data = recorded(stream)
                    return True if data is not None and data.endswith(first) else None

                poll(has_first, f"piece {n} to be recorded", (run, out))
                (work / f"go{n}").touch()
            assert run.wait(timeout=TIMEOUT_S) == 0, output(out)
            (build,) = store.list_builds()
            (job,) = store.list_jobs(build.id)
        headers = {"Authorization": f"Bearer {create_token(server.db, tmp_path)}"}
        base = server.url.removesuffix("/api/v0")
        path = f"{server.url}/organizations/local/pipelines/split/builds/{build.number}"
        token = httpx.get(f"{path}/log-token", headers=headers, timeout=TIMEOUT_S).json()["token"]
        url = f"{base}/v0/jobs/{job.id}/logs?token={token}"
        yield Finished(server, job.id, url, stdout, stderr, started, datetime.now(UTC))
    finally:
        stop(run)


# --- a strict client -------------------------------------------------------------------------

_FIELD = re.compile(r"(event|data|id): (.*)")


@dataclass
class Frame:
    event: str
    data: Any
    id: str | None


def _frames(text: str) -> list[Frame]:
    """Parse an event stream, refusing anything a strict client would not expect: fields
    other than event, data and id, an event without data, data that is not JSON."""
    frames = []
    for block in text.split("\n\n"):
        if not block:
            continue
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                continue  # a comment (heartbeat)
            match = _FIELD.fullmatch(line)
            assert match, f"unexpected line {line!r}"
            assert match.group(1) not in fields, f"field {match.group(1)} twice in {block!r}"
            fields[match.group(1)] = match.group(2)
        if not fields:
            continue
        assert set(fields) <= {"event", "data", "id"} and "event" in fields and "data" in fields
        frames.append(Frame(fields["event"], json.loads(fields["data"]), fields.get("id")))
    return frames


def _check_chunk(chunk: dict[str, Any], finished: Finished) -> None:
    assert set(chunk) == {"seq", "stream_kind", "content", "ts", "attempt"}, chunk
    assert type(chunk["seq"]) is int and chunk["seq"] >= 1
    assert type(chunk["stream_kind"]) is int and chunk["stream_kind"] in (0, 1, 2)
    assert type(chunk["content"]) is str
    assert type(chunk["ts"]) is int  # unix nanoseconds, within the job's life
    start_ns = int(finished.started.timestamp()) * 10**9
    assert start_ns <= chunk["ts"] <= int(finished.ended.timestamp() + 1) * 10**9
    assert type(chunk["attempt"]) is int and chunk["attempt"] == 1


def _read(
    finished: Finished, *, params: dict[str, str] | None = None, **kwargs: Any
) -> list[Frame]:
    url, _, token = finished.stream_url.partition("?token=")
    response = httpx.get(
        url, params={"token": token, **(params or {})}, timeout=TIMEOUT_S, **kwargs
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return _frames(response.text)


def _chunks(frames: list[Frame], finished: Finished) -> list[dict[str, Any]]:
    """The chunks of a complete stream, checking the frames' order and ids."""
    assert [f.event for f in frames[:1]] == ["history"]
    assert frames[-1].event == "done"
    assert all(f.event == "chunk" for f in frames[1:-1])
    assert frames[0].id is None, "history carries no id"
    assert frames[-1].id is None, "done carries no id"
    assert frames[-1].data == {"state": "passed", "exit_code": 0}
    chunks = list(frames[0].data["chunks"])
    assert set(frames[0].data) == {"chunks"}
    for frame in frames[1:-1]:
        assert frame.id == str(frame.data["seq"])
        chunks.append(frame.data)
    for chunk in chunks:
        _check_chunk(chunk, finished)
    seqs = [c["seq"] for c in chunks]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    return chunks


def test_log_stream_frames_are_harmonts_and_its_text_never_splits_a_character(
    finished: Finished,
) -> None:
    chunks = _chunks(_read(finished), finished)
    by_kind = {
        kind: "".join(c["content"] for c in chunks if c["stream_kind"] == kind)
        for kind in (0, 1, 2)
    }
    # Every piece of output, as text: each stream decoded as a whole, the character that was
    # never completed (the end of stdout) replaced.
    assert by_kind[0] == finished.stdout.decode("utf-8", "replace")
    assert by_kind[0].endswith("cut \ufffd")
    assert by_kind[1] == finished.stderr.decode("utf-8", "replace") == "err € \ufffd end\n"
    assert by_kind[2].startswith("[harmont-exec] artifact_paths: 'missing/*.txt' matched no file")
    # ...and every character that the job wrote in two pieces arrives whole in one chunk:
    # no chunk has a replacement character but for the bytes that are not UTF-8.
    for n, (char, _) in enumerate(CASES):
        assert any(f"{char} ok" in c["content"] for c in chunks if c["stream_kind"] == 0), n
    assert sum(c["content"].count("\ufffd") for c in chunks) == 2  # the \377 and the cut one
    (last,) = [c for c in chunks if c["stream_kind"] == 0][-1:]
    assert last["content"].endswith("cut \ufffd")
    # The stored bytes are unchanged: the raw log is what the job wrote.
    with open_store(finished.server.db) as store:
        raw = list(store.read_log(finished.job_id))
    assert b"".join(c.content for c in raw if c.stream == "stdout") == finished.stdout
    assert b"".join(c.content for c in raw if c.stream == "stderr") == finished.stderr
    assert any(c.stream == "meta" for c in raw)
    # Each character split really was recorded in two chunks (the test is about that).
    assert len(raw) > len(CASES) + 2


# Resume and refusals are the API's own logic over any store: tested on SQLite only (the
# frames test above runs on both backends).
SQLITE_ONLY = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)

# (Last-Event-ID, ?last_event_id=, the seq replayed after; None: nothing left to replay)
RESUME_VALUES = [
    ("-5", None, 0),  # a negative value counts as 0
    (None, "-1", 0),
    ("abc", None, 0),  # not an integer: ignored
    ("abc", "2", 2),  # ...so the query parameter is used
    ("3", "1", 3),  # the header first
    (None, "1.5", 0),
    ("2x", None, 0),  # not exactly an integer
    ("+2", None, 2),
    ("99999999999999999999999", None, None),  # beyond every seq: nothing to replay
]


@SQLITE_ONLY
def test_log_stream_resumes_after_every_seq_by_header_and_by_query(finished: Finished) -> None:
    full = _chunks(_read(finished), finished)
    for chunk in [{"seq": 0}, *full]:
        after = chunk["seq"]
        rest = [c for c in full if c["seq"] > after]
        by_header = _chunks(_read(finished, headers={"Last-Event-ID": str(after)}), finished)
        assert by_header == rest, after
        by_query = _chunks(_read(finished, params={"last_event_id": str(after)}), finished)
        assert by_query == rest, after
    for header, query, expected in RESUME_VALUES:
        got = _chunks(
            _read(
                finished,
                headers={} if header is None else {"Last-Event-ID": header},
                params={} if query is None else {"last_event_id": query},
            ),
            finished,
        )
        assert got == ([] if expected is None else [c for c in full if c["seq"] > expected]), (
            header,
            query,
        )


@SQLITE_ONLY
def test_log_stream_refusals_are_harmonts_flat_bodies(finished: Finished) -> None:
    base, _, query = finished.stream_url.partition("?")
    missing = httpx.get(base, timeout=TIMEOUT_S)
    tampered = httpx.get(f"{finished.stream_url[:-3]}AAA", timeout=TIMEOUT_S)
    garbage = httpx.get(f"{base}?token=not-a-token", timeout=TIMEOUT_S)
    other_job = base.replace(finished.job_id, "00000000-0000-4000-8000-000000000000")
    forbidden = httpx.get(f"{other_job}?{query}", timeout=TIMEOUT_S)
    malformed = httpx.get(f"{base.rsplit('/', 2)[0]}/not-a-uuid/logs?{query}", timeout=TIMEOUT_S)
    for response in (missing, tampered, garbage):
        assert response.status_code == 401, response.text
        body = response.json()
        assert set(body) == {"code", "message"} and body["code"] == "log_stream_unauthorized"
        assert "log-token" in body["message"]
    for response in (forbidden, malformed):
        assert response.status_code == 403, response.text
        body = response.json()
        assert set(body) == {"code", "message"} and body["code"] == "log_stream_forbidden"


# --- the decoder, property-tested -------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    seq: int
    attempt: int
    stream: str
    content: bytes


_TEXTY = st.one_of(
    st.binary(max_size=12),
    st.text(max_size=6).map(lambda t: t.encode()),
    st.sampled_from(["é", "€", "😀", "\U0010ffff"]).map(str.encode),
)


@st.composite
def logs(draw: st.DrawFn) -> list[Piece]:
    """A job's chunks: bytes (often valid UTF-8, sometimes not) on three streams over one to
    three attempts, cut into pieces at arbitrary places."""
    pieces = []
    seq = 0
    for attempt in range(1, draw(st.integers(1, 3)) + 1):
        data = {
            s: b"".join(draw(st.lists(_TEXTY, max_size=6))) for s in ("stdout", "stderr", "meta")
        }
        cuts = draw(st.lists(st.sampled_from(["stdout", "stderr", "meta"]), max_size=25))
        for stream in cuts:
            if not data[stream]:
                continue
            k = draw(st.integers(1, len(data[stream])))
            seq += 1
            pieces.append(Piece(seq, attempt, stream, data[stream][:k]))
            data[stream] = data[stream][k:]
        for stream, rest in data.items():
            if rest:
                seq += 1
                pieces.append(Piece(seq, attempt, stream, rest))
    return pieces


def _expected(pieces: list[Piece], stream: str) -> str:
    """Each attempt's bytes of ``stream`` decoded as a whole."""
    attempts = sorted({p.attempt for p in pieces})
    return "".join(
        b"".join(p.content for p in pieces if p.stream == stream and p.attempt == a).decode(
            "utf-8", "replace"
        )
        for a in attempts
    )


def _ends(pieces: list[Piece]) -> set[int]:
    """The ends of streams of a finished job's whole log."""
    newest = max((p.attempt for p in pieces), default=0)
    return ends_of_streams(pieces, finished_attempt=newest, complete=True)


@given(logs())
def test_logtext_of_a_whole_log_is_each_stream_decoded_as_a_whole(pieces: list[Piece]) -> None:
    decoder = LogText()
    ends = _ends(pieces)
    texts = [(p, decoder.decode(p, final=p.seq in ends)) for p in pieces]
    for stream in ("stdout", "stderr", "meta"):
        assert "".join(t for p, t in texts if p.stream == stream) == _expected(pieces, stream)
    assert text_of(pieces) == "".join(t for _, t in texts)


@given(logs(), st.data())
def test_logtext_resumed_anywhere_gives_the_same_chunks(
    pieces: list[Piece], data: st.DataObject
) -> None:
    ends = _ends(pieces)
    whole = LogText()
    full = [whole.decode(p, final=p.seq in ends) for p in pieces]
    k = data.draw(st.integers(0, len(pieces)))
    resumed = LogText()
    for stream in ("stdout", "stderr", "meta"):
        before = [p for p in pieces[:k] if p.stream == stream]
        if before:  # as the server does: the last chunks of the stream's newest attempt
            attempt = before[-1].attempt
            resumed.prime(
                stream, attempt, b"".join(p.content for p in before if p.attempt == attempt)
            )
    assert [resumed.decode(p, final=p.seq in ends) for p in pieces[k:]] == full[k:]


@given(st.binary(max_size=40))
def test_logtext_held_back_is_what_an_incremental_decoder_waits_for(data: bytes) -> None:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data)
    assert held_back(data) == decoder.getstate()[0]
    assert len(held_back(data)) <= 3


def test_logtext_live_stream_holds_an_unfinished_character_until_its_end_arrives() -> None:
    decoder = LogText()
    first = LogChunk("j", 1, 1, "stdout", "a€".encode()[:3], datetime.now(UTC))
    second = LogChunk("j", 2, 1, "stdout", "€".encode()[2:] + b"b", datetime.now(UTC))
    assert decoder.decode(first) == "a"  # the job is running: the rest may come
    assert decoder.decode(second) == "€b"


def test_logtext_an_attempt_that_finished_ends_its_streams_when_all_was_read() -> None:
    first = Piece(1, 1, "stdout", b"x")
    second = Piece(2, 2, "stdout", b"y")
    # Between attempts (attempt 1 finished, its output all read): its last chunk is its end.
    assert ends_of_streams([first], finished_attempt=1, complete=True) == {1}
    # ...unless the read was cut short (more may follow it), or attempt 1 is still running.
    assert ends_of_streams([first], finished_attempt=1, complete=False) == set()
    assert ends_of_streams([first], finished_attempt=0, complete=True) == set()
    # A chunk of a later attempt ends the earlier attempt's streams whatever else is known.
    assert ends_of_streams([first, second], finished_attempt=0, complete=False) == {1}


@SQLITE_ONLY
def test_log_stream_ends_an_attempts_unfinished_character_once_the_attempt_is_over(
    server: Server, tmp_path: Path
) -> None:
    """Attempt 1 ends inside a character and the job waits for its retry (an hour's backoff):
    a client connecting now gets the attempt's text with the character replaced."""
    (tmp_path / "retry.yaml").write_text(
        "steps:\n"
        "  - key: cut\n"
        "    command: printf 'x\\342\\202'; exit 1\n"
        "    retry_policy: {limit: 1, backoff: {initial_seconds: 3600, jitter: false}}\n"
    )
    out = tmp_path / "run"
    run = start(["run", "retry.yaml", "--db", server.db], tmp_path, out)
    try:
        headers = {"Authorization": f"Bearer {create_token(server.db, tmp_path)}"}
        build = f"{server.url}/organizations/local/pipelines/retry/builds/1"

        def waiting() -> str | None:
            response = httpx.get(f"{build}/jobs", headers=headers, timeout=TIMEOUT_S)
            if response.status_code != 200:
                return None
            (job,) = response.json()["data"]
            return str(job["id"]) if job["state"] == "scheduled" and job["retries_count"] else None

        job_id = poll(waiting, "the job to wait for its retry", (run, out))
        token = httpx.get(f"{build}/log-token", headers=headers, timeout=TIMEOUT_S).json()["token"]
        base = server.url.removesuffix("/api/v0")
        with httpx.stream(
            "GET", f"{base}/v0/jobs/{job_id}/logs", params={"token": token}, timeout=TIMEOUT_S
        ) as response:
            lines = []
            for line in bounded(response.iter_lines(), "the stream's first frame"):
                if line == "" and lines:
                    break  # the first frame is complete
                lines.append(line)
        (history,) = _frames("\n".join(lines) + "\n\n")
        assert history.event == "history"
        assert [c["content"] for c in history.data["chunks"]] == ["x\ufffd"]
    finally:
        stop(run)
