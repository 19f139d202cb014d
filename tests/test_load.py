"""The loader: file formats, Harmont IR forms, warnings, and every rejection with its position."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import absent
from structlog.testing import capture_logs

import executor
from executor import BuildFileError, CycleError, EdgeKind, load_build, load_plan, plan_build_text
from executor.store import open_store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
INVALID = EXAMPLES / "invalid"


def _expected_substrings() -> dict[str, str]:
    rows = re.findall(r"^\| ([\w.-]+) \| `([^`]+)` \|", (INVALID / "EXPECTED.md").read_text(), re.M)
    return dict(rows)


def _error(text: str, *, name: str = "build.yaml", json_format: bool = False) -> str:
    with pytest.raises(BuildFileError) as info:
        plan_build_text(text, name=name, json_format=json_format)
    return str(info.value)


@pytest.mark.parametrize(
    "path", sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".json")), ids=str
)
def test_load_plans_every_valid_example(path: Path) -> None:
    plan = load_plan(path)
    assert len(plan) >= 3
    assert plan.source == path


def test_load_every_invalid_example_has_an_expectation() -> None:
    files = {p.name for p in INVALID.iterdir() if p.suffix in (".yaml", ".json")}
    assert files == set(_expected_substrings())


@pytest.mark.parametrize("name,expected", sorted(_expected_substrings().items()))
def test_load_rejects_invalid_example(name: str, expected: str) -> None:
    path = INVALID / name
    with pytest.raises(BuildFileError) as info:
        load_plan(path)
    message = str(info.value)
    assert expected in message
    assert message.startswith(str(path))
    for diagnostic in info.value.diagnostics:
        assert diagnostic.file == str(path)


def test_load_unknown_dependency_names_file_line_column_and_fix() -> None:
    text = "steps:\n  - key: test\n    command: make test\n    depends_on: [deps, compile]\n"
    text += "  - key: deps\n    command: make deps\n"
    assert _error(text) == (
        "build.yaml:4:24: step 'test': depends_on names 'compile', which no step defines; "
        "define a step with key 'compile' or remove it"
    )


def test_load_unknown_dependency_suggests_a_close_key() -> None:
    text = (
        "steps:\n  - {key: compile, command: cc}\n  - {key: test, command: t, depends_on: compil}"
    )
    assert "did you mean 'compile'?" in _error(text)


def test_load_reports_every_problem_sorted_by_position() -> None:
    text = "steps:\n  - key: a\n    command: x\n    timeout_seconds: 0\n  - key: b\n    cmd: 7\n"
    lines = _error(text).splitlines()
    assert [line.split(": ")[0] for line in lines] == ["build.yaml:4:22", "build.yaml:6:10"]
    assert "timeout_seconds is 0: must be above 0" in lines[0]
    assert "cmd must be a string, got integer 7; use one shell string" in lines[1]


def test_load_cycle_error_lists_the_cycle_and_points_at_an_edge() -> None:
    text = "steps:\n  - {key: lint, command: l, depends_on: test}\n"
    text += "  - {key: test, command: t, depends_on: [lint]}\n"
    with pytest.raises(CycleError) as info:
        plan_build_text(text, name="build.yaml")
    assert info.value.cycle == ("lint", "test", "lint")
    assert str(info.value).startswith(
        "build.yaml:2:41: step 'lint': dependency cycle: lint -> test"
    )


def test_load_cycle_through_a_wait_barrier() -> None:
    text = "steps:\n  - {key: a, command: x, depends_on: b}\n  - wait\n  - {key: b, command: y}\n"
    with pytest.raises(CycleError) as info:
        plan_build_text(text)
    assert info.value.cycle == ("a", "b", "a")


def test_load_yaml_duplicate_mapping_key() -> None:
    message = _error("steps:\n  - key: a\n    command: x\n    command: y\n")
    assert message == "build.yaml:4:5: duplicate key 'command' (first at line 3); keep only one"


def test_load_json_duplicate_key_with_position() -> None:
    text = '{"steps": [{"key": "a", "command": "x",\n "key": "b"}]}'
    assert _error(text, name="b.json", json_format=True) == (
        "b.json:2:2: duplicate key 'key' in one JSON object; keep only one"
    )


def test_load_json_errors_have_positions() -> None:
    text = '{\n  "steps": [\n    {"key": "a", "command": "x", "timeout_seconds": "9"}\n  ]\n}\n'
    assert _error(text, name="b.json").startswith("b.json:3:53: step 'a': timeout_seconds must be")


def test_load_invalid_json_syntax_position() -> None:
    assert _error('{"steps": [}', name="b.json").startswith("b.json:1:12: invalid JSON:")


def test_load_file_starting_with_brace_is_json_or_else_yaml_flow() -> None:
    plan = plan_build_text("{steps: [{key: a, command: x}]}", name="build.yaml")
    assert plan.order == ("a",)
    assert "invalid JSON" in _error('{"steps": [{"key": "a",]}', name="build.yaml")
    # Valid YAML that is not JSON is judged as YAML: its own mistakes, at their place.
    message = _error("{steps: [{key: a, cmd: x, env: {true: y}}]}", name="build.yaml")
    assert message.startswith("build.yaml:1:33: mapping key 'true' is read as a boolean")


def test_load_graph_form_reports_node_and_edge_problems_with_the_field_problems() -> None:
    text = json.dumps(
        {
            "version": "0",
            "graph": {
                "nodes": [
                    {"step": "echo"},
                    {"step": {"key": "b", "cmd": "x", "timeout_seconds": "z"}},
                    {"step": {"key": "c", "cmd": "y"}},
                ],
                "edges": [[False, True, "depends_on"], [1, 2, "blocks"], [1, 9, "depends_on"]],
                "node_holes": ["x"],
            },
        }
    )
    lines = [line.split(": ", 1)[1] for line in _error(text, name="g.json").splitlines()]
    assert lines == [
        "graph.nodes[0].step is string 'echo'; it must be a mapping with key and cmd",
        "step 'b': timeout_seconds must be a number, got string 'z'; use a number of seconds "
        "above 0 and at most 604800 (7 days), or leave it out",
        "graph.edges[0] is [False, True, 'depends_on']; an edge is [from, to, kind] with the "
        'node indices from and to and kind "depends_on" or "builds_in"',
        'graph.edges[1] has the kind \'blocks\'; an edge\'s kind is "depends_on" or "builds_in"',
        "graph.edges[2] names the node index 9, which is not a node of the graph; fix the index "
        "or remove the edge",
        "graph.node_holes[0] is string 'x'; node_holes lists the indices (integers from 0) left "
        "free by removed nodes",
    ]


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BuildFileError, match="no such file; check the path"):
        load_build(tmp_path / "nope.yaml")


def test_load_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(BuildFileError, match="is a directory; pass the build file inside it"):
        load_build(tmp_path)


def test_load_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"steps:\n  - {key: caf\xe9, command: x}\n")
    with pytest.raises(BuildFileError, match=r"not UTF-8 text \(byte 0xe9 at offset 20\)"):
        load_build(path)


def test_load_deeply_nested_yaml_is_a_clear_error() -> None:
    message = _error("steps: " + "[" * 5000 + "]" * 5000)
    assert message.startswith("build.yaml:1:1007: invalid YAML:")
    assert "exceeded maximum nesting depth; fix the syntax here" in message


def test_load_deeply_nested_json_is_a_clear_error() -> None:
    message = _error('{"steps": ' + "[" * 100_000 + "]" * 100_000 + "}", name="b.json")
    assert message == "b.json: the JSON is nested too deeply; a build file needs a few levels"


def test_load_block_step_type_is_refused() -> None:
    message = _error("steps:\n  - {type: block, key: b}\n  - {key: a, command: x}\n")
    assert "step type 'block' is not supported" in message


def test_load_yaml_forms_depends_on_string_and_list() -> None:
    plan = plan_build_text(
        "steps:\n  - {key: a, cmd: x}\n  - {key: b, command: y}\n"
        "  - {key: c, command: z, depends_on: a}\n  - {key: d, command: z, depends_on: [a, b]}\n"
    )
    assert plan.prerequisites("c") == ("a",)
    assert plan.prerequisites("d") == ("a", "b")
    assert plan.step("a").command == "x"


def test_load_wait_barrier_forms_and_continue_on_failure() -> None:
    plan = plan_build_text(
        "steps:\n  - {key: a, command: x}\n  - wait\n  - {key: b, command: y}\n"
        "  - {type: wait, continue_on_failure: true}\n  - {key: c, command: z}\n"
    )
    edges = {(e.source, e.target): e for e in plan.edges}
    assert set(edges) == {("a", "b"), ("b", "c")}
    assert edges[("a", "b")].kinds == (EdgeKind.WAIT,) and not edges[("a", "b")].tolerant
    assert edges[("b", "c")].continue_on_failure and edges[("b", "c")].tolerant


def test_load_consecutive_waits_still_order_the_groups() -> None:
    plan = plan_build_text(
        "steps:\n  - wait\n  - {key: a, command: x}\n  - wait\n  - wait\n  - {key: b, command: y}\n"
    )
    assert plan.prerequisites("b") == ("a",)
    assert plan.prerequisites("a") == ()


def test_load_normalizes_policies_with_defaults() -> None:
    plan = plan_build_text(
        "steps:\n  - key: a\n    command: x\n    retry_policy: {limit: 2, exit_codes: [1, 137]}\n"
        "    soft_fail_policy: true\n"
    )
    step = plan.step("a")
    assert step.retry_policy is not None and step.soft_fail_policy is not None
    assert step.retry_policy.model_dump(mode="json") == {
        "limit": 2,
        "exit_codes": [1, 137],
        "on_timeout": False,
        "backoff": {"initial_seconds": 0.0, "factor": 2.0, "max_seconds": 300.0, "jitter": True},
    }
    assert step.soft_fail_policy.model_dump(mode="json") == {"exit_codes": "*"}


def test_load_soft_fail_false_means_no_policy() -> None:
    plan = plan_build_text("steps:\n  - {key: a, command: x, soft_fail_policy: false}\n")
    assert plan.step("a").soft_fail_policy is None


def test_load_harmont_flat_ir_with_cloud_fields_warns_once() -> None:
    text = json.dumps(
        {
            "version": "0",
            "default_image": "ubuntu:24.04",
            "steps": [
                {"type": "command", "key": "a", "cmd": "x", "image": "alpine", "cache": {}},
                {"type": "wait"},
                {"type": "command", "key": "b", "cmd": "y", "runner": "docker"},
            ],
        }
    )
    with capture_logs() as logs:
        plan = plan_build_text(text, name="ir.json")
    assert plan.order == ("a", "b")
    warnings = [entry for entry in logs if entry["event"] == "cloud_fields_ignored"]
    assert len(warnings) == 1
    assert warnings[0]["fields"] == ["cache", "default_image", "image", "runner"]


def test_load_harmont_graph_form_edges_env_and_holes() -> None:
    text = json.dumps(
        {
            "version": "0",
            "graph": {
                "nodes": [
                    {"step": {"key": "a", "cmd": "x", "image": "u"}, "env": {"CI": "1"}},
                    {"step": {"key": "b", "cmd": "y"}, "env": {}},
                    {"step": {"key": "c", "cmd": "z"}, "env": {"X": "2"}},
                ],
                "node_holes": [1],
                "edge_property": "directed",
                "edges": [[0, 2, "builds_in"], [0, 3, "depends_on"], [2, 3, "depends_on"]],
            },
        }
    )
    plan = plan_build_text(text, name="g.json")
    assert plan.step("b").builds_in == "a"
    assert plan.step("c").depends_on == ("a", "b")
    assert plan.step("a").env == {"CI": "1"}
    assert plan.order == ("a", "b", "c")


def test_load_graph_form_bad_edge_points_at_the_edge() -> None:
    text = '{"version": "0", "graph": {"nodes": [{"step": {"key": "a", "cmd": "x"}}],\n'
    text += '"edges": [[0, 5, "depends_on"]]}}'
    message = _error(text, name="g.json")
    assert message.startswith(
        "g.json:2:15: graph.edges[0] names the node index 5, which is not a node of the graph"
    )


def test_load_graph_form_error_inside_a_node_points_into_it() -> None:
    text = '{"version": "0", "graph": {"nodes": [\n{"step": {"key": "a", "cmd": ""}}],\n'
    text += '"edges": []}}'
    assert _error(text, name="g.json").startswith(
        "g.json:2:30: step 'a': cmd is empty; use one shell string"
    )


def test_load_graph_form_cycle_points_at_an_edge() -> None:
    text = '{"version": "0", "graph": {"nodes": [{"step": {"key": "a", "cmd": "x"}},\n'
    text += '{"step": {"key": "b", "cmd": "y"}}],\n"edges": [[0, 1, "depends_on"],\n'
    text += '[1, 0, "depends_on"]]}}'
    assert _error(text, name="g.json").startswith("g.json:4:1: step 'a': dependency cycle: a -> b")


def test_load_harmont_dsl_output(tmp_path: Path) -> None:
    try:
        import harmont as hm
    except ImportError:
        absent(
            "Harmont's Python DSL (the `harmont` package on PyPI) is not installed, so its IR "
            "output is not loaded: pip install -e '.[test]' (or 'harmont==0.0.9')"
        )
    root = hm.sh("make deps", label="Install deps", key="deps")
    test = root.sh("make test", key="test")
    lint = root.fork().sh("make lint", key="lint", env={"STRICT": "1"})
    deploy = hm.sh("./deploy.sh", key="deploy")
    pipeline = hm.pipeline([test, lint, hm.wait(), deploy], env={"CI": "true"})
    path = tmp_path / "pipeline.json"
    path.write_text(hm.pipeline_to_json(pipeline, now=0, pipeline_org="o", pipeline_slug="p"))
    with capture_logs() as logs:
        plan = load_plan(path)
    assert [e["fields"] for e in logs if e["event"] == "cloud_fields_ignored"] == [["image"]]
    assert plan.order == ("deps", "test", "lint", "deploy")
    assert plan.step("test").builds_in == "deps"
    assert plan.step("lint").env["STRICT"] == "1" and plan.step("lint").env["CI"] == "true"
    assert set(plan.prerequisites("deploy")) == {"deps", "test", "lint"}
    assert plan.step("deps").label == "Install deps"


def test_load_public_api_is_reexported() -> None:
    for name in executor.__all__:
        assert hasattr(executor, name), name


def test_load_step_env_overlays_build_env() -> None:
    plan = plan_build_text(
        'env: {CI: "true", MODE: build}\nsteps:\n  - {key: a, command: x, env: {MODE: test}}\n'
    )
    assert plan.environment("a") == {"CI": "true", "MODE": "test"}


def test_load_misplaced_nested_field_lists_the_fields_of_where_it_is() -> None:
    message = _error("retry_policy: {limit: 1}\nsteps:\n  - {key: a, command: x}\n")
    assert "unknown field 'retry_policy'; fields of a build file are: version" in message


def test_load_env_name_errors_say_what_to_do() -> None:
    message = _error('steps:\n  - {key: a, command: x, env: {"A=B": c, "": d}}\n')
    assert "env name 'A=B' contains '=' or a NUL byte; rename the variable" in message
    assert "env has a variable with an empty name; give it a name or remove it" in message


def test_load_artifact_globs_stay_inside_the_working_directory() -> None:
    message = _error("steps:\n  - {key: a, command: x, artifact_paths: [ok, ../x, '']}\n")
    assert "artifact_paths[1] is '../x', which uses '..'; write the path" in message
    assert "artifact_paths[2] is empty" in message


def test_load_yaml_exponent_number_gets_a_hint() -> None:
    message = _error("steps:\n  - {key: a, command: x, timeout_seconds: 1e3}\n")
    assert "YAML 1.1 reads 1e3 as text: write it as 1000" in message


def test_load_null_is_named_as_nothing() -> None:
    assert "steps must be a list, got nothing (null)" in _error("steps:\n")


# --- IR that real Harmont pipelines use (SPEC §1) ---------------------------------------------


def _graph(*nodes: dict[str, object], edges: list[list[object]] | None = None) -> str:
    return json.dumps({"version": "0", "graph": {"nodes": list(nodes), "edges": edges or []}})


def test_load_graph_node_secrets_are_ignored_with_the_cloud_warning() -> None:
    text = _graph({"step": {"key": "a", "cmd": "echo a"}, "env": {}, "secrets": ["TOKEN"]})
    with capture_logs() as logs:
        plan = plan_build_text(text, name="g.json")
    assert plan.order == ("a",)
    (warning,) = [e for e in logs if e["event"] == "cloud_fields_ignored"]
    assert warning["fields"] == ["secrets"]


def test_load_graph_step_eval_cmd_is_its_command() -> None:
    text = _graph(
        {"step": {"key": "a", "eval": {"type": "cmd", "cmd": "echo a"}}, "env": {}},
        {"step": {"key": "b", "cmd": "echo b"}, "env": {}},
        edges=[[0, 1, "depends_on"]],
    )
    plan = plan_build_text(text, name="g.json")
    assert plan.step("a").command == "echo a"
    assert plan.prerequisites("b") == ("a",)


def test_load_step_eval_dynamic_is_refused_saying_why() -> None:
    text = _graph({"step": {"key": "gen", "eval": {"type": "dynamic", "script": "x"}}})
    message = _error(text, name="g.json", json_format=True)
    assert message.startswith("g.json:1:")
    assert "step 'gen': is a dynamic step" in message
    assert "eval {type: cmd, cmd: ...}" in message


@pytest.mark.parametrize(
    ("step", "says"),
    [
        ({"key": "a", "cmd": "x", "eval": {"type": "cmd", "cmd": "y"}}, "has both eval and cmd"),
        ({"key": "a", "eval": "echo"}, "eval is string 'echo'; use {type: cmd, cmd: <shell"),
        ({"key": "a", "eval": {"type": "cmd"}}, "has no command"),
        ({"key": "a", "eval": {"type": "cmd", "cmd": "x", "extra": 1}}, "unknown field 'extra'"),
        ({"key": "a", "eval": {"type": "shell"}}, "eval type is 'shell'"),
    ],
)
def test_load_step_eval_mistakes_are_located_errors(step: dict[str, object], says: str) -> None:
    message = _error(_graph({"step": step}), name="g.json", json_format=True)
    assert says in message and message.startswith("g.json:1:"), message


@pytest.mark.parametrize(
    "text",
    [
        "steps: []\n",
        "steps:\n  - wait\n",
        '{"version": "0", "steps": []}',
        '{"version": "0", "graph": {"nodes": [], "edges": []}}',
    ],
    ids=["yaml", "only-a-wait", "flat-ir", "graph-ir"],
)
def test_load_a_pipeline_with_no_steps_is_valid_and_its_build_passes(
    text: str, tmp_path: Path
) -> None:
    plan = plan_build_text(text, name="empty")
    assert len(plan) == 0 and plan.order == () and plan.levels == () and plan.critical_path == ()
    result = executor.run_build_sync(plan, db=tmp_path / "h.db", pipeline="empty")
    assert result.state.value == "passed" and result.exit_status == 0 and not result.jobs
    with open_store(tmp_path / "h.db") as store:
        (build,) = store.list_builds()
    assert build.state.value == "passed" and build.finished_at is not None


def test_load_graph_form_messages_name_graph_nodes_not_steps() -> None:
    text = _graph({"step": {"key": "a", "cmd": "x"}}, {"step": {"key": "a", "cmd": "y"}})
    message = _error(text, name="g.json", json_format=True)
    assert "duplicate step key 'a': graph.nodes[0] already uses it" in message
    assert "step #" not in message


def test_load_graph_node_that_is_a_wait_is_refused() -> None:
    text = _graph({"step": {"key": "a", "cmd": "x"}}, {"step": {"type": "wait"}})
    message = _error(text, name="g.json", json_format=True)
    assert "a graph node's step is a wait" in message and "depends_on edges" in message


def test_load_yaml_keys_that_are_not_text_are_each_a_located_error() -> None:
    text = "steps:\n  - key: a\n    command: x\n    1: y\n    true: z\n"
    message = _error(text)
    assert message.splitlines() == [
        "build.yaml:4:5: mapping key '1' is read as a number, not a name (YAML reads unquoted "
        'numbers, true/false, yes/no, on/off and null as values); quote it: "1"',
        "build.yaml:5:5: mapping key 'true' is read as a boolean, not a name (YAML reads "
        'unquoted numbers, true/false, yes/no, on/off and null as values); quote it: "true"',
    ]
