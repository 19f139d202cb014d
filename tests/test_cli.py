"""`harmont-exec plan` as a user runs it: a real process, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from serving import cli

from executor import Edge, EdgeKind, load_plan

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_cli_plan_text_shows_levels_and_dependencies() -> None:
    result = cli("plan", str(EXAMPLES / "soft-fail-lint.yaml"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "4 jobs in 3 levels" in out
    assert "level 0\n  lint" in out
    assert "after lint, changelog" in out
    assert "soft-fail on exit 3" in out


def test_cli_plan_json_is_the_normalized_plan() -> None:
    result = cli("plan", "--format", "json", str(EXAMPLES / "flaky-retry.yaml"))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["order"][0] == "reset"
    assert {"steps", "order", "levels", "edges", "critical_path"} <= set(data)
    flaky = next(s for s in data["steps"] if s["key"] == "flaky-test")
    assert flaky["retry_policy"]["limit"] == 2
    assert flaky["retry_policy"]["backoff"]["jitter"] is True  # a default, filled in
    assert flaky["depends_on"] == ["reset"]
    assert {"from": "reset", "to": "flaky-test"}.items() <= data["edges"][0].items()


def test_cli_plan_dot_draws_every_edge() -> None:
    result = cli("plan", "--format", "dot", str(EXAMPLES / "harmont-graph-ir.json"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("digraph build {")
    assert '"setup" -> "compile" [style=bold];' in result.stdout
    assert result.stdout.count("->") == 7


MERMAID_NODE = re.compile(r'  (n\d+)\["(.*)"\]')
MERMAID_EDGE = re.compile(r"  (n\d+) (-->|==>|-\.->|-\. continue \.->) (n\d+)")


def _mermaid_arrow(edge: Edge) -> str:
    """The arrow plan_to_mermaid's docstring promises: thick = builds_in, dotted = a wait
    barrier only (labelled when it continues on failure), solid = depends_on."""
    if EdgeKind.BUILDS_IN in edge.kinds:
        return "==>"
    if edge.kinds == (EdgeKind.WAIT,):
        return "-. continue .->" if edge.continue_on_failure else "-.->"
    return "-->"


def test_cli_plan_mermaid_draws_every_edge() -> None:
    path = EXAMPLES / "python-ci.yaml"
    result = cli("plan", "--format", "mermaid", str(path))
    assert result.returncode == 0, result.stderr
    first, *lines = result.stdout.splitlines()
    assert first == "flowchart LR"
    nodes = {m[1]: m[2].split(": ", 1)[0] for line in lines if (m := MERMAID_NODE.fullmatch(line))}
    edges = [m.groups() for line in lines if (m := MERMAID_EDGE.fullmatch(line))]
    assert len(nodes) + len(edges) == len(lines), lines  # nothing else is drawn
    plan = load_plan(path)
    assert sorted(nodes.values()) == sorted(plan.order)
    drawn = [(nodes[source], arrow, nodes[target]) for source, arrow, target in edges]
    expected = [(e.source, _mermaid_arrow(e), e.target) for e in plan.edges]
    assert sorted(drawn) == sorted(expected)
    # The example has every kind of edge, so each arrow is checked.
    assert {arrow for _, arrow, _ in expected} == {"-->", "==>", "-.->", "-. continue .->"}


def test_cli_plan_warns_about_cloud_fields_on_stderr() -> None:
    result = cli("plan", "--format", "json", str(EXAMPLES / "harmont-flat-ir.json"))
    assert result.returncode == 0
    json.loads(result.stdout)  # stdout stays clean JSON
    warning = json.loads(result.stderr.strip())  # stderr is not a terminal: JSON log lines
    assert warning["event"] == "cloud_fields_ignored" and warning["fields"] == ["image"]


@pytest.mark.parametrize(
    "name", ["three-step-cycle.yaml", "zero-bytes.yaml", "trailing-comma.json", "cmd-is-list.yaml"]
)
def test_cli_plan_invalid_file_exits_2_without_traceback(name: str) -> None:
    result = cli("plan", str(EXAMPLES / "invalid" / name))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(str(EXAMPLES / "invalid" / name))
    assert "Traceback" not in result.stderr


def test_cli_plan_missing_file_exits_2(tmp_path: Path) -> None:
    result = cli("plan", "missing.yaml", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "missing.yaml: no such file; check the path\n")


def test_cli_unknown_format_is_a_usage_error() -> None:
    result = cli("plan", "--format", "svg", str(EXAMPLES / "python-ci.yaml"))
    assert result.returncode == 2
    assert "'svg' is not one of 'text', 'json', 'dot', 'mermaid'" in result.stderr


def test_cli_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("harmont-exec, version ")
