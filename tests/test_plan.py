"""The planner's readiness and cascade rules (SPEC §2), on small hand-written builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from executor import (
    BuildFileError,
    CycleError,
    Decision,
    Diagnostic,
    EdgeKind,
    InternalError,
    JobState,
    JobStatus,
    Plan,
    Readiness,
    Settled,
    build_plan,
    parse_build_text,
    plan_build_text,
)

CHAIN = """
steps:
  - {key: build, command: make}
  - {key: test, command: make test, depends_on: build}
  - {key: package, command: make dist, depends_on: test}
  - {key: report, command: make report, depends_on: test, allow_dependency_failure: true}
  - {type: wait, continue_on_failure: true}
  - {key: cleanup, command: rm -rf out}
"""


def _plan(text: str = CHAIN) -> Plan:
    return plan_build_text(text)


def test_plan_order_levels_and_critical_path() -> None:
    plan = _plan()
    assert plan.order == ("build", "test", "package", "report", "cleanup")
    assert plan.levels == (("build",), ("test",), ("package", "report"), ("cleanup",))
    assert plan.critical_path == ("build", "test", "package", "cleanup")
    assert plan.dependents("test") == ("package", "report", "cleanup")


def test_plan_ties_start_in_file_order_even_when_listed_backwards() -> None:
    plan = _plan(
        "steps:\n  - {key: z, command: x, depends_on: [b, a]}\n"
        "  - {key: b, command: x}\n  - {key: a, command: x}\n"
    )
    assert plan.order == ("b", "a", "z")


def test_plan_graph_is_a_networkx_digraph_of_the_same_edges() -> None:
    plan = _plan()
    graph = plan.graph
    assert list(graph.nodes) == list(plan.order)
    assert set(graph.edges) == {(e.source, e.target) for e in plan.edges}
    assert graph.edges["package", "cleanup"]["tolerant"] is True
    assert graph.nodes["report"]["level"] == 2


def test_cursor_skip_names_the_root_cause_not_the_nearest_skipped_job() -> None:
    cursor = _plan().frontier()
    assert cursor.ready() == ("build",)
    settled = cursor.done("build", JobState.FAILED)
    assert sorted(settled, key=lambda s: s.key) == [
        Settled("package", JobState.SKIPPED, "build"),
        Settled("test", JobState.SKIPPED, "build"),
    ]
    assert cursor.ready() == ("report",)  # allow_dependency_failure: runs once test is terminal
    assert cursor.done("report", JobState.PASSED) == ()
    assert cursor.ready() == ("cleanup",)  # continue_on_failure barrier


def test_cursor_allow_dependency_failure_runs_after_a_failure() -> None:
    cursor = _plan().frontier()
    cursor.ready()
    cursor.done("build", JobState.PASSED)
    assert cursor.ready() == ("test",)
    assert cursor.done("test", JobState.TIMED_OUT) == (
        Settled("package", JobState.SKIPPED, "test"),
    )
    assert cursor.ready() == ("report",)


def test_cursor_soft_failure_satisfies_dependents() -> None:
    cursor = _plan().frontier()
    cursor.ready()
    assert cursor.done("build", JobState.FAILED, soft_failed=True) == ()
    assert cursor.ready() == ("test",)


def test_cursor_cancel_cascades_even_through_tolerant_edges() -> None:
    cursor = _plan().frontier()
    cursor.ready()
    settled = cursor.done("build", JobState.CANCELED)
    assert {s.key: s.state for s in settled} == {
        "test": JobState.CANCELED,
        "package": JobState.CANCELED,
        "report": JobState.CANCELED,
        "cleanup": JobState.CANCELED,
    }
    assert not cursor.is_active()


def test_cursor_strict_wait_skips_everything_after_a_failure() -> None:
    cursor = _plan(
        "steps:\n  - {key: a, command: x}\n  - wait\n  - {key: b, command: y}\n"
    ).frontier()
    cursor.ready()
    assert cursor.done("a", JobState.FAILED) == (Settled("b", JobState.SKIPPED, "a"),)


def test_cursor_rejects_a_second_report_and_non_terminal_states() -> None:
    cursor = _plan().frontier()
    cursor.ready()
    with pytest.raises(InternalError, match="not terminal"):
        cursor.done("build", JobState.RUNNING)
    cursor.done("build", JobState.PASSED)
    with pytest.raises(InternalError, match="called twice"):
        cursor.done("build", JobState.PASSED)


def test_plan_readiness_recomputes_from_statuses() -> None:
    from executor import JobStatus

    plan = _plan()
    assert plan.readiness("test", {}).readiness is Readiness.WAITING
    assert plan.readiness("build", {}).readiness is Readiness.READY
    skipped = {
        "build": JobStatus(JobState.FAILED),
        "test": JobStatus(JobState.SKIPPED, cause="build"),
    }
    decision = plan.readiness("package", skipped)
    assert (decision.readiness, decision.cause) == (Readiness.SKIP, "build")
    assert plan.readiness("report", skipped).readiness is Readiness.READY


def test_plan_unknown_key_is_a_clear_key_error() -> None:
    with pytest.raises(KeyError, match="no step with key 'nope' in this plan"):
        _plan().step("nope")


# Plan order differs from file order here: y, b, w, a, c (a waits for w, which waits for b).
OUT_OF_FILE_ORDER = """
steps:
  - {key: a, command: x, depends_on: [y, w]}
  - {key: b, command: x, depends_on: [y]}
  - {key: y, command: x}
  - {key: w, command: x, depends_on: [b]}
  - {key: c, command: x, depends_on: [a, b]}
