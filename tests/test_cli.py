"""`harmont-exec plan` as a user runs it: a real process, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "executor", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_cli_plan_text_shows_levels_and_dependencies() -> None:
    result = _run("plan", str(EXAMPLES / "soft-fail-lint.yaml"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "4 jobs in 3 levels" in out
    assert "level 0\n  lint" in out
    assert "after lint, changelog" in out
    assert "soft-fail on exit 3" in out


def test_cli_plan_json_is_the_normalized_plan() -> None:
    result = _run("plan", "--format", "json", str(EXAMPLES / "flaky-retry.yaml"))
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
    result = _run("plan", "--format", "dot", str(EXAMPLES / "harmont-graph-ir.json"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("digraph build {")
    assert '"setup" -> "compile" [style=bold];' in result.stdout
    assert result.stdout.count("->") == 7


def test_cli_plan_mermaid_draws_every_edge() -> None:
    result = _run("plan", "--format", "mermaid", str(EXAMPLES / "python-ci.yaml"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "flowchart LR"
    assert sum("-->" in line or "-.->" in line or "==>" in line or ".->" in line for line in lines)
    assert any("-. continue .->" in line for line in lines)


def test_cli_plan_warns_about_cloud_fields_on_stderr() -> None:
    result = _run("plan", "--format", "json", str(EXAMPLES / "harmont-flat-ir.json"))
    assert result.returncode == 0
    json.loads(result.stdout)  # stdout stays clean JSON
    warning = json.loads(result.stderr.strip())  # stderr is not a terminal: JSON log lines
    assert warning["event"] == "cloud_fields_ignored" and warning["fields"] == ["image"]


@pytest.mark.parametrize(
    "name", ["three-step-cycle.yaml", "zero-bytes.yaml", "trailing-comma.json", "cmd-is-list.yaml"]
)
def test_cli_plan_invalid_file_exits_2_without_traceback(name: str) -> None:
    result = _run("plan", str(EXAMPLES / "invalid" / name))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(str(EXAMPLES / "invalid" / name))
    assert "Traceback" not in result.stderr


def test_cli_plan_missing_file_exits_2(tmp_path: Path) -> None:
    result = _run("plan", "missing.yaml", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "missing.yaml: no such file; check the path\n")


def test_cli_unknown_format_is_a_usage_error() -> None:
    result = _run("plan", "--format", "svg", str(EXAMPLES / "python-ci.yaml"))
    assert result.returncode == 2
    assert "'svg' is not one of 'text', 'json', 'dot', 'mermaid'" in result.stderr


def test_cli_version() -> None:
    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("harmont-exec, version ")
