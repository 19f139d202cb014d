"""Bad input never gets past the loader as anything but our documented error (SPEC §1): random
text, random data, mutations of the real examples, deep nesting, huge strings, odd unicode and
NUL bytes either plan or raise BuildFileError with a message, never another exception, never a
hang. And the API's hand-written hostile paths and queries: SQL metacharacters, traversal,
overlong values."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import asgi_client, assert_sound, mint_token

import executor
from executor.api import create_app
from executor.errors import BuildFileError
from executor.load import plan_build_text
from executor.plan import Plan
from executor.store import open_store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VALID = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".json"))
FUZZ = settings(
    max_examples=150,
    deadline=timedelta(seconds=10),  # a hang (or a quadratic blow-up) fails the example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def _loads_or_refuses(text: str, *, json_format: bool) -> None:
    """The property: a Plan, or BuildFileError with a message; nothing else escapes."""
    try:
        plan = plan_build_text(text, name="fuzz", json_format=json_format)
    except BuildFileError as exc:
        assert str(exc).strip(), "an error without a message"
        return
    assert isinstance(plan, Plan)


odd_text = st.text(
    alphabet=st.characters(codec="utf-8", categories=None, exclude_categories=("Cs",)),
    max_size=300,
)


@FUZZ
@given(text=odd_text, json_format=st.booleans())
def test_fuzz_random_text(text: str, json_format: bool) -> None:
    _loads_or_refuses(text, json_format=json_format)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["steps", "key", "command", "depends_on", "wait", "*", "", "\x00", "-1"]),
)
keys = st.one_of(
    st.sampled_from(
        [
            "steps",
            "key",
            "command",
            "cmd",
            "depends_on",
            "builds_in",
            "retry_policy",
            "soft_fail_policy",
            "timeout_seconds",
            "env",
            "artifact_paths",
            "concurrency",
            "type",
            "nodes",
            "edges",
            "version",
            "limit",
            "exit_codes",
            "backoff",
        ]
    ),
    st.text(max_size=10),
    # YAML keys that are not text (`1:`, `true:`, `~:`): a located error, never a crash
    st.integers(-3, 3),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)
data = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=6),
    max_leaves=40,
)


@FUZZ
@given(value=data, as_json=st.booleans())
def test_fuzz_random_data(value: Any, as_json: bool) -> None:
    if as_json:
        text = json.dumps(value, allow_nan=True)
    else:
        text = yaml.safe_dump(value, allow_unicode=True, sort_keys=False)
    _loads_or_refuses(text, json_format=as_json)


@pytest.mark.parametrize(
    "text",
    [
        "steps:\n  - key: a\n    command: x\n    1: y\n",
        "graph:\n  nodes:\n    - step: {key: a, cmd: x}\n      1: z\n      env: {}\n"
        "  2: q\n  foo: bar\n",
        "true: 1\nsteps: []\n",
        "steps:\n  - {key: a, command: x, env: {on: '1', FOO: bar}}\n",
        "? [a, b]\n: 1\nsteps: []\n",
        "~: x\nsteps: []\n",
    ],
    ids=["step", "graph-and-node", "top", "env-on", "list-key", "null-key"],
)
def test_fuzz_non_string_yaml_keys_are_a_located_error(text: str) -> None:
    with pytest.raises(BuildFileError) as info:
        plan_build_text(text, name="keys.yaml")
    for diagnostic in info.value.diagnostics:
        assert diagnostic.line is not None and diagnostic.column is not None, diagnostic
        assert "key" in diagnostic.message and "quote" in diagnostic.message, diagnostic


@FUZZ
@given(
    source=st.sampled_from(VALID),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["delete", "insert", "duplicate_line", "swap_lines", "truncate"]),
            st.integers(min_value=0, max_value=10**6),
            st.integers(min_value=0, max_value=10**6),
            st.text(max_size=8),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_fuzz_mutations_of_the_real_examples(
    source: Path, edits: list[tuple[str, int, int, str]]
) -> None:
    text = source.read_text()
    for kind, a, b, insert in edits:
        n = max(len(text), 1)
        i, j = sorted((a % n, b % n))
        lines = text.split("\n")
        if kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + insert + text[i:]
        elif kind == "truncate":
            text = text[:i]
        elif kind == "duplicate_line" and lines:
            k = a % len(lines)
            text = "\n".join([*lines[: k + 1], lines[k], *lines[k + 1 :]])
        elif lines:
            x, y = a % len(lines), b % len(lines)
            lines[x], lines[y] = lines[y], lines[x]
            text = "\n".join(lines)
    _loads_or_refuses(text, json_format=source.suffix == ".json")


@pytest.mark.parametrize(
    ("text", "json_format"),
    [
        ("[" * 100_000, True),
        ("[" * 100_000 + "]" * 100_000, True),
        ('{"a":' * 50_000 + "1" + "}" * 50_000, True),
        ("[" * 100_000, False),
        ("- " * 20_000 + "x", False),
        ("a: &a [*a]", False),  # a recursive alias
        (
            'a: &a ["x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\n'
            "c: &c [*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c]\n"
            "e: &e [*d,*d,*d,*d,*d,*d,*d,*d]\nsteps: [*e,*e,*e,*e,*e,*e,*e,*e]\n",
            False,
        ),
    ],
    ids=[
        "json-open",
        "json-deep",
        "json-objects",
        "yaml-flow",
        "yaml-block",
        "yaml-recursive",
        "yaml-billion-laughs",
    ],
)
def test_fuzz_deep_or_exploding_input_is_refused(text: str, json_format: bool) -> None:
    with pytest.raises(BuildFileError) as info:
        plan_build_text(text, name="deep", json_format=json_format)
    assert str(info.value).strip()


HUGE = "x" * 5_000_000


def _text_of(spec: dict[str, Any], json_format: bool) -> str:
    return json.dumps(spec) if json_format else yaml.safe_dump(spec)


@pytest.mark.parametrize("json_format", [True, False], ids=["json", "yaml"])
@pytest.mark.parametrize(
    ("step", "expected"),
    [
        ({"key": "a\x00b", "command": "true"}, "key contains the control character '\\x00'"),
        ({"key": "a", "command": "true\x00false"}, "command contains a NUL byte"),
        ({"key": "a", "command": "true", "env": {"X\x00": "1"}}, "env name 'X\\x00' contains"),
        ({"key": "a", "command": "true", "env": {"X": "1\x002"}}, "env.X contains a NUL byte"),
        ({"key": HUGE, "command": "true"}, "is longer than 200 characters"),
    ],
    ids=["key-nul", "command-nul", "env-name-nul", "env-value-nul", "key-huge"],
)
def test_fuzz_nul_bytes_and_a_huge_key_are_refused_naming_the_field(
    step: dict[str, Any], expected: str, json_format: bool
) -> None:
    """No process can receive a NUL byte, and a key is 1-200 characters (SPEC §1): refused,
    one located diagnostic naming the field."""
    with pytest.raises(BuildFileError) as info:
        plan_build_text(_text_of({"steps": [step]}, json_format), name="b", json_format=json_format)
    (diagnostic,) = info.value.diagnostics
    assert expected in diagnostic.message, diagnostic
    assert diagnostic.line is not None and diagnostic.column is not None, diagnostic


@pytest.mark.parametrize("json_format", [True, False], ids=["json", "yaml"])
def test_fuzz_a_huge_key_is_refused_with_a_message_of_bounded_size(json_format: bool) -> None:
    """A message shows a bad value cut short (model.show_value), never 5 MB of it."""
    text = _text_of({"steps": [{"key": HUGE, "command": "true"}]}, json_format)
    with pytest.raises(BuildFileError) as info:
        plan_build_text(text, name="b", json_format=json_format)
    assert len(str(info.value)) < 1000, str(info.value)[:300]


@pytest.mark.parametrize("json_format", [True, False], ids=["json", "yaml"])
def test_fuzz_a_huge_command_is_planned_intact(json_format: bool) -> None:
    """SPEC §1 sets no length limit on a command: 5 MB of it loads, unchanged."""
    text = _text_of({"steps": [{"key": "a", "command": HUGE}]}, json_format)
    plan = plan_build_text(text, name="b", json_format=json_format)
    assert plan.step("a").command == HUGE


# --- the API's hostile paths and queries -----------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("hostile")
    (work / "b.yaml").write_text(
        "steps:\n  - {key: a, command: 'echo a > a.txt', artifact_paths: ['*.txt']}\n"
    )
    db = work / "harmont.db"
    assert executor.run_build_sync(work / "b.yaml", db=db).exit_status == 0
    return db, mint_token(db)


HOSTILE = [
    "' OR '1'='1",
    "1; DROP TABLE builds; --",
    '" OR ""="',
    "%27%20OR%201=1--",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "..\\..\\windows",
    "%00",
    "\u202e\u0000",
    "a" * 10_000,
    "😀" * 500,
    "%ff%fe",
]
# Each path with the one answer every hostile value must get there (SPEC §6.1, docs/api.md):
# no such org/pipeline/job/artifact is its 404 (a malformed id included), a build number or a
# limit that is not an integer is 422, a cursor this server did not hand out is 400, and the
# log stream refuses a token it cannot read with Harmont's flat 401.
PATHS = [
    ("/api/v0/organizations/{v}/pipelines", 404, "organization_not_found"),
    ("/api/v0/organizations/local/pipelines/{v}", 404, "pipeline_not_found"),
    ("/api/v0/organizations/local/pipelines/b/builds/{v}", 422, "invalid_request"),
    ("/api/v0/organizations/local/pipelines/b/builds/1/jobs/{v}", 404, "job_not_found"),
    ("/api/v0/organizations/local/pipelines/b/builds/1/jobs/{v}/log", 404, "job_not_found"),
    (
        "/api/v0/organizations/local/pipelines/b/builds/1/artifacts/{v}/download",
        404,
        "artifact_not_found",
    ),
    ("/v0/jobs/{v}/logs?token={v}", 401, "log_stream_unauthorized"),
    (
        "/api/v0/organizations/local/pipelines/b/builds?cursor={v}&limit={v}",
        422,
        "invalid_request",
    ),
    (
        "/api/v0/organizations/local/pipelines/b/builds/1/artifacts?cursor={v}",
        400,
        "invalid_cursor",
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("template", "status", "code"), PATHS, ids=[p[0] for p in PATHS])
async def test_fuzz_api_hostile_values_get_an_envelope_and_change_nothing(
    api: tuple[Path, str], template: str, status: int, code: str
) -> None:
    db, secret = api
    with open_store(db) as store:
        before = [(b.id, b.state) for b in store.list_builds()]
        app = create_app(store=store)
        async with asgi_client(app, secret) as client:
            for value in HOSTILE:
                # Percent-encoded, as a client must send it: the server decodes it back.
                response = await client.get(template.replace("{v}", quote(value, safe="")))
                assert response.status_code == status, (value, response.text)
                if template.startswith("/v0/jobs/"):  # Harmont's flat refusal: no envelope
                    assert response.json()["code"] == code, (value, response.text)
                    continue
                error = response.json()["error"]
                assert error["code"] == code, (value, response.text)
                assert error["request_id"] == response.headers["x-request-id"]
                assert error["message"]
        assert [(b.id, b.state) for b in store.list_builds()] == before
        assert_sound(store)