"""


def _diagnostics(text: str) -> tuple[Diagnostic, ...]:
    with pytest.raises(BuildFileError) as info:
        build_plan(parse_build_text(text))
    return info.value.diagnostics


def test_plan_keeps_its_spec_and_source() -> None:
    spec = parse_build_text(CHAIN)
    plan = build_plan(spec, source=Path("ci/build.yaml"))
    assert plan.spec is spec
    assert plan.source == Path("ci/build.yaml")


def test_plan_contains_its_step_keys_only() -> None:
    plan = _plan()
    assert "build" in plan
    assert "nope" not in plan


def test_plan_environment_overlays_the_step_env_on_the_build_env() -> None:
    plan = _plan(
        'env: {A: "build", B: "build"}\n'
        'steps:\n  - {key: a, command: x, env: {B: "step", C: "step"}}\n'
    )
    assert plan.environment("a") == {"A": "build", "B": "step", "C": "step"}


def test_plan_edges_name_every_reason_for_an_edge() -> None:
    plan = _plan(
        "steps:\n"
        "  - {key: a, command: x}\n"
        "  - {key: b, command: x, depends_on: [a], builds_in: a}\n"
        "  - {key: c, command: x, builds_in: a}\n"
        "  - wait\n"
        "  - {key: d, command: x, depends_on: [a]}\n"
        "  - {key: e, command: x, builds_in: b}\n"
    )
    dep, builds, wait = EdgeKind.DEPENDS_ON, EdgeKind.BUILDS_IN, EdgeKind.WAIT
    assert {(e.source, e.target): e.kinds for e in plan.edges} == {
        ("a", "b"): (dep, builds),
        ("a", "c"): (builds,),
        ("a", "d"): (dep, wait),
        ("b", "d"): (wait,),
        ("c", "d"): (wait,),
        ("a", "e"): (wait,),
        ("b", "e"): (builds, wait),
        ("c", "e"): (wait,),
    }
    assert not any(e.continue_on_failure or e.tolerant for e in plan.edges)


_CONTINUE = "{type: wait, continue_on_failure: true}"


@pytest.mark.parametrize(
    ("first", "second", "tolerant"),
    [
        ("wait", "wait", False),
        ("wait", _CONTINUE, False),
        (_CONTINUE, "wait", False),
        (_CONTINUE, _CONTINUE, True),
    ],
)
def test_plan_consecutive_waits_tolerate_failures_only_if_all_continue(
    first: str, second: str, tolerant: bool
) -> None:
    plan = _plan(
        f"steps:\n  - {{key: a, command: x}}\n  - {first}\n  - {second}\n"
        "  - {key: b, command: x}\n"
    )
    (edge,) = plan.edges
    assert (edge.source, edge.target, edge.kinds) == ("a", "b", (EdgeKind.WAIT,))
    assert edge.continue_on_failure is tolerant
    assert edge.tolerant is tolerant


def test_plan_leading_wait_adds_no_prerequisite() -> None:
    plan = _plan("steps:\n  - wait\n  - {key: a, command: x}\n")
    assert plan.order == ("a",)
    assert plan.prerequisites("a") == ()


def test_plan_readiness_first_bad_prerequisite_in_plan_order_decides() -> None:
    plan = _plan(OUT_OF_FILE_ORDER)
    assert plan.prerequisites("c") == ("b", "a")  # b comes first in plan order, a in the file
    statuses = {"a": JobStatus(JobState.CANCELED), "b": JobStatus(JobState.FAILED)}
    assert plan.readiness("c", statuses) == Decision(Readiness.SKIP, "b")


def test_plan_readiness_names_a_skipped_prerequisite_that_records_no_cause() -> None:
    decision = _plan().readiness("test", {"build": JobStatus(JobState.SKIPPED)})
    assert decision == Decision(Readiness.SKIP, "build")


def test_build_plan_reports_a_duplicate_key_at_its_second_use() -> None:
    text = (
        "steps:\n  - {key: x, command: x}\n  - wait\n"
        "  - {key: a, command: x}\n  - {key: a, command: x}\n"
    )
    assert _diagnostics(text) == (
        Diagnostic(
            "duplicate step key 'a': step #3 already uses it; give each step a unique key",
            loc=("steps", 3, "key"),
            step_key="a",
        ),
    )


@pytest.mark.parametrize(
    ("field", "value", "loc"),
    [("depends_on", "[biuld]", ("depends_on", 0)), ("builds_in", "biuld", ("builds_in",))],
)
def test_build_plan_reports_an_unknown_key_with_the_closest_match(
    field: str, value: str, loc: tuple[str | int, ...]
) -> None:
    text = (
        "steps:\n  - {key: build, command: x}\n  - wait\n"
        f"  - {{key: test, command: x, {field}: {value}}}\n"
    )
    assert _diagnostics(text) == (
        Diagnostic(
            f"{field} names 'biuld', which no step defines (did you mean 'build'?); define a "
            "step with key 'biuld' or remove it",
            loc=("steps", 2, *loc),
            step_key="test",
        ),
    )


def test_build_plan_reports_an_unknown_key_without_a_guess_when_none_is_close() -> None:
    text = "steps:\n  - {key: build, command: x}\n  - {key: test, command: x, depends_on: zzz}\n"
    assert _diagnostics(text) == (
        Diagnostic(
            "depends_on names 'zzz', which no step defines; define a step with key 'zzz' or "
            "remove it",
            loc=("steps", 1, "depends_on", 0),
            step_key="test",
        ),
    )


@pytest.mark.parametrize(
    ("field", "value", "loc"),
    [("depends_on", "[a]", ("depends_on", 0)), ("builds_in", "a", ("builds_in",))],
)
def test_build_plan_reports_a_step_that_depends_on_itself(
    field: str, value: str, loc: tuple[str | int, ...]
) -> None:
    text = (
        "steps:\n  - {key: x, command: x}\n  - wait\n"
        f"  - {{key: a, command: x, {field}: {value}}}\n"
    )
    assert _diagnostics(text) == (
        Diagnostic(
            f"{field} names 'a', its own key: the step depends on itself; remove it",
            loc=("steps", 2, *loc),
            step_key="a",
        ),
    )


def test_build_plan_reports_every_problem_at_once() -> None:
    text = "steps:\n  - {key: a, command: x}\n  - {key: a, command: x, depends_on: [a]}\n"
    assert [(d.loc, d.message.split(":")[0]) for d in _diagnostics(text)] == [
        (("steps", 1, "key"), "duplicate step key 'a'"),
        (("steps", 1, "depends_on", 0), "depends_on names 'a', its own key"),
    ]


@pytest.mark.parametrize(
    ("field", "value", "loc"),
    [("depends_on", "[x, b]", ("depends_on", 1)), ("builds_in", "b", ("builds_in",))],
)
def test_build_plan_cycle_points_at_the_first_steps_own_edge(
    field: str, value: str, loc: tuple[str | int, ...]
) -> None:
    text = (
        "steps:\n  - {key: x, command: x}\n  - wait\n"
        f"  - {{key: a, command: x, {field}: {value}}}\n"
        "  - {key: b, command: x, depends_on: [a]}\n"
    )
    with pytest.raises(CycleError) as info:
        build_plan(parse_build_text(text))
    assert info.value.cycle == ("a", "b", "a")
    assert info.value.diagnostics == (
        Diagnostic(
            "dependency cycle: a -> b -> a (each step depends on the next); remove one of these "
            "dependencies",
            loc=("steps", 2, *loc),
            step_key="a",
        ),
    )
